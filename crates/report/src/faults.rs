//! The fault picture of a postcopy migration (`faults.svg`): how long the destination's vCPUs
//! waited for the pages they touched, as the histogram the destination recorded (one bar per
//! bucket, buckets an eighth of a power of two wide, shortest waits left), the median, 99th
//! percentile and longest wait marked, and each faulting thread's share of the time blocked
//! (QEMU's per-vCPU blocktime) under it.

use crate::svg::{esc, n, text_width, val, Anchor, Axis, Svg};
use livemig_engine::report::FaultLatencyReport;

const W: f64 = 960.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 28.0;
const TOP: f64 = 96.0;
const PLOT_H: f64 = 240.0;
const BAR: &str = "#0072b2";
const MARK: &str = "#d55e00";
/// Rows of the per-thread table at most (the rest are summed in one row).
const THREAD_ROWS: usize = 12;

/// The fault picture of a destination's fault latencies.
pub fn faults_svg(f: &FaultLatencyReport) -> String {
    let rows = f.threads.len().min(THREAD_ROWS + 1);
    let h = TOP + PLOT_H + 90.0 + 22.0 * rows as f64 + 30.0;
    let title = format!(
        "Postcopy faults: {} answered, median {} us, 99th percentile {} us, longest {} us",
        f.faults, f.p50_us, f.p99_us, f.max_us
    );
    let mut s = Svg::new(W, h, &title);
    s.text(
        LEFT,
        28.0,
        17.0,
        Anchor::Start,
        &title,
        "font-weight=\"bold\"",
    );
    s.text(
        LEFT,
        48.0,
        12.0,
        Anchor::Start,
        "Each fault's wait, from the destination reading it to its page installed (requested, \
         pushed, or zero-filled), counted in buckets an eighth of a power of two wide.",
        "fill=\"#444444\"",
    );
    if f.histogram.is_empty() {
        s.text(
            W / 2.0,
            TOP + PLOT_H / 2.0,
            20.0,
            Anchor::Middle,
            "no fault in this report: nothing to plot",
            "class=\"no-faults\" fill=\"#555555\"",
        );
        return s.finish();
    }
    histogram(&mut s, f);
    threads(&mut s, f, TOP + PLOT_H + 80.0);
    s.finish()
}

/// One bar per bucket, side by side in bucket order, with the percentile marks.
fn histogram(s: &mut Svg, f: &FaultLatencyReport) {
    let pw = W - LEFT - RIGHT;
    let max = f.histogram.iter().map(|b| b.faults).max().unwrap_or(0) as f64;
    let ya = Axis::covering(1.1 * max, 4);
    let y_of = |v: f64| TOP + PLOT_H * (1.0 - ya.frac(v));
    for v in ya.ticks() {
        let y = y_of(v);
        s.line(LEFT, y, LEFT + pw, y, "#c8c8c8", "stroke-width=\"0.6\"");
        s.text(LEFT - 7.0, y + 4.0, 11.0, Anchor::End, &ya.label(v), "");
    }
    s.rect(LEFT, TOP, pw, PLOT_H, "none", "stroke=\"#555555\"");
    s.text(
        LEFT,
        TOP - 10.0,
        13.0,
        Anchor::Start,
        "Faults per bucket of wait",
        &format!("font-weight=\"bold\" fill=\"{BAR}\""),
    );
    let slot = pw / f.histogram.len() as f64;
    let mut free_from = f64::NEG_INFINITY;
    for (i, b) in f.histogram.iter().enumerate() {
        let x = LEFT + slot * i as f64;
        let y = y_of(b.faults as f64);
        s.raw(&format!(
            "<rect class=\"bar\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{BAR}\"><title>{}</title></rect>\n",
            n(x + slot * 0.1),
            n(y),
            n(slot * 0.8),
            n(TOP + PLOT_H - y),
            esc(&format!("{} faults under {} us", b.faults, b.below_us))
        ));
        let label = format!("<{}", val(b.below_us as f64));
        let mid = x + slot / 2.0;
        let half = text_width(&label, 10.0) / 2.0;
        if mid - half >= free_from {
            s.text(mid, TOP + PLOT_H + 15.0, 10.0, Anchor::Middle, &label, "");
            free_from = mid + half + 4.0;
        }
        for (name, us) in [("p50", f.p50_us), ("p99", f.p99_us)] {
            // The bucket holding the percentile: the first that ends above it (a percentile
            // is its bucket's bound, or the longest wait when that is shorter).
            let holds = |j: usize| f.histogram[j].below_us >= us;
            if holds(i) && (i == 0 || !holds(i - 1)) {
                s.line(
                    mid,
                    TOP,
                    mid,
                    TOP + PLOT_H,
                    MARK,
                    "stroke-dasharray=\"4 3\"",
                );
                s.text(
                    mid + 3.0,
                    TOP + 12.0,
                    11.0,
                    Anchor::Start,
                    name,
                    &format!("fill=\"{MARK}\""),
                );
            }
        }
    }
    s.text(
        LEFT + pw / 2.0,
        TOP + PLOT_H + 36.0,
        13.0,
        Anchor::Middle,
        "wait (us, each bucket's upper bound)",
        "",
    );
}

