//! RamPages payloads: counts against the limit, exact length, page alignment.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_wire::{ram, Limits, RamPacket, RamPrefix, PAGE_SIZE};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(p) = RamPacket::decode(data, &limits) {
        for (addr, page) in p.pages() {
            assert_eq!(addr % PAGE_SIZE as u64, 0);
            assert_eq!(page.len(), PAGE_SIZE);
        }
        assert!(p.normal_count() + p.zero_count() <= limits.max_pages_per_packet as usize);
    }
    if let Some(fixed) = data.get(..ram::PREFIX_FIXED) {
        let _ = RamPrefix::decode(fixed.try_into().unwrap(), data.len() as u32, &limits);
    }
});
