//! Device state on the wire: chunk headers, credit, the non-iterable devices' blobs.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_wire::{ChunkHeader, Credit, VmStates, CHUNK_PREFIX};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..CHUNK_PREFIX) {
        if let Ok(c) = ChunkHeader::decode(h.try_into().unwrap()) {
            assert_eq!(&c.encode()[..], h);
        }
    }
    let _ = Credit::decode(data);
    for n in 0..3 {
        if let Ok(v) = VmStates::decode(data, n) {
            assert_eq!(v.encode(), data);
        }
    }
});
