//! Postcopy: PostcopyStart (for a fixed guest of three ranges), PageRequest, PostcopyDone,
//! PostcopyComplete.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_wire::{
    MemoryRange, PageRequest, PostcopyComplete, PostcopyDone, PostcopyStart, PAGE_SIZE,
};

/// A plausible guest: 1 MiB at 0 (whole words), 100 pages at 1 MiB + 64 KiB (a partly used
/// last word), 1 page at 4 GiB.
const RANGES: [MemoryRange; 3] = [
    MemoryRange {
        guest_addr: 0,
        size: 1 << 20,
    },
    MemoryRange {
        guest_addr: (1 << 20) + (64 << 10),
        size: 100 * PAGE_SIZE as u64,
    },
    MemoryRange {
        guest_addr: 1 << 32,
        size: PAGE_SIZE as u64,
    },
];

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = PostcopyStart::decode(data, &RANGES) {
        // Whatever decodes must encode back to the same bytes, and list only guest pages.
        assert_eq!(s.encode(), data);
        assert_eq!(s.addrs().count() as u64, s.count());
        assert!(s.addrs().all(|a| s.contains(a)));
    }
    if let Ok(p) = PageRequest::decode(data) {
        assert_eq!(p.encode(), data);
    }
    let _ = PostcopyDone::decode(data);
    if let Ok(c) = PostcopyComplete::decode(data) {
        assert!(c.requested <= c.pages);
    }
});
