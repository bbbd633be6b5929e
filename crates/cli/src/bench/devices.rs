//! `livemig bench --mode devices`: downtime with 1, 2, 4 and 8 VFIO-like devices, device
//! state on the data channels with credit (parallel) against each device in turn on the main
//! channel (serial, as before multifd device state), beside the ideal for the same run.

use super::args::BenchArgs;
use super::raw_tcp;
use super::run::{report_run, Measured, Run};
use crate::pair::run_pair;
use serde::Serialize;
use serde_json::json;
use std::process::ExitCode;

/// One row: a number of devices, parallel or serial.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeviceRow {
    pub devices: usize,
    /// "parallel", "serial", or in the suite "none" for the row without devices.
    pub mode: &'static str,
    pub downtime_ms: f64,
    /// The downtime limit the migration ran with, ms.
    pub limit_ms: u64,
    /// What the source expected when it paused the guest (RAM and devices), ms.
    pub expected_downtime_ms: f64,
    /// The switchover came from the round bound, not from fitting the limit.
    pub forced: bool,
    pub ideal_downtime_ms: f64,
    pub device_save_ms: f64,
    pub total_ms: f64,
    pub peak_buffered_bytes: u64,
    pub peak_buffered_bytes_all_devices: u64,
    pub per_device_cap_bytes: u64,
    pub buffer_cap_bytes: u64,
    pub cap_held: bool,
}

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let (raw, raw_how) = raw_tcp::measure(1 << 30)?;
    let mut rows = Vec::new();
    let counts = a.device_counts.as_deref().unwrap_or(&[1, 2, 4, 8]);
    let limit = a.device_downtime_limit_ms;
    let extra = counts.iter().max().map(|&n| (n, true));
    let plan = counts
        .iter()
        .flat_map(|&n| [(n, true, limit), (n, false, limit)])
        .chain(
            extra
                .into_iter()
                .flat_map(|(n, p)| a.device_extra_limits_ms.iter().map(move |&l| (n, p, l))),
        );
    for (n, parallel, limit) in plan {
        let mut run = row(a, n, parallel, raw, limit)?;
        let name = row_name(n, parallel, limit, a.device_downtime_limit_ms);
        report_run(a, &name, &mut run)?;
        if !a.json {
            eprintln!("bench: {name}: {}", say(&run.row));
        }
        rows.push(Measured::from(run));
    }
    let how = format!(
        "livemig bench --mode devices: a {} MiB {} guest dirtying {} MiB at {} pages/s, {} data channels, \
         devices of {} MiB read at {} MB/s (vfio-sim), 1 MiB chunks, default credit (2 x channels); \
         parallel = chunks on the data channels with credit, serial = each device in turn on the main \
         channel. Ideal = max(one device's read time, all device bytes / raw TCP) + the last RAM \
         round / raw TCP. Expected = what the source expected when it paused the guest (RAM \
         and devices); forced = the devices did not fit the limit and the round bound forced \
         the switchover. Raw = {raw_how}.",
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
        let rows: Vec<&DeviceRow> = rows.iter().map(|r| &r.row).collect();
        println!("{}", table(&rows, raw, &how));
    }
    Ok(ExitCode::SUCCESS)
}

/// "downtime .. ms, expected .. ms", for the line on stderr.
pub(crate) fn say(r: &DeviceRow) -> String {
    format!(
        "downtime {:.0} ms, expected {:.0} ms (limit {} ms{})",
        r.downtime_ms,
        r.expected_downtime_ms,
        r.limit_ms,
        if r.forced { ", forced" } else { "" }
    )
}

/// A row's name: `devices-4-parallel`, and `-limit1000` when its limit is not the
/// default's.
pub(crate) fn row_name(devices: usize, parallel: bool, limit: u64, default: u64) -> String {
    let mode = if parallel { "parallel" } else { "serial" };
    match limit == default {
        true => format!("devices-{devices}-{mode}"),
        false => format!("devices-{devices}-{mode}-limit{limit}"),
    }
}

