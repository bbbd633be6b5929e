//! `livemig bench`: RAM migration throughput and downtime for several channel counts, on an
//! idle and on a dirtying guest, beside the raw loopback TCP throughput measured in the same
//! run. Prints a Markdown table, or with `--json` one JSON object.

mod compress;
mod devices;
mod qemu;
mod raw_tcp;
mod run_facts;
mod suite;
mod tls;

use crate::args::parse_size;
use crate::guest::GuestChoice;
use crate::pair::run_pair;

use clap::Args;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::ExitCode;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// RAM throughput and downtime against channel count.
    Ram,
    /// Downtime against VFIO-like device count, parallel against serial device state.
    Devices,
    /// Every benchmark in one run (channels, guest size, dirty rate, devices, resources),
    /// as Markdown tables and JSON: see `--out` and the `Suite:` options.
    Suite,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Ram)]
    pub mode: Mode,
    /// Devices and suite modes: device counts to measure [default: 1,2,4,8; suite: 0,1,2,4,8].
    #[arg(long, value_delimiter = ',')]
    pub device_counts: Option<Vec<usize>>,
    /// Devices mode: each device's state size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub device_size: u64,
    /// Devices mode: each device's read rate, bytes per second.
    #[arg(long, default_value = "500M", value_parser = parse_size)]
    pub device_rate: u64,
    /// Devices mode: data channels.
    #[arg(long, default_value_t = 4)]
    pub device_channels: u16,
    /// Devices mode: guest memory.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub device_guest_memory: u64,
    /// Guest memory size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// Channel counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1u16, 2, 4, 8])]
    pub channels: Vec<u16>,
    /// Working set the dirtying guest writes.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub working_set: u64,
    /// Page writes per second of the dirtying guest (0: as fast as it can).
    #[arg(long, default_value = "50k", value_parser = crate::args::parse_count)]
    pub dirty_rate: u64,
    /// Which guest: the KVM micro-VM when /dev/kvm is usable (auto), or the synthetic one.
    #[arg(long, value_enum, default_value_t = GuestChoice::Auto)]
    pub guest: GuestChoice,
    /// Repeat each row this many times and keep the median [with --peer: 3].
    #[arg(
        long,
        default_value_t = 1,
        default_value_if("peer", clap::builder::ArgPredicate::IsPresent, "3")
    )]
    pub repeat: usize,
    /// Measure the cost of TLS: every row twice in the same run, over plain TCP and over
    /// TLS 1.3 with mutual authentication (throwaway certificates made for the run).
    #[arg(long)]
    pub tls: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the pictures of every measured run (with --repeat, the median one) into a
    /// subfolder of DIR each: `idle-4ch/`, `dirtying-4ch/`, ... (ram mode) or
    /// `devices-2-parallel/`, ... (devices mode), each with timeline.svg, downtime.svg and
    /// report.json, as `livemig demo --report` writes them.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub suite: suite::SuiteArgs,
    #[command(flatten)]
    pub peer: qemu::PeerArgs,
}

/// One measured run: the row for the table and the two sides' final JSON lines.
pub(crate) struct Run {
    pub row: Value,
    pub source: Value,
    pub dest: Value,
}

