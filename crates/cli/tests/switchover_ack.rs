//! `--switchover-ack` (QEMU's `switchover-ack`), between real processes: the source does not
//! pause the guest until the destination says every device twin has loaded its initial
//! precopy data, however early the RAM converges. Without it, the same migration switches
//! over with the device's first precopy section still half read (so the test can fail).
//!
//! No wall-clock threshold: the device's precopy section (8 MiB at 4 MiB/s) is declared to
//! take 2 s to read whatever the host, and the downtime limit (60 s) lets the RAM converge
//! in the first rounds; what is checked is how much precopy data went before the pause.

mod common;
use common::*;
use serde_json::Value;

/// One precopy section: 8 MiB and its 28 bytes of header and trailer.
const SECTION: u64 = (8 << 20) + 28;

fn migrate(extra: &[&str]) -> (Value, Value) {
    let (mut dest, addr) = Proc::incoming(&[]);
    let options = [
        "--memory=32M",
        "--dirty-rate=0",
        "--device=vfio-sim,size=1M,precopy=8M,rate=4M,gen_ms=0",
        "--downtime-limit-ms=60000",
    ];
    let mut src = synthetic_source(&addr, &options, extra);
    let done = src.expect_event("completed");
    assert!(src.wait_exit().success());
    let recv = dest.expect_event("received");
    assert!(dest.wait_exit().success());
    (done["report"].clone(), recv)
}

fn precopy_bytes(report: &Value) -> u64 {
    u64_at(&report["devices"][0], &["precopy_bytes"])
}

#[test]
fn with_switchover_ack_the_guest_pauses_only_after_the_initial_data_loaded() {
    let (r, _) = migrate(&["--switchover-ack"]);
    assert!(
        precopy_bytes(&r) >= SECTION,
        "the device's first precopy section went before the pause: {r:#}"
    );
    let rounds = r["rounds"].as_array().unwrap();
    assert!(
        rounds.iter().any(|x| x["switchover_ack_awaited"] == true),
        "precopy went on for the ack: {r:#}"
    );
    assert_eq!(r["forced_switchover"], false, "{r:#}");
}

#[test]
fn without_it_the_same_migration_switches_over_with_the_section_half_read() {
    let (r, _) = migrate(&[]);
    assert!(
        precopy_bytes(&r) < SECTION,
        "the RAM converged first and nothing waited for the device: {r:#}"
    );
    let rounds = r["rounds"].as_array().unwrap();
    assert!(rounds.iter().all(|x| x["switchover_ack_awaited"] == false));
}
