//! One migration, QEMU's or livemig's, driven the same way: start a destination, then a
//! source and wait for its guest to have filled its memory; give both the same capabilities
//! and parameters; `migrate-incoming`, `migrate`; poll the source's `query-migrate` until it
//! ends; wait for the destination to run the guest; measure the destination; check every
//! page; quit both. Whatever fails, both processes are killed and their files removed.

use super::livemig;
use super::proc::WorkDir;
use super::qemu::Qemu;
use super::serial;
use super::vm::Vm;
use super::work::{Boot, Dest, GuestWork};
use crate::procstat::{peak_rss, Cpu};
use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// How often `query-migrate` is polled.
const POLL: Duration = Duration::from_millis(10);
/// `max-bandwidth` on both sides: no cap in practice (QEMU's default is 128 MiB/s).
pub(super) const MAX_BANDWIDTH: u64 = 1 << 40;
/// `downtime-limit` on both sides, ms.
pub(super) const DOWNTIME_LIMIT_MS: u64 = 300;
/// Longest wait for a guest to fill its memory, and for a migration to finish.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);
const VERIFY_TIMEOUT: Duration = Duration::from_secs(120);

/// Which VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Tool {
    Qemu,
    Livemig,
}

impl std::fmt::Display for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(match self {
            Tool::Qemu => "QEMU",
            Tool::Livemig => "livemig",
        })
    }
}

/// Everything one migration needs.
pub(super) struct Setup<'a> {
    pub(super) tool: Tool,
    pub(super) qemu: Option<&'a Qemu>,
    pub(super) livemig: &'a Path,
    pub(super) boot: &'a Boot,
    pub(super) guest: GuestWork,
    pub(super) dest: Dest,
    pub(super) channels: u16,
}

/// How the pages were checked on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(super) enum CheckedBy {
    /// The guest's own `verify` command on its serial console.
    #[serde(rename = "guest-verify")]
    GuestVerify,
    /// livemig's QMP `x-livemig-verify`.
    #[serde(rename = "x-livemig-verify")]
    Qmp,
}

/// What one migration measured.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Sample {
    /// From the source's `query-migrate` at completion.
    pub(super) total_ms: f64,
    pub(super) downtime_ms: f64,
    pub(super) setup_ms: f64,
    /// The destination's CPU seconds from `migrate` issued to the guest running there, its
    /// vCPU threads left out.
    pub(super) dest_cpu_s: f64,
    /// The same with the vCPU threads.
    pub(super) dest_cpu_all_threads_s: f64,
    /// The destination's peak RSS (VmHWM) once the guest runs there.
    pub(super) dest_peak_rss_bytes: u64,
    /// Pages the source guest said it filled (from its console), if it has one.
    pub(super) filled_pages: Option<u64>,
    pub(super) checked_by: CheckedBy,
    pub(super) pages_checked: u64,
    pub(super) counter: u64,
    /// The source's `ram` section of `query-migrate` at completion, as the tool reports it.
    pub(super) ram: Value,
    /// livemig's `x-page-checksums` on the source, left at its default (QEMU has none).
    pub(super) page_checksums: Option<bool>,
}

/// Runs one migration and checks it; any failure (a check included) is an error.
pub(super) fn run(s: &Setup) -> anyhow::Result<Sample> {
    let dir = WorkDir::new(match s.tool {
        Tool::Qemu => "qemu",
        Tool::Livemig => "lm",
    })?;
    let prepared = s.dest == Dest::Prepared;
    let g = &s.guest;
    let (src, dst) = match s.tool {
        Tool::Qemu => {
            let q = s.qemu.context("QEMU is not available here")?;
            let Boot::Image(image) = s.boot else {
                bail!("QEMU needs the guest image, and there is none");
            };
            let append = g.append();
            (
                q.source(&dir, image, &append, g.memory),
                q.destination(&dir, image, &append, g.memory, prepared),
            )
        }
        Tool::Livemig => (
            livemig::source(s.livemig, &dir, s.boot, g),
            livemig::destination(s.livemig, &dir, g.memory, prepared),
        ),
    };
    // The destination first: a prepared one has touched all its memory before the source
    // starts filling its own.
    let mut dst = Vm::start(dst)?;
    let mut src = Vm::start(src)?;
    let filled_pages = match (src.serial.as_mut(), s.boot) {
        (Some(console), _) => Some(console.wait_ready(READY_TIMEOUT).map_err(|e| {
            src.proc
                .failure(format_args!("guest never got ready: {e:#}"))
        })?),
        // livemig echoes the image's console on its output, `ready` before QMP is served.
        (None, Boot::Image(_)) => Some(ready_in_log(&mut src)?),
        // livemig's built-in guest is filled before its QMP socket appears.
        (None, Boot::Builtin) => None,
    };
    for vm in [&mut src, &mut dst] {
        configure(vm, s.channels)?;
    }
    let page_checksums = match s.tool {
        Tool::Livemig => {
            src.execute("query-migrate-parameters", json!({}))?["x-page-checksums"].as_bool()
        }
        Tool::Qemu => None,
    };
    let port = free_port()?;
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.execute("migrate-incoming", json!({ "uri": uri }))?;
    let cpu_before = Cpu::of(dst.pid())?;
    src.execute("migrate", json!({ "uri": uri }))?;
    let done = wait_source(&mut src)?;
    wait_destination(&mut dst)?;
    let cpu_after = Cpu::of(dst.pid())?;
    let rss = peak_rss(dst.pid())?;
    let (checked_by, pages_checked, counter) = check(&mut dst)?;
    let f = |k: &str| done[k].as_f64().unwrap_or(f64::NAN);
    let sample = Sample {
        total_ms: f("total-time"),
        downtime_ms: f("downtime"),
        setup_ms: f("setup-time"),
        dest_cpu_s: cpu_after.vmm_since(&cpu_before),
        dest_cpu_all_threads_s: (cpu_after.process_s - cpu_before.process_s).max(0.0),
        dest_peak_rss_bytes: rss,
        filled_pages,
        checked_by,
        pages_checked,
        counter,
        ram: done["ram"].clone(),
        page_checksums,
    };
    src.quit();
    dst.quit();
    Ok(sample)
}

