//! One two-process migration of a filled guest, as the suite's sections ask for it, and its
//! typed row; what each of its processes used ([`Usage`]).

use super::args::{rate_label, MAX_RATE};
use super::plan::{Plan, CHANNELS, GIB};
use crate::bench::run::{filled_guest_args, Figures, Run};
use crate::bench::BenchArgs;
use crate::pair::run_pair;
use serde::Serialize;

/// One two-process migration of a filled guest.
pub(super) struct Spec {
    pub memory: u64,
    pub channels: u16,
    /// 0: an idle guest.
    pub working_set: u64,
    /// Page writes per second; [`MAX_RATE`]: as fast as the guest can.
    pub dirty_rate: u64,
    /// The destination allocates and pre-faults guest memory before the source connects.
    pub warm_destination: bool,
    /// Pages carry their CRC32C (livemig's default).
    pub page_checksums: bool,
    /// Local mode: memory handed over a Unix socket, not copied.
    pub local: bool,
    /// zstd level of `--compress zstd`, if compressed.
    pub compress: Option<i32>,
}

impl Spec {
    /// A migration of a filled guest with livemig's defaults: 4 channels, page CRCs, copied.
    pub(super) fn new(memory: u64) -> Spec {
        Spec {
            memory,
            channels: CHANNELS,
            working_set: 0,
            dirty_rate: 0,
            warm_destination: false,
            page_checksums: true,
            local: false,
            compress: None,
        }
    }

    fn idle(&self) -> bool {
        self.working_set == 0 || self.dirty_rate == 0
    }

    /// The destination's and the source's arguments.
    fn child_args(&self, a: &BenchArgs, plan: &Plan) -> (Vec<String>, Vec<String>) {
        let idle = self.idle();
        let rate = if self.dirty_rate == MAX_RATE {
            0
        } else {
            self.dirty_rate
        };
        let ws = if idle { 0 } else { self.working_set };
        let mut src = filled_guest_args(a, self.memory, ws, rate, plan.warmup_ms, self.channels);
        src.push(format!("--page-checksums={}", self.page_checksums));
        let mut dest = Vec::new();
        if self.warm_destination {
            dest.push(format!("--memory={}", self.memory));
        }
        if let Some(level) = self.compress {
            src.push("--compress=zstd".into());
            src.push(format!("--compress-level={level}"));
        }
        if self.local {
            src.push("--local".into());
            dest.push(crate::pair::unix_listen_arg("bench"));
        }
        (dest, src)
    }
}

/// The row of one migration of the channels, size, dirty, local and compress sections.
#[derive(Debug, Clone, Serialize)]
pub(super) struct MigrationRow {
    pub memory_bytes: u64,
    pub channels: u16,
    pub working_set_bytes: u64,
    /// Pages per second; null: as fast as the guest writes.
    pub dirty_rate: Option<u64>,
    pub dirty_rate_label: String,
    pub warm_destination: bool,
    pub page_checksums: bool,
    pub local: bool,
    pub compress_level: Option<i32>,
    #[serde(flatten)]
    pub figures: Figures,
    pub precopy_ms: f64,
    pub ram_pages_sent: f64,
    /// Distinct pages the guest dirtied while the first round was sent.
    pub first_round_dirty_after_pages: u64,
    pub forced_switchover: bool,
}

pub(super) fn migrate_once(
    a: &BenchArgs,
    plan: &Plan,
    s: &Spec,
) -> anyhow::Result<Run<MigrationRow>> {
    let idle = s.idle();
    let (dest, src) = s.child_args(a, plan);
    let r = run_pair(&dest, &src, |_| {})?;
    let rep = &r.source.report;
    let row = MigrationRow {
        memory_bytes: s.memory,
        channels: s.channels,
        working_set_bytes: if idle { 0 } else { s.working_set },
        dirty_rate: match (idle, s.dirty_rate) {
            (true, _) => Some(0),
            (false, MAX_RATE) => None,
            (false, r) => Some(r),
        },
        dirty_rate_label: if idle {
            "0".into()
        } else {
            rate_label(s.dirty_rate)
        },
        warm_destination: s.warm_destination,
        page_checksums: s.page_checksums,
        local: s.local,
        compress_level: s.compress,
        figures: Figures::of(rep),
        precopy_ms: rep.precopy_ms,
        ram_pages_sent: rep.normal_pages as f64 + rep.zero_pages as f64,
        first_round_dirty_after_pages: rep.rounds.first().map_or(0, |r| r.dirty_after),
        forced_switchover: rep.forced_switchover,
    };
    Ok(Run::new(row, r))
}

/// The resources section's figures for one run, from the final lines of its two processes.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Usage {
    pub moved_bytes: u64,
    pub source_peak_rss_bytes: Option<u64>,
    pub dest_peak_rss_bytes: u64,
    pub dest_guest_memory_bytes: u64,
    pub dest_rss_over_guest_bytes: i64,
    pub dest_peak_buffered_bytes: u64,
    pub dest_peak_buffered_max_device_bytes: u64,
    pub source_cpu_s: f64,
    pub dest_cpu_s: f64,
    pub source_guest_cpu_s: f64,
    pub source_process_cpu_s: f64,
    pub dest_process_cpu_s: f64,
    pub source_cpu_s_per_gib: f64,
    pub dest_cpu_s_per_gib: f64,
}

impl Usage {
    pub(super) fn of<R>(run: &Run<R>) -> Usage {
        let (src, dst) = (&run.source, &run.dest);
        let moved = src.report.transferred_bytes;
        let gib = moved as f64 / GIB;
        let per_gib = |s: f64| if gib > 0.0 { s / gib } else { 0.0 };
        let dst_rss = dst.peak_rss_bytes.unwrap_or(0);
        let guest_mem = dst.report.memory_bytes;
        let buffered = &dst.report.device_peak_buffered_bytes;
        Usage {
            moved_bytes: moved,
            source_peak_rss_bytes: src.peak_rss_bytes,
            dest_peak_rss_bytes: dst_rss,
            dest_guest_memory_bytes: guest_mem,
            dest_rss_over_guest_bytes: dst_rss as i64 - guest_mem as i64,
            dest_peak_buffered_bytes: buffered.iter().sum::<u64>(),
            dest_peak_buffered_max_device_bytes: buffered.iter().copied().max().unwrap_or(0),
            source_cpu_s: src.cpu.migration_s,
            dest_cpu_s: dst.cpu.migration_s,
            source_guest_cpu_s: src.cpu.guest_s,
            source_process_cpu_s: src.cpu.process_s,
            dest_process_cpu_s: dst.cpu.process_s,
            source_cpu_s_per_gib: per_gib(src.cpu.migration_s),
            dest_cpu_s_per_gib: per_gib(dst.cpu.migration_s),
        }
    }
}
