//! Speaking the protocol by hand over a plain TCP socket, for tests of what a destination
//! does with what a real source would never send.

use livemig_wire::{
    encode_frame, verify_payload, DeviceSetup, FrameHeader, FrameKind, GuestDescriptor, Limits,
    MemoryRange, RamTransfer, SessionHello, SessionId, HEADER_LEN,
};
use std::io::{Read, Write};
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
    }
}
