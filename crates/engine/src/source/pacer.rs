//! Keeps the data channels under `--max-bandwidth` by pacing the dispatch of batches.

use std::time::{Duration, Instant};

pub(crate) struct Pacer {
    rate: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl Pacer {
    pub fn new(rate: Option<u64>) -> Self {
        Pacer {
            rate,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts for `bytes` about to be sent, sleeping first if sending them now would exceed
    /// the rate.
    pub fn admit(&mut self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
        self.bytes += bytes;
    }
}
