use super::*;
use crate::session::{GuestDescriptor, MemoryRange, SessionId};
use crate::DeviceSetup;

fn v(min: u16, max: u16) -> Versions {
    Versions::new(min, max).unwrap()
}

fn offer(min: u16, max: u16, features: Features, required: Features) -> Offer {
    Offer {
        versions: v(min, max),
        features,
        required,
    }
}

fn hello() -> SessionHello {
    SessionHello {
        session: SessionId([9; 16]),
        channels: 2,
        pages_per_packet: 64,
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
        peer_timeout_ms: 5000,
        postcopy: false,
        resume: false,
    }
}

#[test]
fn overlapping_ranges_agree_on_the_highest_common_version() {
    let all = Features::ALL;
    for (src, dst, want) in [
        ((4, 5), (4, 5), 5),
        ((4, 5), (4, 4), 4),
        ((4, 4), (4, 5), 4),
        ((4, 9), (5, 7), 7),
        ((3, 5), (4, 6), 5),
        ((5, 5), (5, 5), 5),
    ] {
        let o = offer(src.0, src.1, all, Features::NONE);
        let agreed = negotiate(&o, v(dst.0, dst.1), all).unwrap();
        assert_eq!(agreed.version, want, "{src:?} with {dst:?}");
        assert_eq!(agreed.features, all);
        o.check(&agreed).unwrap();
    }
}

#[test]
fn ranges_that_do_not_meet_are_refused_naming_both() {
    for (src, dst) in [((6, 7), (4, 5)), ((4, 4), (5, 5)), ((1, 3), (4, 5))] {
        let o = offer(src.0, src.1, Features::ALL, Features::NONE);
        let err = negotiate(&o, v(dst.0, dst.1), Features::ALL).unwrap_err();
        assert_eq!(
            err,
            NegotiationError::NoCommonVersion {
                offered: o.versions,
                spoken: v(dst.0, dst.1)
            }
        );
    }
    let err = negotiate(
        &offer(6, 7, Features::ALL, Features::NONE),
        Versions::THIS,
        Features::ALL,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("source speaks versions 6 to 7"), "{err}");
    assert!(err.contains("this destination versions 4 to 5"), "{err}");
}

#[test]
fn a_required_feature_the_destination_lacks_is_named() {
    let need = Features::POSTCOPY.union(Features::POSTCOPY_RECOVERY);
    let o = offer(4, 5, Features::ALL, need);
    let has = Features::ALL.without(Features::POSTCOPY_RECOVERY);
    let err = negotiate(&o, Versions::THIS, has).unwrap_err();
    assert_eq!(
        err,
        NegotiationError::MissingFeatures {
            missing: Features::POSTCOPY_RECOVERY
        }
    );
    assert_eq!(
        err.to_string(),
        "this destination lacks postcopy recovery, which the source requires"
    );
    // A bit this build does not know, required: named by its number.
    let o = offer(4, 5, Features(1 << 40 | 1), Features(1 << 40));
    let err = negotiate(&o, Versions::THIS, Features::ALL).unwrap_err();
    assert!(err.to_string().contains("feature bit 40"), "{err}");
}

#[test]
fn offered_features_meet_the_destinations() {
    // Unknown bits offered by a newer source are dropped, not refused; a feature the
    // destination lacks but the source only offers is left out (the source falls back).
    let o = offer(4, 5, Features(Features::ALL.0 | 1 << 33), Features::LOCAL);
    let has = Features::ALL.without(Features::ZSTD);
    let agreed = negotiate(&o, Versions::THIS, has).unwrap();
    assert_eq!(agreed.features, has);
    assert!(!agreed.features.contains(Features::ZSTD));
    o.check(&agreed).unwrap();
}

#[test]
fn the_source_checks_the_answer() {
    let o = offer(4, 5, Features::ZSTD.union(Features::LOCAL), Features::LOCAL);
    let ok = Agreed {
        version: 5,
        features: Features::LOCAL,
    };
    o.check(&ok).unwrap();
    let err = |a: Agreed| o.check(&a).unwrap_err().to_string();
    assert!(err(Agreed { version: 6, ..ok }).contains("agreed protocol version = 6"));
    assert!(err(Agreed { version: 3, ..ok }).contains("agreed protocol version = 3"));
    let extra = Agreed {
        features: Features::LOCAL.union(Features::POSTCOPY),
        ..ok
    };
    assert!(err(extra).contains("did not offer"));
    let short = Agreed {
        features: Features::ZSTD,
        ..ok
    };
    assert!(err(short).contains("required features left out"));
}