/// With `--report`, writes `run`'s pictures into `DIR/name` and notes the folder in its row.
pub(crate) fn report_run(a: &BenchArgs, name: &str, run: &mut Run) -> anyhow::Result<()> {
    let Some(dir) = &a.report else {
        return Ok(());
    };
    let dir = dir.join(name);
    crate::demo::write_pictures(&dir, &run.source, &run.dest)?;
    if !a.json {
        eprintln!("bench: pictures of this run in {}", dir.display());
    }
    run.row["report_dir"] = json!(dir);
    Ok(())
}

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.peer.peer.is_some() {
        return qemu::run(&a);
    }
    if a.tls {
        return tls::run(&a);
    }
    if let Some(dir) = &a.report {
        crate::demo::prepare_report_dir(dir)?;
    }
    if a.mode == Mode::Devices {
        return run_devices(&a);
    }
    if a.mode == Mode::Suite {
        return suite::run(a);
    }
    let (raw, raw_how) = raw_tcp::measure(a.memory)?;
    let raw_mem = raw_tcp::measure_memory(a.memory)?;
    let mut rows = Vec::new();
    for dirty in [false, true] {
        for &ch in &a.channels {
            let mut samples = Vec::new();
            for _ in 0..a.repeat.max(1) {
                samples.push(one(&a, ch, dirty)?);
            }
            samples.sort_by(|x, y| {
                x.row["total_ms"]
                    .as_f64()
                    .partial_cmp(&y.row["total_ms"].as_f64())
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let mut median = samples.swap_remove(samples.len() / 2);
            let name = format!("{}-{ch}ch", if dirty { "dirtying" } else { "idle" });
            report_run(&a, &name, &mut median)?;
            let mut row = median.row;
            let bps = row["bytes_per_s"].as_f64().unwrap_or(0.0);
            row["raw_tcp_bytes_per_s"] = json!(raw);
            row["ratio_to_raw"] = json!(bps / raw);
            row["raw_memory_bytes_per_s"] = json!(raw_mem);
            row["ratio_to_raw_memory"] = json!(bps / raw_mem);
            if !a.json {
                eprintln!(
                    "bench: {} channels, {}: {:.0} ms",
                    ch,
                    if dirty { "dirtying" } else { "idle" },
                    row["total_ms"].as_f64().unwrap_or(0.0)
                );
            }
            rows.push(row);
        }
    }
    let how = format!(
        "livemig bench --memory {} --working-set {} --dirty-rate {}: a {} MiB {} guest, filled, \
         migrated between two processes over loopback TCP; the destination started with --memory \
         (guest memory pre-faulted before the source connects). Raw = best plain socket copy of {} MiB \
         from a cache-hot buffer over 1, 2 or 4 streams, 64 KiB or 1 MiB writes, default or 4 MiB \
         socket buffers (best here: {raw_how}). Raw memory = the same socket copy from a {} MiB buffer into \
         another (both faulted in beforehand), so every byte is read from RAM and written to RAM once, \
         as a migration must; best of 1, 2 or 4 streams.",
        a.memory, a.working_set, a.dirty_rate, a.memory >> 20, a.guest.name(), a.memory >> 20, a.memory >> 20
    );
    if a.json {
        crate::emit(
            &json!({"guest": a.guest.name(), "how": how, "raw_tcp_bytes_per_s": raw, "raw_memory_bytes_per_s": raw_mem, "rows": rows}),
        );
    } else {
        println!("{}", table(&rows, raw, raw_mem, &how));
    }
    Ok(ExitCode::SUCCESS)
}

fn one(a: &BenchArgs, channels: u16, dirty: bool) -> anyhow::Result<Run> {
    let mut src = vec![
        format!("--memory={}", a.memory),
        format!("--guest={}", a.guest.name()),
        "--fill=1".into(),
        format!("--working-set={}", if dirty { a.working_set } else { 0 }),
        format!("--dirty-rate={}", a.dirty_rate),
        "--warmup-ms=200".into(),
    ];
    src.push(format!("--channels={channels}"));
    let r = run_pair(&[format!("--memory={}", a.memory)], &src, |_| {})?;
    let rep = &r.source["report"];
    let f = |k: &str| rep.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let rounds = rep["rounds"].as_array().cloned().unwrap_or_default();
    let row = json!({
        "channels": channels,
        "dirty": dirty,
        "total_ms": f("total_ms"),
        "setup_ms": f("setup_ms"),
        "downtime_ms": f("downtime_ms"),
        "transferred_bytes": rep["transferred_bytes"],
        "bytes_per_s": f("bytes_per_s"),
        "first_round_bytes_per_s": rounds.first().and_then(|r| r["bytes_per_s"].as_f64()).unwrap_or(0.0),
        "rounds": rounds.len(),
        "dest_drain_ms": r.dest["report"]["drain_ms"],
    });
    Ok(Run {
        row,
        source: r.source,
        dest: r.dest,
    })
}

fn table(rows: &[Value], raw: f64, raw_mem: f64, how: &str) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Raw loopback TCP (same run): {:.0} MB/s from a cache-hot buffer, {:.0} MB/s memory to memory\n\n",
        raw / 1e6,
        raw_mem / 1e6
    ));
    s.push_str(
        "| channels | guest | total ms | downtime ms | rounds | MB/s | ratio to raw TCP | ratio to raw memory copy |\n",
    );
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {} | {:.0} | {:.2} | {:.2} |\n",
            r["channels"],
            if r["dirty"].as_bool().unwrap_or(false) {
                "dirtying"
            } else {
                "idle"
            },
            f("total_ms"),
            f("downtime_ms"),
            r["rounds"],
            f("bytes_per_s") / 1e6,
            f("ratio_to_raw"),
            f("ratio_to_raw_memory"),
        ));
    }
    s.push_str(&format!("\nHow: {how}\n"));
    s
}

fn run_devices(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let (raw, raw_how) = raw_tcp::measure(1 << 30)?;
    let mut rows = Vec::new();
    for &n in a.device_counts.as_deref().unwrap_or(&[1, 2, 4, 8]) {
        for parallel in [true, false] {
            let mut run = devices::row(a, n, parallel, raw)?;
            let name = format!(
                "devices-{n}-{}",
                if parallel { "parallel" } else { "serial" }
            );
            report_run(a, &name, &mut run)?;
            let row = run.row;
            if !a.json {
                eprintln!(
                    "bench: {n} devices, {}: downtime {:.0} ms",
                    row["mode"].as_str().unwrap_or(""),
                    row["downtime_ms"].as_f64().unwrap_or(0.0)
                );
            }
            rows.push(row);
        }
    }
    let how = format!(
        "livemig bench --mode devices: a {} MiB {} guest dirtying {} MiB at {} pages/s, {} data channels, \
         devices of {} MiB read at {} MB/s (vfio-sim), 1 MiB chunks, default credit (2 x channels); \
         parallel = chunks on the data channels with credit, serial = each device in turn on the main \
         channel. Ideal = max(one device's read time, all device bytes / raw TCP) + the last RAM \
         round / raw TCP. Raw = {raw_how}.",
        a.device_guest_memory >> 20,
        a.guest.name(),
        a.working_set.min(a.device_guest_memory / 4) >> 20,
        a.dirty_rate,
        a.device_channels,
        a.device_size >> 20,
        a.device_rate / 1_000_000,
    );
    if a.json {
        crate::emit(
            &json!({"guest": a.guest.name(), "mode": "devices", "how": how, "raw_tcp_bytes_per_s": raw, "rows": rows}),
        );
    } else {
        println!("{}", devices::table(&rows, raw, &how));
    }
    Ok(ExitCode::SUCCESS)
}
