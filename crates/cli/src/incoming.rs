//! `livemig incoming`: the destination side.

use crate::args::parse_size;
use crate::args::MigrationArgs;
use crate::emit;
use crate::machine::{self, IncomingLimits};
use crate::procstat::CpuMark;
use clap::Args;
use livemig_engine::{
    migrate, receive_vm, Endpoint, Factories, Guest, Incoming, IncomingConfig, IncomingEvent,
    IncomingRecovery, Listener, Progress,
};
use livemig_vmm::devices::DeviceModels;
use livemig_vmm::{memory, Factory};
use livemig_wire::MemoryRange;
use serde_json::json;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct IncomingArgs {
    /// Where to listen: tcp:HOST:PORT (port 0 picks a free one) or unix:PATH. With
    /// `--qmp` it may be left out: the source's address then comes with `migrate-incoming`.
    #[arg(long, required_unless_present_any = ["qmp", "from"])]
    pub listen: Option<Endpoint>,
    /// Restore the guest saved in a file (file:PATH, written by `migrate --to file:PATH`)
    /// instead of listening for a source: pages are read by --channels threads.
    #[arg(long, conflicts_with_all = ["listen", "qmp"], value_parser = parse_file_uri)]
    pub from: Option<std::path::PathBuf>,
    /// With --from: resume the guest as soon as its devices and state are loaded, reading
    /// each page when the guest first touches it (userfaultfd) while a background thread
    /// reads the rest.
    #[arg(long, requires = "from")]
    pub on_demand: bool,
    /// With --from: read the pages with direct I/O (O_DIRECT, QEMU's `direct-io`), bypassing
    /// the page cache; refused with an error where the filesystem does not allow it.
    #[arg(long, requires = "from")]
    pub direct_io: bool,
    /// Serve QMP on this Unix socket path: receive on `migrate-incoming` (or at once on
    /// `--listen`), then hold the guest, which can be migrated on, until `quit`.
    #[arg(long)]
    pub qmp: Option<std::path::PathBuf>,
    /// Check every page of the received guest before resuming it.
    #[arg(long)]
    pub verify: bool,
    /// After resuming, let the guest run this long, then check it again and exit.
    #[arg(long, default_value_t = 0)]
    pub run_after_ms: u64,
    /// The largest guest memory a source may ask for (default: this host's RAM).
    #[arg(long, value_parser = parse_size)]
    pub max_guest_memory: Option<u64>,
    /// Allocate and pre-fault guest memory of this size now, before a source connects, as a
    /// VMM does when started to receive a guest of known size (QEMU's -mem-prealloc). Used
    /// when the incoming guest has one memory range of exactly this size.
    #[arg(long, value_parser = parse_size)]
    pub memory: Option<u64>,
    /// Chunks of credit each device gets at most (0: 2 x the session's channels).
    #[arg(long, default_value_t = 0)]
    pub max_credit_window: u32,
    /// Bytes of device state chunks this side buffers at most, across devices, whatever
    /// the source asks for (0: every device's full window, as large as the source's hello
    /// makes it).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub max_buffer_cap: u64,
    /// Milliseconds a new connection has to complete its first frame (after TLS), from its
    /// accept: a deadline, not reset by bytes arriving.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub handshake_timeout_ms: u64,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// After receiving (and running, with --run-after-ms), migrate the guest on to this
    /// destination: a ping-pong hop.
    #[arg(long)]
    pub then_migrate_to: Option<Endpoint>,
    /// How the onward migration runs (with --then-migrate-to).
    #[command(flatten)]
    pub onward: MigrationArgs,
}

pub fn run(a: IncomingArgs) -> anyhow::Result<ExitCode> {
    if let Some(size) = a.memory {
        let range = MemoryRange {
            guest_addr: 0,
            size: size / (2 << 20) * (2 << 20),
        };
        memory::prepare(&[range])?;
    }
    if let Some(path) = &a.qmp {
        return serve_qmp(&a, path);
    }
    if let Some(path) = &a.from {
        return restore_from(&a, path);
    }
    let Some(listen) = &a.listen else {
        anyhow::bail!("--listen is needed without --qmp");
    };
    // The VM is built before anyone connects, as QEMU's destination has its VM: the source's
    // set-up then waits only for the guest's memory slots and vCPUs.
    livemig_vmm::kvm::prepare_vm();
    let listener =
        Listener::bind(listen).map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_endpoint()?;
    let json = a.json;
    if json {
        emit(&json!({"event": "listening", "addr": addr.to_string()}));
    } else {
        eprintln!("livemig: waiting for a migration on {addr}");
    }
    let config = incoming_config(&a)?;
    let log = move |ev: &IncomingEvent| {
        if json {
            emit(&json!({"event": "log", "msg": ev.to_string()}));
        } else {
            eprintln!("livemig: {ev}");
        }
    };
    let factories = Factories {
        guest: &Factory,
        devices: &DeviceModels,
    };
    let cpu = CpuMark::now();
    match receive_vm(&listener, factories, &config, &log) {
        Ok(inc) => received(&a, inc, &cpu),
        Err(e) => {
            if json {
                emit(&json!({"event": "failed", "error": e.to_string()}));
            }
            Err(e.into())
        }
    }
}

