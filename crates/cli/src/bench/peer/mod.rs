//! `livemig bench --peer qemu`: livemig beside QEMU on the same guest image and the same
//! work, both driven the same way over QMP, interleaved in one run.
//!
//! For each row (destination cold or prepared x guest idle or dirtying x 2 or 4 channels,
//! and a sparse guest) the bench runs QEMU, livemig, QEMU, livemig, ... `--repeat` times and
//! reports each figure's median: total time, downtime and setup time as the source's
//! `query-migrate` reports them, the destination's CPU seconds and peak RSS, and livemig's
//! ratio to QEMU. Every migration's pages are checked on the destination and a failed check
//! fails its row.
//!
//! - [`work`]: the rows and the guest's work;
//! - [`qemu`], [`livemig`]: each tool's command lines;
//! - [`vm`], [`proc`], [`serial`]: a VMM process, its QMP connection and guest console;
//! - [`migration`]: one migration, driven and measured (/proc through [`crate::procstat`]);
//! - [`table`]: the results as Markdown and JSON (the run's facts from `run_facts`);
//! - [`host`]: what touching fresh memory costs on this host, measured in the run;
//! - [`args`]: the options.

mod args;
mod host;
mod livemig;
mod migration;
mod proc;
mod qemu;
mod serial;
mod table;
mod vm;
mod work;

use super::args::BenchArgs;
use anyhow::Context;
pub use args::PeerArgs;
use migration::{Setup, Tool, DOWNTIME_LIMIT_MS, MAX_BANDWIDTH};
use proc::WorkDir;
use qemu::Qemu;
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use table::RowResult;
use work::{Boot, RowSpec};

