//! Writing SVG by hand: a string builder with escaping, coordinates that are always finite,
//! axis ticks at round numbers, units picked from the data, and a text width estimate for
//! layout (DejaVu Sans, the widest common sans-serif, is about 0.6 em per character).

/// Font stack of every picture: DejaVu Sans is what a fresh Debian has; viewers fall back.
const FONT: &str = "DejaVu Sans, Verdana, Arial, Helvetica, sans-serif";

/// Attributes that draw a text over a white outline, readable on lines and bands.
pub(crate) const HALO: &str =
    "stroke=\"#ffffff\" stroke-width=\"3\" stroke-linejoin=\"round\" paint-order=\"stroke\"";

/// An SVG document being written.
pub(crate) struct Svg {
    buf: String,
}

/// Where a text's anchor point sits.
#[derive(Clone, Copy)]
pub(crate) enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn attr(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

impl Svg {
    /// A `w` x `h` document on a white background, with `title` as its accessible title.
    pub fn new(w: f64, h: f64, title: &str) -> Svg {
        let mut buf = String::with_capacity(16 << 10);
        buf.push_str(&format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" font-family=\"{FONT}\" font-size=\"12\">\n",
            w = n(w),
            h = n(h)
        ));
        buf.push_str(&format!("<title>{}</title>\n", esc(title)));
        buf.push_str(&format!(
            "<rect x=\"0\" y=\"0\" width=\"{}\" height=\"{}\" fill=\"#ffffff\"/>\n",
            n(w),
            n(h)
        ));
        Svg { buf }
    }

    /// A rectangle; `extra` holds further attributes (class, stroke, ...), already escaped.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, extra: &str) {
        self.buf.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{fill}\"{}{extra}/>\n",
            n(x),
            n(y),
            n(w.max(0.0)),
            n(h.max(0.0)),
            if extra.is_empty() { "" } else { " " },
        ));
    }

    /// A line segment.
    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, extra: &str) {
        self.buf.push_str(&format!(
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"{stroke}\"{}{extra}/>\n",
            n(x1),
            n(y1),
            n(x2),
            n(y2),
            if extra.is_empty() { "" } else { " " },
        ));
    }

    /// A text at (x, y), y being the baseline.
    pub fn text(&mut self, x: f64, y: f64, size: f64, anchor: Anchor, s: &str, extra: &str) {
        self.buf.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"{}\" text-anchor=\"{}\"{}{extra}>{}</text>\n",
            n(x),
            n(y),
            n(size),
            anchor.attr(),
            if extra.is_empty() { "" } else { " " },
            esc(s)
        ));
    }

    /// Anything else, already well formed.
    pub fn raw(&mut self, s: &str) {
        self.buf.push_str(s);
    }

    pub fn finish(mut self) -> String {
        self.buf.push_str("</svg>\n");
        self.buf
    }
}

/// Escapes text for SVG content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// A coordinate as SVG text: two decimals, never NaN or infinite.
pub(crate) fn n(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" || s.is_empty() {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// Estimated width in pixels of `s` at font size `size`.
pub(crate) fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.6
}

/// A value for people: about three significant digits, no trailing noise.
pub(crate) fn val(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// A unit to show values in: a divisor and a name.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Unit {
    pub div: f64,
    pub name: &'static str,
}

/// The largest of `units` (smallest divisor first) that keeps `max` at 1 or more.
pub(crate) fn pick_unit(max: f64, units: &[Unit]) -> Unit {
    let mut best = units[0];
    for u in units {
        if max.is_finite() && max >= u.div {
            best = *u;
        }
    }
    best
}

pub(crate) const BYTES_PER_S: &[Unit] = &[
    Unit {
        div: 1.0,
        name: "B/s",
    },
    Unit {
        div: 1e3,
        name: "kB/s",
    },
    Unit {
        div: 1e6,
        name: "MB/s",
    },
    Unit {
        div: 1e9,
        name: "GB/s",
    },
];
pub(crate) const BYTES: &[Unit] = &[
    Unit {
        div: 1.0,
        name: "bytes",
    },
    Unit {
        div: 1024.0,
        name: "KiB",
    },
    Unit {
        div: 1048576.0,
        name: "MiB",
    },
    Unit {
        div: 1073741824.0,
        name: "GiB",
    },
];
pub(crate) const PAGES_PER_S: &[Unit] = &[
    Unit {
        div: 1.0,
        name: "pages/s",
    },
    Unit {
        div: 1e3,
        name: "thousand pages/s",
    },
    Unit {
        div: 1e6,
        name: "million pages/s",
    },
];
pub(crate) const TIME_MS: &[Unit] = &[
    Unit {
        div: 1.0,
        name: "ms",
    },
    Unit {
        div: 1e3,
        name: "s",
    },
];