/// `file:PATH` as a path.
fn parse_file_uri(s: &str) -> Result<std::path::PathBuf, String> {
    crate::file::file_uri(s).unwrap_or_else(|| Err(format!("'{s}': expected file:PATH")))
}

/// `--from file:PATH`: restores the saved guest, then runs and checks it, or migrates it
/// on, as for a guest received.
fn restore_from(a: &IncomingArgs, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let mut config = livemig_engine::file::RestoreConfig {
        readers: a.onward.channels,
        verify: a.verify,
        on_demand: a.on_demand,
        direct_io: a.direct_io,
        ..Default::default()
    };
    if let Some(m) = a.max_guest_memory {
        config.max_guest_memory = m;
    }
    let restored = crate::file::restore(path, &config, a.json)?;
    after_arrival(a, &*restored.guest)
}

/// `--qmp`: serves QMP, receiving on `migrate-incoming` (or at once on `--listen`).
fn serve_qmp(a: &IncomingArgs, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let limits = IncomingLimits {
        verify: a.verify,
        max_guest_memory: a.max_guest_memory,
        peer_timeout: Duration::from_millis(a.onward.peer_timeout_ms),
        tls: a.onward.tls.config()?,
    };
    machine::serve(path, None, limits, a.listen.as_ref())?;
    Ok(ExitCode::SUCCESS)
}

/// The engine's configuration from the options.
fn incoming_config(a: &IncomingArgs) -> anyhow::Result<IncomingConfig> {
    let mut config = IncomingConfig {
        verify: a.verify,
        credit_window: a.max_credit_window,
        buffer_cap: a.max_buffer_cap,
        peer_timeout: Duration::from_millis(a.onward.peer_timeout_ms),
        handshake_timeout: Duration::from_millis(a.handshake_timeout_ms),
        tls: a.onward.tls.config()?,
        postcopy_recovery: match a.onward.postcopy_recover_timeout_ms {
            0 => IncomingRecovery::Off,
            ms => IncomingRecovery::SameListener {
                within: Duration::from_millis(ms),
            },
        },
        test_hooks: crate::test_hooks()?.destination,
        ..IncomingConfig::default()
    };
    if let Some(m) = a.max_guest_memory {
        config.max_guest_memory = m;
    }
    Ok(config)
}

/// A guest arrived: says so, lets it run (`--run-after-ms`) and checks it, and migrates it
/// on (`--then-migrate-to`).
fn received(a: &IncomingArgs, inc: Incoming, cpu: &CpuMark) -> anyhow::Result<ExitCode> {
    let json = a.json;
    if json {
        emit(&json!({"event": "received", "report": inc.report,
            "peak_rss_bytes": crate::procstat::own_peak_rss(), "cpu": cpu.usage()}));
    } else {
        eprintln!(
            "livemig: guest received in {:.0} ms and resumed ({} rounds, {} MiB)",
            inc.report.total_ms,
            inc.report.rounds,
            inc.report.received_bytes >> 20
        );
    }
    after_arrival(a, &*inc.guest)
}

/// A guest arrived and runs: lets it run (`--run-after-ms`) and checks it, and migrates
/// it on (`--then-migrate-to`).
fn after_arrival(a: &IncomingArgs, guest: &dyn Guest) -> anyhow::Result<ExitCode> {
    let json = a.json;
    if a.run_after_ms > 0 {
        std::thread::sleep(Duration::from_millis(a.run_after_ms));
        guest.pause()?;
        let v = guest.verify()?;
        if json {
            emit(&json!({"event": "after_run", "verify": v}));
        } else {
            eprintln!(
                "livemig: after {} ms running here: {} pages checked, {} wrong",
                a.run_after_ms, v.pages_checked, v.pages_mismatched
            );
        }
        guest.resume()?;
    }
    if let Some(to) = &a.then_migrate_to {
        return forward(guest, to, &a.onward, json);
    }
    Ok(ExitCode::SUCCESS)
}

/// Migrates the received guest on to `to`.
fn forward(
    guest: &dyn Guest,
    to: &Endpoint,
    m: &MigrationArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let progress = |p: &Progress| {
        if json {
            emit(&serde_json::to_value(p).unwrap_or_default());
        }
    };
    match migrate(guest, to, &m.config()?, &progress) {
        Ok(report) => {
            let v = guest.verify()?;
            if json {
                emit(
                    &json!({"event": "completed", "to": to.to_string(), "counter_at_pause": v.counter, "report": report}),
                );
            } else {
                eprintln!(
                    "livemig: migrated on to {to}, downtime {:.1} ms",
                    report.downtime_ms
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if json {
                emit(&json!({"event": "failed", "error": e.to_string()}));
            }
            Err(e.into())
        }
    }
}
