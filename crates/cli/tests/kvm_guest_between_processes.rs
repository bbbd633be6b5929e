//! The KVM micro-VM migrated between real processes: exact memory, and the guest's write
//! counter continues from where it paused, neither reset nor repeated. Skipped, saying so,
//! where /dev/kvm is not usable.

mod common;
use common::*;

use livemig_vmm::kvm::usable_or_skip;

const GUEST: &[&str] = KVM_GUEST;

#[test]
fn kvm_guest_migrates_exact_under_dirtying() {
    if !usable_or_skip() {
        return;
    }
    let (mut dest, addr) = Proc::incoming(&["--verify", "--run-after-ms=300"]);
    let to = format!("--to={addr}");
    let mut args = vec![
        "migrate",
        "--json",
        to.as_str(),
        "--downtime-limit-ms=1",
        "--max-rounds=4",
    ];
    args.extend_from_slice(GUEST);
    let mut src = Proc::spawn(&args);
    let done = src.expect_event("completed");
    assert_eq!(done["guest"], "kvm");
    let r = &done["report"];
    // Up to 4 precopy rounds (fewer only if the guest, starved of CPU on a busy machine,
    // dirtied nothing during one) and the switchover round.
    let rounds = r["rounds"].as_array().unwrap();
    assert!((2..=5).contains(&rounds.len()), "{r:#}");
    let sent: u64 = rounds.iter().map(|x| x["pages"].as_u64().unwrap()).sum();
    assert!(
        sent > 65536,
        "pages dirtied during round 0 were sent again: {r:#}"
    );
    assert_eq!(u64_at(r, &["pages_mismatched"]), 0);
    let paused_at = u64_at(&done, &["counter_at_pause"]);
    assert!(paused_at > 0);
    assert!(src.wait_exit().success());

    expect_exact_arrival(&mut dest, 65536, paused_at);
    assert!(dest.wait_exit().success());
}

/// A -> B -> A -> B: three hops between four processes, each hop exact and the counter
/// continuing across every one.
#[test]
fn kvm_guest_ping_pong_three_hops() {
    if !usable_or_skip() {
        return;
    }
    let (mut last, last_addr) = Proc::incoming(&["--verify"]);
    let mut hops = vec![];
    let mut next = last_addr.clone();
    for _ in 0..2 {
        let onward = format!("--then-migrate-to={next}");
        let (p, addr) =
            Proc::incoming(&["--verify", "--run-after-ms=200", &onward, "--channels=2"]);
        hops.push(p);
        next = addr;
    }
    let to = format!("--to={next}");
    let mut args = vec!["migrate", "--json", to.as_str()];
    args.extend(GUEST.iter().filter(|a| !a.starts_with("--dirty-rate")));
    args.push("--dirty-rate=20k");
    let mut src = Proc::spawn(&args);
    let done = src.expect_event("completed");
    let mut counter = u64_at(&done, &["counter_at_pause"]);
    assert!(src.wait_exit().success());
    // Hops run in reverse order of creation: the last one created received first.
    for p in hops.iter_mut().rev() {
        let recv = p.expect_event("received");
        let v = &recv["report"]["verify"];
        assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
        assert_eq!(
            u64_at(v, &["counter"]),
            counter,
            "counter continues across the hop"
        );
        let onward = p.expect_event("completed");
        assert_eq!(u64_at(&onward["report"], &["pages_mismatched"]), 0);
        let paused = u64_at(&onward, &["counter_at_pause"]);
        assert!(paused > counter, "the guest ran between hops");
        counter = paused;
        assert!(p.wait_exit().success());
    }
    let recv = last.expect_event("received");
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    assert_eq!(u64_at(v, &["counter"]), counter);
    assert!(last.wait_exit().success());
}
