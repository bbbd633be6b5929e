//! Speaking the protocol by hand over a plain TCP socket, for tests of what a destination
//! does with what a real source would never send.

use livemig_wire::{
    encode_frame, verify_payload, DeviceSetup, FrameHeader, FrameKind, GuestDescriptor, Limits,
    MemoryRange, RamTransfer, SessionHello, SessionId, WireError, HEADER_LEN,
};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends one whole frame.
pub fn send(s: &mut TcpStream, kind: FrameKind, payload: &[u8]) {
    s.write_all(&encode_frame(kind, payload)).unwrap();
}

/// Receives one frame, checked (header, length, CRC).
pub fn recv(s: &mut TcpStream) -> (FrameHeader, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h).unwrap();
    let h = FrameHeader::decode(&h, &Limits::default()).unwrap();
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).unwrap();
    verify_payload(&h, &p).unwrap();
    (h, p)
}

/// A destination's answer to a source's hello (its header and payload): the session, and
/// the SessionAccept frame `accept` makes of it, in the hello's layout, agreeing on the
/// highest common version and every feature offered, as a destination of this build does.
#[allow(dead_code)]
pub fn answer_hello(
    h: &FrameHeader,
    payload: &[u8],
    accept: impl FnOnce(&SessionHello) -> livemig_wire::SessionAccept,
) -> (SessionHello, Vec<u8>) {
    use livemig_wire::version;
    let (offer, hello) = version::decode_hello(h.version, payload).unwrap();
    let agreed = version::negotiate(&offer, livemig_wire::Versions::THIS, offer.features).unwrap();
    let payload = version::encode_accept(h.version, &agreed, &accept(&hello));
    let frame = livemig_wire::encode_frame_versioned(h.version, FrameKind::SessionAccept, &payload);
    (hello, frame)
}

/// Sends one whole frame; false if the peer is gone.
#[allow(dead_code)]
pub fn try_send(s: &mut TcpStream, kind: FrameKind, payload: &[u8]) -> bool {
    s.write_all(&encode_frame(kind, payload)).is_ok()
}

/// Reads one frame: the I/O error if the peer closed or said nothing within the socket's
/// read timeout; the wire's error if what came is not a valid frame (header or CRC).
fn read_one(s: &mut TcpStream) -> io::Result<Result<(FrameHeader, Vec<u8>), WireError>> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)?;
    let h = match FrameHeader::decode(&h, &Limits::default()) {
        Ok(h) => h,
        Err(e) => return Ok(Err(e)),
    };
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p)?;
    Ok(verify_payload(&h, &p).map(|()| (h, p)))
}

/// Receives one frame (a Ping too); `None` if the peer closed, said nothing within the
/// socket's read timeout, or sent what is not a valid frame.
#[allow(dead_code)]
pub fn try_recv(s: &mut TcpStream) -> Option<(FrameHeader, Vec<u8>)> {
    read_one(s).ok()?.ok()
}

/// The next frame that is not a Ping, checked (one that is not valid fails the test);
/// `None` if the peer closed or said nothing within the socket's read timeout.
#[allow(dead_code)]
pub fn recv_frame(s: &mut TcpStream) -> Option<(FrameHeader, Vec<u8>)> {
    loop {
        let (h, p) = read_one(s).ok()?.unwrap();
        if h.kind != FrameKind::Ping {
            return Some((h, p));
        }
    }
}

/// `HOST:PORT` of a `tcp:HOST:PORT` address.
#[allow(dead_code)]
pub fn host_port(addr: &str) -> &str {
    addr.strip_prefix("tcp:").unwrap()
}

/// Connects, with a read timeout so a test fails instead of hanging.
pub fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// A hello for a 1 MiB synthetic guest with two data channels and `devices`, as a source
/// copying RAM would send it.
#[allow(dead_code)]
pub fn synthetic_hello(session: SessionId, devices: DeviceSetup) -> SessionHello {
    SessionHello {
        session,
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
        devices,
        ram: RamTransfer::Copy,
        peer_timeout_ms: 30_000,
        postcopy: false,
        resume: false,
    }
}
