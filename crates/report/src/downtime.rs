//! The downtime picture: one stacked bar of the parts that follow each other and add up to
//! the downtime, and under it, on the same time axis, the saves that ran at the same time
//! inside the send. Stacking those too would count the same milliseconds twice or thrice.

use crate::data::{Downtime, Part};
use crate::svg::{pick_unit, text_width, val, Anchor, Axis, Svg, Unit, HALO, TIME_MS};

const W: f64 = 960.0;
const LEFT: f64 = 250.0;
const RIGHT: f64 = 80.0;
const BAR_Y: f64 = 100.0;
const BAR_H: f64 = 40.0;
const ROW_H: f64 = 20.0;
const ROW_GAP: f64 = 9.0;

/// Fill and text colour of a part (Okabe-Ito colours, readable with colour blindness).
fn colors(key: &str) -> (&'static str, &'static str) {
    match key {
        "pause" => ("#e69f00", "#000000"),
        "last_dirty_pass" => ("#56b4e9", "#000000"),
        "transfer" => ("#0072b2", "#ffffff"),
        "dest_restore" => ("#009e73", "#ffffff"),
        "resume" => ("#cc79a7", "#000000"),
        "device_save" => ("#d55e00", "#000000"),
        "state_save" => ("#8c7a00", "#000000"),
        "ram_final" => ("#332288", "#000000"),
        _ => ("#999999", "#000000"),
    }
}

/// Where things go in the picture, and the time axis.
struct Frame {
    /// The plot area's width.
    pw: f64,
    /// The top of the first concurrent row.
    conc_top: f64,
    /// The time axis' line.
    axis_y: f64,
    /// The first legend row's baseline.
    legend_top: f64,
    /// The note about the destination's page check.
    note_y: f64,
    /// The picture's height.
    h: f64,
    unit: Unit,
    xa: Axis,
}

