//! Moving a running KVM guest to a second guest by hand, the way a migration does: copy all
//! memory while it runs, then the dirty pages round after round, pause, the last dirty pages
//! and the state. Every page must be exact and the counter must go on from where it paused.
//! Skipped (with a line saying so) where /dev/kvm is not usable.

use livemig_engine::{DirtyBitmap, Guest, GuestFactory};
use livemig_vmm::kvm::{create_paused, KvmConfig, KvmGuest};
use livemig_vmm::Factory;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

const PAGE: u64 = 4096;

fn usable() -> bool {
    livemig_vmm::kvm::usable_or_skip()
}

fn counter(g: &dyn Guest) -> u64 {
    // The vCPU counters are in guest memory: slot 0 at 0x3100, one per 64 bytes.
    let n = g.descriptor().vcpus as u64;
    (0..n)
        .map(|v| {
            g.memory()
                .read_obj::<u64>(GuestAddress(0x3100 + 64 * v))
                .unwrap()
        })
        .sum()
}

fn copy_pages(from: &dyn Guest, to: &dyn Guest, pages: impl Iterator<Item = u64>) -> u64 {
    let mut buf = [0u8; PAGE as usize];
    let mut n = 0;
    for p in pages {
        let a = GuestAddress(p * PAGE);
        from.memory().read_slice(&mut buf, a).unwrap();
        to.memory().write_slice(&buf, a).unwrap();
        n += 1;
    }
    n
}

/// Migrates a running `from` into a new paused guest and resumes it there; returns the new
/// guest and the counter at the pause.
fn migrate_live(from: &dyn Guest) -> (Box<dyn Guest>, u64) {
    let desc = from.descriptor();
    let to = Factory.create(&desc).expect("create destination");
    let pages = desc.memory_bytes() / PAGE;
    from.start_dirty_log().unwrap();
    copy_pages(from, &*to, 0..pages);
    for _ in 0..3 {
        let mut d = DirtyBitmap::new(&desc.ranges);
        from.sync_dirty_log(&mut d).unwrap();
        copy_pages(from, &*to, d.addrs().map(|a| a / PAGE));
    }
    from.pause().unwrap();
    let mut d = DirtyBitmap::new(&desc.ranges);
    from.sync_dirty_log(&mut d).unwrap();
    copy_pages(from, &*to, d.addrs().map(|a| a / PAGE));
    let blob = from.save_state().unwrap();
    let paused_at = counter(from);
    let v = from.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "source: {:?}", v.examples);
    to.restore_state(&blob).unwrap();
    let v = to.verify().unwrap();
    assert_eq!(
        v.pages_mismatched, 0,
        "destination before resume: {:?}",
        v.examples
    );
    assert_eq!(
        counter(&*to),
        paused_at,
        "the counter must arrive as it was"
    );
    to.resume().unwrap();
    (to, paused_at)
}

fn wait_past(g: &dyn Guest, c: u64) {
    let t = Instant::now();
    while counter(g) <= c + 100 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the guest does not run on"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn check_after(g: &dyn Guest, paused_at: u64) {
    wait_past(g, paused_at);
    g.pause().unwrap();
    let v = g.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "after resume: {:?}", v.examples);
    // verify also checks that the counters add up to the generations: a counter reset or
    // replayed after the move would break that.
    assert!(counter(g) > paused_at);
}