/// One row: `devices` VFIO-like devices, parallel or serial, at a downtime limit of
/// `limit_ms`.
pub(crate) fn row(
    a: &BenchArgs,
    devices: usize,
    parallel: bool,
    raw: f64,
    limit_ms: u64,
) -> anyhow::Result<Run<DeviceRow>> {
    let mut src = super::run::filled_guest_args(
        a,
        a.device_guest_memory,
        a.working_set.min(a.device_guest_memory / 4),
        a.dirty_rate,
        200,
        a.device_channels,
    );
    src.push(format!(
        "--device-state-transfer={}",
        if parallel { "multifd" } else { "main" }
    ));
    src.push(format!("--downtime-limit-ms={limit_ms}"));
    for _ in 0..devices {
        src.push(format!(
            "--device=vfio-sim,size={},rate={}",
            a.device_size, a.device_rate
        ));
    }
    let dest = vec![format!("--memory={}", a.device_guest_memory)];
    let r = run_pair(&dest, &src, |_| {})?;
    let rep = &r.source.report;
    let last_round_bytes = rep.rounds.last().map_or(0.0, |r| r.bytes as f64);
    // The ideal: the slowest device's read time or all device bytes over the raw link,
    // whichever is larger, plus the RAM remainder over the raw link.
    let read_s = a.device_size as f64 / a.device_rate as f64;
    let wire_s = (devices as u64 * a.device_size) as f64 / raw;
    let ideal_ms = 1e3 * (read_s.max(wire_s) + last_round_bytes / raw);
    let peaks = rep.devices.iter().map(|d| d.peak_buffered_bytes);
    let peak = peaks.clone().max().unwrap_or(0);
    let peak_sum: u64 = peaks.sum();
    let window = rep.credit_window as u64;
    let chunk = 1u64 << 20;
    let row = DeviceRow {
        devices,
        mode: if parallel { "parallel" } else { "serial" },
        downtime_ms: rep.downtime_ms,
        limit_ms,
        expected_downtime_ms: rep.expected_downtime_ms,
        forced: rep.forced_switchover,
        ideal_downtime_ms: ideal_ms,
        device_save_ms: rep.downtime.device_save_ms,
        total_ms: rep.total_ms,
        peak_buffered_bytes: peak,
        peak_buffered_bytes_all_devices: peak_sum,
        per_device_cap_bytes: window * chunk,
        buffer_cap_bytes: rep.buffer_cap_bytes,
        cap_held: peak <= window * chunk && peak_sum <= rep.buffer_cap_bytes,
    };
    Ok(Run::new(row, r))
}

/// The Markdown table of the device rows.
pub(crate) fn table(rows: &[&DeviceRow], raw: f64, how: &str) -> String {
    let mut s = format!("Raw loopback TCP (same run): {:.0} MB/s\n\n", raw / 1e6);
    s.push_str("| devices | mode | limit ms | downtime ms | expected ms | expected / actual | ideal ms | parallel / serial | peak buffered per device | per-device cap | cap held |\n");
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        let serial = rows
            .iter()
            .find(|x| x.devices == r.devices && x.mode == "serial" && x.limit_ms == r.limit_ms)
            .map(|x| x.downtime_ms);
        let ratio = match (r.mode, serial) {
            ("parallel", Some(sv)) if sv > 0.0 => format!("{:.2}", r.downtime_ms / sv),
            _ => "".into(),
        };
        let accuracy = match r.downtime_ms > 0.0 {
            true => format!("{:.2}", r.expected_downtime_ms / r.downtime_ms),
            false => String::new(),
        };
        s.push_str(&format!(
            "| {} | {} | {}{} | {:.0} | {:.0} | {} | {:.0} | {} | {:.1} MiB | {:.1} MiB | {} |\n",
            r.devices,
            r.mode,
            r.limit_ms,
            if r.forced { " (forced)" } else { "" },
            r.downtime_ms,
            r.expected_downtime_ms,
            accuracy,
            r.ideal_downtime_ms,
            ratio,
            r.peak_buffered_bytes as f64 / (1u64 << 20) as f64,
            r.per_device_cap_bytes as f64 / (1u64 << 20) as f64,
            if r.cap_held { "yes" } else { "NO" },
        ));
    }
    s.push_str(&format!("\nHow: {how}\n"));
    s
}
