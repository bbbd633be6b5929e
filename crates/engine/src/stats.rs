//! Live counters of a running migration, readable from outside while it runs (a control
//! API's `query-migrate` reads them; the source's channel threads write them).

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Totals over all data channels, updated as frames are sent.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes of every frame sent on the data channels, headers included (in serial device
    /// mode, plus the device state sent on the main channel).
    pub bytes: AtomicU64,
    /// RAM pages sent with their contents.
    pub normal_pages: AtomicU64,
    /// RAM pages sent as zero (a flag, no contents).
    pub zero_pages: AtomicU64,
    /// Bytes of device state sent.
    pub device_bytes: AtomicU64,
    /// Bytes of RamPages frames (headers included): what a round's rate is measured on.
    pub ram_bytes: AtomicU64,
    /// Postcopy: pages the destination asked for (across resumed sessions).
    pub postcopy_requests: AtomicU64,
}

/// A handle on a migration's counters. Clones share them; the source resets them when an
/// attempt starts, so one handle can watch a migration, its cancel and the retry.
#[derive(Debug, Clone, Default)]
pub struct LiveStats(Arc<Counters>);

/// The counters at one moment (see [`Counters`] for each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    /// Bytes of every frame sent on the data channels, headers included (in serial device
    /// mode, plus the device state sent on the main channel).
    pub bytes: u64,
    /// RAM pages sent with their contents (a page sent in several rounds counts each time).
    pub normal_pages: u64,
    /// RAM pages sent as zero.
    pub zero_pages: u64,
    /// Bytes of device state sent.
    pub device_bytes: u64,
    /// Bytes of RamPages frames, headers included.
    pub ram_bytes: u64,
    /// Postcopy: pages the destination asked for.
    pub postcopy_requests: u64,
}

impl LiveStats {
    /// Counters at zero, not yet shared with a migration: put (a clone of) it in
    /// [`crate::MigrationConfig::stats`].
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.0
    }

    pub(crate) fn reset(&self) {
        let c = &self.0;
        for a in [
            &c.bytes,
            &c.normal_pages,
            &c.zero_pages,
            &c.device_bytes,
            &c.ram_bytes,
            &c.postcopy_requests,
        ] {
            a.store(0, Relaxed);
        }
    }

    /// Reads every counter (each exact; together within a frame of each other).
    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.0;
        StatsSnapshot {
            bytes: c.bytes.load(Relaxed),
            normal_pages: c.normal_pages.load(Relaxed),
            zero_pages: c.zero_pages.load(Relaxed),
            device_bytes: c.device_bytes.load(Relaxed),
            ram_bytes: c.ram_bytes.load(Relaxed),
            postcopy_requests: c.postcopy_requests.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_and_reset_clears() {
        let a = LiveStats::new();
        let b = a.clone();
        a.counters().normal_pages.fetch_add(3, Relaxed);
        a.counters().bytes.fetch_add(4096, Relaxed);
        assert_eq!(b.snapshot().normal_pages, 3);
        assert_eq!(b.snapshot().bytes, 4096);
        b.reset();
        assert_eq!(a.snapshot(), StatsSnapshot::default());
    }
}
