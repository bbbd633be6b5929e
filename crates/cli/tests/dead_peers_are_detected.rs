//! A peer that stops without closing its sockets (SIGSTOP: alive to the kernel, silent to
//! livemig) is found within the configured peer timeout, in precopy and in switchover, on
//! either side: the source guest runs on exact, the destination never resumes a partial
//! guest, and the error says the peer went quiet.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn signal(p: &Proc, sig: libc::c_int) {
    // SAFETY: sends a signal to a child process this test started and has not reaped.
    let r = unsafe { libc::kill(p.child.id() as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({sig})");
}

/// A source guest of 128 MiB sent at 40 MB/s: round 0 takes about 3 s.
fn slow_source(to: &str, extra: &[&str]) -> Proc {
    synthetic_source(
        to,
        &[
            "--memory=128M",
            "--working-set=8M",
            "--dirty-rate=20k",
            "--warmup-ms=50",
            "--peer-timeout-ms=1000",
        ],
        extra,
    )
}

fn assert_source_intact(failed: &serde_json::Value) {
    assert_eq!(u64_at(&failed["source_verify"], &["pages_checked"]), 32768);
    assert_eq!(
        u64_at(&failed["source_verify"], &["pages_mismatched"]),
        0,
        "{failed:#}"
    );
    assert_eq!(failed["devices_intact"], true, "{failed:#}");
}

#[test]
fn a_stopped_destination_fails_the_precopy_within_the_peer_timeout() {
    let (mut dest, addr) = Proc::incoming(&[]);
    let mut src = slow_source(&addr, &["--max-bandwidth=40M"]);
    src.expect_event("round_started");
    std::thread::sleep(Duration::from_millis(300));
    signal(&dest, libc::SIGSTOP);
    let stopped = Instant::now();
    let failed = src.expect_event("attempt_failed");
    let waited = stopped.elapsed();
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("peer timeout"), "the error says why: {err}");
    assert!(
        waited < Duration::from_secs(20),
        "found within a bound, not a hang: {waited:?}"
    );
    assert_source_intact(&failed);
    src.expect_event("failed");
    signal(&dest, libc::SIGCONT);
    let _ = dest.child.kill();
    dest.wait_exit();
}

#[test]
fn a_stopped_destination_in_switchover_gives_the_guest_back() {
    let (mut dest, addr) = Proc::incoming(&[]);
    // The device's final state takes ~2 s to read: the guest stays paused that long.
    // The limit is above that, which the switchover counts: it switches over at once.
    let mut src = slow_source(
        &addr,
        &[
            "--device=vfio-sim,size=16M,rate=8M",
            "--downtime-limit-ms=10000",
        ],
    );
    src.expect_event("switchover");
    signal(&dest, libc::SIGSTOP);
    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap();
    assert!(
        err.contains("peer timeout") || err.contains("no progress"),
        "the error says why: {err}"
    );
    assert_source_intact(&failed);
    signal(&dest, libc::SIGCONT);
    let _ = dest.child.kill();
    dest.wait_exit();
}

#[test]
fn a_stopped_source_fails_the_destination_without_resuming_anything() {
    let (mut dest, addr) = Proc::incoming(&["--peer-timeout-ms=1000"]);
    let mut src = slow_source(&addr, &["--max-bandwidth=40M"]);
    src.expect_event("round_started");
    std::thread::sleep(Duration::from_millis(300));
    signal(&src, libc::SIGSTOP);
    let stopped = Instant::now();
    let outcome = dest
        .wait_for(&["failed", "received"])
        .expect("the destination reports");
    assert_eq!(
        outcome["event"], "failed",
        "never a partial guest: {outcome}"
    );
    let err = outcome["error"].as_str().unwrap();
    assert!(
        err.contains("peer timeout") || err.contains("no progress"),
        "the error says why: {err}"
    );
    assert!(stopped.elapsed() < Duration::from_secs(20));
    assert!(!dest.wait_exit().success());
    signal(&src, libc::SIGCONT);
    let _ = src.child.kill();
    src.wait_exit();
}
