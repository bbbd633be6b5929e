//! Hostile or confused peers against a `livemig incoming --json` process: strangers that
//! know the port but not the session (before it opens and while it runs), garbage of every
//! kind before a session (wrong magic, wrong version, an oversized length, an unknown kind,
//! a data channel's hello first), a flood of connections, silent connections, a session
//! asking for a device this destination does not know, an oversized length on the main
//! channel of an open session. Each is refused with a reason that names it, or ignored
//! without harm; the real source's migration completes exact; the destination never
//! resumes a partial guest.
//!
//! Covered elsewhere, in-process (see docs/reliability.md): wrong version and magic in the
//! SessionHello, a foreign session's ChannelHello, a duplicate or out-of-range channel
//! index, oversized lengths and out-of-range pages on a data channel
//! (handshake_rejections.rs); device chunks of an unknown device, with a huge idx, outside
//! the credit window, duplicated, too large or too short (device_stream_protocol_errors.rs).

mod common;
mod faults_common;

use common::raw::{connect, host_port, recv_frame, send};
use common::*;
use faults_common::*;
use livemig_wire::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

const END: Duration = Duration::from_secs(60);

fn expect_reject(s: &mut TcpStream, code: RejectCode, words: &[&str], what: &str) -> Reject {
    let (h, p) = recv_frame(s).unwrap_or_else(|| panic!("{what}: no answer"));
    assert_eq!(h.kind, FrameKind::Reject, "{what}");
    let r = Reject::decode(&p).unwrap();
    println!("{what}: refused: {r}");
    assert_eq!(r.code, code, "{what}: {r}");
    assert_mentions(&r.reason, words, what);
    r
}

fn hello(session: SessionId, devices: DeviceSetup) -> SessionHello {
    common::raw::synthetic_hello(session, devices)
}

/// A real source of 64 MiB to `addr`, with `extra` options.
fn real_source(addr: &str, extra: &[&str]) -> Proc {
    synthetic_source(
        addr,
        &[
            "--memory=64M",
            "--working-set=8M",
            "--dirty-rate=20k",
            "--warmup-ms=50",
        ],
        extra,
    )
}

/// The real source completes and the destination received the guest exact.
fn completes(src: &mut Proc, dest: &mut Proc) {
    let done = src.expect_event("completed");
    completed(&done, src, dest);
}

/// The checks of [`completes`] once the source's `completed` line is in hand.
fn completed(done: &serde_json::Value, src: &mut Proc, dest: &mut Proc) {
    assert_eq!(u64_at(&done["report"], &["pages_mismatched"]), 0);
    assert!(src.wait_exit().success());
    let recv = dest.expect_event("received");
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_checked"]), 16384);
    assert_eq!(u64_at(&recv["report"]["verify"], &["pages_mismatched"]), 0);
    assert!(dest.wait_exit().success());
}

#[test]
fn garbage_before_a_session_is_refused_by_name_and_the_real_source_gets_through() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let at = host_port(&addr);
    let header = |kind: FrameKind, len: u32| {
        let mut h = FrameHeader::for_payload(kind, &[]);
        h.len = len;
        h.encode().to_vec()
    };

    let mut c = connect(at);
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    expect_reject(&mut c, RejectCode::Protocol, &["bad magic"], "HTTP");

    let mut c = connect(at);
    let mut v = header(FrameKind::SessionHello, 0);
    v[4] = 7;
    c.write_all(&v).unwrap();
    expect_reject(&mut c, RejectCode::Protocol, &["version 7"], "version 7");

    // A SessionHello claiming 4 GiB: refused from its header, nothing read or allocated.
    let mut c = connect(at);
    c.write_all(&header(FrameKind::SessionHello, u32::MAX))
        .unwrap();
    expect_reject(
        &mut c,
        RejectCode::Protocol,
        &["SessionHello", "4294967295 bytes exceeds the limit"],
        "oversized SessionHello",
    );

    let mut c = connect(at);
    let mut k = header(FrameKind::SessionHello, 0);
    k[6..8].copy_from_slice(&999u16.to_le_bytes());
    c.write_all(&k).unwrap();
    expect_reject(
        &mut c,
        RejectCode::Protocol,
        &["unknown frame kind 999"],
        "unknown kind",
    );

    let mut c = connect(at);
    let ch = ChannelHello {
        session: SessionId([4; 16]),
        index: 0,
    };
    send(&mut c, FrameKind::ChannelHello, &ch.encode());
    expect_reject(
        &mut c,
        RejectCode::UnknownSession,
        &["no session is open"],
        "data channel first",
    );

    // A SessionHello whose payload is not one.
    let mut c = connect(at);
    send(&mut c, FrameKind::SessionHello, &[1, 2, 3]);
    expect_reject(
        &mut c,
        RejectCode::Protocol,
        &["bad SessionHello"],
        "bad SessionHello",
    );

    // The destination logs each refusal, and waits on.
    for _ in 0..6 {
        wait_log(&mut dest, "refused a connection", END);
    }
    let mut src = real_source(&addr, &[]);
    completes(&mut src, &mut dest);
}

