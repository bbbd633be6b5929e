//! Processes killed (SIGKILL) in each phase of a migration, between `livemig migrate --json`
//! and `livemig incoming --json --verify` processes:
//!
//! - the destination in set-up (its main channel open, its data channels joining), in
//!   precopy (with devices sending precopy data; `destination_killed_mid_migration.rs`
//!   covers a bare guest) and in switchover (the guest paused, a device's final state
//!   flowing): the source's attempt fails naming the channel that broke, its guest runs on
//!   with every page exact and every device whole, and the next destination receives it;
//! - the source in precopy and in switchover: the destination fails naming the channel,
//!   never resumes a partial guest, and (driven over QMP) is left with no migration thread,
//!   no more descriptors than before, and takes the next migration.

mod common;
mod faults_common;

use common::*;
use faults_common::*;
use livemig_faultnet::Proxy;
use serde_json::{json, Value};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const END: Duration = Duration::from_secs(60);
/// 64 MiB of guest memory.
const PAGES: u64 = 16384;

/// A source of 64 MiB migrating to each of `to` in turn, with `extra` options.
fn source(to: &[&str], extra: &[&str]) -> Proc {
    let to: Vec<String> = to.iter().map(|t| format!("--to={t}")).collect();
    let mut args = vec![
        "migrate",
        "--json",
        "--guest=synthetic",
        "--memory=64M",
        "--working-set=8M",
        "--dirty-rate=20k",
        "--warmup-ms=50",
    ];
    args.extend(to.iter().map(String::as_str));
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

/// The attempt failed naming a channel, and the source's guest, memory and devices are
/// whole.
fn check_attempt_failed(failed: &Value, what: &str) -> String {
    let err = failed["error"].as_str().unwrap().to_string();
    println!("{what}: source: {err}");
    assert!(err.contains("channel"), "{what}: '{err}' names no channel");
    let v = &failed["source_verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), PAGES, "{what}: {failed:#}");
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{what}: {failed:#}");
    assert!(u64_at(failed, &["counter"]) > 0, "{what}: {failed:#}");
    assert_eq!(failed["devices_intact"], true, "{what}: {failed:#}");
    err
}

/// The source completes to `dest` with `devices` devices, every page checked there.
fn check_completes(src: &mut Proc, dest: &mut Proc, addr: &str, devices: usize) {
    let done = src.expect_event("completed");
    assert_eq!(done["to"].as_str(), Some(addr));
    assert_eq!(u64_at(&done["report"], &["pages_mismatched"]), 0);
    assert_eq!(
        done["report"]["devices"].as_array().map(Vec::len),
        Some(devices)
    );
    assert!(src.wait_exit().success());
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_checked"]), PAGES);
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());
}

fn kill(p: &mut Proc) {
    p.child.kill().unwrap();
    p.wait_exit();
}

#[test]
fn the_destination_killed_in_setup_leaves_the_source_whole() {
    let _s = serial(&SERIAL);
    let (mut dest1, addr1) = Proc::incoming(&[]);
    let (mut dest2, addr2) = Proc::incoming(&["--verify"]);
    // 100 ms each way stretches the set-up (a round trip per channel) to about a second.
    let proxy = Proxy::builder(sockaddr(&addr1))
        .latency(Duration::from_millis(100))
        .start()
        .unwrap();
    let via = format!("tcp:{}", proxy.addr());
    let mut src = source(
        &[&via, &addr2],
        &[
            "--device=vfio-sim,size=16M,rate=200M",
            "--device=vmstate-sim",
        ],
    );
    // The main channel has its SessionAccept; the data channels are joining.
    wait_log(&mut dest1, "session ", END);
    assert!(proxy.wait_connections(2, END));
    kill(&mut dest1);
    let failed = src.expect_event("attempt_failed");
    assert!(
        !src.seen.iter().any(|v| v["event"] == "connected"),
        "the kill came after set-up: {:#?}",
        src.seen
    );
    check_attempt_failed(&failed, "destination killed in set-up");
    check_completes(&mut src, &mut dest2, &addr2, 1);
}

#[test]
fn the_destination_killed_in_precopy_leaves_the_source_and_its_devices_whole() {
    let _s = serial(&SERIAL);
    let (mut dest1, addr1) = Proc::incoming(&[]);
    let (mut dest2, addr2) = Proc::incoming(&["--verify"]);
    let mut src = source(
        &[&addr1, &addr2],
        &[
            // 64 MiB at 32 MB/s: round 0 lasts 2 s, with the devices' precopy data.
            "--max-bandwidth=32M",
            "--device=vfio-sim,size=16M,rate=200M,precopy=4M",
            "--device=vfio-sim,size=8M,rate=200M",
            "--device=vmstate-sim",
        ],
    );
    src.expect_event("round_started");
    std::thread::sleep(Duration::from_millis(500));
    kill(&mut dest1);
    let failed = src.expect_event("attempt_failed");
    check_attempt_failed(&failed, "destination killed in precopy");
    check_completes(&mut src, &mut dest2, &addr2, 2);
}

#[test]
fn the_destination_killed_in_switchover_resumes_the_source_guest_whole() {
    let _s = serial(&SERIAL);
    let (mut dest1, addr1) = Proc::incoming(&[]);
    let (mut dest2, addr2) = Proc::incoming(&["--verify"]);
    // The device's final save lasts about 1.6 s, with the guest paused.
    let mut src = source(
        &[&addr1, &addr2],
        &[
            "--device=vfio-sim,size=32M,rate=20M",
            "--device=vmstate-sim",
            // Above the device's read time, which the switchover counts.
            "--downtime-limit-ms=10000",
        ],
    );
    src.expect_event("switchover");
    std::thread::sleep(Duration::from_millis(300));
    kill(&mut dest1);
    let failed = src.expect_event("attempt_failed");
    check_attempt_failed(&failed, "destination killed in switchover");
    check_completes(&mut src, &mut dest2, &addr2, 1);
}

/// Kills the source once `when` has been seen on its output (and `delay` after), and
/// checks the destination drops what it had.
fn kill_source(src_extra: &[&str], when: &str, delay: Duration, what: &str) {
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let mut src = source(&[&addr], src_extra);
    src.expect_event(when);
    std::thread::sleep(delay);
    kill(&mut src);
    let killed = Instant::now();
    let err = assert_destination_failed(&mut dest, &["channel"], END);
    println!(
        "{what}: destination ({:?} after the kill): {err}",
        killed.elapsed()
    );
}

#[test]
fn the_source_killed_in_precopy_is_never_resumed_at_the_destination() {
    let _s = serial(&SERIAL);
    kill_source(
        &["--max-bandwidth=32M"],
        "round_started",
        Duration::from_millis(500),
        "source killed in precopy",
    );
}

#[test]
fn the_source_killed_in_switchover_is_never_resumed_at_the_destination() {
    let _s = serial(&SERIAL);
    kill_source(
        &[
            "--device=vfio-sim,size=32M,rate=20M",
            "--device=vmstate-sim",
            // Above the device's read time, which the switchover counts.
            "--downtime-limit-ms=10000",
        ],
        "switchover",
        Duration::from_millis(300),
        "source killed in switchover",
    );
}

/// A destination driven over QMP outlives its source's death: the incoming migration fails
/// naming the channel, its threads and descriptors go back to what they were, and it takes
/// the next migration, exact.
#[test]
fn a_qmp_destination_whose_source_was_killed_takes_the_next_migration() {
    let _s = serial(&SERIAL);
    let mut dst = QmpVm::destination("killed-source", &["--verify"]);
    let uri = format!("tcp:127.0.0.1:{}", free_port());
    let before = Footprint::of(dst.pid());
    dst.exec("migrate-incoming", json!({ "uri": uri }));
    let mut src = source(&[&uri], &["--max-bandwidth=32M"]);
    src.expect_event("round_started");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dst.query_migrate()["status"], "active");
    kill(&mut src);
    let q = dst.wait_end(END);
    assert_eq!(q["status"], "failed", "{q:#}");
    let err = q["error-desc"].as_str().unwrap();
    println!("source killed, QMP destination: {err}");
    assert!(err.contains("channel"), "{err}");
    assert_eq!(dst.run_state(), "inmigrate", "no guest was resumed");
    before.assert_back(dst.pid(), "QMP destination after its source was killed");

    dst.exec("migrate-incoming", json!({ "uri": uri }));
    let mut src = source(&[&uri], &[]);
    let done = src.expect_event("completed");
    assert_eq!(u64_at(&done["report"], &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());
    assert_eq!(dst.wait_end(END)["status"], "completed");
    let v = dst.verify();
    assert_eq!(v["pages-checked"], PAGES, "{v:#}");
    assert_eq!(v["pages-mismatched"], 0, "{v:#}");
    dst.quit();
}
