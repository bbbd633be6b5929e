//! Frames on a socket: header and payload out with one vectored write, and in with the
//! header checked before the payload is read into a buffer whose size the header bounded.
//!
//! Also the TLS entry points [`TlsConfig::connect`] and [`TlsConfig::accept`]: the TLS
//! layer under the frames runs the handshake, and the frames a peer speaking plain livemig
//! is answered in come from here ([`PlainLivemig`]).

use crate::cancel::CancelToken;
use crate::error::{ChannelError, ChannelName};
use crate::tls::{PlainPeer, TlsConfig, TlsError};
use crate::transport::{Endpoint, Stream};
use livemig_wire::{
    verify_payload, FrameHeader, FrameKind, Limits, Reject, RejectCode, FRAME_VERSION, HEADER_LEN,
    MAGIC,
};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{BorrowedFd, OwnedFd};

/// Sends one frame whose payload is the concatenation of `parts`.
pub fn send_parts(
    stream: &mut Stream,
    channel: ChannelName,
    kind: FrameKind,
    parts: &[&[u8]],
) -> Result<(), ChannelError> {
    send_parts_versioned(stream, channel, FRAME_VERSION, kind, parts)
}

/// Sends one frame whose payload, the concatenation of `parts`, has the layout of protocol
/// `version` (every frame but a version-5 hello and accept: [`FRAME_VERSION`]).
fn send_parts_versioned(
    stream: &mut Stream,
    channel: ChannelName,
    version: u16,
    kind: FrameKind,
    parts: &[&[u8]],
) -> Result<(), ChannelError> {
    let mut crc = 0u32;
    let mut len = 0usize;
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
        len += p.len();
    }
    let header = FrameHeader {
        version,
        kind,
        len: len as u32,
        crc,
    }
    .encode();
    let mut slices = Vec::with_capacity(parts.len() + 1);
    slices.push(IoSlice::new(&header));
    slices.extend(parts.iter().map(|p| IoSlice::new(p)));
    stream
        .write_all_vectored(&mut slices)
        .map_err(|source| ChannelError::Io {
            channel,
            op: "send",
            source,
        })
}

