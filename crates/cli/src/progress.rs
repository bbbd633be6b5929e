//! A live progress bar fed by the source's progress lines. Drawn on stderr, and only when
//! stderr is a terminal.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use std::io::IsTerminal;

pub struct MigrationBar {
    bar: ProgressBar,
    total_pages: u64,
}

impl MigrationBar {
    pub fn new(quiet: bool) -> Self {
        let target = if quiet || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(0), target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        MigrationBar {
            bar,
            total_pages: 0,
        }
    }

    /// Updates from one source progress line.
    pub fn update(&mut self, v: &Value) {
        let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        let f = |k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        match crate::pair::event_of(v) {
            "guest_started" => self.bar.set_message("guest running, connecting"),
            "connected" => {
                self.total_pages = n("total_pages");
                self.bar.set_length(self.total_pages);
                self.bar
                    .set_message(format!("{} channels connected", n("channels")));
            }
            "round_started" => {
                self.bar.set_length(n("pages").max(1));
                self.bar.set_position(0);
                self.bar
                    .set_message(format!("round {}: {} pages", n("round"), n("pages")));
            }
            "round_done" => {
                self.bar.set_position(n("pages"));
                let secs = f("ms") / 1e3;
                let dirty_rate = if secs > 0.0 {
                    n("dirty_after") as f64 / secs
                } else {
                    0.0
                };
                // The devices' part, when they hold state to read at switchover.
                let devices = match n("device_final_bytes") {
                    0 => String::new(),
                    b => format!(
                        " (devices: {:.0} MiB, {:.0} ms to read)",
                        b as f64 / (1u64 << 20) as f64,
                        f("device_read_ms")
                    ),
                };
                self.bar.set_message(format!(
                    "round {} done: {:.0} MB/s, {:.1} MiB left, dirtying {:.0} pages/s, expected downtime {:.1} ms{devices}",
                    n("round"),
                    f("bytes_per_s") / 1e6,
                    (n("dirty_after") * 4096) as f64 / (1u64 << 20) as f64,
                    dirty_rate,
                    f("expected_downtime_ms")
                ));
            }
            "switchover" => self.bar.set_message(format!(
                "switchover: {} pages left, expected downtime {:.1} ms",
                n("remaining_pages"),
                f("expected_downtime_ms")
            )),
            _ => {}
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