#[test]
fn strangers_during_a_migration_neither_disturb_it_nor_get_served() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let at = host_port(&addr).to_string();
    // 64 MiB at 32 MB/s: about 2 s of precopy with strangers knocking.
    let mut src = real_source(&addr, &["--max-bandwidth=32M"]);
    src.expect_event("round_started");
    let session = SessionId([0x5a; 16]);
    let mut strangers: Vec<(TcpStream, &str)> = Vec::new();
    let mut c = connect(&at);
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    strangers.push((c, "HTTP"));
    let mut c = connect(&at);
    send(
        &mut c,
        FrameKind::SessionHello,
        &hello(session, DeviceSetup::default()).encode(),
    );
    strangers.push((c, "another SessionHello"));
    for index in [0u16, 3] {
        let mut c = connect(&at);
        send(
            &mut c,
            FrameKind::ChannelHello,
            &ChannelHello { session, index }.encode(),
        );
        strangers.push((c, "a foreign ChannelHello"));
    }
    // Nobody answers them while the session runs: they wait in the listen backlog.
    for (c, what) in &mut strangers {
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        let r = c.read(&mut b);
        assert!(
            matches!(&r, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
            "{what}: a stranger got {r:?} during the session"
        );
    }
    completes(&mut src, &mut dest);
    // The destination has exited: its listener is gone, and so are they.
    for (c, what) in &mut strangers {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(c.read(&mut b), Ok(0) | Err(_)),
            "{what}: still open"
        );
    }
}

