//! The same migration over a Unix socket instead of TCP: every channel is a connection to the
//! destination's socket path.

mod common;
use common::*;

#[test]
fn migrates_exact_over_a_unix_socket() {
    let path = std::env::temp_dir().join(format!("livemig-test-{}.sock", std::process::id()));
    let listen = format!("--listen=unix:{}", path.display());
    let mut dest = Proc::spawn(&["incoming", &listen, "--json", "--verify"]);
    let l = dest.expect_event("listening");
    let addr = l["addr"].as_str().unwrap().to_string();
    assert!(addr.starts_with("unix:"), "{addr}");
    let mut src = synthetic_source(
        &addr,
        &[
            "--memory=64M",
            "--working-set=4M",
            "--dirty-rate=20k",
            "--warmup-ms=50",
            "--channels=3",
            "--device=vfio-sim,size=8M,rate=200M",
        ],
        &[],
    );
    let done = src.expect_event("completed");
    assert_eq!(u64_at(&done["report"], &["pages_mismatched"]), 0);
    assert_eq!(done["report"]["devices"].as_array().unwrap().len(), 1);
    assert!(src.wait_exit().success());
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_checked"]), 16384);
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());
    assert!(
        !path.exists(),
        "the destination removes its socket file when done"
    );
}
