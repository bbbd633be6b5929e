//! A hard bound on the switchover's pause (`--downtime-hard-limit-ms`), between real
//! processes with the KVM micro-VM: a device whose first final read stalls for 10 s has
//! its switchover abandoned at the bound, the guest runs on at the source, precopy goes on
//! in a new connection of the same session, and the next switchover completes with every
//! page exact, the device's stream whole (its digest checked on load) and the guest's
//! counter continuing. A destination whose load outlasts the bound (its `Loaded` sent
//! after the source gave up) goes on the same way. Under `--on-no-convergence=cancel` with
//! one attempt, the migration ends instead, both sides cleanly, the source's guest and
//! device intact.
//!
//! No wall-clock threshold: the stall (10 s) is far above the bound (100 ms); the test
//! checks the guest was not kept paused for the stall, which a missing bound would do
//! whatever the host's speed. The bench measures the pause against the bound.

mod common;
use common::*;

use livemig_vmm::kvm::usable_or_skip;
use serde_json::Value;

const GUEST: &[&str] = KVM_GUEST;

/// The stall of the device's first final read, milliseconds.
const STALL_MS: f64 = 10_000.0;

fn source(addr: &str, extra: &[&str]) -> Proc {
    let to = format!("--to={addr}");
    let mut args = vec![
        "migrate",
        "--json",
        to.as_str(),
        "--device=vfio-sim,size=4M,precopy=1M,stall_final_ms=10000",
        "--downtime-limit-ms=300",
        "--downtime-hard-limit-ms=100",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(GUEST);
    Proc::spawn(&args)
}

fn abandoned(report: &Value) -> &Vec<Value> {
    report["abandoned_switchovers"]
        .as_array()
        .expect("abandoned_switchovers")
}

#[test]
fn a_stalled_device_read_is_abandoned_at_the_bound_and_the_next_switchover_completes() {
    if !usable_or_skip() {
        return;
    }
    let (mut dest, addr) = Proc::incoming(&["--verify", "--run-after-ms=300"]);
    let mut src = source(&addr, &[]);
    let done = src.expect_event("completed");
    let r = &done["report"];
    // The stalled one; a loaded host may cut a later one at the bound too.
    let cut = abandoned(r);
    assert!(!cut.is_empty(), "the stalled switchover abandoned: {r:#}");
    let a = &cut[0];
    let (cut_ms, paused_ms) = (
        a["cut_ms"].as_f64().unwrap(),
        a["paused_ms"].as_f64().unwrap(),
    );
    assert!(cut_ms >= 100.0, "cut at the bound, not before: {a:#}");
    assert!(
        paused_ms < STALL_MS / 2.0,
        "the guest ran again without waiting for the stalled read: {a:#}"
    );
    assert!(paused_ms >= cut_ms, "{a:#}");
    assert!(
        a["waiting_for"].as_str().unwrap().contains("save"),
        "it waited for the device's save: {a:#}"
    );
    // The rounds go on after the abandoned one, and the switchover that completed is later.
    let rounds = r["rounds"].as_array().unwrap();
    let last = rounds.last().unwrap()["round"].as_u64().unwrap();
    assert!(last > a["round"].as_u64().unwrap(), "{r:#}");
    assert!(
        r["downtime_ms"].as_f64().unwrap() < STALL_MS / 2.0,
        "the switchover that completed did not stall: {r:#}"
    );
    assert_eq!(r["devices"].as_array().unwrap().len(), 1);
    let paused_at = u64_at(&done, &["counter_at_pause"]);
    assert!(src.wait_exit().success());

    expect_exact_arrival(&mut dest, 65536, paused_at);
    assert!(dest.wait_exit().success());
}

#[test]
fn a_destination_whose_load_outlasts_the_bound_goes_on_after_the_abandonment() {
    if !usable_or_skip() {
        return;
    }
    // The destination sends its first Loaded 1 s late: the source is past its bound and
    // abandons while the destination, everything loaded, awaits the handover.
    let (mut dest, addr) = Proc::incoming_hooked(
        &["--verify", "--run-after-ms=300"],
        "late-first-loaded=1000",
    );
    let mut src = Proc::spawn(
        &[
            &[
                "migrate",
                "--json",
                &format!("--to={addr}"),
                "--downtime-limit-ms=300",
                "--downtime-hard-limit-ms=100",
            ][..],
            GUEST,
        ]
        .concat(),
    );
    let done = src.expect_event("completed");
    let r = &done["report"];
    let cut = abandoned(r);
    assert!(!cut.is_empty(), "{r:#}");
    let why = cut[0]["waiting_for"].as_str().unwrap();
    assert!(why.contains("destination to load"), "{why}");
    let paused_at = u64_at(&done, &["counter_at_pause"]);
    assert!(src.wait_exit().success());
    expect_exact_arrival(&mut dest, 65536, paused_at);
    assert!(dest.wait_exit().success());
}

#[test]
fn out_of_attempts_under_cancel_both_sides_end_and_the_source_keeps_its_guest() {
    if !usable_or_skip() {
        return;
    }
    let (mut dest, addr) = Proc::incoming(&[]);
    let mut src = source(
        &addr,
        &["--switchover-attempts=1", "--on-no-convergence=cancel"],
    );
    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("switchover abandoned 1 times"), "{err}");
    assert!(err.contains("hard downtime limit of 100 ms"), "{err}");
    assert_eq!(u64_at(&failed["source_verify"], &["pages_mismatched"]), 0);
    assert_eq!(failed["devices_intact"], true, "{failed:#}");
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    // Told the migration ended, the destination does not wait for it to go on.
    let out = dest.expect_event("failed");
    let why = out["error"].as_str().unwrap();
    assert!(why.contains("switchover abandoned"), "{why}");
    dest.wait_exit();
}
