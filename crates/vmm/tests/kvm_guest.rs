//! The KVM guest on a real /dev/kvm: boot, progress, pause and resume, rate, vCPUs, dirty log.
//! Skipped (with a line saying so) where /dev/kvm is not usable.

use livemig_engine::{DirtyBitmap, Guest};
use livemig_vmm::kvm::{usable_or_skip, KvmConfig, KvmGuest};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

fn start(config: KvmConfig) -> Option<KvmGuest> {
    if !usable_or_skip() {
        return None;
    }
    Some(KvmGuest::start(&config).expect("start KVM guest"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Page writes per second over `d`, measured by the guest's own counter.
fn rate_over(g: &KvmGuest, d: Duration) -> f64 {
    let (c0, t0) = (g.counter(), Instant::now());
    std::thread::sleep(d);
    (g.counter() - c0) as f64 / t0.elapsed().as_secs_f64()
}

/// CPU time of this whole process.
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[test]
fn ring3_guest_dirties_fast_and_reports_progress() {
    let Some(g) = start(KvmConfig {
        working_set_pages: 4096,
        ..KvmConfig::default()
    }) else {
        return;
    };
    wait_for("the first writes", || g.counter() > 0);
    let rate = rate_over(&g, Duration::from_millis(500));
    eprintln!("ring 3, unthrottled, 1 vCPU: {rate:.0} pages/s");
    assert!(rate > 10_000.0, "{rate:.0} pages/s");
    let (last, reports) = g.reported()[0];
    assert!(
        reports > 0 && last > 0,
        "no progress report: {:?}",
        g.reported()
    );
    g.pause().unwrap();
    let v = g.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "{:?}", v.examples);
    drop(g);
    let Some(g) = start(KvmConfig {
        vcpus: 2,
        working_set_pages: 4096,
        ..KvmConfig::default()
    }) else {
        return;
    };
    wait_for("the first writes", || g.counter() > 0);
    let rate = rate_over(&g, Duration::from_millis(500));
    eprintln!("ring 3, unthrottled, 2 vCPUs: {rate:.0} pages/s");
    assert!(rate > 10_000.0, "{rate:.0} pages/s");
}

#[test]
fn ring0_guest_runs_too() {
    let Some(g) = start(KvmConfig {
        working_set_pages: 256,
        user_mode: false,
        ..KvmConfig::default()
    }) else {
        return;
    };
    wait_for("the first writes", || g.counter() > 0);
    let rate = rate_over(&g, Duration::from_millis(500));
    eprintln!("ring 0, unthrottled, 1 vCPU: {rate:.0} pages/s");
    assert!(rate > 20.0, "{rate:.0} pages/s");
    g.pause().unwrap();
    let v = g.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "{:?}", v.examples);
}

#[test]
fn rate_limit_is_kept_without_spinning() {
    let Some(g) = start(KvmConfig {
        working_set_pages: 1024,
        rate: 20_000,
        ..KvmConfig::default()
    }) else {
        return;
    };
    wait_for("the first writes", || g.counter() > 0);
    let cpu0 = process_cpu();
    let rate = rate_over(&g, Duration::from_secs(1));
    // Informative only: other tests of this binary run at the same time.
    eprintln!(
        "ring 3, limited to 20000 pages/s: {rate:.0} pages/s, process CPU {:.0}% of one core",
        (process_cpu() - cpu0).as_secs_f64() * 100.0
    );
    assert!((10_000.0..24_000.0).contains(&rate), "{rate:.0} pages/s");
    g.set_workload(1024, 5_000).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let rate = rate_over(&g, Duration::from_secs(1));
    eprintln!("ring 3, limited to 5000 pages/s: {rate:.0} pages/s");
    assert!((2_500.0..6_000.0).contains(&rate), "{rate:.0} pages/s");
}

#[test]
fn pause_stops_the_guest_and_resume_continues() {
    let Some(g) = start(KvmConfig {
        working_set_pages: 512,
        ..KvmConfig::default()
    }) else {
        return;
    };
    for round in 0..5 {
        wait_for("writes", || g.counter() > round * 1000);
        let t = Instant::now();
        g.pause().unwrap();
        let paused_in = t.elapsed();
        assert!(
            paused_in < Duration::from_millis(100),
            "pause took {paused_in:?}"
        );
        let c = g.counter();
        let v = g.verify().unwrap();
        assert_eq!(v.pages_mismatched, 0, "round {round}: {:?}", v.examples);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(g.counter(), c, "a paused guest must not write");
        g.resume().unwrap();
        wait_for("writes after resume", || g.counter() > c);
    }
}

#[test]
fn two_vcpus_share_the_working_set() {
    let Some(g) = start(KvmConfig {
        vcpus: 2,
        working_set_pages: 1000,
        fill: 0.5,
        ..KvmConfig::default()
    }) else {
        return;
    };
    wait_for("both vCPUs", || g.reported().iter().all(|&(_, n)| n > 2));
    g.pause().unwrap();
    let v = g.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "{:?}", v.examples);
    g.resume().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    g.pause().unwrap();
    let v = g.verify().unwrap();
    assert_eq!(v.pages_mismatched, 0, "{:?}", v.examples);
}

#[test]
fn dirty_log_reports_the_working_set_and_vmm_writes() {
    let Some(g) = start(KvmConfig {
        working_set_pages: 300,
        rate: 50_000,
        ..KvmConfig::default()
    }) else {
        return;
    };
    let l = *g.layout();
    let ranges = g.descriptor().ranges;
    wait_for("writes", || g.counter() > 0);
    g.start_dirty_log().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // A page the VMM writes itself, outside the working set.
    let vmm_page = l.first_data_page + 1000;
    g.memory()
        .write_obj(7u64, GuestAddress(vmm_page * 4096))
        .unwrap();
    let mut d = DirtyBitmap::new(&ranges);
    g.sync_dirty_log(&mut d).unwrap();
    let pages: Vec<u64> = d.addrs().map(|a| a / 4096).collect();
    let ws = l.first_data_page..l.first_data_page + 300;
    let in_ws = pages.iter().filter(|p| ws.contains(p)).count();
    assert!(in_ws >= 250, "{in_ws} working-set pages dirty of 300");
    assert!(pages.contains(&vmm_page), "the VMM's write is missing");
    // Nothing else but the parameter block, the generation table, the page tables (the CPU
    // sets accessed and dirty bits in them) and the vCPUs' stacks.
    let table = l.gen_addr(0) / 4096..l.gen_addr(l.pages()).div_ceil(4096);
    let page_tables = 8..0x1a;
    let stacks = 0x20..0x30;
    for p in &pages {
        assert!(
            ws.contains(p)
                || *p == vmm_page
                || *p == 3
                || table.contains(p)
                || page_tables.contains(p)
                || stacks.contains(p),
            "unexpected dirty page {p}"
        );
    }
    // Cleared: a paused guest logs nothing more.
    g.pause().unwrap();
    let mut d = DirtyBitmap::new(&ranges);
    g.sync_dirty_log(&mut d).unwrap();
    let mut d2 = DirtyBitmap::new(&ranges);
    g.sync_dirty_log(&mut d2).unwrap();
    assert_eq!(d2.count(), 0, "the log was not cleared");
}
