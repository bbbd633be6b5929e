//! A row's results (the samples of each tool, their medians, livemig's ratios to QEMU) and
//! the Markdown table and JSON made of them.

use super::migration::{CheckedBy, Sample};
use super::work::{GuestWork, Load, RowSpec};
use serde_json::{json, Value};
use std::fmt::Write as _;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// What one row measured.
pub(super) struct RowResult {
    pub(super) spec: RowSpec,
    pub(super) guest: GuestWork,
    pub(super) qemu: Vec<Sample>,
    pub(super) livemig: Vec<Sample>,
    /// Why the row stopped, if it did (a failed migration or page check).
    pub(super) failure: Option<String>,
}

/// The median of one figure over the samples (the mean of the middle two for an even count).
fn median(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Option<f64> {
    let mut v: Vec<f64> = samples.iter().map(f).filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The smallest and largest of one figure over the samples.
fn range(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> Option<(f64, f64)> {
    let v = samples.iter().map(f).filter(|x| x.is_finite());
    v.fold(None, |r, x| match r {
        None => Some((x, x)),
        Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
    })
}

/// A total time cell: the median, and the range when there is more than one sample.
fn total_cell(samples: &[Sample]) -> String {
    let m = cell(median(samples, |x| x.total_ms), 0);
    match range(samples, |x| x.total_ms) {
        Some((lo, hi)) if samples.len() > 1 => format!("{m} ({lo:.0}-{hi:.0})"),
        _ => m,
    }
}

/// One tool's medians in a row.
#[derive(Default, Clone, Copy)]
struct Medians {
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    setup_ms: Option<f64>,
    dest_cpu_s: Option<f64>,
    dest_rss: Option<f64>,
}

impl Medians {
    fn of(s: &[Sample]) -> Medians {
        Medians {
            total_ms: median(s, |x| x.total_ms),
            downtime_ms: median(s, |x| x.downtime_ms),
            setup_ms: median(s, |x| x.setup_ms),
            dest_cpu_s: median(s, |x| x.dest_cpu_s),
            dest_rss: median(s, |x| x.dest_peak_rss_bytes as f64),
        }
    }

    fn json(&self) -> Value {
        json!({
            "total_ms": self.total_ms,
            "downtime_ms": self.downtime_ms,
            "setup_ms": self.setup_ms,
            "dest_cpu_s": self.dest_cpu_s,
            "dest_peak_rss_bytes": self.dest_rss,
        })
    }
}

fn ratio(l: Option<f64>, q: Option<f64>) -> Option<f64> {
    match (l, q) {
        (Some(l), Some(q)) if q > 0.0 => Some(l / q),
        _ => None,
    }
}

impl RowResult {
    fn medians(&self) -> (Medians, Medians) {
        (Medians::of(&self.qemu), Medians::of(&self.livemig))
    }

    /// livemig / QEMU for total time, downtime and destination peak RSS.
    fn ratios(&self) -> [Option<f64>; 3] {
        let (q, l) = self.medians();
        [
            ratio(l.total_ms, q.total_ms),
            ratio(l.downtime_ms, q.downtime_ms),
            ratio(l.dest_rss, q.dest_rss),
        ]
    }

    pub(super) fn json(&self) -> Value {
        let (q, l) = self.medians();
        let [total, downtime, rss] = self.ratios();
        json!({
            "row": self.spec.to_string(),
            "destination": self.spec.dest.to_string(),
            "work": self.spec.load.to_string(),
            "channels": self.spec.channels,
            "memory_bytes": self.guest.memory,
            "fill_bytes": self.guest.fill,
            "working_set_bytes": self.guest.working_set,
            "dirty_rate_pages_per_s": self.guest.rate,
            "qemu": {"median": q.json(), "samples": self.qemu},
            "livemig": {"median": l.json(), "samples": self.livemig},
            "livemig_to_qemu": {"total": total, "downtime": downtime, "dest_peak_rss": rss},
            "failure": self.failure,
        })
    }
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.decimals$}"))
}

fn size(b: u64) -> String {
    if b.is_multiple_of(1 << 30) {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / GIB)
    } else {
        format!("{} MiB", b >> 20)
    }
}

/// How each tool's pages were checked, for the check column: "3 ok" plus who checked.
fn checks(samples: &[Sample]) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    let by = |c: CheckedBy| samples.iter().filter(|s| s.checked_by == c).count();
    let (g, q) = (by(CheckedBy::GuestVerify), by(CheckedBy::Qmp));
    match (g, q) {
        (g, 0) => format!("{g} ok (guest)"),
        (0, q) => format!("{q} ok (QMP)"),
        (g, q) => format!("{g} ok (guest), {q} ok (QMP)"),
    }
}

