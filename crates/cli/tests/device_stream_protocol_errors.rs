//! The destination's device streams, spoken to by hand over real sockets: a chunk outside
//! its device's credit window, a duplicate idx, an unknown device, a chunk larger than the
//! session's chunk size, a DeviceChunk too short for its own header. Each gets a Reject on
//! the main channel whose reason names the problem, `receive_vm` returns an error and no
//! thread panics. Where the data of a bad chunk would be large, only its header is sent: the
//! Reject still comes, so the destination refused it before reading (or allocating) its data.
//! A session whose buffer cap cannot hold one chunk per device is refused up front (and the
//! destination waits on for one it can serve).

mod common;
use common::raw::{connect, recv, send};
use livemig_engine::{receive_vm, Device, Factories, IncomingConfig, IncomingError, Listener};
use livemig_vmm::devices::{DeviceModels, VfioSim, VfioSimConfig};
use livemig_vmm::Factory;
use livemig_wire::*;
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

/// Chunk size of every session here.
const CHUNK: usize = 4096;
/// The destination's credit window per device.
const WINDOW: u32 = 3;

/// A vfio-sim device of 64 KiB (16 chunks) as a source would describe it.
fn vfio(name: &str, seed: u64) -> WireDevice {
    let cfg = VfioSimConfig {
        seed,
        ..VfioSimConfig::with_size(64 << 10)
    };
    WireDevice {
        kind: "vfio-sim".into(),
        name: name.into(),
        config: cfg.encode(),
    }
}

fn hello(session: SessionId, devices: usize, buffer_cap: u64) -> SessionHello {
    common::raw::synthetic_hello(
        session,
        DeviceSetup {
            transfer: DeviceTransfer::Multifd,
            chunk_size: CHUNK as u32,
            window: 0,
            buffer_cap,
            devices: (0..devices)
                .map(|i| vfio(&format!("vfio{i}"), i as u64))
                .collect(),
            vmstates: Vec::new(),
        },
    )
}

/// A whole DeviceChunk payload: chunk header and data.
fn chunk(device: u16, idx: u32, data: &[u8]) -> Vec<u8> {
    let mut p = ChunkHeader {
        device,
        idx,
        last: false,
    }
    .encode()
    .to_vec();
    p.extend_from_slice(data);
    p
}

/// Only the frame header and chunk header of a DeviceChunk that claims `data_len` bytes of
/// data: a destination that reads the data before checking would wait forever.
fn chunk_header_only(device: u16, idx: u32, data_len: usize) -> Vec<u8> {
    let prefix = ChunkHeader {
        device,
        idx,
        last: false,
    }
    .encode();
    let mut h = FrameHeader::for_payload(FrameKind::DeviceChunk, &prefix);
    h.len = (CHUNK_PREFIX + data_len) as u32;
    let mut out = h.encode().to_vec();
    out.extend_from_slice(&prefix);
    out
}

/// The first `n` chunks of a real vfio-sim device's stream (seed `seed`), as its source
/// would cut them.
fn real_chunks(seed: u64, n: usize) -> Vec<Vec<u8>> {
    let dev = VfioSim::new(
        "vfio0",
        VfioSimConfig {
            seed,
            ..VfioSimConfig::with_size(64 << 10)
        },
    );
    dev.begin_save().unwrap();
    (0..n)
        .map(|_| {
            let mut b = Vec::new();
            assert_eq!(dev.save_final(&mut b, CHUNK).unwrap(), CHUNK);
            b
        })
        .collect()
}

struct Session {
    main: TcpStream,
    chans: Vec<TcpStream>,
    accept: SessionAccept,
}

fn open(addr: &str, hello: &SessionHello) -> Session {
    let mut main = connect(addr);
    send(&mut main, FrameKind::SessionHello, &hello.encode());
    let (h, p) = recv(&mut main);
    assert_eq!(h.kind, FrameKind::SessionAccept, "{:?}", Reject::decode(&p));
    let accept = SessionAccept::decode(&p).unwrap();
    let chans = (0..hello.channels)
        .map(|index| {
            let mut c = connect(addr);
            let ch = ChannelHello {
                session: hello.session,
                index,
            };
            send(&mut c, FrameKind::ChannelHello, &ch.encode());
            assert_eq!(recv(&mut c).0.kind, FrameKind::ChannelAccept);
            c
        })
        .collect();
    Session {
        main,
        chans,
        accept,
    }
}

