//! The timeline picture: throughput, remaining bytes and dirty rate per round, three panels
//! over one time axis, with setup, each round and the guest's pause as bands behind them.

use crate::data::{RoundPoint, Timeline};
use crate::svg::{
    esc, n, pick_unit, text_width, val, Anchor, Axis, Svg, Unit, BYTES, BYTES_PER_S, HALO,
    PAGES_PER_S, TIME_MS,
};

const W: f64 = 960.0;
const LEFT: f64 = 84.0;
const RIGHT: f64 = 28.0;
const STRIP_Y: f64 = 84.0;
const STRIP_H: f64 = 18.0;
const FIRST_TOP: f64 = 134.0;
const PANEL_H: f64 = 140.0;
const GAP: f64 = 52.0;

const SETUP_FILL: &str = "#dddddd";
const ROUND_FILLS: [&str; 2] = ["#e8eef5", "#f7f9fc"];
const SWITCHOVER_FILL: &str = "#f4b4aa";
const PAUSED_FILL: &str = "#fbe0dc";
const POSTCOPY_FILL: &str = "#d9f0e3";

/// One panel: what it plots and how.
struct Series {
    /// The class of its polyline and points (`series throughput`, `pt throughput`).
    class: &'static str,
    title: &'static str,
    color: &'static str,
    units: &'static [Unit],
    value: fn(&RoundPoint) -> f64,
    /// An average over the round, also drawn as a bar across it; otherwise a count at its end.
    average: bool,
}

const SERIES: [Series; 3] = [
    Series {
        class: "throughput",
        title: "Throughput (the round's bytes / its duration)",
        color: "#0072b2",
        units: BYTES_PER_S,
        value: |r| r.throughput_bytes_per_s,
        average: true,
    },
    Series {
        class: "remaining",
        title: "Remaining: dirtied while the round was sent (what the next round sends)",
        color: "#d55e00",
        units: BYTES,
        value: |r| r.remaining_bytes,
        average: false,
    },
    Series {
        class: "dirty-rate",
        title: "Dirty rate (pages dirtied during the round / its duration)",
        color: "#009e73",
        units: PAGES_PER_S,
        value: |r| r.dirty_pages_per_s,
        average: true,
    },
];

/// The timeline as an SVG document. One point per round and panel, at the round's end.
pub fn timeline_svg(t: &Timeline) -> String {
    let h = FIRST_TOP + 3.0 * PANEL_H + 2.0 * GAP + 64.0;
    let title = if t.rounds.is_empty() {
        "Migration timeline: no rounds".to_string()
    } else {
        format!(
            "Migration timeline: {} round{}, {} ms in all",
            t.rounds.len(),
            if t.rounds.len() == 1 { "" } else { "s" },
            val(t.total_ms.max(t.end_ms()))
        )
    };
    let mut s = Svg::new(W, h, &title);
    s.text(
        LEFT,
        28.0,
        17.0,
        Anchor::Start,
        &title,
        "font-weight=\"bold\"",
    );
    if t.rounds.is_empty() {
        let (x, y, w, ph) = (LEFT, FIRST_TOP, W - LEFT - RIGHT, 3.0 * PANEL_H + 2.0 * GAP);
        s.rect(x, y, w, ph, "#fafafa", "stroke=\"#999999\"");
        s.text(
            x + w / 2.0,
            y + ph / 2.0,
            20.0,
            Anchor::Middle,
            "no rounds in this report: nothing to plot",
            "class=\"no-rounds\" fill=\"#555555\"",
        );
        return s.finish();
    }
    s.text(
        LEFT,
        48.0,
        12.0,
        Anchor::Start,
        "One point per round, at its end; throughput and dirty rate are the round's averages, \
         also drawn as a line across the round.",
        "fill=\"#444444\"",
    );
    legend(&mut s, t.postcopy.is_some());

    let pw = W - LEFT - RIGHT;
    let unit = pick_unit(t.end_ms(), TIME_MS);
    let xa = Axis::covering(t.end_ms() / unit.div, 8);
    let x_of = |ms: f64| LEFT + pw * xa.frac(ms / unit.div);
    let bottom = FIRST_TOP + 3.0 * PANEL_H + 2.0 * GAP;

    bands(&mut s, t, &x_of);

    // Vertical grid and the time axis.
    for v in xa.ticks() {
        let x = LEFT + pw * xa.frac(v);
        for i in 0..3 {
            let top = FIRST_TOP + i as f64 * (PANEL_H + GAP);
            s.line(x, top, x, top + PANEL_H, "#c8c8c8", "stroke-width=\"0.6\"");
            s.line(x, top + PANEL_H, x, top + PANEL_H + 4.0, "#333333", "");
        }
        s.text(x, bottom + 17.0, 11.0, Anchor::Middle, &xa.label(v), "");
    }
    s.text(
        LEFT + pw / 2.0,
        bottom + 40.0,
        13.0,
        Anchor::Middle,
        &format!("time since the migration started ({})", unit.name),
        "",
    );

    for (i, series) in SERIES.iter().enumerate() {
        let top = FIRST_TOP + i as f64 * (PANEL_H + GAP);
        panel(&mut s, t, series, top, &x_of);
    }
    s.finish()
}

