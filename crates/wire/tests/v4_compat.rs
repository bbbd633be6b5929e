//! Frames of protocol version 4, frozen as a version-4 livemig wrote them
//! (`fixtures/v4/`), read by this build's decoders; and this build, speaking version 4 to
//! an old peer, writes them byte for byte.

use livemig_wire::version::{decode_accept, decode_hello, encode_accept, encode_hello};
use livemig_wire::*;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/v4/{name}.hex",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hex: String = text.split_whitespace().collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The fixture's frame, checked (magic, version 4, kind, length, CRC), and its payload.
fn frame(name: &str, kind: FrameKind) -> (Vec<u8>, Vec<u8>) {
    let bytes = fixture(name);
    let (h, payload) = decode_frame(&bytes, &Limits::default()).unwrap();
    assert_eq!(h.version, 4, "{name}");
    assert_eq!(h.kind, kind, "{name}");
    let payload = payload.to_vec();
    (bytes, payload)
}

const SESSION: SessionId = SessionId(*b"livemig-v4-fixtr");

fn hello(ram: RamTransfer, postcopy: bool, resume: bool) -> SessionHello {
    let range = |guest_addr, size| MemoryRange { guest_addr, size };
    let device = |kind: &str, name: &str, config: Vec<u8>| WireDevice {
        kind: kind.into(),
        name: name.into(),
        config,
    };
    SessionHello {
        session: SESSION,
        channels: 4,
        pages_per_packet: 128,
        guest: GuestDescriptor {
            kind: "synthetic".into(),
            vcpus: 2,
            page_size: 4096,
            ranges: vec![range(0, 1 << 20), range(1 << 32, 1 << 21)],
        },
        devices: DeviceSetup {
            transfer: DeviceTransfer::Multifd,
            chunk_size: 1 << 20,
            window: 8,
            buffer_cap: 64 << 20,
            devices: vec![device("vfio-sim", "gpu0", vec![1, 2, 3, 4])],
            vmstates: vec![device("vmstate-sim", "rtc", vec![])],
        },
        ram,
        peer_timeout_ms: 30_000,
        postcopy,
        resume,
    }
}

#[test]
fn v4_session_hellos_read_as_version_4_offers() {
    let cases = [
        (
            "session_hello",
            hello(RamTransfer::Copy, false, false),
            Features::NONE,
        ),
        (
            "session_hello_local",
            hello(RamTransfer::Local, false, false),
            Features::LOCAL,
        ),
        (
            "session_hello_postcopy",
            hello(RamTransfer::Copy, true, false),
            Features::POSTCOPY,
        ),
        (
            "session_hello_resume",
            hello(RamTransfer::Copy, true, true),
            Features::POSTCOPY.union(Features::POSTCOPY_RECOVERY),
        ),
    ];
    for (name, want, needs) in cases {
        let (bytes, payload) = frame(name, FrameKind::SessionHello);
        let (offer, got) = decode_hello(4, &payload).unwrap();
        assert_eq!(got, want, "{name}");
        assert_eq!(offer.versions, Versions { min: 4, max: 4 }, "{name}");
        assert_eq!(offer.features, Features::V4, "{name}");
        assert_eq!(offer.required, needs, "{name}");
        // A destination of this build agrees on version 4 with every version-4 feature.
        let agreed = version::negotiate(&offer, Versions::THIS, Features::ALL).unwrap();
        assert_eq!(agreed, Agreed::V4, "{name}");
        // And a source of this build speaking version 4 writes the very same frame.
        let again =
            encode_frame_versioned(4, FrameKind::SessionHello, &encode_hello(4, &offer, &got));
        assert_eq!(again, bytes, "{name}");
    }
}

#[test]
fn a_v4_hello_is_not_read_as_version_5() {
    let (_, payload) = frame("session_hello", FrameKind::SessionHello);
    assert!(decode_hello(5, &payload).is_err());
}