/// Each faulting thread's faults and time blocked, longest first.
fn threads(s: &mut Svg, f: &FaultLatencyReport, top: f64) {
    s.text(
        LEFT,
        top,
        13.0,
        Anchor::Start,
        "Time blocked per faulting thread (QEMU's per-vCPU blocktime)",
        "font-weight=\"bold\"",
    );
    let mut rows = f.threads.clone();
    rows.sort_by_key(|t| std::cmp::Reverse(t.blocked_us));
    let rest: Vec<_> = rows.split_off(rows.len().min(THREAD_ROWS));
    let total = f.total_us.max(1) as f64;
    let mut y = top + 22.0;
    let mut row = |s: &mut Svg, name: &str, faults: u64, us: u64| {
        s.text(LEFT, y, 12.0, Anchor::Start, name, "class=\"thread\"");
        let w = 300.0 * us as f64 / total;
        s.rect(LEFT + 200.0, y - 10.0, w, 12.0, BAR, "");
        s.text(
            LEFT + 510.0,
            y,
            12.0,
            Anchor::Start,
            &format!("{} ms, {faults} faults", val(us as f64 / 1e3)),
            "",
        );
        y += 22.0;
    };
    for t in &rows {
        row(s, &t.thread, t.faults, t.blocked_us);
    }
    if !rest.is_empty() {
        let (faults, us) = rest
            .iter()
            .fold((0, 0), |(f, u), t| (f + t.faults, u + t.blocked_us));
        row(s, &format!("{} more threads", rest.len()), faults, us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemig_engine::report::{LatencyBucket, ThreadBlocktime};

    fn report() -> FaultLatencyReport {
        FaultLatencyReport {
            faults: 110,
            p50_us: 52,
            p99_us: 704,
            max_us: 3000,
            total_us: 98 * 50 + 11 * 700 + 3000,
            histogram: vec![
                LatencyBucket {
                    below_us: 52,
                    faults: 98,
                },
                LatencyBucket {
                    below_us: 704,
                    faults: 11,
                },
                LatencyBucket {
                    below_us: 3072,
                    faults: 1,
                },
            ],
            threads: vec![
                ThreadBlocktime {
                    thread: "kvm-vcpu0".into(),
                    faults: 100,
                    blocked_us: 9000,
                },
                ThreadBlocktime {
                    thread: "kvm-vcpu1".into(),
                    faults: 10,
                    blocked_us: 6600,
                },
            ],
        }
    }

    #[test]
    fn one_bar_per_bucket_and_one_row_per_thread() {
        let svg = faults_svg(&report());
        assert_eq!(svg.matches("class=\"bar\"").count(), 3);
        assert_eq!(svg.matches("class=\"thread\"").count(), 2);
        assert_eq!(svg.matches(">p50<").count(), 1, "{svg}");
        assert_eq!(svg.matches(">p99<").count(), 1, "{svg}");
        // A percentile capped at the longest wait still marks its bucket.
        let mut capped = report();
        capped.histogram = vec![LatencyBucket {
            below_us: 3328,
            faults: 1,
        }];
        (capped.p50_us, capped.p99_us) = (3120, 3120);
        let svg = faults_svg(&capped);
        assert_eq!(svg.matches(">p50<").count(), 1, "{svg}");
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn no_faults_draws_a_picture_that_says_so() {
        let svg = faults_svg(&FaultLatencyReport::default());
        assert!(svg.contains("class=\"no-faults\""));
        assert!(!svg.contains("NaN"));
    }
}