/// The pages filled, from the `ready` line in a VMM's output (waiting for it a while).
fn ready_in_log(vm: &mut Vm) -> anyhow::Result<u64> {
    let start = Instant::now();
    loop {
        if let Some(line) = vm.proc.log_line(serial::READY) {
            return serial::parse_ready(&line);
        }
        if start.elapsed() > READY_TIMEOUT || vm.proc.exited().is_some() {
            return Err(vm.proc.failure(format_args!(
                "never printed the guest's '{}' line",
                serial::READY
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// The same capabilities and parameters on both tools and both sides: `multifd` and
/// `events` on, N channels, no bandwidth cap, a 300 ms downtime limit; nothing else changed.
fn configure(vm: &mut Vm, channels: u16) -> anyhow::Result<()> {
    vm.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [
            {"capability": "multifd", "state": true},
            {"capability": "events", "state": true},
        ]}),
    )?;
    vm.execute(
        "migrate-set-parameters",
        json!({
            "multifd-channels": channels,
            "max-bandwidth": MAX_BANDWIDTH,
            "downtime-limit": DOWNTIME_LIMIT_MS,
        }),
    )?;
    Ok(())
}

/// A free loopback port for the destination to listen on.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// Polls the source's `query-migrate` until it completes; its last answer.
fn wait_source(src: &mut Vm) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let q = src.execute("query-migrate", json!({}))?;
        match q["status"].as_str().unwrap_or("") {
            "completed" => return Ok(q),
            "failed" | "cancelled" => {
                let why = q["error-desc"]
                    .as_str()
                    .unwrap_or("no error-desc")
                    .to_string();
                return Err(src.proc.failure(format_args!(
                    "migration {}: {why}",
                    q["status"].as_str().unwrap_or("")
                )));
            }
            _ if start.elapsed() > MIGRATION_TIMEOUT => {
                return Err(src.proc.failure(format_args!(
                    "migration not finished after {MIGRATION_TIMEOUT:?}: {q}"
                )))
            }
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Waits until the destination has completed its side and runs the guest.
fn wait_destination(dst: &mut Vm) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let m = dst.execute("query-migrate", json!({}))?;
        let status = m["status"].as_str().unwrap_or("").to_string();
        if status == "failed" || status == "cancelled" {
            let why = m["error-desc"]
                .as_str()
                .unwrap_or("no error-desc")
                .to_string();
            return Err(dst
                .proc
                .failure(format_args!("incoming migration {status}: {why}")));
        }
        if status == "completed" {
            let s = dst.execute("query-status", json!({}))?;
            if s["running"].as_bool() == Some(true) {
                return Ok(());
            }
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            return Err(dst.proc.failure(format_args!(
                "does not run the guest {MIGRATION_TIMEOUT:?} after the source completed: {m}"
            )));
        }
        std::thread::sleep(POLL);
    }
}

/// Checks every page on the destination: by the guest's own `verify` where its console can
/// be reached, else by livemig's `x-livemig-verify`. An error unless every page is right.
fn check(dst: &mut Vm) -> anyhow::Result<(CheckedBy, u64, u64)> {
    if let Some(console) = dst.serial.as_mut() {
        let v = console
            .verify(VERIFY_TIMEOUT)
            .map_err(|e| dst.proc.failure(format_args!("page check failed: {e:#}")))?;
        if v.pages == 0 {
            return Err(dst.proc.failure("page check checked no page"));
        }
        return Ok((CheckedBy::GuestVerify, v.pages, v.counter));
    }
    let v = dst.execute("x-livemig-verify", json!({}))?;
    let checked = v["pages-checked"].as_u64().unwrap_or(0);
    let bad = v["pages-mismatched"].as_u64().unwrap_or(u64::MAX);
    if checked == 0 || bad != 0 {
        return Err(dst
            .proc
            .failure(format_args!("page check failed: x-livemig-verify says {v}")));
    }
    Ok((CheckedBy::Qmp, checked, v["counter"].as_u64().unwrap_or(0)))
}
