//! Local mode between two real processes: the source hands the memfds backing guest memory
//! to the destination over a Unix socket, so no page is copied, and only device and vCPU
//! state move. The destination must see every page exact, the guest must continue where it
//! stopped, and a destination that fails after mapping the memory must leave the source's
//! guest running and exact.

mod common;
use common::*;
use serde_json::Value;

fn unix_listen(tag: &str) -> String {
    let path =
        std::env::temp_dir().join(format!("livemig-local-{tag}-{}.sock", std::process::id()));
    format!("--listen=unix:{}", path.display())
}

fn destination(tag: &str) -> (Proc, String) {
    let listen = unix_listen(tag);
    let mut dest = Proc::spawn(&[
        "incoming",
        &listen,
        "--json",
        "--verify",
        "--run-after-ms=200",
    ]);
    let addr = dest.expect_event("listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();
    (dest, format!("--to={addr}"))
}

/// A source migrating in local mode to `to` (a `--to=` argument), with `guest`'s options.
fn local_source(to: &str, guest: &[&str]) -> Proc {
    let mut args = vec!["migrate", "--json", "--local", to];
    args.extend_from_slice(guest);
    Proc::spawn(&args)
}

/// A synthetic 64 MiB guest dirtying 4 MiB, 2 channels, and one vfio-sim device `device`.
fn synthetic_with(device: &str) -> [&str; 7] {
    [
        "--guest=synthetic",
        "--memory=64M",
        "--working-set=4M",
        "--dirty-rate=20k",
        "--warmup-ms=50",
        "--channels=2",
        device,
    ]
}

/// Waits for a local migration to complete and checks it (see `check_local`); returns the
/// source's report line.
fn completes(mut src: Proc, mut dest: Proc, pages: u64) -> Value {
    let done = src.expect_event("completed");
    assert!(src.wait_exit().success());
    let recv = dest.expect_event("received");
    let after = dest.expect_event("after_run");
    check_local(&done, &recv, &after, pages);
    assert!(dest.wait_exit().success());
    done
}

/// Checks a completed local migration: nothing of RAM was sent, and the destination found
/// every page exact with the guest's counter where the source paused it, then running on.
fn check_local(done: &Value, recv: &Value, after: &Value, pages: u64) {
    let rep = &done["report"];
    assert_eq!(
        u64_at(rep, &["normal_pages"]),
        0,
        "no page may be copied: {rep}"
    );
    assert_eq!(
        u64_at(rep, &["zero_pages"]),
        0,
        "no page may be copied: {rep}"
    );
    let verify = &recv["report"]["verify"];
    assert_eq!(u64_at(verify, &["pages_checked"]), pages);
    assert_eq!(u64_at(verify, &["pages_mismatched"]), 0, "{verify}");
    assert_eq!(
        u64_at(verify, &["counter"]),
        u64_at(done, &["counter_at_pause"]),
        "the guest must arrive where it was paused"
    );
    assert!(
        u64_at(&after["verify"], &["counter"]) > u64_at(verify, &["counter"]),
        "the guest must run on at the destination: {after}"
    );
    assert_eq!(
        u64_at(&after["verify"], &["pages_mismatched"]),
        0,
        "{after}"
    );
}

#[test]
fn synthetic_guest_moves_without_copying_a_page() {
    let (dest, to) = destination("syn");
    let device = "--device=vfio-sim,size=8M,rate=200M,precopy=2M";
    let src = local_source(&to, &synthetic_with(device));
    let done = completes(src, dest, 16384);
    // Device state still moves, on the data channels (its precopy part and all of it).
    assert!(u64_at(&done["report"]["devices"][0], &["bytes"]) >= 8 << 20);
}

#[test]
fn kvm_guest_moves_without_copying_a_page() {
    if !livemig_vmm::kvm::usable_or_skip() {
        return;
    }
    let (dest, to) = destination("kvm");
    let kvm = [
        "--guest=kvm",
        "--memory=256M",
        "--working-set=8M",
        "--dirty-rate=20k",
        "--warmup-ms=100",
    ];
    completes(local_source(&to, &kvm), dest, 65536);
}

#[test]
fn local_mode_needs_a_unix_address() {
    let guest = ["--guest=synthetic", "--memory=8M", "--warmup-ms=0"];
    let mut src = local_source("--to=tcp:127.0.0.1:9", &guest);
    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("not a unix: address"), "{err}");
    assert_eq!(u64_at(&failed["source_verify"], &["pages_mismatched"]), 0);
}

#[test]
fn a_destination_failing_after_mapping_the_memory_leaves_the_source_exact() {
    // The destination maps the memory, then its device refuses a chunk: the guest must run
    // on at the source with every page exact and the device whole.
    let (mut dest, to) = destination("bad");
    let device = "--device=vfio-sim,size=8M,rate=200M,fail_load_at=4M";
    let mut src = local_source(&to, &synthetic_with(device));
    let failed = src.expect_event("attempt_failed");
    let err = failed["error"].as_str().unwrap();
    assert!(err.contains("vfio0"), "the error names the device: {err}");
    assert_eq!(u64_at(&failed["source_verify"], &["pages_checked"]), 16384);
    assert_eq!(
        u64_at(&failed["source_verify"], &["pages_mismatched"]),
        0,
        "{failed}"
    );
    assert!(failed["devices_intact"].as_bool().unwrap(), "{failed}");
    assert!(u64_at(&failed, &["counter"]) > 0);
    src.expect_event("failed");
    assert!(!src.wait_exit().success());
    dest.expect_event("failed");
}
