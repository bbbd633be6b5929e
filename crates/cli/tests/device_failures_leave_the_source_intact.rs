//! A device that fails during a migration: its save returns an error, its save job panics,
//! or its twin on the destination refuses a chunk. Each time the migration fails cleanly with
//! an error naming the device, and the source guest runs on with every page exact and every
//! device still holding its whole state; where the fault was the source's (fired once), a
//! second attempt to another destination completes.

mod common;
use common::*;
use serde_json::Value;

/// The vfio-sim devices of these tests: vfio0 healthy with precopy data, vfio1 with `hook`.
fn source_args<'a>(to: &'a [String], vfio1: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "migrate",
        "--json",
        "--guest=synthetic",
        "--memory=64M",
        "--working-set=8M",
        "--warmup-ms=50",
        "--device=vfio-sim,size=32M,rate=200M,precopy=4M",
        vfio1,
        "--device=vmstate-sim",
    ];
    args.extend(to.iter().map(String::as_str));
    args
}

fn check_clean_failure(failed: &Value, words: &[&str]) {
    let err = failed["error"].as_str().unwrap();
    for w in words {
        assert!(err.contains(w), "error '{err}' should mention '{w}'");
    }
    let v = &failed["source_verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), 16384, "{failed:#}");
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{failed:#}");
    assert!(
        u64_at(failed, &["counter"]) > 0,
        "the guest ran: {failed:#}"
    );
    assert_eq!(failed["devices_intact"], Value::Bool(true), "{failed:#}");
    assert!(failed["devices_error"].is_null(), "{failed:#}");
}

/// vfio1 fails once on the first destination; the second one receives the VM.
fn fails_then_completes(vfio1: &str, words: &[&str]) {
    let (mut dest1, addr1) = Proc::incoming(&[]);
    let (mut dest2, addr2) = Proc::incoming(&["--verify"]);
    let to = vec![format!("--to={addr1}"), format!("--to={addr2}")];
    let mut src = Proc::spawn(&source_args(&to, vfio1));

    let failed = src.expect_event("attempt_failed");
    assert_eq!(failed["to"].as_str(), Some(addr1.as_str()));
    check_clean_failure(&failed, words);
    // The first destination learns why and gives up without resuming anything.
    let why = dest1.expect_event("failed");
    assert!(
        why["error"].as_str().unwrap().contains("vfio1"),
        "the destination hears which device failed: {why:#}"
    );
    assert!(!dest1.wait_exit().success());

    let done = src.expect_event("completed");
    assert_eq!(done["to"].as_str(), Some(addr2.as_str()));
    let devices = done["report"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    for d in devices {
        assert!(u64_at(d, &["bytes"]) > 32 << 20, "{d:#}");
    }
    assert!(src.wait_exit().success());
    let recv = dest2.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(dest2.wait_exit().success());
}

#[test]
fn a_failing_save_fails_the_attempt_and_the_retry_completes() {
    fails_then_completes(
        "--device=vfio-sim,size=32M,rate=200M,fail_save_at=5M",
        &["vfio1", "save_final", "injected failure"],
    );
}

#[test]
fn a_panicking_save_job_fails_the_attempt_and_the_retry_completes() {
    fails_then_completes(
        "--device=vfio-sim,size=32M,rate=200M,panic_save_at=5M",
        &["vfio1", "panicked", "injected panic"],
    );
}

#[test]
fn a_failing_load_on_the_destination_fails_cleanly() {
    // The hook travels in the device's descriptor, so every destination would fail the same
    // way: one destination only.
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let to = vec![format!("--to={addr}")];
    let mut src = Proc::spawn(&source_args(
        &to,
        "--device=vfio-sim,size=32M,rate=200M,fail_load_at=5M",
    ));
    let failed = src.expect_event("attempt_failed");
    check_clean_failure(&failed, &["vfio1", "load failed", "injected load failure"]);
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    let why = dest.expect_event("failed");
    assert!(why["error"].as_str().unwrap().contains("vfio1"), "{why:#}");
    assert!(!dest.wait_exit().success());
    assert!(
        !dest.seen.iter().any(|v| v["event"] == "received"),
        "the destination must not resume a guest whose device failed: {:#?}",
        dest.seen
    );
}
