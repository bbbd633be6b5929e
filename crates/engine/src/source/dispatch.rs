//! Handing work to whichever data channel is free.
//!
//! Each data channel thread announces itself on the shared `ready` queue when it can take a
//! job (twice at start, so one job is prepared while another is on the wire). Whoever has
//! work, the coordinator with RAM batches or a device's save job with a chunk, takes the next
//! ready channel and gives it the job; the channel sends its jobs in the order it got them.

use super::sender::Job;
use crate::cancel::CancelToken;
use crossbeam_channel::{select, Receiver, Sender};
use std::time::Instant;

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

/// Why [`Dispatcher::send_until`] did not send a job.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotSent {
    /// The migration is being torn down.
    Stopped,
    /// No channel was free by the deadline.
    Late,
}

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
        self.send_until(job, None).map_err(|_| Stopped)
    }

    /// [`Self::send`], waiting for a free channel until `deadline` at most (`Late`: the job
    /// was not sent).
    pub fn send_until(&self, job: Job, deadline: Option<Instant>) -> Result<(), NotSent> {
        if self.cancel.is_cancelled() {
            return Err(NotSent::Stopped);
        }
        let late = match deadline {
            Some(d) => crossbeam_channel::at(d),
            None => crossbeam_channel::never(),
        };
        let index = select! {
            recv(self.ready) -> i => i.map_err(|_| NotSent::Stopped)?,
            recv(self.cancel.waiter()) -> _ => return Err(NotSent::Stopped),
            recv(late) -> _ => return Err(NotSent::Late),
        };
        self.jobs[index as usize]
            .send(job)
            .map_err(|_| NotSent::Stopped)
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
