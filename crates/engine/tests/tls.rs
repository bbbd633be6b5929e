//! TLS on a channel, in one process: the handshake with mutual authentication, refusals
//! (no client certificate, another CA, the wrong name, plain livemig, garbage, silence),
//! data both ways through the `lm-tls` pump (clones, shutdown, timeouts, backpressure), and
//! no `lm-tls` thread left once a stream is gone. Certificates are made here with rcgen.

use livemig_engine::tls::{TlsConfig, TlsError, TlsFile};
use livemig_engine::{CancelToken, Endpoint, Listener, Stream};
use livemig_wire::{
    encode_frame, ChannelHello, FrameHeader, FrameKind, Reject, RejectCode, SessionId, HEADER_LEN,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Tests that count `lm-tls` threads must not overlap with tests that start them.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ca {
        cert: p.self_signed(&key).unwrap(),
        key,
    }
}

/// A fresh directory for one test's files, removed when dropped.
struct Dir(PathBuf);

impl std::ops::Deref for Dir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> Dir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "livemig-tls-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// Writes `name.crt`, `name.key` (a leaf for `names`, signed by `ca`) and `name-ca.crt`
/// into `d`, and loads them.
fn leaf(d: &Path, ca: &Ca, name: &str, names: &[&str]) -> (PathBuf, PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let paths = (
        d.join(format!("{name}.crt")),
        d.join(format!("{name}.key")),
        d.join(format!("{name}-ca.crt")),
    );
    std::fs::write(&paths.0, cert.pem()).unwrap();
    std::fs::write(&paths.1, key.serialize_pem()).unwrap();
    std::fs::write(&paths.2, ca.cert.pem()).unwrap();
    paths
}

fn config(paths: &(PathBuf, PathBuf, PathBuf)) -> TlsConfig {
    TlsConfig::from_files(&paths.0, &paths.1, &paths.2).unwrap()
}

/// A destination and a source config from one CA, for 127.0.0.1.
fn pair() -> (TlsConfig, TlsConfig) {
    let (server, client, _) = pair_with_ca();
    (server, client)
}

/// [`pair`], and the CA certificate (PEM).
fn pair_with_ca() -> (TlsConfig, TlsConfig, String) {
    let d = dir();
    let ca = ca("livemig test CA");
    let dest = leaf(&d, &ca, "dest", &["127.0.0.1", "localhost"]);
    let client = config(&leaf(&d, &ca, "source", &["127.0.0.1"]));
    (config(&dest), client, ca.cert.pem())
}

fn listen() -> (Listener, Endpoint) {
    let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let at = l.local_endpoint().unwrap();
    (l, at)
}

const T: Duration = Duration::from_secs(5);

/// The server's accept result and the client's connect result, run at the same time.
fn handshake(
    server: &TlsConfig,
    client: &TlsConfig,
) -> (Result<Stream, TlsError>, Result<Stream, TlsError>) {
    let (l, at) = listen();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let net = l.accept_until(Some(Instant::now() + T)).unwrap();
            server.accept(net, T, None)
        });
        let net = Stream::connect(&at, T).unwrap();
        let c = client.connect(net, &at, T, None);
        (srv.join().unwrap(), c)
    })
}

fn tls_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim() == "lm-tls")
        .count()
}

/// Waits (a little: a joined thread can stay listed in /proc for a moment after it has
/// exited) until the process has `n` lm-tls threads.
fn wait_tls_threads(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while tls_threads() != n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(tls_threads(), n, "lm-tls threads");
}

fn wait_no_tls_threads() {
    wait_tls_threads(0);
}