/// 300 connections from 6 threads, each sending 16 bytes of garbage and closing, the real
/// source starting in the middle of them.
#[test]
fn a_flood_of_garbage_connections_does_not_keep_the_real_source_out() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let at = host_port(&addr).to_string();
    let t0 = Instant::now();
    let mut src = None;
    std::thread::scope(|s| {
        let floods: Vec<_> = (0..6)
            .map(|_| {
                let at = at.clone();
                s.spawn(move || {
                    let mut n = 0;
                    for _ in 0..50 {
                        if let Ok(mut c) = TcpStream::connect(&at) {
                            let _ = c.write_all(&[0xee; 16]);
                            n += 1;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        src = Some(real_source(&addr, &[]));
        let sent: usize = floods.into_iter().map(|f| f.join().unwrap()).sum();
        println!("flood: {sent} connections in {:?}", t0.elapsed());
    });
    let mut src = src.unwrap();
    completes(&mut src, &mut dest);
    let refused = dest
        .seen
        .iter()
        .filter(|v| v["msg"].as_str().unwrap_or("").contains("refused"))
        .count();
    println!(
        "flood: migration done {:?} after the flood began; {refused} connections refused by \
         the destination (the rest waited in its backlog until it exited)",
        t0.elapsed()
    );
}

/// A few connections that connect and say nothing, before the real source: each holds the
/// destination's accept loop for its whole handshake timeout (5 s), one after another, and
/// the real source's SessionHello waits behind them longer than its own answer timeout
/// (10 s). The real source should get through.
#[test]
fn silent_connections_must_not_keep_the_real_source_out() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let at = host_port(&addr);
    let _silent: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(at).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut src = real_source(&addr, &[]);
    let end = src
        .wait_within(&["completed", "attempt_failed"], END)
        .unwrap();
    assert_eq!(
        end["event"], "completed",
        "the real source was kept out by three silent connections: {end:#}"
    );
    completed(&end, &mut src, &mut dest);
}

/// A connection that says nothing is refused once the handshake timeout (5 s) has passed,
/// and the refusal names that timeout (not the peer timeout of a session under way).
#[test]
fn a_silent_connection_is_refused_naming_the_handshake_timeout() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&[]);
    let silent = TcpStream::connect(host_port(&addr)).unwrap();
    let line = wait_log(&mut dest, "refused a connection", Duration::from_secs(30));
    let msg = line["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("within the handshake timeout"), "{line}");
    drop(silent);
}

/// One silent connection does not hold up the real source.
#[test]
fn one_silent_connection_does_not_delay_the_real_source() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let at = host_port(&addr);
    let silent = TcpStream::connect(at).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut src = real_source(&addr, &[]);
    let connected = src.expect_event("connected");
    // Handshakes run side by side: the silent one's 5 s timeout is not waited out first.
    let setup = connected["setup_ms"].as_f64().unwrap();
    assert!(setup < 4000.0, "set-up took {setup} ms");
    completes(&mut src, &mut dest);
    drop(silent);
}

fn with_device(kind: &str) -> DeviceSetup {
    DeviceSetup {
        transfer: DeviceTransfer::Multifd,
        chunk_size: 4096,
        window: 0,
        buffer_cap: 0,
        devices: vec![WireDevice {
            kind: kind.into(),
            name: "dev0".into(),
            config: Vec::new(),
        }],
        vmstates: Vec::new(),
    }
}

/// A session naming a device kind this destination does not know is refused by name, and
/// the destination keeps waiting (as for a guest too large for it): the real source gets
/// through.
#[test]
fn a_session_asking_for_an_unknown_device_does_not_end_the_wait() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let mut c = connect(host_port(&addr));
    let h = hello(SessionId([7; 16]), with_device("nvme-sim"));
    send(&mut c, FrameKind::SessionHello, &h.encode());
    expect_reject(
        &mut c,
        RejectCode::Unsupported,
        &["device kind 'nvme-sim' is not supported"],
        "unknown device",
    );
    let mut src = real_source(&addr, &[]);
    completes(&mut src, &mut dest);
}

/// An open session's main channel announces a GuestState larger than the limit (64 MiB):
/// refused from the header, before anything is read or allocated, and the session fails.
#[test]
fn an_oversized_length_on_the_main_channel_is_refused_before_allocating() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    let at = host_port(&addr);
    let session = SessionId([9; 16]);
    let mut main = connect(at);
    send(
        &mut main,
        FrameKind::SessionHello,
        &hello(session, DeviceSetup::default()).encode(),
    );
    assert_eq!(
        recv_frame(&mut main).unwrap().0.kind,
        FrameKind::SessionAccept
    );
    let _chans: Vec<TcpStream> = (0..2)
        .map(|index| {
            let mut c = connect(at);
            send(
                &mut c,
                FrameKind::ChannelHello,
                &ChannelHello { session, index }.encode(),
            );
            assert_eq!(recv_frame(&mut c).unwrap().0.kind, FrameKind::ChannelAccept);
            c
        })
        .collect();
    let mut h = FrameHeader::for_payload(FrameKind::GuestState, &[]);
    h.len = (64 << 20) + 1;
    main.write_all(&h.encode()).unwrap();
    expect_reject(
        &mut main,
        RejectCode::LoadFailed,
        &["GuestState", "exceeds the limit"],
        "oversized GuestState",
    );
    assert_destination_failed(&mut dest, &["main channel", "exceeds the limit"], END);
}
