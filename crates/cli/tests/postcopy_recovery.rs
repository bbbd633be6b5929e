//! Postcopy recovery between real processes: the link is lost after the switch (every
//! connection of the session reset by livemig's fault proxy), both sides pause (the source
//! keeps its paused copy and every page; the destination's guest runs on what it has, its
//! vCPUs waiting on the rest), the source reconnects through the proxy, the destination
//! answers with the pages it still misses, and the migration completes with every page
//! exact and the guest's counter going on.

mod common;
mod faults_common;

use common::*;
use faults_common::{sockaddr, wait_log};
use livemig_faultnet::{Fault, Proxy};
use livemig_vmm::kvm::usable_or_skip;
use serde_json::Value;
use std::time::Duration;

/// A source migrating `guest` with postcopy through a proxy to a `--verify` destination,
/// with the push slowed so that postcopy lasts seconds.
struct Run {
    src: Proc,
    dest: Proc,
    proxy: Proxy,
}

fn start(guest: &[&str], extra: &[&str], dest_extra: &[&str]) -> Run {
    let mut d = vec!["--verify"];
    d.extend_from_slice(dest_extra);
    let (dest, addr) = Proc::incoming(&d);
    let proxy = Proxy::start(sockaddr(&addr), Vec::new()).expect("start the proxy");
    let to = format!("--to=tcp:{}", proxy.addr());
    let mut args = vec!["migrate", "--json", to.as_str(), "--postcopy"];
    args.extend_from_slice(guest);
    args.extend_from_slice(&["--postcopy-after-rounds=1", "--max-postcopy-bandwidth=4M"]);
    args.extend_from_slice(extra);
    let src = Proc::spawn(&args);
    Run { src, dest, proxy }
}

impl Run {
    /// Waits for the switch to postcopy, lets it run a moment, then resets every
    /// connection the session has open (main, data channels, urgent); returns how many.
    fn cut_in_postcopy(&mut self) -> usize {
        let sw = self.src.expect_event("switchover");
        assert_eq!(sw["postcopy"], Value::Bool(true), "{sw:#}");
        std::thread::sleep(Duration::from_millis(150));
        let n = self.proxy.connections();
        for c in 0..n {
            self.proxy.fault(c, Fault::Reset);
        }
        n
    }

    /// Both sides completed: every page exact on the destination, the counter went on.
    fn completes_exact(mut self, connections_before: usize) -> (Value, Value) {
        let done = self.src.wait_for(&["completed"]).unwrap_or_else(|e| {
            let _ = self.dest.wait_within(&["failed"], Duration::from_secs(1));
            panic!(
                "no completion ({e}): {:#?}\ndestination: {:#?}",
                self.src.seen, self.dest.seen
            )
        });
        assert!(self.src.wait_exit().success());
        let received = self.dest.expect_event("received");
        assert!(self.dest.wait_exit().success());
        let pc = &done["report"]["postcopy"];
        assert!(u64_at(pc, &["recoveries"]) >= 1, "{pc:#}");
        let recv = &received["report"];
        assert_eq!(
            u64_at(&recv["verify"], &["pages_mismatched"]),
            0,
            "{recv:#}"
        );
        assert!(u64_at(&recv["verify"], &["pages_checked"]) > 0, "{recv:#}");
        let paused_at = u64_at(&done, &["counter_at_pause"]);
        let counter = u64_at(&recv["verify"], &["counter"]);
        assert!(
            counter >= paused_at,
            "counter {counter} went back from {paused_at}"
        );
        // The resuming session went through the proxy on connections of its own.
        assert!(self.proxy.connections() > connections_before);
        (done, received)
    }
}

const SYNTHETIC: &[&str] = &[
    "--guest=synthetic",
    "--memory=256M",
    "--working-set=32M",
    "--dirty-rate=50k",
    "--warmup-ms=200",
];

#[test]
fn a_link_lost_in_postcopy_is_resumed_and_every_page_arrives() {
    let mut run = start(SYNTHETIC, &[], &[]);
    let n = run.cut_in_postcopy();
    let paused = run.src.expect_event("postcopy_paused");
    assert!(
        !paused["error"].as_str().unwrap_or("").is_empty(),
        "{paused:#}"
    );
    // What is still missing depends on how many pages the guest's own faults fetched before
    // the cut (requests are never paced); the resume carries the rest, whatever it is.
    let resumed = run.src.expect_event("postcopy_resumed");
    assert!(resumed["missing_pages"].is_u64(), "{resumed:#}");
    // The destination paused too, and was resumed by the source's new session.
    wait_log(&mut run.dest, "postcopy paused", Duration::from_secs(30));
    wait_log(&mut run.dest, "resumed", Duration::from_secs(30));
    run.completes_exact(n);
}

#[test]
fn the_kvm_guest_survives_a_link_lost_in_postcopy() {
    if !usable_or_skip() {
        return;
    }
    let guest = [
        "--guest=kvm",
        "--memory=256M",
        "--working-set=32M",
        "--dirty-rate=200k",
        "--warmup-ms=300",
    ];
    let mut run = start(&guest, &[], &[]);
    let n = run.cut_in_postcopy();
    run.src.expect_event("postcopy_resumed");
    run.completes_exact(n);
}

#[test]
fn without_recovery_a_lost_link_fails_both_sides_and_the_source_keeps_its_copy() {
    let off = ["--postcopy-recover-timeout-ms=0"];
    let mut run = start(SYNTHETIC, &off, &off);
    run.cut_in_postcopy();
    let failed = run.src.expect_event("failed");
    let e = failed["error"].as_str().unwrap_or_default();
    assert!(e.contains("postcopy broke"), "{e}");
    assert_eq!(failed["guest_paused"], Value::Bool(true), "{failed:#}");
    assert!(!run
        .src
        .seen
        .iter()
        .any(|l| l["event"] == "postcopy_resumed"));
    let failed = run.dest.expect_event("failed");
    let e = failed["error"].as_str().unwrap_or_default();
    assert!(e.contains("was not resumed"), "{e}");
    assert!(!run.src.wait_exit().success());
    assert!(!run.dest.wait_exit().success());
}
