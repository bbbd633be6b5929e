//! `query-migrate`: a migration's state with QEMU's field names and meanings, plus
//! livemig's device-state section and downtime breakdown.

use super::state::MigStatus;
use livemig_engine::config::PostcopyTrigger;
use livemig_engine::{IncomingReport, LiveStats, MigrationReport, RoundReport, StatsSnapshot};
use livemig_wire::PAGE_SIZE;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// What the machine keeps of an outgoing migration, live and after its end.
pub struct Outgoing {
    pub to: String,
    pub start: Instant,
    pub end: Option<Instant>,
    pub setup_ms: Option<f64>,
    pub stats: LiveStats,
    pub total_pages: u64,
    /// Bitmap syncs so far: one per round started.
    pub dirty_syncs: u32,
    pub round_pages: u64,
    /// Pages sent (normal + zero) when the current round started.
    pub round_start_sent: u64,
    pub last_round: Option<RoundReport>,
    pub expected_downtime_ms: f64,
    pub devices: Vec<String>,
    pub report: Option<MigrationReport>,
    pub error: Option<String>,
    /// Postcopy: whether it may happen, the switch asked for, and where it stands.
    pub postcopy: PostcopyWatch,
    /// `postcopy-blocktime`: report the destination's time blocked on faults.
    pub blocktime: bool,
    /// RAM bytes sent when the guest paused: `precopy-bytes`, and what follows is
    /// `downtime-bytes` (or, at a switch to postcopy, `postcopy-bytes`).
    pub ram_bytes_at_pause: Option<u64>,
    /// The guest was stopped by its operator before the migration (it stays stopped).
    pub guest_paused: bool,
    /// Switchovers abandoned past `x-downtime-hard-limit` so far.
    pub abandoned: Vec<livemig_engine::AbandonedSwitchover>,
}

/// Where an outgoing migration stands with respect to postcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// Precopy (or a plain switchover).
    Precopy,
    /// Switched to postcopy, with the pages sent and still dirty at the switch.
    Postcopy { sent_at: u64, remaining_at: u64 },
}

/// What tells the switch to postcopy apart from a plain switchover on the source.
pub struct PostcopyWatch {
    /// The `postcopy-ram` capability was on when the migration started.
    pub allowed: bool,
    /// A clone of the migration's trigger (`migrate-start-postcopy` fires it).
    pub trigger: PostcopyTrigger,
    pub switch: Switch,
}

impl PostcopyWatch {
    /// What the guest's pause (`Progress::Switchover`) is: the engine says whether it is
    /// the switch to postcopy.
    pub fn at_pause(&self, postcopy: bool, sent: u64, dirty: u64) -> Switch {
        if self.allowed && postcopy {
            Switch::Postcopy {
                sent_at: sent,
                remaining_at: dirty,
            }
        } else {
            Switch::Precopy
        }
    }

    /// The switch to postcopy has happened, or may have.
    pub fn started(&self) -> bool {
        self.switch != Switch::Precopy
    }
}

/// What the machine keeps of an incoming migration.
pub struct IncomingJob {
    pub uri: String,
    pub start: Instant,
    pub end: Option<Instant>,
    pub report: Option<IncomingReport>,
    pub error: Option<String>,
    /// `postcopy-blocktime` on this side: report the vCPUs' time blocked on faults.
    pub blocktime: bool,
}

/// QEMU's `postcopy-vcpu-blocktime`: milliseconds each vCPU was blocked on faults, by vCPU
/// index, from the threads named `...vcpu<N>` in the destination's report (0 for a vCPU
/// that never faulted).
fn vcpu_blocktime(threads: &[livemig_engine::report::ThreadBlocktime]) -> Vec<u64> {
    let vcpu = |name: &str| -> Option<usize> {
        let digits = name.rsplit_once("vcpu")?.1;
        digits.parse().ok().filter(|&n: &usize| n < 4096)
    };
    let mut ms = Vec::new();
    for t in threads {
        if let Some(n) = vcpu(&t.thread) {
            if ms.len() <= n {
                ms.resize(n + 1, 0);
            }
            ms[n] += t.blocked_us / 1000;
        }
    }
    ms
}

fn ms_since(start: Instant, end: Option<Instant>) -> u64 {
    end.unwrap_or_else(Instant::now)
        .duration_since(start)
        .as_millis() as u64
}

impl Outgoing {
    pub fn new(
        to: String,
        stats: LiveStats,
        devices: Vec<String>,
        postcopy: PostcopyWatch,
        blocktime: bool,
    ) -> Self {
        Outgoing {
            to,
            start: Instant::now(),
            end: None,
            setup_ms: None,
            stats,
            total_pages: 0,
            dirty_syncs: 0,
            round_pages: 0,
            round_start_sent: 0,
            last_round: None,
            expected_downtime_ms: 0.0,
            devices,
            report: None,
            error: None,
            postcopy,
            blocktime,
            ram_bytes_at_pause: None,
            guest_paused: false,
            abandoned: Vec::new(),
        }
    }

