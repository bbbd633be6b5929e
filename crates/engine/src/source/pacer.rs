//! Keeps the data channels under the bandwidth cap in force (`--max-bandwidth`, or the value
//! set live through [`crate::LiveParams`]) by pacing the dispatch of batches.

use std::time::{Duration, Instant};

/// The most time a pacer that fell behind may catch up on at once: beyond it, a slow spell
/// (a busy CPU, a slow link, an idle wait for acks) would let the next batches go above the
/// cap until the average since the start came back down to it.
const MAX_CREDIT: Duration = Duration::from_millis(20);

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

    /// Accounts for `bytes` about to be sent at `rate` (the cap in force now), sleeping
    /// first if sending them now would exceed it. A rate that changed starts a new count
    /// from now: bytes sent under the old cap neither delay nor burst the new one.
    pub fn admit(&mut self, bytes: u64, rate: Option<u64>) {
        if rate != self.rate {
            *self = Pacer::new(rate);
        }
        let Some(rate) = self.rate else { return };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        } else if elapsed - due > MAX_CREDIT {
            // Sending fell behind the cap (the link or the CPU was slower, or nothing was
            // sent for a while): that time is not owed back as a burst above the cap.
            self.start = Instant::now();
            self.bytes = 0;
        }
        self.bytes += bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::Pacer;

    #[test]
    fn time_spent_below_the_cap_is_not_a_burst_above_it() {
        let mut p = Pacer::new(Some(100 << 20));
        p.admit(4096, Some(100 << 20));
        std::thread::sleep(std::time::Duration::from_millis(60));
        // 60 ms idle: the next batch restarts the count instead of owing 6 MiB of burst.
        p.admit(4096, Some(100 << 20));
        assert_eq!(p.bytes, 4096, "the count restarted");
    }

    #[test]
    fn a_new_rate_starts_a_new_count() {
        let mut p = Pacer::new(Some(1 << 20));
        p.admit(1 << 30, Some(1 << 20));
        assert_eq!(p.bytes, 1 << 30);
        // Under the old cap the next batch would wait ~1000 s; lifted, it goes at once.
        p.admit(4096, None);
        assert_eq!((p.rate, p.bytes), (None, 0), "no cap, nothing counted");
        p.admit(4096, Some(1 << 30));
        assert_eq!((p.rate, p.bytes), (Some(1 << 30), 4096));
    }
}