/// Reads until `buf` is full or the stream ends; returns the error, if any.
fn read_full(s: &mut Stream, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match s.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn data_crosses_both_ways_exactly_and_no_thread_is_left() {
    let _g = serial();
    let (server, client) = pair();
    let (srv, cli) = handshake(&server, &client);
    let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
    wait_tls_threads(2);
    let up = pattern(48 << 20, 1);
    let down = pattern(40 << 20, 7);
    std::thread::scope(|s| {
        // Each side writes from one clone while another clone reads, as the engine does.
        let mut srv_w = srv.try_clone().unwrap();
        let mut cli_w = cli.try_clone().unwrap();
        let (up2, down2) = (&up, &down);
        s.spawn(move || cli_w.write_all(up2).unwrap());
        s.spawn(move || srv_w.write_all(down2).unwrap());
        let mut got_up = vec![0u8; up.len()];
        let mut got_down = vec![0u8; down.len()];
        let r = s.spawn(|| {
            read_full(&mut srv, &mut got_up).unwrap();
            got_up
        });
        read_full(&mut cli, &mut got_down).unwrap();
        assert!(got_down == down, "destination to source bytes differ");
        assert!(
            r.join().unwrap() == up,
            "source to destination bytes differ"
        );
    });
    // The source closes: the destination reads the end of stream after everything.
    cli.write_all(b"last words").unwrap();
    drop(cli);
    let mut tail = Vec::new();
    srv.read_to_end(&mut tail).unwrap();
    assert_eq!(tail, b"last words");
    drop(srv);
    wait_no_tls_threads();
}

#[test]
fn readv_on_the_raw_descriptor_reads_plaintext() {
    use std::os::fd::AsRawFd;
    let _g = serial();
    let (server, client) = pair();
    let (srv, cli) = handshake(&server, &client);
    let (srv, mut cli) = (srv.unwrap(), cli.unwrap());
    let data = pattern(3 * 4096, 3);
    cli.write_all(&data).unwrap();
    let mut a = vec![0u8; 4096];
    let mut b = vec![0u8; 2 * 4096];
    let iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    let mut done = 0usize;
    while done < data.len() {
        let mut v = iov;
        // Skip what was read already (simple: reads land in order).
        let mut skip = done;
        let mut first = 0;
        while skip >= v[first].iov_len {
            skip -= v[first].iov_len;
            first += 1;
        }
        // SAFETY: skip is less than this iovec's length, so the pointer stays in its buffer.
        v[first].iov_base = unsafe { (v[first].iov_base as *mut u8).add(skip) }.cast();
        v[first].iov_len -= skip;
        // SAFETY: the iovecs point into live buffers of their lengths.
        let n = unsafe { libc::readv(srv.as_raw_fd(), v[first..].as_ptr(), (2 - first) as i32) };
        assert!(n > 0);
        done += n as usize;
    }
    assert_eq!(&a[..], &data[..4096]);
    assert_eq!(&b[..], &data[4096..]);
}

#[test]
fn shutdown_wakes_a_blocked_reader_and_the_peer_sees_the_end() {
    let _g = serial();
    let (server, client) = pair();
    let (srv, cli) = handshake(&server, &client);
    let (srv, cli) = (srv.unwrap(), cli.unwrap());
    let shutter = cli.try_clone().unwrap();
    std::thread::scope(|s| {
        let mut reader = cli.try_clone().unwrap();
        let r = s.spawn(move || {
            let mut b = [0u8; 16];
            reader.read(&mut b)
        });
        std::thread::sleep(Duration::from_millis(100));
        shutter.shutdown();
        let got = r.join().unwrap();
        assert!(matches!(got, Ok(0) | Err(_)), "{got:?}");
    });
    let mut srv = srv;
    let mut b = [0u8; 16];
    srv.set_read_timeout(Some(T)).unwrap();
    assert_eq!(
        srv.read(&mut b).unwrap(),
        0,
        "close_notify becomes an end of stream"
    );
    drop((cli, shutter, srv));
    wait_no_tls_threads();
}

#[test]
fn a_client_without_a_certificate_is_refused() {
    let _g = serial();
    let (server, client) = pair();
    let client = client.without_client_certificate();
    let (srv, cli) = handshake(&server, &client);
    let e = srv.unwrap_err().to_string();
    assert!(e.contains("presented no certificate"), "{e}");
    // In TLS 1.3 the client finishes first; the refusal arrives as an alert on its read.
    let mut cli = cli.unwrap();
    cli.set_read_timeout(Some(T)).unwrap();
    let _ = cli.write_all(b"hello?");
    let e = cli.read(&mut [0u8; 16]).unwrap_err().to_string();
    assert!(e.contains("requires a certificate"), "{e}");
    drop(cli);
    wait_no_tls_threads();
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let _g = serial();
    let (server, _, real_ca) = pair_with_ca();
    // The stranger trusts the real CA (so it accepts the destination) but its own
    // certificate is from another.
    let d = dir();
    let mut paths = leaf(&d, &ca("some other CA"), "stranger", &["127.0.0.1"]);
    paths.2 = d.join("real-ca.crt");
    std::fs::write(&paths.2, real_ca).unwrap();
    let stranger = config(&paths);
    let (srv, cli) = handshake(&server, &stranger);
    let e = srv.unwrap_err().to_string();
    assert!(e.contains("not signed by the CA"), "{e}");
    let mut cli = cli.unwrap();
    cli.set_read_timeout(Some(T)).unwrap();
    let _ = cli.write_all(b"hello?");
    let e = cli.read(&mut [0u8; 16]).unwrap_err().to_string();
    assert!(e.contains("refused this side's certificate"), "{e}");
}

#[test]
fn a_destination_certificate_from_another_ca_or_for_another_name_is_refused() {
    let _g = serial();
    let (server, client) = pair();
    // Another CA altogether.
    let d = dir();
    let imposter = config(&leaf(&d, &ca("imposter CA"), "imposter", &["127.0.0.1"]));
    let (_, cli) = handshake(&imposter, &client);
    let e = cli.unwrap_err().to_string();
    assert!(
        e.contains("destination's certificate is not signed by the CA"),
        "{e}"
    );
    // The right CA, the wrong name.
    let client = client.with_server_name("elsewhere.example").unwrap();
    let (_, cli) = handshake(&server, &client);
    let e = cli.unwrap_err().to_string();
    assert!(e.contains("not valid for the name"), "{e}");
}

#[test]
fn plain_livemig_at_a_tls_destination_is_told_so() {
    let _g = serial();
    let (server, _) = pair();
    let (l, at) = listen();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            let net = l.accept_until(Some(Instant::now() + T)).unwrap();
            server.accept(net, T, None)
        });
        let mut plain = Stream::connect(&at, T).unwrap();
        plain.set_read_timeout(Some(T)).unwrap();
        // A data channel's hello, as a plain source would send it.
        let hello = ChannelHello {
            session: SessionId([3; 16]),
            index: 0,
        };
        plain
            .write_all(&encode_frame(FrameKind::ChannelHello, &hello.encode()))
            .unwrap();
        let mut head = [0u8; HEADER_LEN];
        plain.read_exact(&mut head).unwrap();
        let h = FrameHeader::decode(&head, &Default::default()).unwrap();
        assert_eq!(h.kind, FrameKind::Reject);
        let mut body = vec![0u8; h.len as usize];
        plain.read_exact(&mut body).unwrap();
        let r = Reject::decode(&body).unwrap();
        assert_eq!(r.code, RejectCode::Unsupported);
        assert!(r.reason.contains("requires TLS"), "{}", r.reason);
        let e = srv.join().unwrap().unwrap_err();
        assert!(matches!(e, TlsError::NotTls(_)), "{e}");
    });
}