#[test]
fn v4_session_accept_reads_as_version_4_with_its_features() {
    let (bytes, payload) = frame("session_accept", FrameKind::SessionAccept);
    let (agreed, accept) = decode_accept(4, &payload).unwrap();
    let want = SessionAccept {
        window: 8,
        buffer_cap: 64 << 20,
        peer_timeout_ms: 20_000,
    };
    assert_eq!(accept, want);
    assert_eq!(agreed, Agreed::V4);
    // A source of this build that offered version 4 takes it.
    let offer = version::Offer::v4(&hello(RamTransfer::Copy, false, false));
    offer.check(&agreed).unwrap();
    let again = encode_frame_versioned(
        4,
        FrameKind::SessionAccept,
        &encode_accept(4, &agreed, &want),
    );
    assert_eq!(again, bytes);
}

#[test]
fn v4_channel_frames_and_reject_are_unchanged() {
    let (bytes, payload) = frame("channel_hello", FrameKind::ChannelHello);
    let c = ChannelHello::decode(&payload).unwrap();
    assert_eq!(
        c,
        ChannelHello {
            session: SESSION,
            index: 3
        }
    );
    assert_eq!(encode_frame(FrameKind::ChannelHello, &c.encode()), bytes);
    let (bytes, payload) = frame("channel_accept", FrameKind::ChannelAccept);
    assert!(payload.is_empty());
    assert_eq!(encode_frame(FrameKind::ChannelAccept, &[]), bytes);
    let (bytes, payload) = frame("reject", FrameKind::Reject);
    let r = Reject::decode(&payload).unwrap();
    assert_eq!(
        r,
        Reject::new(RejectCode::Unsupported, "no such guest kind 'kvm'")
    );
    assert_eq!(encode_frame(FrameKind::Reject, &r.encode()), bytes);
}

fn pages() -> (Vec<u8>, [u64; 2], [u64; 1]) {
    let mut data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    data.extend(std::iter::repeat_n(0xa5u8, 4096));
    (data, [0x3000, (1 << 32) + 0x5000], [0x7000])
}

#[test]
fn v4_ram_pages_read_page_for_page() {
    let (data, normal, zero) = pages();
    for (name, checked) in [("ram_pages", true), ("ram_pages_unchecked", false)] {
        let (bytes, payload) = frame(name, FrameKind::RamPages);
        let pkt = RamPacket::decode(&payload, &Limits::default()).unwrap();
        assert_eq!(pkt.round, 2);
        assert_eq!(pkt.normal_addrs().collect::<Vec<_>>(), normal);
        assert_eq!(pkt.zero_addrs().collect::<Vec<_>>(), zero);
        let got: Vec<(u64, Vec<u8>, bool)> = pkt
            .checked_pages()
            .map(|(a, d, ok)| (a, d.to_vec(), ok))
            .collect();
        assert_eq!(got.len(), 2, "{name}");
        for ((a, d, ok), (want_a, want_d)) in got.iter().zip(normal.iter().zip(data.chunks(4096))) {
            assert_eq!((a, d.as_slice(), *ok), (want_a, want_d, true), "{name}");
        }
        let again = ram::encode_packet(2, &normal, &data, &zero, checked);
        assert_eq!(encode_frame(FrameKind::RamPages, &again), bytes, "{name}");
    }
}

#[test]
fn v4_compressed_ram_pages_pass_the_length_checks() {
    let (bytes, payload) = frame("ram_pages_compressed", FrameKind::RamPages);
    let fixed: [u8; ram::PREFIX_FIXED] = payload[..ram::PREFIX_FIXED].try_into().unwrap();
    let prefix = RamPrefix::decode(&fixed, payload.len() as u32, &Limits::default()).unwrap();
    assert!(prefix.compressed && prefix.checked);
    assert_eq!((prefix.round, prefix.normal, prefix.zero), (2, 2, 1));
    assert_eq!(
        prefix.data_len,
        b"a stand-in for a zstd frame of two pages".len()
    );
    assert!(RamPacket::decode(&payload, &Limits::default()).is_ok());
    assert_eq!(bytes.len(), HEADER_LEN + payload.len());
}
