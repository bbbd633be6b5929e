//! The frame: the unit of every livemig channel.
//!
//! ```text
//!  0       4       6       8              12             16
//!  +-------+-------+-------+--------------+--------------+------------------+
//!  | magic |version| kind  | payload len  | CRC32C(payl.)| payload ...      |
//!  +-------+-------+-------+--------------+--------------+------------------+
//!    u32     u16     u16       u32             u32          `len` bytes
//! ```
//!
//! All integers are little-endian. [`FrameHeader::decode`] checks the magic, the version (one
//! this build speaks, [`Versions::THIS`]), the kind and the length against the limit of that
//! kind *before* a receiver reads or allocates the payload; [`verify_payload`] checks the CRC
//! before the payload is interpreted. The version is that of the payload's layout (see
//! [`crate::version`]): [`FRAME_VERSION`] for every frame but a version-5 hello and accept.

use crate::cursor::{Reader, Writer};
use crate::version::{Versions, FRAME_VERSION};
use crate::WireError;

/// "LMIG" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"LMIG");
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;

macro_rules! frame_kinds {
    ($($(#[$doc:meta])* $name:ident = $val:expr, $limit:expr;)*) => {
        /// What a frame carries. Unknown values are rejected by the decoder.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum FrameKind {
            $($(#[$doc])* $name = $val,)*
        }

        impl FrameKind {
            /// The kind a header's kind field names; an unknown value is
            /// [`WireError::UnknownKind`].
            pub fn from_u16(v: u16) -> Result<Self, WireError> {
                match v {
                    $($val => Ok(FrameKind::$name),)*
                    other => Err(WireError::UnknownKind(other)),
                }
            }

            /// The kind's name, for error messages.
            pub fn name(self) -> &'static str {
                match self {
                    $(FrameKind::$name => stringify!($name),)*
                }
            }

            /// The largest payload this kind may carry, given the receiver's limits.
            pub fn max_payload(self, limits: &Limits) -> u64 {
                let _ = limits;
                match self {
                    $(FrameKind::$name => $limit(limits),)*
                }
            }
        }
    };
}

const SMALL: u64 = 64 * 1024;

frame_kinds! {
    /// Main channel, source to destination: opens a session.
    SessionHello = 1, |_| SMALL;
    /// Main channel, destination to source: the session is accepted.
    SessionAccept = 2, |_| SMALL;
    /// Data channel, source to destination: binds the connection to a session.
    ChannelHello = 3, |_| SMALL;
    /// Data channel, destination to source: the channel is accepted.
    ChannelAccept = 4, |_| SMALL;
    /// Either way on any channel: the sender refuses or aborts, with a reason.
    Reject = 5, |_| SMALL;
    /// Main channel, local mode, right after the hello: the files backing guest memory,
    /// handed over as `SCM_RIGHTS` ancillary data.
    MemoryFiles = 6, |_| SMALL;
    /// Data channel: a batch of guest pages.
    RamPages = 16, |l: &Limits| crate::ram::payload_len(l.max_pages_per_packet, 0, true);
    /// Data channel: every page of a round has been sent on this channel.
    RoundEnd = 17, |_| SMALL;
    /// Data channel and preempt channel, during postcopy: this channel carries no more pages.
    PostcopyDone = 19, |_| SMALL;
    /// Data channel (main channel in serial mode): a chunk of a device's state stream.
    DeviceChunk = 18, |_| crate::device::CHUNK_PREFIX as u64 + crate::device::MAX_CHUNK_SIZE as u64;
    /// Main channel: the guest's non-memory state (vCPUs, VM, workload).
    GuestState = 32, |l: &Limits| l.max_state_bytes;
    /// Main channel: the source has sent everything.
    Complete = 33, |_| SMALL;
    /// Main channel, return path: the destination has loaded everything.
    Loaded = 34, |_| SMALL;
    /// Main channel: the source gives up the guest; the destination may resume it.
    Handover = 35, |_| SMALL;
    /// Main channel, return path: the destination guest runs.
    Resumed = 36, |_| SMALL;
    /// Main channel: a precopy round begins, for the destination's log.
    RoundStart = 37, |_| SMALL;
    /// Main channel, return path: every page of a round has been written into guest memory.
    RoundAck = 38, |_| SMALL;
    /// Main channel, return path: credit for a device's chunks.
    Credit = 39, |_| SMALL;
    /// Main channel: the blobs of the non-iterable devices.
    VmStates = 40, |l: &Limits| l.max_state_bytes;
    /// Any channel, either way, after the handshake: nothing to say, but alive. Sent when a
    /// channel has been idle for a quarter of the peer timeout; skipped by every reader.
    Ping = 41, |_| 0;
    /// Main channel, once, with the guest paused: the switch to postcopy, listing the pages
    /// the destination must discard and then receive. Its limit holds the bitmaps of a guest
    /// of [`Limits::max_guest_memory`]; the exact length follows from the session's ranges
    /// ([`crate::PostcopyStart::payload_len`]).
    PostcopyStart = 42, |l: &Limits| crate::postcopy::max_payload_len(l.max_guest_memory);
    /// Main channel, return path, during postcopy: pages faulting vCPUs wait for.
    PageRequest = 43, |_| SMALL;
    /// Main channel, return path: every page is installed; the source may drop its copy.
    PostcopyComplete = 44, |_| SMALL;
    /// Main channel, destination to source, once, right after the channels of a resuming
    /// session (postcopy recovery) are accepted: the pages the destination still misses, as
    /// a `PostcopyStart`'s payload (the postcopy round and one bitmap per range).
    PostcopyResume = 45, |l: &Limits| crate::postcopy::max_payload_len(l.max_guest_memory);
    /// Main channel, return path, at most once a session, with the `switchover ack` feature:
    /// every device twin has loaded what its source must send before a switchover (QEMU's
    /// `switchover-ack`). Empty.
    SwitchoverAck = 46, |_| 0;
}

/// Receiver-side bounds. A frame longer than these is refused before anything is allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most pages one RamPages frame may carry (normal and zero pages together).
    pub max_pages_per_packet: u32,
    /// Largest GuestState payload accepted.
    pub max_state_bytes: u64,
    /// Largest guest memory, in bytes, whose postcopy bitmaps (a `PostcopyStart` frame: one
    /// bit per page, 1/32768 of the guest) are accepted. A destination sets it to the largest
    /// guest it accepts.
    pub max_guest_memory: u64,
}

/// [`Limits::max_guest_memory`] by default: 16 TiB, whose postcopy bitmaps take 512 MiB.
pub const DEFAULT_MAX_GUEST_MEMORY: u64 = 16 << 40;

/// Pages per packet by default: 128 x 4 KiB = 512 KiB, as QEMU's multifd.
pub const DEFAULT_PAGES_PER_PACKET: u32 = 128;
/// The hard upper bound on pages per packet, whatever is configured.
pub const MAX_PAGES_PER_PACKET: u32 = 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pages_per_packet: MAX_PAGES_PER_PACKET,
            max_state_bytes: 64 << 20,
            max_guest_memory: DEFAULT_MAX_GUEST_MEMORY,
        }
    }
}

