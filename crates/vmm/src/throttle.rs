//! Throttling a guest's vCPUs for auto-converge, as QEMU's CPU throttle does: at `p`
//! percent a vCPU thread, after each stretch of running, sleeps `p / (100 - p)` times as long
//! as it ran, so it runs `100 - p` percent of the time and dirties memory that much slower.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The highest throttle (QEMU's `max-cpu-throttle` default).
pub const MAX_PERCENT: u8 = 99;
/// A vCPU runs at least this long between throttle sleeps (finer would cost more in
/// wake-ups than it controls).
const MIN_SLICE: Duration = Duration::from_millis(2);
/// No single throttle sleep is longer (a pause or stop still wakes it at once).
const MAX_SLEEP: Duration = Duration::from_millis(500);

/// The throttle a guest's vCPU threads share.
#[derive(Debug, Default)]
pub struct Throttle(AtomicU32);

impl Throttle {
    /// Sets the throttle to `percent` (clamped to [`MAX_PERCENT`]); 0 lifts it.
    pub fn set(&self, percent: u8) {
        self.0
            .store(percent.min(MAX_PERCENT) as u32, Ordering::Release);
    }

    pub fn percent(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

/// One vCPU thread's account of how long it ran since it last slept for the throttle.
#[derive(Debug)]
pub struct ThrottleClock {
    since: Instant,
}

impl Default for ThrottleClock {
    fn default() -> Self {
        ThrottleClock {
            since: Instant::now(),
        }
    }
}

impl ThrottleClock {
    /// After a stretch of running: how long to sleep now, if at all. Call
    /// [`Self::restart`] after sleeping (or after any other pause in running).
    pub fn due(&mut self, t: &Throttle) -> Option<Duration> {
        let p = t.percent();
        if p == 0 {
            self.since = Instant::now();
            return None;
        }
        let ran = self.since.elapsed();
        if ran < MIN_SLICE {
            return None;
        }
        Some(sleep_for(ran, p))
    }

    pub fn restart(&mut self) {
        self.since = Instant::now();
    }
}

/// How long a vCPU that ran `ran` sleeps at `percent`.
fn sleep_for(ran: Duration, percent: u32) -> Duration {
    let p = percent.min(MAX_PERCENT as u32);
    (ran * p / (100 - p)).min(MAX_SLEEP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_keeps_the_running_share_at_100_minus_p() {
        let ran = Duration::from_millis(10);
        assert_eq!(sleep_for(ran, 20), Duration::from_micros(2500));
        assert_eq!(sleep_for(ran, 50), ran);
        assert_eq!(sleep_for(ran, 99), Duration::from_millis(500), "capped");
        assert_eq!(sleep_for(ran, 200), Duration::from_millis(500), "clamped");
    }

    #[test]
    fn no_sleep_when_lifted_or_too_soon() {
        let t = Throttle::default();
        let mut c = ThrottleClock::default();
        assert_eq!(c.due(&t), None);
        t.set(50);
        assert_eq!(c.due(&t), None, "ran less than a slice");
        std::thread::sleep(Duration::from_millis(3));
        let d = c.due(&t).unwrap();
        assert!(d >= Duration::from_millis(2), "{d:?}");
        t.set(0);
        assert_eq!(c.due(&t), None);
    }
}
