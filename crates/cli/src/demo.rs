//! `livemig demo`: the main job. A destination and a source as two processes on loopback,
//! a filled guest dirtied during the migration, a live progress bar, and a summary that says
//! whether every page arrived exact.

use crate::args::{GuestArgs, MigrationArgs};
use crate::pair::run_pair;
use crate::progress::MigrationBar;
use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Print one JSON object on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// After the run, write pictures into DIR (created if needed): timeline.svg (throughput,
    /// remaining bytes and dirty rate per round), downtime.svg (where the downtime went) and
    /// report.json (the raw numbers: both sides' reports and the series plotted).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
}

/// Creates the report directory before a run, so that a bad path fails at once rather
/// than after the migration.
pub(crate) fn prepare_report_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the report directory {}", dir.display()))
}

/// Writes the pictures of one run (`report` of the source's and the destination's
/// "completed"/"received" lines) into `dir`; returns the files written.
pub(crate) fn write_pictures(
    dir: &Path,
    source: &Value,
    dest: &Value,
) -> anyhow::Result<Vec<PathBuf>> {
    let dest = Some(&dest["report"]).filter(|d| !d.is_null());
    livemig_report::write_report(dir, &source["report"], dest)
        .with_context(|| format!("cannot write the report pictures into {}", dir.display()))
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut source_args = a.guest.to_args();
    source_args.extend(a.migration.to_args());
    let mut dest_args = vec!["--verify".to_string(), "--run-after-ms=300".to_string()];
    if a.migration.local {
        // Local mode: the destination maps the source's memory, over a Unix socket.
        dest_args.push(crate::pair::unix_listen_arg("demo"));
    } else {
        dest_args.push(format!("--memory={}", a.guest.memory));
    }
    dest_args.extend(a.migration.tls.to_args());
    if !a.json {
        eprintln!(
            "livemig demo: migrating a {} MiB {} guest ({} vCPU dirtying {} MiB at {} pages/s) over {} channels on loopback",
            a.guest.memory >> 20,
            a.guest.guest.name(),
            a.guest.vcpus,
            a.guest.working_set >> 20,
            if a.guest.dirty_rate == 0 { "max".to_string() } else { a.guest.dirty_rate.to_string() },
            a.migration.channels
        );
    }
    if let Some(dir) = &a.report {
        prepare_report_dir(dir)?;
    }
    let mut bar = MigrationBar::new(a.json);
    let result = run_pair(&dest_args, &source_args, |v| bar.update(v));
    bar.finish();
    let r = result?;
    // The migration is done either way: a failure to write the pictures is reported after
    // the summary and fails the command, it does not hide the summary.
    let pictures = a
        .report
        .as_deref()
        .map(|dir| write_pictures(dir, &r.source, &r.dest));
    let rep = &r.source["report"];
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    let verify = &r.dest["report"]["verify"];
    let checked = n(verify, "pages_checked");
    let mismatched = n(verify, "pages_mismatched");
    let after = r.after_run.as_ref().map(|v| &v["verify"]);
    let after_bad = after.map_or(0, |v| n(v, "pages_mismatched"));
    let rounds = rep["rounds"].as_array().map_or(0, Vec::len);
    let counter_at_pause = n(&r.source, "counter_at_pause");
    let counter_at_arrival = n(verify, "counter");
    let counter_after_run = after.map_or(0, |v| n(v, "counter"));
    let counter_ok =
        counter_at_arrival == counter_at_pause && counter_after_run > counter_at_arrival;
    let summary = json!({
        "guest": r.source["guest"],
        "counter_at_pause": counter_at_pause,
        "counter_at_arrival": counter_at_arrival,
        "counter_after_run": counter_after_run,
        "memory_bytes": a.guest.memory,
        "channels": a.migration.channels,
        "total_ms": f(rep, "total_ms"),
        "setup_ms": f(rep, "setup_ms"),
        "downtime_ms": f(rep, "downtime_ms"),
        "downtime": rep["downtime"],
        "transferred_bytes": n(rep, "transferred_bytes"),
        "bytes_per_s": f(rep, "bytes_per_s"),
        "rounds": rounds,
        "forced_switchover": rep["forced_switchover"],
        "pages_checked": checked,
        "pages_mismatched": mismatched,
        "pages_mismatched_after_run": after_bad,
        "devices": rep["devices"],
        "buffer_cap_bytes": rep["buffer_cap_bytes"],
        "report_files": match &pictures {
            Some(Ok(files)) => json!(files),
            _ => Value::Null,
        },
    });
    if a.json {
        crate::emit(&summary);
    } else {
        let d = &rep["downtime"];
        println!(
            "livemig demo: done ({} guest)",
            r.source["guest"].as_str().unwrap_or("?")
        );
        println!(
            "  total time     {:>9.1} ms (setup {:.1} ms)",
            f(rep, "total_ms"),
            f(rep, "setup_ms")
        );
        println!(
            "  downtime       {:>9.1} ms: pause {:.2}, last dirty pass {:.2}, then at once: RAM final pass {:.2}, device saves {:.1}, state save {:.2}; until all loaded {:.2}, restore {:.2}, handover+resume {:.2}",
            f(rep, "downtime_ms"),
            f(d, "pause_ms"),
            f(d, "last_dirty_pass_ms"),
            f(d, "ram_final_ms"),
            f(d, "device_save_ms"),
            f(d, "state_save_ms"),
            f(d, "transfer_ms"),
            f(d, "dest_restore_ms"),
            f(d, "resume_ms"),
        );
        println!(
            "  transferred    {:>9.1} MiB at {:.0} MB/s in {} rounds",
            n(rep, "transferred_bytes") as f64 / (1u64 << 20) as f64,
            f(rep, "bytes_per_s") / 1e6,
            rounds
        );
        println!(
            "  pages checked  {checked:>9} on the destination before resuming: {} (checking took {:.0} ms, not counted as downtime)",
            if mismatched == 0 { "all exact".to_string() } else { format!("{mismatched} WRONG") },
            f(d, "dest_verify_ms")
        );
        if let Some(devs) = rep["devices"].as_array().filter(|d| !d.is_empty()) {
            println!(
                "  devices        {:>9} streamed over the data channels with credit (window {} chunks, buffer cap {:.0} MiB)",
                devs.len(),
                n(rep, "credit_window"),
                n(rep, "buffer_cap_bytes") as f64 / (1u64 << 20) as f64
            );
            for d in devs {
                println!(
                    "    {:<12} {:>7.1} MiB loaded in order, final save {:.0} ms, peak buffered {:.1} MiB",
                    d["name"].as_str().unwrap_or("?"),
                    n(d, "bytes") as f64 / (1u64 << 20) as f64,
                    f(d, "final_save_ms"),
                    n(d, "peak_buffered_bytes") as f64 / (1u64 << 20) as f64
                );
            }
        }
        println!(
            "  guest counter  {counter_at_pause:>9} at the pause, {counter_at_arrival} on arrival, {counter_after_run} after running on: {}",
            if counter_ok { "continued" } else { "DID NOT CONTINUE" }
        );
        if let Some(v) = after {
            println!(
                "  after resuming {:>9} pages checked after 300 ms of running on the destination: {}",
                n(v, "pages_checked"),
                if after_bad == 0 { "all exact".to_string() } else { format!("{after_bad} WRONG") }
            );
        }
        if let (Some(dir), Some(Ok(files))) = (&a.report, &pictures) {
            let names: Vec<_> = files
                .iter()
                .filter_map(|f| f.file_name())
                .map(|f| f.to_string_lossy())
                .collect();
            println!(
                "  report         {} written to {}",
                names.join(", "),
                dir.display()
            );
        }
    }
    if let Some(Err(e)) = pictures {
        return Err(e);
    }
    Ok(if mismatched == 0 && after_bad == 0 && counter_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
