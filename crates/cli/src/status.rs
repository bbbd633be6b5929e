//! `livemig status --qmp PATH`: a VM's migration as `query-migrate` tells it, with a live
//! progress bar while one runs (drawn only on a terminal).

use crate::emit;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use livemig_qmp::Client;
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The VM's QMP socket.
    #[arg(long)]
    pub qmp: PathBuf,
    /// Print `query-migrate`'s answer as JSON (each poll while a migration runs).
    #[arg(long)]
    pub json: bool,
    /// Poll period while a migration runs, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub interval_ms: u64,
}

fn in_progress(q: &Value) -> bool {
    matches!(
        q["status"].as_str(),
        Some("setup" | "active" | "postcopy-active" | "cancelling")
    )
}

/// One line about a migration.
fn describe(q: &Value) -> String {
    let ram = &q["ram"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let status = q["status"].as_str().unwrap_or("none");
    let mut s = format!(
        "{status}, pass {}: {:.0} Mbit/s, {:.1} MiB left of {} MiB, dirtying {} pages/s",
        n(&ram["dirty-sync-count"]),
        ram["mbps"].as_f64().unwrap_or(0.0),
        n(&ram["remaining"]) as f64 / (1u64 << 20) as f64,
        n(&ram["total"]) >> 20,
        n(&ram["dirty-pages-rate"]),
    );
    if let Some(d) = q.get("expected-downtime") {
        s += &format!(", expected downtime {} ms", n(d));
        // The devices' part and the limit it is held against, when devices hold state.
        let parts = &q["x-expected-downtime-parts"];
        if n(&parts["device-final-bytes"]) > 0 {
            s += &format!(
                " (devices {} ms to read; limit {} ms)",
                n(&parts["device-read-ms"]),
                n(&parts["downtime-limit"])
            );
        }
    }
    if let Some(d) = q.get("downtime") {
        s += &format!(", downtime {} ms", n(d));
    }
    if let Some(t) = q.get("total-time") {
        s += &format!(", {} ms in all", n(t));
    }
    if let Some(e) = q["error-desc"].as_str() {
        s += &format!(": {e}");
    }
    s
}

pub fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut c = Client::connect(&a.qmp, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.qmp.display()))?;
    let vm = c.execute("query-status", json!({}))?;
    let mut q = c.execute("query-migrate", json!({}))?;
    if a.json {
        emit(&json!({"vm": vm, "migration": q}));
    }
    if in_progress(&q) {
        let target = if a.json || !std::io::stderr().is_terminal() {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let bar = ProgressBar::with_draw_target(Some(1), target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        while in_progress(&q) {
            let ram = &q["ram"];
            let total = ram["total"].as_u64().unwrap_or(0).max(1);
            bar.set_length(total);
            bar.set_position(total.saturating_sub(ram["remaining"].as_u64().unwrap_or(0)));
            bar.set_message(describe(&q));
            bar.tick();
            std::thread::sleep(Duration::from_millis(a.interval_ms.max(10)));
            q = c.execute("query-migrate", json!({}))?;
            if a.json {
                emit(&json!({"migration": q}));
            }
        }
        bar.finish_and_clear();
    }
    if !a.json {
        let vm_status = c.execute("query-status", json!({}))?;
        eprintln!(
            "livemig: VM {}; migration {}",
            vm_status["status"].as_str().unwrap_or("?"),
            if q.get("status").is_some() {
                describe(&q)
            } else {
                "none".into()
            }
        );
    }
    Ok(if q["status"] == "failed" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::describe;
    use serde_json::json;

    #[test]
    fn the_devices_part_of_the_expected_downtime_is_named() {
        let q = json!({
            "status": "active", "expected-downtime": 512,
            "x-expected-downtime-parts": {"device-final-bytes": 1 << 30, "device-read-ms": 512,
                "downtime-limit": 300},
        });
        let line = describe(&q);
        assert!(
            line.contains("expected downtime 512 ms (devices 512 ms to read; limit 300 ms)"),
            "{line}"
        );
        let ram_only = describe(&json!({"status": "active", "expected-downtime": 3}));
        assert!(ram_only.ends_with("expected downtime 3 ms"), "{ram_only}");
    }
}
