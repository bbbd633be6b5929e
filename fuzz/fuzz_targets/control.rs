//! The small control messages of both channels.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_wire::{Complete, Loaded, Resumed, RoundAck, RoundEnd, RoundStart};

fuzz_target!(|data: &[u8]| {
    let _ = RoundEnd::decode(data);
    let _ = RoundStart::decode(data);
    let _ = RoundAck::decode(data);
    let _ = Complete::decode(data);
    if let Ok(l) = Loaded::decode(data) {
        assert_eq!(l.encode(), data);
    }
    let _ = Resumed::decode(data);
});
