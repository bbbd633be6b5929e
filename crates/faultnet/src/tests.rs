//! The proxy against small servers of its own, over loopback. The tests run one at a time:
//! each checks at its end that every thread the proxy started (named `fnet*`) is gone.

use super::*;
use crate::conn::set_linger_zero;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    lock(&SERIAL)
}

/// How a server's connection ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Eof,
    Reset,
    /// Nothing came for the idle time, and the connection was still open.
    Idle,
    Other(io::ErrorKind),
}

#[derive(Debug)]
struct Outcome {
    bytes: Vec<u8>,
    end: End,
}

fn read_to_end(mut s: TcpStream, idle: Duration) -> Outcome {
    s.set_read_timeout(Some(idle)).unwrap();
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break End::Reset,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break End::Idle
            }
            Err(e) => break End::Other(e.kind()),
        }
    };
    Outcome { bytes, end }
}

/// A server that takes `conns` connections one after another and records what each got.
fn sink(conns: usize, idle: Duration) -> (SocketAddr, JoinHandle<Vec<Outcome>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        (0..conns)
            .map(|_| read_to_end(l.accept().unwrap().0, idle))
            .collect()
    });
    (addr, h)
}

/// A server that echoes everything on one connection.
fn echo() -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    (addr, h)
}

fn pattern(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Drops the proxy and checks that none of its threads is left.
fn finish(p: Proxy) {
    drop(p);
    let left = threads_named("fnet");
    assert!(left.is_empty(), "proxy threads left after drop: {left:?}");
}

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn forwards_both_ways_unchanged() {
    let _s = serial();
    let (target, server) = echo();
    let p = Proxy::start(target, vec![]).unwrap();
    let c = connect(&p);
    let data = pattern(8 << 20);
    let back = std::thread::scope(|s| {
        let mut w = c.try_clone().unwrap();
        let d = &data;
        s.spawn(move || {
            w.write_all(d).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        (&c).read_to_end(&mut back).unwrap();
        back
    });
    assert!(back == data, "echoed bytes differ");
    server.join().unwrap();
    assert_eq!(p.connections(), 1);
    assert_eq!(p.bytes(0, Dir::Up), 8 << 20);
    assert!(p.fired().is_empty());
    drop(c);
    finish(p);
}

#[test]
fn latency_delays_every_chunk_but_keeps_them_in_flight_together() {
    let _s = serial();
    let (target, server) = echo();
    let d = Duration::from_millis(100);
    let p = Proxy::builder(target).latency(d).start().unwrap();
    let c = connect(&p);
    // 40 messages 10 ms apart: each must take at least a round trip (2 x 100 ms), and all
    // of them together about 400 ms + 200 ms. A proxy sleeping 100 ms per chunk in series
    // would need at least 4 s for the 40 of them.
    const N: usize = 40;
    let t0 = Instant::now();
    let (sent, got) = std::thread::scope(|s| {
        let mut w = c.try_clone().unwrap();
        let sender = s.spawn(move || {
            let mut sent = Vec::new();
            for i in 0..N {
                sent.push(Instant::now());
                w.write_all(&[i as u8; 100]).unwrap();
                std::thread::sleep(Duration::from_millis(10));
            }
            sent
        });
        let mut got = Vec::new();
        let mut r = &c;
        for i in 0..N {
            let mut m = [0u8; 100];
            r.read_exact(&mut m).unwrap();
            assert_eq!(m, [i as u8; 100]);
            got.push(Instant::now());
        }
        (sender.join().unwrap(), got)
    });
    for (i, (s, g)) in sent.iter().zip(&got).enumerate() {
        assert!(
            *g - *s >= 2 * d,
            "message {i} came back after {:?}, less than a round trip",
            *g - *s
        );
    }
    let total = t0.elapsed();
    assert!(
        total < Duration::from_millis(1500),
        "40 messages took {total:?}: chunks are delayed one after another"
    );
    drop(c);
    server.join().unwrap();
    finish(p);
}

#[test]
fn reset_after_k_bytes_delivers_them_then_an_rst() {
    let _s = serial();
    let (target, server) = sink(1, Duration::from_secs(10));
    let p = Proxy::start(
        target,
        vec![Rule::reset_after(Which::Nth(0), Dir::Up, 10_000)],
    )
    .unwrap();
    let mut c = connect(&p);
    let _ = c.write_all(&pattern(100_000));
    let out = server.join().unwrap().remove(0);
    assert_eq!(out.bytes.len(), 10_000);
    assert_eq!(out.bytes, pattern(10_000));
    assert_eq!(out.end, End::Reset);
    let mut b = [0u8; 16];
    let e = c.read(&mut b).expect_err("the client is reset too");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(
        p.fired(),
        vec![Fired {
            conn: 0,
            dir: Some(Dir::Up),
            at: 10_000,
            fault: Fault::Reset
        }]
    );
    finish(p);
}

#[test]
fn cut_after_k_bytes_is_a_clean_end_of_stream() {
    let _s = serial();
    let (target, server) = sink(1, Duration::from_secs(10));
    let p = Proxy::start(target, vec![Rule::cut_after(Which::Every, Dir::Up, 5_000)]).unwrap();
    let mut c = connect(&p);
    let _ = c.write_all(&pattern(50_000));
    let out = server.join().unwrap().remove(0);
    assert_eq!(out.bytes, pattern(5_000));
    assert_eq!(out.end, End::Eof);
    let mut b = [0u8; 16];
    assert_eq!(c.read(&mut b).unwrap(), 0, "the client sees a FIN");
    drop(c);
    finish(p);
}

#[test]
fn flip_changes_exactly_one_byte() {
    let _s = serial();
    let (target, server) = sink(1, Duration::from_secs(10));
    let p = Proxy::start(
        target,
        vec![Rule::flip_at(Which::Every, Dir::Up, 1234, 0xff)],
    )
    .unwrap();
    let mut c = connect(&p);
    let data = pattern(200_000);
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let out = server.join().unwrap().remove(0);
    assert_eq!(out.end, End::Eof);
    assert_eq!(out.bytes.len(), data.len());
    let diff: Vec<usize> = (0..data.len())
        .filter(|&i| data[i] != out.bytes[i])
        .collect();
    assert_eq!(diff, vec![1234]);
    assert_eq!(out.bytes[1234], data[1234] ^ 0xff);
    assert_eq!(p.fired()[0].fault, Fault::Flip(0xff));
    drop(c);
    finish(p);
}

#[test]
fn hang_forwards_nothing_more_and_closes_nothing() {
    let _s = serial();
    let (target, server) = sink(1, Duration::from_millis(400));
    let p = Proxy::start(
        target,
        vec![Rule::hang_after(Which::Nth(0), Dir::Up, 3_000)],
    )
    .unwrap();
    let mut c = connect(&p);
    c.write_all(&pattern(10_000)).unwrap();
    let out = server.join().unwrap().remove(0);
    assert_eq!(out.bytes, pattern(3_000));
    assert_eq!(out.end, End::Idle, "a hung peer neither closes nor resets");
    // The client's side is open too: a read waits.
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut b = [0u8; 16];
    let e = c.read(&mut b).expect_err("nothing to read, and no end");
    assert!(matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ));
    // Dropping the proxy ends it all, with the client still connected.
    finish(p);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn rules_pick_their_connection_and_connections_are_counted() {
    let _s = serial();
    let (target, server) = sink(3, Duration::from_secs(10));
    let p = Proxy::start(target, vec![Rule::reset_after(Which::Nth(1), Dir::Up, 0)]).unwrap();
    for i in 0..3u8 {
        let mut c = connect(&p);
        let _ = c.write_all(&[i; 1000]);
        let _ = c.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let r = c.read_to_end(&mut rest);
        if i == 1 {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        } else {
            assert_eq!(r.unwrap(), 0);
        }
    }
    let outs = server.join().unwrap();
    assert_eq!((outs[0].bytes.len(), &outs[0].end), (1000, &End::Eof));
    assert_eq!((outs[1].bytes.len(), &outs[1].end), (0, &End::Reset));
    assert_eq!((outs[2].bytes.len(), &outs[2].end), (1000, &End::Eof));
    assert_eq!(p.connections(), 3);
    assert!(p.wait_connections(3, Duration::ZERO));
    assert!(!p.wait_connections(4, Duration::from_millis(50)));
    finish(p);
}

#[test]
fn a_pattern_split_across_writes_triggers_right_after_it() {
    let _s = serial();
    let (target, server) = sink(1, Duration::from_secs(10));
    let p = Proxy::start(
        target,
        vec![Rule::after_pattern(
            Which::Every,
            Dir::Up,
            b"HANDOVER",
            Fault::Reset,
        )],
    )
    .unwrap();
    let mut c = connect(&p);
    c.write_all(b"hello HAND").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let _ = c.write_all(b"OVER world");
    let out = server.join().unwrap().remove(0);
    assert_eq!(out.bytes, b"hello HANDOVER");
    assert_eq!(out.end, End::Reset);
    assert_eq!(p.fired()[0].at, 14);
    drop(c);
    finish(p);
}

#[test]
fn a_fault_fired_by_the_test_applies_at_once() {
    let _s = serial();
    let (target, server) = sink(1, Duration::from_secs(10));
    let p = Proxy::start(target, vec![]).unwrap();
    let mut c = connect(&p);
    c.write_all(&[7; 100]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.bytes(0, Dir::Up) < 100 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(p.fault(0, Fault::Hang));
    assert!(p.fault(0, Fault::Reset), "a hung connection can be reset");
    assert!(!p.fault(0, Fault::Reset), "but only once");
    assert!(!p.fault(5, Fault::Reset), "no such connection");
    let out = server.join().unwrap().remove(0);
    assert_eq!((out.bytes.len(), out.end), (100, End::Reset));
    let f = p.fired();
    assert_eq!(f.len(), 2);
    assert_eq!((f[1].dir, f[1].fault), (None, Fault::Reset));
    drop(c);
    finish(p);
}

#[test]
fn a_peer_reset_is_passed_on() {
    let _s = serial();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        set_linger_zero(&s);
        // Closed with SO_LINGER 0: an RST.
    });
    let p = Proxy::start(target, vec![]).unwrap();
    let mut c = connect(&p);
    server.join().unwrap();
    let mut b = [0u8; 16];
    let e = c.read(&mut b).expect_err("reset passed on");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    finish(p);
}

#[test]
fn a_refused_target_resets_the_client() {
    let _s = serial();
    // A port nobody listens on: bind, learn it, close.
    let target = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = Proxy::start(target, vec![]).unwrap();
    let mut c = connect(&p);
    let mut b = [0u8; 16];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    assert_eq!(p.connections(), 1);
    assert!(
        p.log().iter().any(|l| l.contains("failed")),
        "{:?}",
        p.log()
    );
    finish(p);
}

#[test]
fn dropping_the_proxy_joins_every_thread_of_open_connections() {
    let _s = serial();
    let (target, _server) = sink(4, Duration::from_secs(2));
    let p = Proxy::builder(target)
        .latency(Duration::from_millis(50))
        .start()
        .unwrap();
    let conns: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut c = connect(&p);
            c.write_all(&[1; 1000]).unwrap();
            c
        })
        .collect();
    assert!(p.wait_connections(4, Duration::from_secs(5)));
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads_named("fnet").len() < 1 + 4 * 4 {
        assert!(Instant::now() < deadline, "{:?}", threads_named("fnet"));
        std::thread::sleep(Duration::from_millis(5));
    }
    finish(p);
    drop(conns);
}
