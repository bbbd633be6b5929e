//! Whole frames and bare headers: magic, version, kind, length limit, CRC.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_wire::{decode_frame, FrameHeader, Limits, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok((h, payload)) = decode_frame(data, &limits) {
        assert_eq!(h.len as usize, payload.len());
    }
    if let Some(head) = data.get(..HEADER_LEN) {
        if let Ok(h) = FrameHeader::decode(head.try_into().unwrap(), &limits) {
            assert!(h.len as u64 <= h.kind.max_payload(&limits));
        }
    }
});