    /// `query-migrate`'s answer for this migration in `status`.
    pub fn query(&self, status: MigStatus) -> Value {
        let mut m = Map::new();
        m.insert("status".into(), json!(status.name()));
        m.insert(
            "total-time".into(),
            json!(self
                .report
                .as_ref()
                .map_or(ms_since(self.start, self.end), |r| r.total_ms as u64)),
        );
        if let Some(s) = self.setup_ms {
            m.insert("setup-time".into(), json!(s as u64));
        }
        let s = self.stats.snapshot();
        m.insert("ram".into(), self.ram(&s));
        if let Some(r) = &self.last_round {
            m.insert("cpu-throttle-percentage".into(), json!(r.throttle_percent));
        }
        self.insert_devices(&mut m, status, &s);
        m.insert("x-abandoned-switchovers".into(), self.abandoned_json());
        if self.blocktime {
            if let Some(pc) = self.report.as_ref().and_then(|r| r.postcopy.as_ref()) {
                // The total only: livemig does not count per vCPU (no
                // `postcopy-vcpu-blocktime`).
                m.insert(
                    "postcopy-blocktime".into(),
                    json!(pc.blocked_ms.round() as u64),
                );
            }
        }
        if let Some(e) = &self.error {
            m.insert("error-desc".into(), json!(e));
        }
        Value::Object(m)
    }

    /// `query-migrate`'s `ram` object.
    fn ram(&self, s: &StatsSnapshot) -> Value {
        let page = PAGE_SIZE as u64;
        let sent = s.normal_pages + s.zero_pages;
        let (mbps, pps, dirty_rate) = match &self.last_round {
            Some(r) if r.ms > 0.0 => (
                r.bytes_per_s * 8.0 / 1e6,
                r.pages as f64 / (r.ms / 1e3),
                r.dirty_after as f64 / (r.ms / 1e3),
            ),
            _ => (0.0, 0.0, 0.0),
        };
        let (remaining_pages, postcopy_pages) = match (&self.report, self.postcopy.switch) {
            (Some(r), _) => (0, r.postcopy.as_ref().map_or(0, |p| p.pages)),
            // Live, the pages sent since the switch (the report counts those listed).
            (
                None,
                Switch::Postcopy {
                    sent_at,
                    remaining_at,
                },
            ) => {
                let since = sent.saturating_sub(sent_at);
                (remaining_at.saturating_sub(since), since)
            }
            (None, _) => (
                self.round_pages
                    .saturating_sub(sent.saturating_sub(self.round_start_sent)),
                0,
            ),
        };
        let requests = s.postcopy_requests;
        // QEMU's split of `transferred`: before the pause, during it (the switchover's last
        // pages; none at a switch to postcopy, whose pages are postcopy's).
        let precopy_bytes = self.ram_bytes_at_pause.unwrap_or(s.ram_bytes);
        let downtime_bytes = match self.postcopy.switch {
            Switch::Postcopy { .. } => 0,
            Switch::Precopy => s.ram_bytes.saturating_sub(precopy_bytes),
        };
        json!({
                "transferred": s.ram_bytes,
                "remaining": remaining_pages * page,
                "total": self.total_pages * page,
                "duplicate": s.zero_pages,
                "normal": s.normal_pages,
                "normal-bytes": s.normal_pages * page,
                "mbps": mbps,
                "dirty-pages-rate": dirty_rate as u64,
                "dirty-sync-count": self.dirty_syncs,
                "pages-per-second": pps as u64,
                "page-size": page,
                "multifd-bytes": s.ram_bytes,
                "postcopy-requests": requests,
                "postcopy-bytes": postcopy_pages * page,
                "precopy-bytes": precopy_bytes,
                "downtime-bytes": downtime_bytes,
        })
    }

    /// Switchovers abandoned past the hard bound, each with the pause the guest saw.
    fn abandoned_json(&self) -> Value {
        let list = match &self.report {
            Some(r) => &r.abandoned_switchovers,
            None => &self.abandoned,
        };
        list.iter()
            .map(|a| {
                json!({
                    "round": a.round,
                    "expected-downtime": a.expected_downtime_ms.round() as u64,
                    "cut-ms": a.cut_ms,
                    "paused-ms": a.paused_ms,
                    "waiting-for": a.waiting_for,
                })
            })
            .collect()
    }

