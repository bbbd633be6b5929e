//! Parameters an operator may change while a migration runs: the downtime limit, the
//! bandwidth cap and the bandwidth the switchover may count on (QEMU takes `downtime-limit`,
//! `max-bandwidth` and `avail-switchover-bandwidth` live, and libvirt's
//! `migrate-setmaxdowntime` and `migrate-setspeed` rely on it when a migration does not
//! converge).
//!
//! A [`LiveParams`] is a handle on a few atomics, shared by its clones, like
//! [`crate::CancelToken`] and [`crate::LiveStats`]: the caller keeps a clone of
//! [`crate::MigrationConfig::live`] and sets values from any thread; the source reads them
//! where it decides: the switchover decision at the end of every precopy round, the pacer
//! before every batch of pages. So a value set takes effect within one round.
//!
//! A value set here overrides the configuration's field
//! ([`crate::MigrationConfig::downtime_limit`], [`crate::MigrationConfig::max_bandwidth`],
//! [`crate::MigrationConfig::avail_switchover_bandwidth`]) for as long as the handle lives,
//! so the configuration keeps saying what the migration started with and a handle never set
//! changes nothing. The configuration's `*_now` methods
//! ([`crate::MigrationConfig::downtime_limit_now`] and the others) give the value in force.

use crate::config::ThrottlePolicy;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Stored in a slot nobody has set.
const UNSET: u64 = u64::MAX;
/// Stored in the bandwidth slot for "no cap" (a set value, unlike [`UNSET`]).
const NO_CAP: u64 = 0;

#[derive(Debug)]
struct Slots {
    /// Microseconds, or [`UNSET`].
    downtime_limit_us: AtomicU64,
    /// Bytes per second, [`NO_CAP`], or [`UNSET`].
    max_bandwidth: AtomicU64,
    /// Bytes per second, [`NO_CAP`] (measure it), or [`UNSET`].
    switchover_bandwidth: AtomicU64,
    /// A [`ThrottlePolicy`]'s four percentages, one byte each, or [`UNSET`].
    throttle: AtomicU64,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            downtime_limit_us: AtomicU64::new(UNSET),
            max_bandwidth: AtomicU64::new(UNSET),
            switchover_bandwidth: AtomicU64::new(UNSET),
            throttle: AtomicU64::new(UNSET),
        }
    }
}

/// Live overrides of a migration's downtime limit, bandwidth cap and switchover bandwidth;
/// clones share them.
#[derive(Debug, Clone, Default)]
pub struct LiveParams(Arc<Slots>);

impl LiveParams {
    /// Nothing set: the configuration's values hold.
    pub fn new() -> Self {
        Self::default()
    }

    /// From now on the downtime limit is `limit` (taken at the end of the round under
    /// way). Saturates at `u64::MAX - 1` microseconds.
    pub fn set_downtime_limit(&self, limit: Duration) {
        let us = u64::try_from(limit.as_micros()).unwrap_or(UNSET - 1);
        self.0.downtime_limit_us.store(us.min(UNSET - 1), Relaxed);
    }

    /// From now on RAM is paced to `cap` bytes per second, or not at all (`None`).
    pub fn set_max_bandwidth(&self, cap: Option<NonZeroU64>) {
        let v = cap.map_or(NO_CAP, |c| c.get().min(UNSET - 1));
        self.0.max_bandwidth.store(v, Relaxed);
    }

    /// From now on the expected downtime counts on `bw` bytes per second at the switchover
    /// in place of the measured rates, or on the measured rates again (`None`).
    pub fn set_switchover_bandwidth(&self, bw: Option<NonZeroU64>) {
        let v = bw.map_or(NO_CAP, |c| c.get().min(UNSET - 1));
        self.0.switchover_bandwidth.store(v, Relaxed);
    }

    /// From now on auto-converge throttles by `p` (taken at the end of the round under way).
    pub fn set_throttle(&self, p: ThrottlePolicy) {
        let v = u64::from_le_bytes([
            p.initial,
            p.increment,
            p.max,
            p.trigger_threshold,
            0,
            0,
            0,
            0,
        ]);
        self.0.throttle.store(v, Relaxed);
    }

    /// The throttle policy set here, if any.
    pub fn throttle(&self) -> Option<ThrottlePolicy> {
        match self.0.throttle.load(Relaxed) {
            UNSET => None,
            v => {
                let [initial, increment, max, trigger_threshold, ..] = v.to_le_bytes();
                Some(ThrottlePolicy {
                    initial,
                    increment,
                    max,
                    trigger_threshold,
                })
            }
        }
    }

    /// The switchover bandwidth set here, if any: `Some(None)` is "set to measure it".
    pub fn switchover_bandwidth(&self) -> Option<Option<u64>> {
        match self.0.switchover_bandwidth.load(Relaxed) {
            UNSET => None,
            NO_CAP => Some(None),
            b => Some(Some(b)),
        }
    }

    /// The downtime limit set here, if any.
    pub fn downtime_limit(&self) -> Option<Duration> {
        match self.0.downtime_limit_us.load(Relaxed) {
            UNSET => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// The bandwidth cap set here, if any: `Some(None)` is "set to no cap".
    pub fn max_bandwidth(&self) -> Option<Option<u64>> {
        match self.0.max_bandwidth.load(Relaxed) {
            UNSET => None,
            NO_CAP => Some(None),
            b => Some(Some(b)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_until_set_and_shared_by_clones() {
        let a = LiveParams::new();
        let b = a.clone();
        assert_eq!((a.downtime_limit(), a.max_bandwidth()), (None, None));
        b.set_downtime_limit(Duration::from_millis(1000));
        b.set_max_bandwidth(NonZeroU64::new(5 << 20));
        assert_eq!(a.downtime_limit(), Some(Duration::from_millis(1000)));
        assert_eq!(a.max_bandwidth(), Some(Some(5 << 20)));
        b.set_max_bandwidth(None);
        assert_eq!(a.max_bandwidth(), Some(None), "set to no cap, not unset");
        assert_eq!(a.switchover_bandwidth(), None);
        b.set_switchover_bandwidth(NonZeroU64::new(1 << 30));
        assert_eq!(a.switchover_bandwidth(), Some(Some(1 << 30)));
        b.set_downtime_limit(Duration::MAX);
        assert!(a.downtime_limit().is_some(), "a huge limit stays set");
        assert_eq!(a.throttle(), None);
        let p = ThrottlePolicy {
            initial: 30,
            increment: 5,
            max: 80,
            trigger_threshold: 100,
        };
        b.set_throttle(p);
        assert_eq!(a.throttle(), Some(p));
    }
}