/// The fixed header in front of every payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The version of the payload's layout: [`FRAME_VERSION`] but for a version-5 hello
    /// and accept.
    pub version: u16,
    /// What the payload is.
    pub kind: FrameKind,
    /// The payload's length in bytes, at most its kind's limit.
    pub len: u32,
    /// CRC32C (Castagnoli) of the payload (for `RamPages`, of its prefix only: each page
    /// carries a CRC of its own).
    pub crc: u32,
}

impl FrameHeader {
    /// A header for `payload` of [`FRAME_VERSION`], its CRC computed.
    pub fn for_payload(kind: FrameKind, payload: &[u8]) -> Self {
        FrameHeader {
            version: FRAME_VERSION,
            kind,
            len: payload.len() as u32,
            crc: crc32c::crc32c(crc_covered(kind, payload)),
        }
    }

    /// The header's 16 bytes: magic u32, version u16, kind u16, len u32, crc u32.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut v = Vec::with_capacity(HEADER_LEN);
        Writer::new(&mut v)
            .u32(MAGIC)
            .u16(self.version)
            .u16(self.kind as u16)
            .u32(self.len)
            .u32(self.crc);
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(&v);
        out
    }

    /// Decodes and validates a header: magic, a version of [`Versions::THIS`], kind, and
    /// length within `limits`.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: &Limits) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "frame header");
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(WireError::BadMagic {
                found: magic,
                expected: MAGIC,
            });
        }
        let version = r.u16()?;
        if !Versions::THIS.contains(version) {
            return Err(WireError::UnsupportedVersion {
                found: version,
                supported: Versions::THIS,
            });
        }
        let kind = FrameKind::from_u16(r.u16()?)?;
        let len = r.u32()?;
        let crc = r.u32()?;
        let limit = kind.max_payload(limits);
        if len as u64 > limit {
            return Err(WireError::TooLong {
                kind: kind.name(),
                len: len as u64,
                limit,
            });
        }
        Ok(FrameHeader {
            version,
            kind,
            len,
            crc,
        })
    }

    /// Fails unless this header is of kind `expected`.
    pub fn expect(&self, expected: FrameKind) -> Result<(), WireError> {
        if self.kind == expected {
            Ok(())
        } else {
            Err(WireError::UnexpectedKind {
                expected: expected.name(),
                found: self.kind.name(),
            })
        }
    }
}

