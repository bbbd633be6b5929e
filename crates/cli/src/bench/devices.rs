//! `livemig bench --mode devices`: downtime with 1, 2, 4 and 8 VFIO-like devices, device
//! state on the data channels with credit (parallel) against each device in turn on the main
//! channel (serial, as before multifd device state), beside the ideal for the same run.

use super::{BenchArgs, Run};
use crate::pair::run_pair;
use serde_json::{json, Value};

/// One row: `devices` VFIO-like devices in `mode` ("parallel" or "serial").
pub fn row(a: &BenchArgs, devices: usize, parallel: bool, raw: f64) -> anyhow::Result<Run> {
    let mut src = vec![
        format!("--memory={}", a.device_guest_memory),
        format!("--guest={}", a.guest.name()),
        "--fill=1".into(),
        format!(
            "--working-set={}",
            a.working_set.min(a.device_guest_memory / 4)
        ),
        format!("--dirty-rate={}", a.dirty_rate),
        "--warmup-ms=200".into(),
        format!("--channels={}", a.device_channels),
        format!(
            "--device-state-transfer={}",
            if parallel { "multifd" } else { "main" }
        ),
    ];
    for _ in 0..devices {
        src.push(format!(
            "--device=vfio-sim,size={},rate={}",
            a.device_size, a.device_rate
        ));
    }
    let dest = vec![format!("--memory={}", a.device_guest_memory)];
    let r = run_pair(&dest, &src, |_| {})?;
    let rep = &r.source["report"];
    let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let last_round_bytes = rep["rounds"]
        .as_array()
        .and_then(|r| r.last())
        .map_or(0.0, |r| f(r, "bytes"));
    // The ideal: the slowest device's read time or all device bytes over the raw link,
    // whichever is larger, plus the RAM remainder over the raw link.
    let read_s = a.device_size as f64 / a.device_rate as f64;
    let wire_s = (devices as u64 * a.device_size) as f64 / raw;
    let ideal_ms = 1e3 * (read_s.max(wire_s) + last_round_bytes / raw);
    let peak = rep["devices"].as_array().map_or(0, |d| {
        d.iter()
            .filter_map(|x| x["peak_buffered_bytes"].as_u64())
            .max()
            .unwrap_or(0)
    });
    let peak_sum: u64 = rep["devices"].as_array().map_or(0, |d| {
        d.iter()
            .filter_map(|x| x["peak_buffered_bytes"].as_u64())
            .sum()
    });
    let window = rep["credit_window"].as_u64().unwrap_or(0);
    let chunk = 1u64 << 20;
    let row = json!({
        "devices": devices,
        "mode": if parallel { "parallel" } else { "serial" },
        "downtime_ms": f(rep, "downtime_ms"),
        "ideal_downtime_ms": ideal_ms,
        "device_save_ms": f(&rep["downtime"], "device_save_ms"),
        "total_ms": f(rep, "total_ms"),
        "peak_buffered_bytes": peak,
        "peak_buffered_bytes_all_devices": peak_sum,
        "per_device_cap_bytes": window * chunk,
        "buffer_cap_bytes": rep["buffer_cap_bytes"],
        "cap_held": peak <= window * chunk && peak_sum <= rep["buffer_cap_bytes"].as_u64().unwrap_or(0),
    });
    Ok(Run {
        row,
        source: r.source,
        dest: r.dest,
    })
}

/// The Markdown table of the device rows.
pub fn table(rows: &[Value], raw: f64, how: &str) -> String {
    let mut s = format!("Raw loopback TCP (same run): {:.0} MB/s\n\n", raw / 1e6);
    s.push_str("| devices | mode | downtime ms | ideal ms | parallel / serial | peak buffered per device | per-device cap | cap held |\n");
    s.push_str("|---:|---|---:|---:|---:|---:|---:|---|\n");
    for r in rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        let serial = rows
            .iter()
            .find(|x| x["devices"] == r["devices"] && x["mode"] == "serial")
            .and_then(|x| x["downtime_ms"].as_f64());
        let ratio = match (r["mode"].as_str(), serial) {
            (Some("parallel"), Some(sv)) if sv > 0.0 => format!("{:.2}", f("downtime_ms") / sv),
            _ => "".into(),
        };
        s.push_str(&format!(
            "| {} | {} | {:.0} | {:.0} | {} | {:.1} MiB | {:.1} MiB | {} |\n",
            r["devices"],
            r["mode"].as_str().unwrap_or(""),
            f("downtime_ms"),
            f("ideal_downtime_ms"),
            ratio,
            f("peak_buffered_bytes") / (1u64 << 20) as f64,
            f("per_device_cap_bytes") / (1u64 << 20) as f64,
            if r["cap_held"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "NO"
            },
        ));
    }
    s.push_str(&format!("\nHow: {how}\n"));
    s
}