/// An axis from 0 to `max`, with ticks every `step`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Axis {
    pub max: f64,
    pub step: f64,
}

impl Axis {
    /// An axis from 0 covering `data_max` with about `target` steps at 1, 2, 2.5 or 5 x 10^k.
    /// Zero, negative or non-finite maxima give the axis 0 to 1.
    pub fn covering(data_max: f64, target: usize) -> Axis {
        if !(data_max.is_finite() && data_max > 0.0) {
            return Axis {
                max: 1.0,
                step: 0.25,
            };
        }
        let raw = data_max / target.max(1) as f64;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let max = (data_max / step - 1e-9).ceil().max(1.0) * step;
        Axis { max, step }
    }

    /// The tick values, 0 and `max` included.
    pub fn ticks(&self) -> Vec<f64> {
        let k = (self.max / self.step).round().clamp(1.0, 100.0) as usize;
        (0..=k).map(|i| i as f64 * self.step).collect()
    }

    /// A tick value as text, with as many decimals as the step needs.
    pub fn label(&self, v: f64) -> String {
        let mut decimals = 0;
        let mut s = self.step;
        while decimals < 6 && (s - s.round()).abs() > 1e-9 * s.abs().max(1.0) {
            s *= 10.0;
            decimals += 1;
        }
        format!("{v:.decimals$}")
    }

    /// `v` as a share of the axis, clamped to [0, 1].
    pub fn frac(&self, v: f64) -> f64 {
        if !v.is_finite() || self.max <= 0.0 {
            return 0.0;
        }
        (v / self.max).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_cover_the_data_with_round_steps() {
        let a = Axis::covering(1154.5, 5);
        assert_eq!(a.step, 250.0);
        assert_eq!(a.max, 1250.0);
        assert_eq!(a.ticks().len(), 6);
        let b = Axis::covering(0.013, 4);
        assert!(b.max >= 0.013 && b.max < 0.03, "{b:?}");
        assert_eq!(b.label(0.005), "0.005");
        let exact = Axis::covering(100.0, 5);
        assert_eq!(exact.max, 100.0);
        for bad in [0.0, -3.0, f64::NAN, f64::INFINITY] {
            assert_eq!(Axis::covering(bad, 5).max, 1.0);
        }
        assert_eq!(a.frac(f64::NAN), 0.0);
        assert_eq!(a.frac(1e12), 1.0);
        assert_eq!(a.frac(-1.0), 0.0);
    }

    #[test]
    fn numbers_are_always_finite_and_short() {
        assert_eq!(n(f64::NAN), "0");
        assert_eq!(n(f64::NEG_INFINITY), "0");
        assert_eq!(n(-0.001), "0");
        assert_eq!(n(12.5), "12.5");
        assert_eq!(n(3.0), "3");
        assert_eq!(val(133.04), "133");
        assert_eq!(val(1.6046), "1.60");
        assert_eq!(val(0.0131), "0.013");
        assert_eq!(val(f64::NAN), "0");
    }

    #[test]
    fn units_follow_the_magnitude() {
        assert_eq!(pick_unit(1.15e9, BYTES_PER_S).name, "GB/s");
        assert_eq!(pick_unit(5e8, BYTES_PER_S).name, "MB/s");
        assert_eq!(pick_unit(0.0, BYTES).name, "bytes");
        assert_eq!(pick_unit(f64::NAN, BYTES).name, "bytes");
        assert_eq!(pick_unit(64.0 * 1048576.0, BYTES).name, "MiB");
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc("a<b & \"c\"\u{1}"), "a&lt;b &amp; &quot;c&quot;");
    }
}
