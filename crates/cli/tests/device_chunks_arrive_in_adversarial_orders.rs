//! Device chunks arriving in adversarial orders, between two real `livemig` processes.
//!
//! The vfio-sim twin on the destination checks every byte against its pattern at its offset
//! and every section's digest, and fails on the first byte out of place: a migration that
//! completes proves each device's stream was loaded whole and strictly in order, whatever
//! order the chunks arrived in. On top of that, the measured high-water mark of every
//! device's reorder buffer must stay within its credit window (`window x chunk size`), and
//! the marks of all devices together within the session's buffer cap.

mod common;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Runs one migration of a 64 MiB synthetic guest with `devices` (vfio-sim specs) and a
/// vmstate-sim, plus `extra` migrate options; returns the source's report and the
/// destination's report after checking both ended well.
fn migrate(devices: &[&str], extra: &[&str], hooks: &str) -> (Value, Value) {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let options = [
        "--memory=64M",
        "--working-set=8M",
        "--warmup-ms=50",
        "--device=vmstate-sim",
    ];
    let specs: Vec<String> = devices.iter().map(|d| format!("--device={d}")).collect();
    let options = [&options[..], &strs(&specs)].concat();
    let mut src = synthetic_source_hooked(&addr, &options, extra, hooks);
    let done = src
        .wait_for(&["completed"])
        .unwrap_or_else(|e| panic!("migration did not complete ({e}): {:#?}", src.seen));
    assert!(src.wait_exit().success());
    let received = dest.expect_event("received");
    assert!(dest.wait_exit().success());
    let report = done["report"].clone();
    assert_eq!(u64_at(&report, &["pages_mismatched"]), 0, "{report:#}");
    let recv = received["report"].clone();
    assert_eq!(
        u64_at(&recv["verify"], &["pages_mismatched"]),
        0,
        "{recv:#}"
    );
    (report, recv)
}

/// Checks the buffering bounds of a completed migration; returns every device's peak.
fn check_bounds(report: &Value, recv: &Value, devices: &[&str], chunk: u64) -> Vec<u64> {
    let window = u64_at(report, &["credit_window"]);
    let cap = u64_at(report, &["buffer_cap_bytes"]);
    assert!(window >= 1, "{report:#}");
    let devs = report["devices"].as_array().expect("devices in the report");
    assert_eq!(devs.len(), devices.len(), "{report:#}");
    let mut peaks = Vec::new();
    for (d, spec) in devs.iter().zip(devices) {
        let name = d["name"].as_str().unwrap();
        let peak = u64_at(d, &["peak_buffered_bytes"]);
        assert!(peak > 0, "{name}: nothing was ever buffered? {d:#}");
        assert!(
            peak <= window * chunk,
            "{name}: peak {peak} bytes exceeds its window of {window} x {chunk}"
        );
        // Every byte of the device's stream reached the device: at least its final state.
        let size = if spec.contains("size=16M") {
            16 * MIB
        } else {
            32 * MIB
        };
        assert!(u64_at(d, &["bytes"]) > size, "{name}: {d:#}");
        peaks.push(peak);
    }
    let sum: u64 = peaks.iter().sum();
    assert!(
        sum <= cap,
        "peaks {peaks:?} add up to {sum} bytes, over the buffer cap of {cap}"
    );
    // The destination measured the same marks it reported to the source.
    let dest_peaks: Vec<u64> = recv["device_peak_buffered_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(dest_peaks, peaks);
    peaks
}

#[test]
fn reversed_windows_load_in_order_within_a_tight_cap() {
    let devices = [
        "vfio-sim,size=32M,rate=200M,precopy=4M",
        "vfio-sim,size=32M,rate=200M",
        "vfio-sim,size=32M,rate=200M,precopy=2M,seed=3",
        "vfio-sim,size=16M,rate=200M,seed=4",
    ];
    // A cap of 8 MiB over 4 devices of 1 MiB chunks leaves each a window of 2 (the source
    // asks for 3, the cap lowers it).
    let (report, recv) = migrate(
        &devices,
        &["--chunk-size=1M", "--credit-window=3", "--buffer-cap=8M"],
        "chunk-order=reverse",
    );
    assert_eq!(u64_at(&report, &["buffer_cap_bytes"]), 8 * MIB);
    assert_eq!(u64_at(&report, &["credit_window"]), 2);
    let peaks = check_bounds(&report, &recv, &devices, MIB);
    // Reversed, the chunk a loader needs is sent last: its whole window is buffered first.
    for (i, p) in peaks.iter().enumerate() {
        assert!(
            *p > MIB,
            "vfio{i}: peak {p} bytes is one chunk at most, the reorder buffer was never used"
        );
    }
}

#[test]
fn reversed_default_windows_fill_and_never_overflow() {
    let devices = [
        "vfio-sim,size=32M,rate=200M,precopy=4M",
        "vfio-sim,size=32M,rate=200M",
    ];
    // Defaults: window 2 x 4 channels = 8 chunks per device, within the destination's own
    // cap of 256 MiB (which holds every full window).
    let (report, recv) = migrate(&devices, &[], "chunk-order=reverse");
    assert_eq!(u64_at(&report, &["credit_window"]), 8);
    assert_eq!(u64_at(&report, &["buffer_cap_bytes"]), 256 * MIB);
    let peaks = check_bounds(&report, &recv, &devices, MIB);
    for (i, p) in peaks.iter().enumerate() {
        assert!(
            *p > MIB,
            "vfio{i}: peak {p}, the reorder buffer was never used"
        );
    }
}

#[test]
fn a_delayed_channel_is_overtaken_and_order_holds() {
    let devices = [
        "vfio-sim,size=32M,rate=200M,precopy=4M",
        "vfio-sim,size=32M,rate=200M",
        "vfio-sim,size=16M,rate=200M,seed=9",
    ];
    // Small chunks, so channel 0's 5 ms delay per chunk is overtaken many times.
    let (report, recv) = migrate(
        &devices,
        &["--chunk-size=256K", "--credit-window=6"],
        "chunk-order=delay-channel",
    );
    assert_eq!(u64_at(&report, &["credit_window"]), 6);
    check_bounds(&report, &recv, &devices, 256 << 10);
}

#[test]
fn natural_order_on_two_channels() {
    let devices = [
        "vfio-sim,size=32M,rate=200M,precopy=4M",
        "vfio-sim,size=32M,rate=200M",
    ];
    let (report, recv) = migrate(&devices, &["--channels=2"], "chunk-order=natural");
    assert_eq!(u64_at(&report, &["credit_window"]), 4);
    check_bounds(&report, &recv, &devices, MIB);
}

#[test]
fn serial_baseline_on_the_main_channel_completes() {
    let devices = [
        "vfio-sim,size=32M,rate=200M,precopy=4M",
        "vfio-sim,size=16M,rate=200M",
    ];
    let (report, recv) = migrate(&devices, &["--device-state-transfer=main"], "");
    assert_eq!(report["device_transfer"].as_str(), Some("main"));
    check_bounds(&report, &recv, &devices, MIB);
}