    /// The downtime and device state once done, the expected downtime and device names
    /// before.
    fn insert_devices(&self, m: &mut Map<String, Value>, status: MigStatus, s: &StatsSnapshot) {
        match &self.report {
            Some(r) => {
                m.insert("downtime".into(), json!(r.downtime_ms.round() as u64));
                m.insert("downtime-breakdown".into(), json!(r.downtime));
                // What was expected when the guest paused, beside what followed.
                m.insert(
                    "x-expected-downtime".into(),
                    json!(r.expected_downtime_ms.round() as u64),
                );
                m.insert("x-forced-switchover".into(), json!(r.forced_switchover));
                m.insert(
                    "device-state".into(),
                    Value::Array(
                        r.devices
                            .iter()
                            .map(|d| {
                                json!({
                                    "name": d.name, "state": "loaded", "bytes": d.bytes,
                                    "chunks": d.chunks, "precopy-bytes": d.precopy_bytes,
                                    "peak-buffered-bytes": d.peak_buffered_bytes,
                                    "final-save-ms": d.final_save_ms,
                                })
                            })
                            .collect(),
                    ),
                );
            }
            None => {
                if status.in_progress() {
                    m.insert(
                        "expected-downtime".into(),
                        json!(self.expected_downtime_ms.round() as u64),
                    );
                    if let Some(r) = &self.last_round {
                        m.insert("x-expected-downtime-parts".into(), expected_parts(r));
                    }
                }
                let state = if status.in_progress() {
                    "active"
                } else {
                    status.name()
                };
                m.insert(
                    "device-state".into(),
                    Value::Array(
                        self.devices
                            .iter()
                            .map(|n| json!({"name": n, "state": state}))
                            .collect(),
                    ),
                );
                m.insert("x-device-bytes".into(), json!(s.device_bytes));
            }
        }
    }
}

/// The parts of the last round's expected downtime (see `docs/state-machines.md`).
fn expected_parts(r: &RoundReport) -> Value {
    json!({
        "ram-ms": r.ram_expected_ms.round() as u64,
        "device-read-ms": r.device_read_ms.round() as u64,
        "device-final-bytes": r.device_final_bytes,
        "channel-bytes-per-s": r.channel_bytes_per_s as u64,
        "downtime-limit": r.downtime_limit_ms.round() as u64,
    })
}

impl IncomingJob {
    pub fn query(&self, status: MigStatus) -> Value {
        let mut m = Map::new();
        m.insert("status".into(), json!(status.name()));
        match &self.report {
            Some(r) => {
                let page = PAGE_SIZE as u64;
                m.insert("total-time".into(), json!(r.total_ms as u64));
                m.insert(
                    "ram".into(),
                    json!({
                        "transferred": r.received_bytes,
                        "remaining": 0,
                        "total": r.memory_bytes,
                        "duplicate": r.zero_pages,
                        "normal": r.normal_pages,
                        "normal-bytes": r.normal_pages * page,
                        "dirty-sync-count": r.rounds,
                        "page-size": page,
                    }),
                );
                m.insert(
                    "device-state".into(),
                    Value::Array(
                        r.device_peak_buffered_bytes
                            .iter()
                            .enumerate()
                            .map(|(i, b)| json!({"index": i, "state": "loaded", "peak-buffered-bytes": b}))
                            .collect(),
                    ),
                );
                if let Some(f) = r.postcopy_faults.as_ref().filter(|_| self.blocktime) {
                    m.insert("postcopy-blocktime".into(), json!(f.total_us / 1000));
                    m.insert(
                        "postcopy-vcpu-blocktime".into(),
                        json!(vcpu_blocktime(&f.threads)),
                    );
                }
            }
            None => {
                m.insert("total-time".into(), json!(ms_since(self.start, self.end)));
            }
        }
        if let Some(e) = &self.error {
            m.insert("error-desc".into(), json!(e));
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_blocktime_is_per_vcpu_index_from_thread_names() {
        use livemig_engine::report::ThreadBlocktime;
        let t = |thread: &str, blocked_us| ThreadBlocktime {
            thread: thread.into(),
            faults: 1,
            blocked_us,
        };
        let threads = [
            t("kvm-vcpu2", 5_400),
            t("lm-dst-ch0", 9_000),
            t("kvm-vcpu0", 1_200),
            t("tid 77", 3_000),
            t("kvm-vcpu99999", 1_000),
        ];
        assert_eq!(vcpu_blocktime(&threads), vec![1, 0, 5]);
        assert!(vcpu_blocktime(&[]).is_empty());
    }

    fn watch(allowed: bool) -> PostcopyWatch {
        PostcopyWatch {
            allowed,
            trigger: PostcopyTrigger::default(),
            switch: Switch::Precopy,
        }
    }

    #[test]
    fn the_pause_is_what_the_engine_says() {
        let post = Switch::Postcopy {
            sent_at: 10,
            remaining_at: 5,
        };
        assert_eq!(watch(false).at_pause(true, 10, 5), Switch::Precopy);
        assert_eq!(watch(true).at_pause(false, 10, 5), Switch::Precopy);
        assert_eq!(watch(true).at_pause(true, 10, 5), post);
    }
}