#[test]
fn a_tls_source_at_a_plain_destination_fails_clearly_and_fast() {
    let _g = serial();
    let (_, client) = pair();
    let (l, at) = listen();
    std::thread::scope(|s| {
        // A plain destination: reads a frame header, refuses what it cannot decode.
        s.spawn(|| {
            let mut net = l.accept_until(Some(Instant::now() + T)).unwrap();
            let mut head = [0u8; HEADER_LEN];
            net.read_exact(&mut head).unwrap();
            assert!(FrameHeader::decode(&head, &Default::default()).is_err());
            let reject = Reject::new(RejectCode::Protocol, "bad magic").encode();
            let h = FrameHeader {
                version: livemig_wire::FRAME_VERSION,
                kind: FrameKind::Reject,
                len: reject.len() as u32,
                crc: crc32c::crc32c(&reject),
            };
            net.write_all(&h.encode()).unwrap();
            net.write_all(&reject).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        });
        let start = Instant::now();
        let net = Stream::connect(&at, T).unwrap();
        let e = client.connect(net, &at, T, None).unwrap_err().to_string();
        assert!(e.contains("does not speak TLS"), "{e}");
        assert!(start.elapsed() < T);
    });
}

#[test]
fn garbage_and_silence_are_refused_within_the_timeout() {
    let _g = serial();
    let (server, client) = pair();
    let (l, at) = listen();
    let short = Duration::from_millis(400);
    // Garbage.
    let mut g = Stream::connect(&at, T).unwrap();
    g.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    let net = l.accept_until(Some(Instant::now() + T)).unwrap();
    let e = server.accept(net, short, None).unwrap_err().to_string();
    assert!(e.starts_with("TLS: "), "{e}");
    // Silence, on both sides.
    let _quiet = Stream::connect(&at, T).unwrap();
    let net = l.accept_until(Some(Instant::now() + T)).unwrap();
    let start = Instant::now();
    let e = server.accept(net, short, None).unwrap_err().to_string();
    assert!(e.contains("said nothing"), "{e}");
    assert!(start.elapsed() < short * 3);
    let net = Stream::connect(&at, T).unwrap();
    let _held = l.accept_until(Some(Instant::now() + T)).unwrap();
    let start = Instant::now();
    let e = client
        .connect(net, &at, short, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("did not complete the handshake"), "{e}");
    assert!(start.elapsed() < short * 3);
}

