//! Session set-up: SessionHello (with its device list), SessionAccept, ChannelHello, Reject,
//! MemoryFiles; and the hello and accept of each protocol version with their negotiation (the
//! first byte's low bit picks version 4 or 5, the rest is the payload).
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_wire::version::{self, Features, Versions};
use livemig_wire::{ChannelHello, MemoryFiles, Reject, SessionAccept, SessionHello};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = SessionHello::decode(data) {
        // Whatever decodes must encode back to the same bytes.
        assert_eq!(h.encode(), data);
    }
    let _ = SessionAccept::decode(data);
    if let Ok(c) = ChannelHello::decode(data) {
        assert_eq!(c.encode(), data);
    }
    let _ = Reject::decode(data);
    if let Some((&n, rest)) = data.split_first() {
        if let Ok(m) = MemoryFiles::decode(rest, n as usize) {
            assert_eq!(m.encode(), rest);
        }
        versioned(4 + (n & 1) as u16, rest);
    }
});

/// A hello and an accept of `v`'s layout: whatever decodes encodes back to the same bytes,
/// and whatever a destination agrees to passes the source's check.
fn versioned(v: u16, payload: &[u8]) {
    if let Ok((offer, hello)) = version::decode_hello(v, payload) {
        assert_eq!(version::encode_hello(v, &offer, &hello), payload);
        for has in [Features::ALL, Features::NONE, Features(payload.len() as u64)] {
            if let Ok(agreed) = version::negotiate(&offer, Versions::THIS, has) {
                assert!(offer.check(&agreed).is_ok());
                assert!(has.contains(agreed.features));
            }
        }
    }
    if let Ok((agreed, accept)) = version::decode_accept(v, payload) {
        assert_eq!(version::encode_accept(v, &agreed, &accept), payload);
    }
}