#[test]
fn hello_of_version_5_round_trips_and_version_4_is_the_session_alone() {
    let h = SessionHello {
        postcopy: true,
        ..hello()
    };
    let o = offer(4, 5, Features::ALL, Features::POSTCOPY);
    let enc = encode_hello(5, &o, &h);
    assert_eq!(enc.len(), h.encode().len() + 20);
    assert_eq!(decode_hello(5, &enc).unwrap(), (o, h.clone()));
    // Version 4: exactly the old hello; what it stands for follows from its fields.
    assert_eq!(encode_hello(4, &o, &h), h.encode());
    let (o4, h4) = decode_hello(4, &h.encode()).unwrap();
    assert_eq!(h4, h);
    assert_eq!(o4.versions, v(4, 4));
    assert_eq!(o4.features, Features::V4);
    assert_eq!(o4.required, Features::POSTCOPY);
    // A version-5 hello is not a version-4 one, nor the reverse.
    assert!(decode_hello(4, &enc).is_err());
    assert!(decode_hello(5, &h.encode()).is_err());
}

#[test]
fn hello_of_version_5_refuses_an_inconsistent_offer() {
    let h = hello();
    let bad = |o: Offer, h: &SessionHello| decode_hello(5, &encode_hello(5, &o, h)).unwrap_err();
    let backwards = Offer {
        versions: Versions { min: 5, max: 4 },
        ..offer(4, 5, Features::ALL, Features::NONE)
    };
    let e = bad(backwards, &h);
    assert!(e.to_string().contains("oldest version"), "{e}");
    let e = bad(offer(3, 4, Features::ALL, Features::NONE), &h);
    assert!(e.to_string().contains("newest version = 4"), "{e}");
    let e = bad(offer(4, 5, Features::ZSTD, Features::LOCAL), &h);
    assert!(e.to_string().contains("required but not offered"), "{e}");
    let local = SessionHello {
        ram: RamTransfer::Local,
        ..hello()
    };
    let e = bad(offer(4, 5, Features::ALL, Features::NONE), &local);
    assert!(e.to_string().contains("without requiring"), "{e}");
    let resume = SessionHello {
        postcopy: true,
        resume: true,
        ..hello()
    };
    let e = bad(offer(4, 5, Features::ALL, Features::POSTCOPY), &resume);
    assert!(e.to_string().contains("required features = 16"), "{e}");
    // Truncated anywhere: an error, never a panic.
    let enc = encode_hello(5, &offer(4, 5, Features::ALL, Features::NONE), &h);
    for cut in 0..enc.len() {
        assert!(decode_hello(5, &enc[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn accept_of_version_5_round_trips_and_version_4_is_the_accept_alone() {
    let a = SessionAccept {
        window: 4,
        buffer_cap: 1 << 20,
        peer_timeout_ms: 1000,
    };
    let agreed = Agreed {
        version: 5,
        features: Features::ZSTD,
    };
    let enc = encode_accept(5, &agreed, &a);
    assert_eq!(decode_accept(5, &enc).unwrap(), (agreed, a));
    assert_eq!(encode_accept(4, &Agreed::V4, &a), a.encode());
    assert_eq!(decode_accept(4, &a.encode()).unwrap(), (Agreed::V4, a));
    let older = encode_accept(5, &Agreed::V4, &a);
    let e = decode_accept(5, &older).unwrap_err();
    assert!(
        e.to_string().contains("older than the accept's own layout"),
        "{e}"
    );
    for cut in 0..enc.len() {
        assert!(decode_accept(5, &enc[..cut]).is_err(), "cut at {cut}");
    }
}

#[test]
fn features_have_names() {
    assert_eq!(Features::NONE.to_string(), "none");
    assert_eq!(
        Features::ALL.to_string(),
        "zstd compression, page checksums, local mode, postcopy, postcopy recovery, paused guest, switchover retry, switchover ack"
    );
    assert_eq!(
        Features::from_name("switchover-retry"),
        Some(Features::SWITCHOVER_RETRY)
    );
    assert!(!Features::V4.contains(Features::SWITCHOVER_RETRY));
    assert_eq!(
        Features::from_name("paused-guest"),
        Some(Features::PAUSED_GUEST)
    );
    assert!(
        !Features::V4.contains(Features::PAUSED_GUEST),
        "new in version 5"
    );
    assert_eq!(Features::from_name("zstd"), Some(Features::ZSTD));
    assert_eq!(
        Features::from_name("postcopy recovery"),
        Some(Features::POSTCOPY_RECOVERY)
    );
    assert_eq!(Features::from_name("teleport"), None);
    assert_eq!(Versions::THIS.to_string(), "versions 4 to 5");
    assert_eq!(v(4, 4).to_string(), "version 4");
    assert_eq!(Versions::new(5, 4), None);
}
