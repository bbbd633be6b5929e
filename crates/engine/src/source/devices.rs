//! A device's save job on the source: the device's whole stream, precopy data while the
//! guest runs, then the final state once switchover starts, cut into chunks that go to
//! whichever data channel is free, never outside the destination's credit.

use super::credit::CreditTable;
use super::dispatch::Dispatcher;
use super::sender::Job;
use crate::device::{Device, DeviceError};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often a device with nothing to send during precopy is asked again. Devices have no
/// way to signal new precopy data (VFIO's is an ioctl that is polled too).
const PRECOPY_POLL: Duration = Duration::from_millis(20);

/// Set once, when the guest pauses for switchover; device jobs then read the final state.
#[derive(Default)]
pub(crate) struct Switchover {
    state: Mutex<(Option<Instant>, bool)>,
    cv: Condvar,
}

impl Switchover {
    pub fn start(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0.is_none() {
            s.0 = Some(Instant::now());
        }
        self.cv.notify_all();
    }

    /// The migration ends without a switchover: waiters stop waiting.
    pub fn abort(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.cv.notify_all();
    }

    /// Waits up to `d`; returns when switchover started, if it has.
    fn wait(&self, d: Duration) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (s, _) = self
            .cv
            .wait_timeout_while(s, d, |s| s.0.is_none() && !s.1)
            .unwrap_or_else(|p| p.into_inner());
        s.0
    }

    /// Waits until switchover starts (Some) or the migration is aborted (None).
    pub fn wait_started(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let s = self
            .cv
            .wait_while(s, |s| s.0.is_none() && !s.1)
            .unwrap_or_else(|p| p.into_inner());
        s.0
    }
}

/// What one device's save job did.
#[derive(Debug, Clone, Default)]
pub(crate) struct SaveStats {
    pub precopy_bytes: u64,
    pub bytes: u64,
    pub chunks: u32,
    /// From the guest's pause until this device's last chunk was handed to a channel.
    pub final_ms: f64,
}

/// Why a save job ended early.
#[derive(Debug)]
pub(crate) enum SaveError {
    Device(DeviceError),
    /// The migration is being torn down.
    Stopped,
}

impl From<DeviceError> for SaveError {
    fn from(e: DeviceError) -> Self {
        SaveError::Device(e)
    }
}

/// The job's context: where chunks go and when they may.
pub(crate) struct SaveJob<'a> {
    pub index: u16,
    /// Test hook: send each credit window back to front.
    #[cfg(feature = "test-hooks")]
    pub reverse: bool,
    pub device: &'a dyn Device,
    pub chunk_size: usize,
    pub dispatch: Dispatcher,
    pub credits: &'a CreditTable,
    pub switchover: &'a Switchover,
}

impl SaveJob<'_> {
    pub fn run(self) -> Result<SaveStats, SaveError> {
        let mut stats = SaveStats::default();
        let mut out = Outbox::new();
        self.device.begin_save()?;
        let paused_at = loop {
            if let Some(t) = self.switchover.wait(Duration::ZERO) {
                break t;
            }
            if self.dispatch.is_stopped() {
                return Err(SaveError::Stopped);
            }
            let mut buf = out.buffer(self.chunk_size);
            let n = self.device.save_precopy(&mut buf, self.chunk_size)?;
            if n == 0 {
                self.flush(&mut out)?;
                if let Some(t) = self.switchover.wait(PRECOPY_POLL) {
                    break t;
                }
                continue;
            }
            stats.precopy_bytes += n as u64;
            self.push(&mut out, buf, false, &mut stats)?;
        };
        loop {
            let mut buf = out.buffer(self.chunk_size);
            let n = self.device.save_final(&mut buf, self.chunk_size)?;
            let last = n == 0;
            self.push(&mut out, buf, last, &mut stats)?;
            if last {
                self.flush(&mut out)?;
                stats.final_ms = paused_at.elapsed().as_secs_f64() * 1e3;
                return Ok(stats);
            }
        }
    }

    /// Numbers the next chunk and sends it (with the reverse hook, holds it until its credit
    /// window is full).
    fn push(
        &self,
        out: &mut Outbox,
        data: Vec<u8>,
        last: bool,
        stats: &mut SaveStats,
    ) -> Result<(), SaveError> {
        stats.bytes += data.len() as u64;
        stats.chunks += 1;
        let idx = out.next;
        out.next += 1;
        #[cfg(feature = "test-hooks")]
        if self.reverse {
            return self.hold_back(out, idx, data, last);
        }
        self.send(idx, data, last, &out.spare_tx)
    }

    /// The reverse hook: holds the chunk back until its credit window is full.
    #[cfg(feature = "test-hooks")]
    fn hold_back(
        &self,
        out: &mut Outbox,
        idx: u32,
        data: Vec<u8>,
        last: bool,
    ) -> Result<(), SaveError> {
        out.held.push((idx, data, last));
        let first = out.held[0].0;
        if idx + 1 >= self.credits.up_to(self.index as usize).max(first + 1) {
            self.flush(out)?;
        }
        Ok(())
    }

    /// Sends every chunk the reverse hook held, last first (none is held without it).
    fn flush(&self, out: &mut Outbox) -> Result<(), SaveError> {
        #[cfg(feature = "test-hooks")]
        while let Some((idx, data, last)) = out.held.pop() {
            self.send(idx, data, last, &out.spare_tx)?;
        }
        let _ = out;
        Ok(())
    }

    fn send(
        &self,
        idx: u32,
        data: Vec<u8>,
        last: bool,
        recycle: &crossbeam_channel::Sender<Vec<u8>>,
    ) -> Result<(), SaveError> {
        self.credits
            .wait(self.index as usize, idx)
            .map_err(|_| SaveError::Stopped)?;
        self.dispatch
            .send(Job::Chunk {
                device: self.index,
                idx,
                last,
                data,
                recycle: recycle.clone(),
            })
            .map_err(|_| SaveError::Stopped)
    }
}

/// Chunks numbered so far, (reverse hook) those held back, and buffers sent chunks gave back:
/// fresh memory costs page faults, which on these hosts cost more than moving the bytes.
struct Outbox {
    next: u32,
    #[cfg(feature = "test-hooks")]
    held: Vec<(u32, Vec<u8>, bool)>,
    spare_tx: crossbeam_channel::Sender<Vec<u8>>,
    spare_rx: crossbeam_channel::Receiver<Vec<u8>>,
}

impl Outbox {
    fn new() -> Self {
        let (spare_tx, spare_rx) = crossbeam_channel::bounded(8);
        Outbox {
            next: 0,
            #[cfg(feature = "test-hooks")]
            held: Vec::new(),
            spare_tx,
            spare_rx,
        }
    }

    /// An empty buffer with room for a chunk.
    fn buffer(&self, chunk: usize) -> Vec<u8> {
        match self.spare_rx.try_recv() {
            Ok(mut b) => {
                b.clear();
                b
            }
            Err(_) => Vec::with_capacity(chunk),
        }
    }
}