/// The next frame on the main channel that is not a Credit (credits are recorded).
fn next_non_credit(main: &mut TcpStream, credits: &mut Vec<Credit>) -> (FrameHeader, Vec<u8>) {
    loop {
        let (h, p) = recv(main);
        if h.kind != FrameKind::Credit {
            return (h, p);
        }
        credits.push(Credit::decode(&p).unwrap());
    }
}

/// Runs a destination with vfio-sim devices, opens a session with `devices` of them, lets
/// `attack` speak on it, and returns the destination's Reject and its error.
fn destination_refuses(
    devices: usize,
    attack: impl FnOnce(&mut Session),
) -> (Reject, IncomingError) {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_endpoint().unwrap().to_string();
    let addr = addr.strip_prefix("tcp:").unwrap().to_string();
    let config = IncomingConfig {
        credit_window: WINDOW,
        // Every device's full window: the accept below says exactly that.
        buffer_cap: 0,
        setup_timeout: Duration::from_secs(10),
        ..IncomingConfig::default()
    };
    let factories = Factories {
        guest: &Factory,
        devices: &DeviceModels,
    };
    std::thread::scope(|s| {
        let dest = s.spawn(|| receive_vm(&listener, factories, &config, &|_| {}));
        let mut session = open(&addr, &hello(SessionId([5; 16]), devices, 0));
        assert_eq!(session.accept.window, WINDOW);
        assert_eq!(
            session.accept.buffer_cap,
            devices as u64 * WINDOW as u64 * CHUNK as u64
        );
        attack(&mut session);
        let (h, payload) = next_non_credit(&mut session.main, &mut Vec::new());
        assert_eq!(h.kind, FrameKind::Reject);
        let reject = Reject::decode(&payload).unwrap();
        let outcome = dest.join().expect("receive_vm must not panic");
        let err = outcome.err().expect("the incoming migration must fail");
        (reject, err)
    })
}

fn assert_protocol_error(reject: &Reject, err: &IncomingError, words: &[&str]) {
    for w in words {
        assert!(
            reject.reason.contains(w),
            "reason '{}' should mention '{w}'",
            reject.reason
        );
        assert!(
            err.to_string().contains(w),
            "error '{err}' should mention '{w}'"
        );
    }
    assert!(matches!(err, IncomingError::Channel(_)), "{err}");
}

#[test]
fn a_chunk_outside_the_credit_window_is_refused_before_its_data() {
    let (r, e) = destination_refuses(2, |s| {
        // Window [0, 3): chunk 3 of device 1 is one past it. Its 4 KiB are never sent.
        s.chans[1]
            .write_all(&chunk_header_only(1, WINDOW, CHUNK))
            .unwrap();
    });
    assert_protocol_error(
        &r,
        &e,
        &["chunk 3 of device 1", "outside its credit window [0, 3)"],
    );
}

#[test]
fn a_far_away_idx_is_refused_before_its_data() {
    let (r, e) = destination_refuses(1, |s| {
        s.chans[0]
            .write_all(&chunk_header_only(0, u32::MAX, CHUNK))
            .unwrap();
    });
    assert_protocol_error(&r, &e, &["outside its credit window"]);
}

#[test]
fn a_duplicate_idx_is_refused() {
    let (r, e) = destination_refuses(1, |s| {
        // Chunk 2 waits in the reorder buffer (chunk 0 and 1 are missing); it comes again
        // on the other channel.
        let c = real_chunks(0, 3);
        send(&mut s.chans[0], FrameKind::DeviceChunk, &chunk(0, 2, &c[2]));
        send(&mut s.chans[1], FrameKind::DeviceChunk, &chunk(0, 2, &c[2]));
    });
    assert_protocol_error(&r, &e, &["duplicate chunk 2 of device 0"]);
}

