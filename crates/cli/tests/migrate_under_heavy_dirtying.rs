//! Two processes, a guest dirtying its working set as fast as it can, several forced rounds
//! so that the same pages travel again and again on different channels: every page must
//! arrive exact, and the guest's write counter must carry on.

mod common;
use common::*;

const SOURCE: &[&str] = &[
    "--guest=synthetic",
    "--memory=128M",
    "--fill=0.9",
    "--working-set=16M",
    "--dirty-rate=0",
    "--vcpus=2",
    "--warmup-ms=100",
    "--channels=4",
    // Never converges at 1 ms while the guest dirties: switchover comes from the round bound.
    "--downtime-limit-ms=1",
    "--max-rounds=6",
];

#[test]
fn every_page_exact_after_heavy_dirtying() {
    let (mut dest, addr) = Proc::incoming(&["--verify", "--run-after-ms=200"]);
    let to = format!("--to={addr}");
    let mut args = vec!["migrate", "--json", to.as_str()];
    args.extend_from_slice(SOURCE);
    let mut src = Proc::spawn(&args);
    let done = src.expect_event("completed");
    let r = &done["report"];
    // Up to 6 precopy rounds (1 ms cannot be met while the guest dirties; fewer only if the
    // guest, starved of CPU on a busy machine, dirtied nothing during a round) and the
    // switchover round.
    let rounds = r["rounds"].as_array().unwrap();
    assert!((2..=7).contains(&rounds.len()), "{r:#}");
    let sent: u64 = rounds.iter().map(|x| x["pages"].as_u64().unwrap()).sum();
    assert!(
        sent > 32768,
        "pages dirtied meanwhile were sent again: {r:#}"
    );
    assert_eq!(u64_at(r, &["pages_checked"]), 128 << 8);
    assert_eq!(u64_at(r, &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());

    let recv = dest.expect_event("received");
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), 32768);
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    assert!(
        u64_at(&recv["report"], &["zero_pages"]) > 0,
        "10% of pages are zero and travel as offsets"
    );
    // The guest ran on at the destination and is still exact, counter included.
    let after = dest.expect_event("after_run");
    assert_eq!(
        u64_at(&after["verify"], &["pages_mismatched"]),
        0,
        "{after:#}"
    );
    assert!(dest.wait_exit().success());
}

/// The check above must be able to fail: with the destination's round sync broken on
/// purpose (data channel 0 applies its pages late, oldest last), older copies land after
/// newer ones, and the destination must refuse to resume the guest.
#[test]
fn a_stale_page_landing_late_is_caught() {
    let (mut dest, addr) = Proc::incoming_hooked(&["--verify"], "break-round-order");
    let to = format!("--to={addr}");
    let mut args = vec!["migrate", "--json", to.as_str()];
    args.extend_from_slice(SOURCE);
    let mut src = Proc::spawn(&args);
    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap();
    assert!(
        err.contains("WrongGeneration"),
        "the error names the stale page: {err}"
    );
    // The source guest was resumed and is intact.
    assert_eq!(
        u64_at(&failed["source_verify"], &["pages_mismatched"]),
        0,
        "{failed:#}"
    );
    assert_eq!(u64_at(&failed["source_verify"], &["pages_checked"]), 32768);
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    let d = dest.expect_event("failed");
    assert!(
        d["error"].as_str().unwrap().contains("pages are wrong"),
        "{d:#}"
    );
    assert!(!dest.wait_exit().success());
}

/// A page the guest writes again before its turn in a round is left to the next round: on a
/// paced link round 0 takes over a second, its dirty-log passes in the middle see the
/// working set written, and the round skips those pages (they are not sent twice in a row);
/// every page still arrives exact.
#[test]
fn pages_written_again_before_their_turn_wait_for_the_next_round() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let to = format!("--to={addr}");
    let mut src = Proc::spawn(&[
        "migrate",
        "--json",
        to.as_str(),
        "--guest=synthetic",
        "--memory=128M",
        "--working-set=16M",
        "--dirty-rate=0",
        "--warmup-ms=100",
        "--max-bandwidth=64M",
    ]);
    let done = src.expect_event("completed");
    let r = &done["report"];
    let round0 = &r["rounds"][0];
    let skipped = u64_at(round0, &["skipped_pages"]);
    assert!(skipped > 0, "{round0:#}");
    // Skipped pages were not sent in round 0, and the working set is at most 4096 pages.
    assert!(skipped <= 4096, "{round0:#}");
    let sent = u64_at(round0, &["normal_pages"]) + u64_at(round0, &["zero_pages"]);
    assert_eq!(sent + skipped, 32768, "{round0:#}");
    assert_eq!(u64_at(r, &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());
    let recv = dest.expect_event("received");
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    assert!(dest.wait_exit().success());
}
