//! Handing work to whichever data channel is free.
//!
//! Each data channel thread announces itself on the shared `ready` queue when it can take a
//! job (twice at start, so one job is prepared while another is on the wire). Whoever has
//! work, the coordinator with RAM batches or a device's save job with a chunk, takes the next
//! ready channel and gives it the job; the channel sends its jobs in the order it got them.

use super::sender::Job;
use crate::cancel::CancelToken;
use crossbeam_channel::{select, Receiver, Sender};

/// The free-channel queue and every channel's job queue.
#[derive(Clone)]
pub(crate) struct Dispatcher {
    ready: Receiver<u16>,
    jobs: Vec<Sender<Job>>,
    cancel: CancelToken,
}

/// The migration is being torn down (cancelled or failed); the job was not sent.
#[derive(Debug)]
pub(crate) struct Stopped;

impl Dispatcher {
    pub fn new(ready: Receiver<u16>, jobs: Vec<Sender<Job>>, cancel: CancelToken) -> Self {
        Dispatcher {
            ready,
            jobs,
            cancel,
        }
    }

    /// Gives `job` to the next free data channel, waiting for one.
    pub fn send(&self, job: Job) -> Result<(), Stopped> {
        if self.cancel.is_cancelled() {
            return Err(Stopped);
        }
        let index = select! {
            recv(self.ready) -> i => i.map_err(|_| Stopped)?,
            recv(self.cancel.waiter()) -> _ => return Err(Stopped),
        };
        self.jobs[index as usize].send(job).map_err(|_| Stopped)
    }

    /// Puts a job made by `make` on every channel's queue, after what is already queued.
    pub fn broadcast(&self, make: impl Fn() -> Job) -> Result<(), Stopped> {
        for tx in &self.jobs {
            tx.send(make()).map_err(|_| Stopped)?;
        }
        Ok(())
    }

    /// True once the migration is being torn down.
    pub fn is_stopped(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn channels(&self) -> usize {
        self.jobs.len()
    }
}