#[test]
fn running_guest_moves_and_its_counter_goes_on() {
    if !usable() {
        return;
    }
    let g = KvmGuest::start(&KvmConfig {
        memory_bytes: 64 << 20,
        fill: 0.3,
        working_set_pages: 2048,
        rate: 200_000,
        ..KvmConfig::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (to, paused_at) = migrate_live(&g);
    drop(g);
    check_after(&*to, paused_at);
}

#[test]
fn unthrottled_two_vcpu_guest_moves_exactly() {
    if !usable() {
        return;
    }
    let g = KvmGuest::start(&KvmConfig {
        memory_bytes: 128 << 20,
        vcpus: 2,
        fill: 0.5,
        working_set_pages: 8192,
        rate: 0,
        ..KvmConfig::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let (to, paused_at) = migrate_live(&g);
    drop(g);
    check_after(&*to, paused_at);
}

#[test]
fn ping_pong_three_hops() {
    if !usable() {
        return;
    }
    let first = KvmGuest::start(&KvmConfig {
        working_set_pages: 1024,
        rate: 100_000,
        fill: 0.2,
        ..KvmConfig::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let (mut here, mut paused_at) = migrate_live(&first);
    drop(first);
    for hop in 2..=4 {
        wait_past(&*here, paused_at);
        let (next, at) = migrate_live(&*here);
        assert!(at > paused_at, "hop {hop}: counter {at} after {paused_at}");
        here = next;
        paused_at = at;
    }
    check_after(&*here, paused_at);
}

#[test]
fn state_blobs_that_do_not_fit_are_rejected() {
    if !usable() {
        return;
    }
    let g = KvmGuest::start(&KvmConfig::default()).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    g.pause().unwrap();
    let blob = g.save_state().unwrap();
    let to = create_paused(&g.descriptor()).unwrap();
    // Unknown version.
    let mut b = blob.clone();
    b[4] = 99;
    let e = to.restore_state(&b).unwrap_err().to_string();
    assert!(e.contains("version 99"), "{e}");
    // Wrong size: cut short.
    let e = to
        .restore_state(&blob[..blob.len() - 5])
        .unwrap_err()
        .to_string();
    assert!(e.contains("restore state"), "{e}");
    // Not a KVM state at all.
    assert!(to.restore_state(b"LMSY\x01\x00").is_err());
    // A state for another guest shape.
    let other = create_paused(&livemig_wire::GuestDescriptor {
        ranges: vec![livemig_wire::MemoryRange {
            guest_addr: 0,
            size: 32 << 20,
        }],
        ..g.descriptor()
    })
    .unwrap();
    let e = other.restore_state(&blob).unwrap_err().to_string();
    assert!(e.contains("67108864 bytes"), "{e}");
    // The good one still loads after all that.
    to.restore_state(&blob).unwrap();
}

#[test]
fn verify_catches_a_missed_dirty_page_and_a_reset_counter() {
    if !usable() {
        return;
    }
    let g = KvmGuest::start(&KvmConfig {
        working_set_pages: 512,
        ..KvmConfig::default()
    })
    .unwrap();
    let first_data_page = g.layout().first_data_page;
    let desc = g.descriptor();
    let to = Factory.create(&desc).unwrap();
    // Every page of the working set written once before the copy, so a stale one is not zero.
    wait_past(&g, 512);
    g.start_dirty_log().unwrap();
    copy_pages(&g, &*to, 0..desc.memory_bytes() / PAGE);
    // Every page of the working set written again at least twice.
    let c0 = counter(&g);
    wait_past(&g, c0 + 2 * 512);
    g.pause().unwrap();
    to.restore_state(&g.save_state().unwrap()).unwrap();
    // The last dirty pass, but one data page is lost on the way.
    let mut d = DirtyBitmap::new(&desc.ranges);
    g.sync_dirty_log(&mut d).unwrap();
    let lost = first_data_page + 100;
    let dirty: Vec<u64> = d.addrs().map(|a| a / PAGE).collect();
    assert!(dirty.contains(&lost));
    copy_pages(&g, &*to, dirty.iter().copied().filter(|&p| p != lost));
    let v = to.verify().unwrap();
    assert_eq!(v.pages_mismatched, 1, "{:?}", v.examples);
    assert!(
        v.examples[0].contains("WrongGeneration"),
        "{:?}",
        v.examples
    );
    // With it, exact.
    copy_pages(&g, &*to, std::iter::once(lost));
    let v = to.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "{:?}", v.examples);
    // A counter that went back is caught.
    to.memory().write_obj(1u64, GuestAddress(0x3100)).unwrap();
    let v = to.verify().unwrap();
    assert!(
        v.examples.iter().any(|e| e.contains("reset or repeated")),
        "{:?}",
        v.examples
    );
}
