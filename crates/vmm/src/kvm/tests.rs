//! Unit tests of the KVM guest on a real /dev/kvm (skipped where it is not usable).

use super::*;
use std::time::{Duration, Instant};

/// A small guest, or None (with the skip line) where /dev/kvm is not usable.
fn guest(config: KvmConfig) -> Option<KvmGuest> {
    if !usable_or_skip() {
        return None;
    }
    Some(KvmGuest::start(&config).expect("start KVM guest"))
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn boots_and_the_counter_grows() {
    let Some(g) = guest(KvmConfig::default()) else {
        return;
    };
    wait_for("the counter", Duration::from_secs(10), || {
        g.counter() > 5000
    });
    g.pause().unwrap();
    let c = g.counter();
    let v = g.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "{:?}", v.examples);
    assert_eq!(v.pages_checked, g.layout().pages());
    assert!(g.reported()[0].1 > 0, "no progress report came");
    let blob = g.save_state().unwrap();
    let st = KvmState::decode(&blob).unwrap();
    eprintln!(
        "state blob: {} bytes, {} MSRs per vCPU",
        blob.len(),
        st.vcpus[0].msrs.len()
    );
    assert!(st.vcpus[0].msrs.len() > 10);
    assert_eq!(st.vcpus[0].sregs.cs.dpl, 3, "the payload runs in ring 3");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.counter(), c, "a paused guest must not write");
    g.resume().unwrap();
    wait_for("the counter after resume", Duration::from_secs(10), || {
        g.counter() > c
    });
}
