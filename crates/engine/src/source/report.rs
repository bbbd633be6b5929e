//! The source's report of a completed migration, assembled from the parts each phase
//! recorded and the destination's Loaded.

use super::coordinator::Coordinator;
use super::devices::SaveStats;
use crate::report::{ms, DeviceReport, DowntimeBreakdown, MigrationReport, PostcopyReport};
use livemig_wire::{DeviceTransfer, Loaded, SessionId};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// What the phases record for the report.
pub(super) struct ReportParts {
    pub session: SessionId,
    /// When the migration started, and how long set-up took.
    pub start: Instant,
    pub setup: Duration,
    /// How long precopy ran, until the switchover.
    pub precopy: Duration,
    /// The switchover came from a round or time bound, not from convergence.
    pub forced: bool,
    /// Expected downtime at the moment of switchover.
    pub expected_downtime_ms: f64,
    /// When the guest was paused.
    pub paused_at: Instant,
    /// When the final round's pages started to go out.
    pub transfer_started: Instant,
    pub down: DowntimeBreakdown,
    /// Every streamed device's save (multifd mode).
    pub device_stats: Vec<SaveStats>,
    /// Postcopy: when `PostcopyStart` went out, when the destination said it runs the
    /// guest, and what postcopy moved.
    pub postcopy_started: Option<Instant>,
    pub resumed_at: Option<Instant>,
    pub postcopy: Option<PostcopyReport>,
    /// Pages `PostcopyStart` listed, and the times a broken postcopy was resumed.
    pub postcopy_pages: u64,
    pub postcopy_recoveries: u32,
    /// Switchovers abandoned past the hard bound, in order.
    pub abandoned: Vec<crate::report::AbandonedSwitchover>,
}

impl ReportParts {
    pub fn new(session: SessionId, start: Instant, setup: Duration) -> Self {
        ReportParts {
            session,
            start,
            setup,
            precopy: Duration::ZERO,
            forced: false,
            expected_downtime_ms: 0.0,
            paused_at: start,
            transfer_started: start,
            down: DowntimeBreakdown::default(),
            device_stats: Vec::new(),
            postcopy_started: None,
            resumed_at: None,
            postcopy: None,
            postcopy_pages: 0,
            postcopy_recoveries: 0,
            abandoned: Vec::new(),
        }
    }
}

impl Coordinator<'_> {
    /// The report, once the destination runs the guest.
    pub(super) fn report(&mut self, loaded: &Loaded) -> MigrationReport {
        let p = &self.parts;
        let c = self.counters;
        let total = p.start.elapsed();
        let bytes = c.bytes.load(Relaxed);
        MigrationReport {
            session: p.session.to_string(),
            channels: self.config.channels,
            total_ms: ms(total),
            setup_ms: ms(p.setup),
            precopy_ms: ms(p.precopy),
            // In postcopy the pause ends when the destination runs the guest.
            downtime_ms: ms(p.resumed_at.unwrap_or_else(Instant::now) - p.paused_at)
                - p.down.dest_verify_ms,
            downtime: p.down.clone(),
            transferred_bytes: bytes,
            normal_pages: c.normal_pages.load(Relaxed),
            zero_pages: c.zero_pages.load(Relaxed),
            device_bytes: c.device_bytes.load(Relaxed),
            bytes_per_s: bytes as f64 / (total - p.setup).as_secs_f64().max(1e-9),
            rounds: std::mem::take(&mut self.precopy.rounds),
            forced_switchover: p.forced,
            expected_downtime_ms: p.expected_downtime_ms,
            pages_checked: loaded.pages_checked,
            pages_mismatched: loaded.pages_mismatched,
            device_transfer: match self.config.device_transfer {
                DeviceTransfer::Multifd => "multifd",
                DeviceTransfer::Main => "main",
            }
            .into(),
            credit_window: self.accept.window,
            buffer_cap_bytes: self.accept.buffer_cap,
            devices: self.device_reports(loaded),
            postcopy: p.postcopy.clone(),
            abandoned_switchovers: p.abandoned.clone(),
        }
    }

    /// Each streamed device: what its save job saw and what the destination loaded.
    fn device_reports(&self, loaded: &Loaded) -> Vec<DeviceReport> {
        let stats = &self.parts.device_stats;
        let devices = self.vm.devices.iter().enumerate();
        devices
            .map(|(i, d)| {
                let s = stats.get(i).cloned().unwrap_or_default();
                let l = loaded.devices.get(i).copied().unwrap_or_default();
                DeviceReport {
                    name: d.descriptor().name,
                    bytes: l.bytes,
                    chunks: l.chunks,
                    precopy_bytes: s.precopy_bytes,
                    final_save_ms: s.final_ms,
                    peak_buffered_bytes: l.peak_buffered,
                }
            })
            .collect()
    }
}
