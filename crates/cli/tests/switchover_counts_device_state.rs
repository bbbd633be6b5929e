//! The switchover counts device state: four vfio-sim devices whose final state alone takes
//! longer to read than the downtime limit keep the guest running (and, with
//! `--on-no-convergence=cancel`, end the migration cleanly at the bound); a limit they fit
//! lets the migration complete, and the expected downtime says what the devices add. Over
//! QMP, raising `downtime-limit` while the migration waits on its devices lets it complete;
//! other parameters stay refused mid-migration.
//!
//! No wall-clock threshold: each device's read rate is declared (16 MiB at 32 MiB/s: 500 ms
//! whatever the host), so whether the devices fit a limit of 300 ms, or of 60 s, does not
//! depend on the host's speed. The bench measures how close the estimate comes to the
//! downtime that follows.

mod common;
use common::*;
use livemig_qmp::{Client, ClientError};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Four devices of 16 MiB read at 32 MiB/s: 500 ms each, in parallel.
const DEVICES: [&str; 4] = ["--device=vfio-sim,size=16M,rate=32M"; 4];
/// The slowest device's read, milliseconds (its final section: 16 MiB and 28 bytes).
const READ_MS: f64 = 500.0;

fn source(addr: &str, extra: &[&str]) -> Proc {
    let mut options = vec!["--memory=64M", "--dirty-rate=1000", "--warmup-ms=20"];
    options.extend(DEVICES);
    synthetic_source(addr, &options, extra)
}

/// The events up to (and with) the first of `last`.
fn events_until(p: &mut Proc, last: &[&str]) -> Vec<Value> {
    let from = p.seen.len();
    p.wait_for(last)
        .unwrap_or_else(|e| panic!("waiting for {last:?}: {e}; seen {:#?}", p.seen));
    p.seen[from..].to_vec()
}

#[test]
fn devices_that_cannot_fit_the_limit_cancel_cleanly_with_the_guest_intact() {
    let (mut dest, addr) = Proc::incoming(&[]);
    let mut src = source(
        &addr,
        &[
            "--downtime-limit-ms=300",
            "--on-no-convergence=cancel",
            "--max-rounds=4",
        ],
    );
    let seen = events_until(&mut src, &["attempt_failed"]);
    let rounds: Vec<&Value> = seen.iter().filter(|e| e["event"] == "round_done").collect();
    assert_eq!(
        rounds.len(),
        4,
        "every round counted the devices: {seen:#?}"
    );
    for r in &rounds {
        let expected = r["expected_downtime_ms"].as_f64().unwrap();
        let read = r["device_read_ms"].as_f64().unwrap();
        assert!(read >= READ_MS, "the devices' read time is theirs: {r:#}");
        assert!(expected >= read, "the estimate counts the devices: {r:#}");
        assert_eq!(u64_at(r, &["device_final_bytes"]), 4 * ((16 << 20) + 28));
        assert_eq!(r["downtime_limit_ms"], 300.0);
    }
    assert!(
        !seen.iter().any(|e| e["event"] == "switchover"),
        "the guest was never paused: {seen:#?}"
    );
    let failed = seen.last().unwrap();
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("did not converge"), "{err}");
    assert!(err.contains("device state"), "{err}");
    assert_eq!(u64_at(&failed["source_verify"], &["pages_mismatched"]), 0);
    assert_eq!(failed["devices_intact"], true, "{failed:#}");
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    let out = dest.wait_for(&["failed", "received"]).unwrap();
    assert_eq!(out["event"], "failed", "the destination resumes nothing");
    dest.wait_exit();
}

#[test]
fn a_limit_the_devices_fit_completes_and_the_report_says_what_was_expected() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let mut src = source(
        &addr,
        &["--downtime-limit-ms=60000", "--on-no-convergence=cancel"],
    );
    let done = src.expect_event("completed");
    let report = &done["report"];
    assert_eq!(report["forced_switchover"], false, "converged: {report:#}");
    let expected = report["expected_downtime_ms"].as_f64().unwrap();
    assert!(
        expected >= READ_MS,
        "the devices are in the estimate: {expected}"
    );
    let last_precopy = &report["rounds"].as_array().unwrap();
    let decided = &last_precopy[last_precopy.len() - 2];
    assert_eq!(decided["expected_downtime_ms"].as_f64().unwrap(), expected);
    assert_eq!(report["devices"].as_array().unwrap().len(), 4);
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());
    assert!(dest.wait_exit().success());
}

