//! `livemig demo`: the main job. A destination and a source as two processes on loopback,
//! a filled guest dirtied during the migration, a live progress bar, and a summary that says
//! whether every page arrived exact.

use crate::args::{GuestArgs, MigrationArgs};
use crate::child_args::ToArgs;
use crate::pair::{run_pair, PairResult};
use crate::progress::MigrationBar;
use anyhow::Context;
use clap::Args;
use livemig_engine::report::{IncomingReport, MigrationReport};
use livemig_engine::VerifyReport;
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

/// Writes the pictures of one run (the source's and the destination's reports) into `dir`;
/// returns the files written.
pub(crate) fn write_pictures(
    dir: &Path,
    source: &MigrationReport,
    dest: &IncomingReport,
) -> anyhow::Result<Vec<PathBuf>> {
    let source = serde_json::to_value(source)?;
    let dest = serde_json::to_value(dest)?;
    livemig_report::write_report(dir, &source, Some(&dest))
        .with_context(|| format!("cannot write the report pictures into {}", dir.display()))
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let (dest_args, source_args) = child_args(&a);
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
        .map(|dir| write_pictures(dir, &r.source.report, &r.dest.report));
    let checks = Checks::of(&r);
    if a.json {
        crate::emit(&summary_json(&a, &r, &checks, &pictures));
    } else {
        print_summary(&a, &r, &checks, &pictures);
    }
    if let Some(Err(e)) = pictures {
        return Err(e);
    }
    Ok(if checks.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The destination's and the source's arguments.
fn child_args(a: &DemoArgs) -> (Vec<String>, Vec<String>) {
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
    (dest_args, source_args)
}

/// What the demo checks: every page exact on arrival and after running on, and the guest's
/// counter continuing where it paused.
struct Checks {
    checked: u64,
    mismatched: u64,
    after: Option<VerifyReport>,
    after_bad: u64,
    counter_at_pause: u64,
    counter_at_arrival: u64,
    counter_after_run: u64,
    counter_ok: bool,
}

impl Checks {
    fn of(r: &PairResult) -> Checks {
        let verify = r.dest.report.verify.clone().unwrap_or_default();
        let after = r.after_run.as_ref().map(|v| v.verify.clone());
        let counter_at_pause = r.source.counter_at_pause;
        let counter_at_arrival = verify.counter;
        let counter_after_run = after.as_ref().map_or(0, |v| v.counter);
        Checks {
            checked: verify.pages_checked,
            mismatched: verify.pages_mismatched,
            after_bad: after.as_ref().map_or(0, |v| v.pages_mismatched),
            after,
            counter_at_pause,
            counter_at_arrival,
            counter_after_run,
            // In postcopy the guest runs on the destination before every page has arrived
            // (and is checked), so its counter has gone on by then; otherwise it is checked
            // before it runs there and must read as at the pause.
            counter_ok: if r.source.report.postcopy.is_some() {
                counter_at_arrival >= counter_at_pause
            } else {
                counter_at_arrival == counter_at_pause
            } && counter_after_run > counter_at_arrival,
        }
    }

    fn passed(&self) -> bool {
        self.mismatched == 0 && self.after_bad == 0 && self.counter_ok
    }
}

type Pictures = Option<anyhow::Result<Vec<PathBuf>>>;

/// The `--json` summary.
fn summary_json(a: &DemoArgs, r: &PairResult, c: &Checks, pictures: &Pictures) -> Value {
    let rep = &r.source.report;
    json!({
        "guest": r.source.guest,
        "counter_at_pause": c.counter_at_pause,
        "counter_at_arrival": c.counter_at_arrival,
        "counter_after_run": c.counter_after_run,
        "memory_bytes": a.guest.memory,
        "channels": a.migration.channels,
        "total_ms": rep.total_ms,
        "setup_ms": rep.setup_ms,
        "downtime_ms": rep.downtime_ms,
        "downtime": rep.downtime,
        "transferred_bytes": rep.transferred_bytes,
        "bytes_per_s": rep.bytes_per_s,
        "rounds": rep.rounds.len(),
        "forced_switchover": rep.forced_switchover,
        "pages_checked": c.checked,
        "pages_mismatched": c.mismatched,
        "pages_mismatched_after_run": c.after_bad,
        "devices": rep.devices,
        "buffer_cap_bytes": rep.buffer_cap_bytes,
        "report_files": match pictures {
            Some(Ok(files)) => json!(files),
            _ => Value::Null,
        },
    })
}

fn exact(bad: u64) -> String {
    if bad == 0 {
        "all exact".to_string()
    } else {
        format!("{bad} WRONG")
    }
}

/// The summary a person reads.
fn print_summary(a: &DemoArgs, r: &PairResult, c: &Checks, pictures: &Pictures) {
    let rep = &r.source.report;
    let d = &rep.downtime;
    println!(
        "livemig demo: done ({} guest)",
        r.source.guest.as_deref().unwrap_or("?")
    );
    println!(
        "  total time     {:>9.1} ms (setup {:.1} ms)",
        rep.total_ms, rep.setup_ms
    );
    println!(
        "  downtime       {:>9.1} ms: pause {:.2}, last dirty pass {:.2}, then at once: RAM final pass {:.2}, device saves {:.1}, state save {:.2}; until all loaded {:.2}, restore {:.2}, handover+resume {:.2}",
        rep.downtime_ms,
        d.pause_ms,
        d.last_dirty_pass_ms,
        d.ram_final_ms,
        d.device_save_ms,
        d.state_save_ms,
        d.transfer_ms,
        d.dest_restore_ms,
        d.resume_ms,
    );
    println!(
        "  transferred    {:>9.1} MiB at {:.0} MB/s in {} rounds",
        rep.transferred_bytes as f64 / MIB,
        rep.bytes_per_s / 1e6,
        rep.rounds.len()
    );
    println!(
        "  pages checked  {:>9} on the destination {}: {} (checking took {:.0} ms, not counted as downtime)",
        c.checked,
        if rep.postcopy.is_some() {
            "once every page was in"
        } else {
            "before resuming"
        },
        exact(c.mismatched),
        d.dest_verify_ms
    );
    print_devices(rep);
    println!(
        "  guest counter  {:>9} at the pause, {} on arrival, {} after running on: {}",
        c.counter_at_pause,
        c.counter_at_arrival,
        c.counter_after_run,
        if c.counter_ok {
            "continued"
        } else {
            "DID NOT CONTINUE"
        }
    );
    if let Some(v) = &c.after {
        println!(
            "  after resuming {:>9} pages checked after 300 ms of running on the destination: {}",
            v.pages_checked,
            exact(c.after_bad)
        );
    }
    if let (Some(dir), Some(Ok(files))) = (&a.report, pictures) {
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

const MIB: f64 = (1u64 << 20) as f64;

fn print_devices(rep: &MigrationReport) {
    if rep.devices.is_empty() {
        return;
    }
    println!(
        "  devices        {:>9} streamed over the data channels with credit (window {} chunks, buffer cap {:.0} MiB)",
        rep.devices.len(),
        rep.credit_window,
        rep.buffer_cap_bytes as f64 / MIB
    );
    for d in &rep.devices {
        println!(
            "    {:<12} {:>7.1} MiB loaded in order, final save {:.0} ms, peak buffered {:.1} MiB",
            d.name,
            d.bytes as f64 / MIB,
            d.final_save_ms,
            d.peak_buffered_bytes as f64 / MIB
        );
    }
}