#[test]
fn a_handshake_can_be_cancelled() {
    let _g = serial();
    let (_, client) = pair();
    let (l, at) = listen();
    let net = Stream::connect(&at, T).unwrap();
    let _held = l.accept_until(Some(Instant::now() + T)).unwrap();
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            c2.cancel();
        });
        let e = client.connect(net, &at, T, Some(&cancel)).unwrap_err();
        assert!(matches!(e, TlsError::Cancelled), "{e}");
    });
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[test]
fn a_peer_that_stops_reading_fails_the_writer_within_its_timeout() {
    let _g = serial();
    let (server, client) = pair();
    let (srv, cli) = handshake(&server, &client);
    let (_srv, mut cli) = (srv.unwrap(), cli.unwrap());
    cli.arm_peer_timeout(Duration::from_millis(300)).unwrap();
    let chunk = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0usize;
    let e = loop {
        match cli.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) => break e,
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "still writing after {sent} bytes"
        );
    };
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    // The pump buffers a bounded amount: what went in is socket buffers, not a heap.
    assert!(
        sent < 64 << 20,
        "{sent} bytes taken by a peer that reads nothing"
    );
}

#[test]
fn unix_addresses_need_a_server_name() {
    let (_, client) = pair();
    let to: Endpoint = "unix:/tmp/x.sock".parse().unwrap();
    let e = client.server_name(&to).unwrap_err().to_string();
    assert!(e.contains("--tls-server-name"), "{e}");
    assert!(client
        .clone()
        .with_server_name("dest.example")
        .unwrap()
        .server_name(&to)
        .is_ok());
    assert!(client
        .server_name(&"tcp:[::1]:4444".parse().unwrap())
        .is_ok());
}

#[test]
fn bad_files_are_named_with_what_is_wrong() {
    let d = dir();
    let ca1 = ca("one");
    let good = leaf(&d, &ca1, "good", &["127.0.0.1"]);
    let other = leaf(&d, &ca("two"), "other", &["127.0.0.1"]);
    let missing = d.join("missing.pem");
    let junk = d.join("junk.pem");
    std::fs::write(&junk, "not a pem file at all\n").unwrap();
    let broken = d.join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!!\n").unwrap();

    let e = TlsConfig::from_files(&missing, &good.1, &good.2).unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::Read {
                what: TlsFile::Certificate,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("missing.pem"), "{e}");
    let e = TlsConfig::from_files(&junk, &good.1, &good.2).unwrap_err();
    assert!(
        e.to_string().contains("junk.pem") && e.to_string().contains("holds no"),
        "{e}"
    );
    let e = TlsConfig::from_files(&broken, &good.1, &good.2).unwrap_err();
    assert!(matches!(e, TlsError::Pem { .. }), "{e}");
    let e = TlsConfig::from_files(&good.0, &good.0, &good.2).unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::Empty {
                what: TlsFile::Key,
                ..
            }
        ),
        "{e}"
    );
    let e = TlsConfig::from_files(&good.0, &other.1, &good.2).unwrap_err();
    assert!(matches!(e, TlsError::Key { .. }), "{e}");
    assert!(e.to_string().contains("other.key"), "{e}");
    let e = TlsConfig::from_files(&good.0, &good.1, &junk).unwrap_err();
    assert!(
        matches!(
            e,
            TlsError::Empty {
                what: TlsFile::Ca,
                ..
            }
        ),
        "{e}"
    );
    assert!(TlsConfig::from_files(&good.0, &good.1, &good.2).is_ok());
}

/// Not a check: the pump's throughput on one connection, in process (`cargo test --test tls
/// -- --ignored --nocapture one_connection_throughput`).
#[test]
#[ignore]
fn one_connection_throughput() {
    let _g = serial();
    let (server, client) = pair();
    let (srv, cli) = handshake(&server, &client);
    let (mut srv, mut cli) = (srv.unwrap(), cli.unwrap());
    let total = 2usize << 30;
    let chunk = vec![5u8; 512 << 10];
    let start = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut sent = 0;
            while sent < total {
                cli.write_all(&chunk).unwrap();
                sent += chunk.len();
            }
        });
        let mut buf = vec![0u8; 512 << 10];
        let mut got = 0;
        while got < total {
            got += srv.read(&mut buf).unwrap();
        }
    });
    let s = start.elapsed().as_secs_f64();
    eprintln!("TLS, one connection: {:.0} MB/s", total as f64 / s / 1e6);
}