/// The legend of the bands behind the panels (postcopy's instead of the switchover round's
/// when the migration switched to postcopy).
fn legend(s: &mut Svg, postcopy: bool) {
    let mut x = LEFT;
    let y = 66.0;
    let last = if postcopy {
        (
            POSTCOPY_FILL,
            "postcopy (guest runs on the destination, pages pushed and requested)",
        )
    } else {
        (SWITCHOVER_FILL, "switchover round (guest paused)")
    };
    for (fill, label) in [
        (SETUP_FILL, "setup"),
        (ROUND_FILLS[0], "precopy rounds"),
        (PAUSED_FILL, "paused"),
        last,
    ] {
        let w = 19.0 + text_width(label, 12.0);
        if x + w > W - 8.0 {
            break;
        }
        s.rect(x, y - 10.0, 14.0, 12.0, fill, "stroke=\"#888888\"");
        s.text(x + 19.0, y, 12.0, Anchor::Start, label, "");
        x += w + 20.0;
    }
}

/// Setup, every round and the pause as bands over the strip and the three panels, the
/// round numbers in the strip where they fit.
fn bands(s: &mut Svg, t: &Timeline, x_of: &dyn Fn(f64) -> f64) {
    let spans = |s: &mut Svg, x0: f64, x1: f64, fill: &str, class: &str| {
        let w = (x1 - x0).max(0.0);
        s.rect(x0, STRIP_Y, w, STRIP_H, fill, class);
        for i in 0..3 {
            let top = FIRST_TOP + i as f64 * (PANEL_H + GAP);
            s.rect(x0, top, w, PANEL_H, fill, class);
        }
    };
    // Panel backgrounds first, so that bands sit on white.
    for i in 0..3 {
        let top = FIRST_TOP + i as f64 * (PANEL_H + GAP);
        s.rect(LEFT, top, W - LEFT - RIGHT, PANEL_H, "#ffffff", "");
    }
    spans(
        s,
        x_of(0.0),
        x_of(t.setup_ms),
        SETUP_FILL,
        "class=\"band setup\"",
    );
    spans(
        s,
        x_of(t.paused_from_ms),
        x_of(t.paused_until_ms),
        PAUSED_FILL,
        "class=\"band paused\"",
    );
    if let Some((from, until)) = t.postcopy {
        spans(
            s,
            x_of(from),
            x_of(until),
            POSTCOPY_FILL,
            "class=\"band postcopy\"",
        );
    }
    for (i, r) in t.rounds.iter().enumerate() {
        let (fill, class) = if r.switchover {
            (SWITCHOVER_FILL, "class=\"band switchover\"")
        } else {
            (ROUND_FILLS[i % 2], "class=\"band round\"")
        };
        spans(s, x_of(r.start_ms), x_of(r.end_ms), fill, class);
    }
    s.text(
        LEFT - 6.0,
        STRIP_Y + 13.0,
        11.0,
        Anchor::End,
        "round",
        "fill=\"#444444\"",
    );
    // Round numbers, left to right, each only where it does not run into the previous one.
    let mut free_from = f64::NEG_INFINITY;
    for r in &t.rounds {
        let (x0, x1) = (x_of(r.start_ms), x_of(r.end_ms));
        let mid = (x0 + x1) / 2.0;
        let long = format!("round {}", r.round);
        let short = r.round.to_string();
        let label = [long, short]
            .into_iter()
            .find(|l| text_width(l, 11.0) + 4.0 <= (x1 - x0).max(0.0));
        let label = match label {
            Some(l) => l,
            // Too narrow for its number: still named if nothing is in the way.
            None => r.round.to_string(),
        };
        let half = text_width(&label, 11.0) / 2.0;
        if mid - half >= free_from {
            s.text(mid, STRIP_Y + 13.0, 11.0, Anchor::Middle, &label, "");
            free_from = mid + half + 4.0;
        }
    }
}