impl Frame {
    fn new(d: &Downtime, legend: &[LegendItem<'_>]) -> Frame {
        let rows = d.concurrent.len() as f64;
        let conc_top = BAR_Y + BAR_H + 34.0;
        let axis_y = conc_top + rows * (ROW_H + ROW_GAP) + 4.0;
        let legend_top = axis_y + 62.0;
        let legend_rows = legend.iter().map(|l| l.row).max().map_or(0, |r| r + 1) as f64;
        let note_y = legend_top + legend_rows * 22.0 + 8.0;
        let h = if d.dest_verify_ms > 0.0 {
            note_y + 24.0
        } else {
            note_y
        };
        let unit = pick_unit(d.end_ms(), TIME_MS);
        Frame {
            pw: W - LEFT - RIGHT,
            conc_top,
            axis_y,
            legend_top,
            note_y,
            h,
            xa: Axis::covering(d.end_ms() / unit.div, 8),
            unit,
        }
    }

    /// The x of a time in ms since the pause.
    fn x(&self, ms: f64) -> f64 {
        LEFT + self.pw * self.xa.frac(ms / self.unit.div)
    }
}

/// The downtime as an SVG document: one `class="seg"` rectangle per non-zero sequential
/// part, one `class="conc"` rectangle per non-zero concurrent one.
pub fn downtime_svg(d: &Downtime) -> String {
    let legend = legend_layout(d);
    let f = Frame::new(d, &legend);
    let title = if d.is_empty() {
        "Downtime: none recorded".to_string()
    } else {
        format!(
            "Downtime {} ms: where the guest's pause went",
            val(d.downtime_ms)
        )
    };
    let mut s = Svg::new(W, if d.is_empty() { 220.0 } else { f.h }, &title);
    s.text(
        24.0,
        28.0,
        17.0,
        Anchor::Start,
        &title,
        "font-weight=\"bold\"",
    );
    if d.is_empty() {
        nothing_to_plot(&mut s);
        return s.finish();
    }
    let serial = d.device_transfer == "main";
    how_to_read(&mut s, serial);
    time_axis(&mut s, &f);
    send_span(&mut s, d, &f);
    stacked_bar(&mut s, d, &f);
    expected_mark(&mut s, d, &f);
    concurrent_rows(&mut s, d, &f, serial);
    legend_rows(&mut s, &legend, &f);
    verify_note(&mut s, d, &f);
    s.finish()
}

/// The body of a picture without downtime.
fn nothing_to_plot(s: &mut Svg) {
    s.rect(24.0, 50.0, W - 48.0, 140.0, "#fafafa", "stroke=\"#999999\"");
    s.text(
        W / 2.0,
        126.0,
        20.0,
        Anchor::Middle,
        "no downtime in this report: nothing to plot",
        "class=\"no-downtime\" fill=\"#555555\"",
    );
}

/// The two lines under the title that say what is stacked and what is not.
fn how_to_read(s: &mut Svg, serial: bool) {
    let under = if serial {
        "The bars under it ran inside \"send until destination has all\" (the serial device state \
         after the RAM): they are not added."
    } else {
        "The bars under it ran at the same time, inside \"send until destination has all\": \
         they are not added."
    };
    for (i, line) in [
        "The top bar's parts follow each other and add up to the downtime.",
        under,
    ]
    .iter()
    .enumerate()
    {
        s.text(
            24.0,
            50.0 + 16.0 * i as f64,
            12.0,
            Anchor::Start,
            line,
            "fill=\"#444444\"",
        );
    }
}

/// The vertical grid, the time axis, its ticks and its title.
fn time_axis(s: &mut Svg, f: &Frame) {
    for v in f.xa.ticks() {
        let x = LEFT + f.pw * f.xa.frac(v);
        s.line(
            x,
            BAR_Y - 6.0,
            x,
            f.axis_y,
            "#d0d0d0",
            "stroke-width=\"0.6\"",
        );
        s.line(x, f.axis_y, x, f.axis_y + 4.0, "#333333", "");
        s.text(x, f.axis_y + 17.0, 11.0, Anchor::Middle, &f.xa.label(v), "");
    }
    s.line(LEFT, f.axis_y, LEFT + f.pw, f.axis_y, "#333333", "");
    s.text(
        LEFT + f.pw / 2.0,
        f.axis_y + 38.0,
        13.0,
        Anchor::Middle,
        &format!("time since the guest paused ({})", f.unit.name),
        "",
    );
}

/// Where the concurrent saves happened: the send's span, shaded under the bar.
fn send_span(s: &mut Svg, d: &Downtime, f: &Frame) {
    let Some(t) = d
        .sequential
        .iter()
        .find(|p| p.key == "transfer" && p.ms > 0.0)
    else {
        return;
    };
    let (x0, x1) = (f.x(t.start_ms), f.x(t.start_ms + t.ms));
    s.rect(
        x0,
        BAR_Y + BAR_H,
        x1 - x0,
        f.axis_y - BAR_Y - BAR_H,
        colors("transfer").0,
        "fill-opacity=\"0.08\"",
    );
    for x in [x0, x1] {
        s.line(
            x,
            BAR_Y + BAR_H,
            x,
            f.axis_y,
            colors("transfer").0,
            "stroke-dasharray=\"4 3\" stroke-width=\"1\"",
        );
    }
}

/// The stacked bar of the sequential parts, each labelled where its label fits, framed at
/// the downtime.
fn stacked_bar(s: &mut Svg, d: &Downtime, f: &Frame) {
    s.text(
        LEFT - 10.0,
        BAR_Y + 17.0,
        13.0,
        Anchor::End,
        "downtime",
        "font-weight=\"bold\"",
    );
    s.text(
        LEFT - 10.0,
        BAR_Y + 33.0,
        12.0,
        Anchor::End,
        &format!("{} ms, parts in sequence", val(d.downtime_ms)),
        "",
    );
    for p in d.sequential.iter().filter(|p| p.ms > 0.0) {
        let (x0, x1) = (f.x(p.start_ms), f.x(p.start_ms + p.ms));
        let (fill, ink) = colors(p.key);
        // Sub-pixel parts still show as a hairline; their place is not moved.
        s.rect(
            x0,
            BAR_Y,
            (x1 - x0).max(1.0),
            BAR_H,
            fill,
            &format!("class=\"seg\" data-part=\"{}\"", p.key),
        );
        let full = format!("{} {} ms", p.label, val(p.ms));
        let short = format!("{} ms", val(p.ms));
        if let Some(l) = [full, short]
            .into_iter()
            .find(|l| text_width(l, 12.0) + 8.0 <= x1 - x0)
        {
            s.text(
                (x0 + x1) / 2.0,
                BAR_Y + BAR_H / 2.0 + 4.0,
                12.0,
                Anchor::Middle,
                &l,
                &format!("fill=\"{ink}\""),
            );
        }
    }
    s.rect(
        LEFT,
        BAR_Y,
        f.pw * f.xa.frac(d.downtime_ms / f.unit.div),
        BAR_H,
        "none",
        "stroke=\"#333333\"",
    );
}

/// What precopy expected, for comparison: a dashed mark across the bar.
fn expected_mark(s: &mut Svg, d: &Downtime, f: &Frame) {
    if d.expected_ms <= 0.0 {
        return;
    }
    let x = f.x(d.expected_ms);
    s.line(
        x,
        BAR_Y - 12.0,
        x,
        BAR_Y + BAR_H + 6.0,
        "#000000",
        "stroke-dasharray=\"5 3\" stroke-width=\"1.5\" class=\"expected\"",
    );
    let label = format!("precopy's estimate (RAM only): {} ms", val(d.expected_ms));
    let w = text_width(&label, 11.0);
    let lx = (x - w / 2.0).clamp(LEFT, W - 8.0 - w);
    s.text(lx, BAR_Y - 16.0, 11.0, Anchor::Start, &label, "");
}

/// The concurrent saves, one row each on the same axis, with their numbers.
fn concurrent_rows(s: &mut Svg, d: &Downtime, f: &Frame, serial: bool) {
    for (i, p) in d.concurrent.iter().enumerate() {
        let y = f.conc_top + i as f64 * (ROW_H + ROW_GAP);
        s.text(LEFT - 10.0, y + 14.0, 12.0, Anchor::End, p.label, "");
        let (x0, x1) = (f.x(p.start_ms), f.x(p.start_ms + p.ms));
        if p.ms > 0.0 {
            s.rect(
                x0,
                y,
                (x1 - x0).max(1.0),
                ROW_H,
                colors(p.key).0,
                &format!("class=\"conc\" data-part=\"{}\"", p.key),
            );
        }
        let text = if p.key == "device_save" && p.ms == 0.0 && d.streamed_devices == 0 {
            "none (no streamed devices)".to_string()
        } else {
            format!("{} ms", val(p.ms))
        };
        s.text(
            x1.max(x0 + 1.0) + 5.0,
            y + 14.0,
            11.0,
            Anchor::Start,
            &text,
            HALO,
        );
    }
    s.text(
        LEFT - 10.0,
        f.conc_top - 8.0,
        11.0,
        Anchor::End,
        if serial {
            "inside the send:"
        } else {
            "at the same time:"
        },
        "fill=\"#444444\" font-style=\"italic\"",
    );
}

/// The legend with every sequential part's number, the tiny ones included.
fn legend_rows(s: &mut Svg, legend: &[LegendItem<'_>], f: &Frame) {
    for item in legend {
        let y = f.legend_top + item.row as f64 * 22.0;
        s.rect(
            item.x,
            y - 11.0,
            14.0,
            14.0,
            colors(item.part.key).0,
            "stroke=\"#555555\"",
        );
        s.text(item.x + 19.0, y, 12.0, Anchor::Start, &item.text, "");
    }
}

/// The destination's page check, named as not downtime (if it ran).
fn verify_note(s: &mut Svg, d: &Downtime, f: &Frame) {
    if d.dest_verify_ms <= 0.0 {
        return;
    }
    s.text(
        24.0,
        f.note_y + 6.0,
        12.0,
        Anchor::Start,
        &format!(
            "Not downtime, not drawn: the destination checked every page for {} ms before resuming (a test instrument).",
            val(d.dest_verify_ms)
        ),
        "fill=\"#444444\"",
    );
}

/// One legend entry and where it goes.
struct LegendItem<'a> {
    part: &'a Part,
    text: String,
    x: f64,
    row: usize,
}

/// The sequential parts' legend, wrapped into rows that fit the width.
fn legend_layout(d: &Downtime) -> Vec<LegendItem<'_>> {
    let mut out = Vec::new();
    let (mut x, mut row) = (24.0, 0);
    for p in &d.sequential {
        let text = format!("{}: {} ms", p.label, val(p.ms));
        let w = 19.0 + text_width(&text, 12.0) + 24.0;
        if x + w > W - 16.0 && x > 24.0 {
            x = 24.0;
            row += 1;
        }
        out.push(LegendItem {
            part: p,
            text,
            x,
            row,
        });
        x += w;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::fixture;
    use livemig_engine::report::MigrationReport;
    use serde_json::json;

    fn report() -> MigrationReport {
        fixture(json!({
            "downtime_ms": 133.04, "expected_downtime_ms": 58.1, "device_transfer": "multifd",
            "downtime": {"pause_ms": 0.013, "last_dirty_pass_ms": 0.0099, "state_save_ms": 1.6,
                "ram_final_ms": 67.97, "device_save_ms": 130.14, "transfer_ms": 131.99,
                "dest_restore_ms": 0.747, "dest_verify_ms": 73.67, "resume_ms": 0.276},
            "rounds": [{"ms": 466.0}, {"ms": 130.6}]
        }))
    }

    fn count(s: &str, pat: &str) -> usize {
        s.matches(pat).count()
    }

    #[test]
    fn one_segment_per_non_zero_part() {
        let d = Downtime::from_report(&report());
        let svg = downtime_svg(&d);
        let nonzero = d.sequential.iter().filter(|p| p.ms > 0.0).count();
        assert_eq!(count(&svg, "class=\"seg\""), nonzero);
        for p in d.sequential.iter().filter(|p| p.ms > 0.0) {
            assert!(
                svg.contains(&format!("data-part=\"{}\"", p.key)),
                "{}",
                p.key
            );
        }
        assert_eq!(count(&svg, "class=\"conc\""), 3);
        assert!(svg.contains("class=\"expected\""));
        assert!(
            svg.contains("73.7 ms"),
            "the page check is named as not downtime"
        );

        let mut v = report();
        v.downtime.resume_ms = 0.0;
        v.downtime_ms = 133.04 - 0.276;
        v.downtime.state_save_ms = f64::NAN;
        let svg = downtime_svg(&Downtime::from_report(&v));
        assert_eq!(count(&svg, "class=\"seg\""), nonzero - 1);
        assert!(!svg.contains("data-part=\"resume\""));
        assert_eq!(count(&svg, "class=\"conc\""), 2);
    }

    #[test]
    fn the_stack_spans_the_downtime_not_more() {
        let d = Downtime::from_report(&report());
        let svg = downtime_svg(&d);
        let segs: Vec<(f64, f64)> = svg
            .lines()
            .filter(|l| l.contains("class=\"seg\""))
            .map(|l| {
                let get = |k: &str| -> f64 {
                    let k = format!(" {k}=\"");
                    let i = l.find(&k).unwrap() + k.len();
                    l[i..].split('"').next().unwrap().parse().unwrap()
                };
                (get("x"), get("width"))
            })
            .collect();
        let right = segs.iter().map(|(x, w)| x + w).fold(0.0, f64::max);
        let unit = pick_unit(d.end_ms(), TIME_MS);
        let xa = Axis::covering(d.end_ms() / unit.div, 8);
        let expect = LEFT + (W - LEFT - RIGHT) * xa.frac(d.downtime_ms);
        assert!((right - expect).abs() < 1.5, "{right} vs {expect}");
        assert!(segs.iter().all(|(x, _)| *x >= LEFT));
    }

    #[test]
    fn empty_and_odd_reports_draw_without_nan() {
        for v in [json!({}), json!({"downtime_ms": 0, "downtime": {}})] {
            let svg = downtime_svg(&Downtime::from_report(&fixture(v)));
            assert!(svg.contains("no downtime in this report"));
            assert_eq!(count(&svg, "class=\"seg\""), 0);
        }
        let mut v = fixture(json!({"downtime_ms": 5.0, "downtime": {"transfer_ms": -2}}));
        v.downtime.pause_ms = f64::NAN;
        let svg = downtime_svg(&Downtime::from_report(&v));
        // Nothing in parts: the whole downtime shows as not in a part.
        assert_eq!(count(&svg, "class=\"seg\""), 1);
        assert!(svg.contains("data-part=\"other\""));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }
}