/// The guest image: `--image`, or the one `livemig guest-image` writes into `dir`. Without
/// one, livemig runs its built-in guest and QEMU cannot run; the text says why.
fn guest_image(exe: &Path, p: &PeerArgs, dir: &WorkDir) -> (Boot, String) {
    if let Some(image) = &p.image {
        return (
            Boot::Image(image.clone()),
            format!("the image {} (--image)", image.display()),
        );
    }
    let path = dir.join("guest.elf");
    let made = std::process::Command::new(exe)
        .args(["guest-image", "--out"])
        .arg(&path)
        .output();
    match made {
        Ok(o) if o.status.success() && path.is_file() => (
            Boot::Image(path),
            "the image `livemig guest-image` writes".into(),
        ),
        Ok(o) => (
            Boot::Builtin,
            format!(
                "no guest image (`livemig guest-image` failed: {}), so livemig runs its built-in \
                 guest with the same work",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("no message")
                    .trim()
            ),
        ),
        Err(e) => (Boot::Builtin, format!("no guest image ({e})")),
    }
}

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let p = &a.peer;
    let how = super::run_facts::RunFacts::collect();
    let exe = std::env::current_exe().context("cannot find the livemig binary")?;
    let image_dir = WorkDir::new("image")?;
    let (boot, boot_how) = guest_image(&exe, p, &image_dir);
    let qemu = match (Qemu::find(), &boot) {
        (Ok(q), Boot::Image(_)) => Ok(q),
        (Ok(_), Boot::Builtin) => Err("QEMU has no guest image to boot".to_string()),
        (Err(why), _) => Err(why),
    };
    let peer_how = match &qemu {
        Ok(q) => format!("{} ({})", q.version, q.program.display()),
        Err(why) => {
            eprintln!("bench: no QEMU columns: {why}");
            format!("none: {why}; only livemig's columns are measured")
        }
    };
    let touch = host::FirstTouch::measure(512 << 20, Duration::from_millis(p.settle_ms));
    eprintln!(
        "bench: this host's first touch of fresh memory: {:.2} CPU-s/GiB after the settle, \
         {:.2} right after freeing",
        touch.settled_s_per_gib, touch.warm_s_per_gib
    );
    let specs = p.rows.clone().unwrap_or_else(RowSpec::all);
    let repeat = a.repeat.max(1);
    let mut rows = Vec::new();
    for spec in specs {
        let row = measure_row(a, &exe, qemu.as_ref().ok(), &boot, spec, repeat);
        rows.push(row);
    }
    let failed = rows.iter().any(|r| r.failure.is_some());

    let settings = settings(p, &boot_how, &peer_how, repeat, checksums(&rows));
    let load_end = super::run_facts::load_average();
    let md = markdown(&how, &touch, &rows, &settings, &load_end);
    let mut how_json = how.json();
    how_json["load_average_end"] = json!(load_end);
    let doc = json!({
        "how": how_json,
        "settings": settings,
        "peer": match &qemu {
            Ok(q) => json!({"tool": "qemu", "available": true, "version": q.version,
                            "program": q.program}),
            Err(why) => json!({"tool": "qemu", "available": false, "why": why}),
        },
        "guest_boot": boot_how,
        "host_first_touch": touch,
        "repeat": repeat,
        "rows": rows.iter().map(RowResult::json).collect::<Vec<_>>(),
    });
    if let Some(dir) = &a.suite.out {
        super::out::write_out(dir, &md, &doc, "bench")?;
    }
    if a.json {
        crate::emit(&doc);
    } else {
        println!("{md}");
    }
    if failed {
        eprintln!("bench: some rows FAILED (see the table)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether livemig's runs carried page checksums, as their JSON says.
fn checksums(rows: &[RowResult]) -> &'static str {
    let checksums: Vec<Option<bool>> = rows
        .iter()
        .flat_map(|r| r.livemig.iter().map(|s| s.page_checksums))
        .collect();
    if checksums.is_empty() {
        "not known: no livemig run completed"
    } else if checksums.iter().all(|c| *c == Some(true)) {
        "on: every page carries its CRC32C"
    } else if checksums.iter().all(|c| *c == Some(false)) {
        "off: the transport is trusted, as QEMU does"
    } else {
        "as each run's JSON says"
    }
}

/// The document printed and written to bench.md.
fn markdown(
    how: &super::run_facts::RunFacts,
    touch: &host::FirstTouch,
    rows: &[RowResult],
    settings: &str,
    load_end: &str,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# livemig beside QEMU\n");
    let _ = writeln!(md, "{}\n", how.line(""));
    let _ = writeln!(
        md,
        "This host's first touch of fresh memory (one thread faulting in 512 MiB, measured at \
         the start): {:.2} CPU-s per GiB after the settle, {:.2} CPU-s per GiB right after \
         freeing the same amount. A cold destination pays the first touch for every page it \
         receives, whichever tool it is; what it costs depends on what the host has taken back \
         at that moment, so this figure is an indication, not the destinations' cost.\n",
        touch.settled_s_per_gib, touch.warm_s_per_gib
    );
    let _ = writeln!(md, "{}\n", table::markdown(rows));
    let _ = writeln!(md, "{settings} Load average at the end: {load_end}.\n");
    let targets = table::targets(rows);
    if !targets.is_empty() {
        let _ = writeln!(md, "Against issue 12's targets:\n\n{targets}");
    }
    md
}

/// How both tools were set up and measured, for under the table.
fn settings(
    p: &PeerArgs,
    boot_how: &str,
    peer_how: &str,
    repeat: usize,
    checksums: &str,
) -> String {
    format!(
        "Both tools: capabilities `multifd` and `events` on, `multifd-channels` N, \
         `max-bandwidth` {MAX_BANDWIDTH} bytes/s (no cap in practice; QEMU's default is 128 MiB/s), \
         `downtime-limit` {DOWNTIME_LIMIT_MS} ms, nothing else changed from each tool's defaults \
         (livemig's page checksums \
         at its default, {checksums}). Each process runs on its own, on loopback TCP, driven \
         over QMP; the source's `query-migrate` is polled every 10 ms until `completed`. Guest: \
         {boot_how}, command line `{}` (dirtying rows; idle rows ws=0 rate=0), booted by QEMU with \
         `-accel kvm -cpu host,-arch-capabilities -nodefaults` and by `livemig run`; the source \
         waits for the guest's ready line (filled) before `migrate`. Destination cold: QEMU \
         `-incoming defer`, livemig `incoming --qmp` without `--memory`; prepared: QEMU \
         `-mem-prealloc`, livemig `incoming --memory SIZE`. Times: `total-time`, `downtime`, \
         `setup-time` of the source's `query-migrate`. Destination CPU s: utime + stime of the \
         destination process (`/proc/PID/stat`, threads that ended included) from `migrate` \
         issued to the guest running there, its vCPU threads' time left out (the spinning guest \
         runs there from resume on). Peak RSS: the destination's `VmHWM` once the guest runs. \
         Pages checked on the destination after every migration: by the guest's own `verify` on \
         its console (guest), or by livemig's QMP `x-livemig-verify` (QMP) where livemig's \
         console cannot be reached. Each figure is the median of {repeat} runs (total time: with the \
         smallest and largest), QEMU and livemig interleaved, each run started {} ms after the \
         previous one ended (`--settle-ms`: memory freed on this host goes back to the hypervisor \
         within seconds, and touching it again costs far more than touching memory freed just \
         now, so every run starts from the same host state). Peer: {peer_how}.",
        p.guest(&RowSpec::parse("cold-dirtying-4ch").expect("a row")).append(),
        p.settle_ms,
    )
}

/// One row: QEMU, livemig, QEMU, livemig, ... `repeat` times; stops at the first failure.
fn measure_row(
    a: &BenchArgs,
    exe: &Path,
    qemu: Option<&Qemu>,
    boot: &Boot,
    spec: RowSpec,
    repeat: usize,
) -> RowResult {
    let guest = a.peer.guest(&spec);
    let mut row = RowResult {
        spec,
        guest,
        qemu: Vec::new(),
        livemig: Vec::new(),
        failure: None,
    };
    let tools: &[Tool] = if qemu.is_some() {
        &[Tool::Qemu, Tool::Livemig]
    } else {
        &[Tool::Livemig]
    };
    for i in 1..=repeat {
        for &tool in tools {
            let setup = Setup {
                tool,
                qemu,
                livemig: exe,
                boot,
                guest,
                dest: spec.dest,
                channels: spec.channels,
            };
            std::thread::sleep(Duration::from_millis(a.peer.settle_ms));
            match migration::run(&setup) {
                Ok(s) => {
                    eprintln!(
                        "bench: {spec} {tool} {i}/{repeat}: total {:.0} ms, downtime {:.1} ms, \
                         setup {:.0} ms, dst {:.2} CPU-s, dst peak RSS {} MiB, {} pages checked",
                        s.total_ms,
                        s.downtime_ms,
                        s.setup_ms,
                        s.dest_cpu_s,
                        s.dest_peak_rss_bytes >> 20,
                        s.pages_checked
                    );
                    match tool {
                        Tool::Qemu => row.qemu.push(s),
                        Tool::Livemig => row.livemig.push(s),
                    }
                }
                Err(e) => {
                    let msg = format!("{tool} run {i}/{repeat}: {}", crate::error_chain(&e));
                    eprintln!("bench: {spec} FAILED: {msg}");
                    row.failure = Some(msg);
                    return row;
                }
            }
        }
    }
    row
}