/// The Markdown table of `rows`; `peer` says whether QEMU ran.
pub(super) fn markdown(rows: &[RowResult]) -> String {
    let mut s = String::new();
    s.push_str(
        "| destination | work | ch | guest | QEMU total ms (range) | livemig total ms (range) | livemig / QEMU \
         | QEMU downtime ms | livemig downtime ms | livemig / QEMU | QEMU setup ms \
         | livemig setup ms | QEMU dst CPU s | livemig dst CPU s | QEMU dst peak RSS MiB \
         | livemig dst peak RSS MiB | livemig / QEMU | pages checked (QEMU; livemig) |\n",
    );
    s.push_str(
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let (q, l) = r.medians();
        let [rt, rd, rr] = r.ratios();
        let work = match r.spec.load {
            Load::Idle => "idle".to_string(),
            Load::Dirtying => format!(
                "{} MiB at {} pages/s",
                r.guest.working_set >> 20,
                r.guest.rate
            ),
        };
        let check = match &r.failure {
            Some(_) => format!("**FAILED** ({}; {})", checks(&r.qemu), checks(&r.livemig)),
            None => format!("{}; {}", checks(&r.qemu), checks(&r.livemig)),
        };
        let _ = writeln!(
            s,
            "| {} | {work} | {} | {}, {} filled | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {check} |",
            r.spec.dest,
            r.spec.channels,
            size(r.guest.memory),
            size(r.guest.fill),
            total_cell(&r.qemu),
            total_cell(&r.livemig),
            cell(rt, 2),
            cell(q.downtime_ms, 0),
            cell(l.downtime_ms, 0),
            cell(rd, 3),
            cell(q.setup_ms, 0),
            cell(l.setup_ms, 0),
            cell(q.dest_cpu_s, 2),
            cell(l.dest_cpu_s, 2),
            cell(q.dest_rss.map(|b| b / MIB), 0),
            cell(l.dest_rss.map(|b| b / MIB), 0),
            cell(rr, 2),
        );
    }
    let failed: Vec<&RowResult> = rows.iter().filter(|r| r.failure.is_some()).collect();
    if !failed.is_empty() {
        s.push_str("\nFailed rows:\n\n");
        for r in failed {
            let _ = writeln!(
                s,
                "- {}: {}",
                r.spec,
                r.failure.as_deref().unwrap_or("").replace('\n', "\n  ")
            );
        }
    }
    s
}

/// Each target of issue 12 against the medians: met, not met, or not measured.
pub(super) fn targets(rows: &[RowResult]) -> String {
    let mut s = String::new();
    let verdict = |ok: bool| if ok { "met" } else { "**not met**" };
    for r in rows.iter().filter(|r| r.failure.is_none()) {
        let [rt, rd, rr] = r.ratios();
        let (Some(rt), Some(rd)) = (rt, rd) else {
            continue;
        };
        let limit = match r.spec.dest {
            super::work::Dest::Cold => 0.8,
            super::work::Dest::Prepared => 0.9,
        };
        let _ = write!(
            s,
            "- {}: total {rt:.2} x QEMU (target <= {limit}: {}), downtime {rd:.3} x (target <= 0.25: {})",
            r.spec,
            verdict(rt <= limit),
            verdict(rd <= 0.25)
        );
        if r.spec.sparse {
            if let Some(rr) = rr {
                let _ = write!(
                    s,
                    ", destination peak RSS {rr:.2} x (target <= 1.05: {})",
                    verdict(rr <= 1.05)
                );
            }
        }
        s.push('\n');
    }
    s
}
