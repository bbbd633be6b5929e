//! The destination's handshake, spoken to by hand over real sockets: a wrong version, an
//! unknown session, a duplicate or out-of-range channel index each get a Reject that says
//! why, and none of them stops the destination from serving the real source.

mod common;
use common::raw::{connect, recv, send};
use livemig_engine::{receive, IncomingConfig, IncomingError, Listener};
use livemig_vmm::Factory;
use livemig_wire::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

fn expect_reject(s: &mut TcpStream, code: RejectCode, words: &str) {
    let (h, p) = recv(s);
    assert_eq!(h.kind, FrameKind::Reject);
    let r = Reject::decode(&p).unwrap();
    assert_eq!(r.code, code, "{r}");
    assert!(
        r.reason.contains(words),
        "reason '{}' should mention '{words}'",
        r.reason
    );
}

fn hello(session: SessionId) -> Vec<u8> {
    common::raw::synthetic_hello(session, DeviceSetup::default()).encode()
}

#[test]
fn bad_peers_are_refused_with_a_reason() {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_endpoint().unwrap().to_string();
    let addr = addr.strip_prefix("tcp:").unwrap().to_string();
    let config = IncomingConfig {
        setup_timeout: Duration::from_secs(3),
        ..IncomingConfig::default()
    };
    std::thread::scope(|s| {
        let dest = s.spawn(|| receive(&listener, &Factory, &config, &|_| {}));

        // A peer speaking another protocol version is refused before anything else.
        let mut c = connect(&addr);
        let mut frame = encode_frame(FrameKind::SessionHello, &hello(SessionId([1; 16])));
        frame[4] = 7;
        c.write_all(&frame).unwrap();
        expect_reject(&mut c, RejectCode::Protocol, "version 7");

        // Garbage: bad magic.
        let mut c = connect(&addr);
        c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        expect_reject(&mut c, RejectCode::Protocol, "magic");

        // A guest larger than the destination allows.
        let mut c = connect(&addr);
        let mut big = SessionHello::decode(&hello(SessionId([1; 16]))).unwrap();
        big.guest.ranges[0].size = 1 << 50;
        send(&mut c, FrameKind::SessionHello, &big.encode());
        expect_reject(&mut c, RejectCode::TooLarge, "exceeds");

        // The real session opens.
        let session = SessionId([9; 16]);
        let mut main = connect(&addr);
        send(&mut main, FrameKind::SessionHello, &hello(session));
        assert_eq!(recv(&mut main).0.kind, FrameKind::SessionAccept);

        let chan = |session, index| ChannelHello { session, index }.encode();
        let mut foreign = connect(&addr);
        send(
            &mut foreign,
            FrameKind::ChannelHello,
            &chan(SessionId([8; 16]), 0),
        );
        expect_reject(&mut foreign, RejectCode::UnknownSession, "unknown session");

        let mut c0 = connect(&addr);
        send(&mut c0, FrameKind::ChannelHello, &chan(session, 0));
        assert_eq!(recv(&mut c0).0.kind, FrameKind::ChannelAccept);

        let mut dup = connect(&addr);
        send(&mut dup, FrameKind::ChannelHello, &chan(session, 0));
        expect_reject(&mut dup, RejectCode::DuplicateChannel, "already joined");

        let mut out = connect(&addr);
        send(&mut out, FrameKind::ChannelHello, &chan(session, 7));
        expect_reject(&mut out, RejectCode::BadChannelIndex, "out of range");

        let mut c1 = connect(&addr);
        send(&mut c1, FrameKind::ChannelHello, &chan(session, 1));
        assert_eq!(recv(&mut c1).0.kind, FrameKind::ChannelAccept);

        // A packet addressed outside guest memory is a protocol error, not a crash.
        let p = ram::encode_packet(0, &[1 << 30], &[1u8; PAGE_SIZE], &[], true);
        send(&mut c0, FrameKind::RamPages, &p);
        let (h, payload) = recv(&mut main);
        assert_eq!(h.kind, FrameKind::Reject);
        let r = Reject::decode(&payload).unwrap();
        assert!(r.reason.contains("outside guest memory"), "{r}");
        let err = dest.join().unwrap().err().expect("the migration must fail");
        assert!(matches!(err, IncomingError::Channel(_)), "{err}");
    });
}

