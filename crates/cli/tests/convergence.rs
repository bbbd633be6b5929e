//! A guest that dirties faster than the link can carry: with auto-converge its vCPUs are
//! throttled step by step until the rounds shrink and it migrates; without, the policy says
//! what happens at the bound: `cancel` fails cleanly with the guest intact, never a loop.

mod common;
use common::*;

/// 128 MiB synthetic guest dirtying 32 MiB at 100k pages/s over a 100 MB/s link: ~24k
/// pages/s would be the most the link can outrun.
fn fast_dirtier(addr: &str, extra: &[&str]) -> Proc {
    synthetic_source(
        addr,
        &[
            "--memory=128M",
            "--working-set=32M",
            "--dirty-rate=100k",
            "--warmup-ms=50",
            "--max-bandwidth=100M",
            "--downtime-limit-ms=100",
            "--on-no-convergence=cancel",
        ],
        extra,
    )
}

#[test]
fn auto_converge_throttles_until_the_rounds_shrink() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let mut src = fast_dirtier(&addr, &["--max-rounds=40", "--max-precopy-secs=60"]);
    let done = src.expect_event("completed");
    let rounds = done["report"]["rounds"].as_array().unwrap();
    let throttles: Vec<u64> = rounds
        .iter()
        .map(|r| r["throttle_percent"].as_u64().unwrap())
        .collect();
    assert_eq!(throttles[0], 0, "no throttle before the rounds stall");
    assert!(
        throttles.windows(2).all(|w| w[1] >= w[0]),
        "the throttle only rises: {throttles:?}"
    );
    let top = *throttles.last().unwrap();
    assert!(top >= 20, "throttled to converge: {throttles:?}");
    assert_eq!(done["report"]["forced_switchover"], false, "converged");
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());
    assert!(dest.wait_exit().success());
}

#[test]
fn without_auto_converge_the_cancel_policy_fails_cleanly_at_the_bound() {
    let (mut dest, addr) = Proc::incoming(&[]);
    let mut src = fast_dirtier(&addr, &["--auto-converge=false", "--max-rounds=4"]);
    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("did not converge"), "{err}");
    assert!(err.contains("after 4 rounds"), "{err}");
    assert_eq!(
        u64_at(&failed["source_verify"], &["pages_mismatched"]),
        0,
        "{failed:#}"
    );
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    let out = dest.wait_for(&["failed", "received"]).unwrap();
    assert_eq!(out["event"], "failed", "the destination resumes nothing");
    dest.wait_exit();
}
