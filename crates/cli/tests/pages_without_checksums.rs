//! `--page-checksums=false`: pages travel without their CRC32C (the source trusts the
//! transport, as QEMU does). Under heavy dirtying, where pages do tear on the way, every
//! page must still arrive exact: a torn page is dirty, so a later round sends it again, and
//! the last round runs with the guest paused.

mod common;
use common::*;

#[test]
fn pages_without_checksums_still_arrive_exact_under_dirtying() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let mut src = synthetic_source(
        &addr,
        &[
            "--memory=64M",
            "--working-set=16M",
            "--dirty-rate=0",
            "--vcpus=2",
            "--warmup-ms=50",
            "--channels=3",
            "--page-checksums=false",
        ],
        &[],
    );
    let done = src.expect_event("completed");
    assert!(src.wait_exit().success());
    let rep = &done["report"];
    assert!(u64_at(rep, &["normal_pages"]) >= 16384, "{rep}");
    assert!(rep["rounds"].as_array().unwrap().len() >= 2, "{rep}");
    let recv = dest.expect_event("received");
    let verify = &recv["report"]["verify"];
    assert_eq!(u64_at(verify, &["pages_checked"]), 16384);
    assert_eq!(u64_at(verify, &["pages_mismatched"]), 0, "{verify}");
    assert_eq!(
        u64_at(verify, &["counter"]),
        u64_at(&done, &["counter_at_pause"])
    );
    // Nothing was checked, so nothing can have been found torn.
    assert_eq!(u64_at(&recv["report"], &["torn_pages"]), 0);
    assert!(dest.wait_exit().success());
}
