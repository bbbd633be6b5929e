//! Writes the frozen protocol-version-4 fixtures (`crates/wire/tests/fixtures/v4/`): whole
//! frames (header and payload) as this build's encoders write them, one hex file each, 32
//! bytes a line. Run once, at the last commit that speaks version 4 only, before the
//! encoders learnt version negotiation; the fixtures are then never regenerated: they stand
//! for what a version-4 peer sends, which later decoders must keep reading.
//!
//! `cargo run -p livemig-wire --example freeze_v4 -- crates/wire/tests/fixtures/v4`

use livemig_wire::*;
use std::path::Path;

fn hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for line in bytes.chunks(32) {
        for b in line {
            s.push_str(&format!("{b:02x}"));
        }
        s.push('\n');
    }
    s
}

fn write(dir: &Path, name: &str, kind: FrameKind, payload: &[u8]) {
    let frame = encode_frame(kind, payload);
    assert!(decode_frame(&frame, &Limits::default()).is_ok());
    std::fs::write(dir.join(format!("{name}.hex")), hex(&frame)).unwrap();
}

fn hello(ram: RamTransfer, postcopy: bool, resume: bool) -> SessionHello {
    SessionHello {
        session: SessionId(*b"livemig-v4-fixtr"),
        channels: 4,
        pages_per_packet: 128,
        guest: GuestDescriptor {
            kind: "synthetic".into(),
            vcpus: 2,
            page_size: 4096,
            ranges: vec![
                MemoryRange {
                    guest_addr: 0,
                    size: 1 << 20,
                },
                MemoryRange {
                    guest_addr: 1 << 32,
                    size: 1 << 21,
                },
            ],
        },
        devices: DeviceSetup {
            transfer: DeviceTransfer::Multifd,
            chunk_size: 1 << 20,
            window: 8,
            buffer_cap: 64 << 20,
            devices: vec![WireDevice {
                kind: "vfio-sim".into(),
                name: "gpu0".into(),
                config: vec![1, 2, 3, 4],
            }],
            vmstates: vec![WireDevice {
                kind: "vmstate-sim".into(),
                name: "rtc".into(),
                config: vec![],
            }],
        },
        ram,
        peer_timeout_ms: 30_000,
        postcopy,
        resume,
    }
}

/// CRC32C, as the page trailer carries it.
fn crc32c_of(data: &[u8]) -> u32 {
    // The wire crate's own CRC (Castagnoli), reached through a frame header.
    FrameHeader::for_payload(FrameKind::Complete, data).crc
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: freeze_v4 <dir>");
    let dir = Path::new(&dir);
    assert_eq!(PROTOCOL_VERSION, 4, "the fixtures are of version 4");
    let h = |name, hello: SessionHello| write(dir, name, FrameKind::SessionHello, &hello.encode());
    h("session_hello", hello(RamTransfer::Copy, false, false));
    h("session_hello_local", hello(RamTransfer::Local, false, false));
    h("session_hello_postcopy", hello(RamTransfer::Copy, true, false));
    h("session_hello_resume", hello(RamTransfer::Copy, true, true));
    let accept = SessionAccept {
        window: 8,
        buffer_cap: 64 << 20,
        peer_timeout_ms: 20_000,
    };
    write(dir, "session_accept", FrameKind::SessionAccept, &accept.encode());
    let ch = ChannelHello {
        session: SessionId(*b"livemig-v4-fixtr"),
        index: 3,
    };
    write(dir, "channel_hello", FrameKind::ChannelHello, &ch.encode());
    write(dir, "channel_accept", FrameKind::ChannelAccept, &[]);
    let reject = Reject::new(RejectCode::Unsupported, "no such guest kind 'kvm'");
    write(dir, "reject", FrameKind::Reject, &reject.encode());
    // Two pages with data (bytes 0, 1, 2, ... and all 0xa5), one zero page, with page CRCs;
    // and the same unchecked.
    let mut data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    data.extend(std::iter::repeat_n(0xa5u8, 4096));
    let normal = [0x3000, (1 << 32) + 0x5000];
    let zero = [0x7000];
    let checked = ram::encode_packet(2, &normal, &data, &zero, true);
    write(dir, "ram_pages", FrameKind::RamPages, &checked);
    let unchecked = ram::encode_packet(2, &normal, &data, &zero, false);
    write(dir, "ram_pages_unchecked", FrameKind::RamPages, &unchecked);
    // Compressed: the wire crate checks lengths only, so a stand-in for the zstd frame.
    let crcs: Vec<u32> = data.chunks_exact(4096).map(crc32c_of).collect();
    let frame = b"a stand-in for a zstd frame of two pages";
    let compressed = ram::encode_compressed_packet(2, &normal, &zero, frame, Some(&crcs));
    write(dir, "ram_pages_compressed", FrameKind::RamPages, &compressed);
}