/// One panel: its frame, y axis, title, the series' line and points, values where they fit.
fn panel(s: &mut Svg, t: &Timeline, series: &Series, top: f64, x_of: &dyn Fn(f64) -> f64) {
    let values: Vec<f64> = t.rounds.iter().map(series.value).collect();
    let max = values.iter().copied().fold(0.0, f64::max);
    let unit = pick_unit(max, series.units);
    // Headroom above the largest value for its label.
    let ya = Axis::covering(1.1 * max / unit.div, 4);
    let y_of = |v: f64| top + PANEL_H * (1.0 - ya.frac(v / unit.div));
    frame(s, series, top, &ya, unit, max);

    let pts: Vec<(f64, f64)> = t
        .rounds
        .iter()
        .zip(&values)
        .map(|(r, v)| (x_of(r.end_ms), y_of(*v)))
        .collect();
    if series.average {
        for ((r, v), (x1, _)) in t.rounds.iter().zip(&values).zip(&pts) {
            let y = y_of(*v);
            s.line(
                x_of(r.start_ms),
                y,
                *x1,
                y,
                series.color,
                "class=\"avg\" stroke-width=\"3\" stroke-opacity=\"0.35\"",
            );
        }
    }
    let list: Vec<String> = pts
        .iter()
        .map(|(x, y)| format!("{},{}", n(*x), n(*y)))
        .collect();
    s.raw(&format!(
        "<polyline class=\"series {}\" points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-linejoin=\"round\"/>\n",
        series.class,
        list.join(" "),
        series.color
    ));
    points(s, t, series, top, unit, &values, &pts);
}

/// A panel's horizontal grid, y axis, frame and title.
fn frame(s: &mut Svg, series: &Series, top: f64, ya: &Axis, unit: Unit, max: f64) {
    let pw = W - LEFT - RIGHT;
    for v in ya.ticks() {
        let y = top + PANEL_H * (1.0 - ya.frac(v));
        s.line(LEFT, y, LEFT + pw, y, "#c8c8c8", "stroke-width=\"0.6\"");
        s.line(LEFT - 4.0, y, LEFT, y, "#333333", "");
        s.text(LEFT - 7.0, y + 4.0, 11.0, Anchor::End, &ya.label(v), "");
    }
    s.rect(
        LEFT,
        top,
        pw,
        PANEL_H,
        "none",
        "stroke=\"#555555\" stroke-width=\"1\"",
    );
    let all_zero = if max > 0.0 { "" } else { " (all 0)" };
    s.text(
        LEFT,
        top - 10.0,
        13.0,
        Anchor::Start,
        &format!("{}, {}{all_zero}", series.title, unit.name),
        &format!("font-weight=\"bold\" fill=\"{}\"", series.color),
    );
}