#[test]
fn a_chunk_already_loaded_is_a_duplicate_too() {
    let (r, e) = destination_refuses(1, |s| {
        // A real chunk 0 is loaded (the device checks its bytes) and earns credit; sent
        // again, it is refused, not handed to the device a second time.
        let c = real_chunks(0, 1);
        send(&mut s.chans[0], FrameKind::DeviceChunk, &chunk(0, 0, &c[0]));
        let (h, p) = recv(&mut s.main);
        assert_eq!(h.kind, FrameKind::Credit, "{:?}", Reject::decode(&p));
        assert_eq!(
            Credit::decode(&p).unwrap(),
            Credit {
                device: 0,
                up_to: 1 + WINDOW
            }
        );
        send(&mut s.chans[1], FrameKind::DeviceChunk, &chunk(0, 0, &c[0]));
    });
    assert_protocol_error(&r, &e, &["duplicate chunk 0 of device 0"]);
}

#[test]
fn a_chunk_for_an_unknown_device_is_refused_before_its_data() {
    let (r, e) = destination_refuses(2, |s| {
        s.chans[0]
            .write_all(&chunk_header_only(2, 0, CHUNK))
            .unwrap();
    });
    assert_protocol_error(&r, &e, &["unknown device 2", "the session has 2"]);
}

#[test]
fn a_chunk_larger_than_the_chunk_size_is_refused_before_its_data() {
    let (r, e) = destination_refuses(1, |s| {
        // 16 MiB claimed: within the frame limit of a DeviceChunk, far over the session's.
        s.chans[1]
            .write_all(&chunk_header_only(0, 0, 16 << 20))
            .unwrap();
    });
    assert_protocol_error(&r, &e, &["more than the session's chunk size of 4096"]);
}

#[test]
fn a_chunk_one_byte_too_large_is_refused() {
    let (r, e) = destination_refuses(1, |s| {
        send(
            &mut s.chans[0],
            FrameKind::DeviceChunk,
            &chunk(0, 0, &[7u8; CHUNK + 1]),
        );
    });
    assert_protocol_error(&r, &e, &["has 4097 bytes", "chunk size of 4096"]);
}

#[test]
fn a_device_chunk_shorter_than_its_header_is_refused() {
    let (r, e) = destination_refuses(1, |s| {
        send(&mut s.chans[0], FrameKind::DeviceChunk, &[0, 0, 0, 0]);
    });
    assert_protocol_error(
        &r,
        &e,
        &["DeviceChunk of 4 bytes is shorter than its header"],
    );
}

#[test]
fn a_chunk_out_of_order_content_breaks_the_device_not_the_destination() {
    // Control: the checks above are about the stream's framing. Bytes that arrive in the
    // right slot but are wrong (here chunk 1's data sent as chunk 0) reach the device, which
    // refuses them like hardware would; the migration fails with a load error.
    let (r, e) = destination_refuses(1, |s| {
        let c = real_chunks(0, 2);
        send(&mut s.chans[0], FrameKind::DeviceChunk, &chunk(0, 0, &c[1]));
    });
    assert!(
        r.reason.contains("vfio0") && r.reason.contains("load"),
        "{r}"
    );
    assert!(matches!(e, IncomingError::Device(_)), "{e}");
}

#[test]
fn a_buffer_cap_below_one_chunk_per_device_is_refused() {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_endpoint().unwrap().to_string();
    let addr = addr.strip_prefix("tcp:").unwrap().to_string();
    let config = IncomingConfig::default();
    let factories = Factories {
        guest: &Factory,
        devices: &DeviceModels,
    };
    std::thread::scope(|s| {
        let dest = s.spawn(|| receive_vm(&listener, factories, &config, &|_| {}));
        let mut main = connect(&addr);
        // Two devices of 4 KiB chunks, a cap of 4 KiB + 1 byte: the second device's loader
        // could never get its next chunk in.
        let h = hello(SessionId([6; 16]), 2, CHUNK as u64 + 1);
        send(&mut main, FrameKind::SessionHello, &h.encode());
        let (fh, p) = recv(&mut main);
        assert_eq!(fh.kind, FrameKind::Reject);
        let r = Reject::decode(&p).unwrap();
        assert_eq!(r.code, RejectCode::TooLarge, "{r}");
        assert!(
            r.reason.contains(
                "buffer cap of 4097 bytes cannot hold one 4096-byte chunk for each of 2 devices"
            ),
            "{r}"
        );
        // Refused, and the destination waits on for a session it can serve: cancel the wait.
        config.cancel.cancel();
        let err = dest
            .join()
            .expect("receive_vm must not panic")
            .err()
            .expect("cancelled");
        assert!(matches!(err, IncomingError::Cancelled), "{err}");
    });
}