/// Checks a received payload against its header: exact length and CRC32C.
pub fn verify_payload(header: &FrameHeader, payload: &[u8]) -> Result<(), WireError> {
    if payload.len() as u64 != header.len as u64 {
        return Err(WireError::BadLength {
            what: header.kind.name(),
            expected: header.len as u64,
            found: payload.len() as u64,
        });
    }
    let found = crc32c::crc32c(crc_covered(header.kind, payload));
    if found != header.crc {
        return Err(WireError::BadCrc {
            kind: header.kind.name(),
            expected: header.crc,
            found,
        });
    }
    Ok(())
}

/// The part of a payload its frame CRC covers: all of it, except for RamPages, whose pages
/// carry CRCs of their own (see [`crate::ram`]).
pub fn crc_covered(kind: FrameKind, payload: &[u8]) -> &[u8] {
    match kind {
        FrameKind::RamPages => &payload[..crate::ram::crc_span(payload)],
        _ => payload,
    }
}

/// Encodes a whole frame (header of [`FRAME_VERSION`] and payload) into one buffer.
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    encode_frame_versioned(FRAME_VERSION, kind, payload)
}

/// Encodes a whole frame whose payload has the layout of `version`.
pub fn encode_frame_versioned(version: u16, kind: FrameKind, payload: &[u8]) -> Vec<u8> {
    let header = FrameHeader {
        version,
        ..FrameHeader::for_payload(kind, payload)
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    out
}

/// Decodes a whole frame from one buffer, checking header, length and CRC.
/// Returns the header and the payload. Convenient for tests and fuzzing.
pub fn decode_frame<'a>(
    bytes: &'a [u8],
    limits: &Limits,
) -> Result<(FrameHeader, &'a [u8]), WireError> {
    let mut r = Reader::new(bytes, "frame");
    let header = FrameHeader::decode(&r.array::<HEADER_LEN>()?, limits)?;
    let payload = r.bytes(header.len as usize)?;
    r.finish()?;
    verify_payload(&header, payload)?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = FrameHeader::for_payload(FrameKind::RoundEnd, b"hello");
        let d = FrameHeader::decode(&h.encode(), &Limits::default()).unwrap();
        assert_eq!(h, d);
    }

    #[test]
    fn rejects_bad_magic_version_kind_length() {
        let l = Limits::default();
        let good = FrameHeader::for_payload(FrameKind::Complete, b"x").encode();

        let mut bad = good;
        bad[0] ^= 1;
        assert!(matches!(
            FrameHeader::decode(&bad, &l),
            Err(WireError::BadMagic { .. })
        ));

        let mut bad = good;
        bad[4] = 9;
        let err = FrameHeader::decode(&bad, &l).unwrap_err();
        assert_eq!(
            err,
            WireError::UnsupportedVersion {
                found: 9,
                supported: Versions::THIS
            }
        );
        assert!(err.to_string().contains("version 9"), "{err}");
        assert!(err.to_string().contains("versions 4 to 5"), "{err}");
        for old in [0, 3] {
            bad[4] = old;
            assert!(FrameHeader::decode(&bad, &l).is_err());
        }
        for spoken in [4, 5] {
            bad[4] = spoken;
            assert_eq!(
                FrameHeader::decode(&bad, &l).unwrap().version,
                spoken as u16
            );
        }

        let mut bad = good;
        bad[6] = 0xee;
        assert!(matches!(
            FrameHeader::decode(&bad, &l),
            Err(WireError::UnknownKind(0xee))
        ));

        let mut bad = good;
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&bad, &l),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn crc_catches_a_flipped_bit() {
        let mut f = encode_frame(FrameKind::GuestState, &[7u8; 100]);
        assert!(decode_frame(&f, &Limits::default()).is_ok());
        f[HEADER_LEN + 50] ^= 0x10;
        assert!(matches!(
            decode_frame(&f, &Limits::default()),
            Err(WireError::BadCrc { .. })
        ));
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let f = encode_frame(FrameKind::GuestState, &[7u8; 100]);
        for cut in 0..f.len() {
            assert!(decode_frame(&f[..cut], &Limits::default()).is_err());
        }
    }
}