/// A panel's points (at `pts`, one per round, with the value as a tooltip), and the value
/// over each point where the neighbouring points and the previous label leave room: crowded
/// rounds are read from the axis (and the tooltips).
fn points(
    s: &mut Svg,
    t: &Timeline,
    series: &Series,
    top: f64,
    unit: Unit,
    values: &[f64],
    pts: &[(f64, f64)],
) {
    let pw = W - LEFT - RIGHT;
    let mut free_from = f64::NEG_INFINITY;
    for (i, ((r, v), &(x, y))) in t.rounds.iter().zip(values).zip(pts).enumerate() {
        let shown = format!("{} {}", val(v / unit.div), unit.name);
        s.raw(&format!(
            "<circle class=\"pt {}\" cx=\"{}\" cy=\"{}\" r=\"3.5\" fill=\"{}\" stroke=\"#ffffff\" stroke-width=\"1\"><title>round {}: {}</title></circle>\n",
            series.class,
            n(x),
            n(y),
            series.color,
            r.round,
            esc(&shown)
        ));
        let label = val(v / unit.div);
        let w = text_width(&label, 10.0);
        let prev = i.checked_sub(1).map_or(f64::INFINITY, |p| x - pts[p].0);
        let next = pts.get(i + 1).map_or(f64::INFINITY, |p| p.0 - x);
        let lx = (x - w / 2.0).clamp(LEFT + 2.0, LEFT + pw - w - 2.0);
        let ly = if y - top > 16.0 { y - 7.0 } else { y + 15.0 };
        if prev.min(next) >= w / 2.0 + 6.0 && lx >= free_from {
            s.text(
                lx,
                ly,
                10.0,
                Anchor::Start,
                &label,
                &format!("class=\"value\" fill=\"{}\" {HALO}", series.color),
            );
            free_from = lx + w + 6.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixture;
    use livemig_engine::report::MigrationReport;
    use serde_json::{json, Value};

    fn report(rounds: usize) -> MigrationReport {
        let rs: Vec<Value> = (0..rounds)
            .map(|i| {
                json!({"round": i, "ms": 400.0 / (i + 1) as f64, "bytes_per_s": 1e9 + i as f64 * 1e7,
                       "dirty_after": if i + 1 == rounds { 0 } else { 16384 / (i + 1) }})
            })
            .collect();
        fixture(
            json!({"setup_ms": 2.0, "precopy_ms": 900.0, "total_ms": 1100.0, "downtime_ms": 100.0,
               "downtime": {"pause_ms": 0.1}, "rounds": rs}),
        )
    }

    fn count(s: &str, pat: &str) -> usize {
        s.matches(pat).count()
    }

    /// The numbers after `attr="` in every element carrying `class`.
    fn attrs(svg: &str, class: &str, attr: &str) -> Vec<f64> {
        svg.lines()
            .filter(|l| l.contains(&format!("class=\"{class}\"")))
            .map(|l| {
                let k = format!(" {attr}=\"");
                let i = l.find(&k).unwrap() + k.len();
                l[i..].split('"').next().unwrap().parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn one_point_per_round_in_each_panel() {
        for rounds in [1, 2, 7, 30] {
            let svg = timeline_svg(&Timeline::from_report(&report(rounds)));
            for class in ["throughput", "remaining", "dirty-rate"] {
                assert_eq!(count(&svg, &format!("class=\"pt {class}\"")), rounds);
                let line = svg
                    .lines()
                    .find(|l| l.contains(&format!("class=\"series {class}\"")))
                    .unwrap();
                let pts = line.split("points=\"").nth(1).unwrap();
                let pts = pts.split('"').next().unwrap();
                assert_eq!(pts.split(' ').count(), rounds, "{line}");
            }
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
    }

    #[test]
    fn points_are_inside_their_panels() {
        let svg = timeline_svg(&Timeline::from_report(&report(5)));
        for (i, class) in ["pt throughput", "pt remaining", "pt dirty-rate"]
            .iter()
            .enumerate()
        {
            let top = FIRST_TOP + i as f64 * (PANEL_H + GAP);
            for y in attrs(&svg, class, "cy") {
                assert!((top..=top + PANEL_H).contains(&y), "{class} {y}");
            }
            for x in attrs(&svg, class, "cx") {
                assert!((LEFT..=W - RIGHT).contains(&x), "{class} {x}");
            }
            // The largest value reaches at least half the panel's height.
            let highest = attrs(&svg, class, "cy")
                .into_iter()
                .fold(f64::MAX, f64::min);
            assert!(highest <= top + PANEL_H / 2.0, "{class}");
        }
        // Later rounds end later.
        let xs = attrs(&svg, "pt throughput", "cx");
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "{xs:?}");
    }

    #[test]
    fn no_rounds_draws_a_clear_empty_picture() {
        for v in [json!({}), json!({"rounds": []})] {
            let svg = timeline_svg(&Timeline::from_report(&fixture(v)));
            assert!(svg.starts_with("<svg"));
            assert!(svg.contains("no rounds in this report"));
            assert_eq!(count(&svg, "class=\"pt "), 0);
        }
    }

    #[test]
    fn zero_length_rounds_and_zero_values_stay_finite() {
        let v = fixture(json!({"rounds": [{"ms": 0.0}, {"ms": 0.0, "dirty_after": 3}]}));
        let svg = timeline_svg(&Timeline::from_report(&v));
        assert_eq!(count(&svg, "class=\"pt throughput\""), 2);
        assert!(svg.contains("(all 0)"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
