//! Postcopy between real processes: after precopy the guest runs on the destination before
//! all its memory has arrived; the pages it touches are fetched on demand (userfaultfd on the
//! destination, requests on the return path, answers on the urgent channel), the rest pushed
//! in the background. Every page is checked exact on the destination once all are in, and
//! the guest's write counter continues from where it paused.

mod common;
use common::*;

use livemig_vmm::kvm::usable_or_skip;
use serde_json::Value;

/// Runs a postcopy migration of the guest `guest` with the source options `extra`; returns
/// the source's `completed` line and the destination's `received` line.
fn postcopy(guest: &[&str], extra: &[&str]) -> (Value, Value) {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let to = format!("--to={addr}");
    let mut args = vec!["migrate", "--json", to.as_str(), "--postcopy"];
    args.extend_from_slice(guest);
    args.extend_from_slice(extra);
    let mut src = Proc::spawn(&args);
    let done = src
        .wait_for(&["completed"])
        .unwrap_or_else(|e| panic!("postcopy did not complete ({e}): {:#?}", src.seen));
    assert!(src.wait_exit().success());
    let received = dest.expect_event("received");
    assert!(dest.wait_exit().success());
    let r = &done["report"];
    let pc = &r["postcopy"];
    assert!(
        pc.is_object(),
        "the migration must have switched to postcopy: {r:#}"
    );
    assert!(u64_at(pc, &["pages"]) > 0, "postcopy moved no page: {r:#}");
    let recv = &received["report"];
    assert_eq!(
        u64_at(&recv["verify"], &["pages_mismatched"]),
        0,
        "{recv:#}"
    );
    assert!(u64_at(&recv["verify"], &["pages_checked"]) > 0, "{recv:#}");
    assert!(
        recv["postcopy_ms"].as_f64().unwrap_or(0.0) > 0.0,
        "the destination saw no postcopy phase: {recv:#}"
    );
    // Each fault's wait is counted for the thread that faulted (QEMU's per-vCPU blocktime):
    // the guest's vCPUs, and the counts add up to the faults.
    let faults = &recv["postcopy_faults"];
    if u64_at(faults, &["faults"]) > 0 {
        let threads = faults["threads"].as_array().expect("per-thread blocktime");
        let sum: u64 = threads.iter().map(|t| u64_at(t, &["faults"])).sum();
        assert_eq!(sum, u64_at(faults, &["faults"]), "{faults:#}");
        assert!(
            threads
                .iter()
                .any(|t| t["thread"].as_str().unwrap_or("").contains("vcpu")),
            "{faults:#}"
        );
        let in_buckets: u64 = faults["histogram"]
            .as_array()
            .expect("histogram")
            .iter()
            .map(|b| u64_at(b, &["faults"]))
            .sum();
        assert_eq!(in_buckets, u64_at(faults, &["faults"]), "{faults:#}");
    }
    // The guest ran on the destination: its counter went on from where it paused.
    let paused_at = u64_at(&done, &["counter_at_pause"]);
    let counter = u64_at(&recv["verify"], &["counter"]);
    assert!(
        counter >= paused_at,
        "counter {counter} went back from {paused_at}"
    );
    (done, received)
}

const SYNTHETIC: &[&str] = &[
    "--guest=synthetic",
    "--memory=256M",
    "--working-set=32M",
    "--dirty-rate=50k",
    "--warmup-ms=200",
];

#[test]
fn a_dirtying_guest_switched_after_one_round_arrives_exact() {
    let (done, _) = postcopy(SYNTHETIC, &["--postcopy-after-rounds=1"]);
    // One precopy round, then postcopy: no switchover round.
    assert_eq!(done["report"]["rounds"].as_array().unwrap().len(), 1);
}

#[test]
fn on_a_slow_link_touched_pages_are_requested_and_arrive_exact() {
    // The background push paced to 20 MB/s: 32 MiB of working set take over a second, so
    // the guest's writes fault and the pages they wait for are requested (never paced).
    let (done, _) = postcopy(
        SYNTHETIC,
        &["--postcopy-after-rounds=1", "--max-postcopy-bandwidth=20M"],
    );
    let pc = &done["report"]["postcopy"];
    assert!(
        u64_at(pc, &["requested"]) > 0,
        "no page was requested: {pc:#}"
    );
    assert!(u64_at(pc, &["dest_requested"]) > 0, "{pc:#}");
}

#[test]
fn a_guest_that_does_not_converge_switches_to_postcopy_at_the_bound() {
    // Round 0 leaves the working set dirty (tens of ms against a 1 ms limit), and the bound
    // is one round.
    let (done, _) = postcopy(
        SYNTHETIC,
        &[
            "--downtime-limit-ms=1",
            "--max-rounds=1",
            "--auto-converge=false",
            "--on-no-convergence=postcopy",
        ],
    );
    let r = &done["report"];
    assert_eq!(r["rounds"].as_array().unwrap().len(), 1, "{r:#}");
    assert!(!r["forced_switchover"].as_bool().unwrap_or(true));
}

#[test]
fn the_kvm_guest_runs_on_the_destination_before_its_memory_has_arrived() {
    if !usable_or_skip() {
        return;
    }
    postcopy(
        &[
            "--guest=kvm",
            "--memory=256M",
            "--working-set=32M",
            "--dirty-rate=200k",
            "--warmup-ms=300",
        ],
        &["--postcopy-after-rounds=1", "--max-postcopy-bandwidth=50M"],
    );
}