/// Sends one frame.
pub fn send(
    stream: &mut Stream,
    channel: ChannelName,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ChannelError> {
    send_parts(stream, channel, kind, &[payload])
}

/// Sends one frame whose payload has the layout of protocol `version`: the hello, the accept
/// and a refusal of the hello are sent in the hello's version (see `livemig_wire::version`).
pub fn send_versioned(
    stream: &mut Stream,
    channel: ChannelName,
    version: u16,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ChannelError> {
    send_parts_versioned(stream, channel, version, kind, &[payload])
}

/// Sends one frame with file descriptors attached to its first byte (`unix:` streams only).
pub fn send_with_fds(
    stream: &mut Stream,
    channel: ChannelName,
    kind: FrameKind,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ChannelError> {
    let frame = livemig_wire::encode_frame(kind, payload);
    let err = |source| ChannelError::Io {
        channel,
        op: "send",
        source,
    };
    let sent = stream.send_fds(&frame, fds).map_err(err)?;
    stream.write_all(&frame[sent..]).map_err(err)
}

/// Receives a frame header with the file descriptors attached to its first byte (at most
/// `max_fds`; `unix:` streams only). The payload is left on the socket.
pub fn recv_header_with_fds(
    stream: &mut Stream,
    channel: ChannelName,
    limits: &Limits,
    max_fds: usize,
) -> Result<(FrameHeader, Vec<OwnedFd>), ChannelError> {
    let mut raw = [0u8; HEADER_LEN];
    // recv_fds retries EINTR itself.
    let (n, fds) = stream
        .recv_fds(&mut raw, max_fds)
        .map_err(|source| ChannelError::Io {
            channel,
            op: "receive",
            source,
        })?;
    if n == 0 {
        return Err(ChannelError::Closed { channel });
    }
    read_exact(stream, channel, &mut raw[n..], false)?;
    let h = FrameHeader::decode(&raw, limits)
        .map_err(|source| ChannelError::Wire { channel, source })?;
    Ok((h, fds))
}

/// Receives one frame into `buf` (resized to the payload) and returns its header. A Reject
/// from the peer becomes [`ChannelError::Rejected`].
pub fn recv(
    stream: &mut Stream,
    channel: ChannelName,
    limits: &Limits,
    buf: &mut Vec<u8>,
) -> Result<FrameHeader, ChannelError> {
    let header = recv_header(stream, channel, limits)?;
    recv_payload(stream, channel, &header, buf)?;
    Ok(header)
}

/// Receives and validates a frame header; the payload is left on the socket.
pub fn recv_header(
    stream: &mut Stream,
    channel: ChannelName,
    limits: &Limits,
) -> Result<FrameHeader, ChannelError> {
    loop {
        let mut raw = [0u8; HEADER_LEN];
        read_exact(stream, channel, &mut raw, true)?;
        let h = FrameHeader::decode(&raw, limits)
            .map_err(|source| ChannelError::Wire { channel, source })?;
        // A ping carries nothing (its limit is 0 bytes): it only proves the peer alive.
        if h.kind != FrameKind::Ping {
            return Ok(h);
        }
    }
}

/// Tells the peer this side is alive (see `FrameKind::Ping`).
pub fn send_ping(stream: &mut Stream, channel: ChannelName) -> Result<(), ChannelError> {
    send(stream, channel, FrameKind::Ping, &[])
}

/// Receives the payload of `header` into `buf`, checks its CRC, and turns a Reject into an
/// error.
pub fn recv_payload(
    stream: &mut Stream,
    channel: ChannelName,
    header: &FrameHeader,
    buf: &mut Vec<u8>,
) -> Result<(), ChannelError> {
    // The length is bounded by the limits the header was decoded with: safe to size for it.
    buf.resize(header.len as usize, 0);
    read_exact(stream, channel, buf, false)?;
    verify_payload(header, buf).map_err(|source| ChannelError::Wire { channel, source })?;
    if header.kind == FrameKind::Reject {
        let reject =
            Reject::decode(buf).map_err(|source| ChannelError::Wire { channel, source })?;
        return Err(ChannelError::Rejected { channel, reject });
    }
    Ok(())
}

/// Receives one frame that must be of kind `expected`.
pub fn recv_expect(
    stream: &mut Stream,
    channel: ChannelName,
    limits: &Limits,
    buf: &mut Vec<u8>,
    expected: FrameKind,
) -> Result<(), ChannelError> {
    let h = recv(stream, channel, limits, buf)?;
    h.expect(expected)
        .map_err(|source| ChannelError::Wire { channel, source })
}

/// Reads exactly `buf.len()` bytes. `at_frame_start`: a clean end of stream before the first
/// byte is reported as `Closed`, not as a truncated frame.
pub fn read_exact(
    stream: &mut Stream,
    channel: ChannelName,
    buf: &mut [u8],
    at_frame_start: bool,
) -> Result<(), ChannelError> {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) if done == 0 && at_frame_start => return Err(ChannelError::Closed { channel }),
            Ok(0) => {
                return Err(ChannelError::Io {
                    channel,
                    op: "receive",
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed inside a frame ({done} of {} bytes)",
                            buf.len()
                        ),
                    ),
                })
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ChannelError::Io {
                    channel,
                    op: "receive",
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Best effort: tells the peer why we stop. Errors are ignored, the peer may be gone.
pub fn send_reject(stream: &mut Stream, channel: ChannelName, reject: &Reject) {
    send_reject_versioned(stream, channel, FRAME_VERSION, reject);
}

/// [`send_reject`] in a frame of protocol `version`: a refusal of a hello goes in the
/// hello's version, so that the source tells it from an older peer's refusal of the
/// version itself.
pub fn send_reject_versioned(
    stream: &mut Stream,
    channel: ChannelName,
    version: u16,
    reject: &Reject,
) {
    let _ = send_versioned(
        stream,
        channel,
        version,
        FrameKind::Reject,
        &reject.encode(),
    );
}

/// A peer that speaks plain livemig where TLS was expected, told so in livemig frames. The
/// TLS handshake recognises it by its first byte and hands it the socket, blocking again.
struct PlainLivemig;

impl PlainPeer for PlainLivemig {
    fn is_plain(&self, first: u8) -> bool {
        // A frame starts with the magic ("LMIG"); a TLS record with its type (0x16).
        first == MAGIC.to_le_bytes()[0]
    }

    fn refuse(&self, net: &mut Stream) {
        let mut buf = Vec::new();
        let _ = recv(net, ChannelName::Incoming, &Limits::default(), &mut buf);
        send_reject(
            net,
            ChannelName::Incoming,
            &Reject::new(
                RejectCode::Unsupported,
                "this destination requires TLS (TLS 1.3 with client certificates): give the source --tls-cert, --tls-key and --tls-ca",
            ),
        );
    }

    fn answer(&self, net: &mut Stream) -> String {
        let mut buf = Vec::new();
        match recv(net, ChannelName::Main, &Limits::default(), &mut buf) {
            Err(ChannelError::Rejected { reject, .. }) => {
                format!("it refused: {}", reject.reason)
            }
            Ok(h) => format!("it sent a {} frame", h.kind.name()),
            Err(e) => e.to_string(),
        }
    }
}

/// TLS on a livemig connection.
impl TlsConfig {
    /// The source's side: runs the TLS handshake on `net`, just connected to `to`, within
    /// `timeout` (or until `cancel`), and returns the plaintext stream.
    pub fn connect(
        &self,
        net: Stream,
        to: &Endpoint,
        timeout: std::time::Duration,
        cancel: Option<&CancelToken>,
    ) -> Result<Stream, TlsError> {
        self.connect_with(net, to, timeout, cancel, &PlainLivemig)
    }

    /// The destination's side: runs the TLS handshake on `net`, just accepted, within
    /// `timeout` (or until `cancel`), and returns the plaintext stream. A peer that fails
    /// (no certificate, one from another CA, not TLS at all) is refused: it gets an alert,
    /// or a plain livemig `Reject` if it spoke plain livemig, and the error says why.
    pub fn accept(
        &self,
        net: Stream,
        timeout: std::time::Duration,
        cancel: Option<&CancelToken>,
    ) -> Result<Stream, TlsError> {
        self.accept_with(net, timeout, cancel, &PlainLivemig)
    }
}
