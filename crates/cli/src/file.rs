//! Migration to and from a file on the command line: `migrate --to file:PATH` saves the
//! guest (live, or in one pass with `--stop-first`), `incoming --from file:PATH` restores
//! it (`docs/file-format.md`).

use crate::args::MigrationArgs;
use crate::devices::SourceDevices;
use crate::emit;
use crate::guest::SourceGuest;
use livemig_engine::file::{restore_vm, save_vm, RestoreConfig, Restored, SaveConfig, SaveRound};
use livemig_engine::{Endpoint, Factories, Vm};
use livemig_vmm::devices::DeviceModels;
use livemig_vmm::Factory;
use serde_json::json;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Where `migrate --to` sends the guest: a destination process, or a file.
#[derive(Debug, Clone)]
pub enum Destination {
    Net(Endpoint),
    File(PathBuf),
}

impl FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match file_uri(s) {
            Some(Ok(p)) => Ok(Destination::File(p)),
            Some(Err(e)) => Err(e),
            None => s
                .parse()
                .map(Destination::Net)
                .map_err(|e| format!("{e}, or file:PATH to save the guest to a file")),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Net(e) => e.fmt(f),
            Destination::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// The path of a `file:PATH` URI, `None` for any other URI.
pub fn file_uri(s: &str) -> Option<Result<PathBuf, String>> {
    let rest = s.strip_prefix("file:")?;
    Some(match rest.is_empty() {
        true => Err(format!("'{s}': expected file:PATH")),
        false => Ok(PathBuf::from(rest)),
    })
}

/// The save's configuration from the migration options: the data channels write pages,
/// the downtime limit and round bound end the rounds, the chunk size cuts device state;
/// `direct_io` writes the pages with `O_DIRECT`.
pub fn save_config(m: &MigrationArgs, stop_first: bool, direct_io: bool) -> SaveConfig {
    SaveConfig {
        channels: m.channels,
        downtime_limit: Duration::from_millis(m.downtime_limit_ms),
        max_rounds: m.max_rounds,
        chunk_size: m.chunk_size.min(u32::MAX as u64) as u32,
        paused: stop_first,
        direct_io,
        // The process ends after the save; the guest stays where it paused (as QEMU's does
        // after `migrate file:`), so its counter there is the file's.
        resume: false,
        ..SaveConfig::default()
    }
}

/// `migrate --to file:PATH`: saves the running guest to `path`.
pub fn save(
    source: &SourceGuest,
    devices: &SourceDevices,
    path: &Path,
    config: &SaveConfig,
    json: bool,
) -> anyhow::Result<()> {
    let (streamed, vmstates) = (devices.streamed(), devices.vmstates());
    let vm = Vm {
        guest: source.guest(),
        devices: &streamed,
        vmstates: &vmstates,
    };
    if config.paused {
        vm.guest.pause()?;
    }
    let progress = |r: &SaveRound| match json {
        true => emit(&json!({"event": "save_round", "round": r})),
        false => eprintln!(
            "livemig: round {}: {} pages ({} with data) in {:.0} ms, {} dirtied meanwhile",
            r.round, r.pages, r.data_pages, r.ms, r.dirty_after
        ),
    };
    let cpu = crate::procstat::CpuMark::now();
    let report = save_vm(vm, path, config, &progress)?;
    let counter = source.counter_at_pause();
    if json {
        emit(&json!({
            "event": "completed", "to": format!("file:{}", path.display()),
            "guest": source.kind(), "counter_at_pause": counter, "report": report,
            "cpu": cpu.usage(),
        }));
    } else {
        eprintln!(
            "livemig: saved to {} in {:.0} ms ({} rounds, downtime {:.1} ms, {} MiB of pages, file {} MiB)",
            path.display(),
            report.total_ms,
            report.rounds.len(),
            report.downtime_ms,
            (report.pages_in_file * 4096) >> 20,
            report.file_len >> 20
        );
    }
    Ok(())
}

/// `incoming --from file:PATH`: restores the guest saved at `path`.
pub fn restore(path: &Path, config: &RestoreConfig, json: bool) -> anyhow::Result<Restored> {
    let factories = Factories {
        guest: &Factory,
        devices: &DeviceModels,
    };
    // The VM is built as for a migration (a KVM guest's VM made ahead).
    livemig_vmm::kvm::prepare_vm();
    let cpu = crate::procstat::CpuMark::now();
    let restored = restore_vm(path, factories, config);
    livemig_vmm::kvm::forget_prepared_vm();
    let restored = match restored {
        Ok(r) => r,
        Err(e) => {
            if json {
                emit(&json!({"event": "failed", "error": e.to_string()}));
            }
            return Err(e.into());
        }
    };
    if json {
        emit(
            &json!({"event": "received", "from": format!("file:{}", path.display()),
            "report": restored.report, "peak_rss_bytes": crate::procstat::own_peak_rss(),
            "cpu": cpu.usage()}),
        );
    } else {
        let r = &restored.report;
        eprintln!(
            "livemig: guest restored from {} in {:.0} ms ({} MiB read{}), running since {}",
            path.display(),
            r.total_ms,
            (r.pages_read * 4096) >> 20,
            if r.on_demand {
                format!(", {} pages on demand", r.faults)
            } else {
                String::new()
            },
            r.resumed_ms
                .map_or("never (paused)".into(), |ms| format!("{ms:.1} ms")),
        );
    }
    Ok(restored)
}