#[test]
fn postcopy_needs_to_be_allowed() {
    let (_dest, addr) = Proc::incoming(&[]);
    let to = format!("--to={addr}");
    let mut src = Proc::spawn(&[
        "migrate",
        "--json",
        to.as_str(),
        "--guest=synthetic",
        "--memory=64M",
        "--on-no-convergence=postcopy",
    ]);
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    let errors: Vec<&str> = src
        .seen
        .iter()
        .filter_map(|l| l["error"].as_str())
        .collect();
    assert!(
        errors.iter().any(|e| e.contains("needs postcopy allowed")),
        "{errors:?}"
    );
}

#[test]
fn a_streamed_device_completes_before_the_guest_runs_on_the_destination() {
    // VFIO-like devices cannot be postcopied: their streams complete (with credit) before
    // the switch, and the destination loads them before it resumes the guest.
    let mut guest = SYNTHETIC.to_vec();
    guest.extend_from_slice(&[
        "--device=vfio-sim,size=32M,rate=400M,precopy=8M",
        "--device=vmstate-sim",
    ]);
    // A limit the device's final read (tens of ms) cannot fit: precopy does not converge
    // before the switch.
    let (done, received) = postcopy(
        &guest,
        &["--postcopy-after-rounds=1", "--downtime-limit-ms=1"],
    );
    let devices = done["report"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{devices:#?}");
    assert!(u64_at(&devices[0], &["precopy_bytes"]) > 0, "{devices:#?}");
    // Loaded (its stream checked in order) on the destination before the guest ran there.
    let recv = &received["report"];
    assert_eq!(
        recv["device_peak_buffered_bytes"].as_array().map(Vec::len),
        Some(1),
        "{recv:#}"
    );
}

#[test]
fn a_destination_killed_in_postcopy_leaves_the_source_paused_with_every_page() {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let to = format!("--to={addr}");
    let mut args = vec!["migrate", "--json", to.as_str(), "--postcopy"];
    args.extend_from_slice(SYNTHETIC);
    // A push paced to 2 MB/s: the postcopy phase lasts many seconds. The source tries to
    // resume for a second and a half (nobody listens any more), then gives up.
    args.extend_from_slice(&[
        "--postcopy-after-rounds=1",
        "--max-postcopy-bandwidth=2M",
        "--postcopy-recover-timeout-ms=1500",
    ]);
    let mut src = Proc::spawn(&args);
    src.expect_event("switchover");
    std::thread::sleep(std::time::Duration::from_millis(500));
    dest.child.kill().unwrap();
    let _ = dest.child.wait();
    src.expect_event("postcopy_paused");
    let failed = src.expect_event("failed");
    let e = failed["error"].as_str().unwrap_or_default();
    assert!(e.contains("postcopy broke"), "{e}");
    assert!(e.contains("keeps its copy paused"), "{e}");
    assert_eq!(failed["guest_paused"], Value::Bool(true), "{failed:#}");
    // Never resumed here, and no other attempt.
    assert!(
        !src.seen.iter().any(|l| l["event"] == "attempt_failed"),
        "{:#?}",
        src.seen
    );
    assert!(!src.wait_exit().success());
}

#[test]
fn a_session_allowed_postcopy_that_converges_ends_as_precopy() {
    // The urgent channel, the push thread and the fault thread wait for a switch that never
    // comes: the migration must still end, and the destination must not wait for pages.
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let to = format!("--to={addr}");
    let mut src = Proc::spawn(&[
        "migrate",
        "--json",
        to.as_str(),
        "--postcopy",
        "--postcopy-after-rounds=5",
        "--guest=synthetic",
        "--memory=64M",
        "--working-set=1M",
        "--dirty-rate=1k",
        "--warmup-ms=100",
    ]);
    let done = src.expect_event("completed");
    assert!(src.wait_exit().success());
    assert!(done["report"]["postcopy"].is_null(), "{:#}", done["report"]);
    let received = dest.expect_event("received");
    assert!(dest.wait_exit().success());
    let recv = &received["report"];
    assert_eq!(
        u64_at(&recv["verify"], &["pages_mismatched"]),
        0,
        "{recv:#}"
    );
    assert_eq!(recv["postcopy_ms"].as_f64(), Some(0.0), "{recv:#}");
}

#[test]
fn a_destination_that_refuses_the_switch_before_running_the_guest_gives_it_back() {
    // The destination fails at the switch before the guest runs there (as a host without
    // userfaultfd would): its Reject comes before any Resumed, so the source's copy, which
    // has every page, is the guest again and runs on, intact.
    let (mut dest, addr) = Proc::incoming_hooked(&["--verify"], "postcopy-arm-fails");
    let to = format!("--to={addr}");
    let mut args = vec!["migrate", "--json", to.as_str(), "--postcopy"];
    args.extend_from_slice(SYNTHETIC);
    args.push("--postcopy-after-rounds=1");
    let mut src = Proc::spawn(&args);
    let failed = src.expect_event("attempt_failed");
    let e = failed["error"].as_str().unwrap_or_default();
    assert!(e.contains("userfaultfd refused"), "{e}");
    assert!(!e.contains("postcopy broke"), "{e}");
    assert_eq!(
        u64_at(&failed["source_verify"], &["pages_mismatched"]),
        0,
        "{failed:#}"
    );
    assert!(
        !src.seen.iter().any(|l| l["event"] == "postcopy_paused"),
        "{:#?}",
        src.seen
    );
    assert!(!src.wait_exit().success());
    dest.expect_event("failed");
    assert!(!dest.wait_exit().success());
}
