//! Session set-up: SessionHello (with its device list), SessionAccept, ChannelHello, Reject,
//! MemoryFiles.
#![no_main]
use libfuzzer_sys::fuzz_target;
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
    }
});