/// Opens a real session by hand: the main channel and two data channels.
fn open_session(addr: &str, session: SessionId) -> (TcpStream, Vec<TcpStream>) {
    let mut main = connect(addr);
    send(&mut main, FrameKind::SessionHello, &hello(session));
    assert_eq!(recv(&mut main).0.kind, FrameKind::SessionAccept);
    let chans = (0..2)
        .map(|index| {
            let mut c = connect(addr);
            send(
                &mut c,
                FrameKind::ChannelHello,
                &ChannelHello { session, index }.encode(),
            );
            assert_eq!(recv(&mut c).0.kind, FrameKind::ChannelAccept);
            c
        })
        .collect();
    (main, chans)
}

/// Runs a destination, opens a session, lets `attack` send on the data channels, and
/// returns the reason the destination gives on the main channel.
fn destination_refuses(attack: impl FnOnce(&mut [TcpStream])) -> Reject {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_endpoint().unwrap().to_string();
    let addr = addr.strip_prefix("tcp:").unwrap().to_string();
    let config = IncomingConfig::default();
    std::thread::scope(|s| {
        let dest = s.spawn(|| receive(&listener, &Factory, &config, &|_| {}));
        let (mut main, mut chans) = open_session(&addr, SessionId([3; 16]));
        attack(&mut chans);
        let (h, payload) = recv(&mut main);
        assert_eq!(h.kind, FrameKind::Reject);
        assert!(
            dest.join().unwrap().is_err(),
            "the incoming migration must fail"
        );
        Reject::decode(&payload).unwrap()
    })
}

fn pages_packet(round: u32, normal: &[u64]) -> Vec<u8> {
    ram::encode_packet(
        round,
        normal,
        &vec![7u8; normal.len() * PAGE_SIZE],
        &[],
        true,
    )
}

#[test]
fn corrupted_packet_fails_the_crc_check() {
    let r = destination_refuses(|chans| {
        // A flipped bit in the packet's prefix (here in its page address): the frame CRC
        // covers the prefix, so the packet is refused before any page is written. (A flipped
        // bit in page data is a torn page: see the fault suite.)
        let mut frame = encode_frame(FrameKind::RamPages, &pages_packet(0, &[4096]));
        frame[livemig_wire::HEADER_LEN + ram::PREFIX_FIXED + 2] ^= 0xff;
        chans[1].write_all(&frame).unwrap();
    });
    assert!(
        r.reason.contains("CRC32C mismatch") && r.reason.contains("data channel 1"),
        "{r}"
    );
}

#[test]
fn a_page_sent_twice_in_one_round_is_refused() {
    let r = destination_refuses(|chans| {
        send(
            &mut chans[0],
            FrameKind::RamPages,
            &pages_packet(0, &[8192]),
        );
        send(
            &mut chans[1],
            FrameKind::RamPages,
            &pages_packet(0, &[8192]),
        );
    });
    assert!(r.reason.contains("sent twice in round 0"), "{r}");
}

#[test]
fn a_page_of_a_future_round_is_refused() {
    let r = destination_refuses(|chans| {
        send(
            &mut chans[0],
            FrameKind::RamPages,
            &pages_packet(5, &[8192]),
        );
    });
    assert!(r.reason.contains("round 5 arrived during round 0"), "{r}");
}

#[test]
fn an_oversized_length_is_refused_before_allocating() {
    let r = destination_refuses(|chans| {
        let mut header = FrameHeader::for_payload(FrameKind::RamPages, &[]).encode();
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        chans[0].write_all(&header).unwrap();
    });
    assert!(r.reason.contains("exceeds the limit"), "{r}");
}

#[test]
fn a_source_that_gives_up_during_set_up_is_not_waited_for() {
    // The source opens the session, one data channel joins, then it closes everything. The
    // destination must end at once, saying so, not after its set-up timeout (whose error
    // would name the channels that did not join).
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_endpoint().unwrap().to_string();
    let addr = addr.strip_prefix("tcp:").unwrap().to_string();
    let config = IncomingConfig {
        setup_timeout: Duration::from_secs(20),
        ..IncomingConfig::default()
    };
    std::thread::scope(|s| {
        let dest = s.spawn(|| receive(&listener, &Factory, &config, &|_| {}));
        let session = SessionId([4; 16]);
        let mut main = connect(&addr);
        send(&mut main, FrameKind::SessionHello, &hello(session));
        assert_eq!(recv(&mut main).0.kind, FrameKind::SessionAccept);
        let mut c0 = connect(&addr);
        send(
            &mut c0,
            FrameKind::ChannelHello,
            &ChannelHello { session, index: 0 }.encode(),
        );
        assert_eq!(recv(&mut c0).0.kind, FrameKind::ChannelAccept);
        drop(main);
        let err = dest.join().unwrap().err().expect("the session must fail");
        assert!(err.to_string().contains("closed the main channel"), "{err}");
        drop(c0);
    });
}
