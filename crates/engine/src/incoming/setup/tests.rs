use super::*;
use livemig_wire::version::{encode_hello, Features, Offer};
use livemig_wire::{DeviceSetup, GuestDescriptor, MemoryRange, RamTransfer, SessionId};

fn hello(postcopy: bool) -> SessionHello {
    SessionHello {
        session: SessionId([3; 16]),
        channels: 2,
        pages_per_packet: 128,
        guest: GuestDescriptor {
            kind: "synthetic".into(),
            vcpus: 1,
            page_size: 4096,
            ranges: vec![MemoryRange {
                guest_addr: 0,
                size: 1 << 20,
            }],
        },
        devices: DeviceSetup::default(),
        ram: RamTransfer::Copy,
        peer_timeout_ms: 30_000,
        postcopy,
        resume: false,
    }
}

fn offer(required: Features) -> Offer {
    Offer {
        versions: Versions::THIS,
        features: Features::ALL,
        required,
    }
}

fn open(layout: u16, buf: &[u8], protocol: Protocol) -> Result<(SessionHello, Agreed), Reject> {
    let opened = open_session(
        layout,
        buf,
        &IncomingConfig::default(),
        protocol,
        Awaiting::New,
    );
    opened.map(|(hello, agreed, _)| (hello, agreed))
}

const V4_ONLY: Protocol = Protocol {
    only: Some(4),
    lack: Features::NONE,
};

#[test]
fn a_version_5_hello_agrees_on_5_with_the_features_both_have() {
    let h = hello(true);
    let buf = encode_hello(5, &offer(Features::POSTCOPY), &h);
    let lacking = Protocol {
        only: None,
        lack: Features::ZSTD,
    };
    let (got, agreed) = open(5, &buf, lacking).unwrap();
    assert_eq!(got, h);
    assert_eq!(agreed.version, 5);
    assert_eq!(agreed.features, Features::ALL.without(Features::ZSTD));
}

#[test]
fn a_version_4_hello_is_taken_as_version_4() {
    let h = hello(true);
    for protocol in [Protocol::default(), V4_ONLY] {
        let (got, agreed) = open(4, &h.encode(), protocol).unwrap();
        assert_eq!((got, agreed), (h.clone(), Agreed::V4));
    }
}

#[test]
fn a_version_4_destination_refuses_a_version_5_hello_as_version_4_does() {
    let buf = encode_hello(5, &offer(Features::NONE), &hello(false));
    let r = open(5, &buf, V4_ONLY).unwrap_err();
    // A protocol error naming the version: what a newer source falls back on.
    assert_eq!(r.code, RejectCode::Protocol);
    assert_eq!(
        r.reason,
        "unsupported protocol version 5 (this build speaks version 4)"
    );
}

#[test]
fn a_required_feature_missing_here_is_refused_by_name_and_not_as_a_version() {
    let h = hello(true);
    let lacking = Protocol {
        only: None,
        lack: Features::POSTCOPY,
    };
    for (layout, buf) in [
        (5, encode_hello(5, &offer(Features::POSTCOPY), &h)),
        (4, h.encode()),
    ] {
        let r = open(layout, &buf, lacking).unwrap_err();
        assert_eq!(r.code, RejectCode::Unsupported, "{r}");
        assert!(r.reason.contains("lacks postcopy"), "{r}");
    }
}

#[test]
fn a_hello_that_does_not_decode_in_its_layout_is_a_protocol_error() {
    let buf = hello(false).encode();
    let r = open(5, &buf, Protocol::default()).unwrap_err();
    assert_eq!(r.code, RejectCode::Protocol);
    assert!(r.reason.starts_with("bad SessionHello"), "{r}");
}
