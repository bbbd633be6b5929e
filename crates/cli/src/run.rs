//! `livemig run`: start a guest on its own and watch it: its write counter and dirty rate,
//! once a second; or, with `--qmp`, serve QMP for it until `quit`.

use crate::args::GuestArgs;
use crate::devices::SourceDevices;
use crate::emit;
use crate::guest::SourceGuest;
use crate::machine::{self, IncomingLimits, VmParts};
use clap::Args;
use serde_json::json;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    pub duration_secs: u64,
    /// Check every page when stopping.
    #[arg(long)]
    pub verify: bool,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Serve QMP on this Unix socket path and run until `quit` (migrate with `migrate`).
    #[arg(long)]
    pub qmp: Option<std::path::PathBuf>,
    /// Guest memory in sealed memfds, so a migration can hand it over instead of copying it
    /// (local mode: the QMP capability `x-local` with a `unix:` URI).
    #[arg(long)]
    pub shared_memory: bool,
    /// TLS for migrations started over QMP.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
}

pub fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let backing = if a.shared_memory {
        livemig_vmm::memory::Backing::Shared
    } else {
        livemig_vmm::memory::Backing::Anonymous
    };
    // The guest's console lines (a KVM guest's COM1) go to stderr, after its boot.
    let g = SourceGuest::start_echoing(&a.guest, backing, Some("livemig: guest: ".into()))?;
    if let Some(path) = &a.qmp {
        return serve_qmp(&a, g, path);
    }
    if a.json {
        emit(&json!({"event": "guest_started", "guest": g.kind(), "memory": a.guest.memory}));
    } else if let Some(cmdline) = &a.guest.append {
        eprintln!(
            "livemig: {} guest running: {} MiB, {} vCPU(s), command line \"{cmdline}\"",
            g.kind(),
            a.guest.memory >> 20,
            a.guest.vcpus
        );
    } else {
        say_running(&g, &a);
    }
    watch(&a, &g);
    if a.verify {
        g.guest().pause()?;
        let v = g.guest().verify()?;
        if a.json {
            emit(&json!({"event": "verify", "verify": v}));
        } else {
            eprintln!(
                "livemig: {} pages checked, {} wrong",
                v.pages_checked, v.pages_mismatched
            );
        }
        if v.pages_mismatched > 0 {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn say_running(g: &SourceGuest, a: &RunArgs) {
    eprintln!(
        "livemig: {} guest running: {} MiB, {} vCPU(s) writing {} MiB",
        g.kind(),
        a.guest.memory >> 20,
        a.guest.vcpus,
        a.guest.working_set >> 20
    );
}

/// Serves QMP for the running guest until `quit`.
fn serve_qmp(a: &RunArgs, g: SourceGuest, path: &std::path::Path) -> anyhow::Result<ExitCode> {
    let (devices, vmstates) = SourceDevices::build(&a.guest.devices)?.into_shared();
    say_running(&g, a);
    let vm = VmParts {
        kind: g.kind().to_string(),
        guest: g.into_shared(),
        devices,
        vmstates,
    };
    let limits = IncomingLimits {
        tls: a.tls.config()?,
        ..IncomingLimits::default()
    };
    machine::serve(path, Some(vm), limits, None)?;
    Ok(ExitCode::SUCCESS)
}

/// Reports the guest's counter every second, for `--duration-secs` (0: for ever).
fn watch(a: &RunArgs, g: &SourceGuest) {
    let start = Instant::now();
    let mut last = (Instant::now(), g.counter());
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (now, c) = (Instant::now(), g.counter());
        let rate = (c - last.1) as f64 / (now - last.0).as_secs_f64();
        last = (now, c);
        if a.json {
            emit(&json!({"event": "tick", "counter": c, "pages_per_s": rate}));
        } else {
            eprintln!("livemig: counter {c}, {rate:.0} page writes/s");
        }
        if a.duration_secs > 0 && start.elapsed() >= Duration::from_secs(a.duration_secs) {
            break;
        }
    }
}
