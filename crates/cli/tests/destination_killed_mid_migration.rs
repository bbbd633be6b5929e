//! The destination dies (SIGKILL) in the middle of precopy: the source guest keeps running
//! with every page exact, the source says what happened, and a second migration succeeds.

mod common;
use common::*;

#[test]
fn source_survives_and_second_migration_succeeds() {
    let (mut dest1, addr1) = Proc::incoming(&[]);
    let (mut dest2, addr2) = Proc::incoming(&["--verify"]);
    let to1 = format!("--to={addr1}");
    let to2 = format!("--to={addr2}");
    let mut src = Proc::spawn(&[
        "migrate",
        "--json",
        &to1,
        &to2,
        "--guest=synthetic",
        "--memory=128M",
        "--working-set=8M",
        "--dirty-rate=20k",
        "--warmup-ms=50",
        // 128 MiB at 40 MB/s: round 0 takes about 3 s, time enough to kill the destination.
        "--max-bandwidth=40M",
    ]);
    src.expect_event("round_started");
    std::thread::sleep(std::time::Duration::from_millis(700));
    dest1.child.kill().unwrap();
    dest1.wait_exit();

    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap();
    assert!(
        err.contains("data channel") || err.contains("main channel"),
        "the error names the channel that broke: {err}"
    );
    assert_eq!(u64_at(&failed["source_verify"], &["pages_checked"]), 32768);
    assert_eq!(
        u64_at(&failed["source_verify"], &["pages_mismatched"]),
        0,
        "{failed:#}"
    );
    assert!(
        u64_at(&failed, &["counter"]) > 0,
        "the guest ran before the failure"
    );

    let done = src.expect_event("completed");
    assert_eq!(done["to"].as_str().unwrap(), addr2);
    assert_eq!(u64_at(&done["report"], &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());
    let recv = dest2.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    // (verify also checks the write counter against every page's generation.)
    assert!(recv["report"]["rounds"].as_u64().unwrap() >= 2);
    assert!(dest2.wait_exit().success());
}
