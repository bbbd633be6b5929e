//! The destination touches guest memory only where data arrives: a page that arrives as zero
//! and never held data is left unpopulated (no fault, no memory), and a page that held data
//! and then became zero on the source is cleared. Source and destination in one process over
//! real loopback sockets, a synthetic guest whose data sits in its first quarter.

use livemig_engine::{
    migrate, receive, Guest, IncomingConfig, Listener, MigrationConfig, Progress,
};
use livemig_vmm::synthetic::{SyntheticConfig, SyntheticGuest, Workload};
use livemig_vmm::Factory;
use livemig_wire::PAGE_SIZE;
use std::sync::atomic::{AtomicBool, Ordering};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const MEMORY: u64 = 64 << 20;
const PAGES: u64 = MEMORY / PAGE_SIZE as u64;
/// Pages holding data before the migration: the first quarter.
const DATA_PAGES: u64 = PAGES / 4;

fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; PAGE_SIZE]
}

fn write_page(g: &SyntheticGuest, page: u64, data: &[u8]) {
    g.memory()
        .write_slice(data, GuestAddress(page * PAGE_SIZE as u64))
        .unwrap();
}

/// Which pages of `[from, to)` are resident in the destination's memory (`mincore`).
fn resident_pages(g: &dyn Guest, from: u64, to: u64) -> u64 {
    let region = g.memory().iter().next().expect("one memory region");
    assert_eq!(region.start_addr().0, 0);
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(from * PAGE_SIZE as u64))
        .unwrap();
    let len = ((to - from) * PAGE_SIZE as u64) as usize;
    let mut vec = vec![0u8; len / PAGE_SIZE];
    // SAFETY: `host..host + len` lies inside the region's mapping (checked by
    // get_host_address and the region's size), which `g` keeps alive; mincore only reports
    // residency into `vec`, which has one byte per page.
    let r = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64
}

#[test]
fn zero_pages_stay_unpopulated_and_zeroed_data_is_cleared() {
    let g = SyntheticGuest::start(&SyntheticConfig {
        memory_bytes: MEMORY,
        fill: 0.0,
        workload: Workload {
            working_set_pages: 0,
            rate: 0,
            threads: 1,
        },
        backing: Default::default(),
    })
    .expect("start the synthetic guest");
    for p in 0..DATA_PAGES {
        write_page(&g, p, &page_of((p % 251) as u8 + 1));
    }

    // After the first round, every other data page of the first 64 becomes zero on the
    // source (its older copy on the destination must be cleared) and one page far in the
    // empty part gets data (it must arrive).
    let late_page = PAGES / 2 + 7;
    let changed = AtomicBool::new(false);
    let progress = |p: &Progress| {
        if matches!(p, Progress::RoundDone(_)) && !changed.swap(true, Ordering::SeqCst) {
            for p in (0..64).step_by(2) {
                write_page(&g, p, &page_of(0));
            }
            write_page(&g, late_page, &page_of(0xab));
        }
    };

    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let to = listener.local_endpoint().unwrap();
    let in_config = IncomingConfig::default();
    let config = MigrationConfig {
        channels: 2,
        ..MigrationConfig::default()
    };
    let (report, incoming) = std::thread::scope(|s| {
        let dest = s.spawn(|| receive(&listener, &Factory, &in_config, &|_| {}));
        let src = migrate(&g, &to, &config, &progress);
        (
            src.expect("migration"),
            dest.join().unwrap().expect("incoming"),
        )
    });
    assert!(changed.load(Ordering::SeqCst), "no round was reported");
    assert!(report.zero_pages > 0, "{report:?}");
    let dst = &*incoming.guest;

    // Before anything reads the destination's memory: the half that never held data (bar the
    // late page's huge page, if any) was never touched, though every page of it arrived as
    // a zero page in round 0.
    let untouched_from = PAGES / 2 + 1024;
    let resident = resident_pages(dst, untouched_from, PAGES);
    assert_eq!(
        resident,
        0,
        "{resident} of {} pages that arrived only as zero pages are resident on the destination",
        PAGES - untouched_from
    );
    assert!(
        resident_pages(dst, 0, DATA_PAGES) >= DATA_PAGES / 2,
        "the data pages should be resident (mincore sees them)"
    );

    // Every byte equal to the source's: the zeroed pages cleared, the late page arrived.
    let (mut a, mut b) = (page_of(0), page_of(0));
    for p in 0..PAGES {
        let addr = GuestAddress(p * PAGE_SIZE as u64);
        g.memory().read_slice(&mut a, addr).unwrap();
        dst.memory().read_slice(&mut b, addr).unwrap();
        assert!(a == b, "page {p} differs on the destination");
    }
    let mut zero = page_of(1);
    dst.memory().read_slice(&mut zero, GuestAddress(0)).unwrap();
    assert_eq!(zero, page_of(0), "page 0 was zeroed on the source");
}
