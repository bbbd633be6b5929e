//! `livemig migrate`: the source side. Starts a guest, lets it run, migrates it.

use crate::args::{GuestArgs, MigrationArgs};
use crate::devices::SourceDevices;
use crate::emit;
use crate::file::Destination;
use crate::guest::SourceGuest;
use clap::Args;
use livemig_engine::{migrate_vm, MigrationError, Progress, Vm};
use livemig_vmm::memory::Backing;
use serde_json::json;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Destination: tcp:HOST:PORT or unix:PATH, or file:PATH to save the guest to a file
    /// (restored by `incoming --from file:PATH`). Repeat to fall back to the next
    /// destination when a migration fails (the guest keeps running here in between).
    #[arg(long = "to", required = true)]
    pub to: Vec<Destination>,
    /// With --to file:PATH: pause the guest first and save it in one pass (QMP's `stop`
    /// then `migrate`), instead of a live save whose rounds re-write dirtied pages.
    #[arg(long)]
    pub stop_first: bool,
    /// With --to file:PATH: write the pages with direct I/O (O_DIRECT, QEMU's `direct-io`),
    /// bypassing the page cache; refused with an error where the filesystem does not allow it.
    #[arg(long)]
    pub direct_io: bool,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let json = a.json;
    if a.direct_io && !a.to.iter().any(|d| matches!(d, Destination::File(_))) {
        anyhow::bail!("--direct-io applies to a save, --to file:PATH");
    }
    let backing = if a.migration.local {
        Backing::Shared
    } else {
        Backing::Anonymous
    };
    let source = SourceGuest::start(&a.guest, backing)?;
    let devices = SourceDevices::build(&a.guest.devices)?;
    let (streamed, vmstates) = (devices.streamed(), devices.vmstates());
    let guest = source.guest();
    let vm = Vm {
        guest,
        devices: &streamed,
        vmstates: &vmstates,
    };
    let kind = source.kind();
    if json {
        emit(&json!({"event": "guest_started", "guest": kind, "memory": a.guest.memory}));
    }
    std::thread::sleep(Duration::from_millis(a.guest.warmup_ms));
    let config = a.migration.config()?;
    let progress = move |p: &Progress| say_progress(p, json);
    let cpu = crate::procstat::CpuMark::now();
    for (attempt, to) in a.to.iter().enumerate() {
        let to = match to {
            Destination::File(path) => {
                let config = crate::file::save_config(&a.migration, a.stop_first, a.direct_io);
                match crate::file::save(&source, &devices, path, &config, json) {
                    Ok(()) => return Ok(ExitCode::SUCCESS),
                    Err(e) => {
                        let at = format!("file:{}", path.display());
                        attempt_failed(&source, &devices, attempt, &at, &e, json)?;
                        continue;
                    }
                }
            }
            Destination::Net(to) => to,
        };
        match migrate_vm(vm, to, &config, &progress) {
            Ok(report) => {
                completed(to, kind, source.counter_at_pause(), &report, &cpu, json);
                return Ok(ExitCode::SUCCESS);
            }
            // The destination may run the guest (or, in postcopy, holds part of its
            // memory): this copy stays paused for good, and no other destination is tried.
            Err(e @ (MigrationError::HandoverUnknown(_) | MigrationError::PostcopyBroken(_))) => {
                if json {
                    emit(&json!({
                        "event": "failed", "to": to.to_string(), "error": e.to_string(),
                        "guest_paused": true,
                    }));
                } else {
                    eprintln!("livemig: migration to {to} failed: {e}");
                }
                return Ok(ExitCode::FAILURE);
            }
            Err(e) => attempt_failed(&source, &devices, attempt, to, &e, json)?,
        }
    }
    if json {
        emit(&json!({"event": "failed", "error": "every destination failed"}));
    }
    Ok(ExitCode::FAILURE)
}

/// Says the migration completed (the guest stays paused here for good: `counter` is where
/// it stopped).
fn completed(
    to: &livemig_engine::Endpoint,
    kind: &str,
    counter: u64,
    report: &livemig_engine::MigrationReport,
    cpu: &crate::procstat::CpuMark,
    json: bool,
) {
    if json {
        emit(&json!({
            "event": "completed", "to": to.to_string(), "guest": kind,
            "counter_at_pause": counter, "report": report,
            "peak_rss_bytes": crate::procstat::own_peak_rss(), "cpu": cpu.usage(),
        }));
    } else {
        eprintln!(
            "livemig: migrated to {to} in {:.0} ms, downtime {:.1} ms (expected {:.1} ms{})",
            report.total_ms,
            report.downtime_ms,
            report.expected_downtime_ms,
            if report.forced_switchover {
                ", forced"
            } else {
                ""
            }
        );
    }
}

/// A progress line with `--json`, else a line a round.
fn say_progress(p: &Progress, json: bool) {
    if json {
        emit(&serde_json::to_value(p).unwrap_or_default());
    } else if let Progress::RoundDone(r) = p {
        eprintln!(
            "livemig: round {}: {} pages in {:.0} ms ({:.0} MB/s), {} dirtied meanwhile",
            r.round,
            r.pages,
            r.ms,
            r.bytes_per_s / 1e6,
            r.dirty_after
        );
    } else if let Progress::SwitchoverAbandoned(a) = p {
        eprintln!(
            "livemig: switchover (round {}) abandoned after {:.0} ms waiting for {}; the guest ran again after {:.0} ms paused, precopy goes on",
            a.round, a.cut_ms, a.waiting_for, a.paused_ms
        );
    }
}

/// After a failed attempt: the engine resumed the guest here; checks that nothing was lost
/// and says so.
fn attempt_failed(
    source: &SourceGuest,
    devices: &SourceDevices,
    attempt: usize,
    to: &dyn std::fmt::Display,
    e: &dyn std::fmt::Display,
    json: bool,
) -> anyhow::Result<()> {
    let guest = source.guest();
    guest.pause()?;
    let v = guest.verify()?;
    let counter = source.counter();
    let devices_intact = devices.check_intact();
    guest.resume()?;
    if json {
        emit(&json!({
            "event": "attempt_failed", "attempt": attempt, "to": to.to_string(),
            "error": e.to_string(), "source_verify": v, "counter": counter,
            "devices_intact": devices_intact.is_ok(),
            "devices_error": devices_intact.err(),
        }));
    } else {
        eprintln!(
                        "livemig: migration to {to} failed: {e}\nlivemig: the guest runs on here; {} pages checked, {} wrong",
                        v.pages_checked, v.pages_mismatched
                    );
    }
    Ok(())
}
