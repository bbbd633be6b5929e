//! `livemig bench` (ram mode, the default): RAM migration throughput and downtime for several
//! channel counts, on an idle and on a dirtying guest, beside the raw loopback TCP throughput
//! measured in the same run. Prints a Markdown table, or with `--json` one JSON object.

use super::args::BenchArgs;
use super::raw_tcp;
use super::run::{filled_guest_args, median, report_run, Figures, Run};
use crate::pair::run_pair;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

/// One row of the table.
#[derive(Serialize)]
struct Row {
    channels: u16,
    dirty: bool,
    #[serde(flatten)]
    figures: Figures,
    dest_drain_ms: f64,
    raw_tcp_bytes_per_s: f64,
    ratio_to_raw: f64,
    raw_memory_bytes_per_s: f64,
    ratio_to_raw_memory: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    report_dir: Option<PathBuf>,
}

fn load(dirty: bool) -> &'static str {
    if dirty {
        "dirtying"
    } else {
        "idle"
    }
}

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let (raw, raw_how) = raw_tcp::measure(a.memory)?;
    let raw_mem = raw_tcp::measure_memory(a.memory)?;
    let mut rows = Vec::new();
    for dirty in [false, true] {
        for &ch in &a.channels {
            let mut run = median(a.repeat, || one(a, ch, dirty), |r| r.row.figures.total_ms)?;
            report_run(a, &format!("{}-{ch}ch", load(dirty)), &mut run)?;
            let mut row = run.row;
            row.report_dir = run.report_dir;
            let bps = row.figures.bytes_per_s;
            row.raw_tcp_bytes_per_s = raw;
            row.ratio_to_raw = bps / raw;
            row.raw_memory_bytes_per_s = raw_mem;
            row.ratio_to_raw_memory = bps / raw_mem;
            if !a.json {
                eprintln!(
                    "bench: {} channels, {}: {:.0} ms",
                    ch,
                    load(dirty),
                    row.figures.total_ms
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

fn one(a: &BenchArgs, channels: u16, dirty: bool) -> anyhow::Result<Run<Row>> {
    let ws = if dirty { a.working_set } else { 0 };
    let src = filled_guest_args(a, a.memory, ws, a.dirty_rate, 200, channels);
    let r = run_pair(&[format!("--memory={}", a.memory)], &src, |_| {})?;
    let row = Row {
        channels,
        dirty,
        figures: Figures::of(&r.source.report),
        dest_drain_ms: r.dest.report.drain_ms,
        raw_tcp_bytes_per_s: 0.0,
        ratio_to_raw: 0.0,
        raw_memory_bytes_per_s: 0.0,
        ratio_to_raw_memory: 0.0,
        report_dir: None,
    };
    Ok(Run::new(row, r))
}

fn table(rows: &[Row], raw: f64, raw_mem: f64, how: &str) -> String {
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
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.1} | {} | {:.0} | {:.2} | {:.2} |\n",
            r.channels,
            load(r.dirty),
            r.figures.total_ms,
            r.figures.downtime_ms,
            r.figures.rounds,
            r.figures.bytes_per_s / 1e6,
            r.ratio_to_raw,
            r.ratio_to_raw_memory,
        ));
    }
    s.push_str(&format!("\nHow: {how}\n"));
    s
}