#[test]
fn the_available_switchover_bandwidth_stands_for_the_measured_rate() {
    let (mut dest, addr) = Proc::incoming(&[]);
    // Devices read as fast as they are taken: only the bandwidth bounds them, and at the
    // 1 MiB/s the switchover is told it has, 64 MiB take a minute.
    let options = [
        "--memory=64M",
        "--device=vfio-sim,size=16M",
        "--device=vfio-sim,size=16M",
        "--device=vfio-sim,size=16M",
        "--device=vfio-sim,size=16M",
        "--avail-switchover-bandwidth=1M",
        "--downtime-limit-ms=1000",
        "--on-no-convergence=cancel",
        "--max-rounds=2",
    ];
    let mut src = synthetic_source(&addr, &options, &[]);
    let seen = events_until(&mut src, &["attempt_failed"]);
    let round = seen.iter().find(|e| e["event"] == "round_done").unwrap();
    assert_eq!(round["device_read_ms"], 0.0, "unpaced devices: {round:#}");
    assert_eq!(
        round["channel_bytes_per_s"],
        (1u64 << 20) as f64,
        "{round:#}"
    );
    assert!(
        round["expected_downtime_ms"].as_f64().unwrap() >= 64e3,
        "{round:#}"
    );
    let failed = seen.last().unwrap();
    assert!(failed["error"]
        .as_str()
        .unwrap()
        .contains("did not converge"));
    assert_eq!(failed["devices_intact"], true, "{failed:#}");
    src.expect_event("failed");
    let _ = dest.wait_for(&["failed", "received"]);
}

fn connect(path: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(path, Duration::from_secs(30)) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("QMP on {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `query-migrate` until its expected downtime is above `limit` (the devices hold the
/// migration), at most the test timeout.
fn wait_device_bound(src: &mut Client, limit: u64) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let q = src.execute("query-migrate", json!({})).unwrap();
        let status = q["status"].as_str().unwrap();
        assert!(
            matches!(status, "setup" | "active"),
            "still waiting on the devices: {q:#}"
        );
        if q["expected-downtime"].as_u64().is_some_and(|e| e > limit) {
            return q;
        }
        assert!(Instant::now() < deadline, "never device-bound: {q:#}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn raising_downtime_limit_over_qmp_mid_migration_lets_it_complete() {
    let d = dir("live-limit");
    let (src_sock, dst_sock) = (d.join("src.qmp"), d.join("dst.qmp"));
    let mig = format!("unix:{}", d.join("mig").display());
    let mut args = vec!["run", "--guest=synthetic", "--memory=64M", "--qmp"];
    args.push(src_sock.to_str().unwrap());
    args.extend(DEVICES);
    let _src = Proc::spawn(&args);
    let listen = ["incoming", "--verify", "--listen", &mig, "--qmp"];
    let _dst = Proc::spawn(&[&listen[..], &[dst_sock.to_str().unwrap()]].concat());
    let (mut src, mut dst) = (connect(&src_sock), connect(&dst_sock));
    src.execute("migrate-set-parameters", json!({"downtime-limit": 300}))
        .unwrap();
    src.execute("migrate", json!({ "uri": mig })).unwrap();
    let q = wait_device_bound(&mut src, 300);
    let parts = &q["x-expected-downtime-parts"];
    assert!(
        parts["device-read-ms"].as_u64().unwrap() >= READ_MS as u64,
        "{q:#}"
    );
    assert_eq!(parts["downtime-limit"], 300);
    // Only the live parameters are taken now, with QEMU's refusal for the rest.
    match src.execute("migrate-set-parameters", json!({"multifd-channels": 2})) {
        Err(ClientError::Command(e)) => {
            assert_eq!(e.desc, "There's a migration process in progress")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    src.execute("migrate-set-parameters", json!({"downtime-limit": 60000}))
        .unwrap();
    let p = src.execute("query-migrate-parameters", json!({})).unwrap();
    assert_eq!(p["downtime-limit"], 60000);
    let done = loop {
        let q = src.execute("query-migrate", json!({})).unwrap();
        match q["status"].as_str().unwrap() {
            "completed" => break q,
            "active" | "setup" => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("the migration ended {other}: {q:#}"),
        }
    };
    assert_eq!(
        done["x-forced-switchover"], false,
        "the new limit let it converge"
    );
    assert!(done["x-expected-downtime"].as_u64().unwrap() >= READ_MS as u64);
    let v = dst.execute("x-livemig-verify", json!({})).unwrap();
    assert_eq!(v["pages-mismatched"], 0, "{v}");
    for c in [&mut src, &mut dst] {
        c.execute("quit", json!({})).unwrap();
    }
    let _ = std::fs::remove_dir_all(&d);
}
