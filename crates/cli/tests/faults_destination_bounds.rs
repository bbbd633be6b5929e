//! The destination's resources and time are its own decisions, whatever a peer does:
//! - a connection that trickles its first frame (a byte at a time, each well within any
//!   per-read timeout) is refused at its handshake deadline, naming it;
//! - a full handshake table refuses a new connection saying so, and once the slow ones are
//!   cut at their deadlines a real source gets through;
//! - a hello asking for huge device buffering (many devices, 16 MiB chunks, wide windows)
//!   gets the destination's own cap (256 MiB by default), not what it asked;
//! - a source with a short peer timeout migrates against a destination on a long one: the
//!   shorter is agreed in the hello and governs both sides' pings.
//!
//! Before these bounds a trickling connection held its slot forever (and 64 of them locked
//! every source out, closed without a reason), the cap followed the hello (up to 128 GiB),
//! and the short-timeout source failed a healthy migration after 3 s.

mod common;
mod faults_common;

use common::raw::{host_port, recv_frame, synthetic_hello};
use common::*;
use faults_common::*;
use livemig_wire::*;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn a_hello() -> Vec<u8> {
    encode_frame(
        FrameKind::SessionHello,
        &synthetic_hello(SessionId([9; 16]), DeviceSetup::default()).encode(),
    )
}

/// A connection that sends a SessionHello one byte every `every` until told to stop or cut.
fn trickler(at: &str, every: Duration, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let s = TcpStream::connect(at).unwrap();
    std::thread::spawn(move || {
        let mut s = s;
        for b in a_hello() {
            if stop.load(Ordering::SeqCst) || s.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(every);
        }
    })
}

#[test]
fn a_trickled_first_frame_is_refused_at_the_handshake_deadline() {
    let _s = serial(&SERIAL);
    let (_dest, addr) = Proc::incoming(&["--handshake-timeout-ms=1500"]);
    let mut s = TcpStream::connect(host_port(&addr)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        for b in a_hello() {
            if stop2.load(Ordering::SeqCst) || w.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let t = Instant::now();
    let (h, p) = recv_frame(&mut s).expect("a refusal, not silence");
    stop.store(true, Ordering::SeqCst);
    let took = t.elapsed();
    assert_eq!(h.kind, FrameKind::Reject);
    let r = Reject::decode(&p).unwrap();
    println!("refused after {took:?}: {r}");
    assert_mentions(&r.reason, &["handshake timeout", "1.5s"], "the refusal");
    // A liveness bound: at the deadline, where it used to be never.
    assert!(took < Duration::from_secs(8), "{took:?}");
    writer.join().unwrap();
}

#[test]
fn a_full_handshake_table_refuses_by_name_and_frees_at_the_deadlines() {
    let _s = serial(&SERIAL);
    let (mut dest, addr) = Proc::incoming(&["--handshake-timeout-ms=2000", "--verify"]);
    let at = host_port(&addr).to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let slow: Vec<_> = (0..64)
        .map(|_| trickler(&at, Duration::from_millis(250), stop.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // The 65th is told why.
    let mut extra = TcpStream::connect(&at).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (h, p) = recv_frame(&mut extra).expect("a refusal naming the full table");
    assert_eq!(h.kind, FrameKind::Reject);
    let r = Reject::decode(&p).unwrap();
    println!("65th connection: {r}");
    assert_mentions(&r.reason, &["64 connections", "handshaking"], "the refusal");
    // Past the slow connections' deadline (they are still trickling) a real source gets in.
    std::thread::sleep(Duration::from_millis(2500));
    let mut src = synthetic_source(&addr, &["--memory=32M", "--working-set=0"], &[]);
    let end = src
        .wait_within(&["completed", "attempt_failed"], Duration::from_secs(60))
        .unwrap();
    assert_eq!(end["event"], "completed", "{end:#}");
    dest.expect_event("received");
    stop.store(true, Ordering::SeqCst);
    for t in slow {
        t.join().unwrap();
    }
}

#[test]
fn a_hello_asking_for_huge_device_buffering_gets_the_destinations_cap() {
    let _s = serial(&SERIAL);
    let (_dest, addr) = Proc::incoming(&[]);
    let mut s = TcpStream::connect(host_port(&addr)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let chunk = MAX_CHUNK_SIZE; // 16 MiB
                                // Eight devices of 16 MiB chunks with a window of 48 each: 6 GiB asked for.
    let devices: Vec<WireDevice> = (0..8)
        .map(|i| WireDevice {
            kind: "vfio-sim".into(),
            name: format!("vfio{i}"),
            config: livemig_vmm::devices::VfioSimConfig::with_size(64 << 20).encode(),
        })
        .collect();
    let n = devices.len() as u64;
    let mut hello = synthetic_hello(
        SessionId([3; 16]),
        DeviceSetup {
            transfer: DeviceTransfer::Multifd,
            chunk_size: chunk,
            window: 48,
            buffer_cap: 0,
            devices,
            vmstates: Vec::new(),
        },
    );
    hello.channels = 24;
    s.write_all(&encode_frame(FrameKind::SessionHello, &hello.encode()))
        .unwrap();
    let (h, p) = recv_frame(&mut s).expect("an answer");
    if h.kind == FrameKind::Reject {
        // Refusing is within the bound too, if it says why.
        let r = Reject::decode(&p).unwrap();
        println!("refused: {r}");
        assert_mentions(&r.reason, &["buffer cap"], "the refusal");
        return;
    }
    assert_eq!(h.kind, FrameKind::SessionAccept);
    let a = SessionAccept::decode(&p).unwrap();
    println!("accepted: {a:?} (asked: {n} devices x window 48 x {chunk} bytes)");
    assert!(a.buffer_cap <= 256 << 20, "{a:?}");
    assert!(
        a.window as u64 * chunk as u64 * n <= a.buffer_cap,
        "the windows must fit the cap: {a:?}"
    );
}

#[test]
fn a_short_peer_timeout_on_the_source_is_agreed_with_a_destination_on_the_default() {
    let _s = serial(&SERIAL);
    // The destination on the default (30 s: pings every 7.5 s unless agreed otherwise).
    let (mut dest, addr) = Proc::incoming(&["--verify"]);
    // About 6 s of precopy at 4 MB/s: longer than the source's 3 s timeout, so the source
    // hears the destination's pings on the main channel or gives up.
    let mut src = synthetic_source(
        &addr,
        &[
            "--memory=24M",
            "--working-set=0",
            "--max-bandwidth=4M",
            "--peer-timeout-ms=3000",
        ],
        &[],
    );
    let end = src
        .wait_within(&["completed", "attempt_failed"], Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        end["event"], "completed",
        "a healthy migration must not time out: {end:#}"
    );
    let ms = end["report"]["total_ms"].as_f64().unwrap();
    assert!(
        ms > 3000.0,
        "the migration must outlast the 3 s timeout to test it: {ms} ms"
    );
    dest.expect_event("received");
}
