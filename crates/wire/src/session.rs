//! Session set-up: the main channel's hello and each data channel's handshake.
//!
//! ```text
//! source                                   destination
//!   | main:  SessionHello{id, channels, guest} |
//!   | -------------------------------------->  |  checks version, limits
//!   |        SessionAccept | Reject{reason}    |
//!   | <--------------------------------------  |
//!   | data i: ChannelHello{id, index}          |  (i = 0..channels, any order)
//!   | -------------------------------------->  |  unknown id, duplicate or out-of-range
//!   |        ChannelAccept | Reject{reason}    |  index: Reject
//!   | <--------------------------------------  |
//! ```

use crate::cursor::{Reader, Writer};
use crate::device::DeviceSetup;
use crate::WireError;
use std::fmt;

/// The most data channels a session may have.
pub const MAX_CHANNELS: u16 = 64;
/// The most memory regions a guest description may list.
pub const MAX_REGIONS: usize = 64;
/// The most vCPUs a guest description may list.
pub const MAX_VCPUS: u16 = 256;
const MAX_NAME: usize = 64;
const MAX_REASON: usize = 4096;

/// A migration session's random identifier: 16 bytes the source draws for each migration
/// (shown as a UUID) and repeats in every data channel's hello to join that session.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One contiguous range of guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRange {
    /// The guest-physical address the range starts at (page-aligned).
    pub guest_addr: u64,
    /// Its length in bytes (page-aligned, not 0).
    pub size: u64,
}

/// What the destination must build to receive the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestDescriptor {
    /// The guest's kind, e.g. "synthetic" or "kvm".
    pub kind: String,
    /// The guest's vCPUs (at most [`MAX_VCPUS`]).
    pub vcpus: u16,
    /// The page size pages are sent in: always 4096 ([`crate::PAGE_SIZE`]).
    pub page_size: u32,
    /// The guest's RAM: 1 to [`MAX_REGIONS`] ranges, sorted, not overlapping.
    pub ranges: Vec<MemoryRange>,
}

impl GuestDescriptor {
    /// The guest's RAM in bytes: the ranges' sizes added up.
    pub fn memory_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.string(&self.kind)
            .u16(self.vcpus)
            .u32(self.page_size)
            .u16(self.ranges.len() as u16);
        for r in &self.ranges {
            w.u64(r.guest_addr).u64(r.size);
        }
    }

    /// Reads the guest's kind, vCPUs and page size, then its memory ranges, each checked
    /// against the limits before the next is read.
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let kind = r.string("guest kind", MAX_NAME)?;
        let vcpus = r.u16()?;
        if vcpus > MAX_VCPUS {
            return Err(WireError::OutOfRange {
                field: "vcpus",
                value: vcpus as u64,
                reason: "at most 256",
            });
        }
        let page_size = r.u32()?;
        if page_size != crate::PAGE_SIZE as u32 {
            return Err(WireError::OutOfRange {
                field: "page_size",
                value: page_size as u64,
                reason: "only 4096-byte pages are supported",
            });
        }
        Ok(GuestDescriptor {
            kind,
            vcpus,
            page_size,
            ranges: read_ranges(r)?,
        })
    }
}

/// The memory ranges of a guest description: a count (1 to [`MAX_REGIONS`]), then each
/// range's address and size, page-aligned, non-empty, sorted and not overlapping.
fn read_ranges(r: &mut Reader<'_>) -> Result<Vec<MemoryRange>, WireError> {
    let n = r.u16()? as usize;
    if n == 0 || n > MAX_REGIONS {
        return Err(WireError::OutOfRange {
            field: "memory ranges",
            value: n as u64,
            reason: "must be 1..=64",
        });
    }
    let mut ranges = Vec::with_capacity(n);
    let mut end_prev = 0u64;
    for _ in 0..n {
        let guest_addr = r.u64()?;
        let size = r.u64()?;
        let aligned = guest_addr % crate::PAGE_SIZE as u64 == 0
            && size % crate::PAGE_SIZE as u64 == 0
            && size > 0;
        if !aligned {
            return Err(WireError::OutOfRange {
                field: "memory range",
                value: guest_addr,
                reason: "ranges must be page-aligned and non-empty",
            });
        }
        let end = guest_addr.checked_add(size).ok_or(WireError::OutOfRange {
            field: "memory range size",
            value: size,
            reason: "range overflows the address space",
        })?;
        if guest_addr < end_prev {
            return Err(WireError::OutOfRange {
                field: "memory range",
                value: guest_addr,
                reason: "ranges must be sorted and must not overlap",
            });
        }
        end_prev = end;
        ranges.push(MemoryRange { guest_addr, size });
    }
    Ok(ranges)
}

/// Opens a session on the main channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHello {
    /// The new session's id, which each data channel's [`ChannelHello`] repeats.
    pub session: SessionId,
    /// How many data channels will join (1 to [`MAX_CHANNELS`]).
    pub channels: u16,
    /// Pages per RamPages packet the source will send (at most).
    pub pages_per_packet: u32,
    /// The guest the destination must build.
    pub guest: GuestDescriptor,
    /// The streamed devices and how their state travels.
    pub devices: DeviceSetup,
    /// How guest RAM reaches the destination.
    pub ram: RamTransfer,
    /// The source's peer timeout, milliseconds: how long it lets the destination be silent.
    /// The destination answers with the timeout both sides then use (see [`SessionAccept`]).
    pub peer_timeout_ms: u32,
    /// The source may switch this session to postcopy: the destination then takes one more
    /// data channel, index `channels`, the urgent ("preempt") channel for requested pages,
    /// and keeps every data channel open after the last precopy round for postcopy pages.
    pub postcopy: bool,
    /// This hello resumes a postcopy broken by a lost link (postcopy recovery): `session` is
    /// the broken session's id, the destination (paused in postcopy, the guest running on
    /// memory still arriving) answers with the pages it still misses (`PostcopyResume`),
    /// and every channel carries postcopy pages only. Implies `postcopy`.
    pub resume: bool,
}

/// Peer timeouts a hello or an accept may state, milliseconds: from 200 ms (pings every 50
/// ms) to one hour.
pub const PEER_TIMEOUT_MS: std::ops::RangeInclusive<u32> = 200..=3_600_000;

fn check_peer_timeout(ms: u32) -> Result<u32, WireError> {
    if PEER_TIMEOUT_MS.contains(&ms) {
        Ok(ms)
    } else {
        Err(WireError::OutOfRange {
            field: "peer timeout",
            value: ms as u64,
            reason: "must be 200 ms to one hour",
        })
    }
}

/// How guest RAM reaches the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RamTransfer {
    /// Copied as RamPages over the data channels (precopy rounds).
    #[default]
    Copy,
    /// Local mode: source and destination share a host, and the source hands the files
    /// backing guest memory (memfds) to the destination over the Unix socket of the main
    /// channel (a [`MemoryFiles`] frame right after the hello). No page is copied.
    Local,
}

impl RamTransfer {
    /// The byte that stands for it on the wire.
    fn code(self) -> u8 {
        match self {
            RamTransfer::Copy => 0,
            RamTransfer::Local => 1,
        }
    }

    fn from_code(code: u8) -> Result<Self, WireError> {
        match code {
            0 => Ok(RamTransfer::Copy),
            1 => Ok(RamTransfer::Local),
            other => Err(WireError::OutOfRange {
                field: "ram transfer",
                value: other as u64,
                reason: "0 (copy) or 1 (local)",
            }),
        }
    }
}

impl SessionHello {
    /// The payload of a `SessionHello` frame: session id, channels, pages per packet, the
    /// guest description, the device setup, the RAM transfer byte, the peer timeout and the
    /// postcopy byte.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.bytes(&self.session.0)
            .u16(self.channels)
            .u32(self.pages_per_packet);
        self.guest.write(&mut w);
        self.devices.write(&mut w);
        w.u8(self.ram.code())
            .u32(self.peer_timeout_ms)
            .u8(match (self.postcopy, self.resume) {
                (_, true) => 2,
                (true, false) => 1,
                (false, false) => 0,
            });
        out
    }

    /// Reads a `SessionHello` payload, refusing any count or size outside the limits
    /// (channels, pages per packet, vCPUs, page size, memory ranges, devices, peer timeout)
    /// before it sizes anything by it.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "SessionHello");
        let session = SessionId(r.array()?);
        let channels = r.u16()?;
        if channels == 0 || channels > MAX_CHANNELS {
            return Err(WireError::OutOfRange {
                field: "channels",
                value: channels as u64,
                reason: "must be 1..=64",
            });
        }
        let pages_per_packet = r.u32()?;
        if pages_per_packet == 0 || pages_per_packet > crate::MAX_PAGES_PER_PACKET {
            return Err(WireError::OutOfRange {
                field: "pages_per_packet",
                value: pages_per_packet as u64,
                reason: "must be 1..=1024",
            });
        }
        let guest = GuestDescriptor::read(&mut r)?;
        let devices = DeviceSetup::read(&mut r)?;
        let ram = RamTransfer::from_code(r.u8()?)?;
        let peer_timeout_ms = check_peer_timeout(r.u32()?)?;
        let (postcopy, resume) = match r.u8()? {
            0 => (false, false),
            1 => (true, false),
            2 => (true, true),
            other => return Err(WireError::OutOfRange {
                field: "postcopy",
                value: other as u64,
                reason:
                    "0 (precopy only), 1 (may switch to postcopy) or 2 (resumes a broken postcopy)",
            }),
        };
        r.finish()?;
        Ok(SessionHello {
            session,
            channels,
            pages_per_packet,
            guest,
            devices,
            ram,
            peer_timeout_ms,
            postcopy,
            resume,
        })
    }
}

/// The destination accepts a session, with the flow-control bounds it chose for device
/// state (which the source reports) and the peer timeout both sides use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionAccept {
    /// Chunks of credit each device gets at most.
    pub window: u32,
    /// Bytes of device chunks the destination buffers at most, across devices.
    pub buffer_cap: u64,
    /// The agreed peer timeout, milliseconds: the shorter of the source's and the
    /// destination's. Both sides ping every quarter of it and take a peer silent this long
    /// for dead, so neither times out a healthy peer that pings on a longer timeout.
    pub peer_timeout_ms: u32,
}

impl SessionAccept {
    /// The payload of a `SessionAccept` frame: window u32, buffer cap u64, peer timeout u32.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out)
            .u32(self.window)
            .u64(self.buffer_cap)
            .u32(self.peer_timeout_ms);
        out
    }

    /// Reads a `SessionAccept` payload; a peer timeout outside [`PEER_TIMEOUT_MS`] is an
    /// error.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "SessionAccept");
        let v = SessionAccept {
            window: r.u32()?,
            buffer_cap: r.u64()?,
            peer_timeout_ms: check_peer_timeout(r.u32()?)?,
        };
        r.finish()?;
        Ok(v)
    }

    /// The agreed peer timeout.
    pub fn peer_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.peer_timeout_ms as u64)
    }
}

/// Binds a data channel to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelHello {
    /// The session it joins, as the main channel's hello named it.
    pub session: SessionId,
    /// Which of the session's data channels this is (0 to channels - 1); the destination
    /// refuses an index out of range or already joined.
    pub index: u16,
}

impl ChannelHello {
    /// The payload of a `ChannelHello` frame: session id (16 bytes), index u16.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).bytes(&self.session.0).u16(self.index);
        out
    }

    /// Reads a `ChannelHello` payload (the index is checked by the destination, which
    /// knows the session's channel count).
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "ChannelHello");
        let session = SessionId(r.array()?);
        let index = r.u16()?;
        r.finish()?;
        Ok(ChannelHello { session, index })
    }
}

/// Local mode: where each guest memory range lies in the file handed over with this frame
/// (one file descriptor per range, in range order, as `SCM_RIGHTS` ancillary data on the
/// frame's first byte). Sent on the main channel right after a hello whose RAM transfer is
/// [`RamTransfer::Local`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryFiles {
    /// The offset in its file at which each range starts.
    pub offsets: Vec<u64>,
}

impl MemoryFiles {
    /// The payload of a `MemoryFiles` frame: count u16, then each offset u64 (the file
    /// descriptors travel beside it, not in it).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.u16(self.offsets.len() as u16);
        for &o in &self.offsets {
            w.u64(o);
        }
        out
    }

    /// Decodes the frame of a guest with `ranges` memory ranges.
    pub fn decode(buf: &[u8], ranges: usize) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "MemoryFiles");
        let n = r.u16()? as usize;
        if n != ranges {
            return Err(WireError::OutOfRange {
                field: "memory files",
                value: n as u64,
                reason: "one file per memory range of the hello",
            });
        }
        let mut offsets = Vec::with_capacity(n);
        for _ in 0..n {
            let o = r.u64()?;
            if o % crate::PAGE_SIZE as u64 != 0 {
                return Err(WireError::OutOfRange {
                    field: "memory file offset",
                    value: o,
                    reason: "must be page-aligned",
                });
            }
            offsets.push(o);
        }
        r.finish()?;
        Ok(MemoryFiles { offsets })
    }
}

/// Why a peer refused or aborted. Codes are stable; the text is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectCode {
    /// Anything not covered below.
    Other = 1,
    /// A data channel named a session this destination is not running.
    UnknownSession = 2,
    /// A data channel's index had already joined the session.
    DuplicateChannel = 3,
    /// A data channel's index is not below the session's channel count.
    BadChannelIndex = 4,
    /// The destination cannot serve what was asked: a guest kind, device or mode it does
    /// not have, or (local mode) memory files it cannot map.
    Unsupported = 5,
    /// Over one of the destination's limits: guest memory, pages per packet, devices.
    TooLarge = 6,
    /// A frame that should not be there, or that does not decode.
    Protocol = 7,
    /// The destination could not load the guest's state or a device's.
    LoadFailed = 8,
    /// The peer's user or VMM cancelled the migration.
    Cancelled = 9,
    /// The source abandoned a switchover that ran past its hard bound on the pause: the
    /// guest runs on the source again, and the same session goes on in a new connection
    /// (feature `switchover retry`). A peer without the feature reads it as `Other`.
    SwitchoverAbandoned = 10,
}

impl RejectCode {
    fn from_u16(v: u16) -> Self {
        match v {
            2 => RejectCode::UnknownSession,
            3 => RejectCode::DuplicateChannel,
            4 => RejectCode::BadChannelIndex,
            5 => RejectCode::Unsupported,
            6 => RejectCode::TooLarge,
            7 => RejectCode::Protocol,
            8 => RejectCode::LoadFailed,
            9 => RejectCode::Cancelled,
            10 => RejectCode::SwitchoverAbandoned,
            _ => RejectCode::Other,
        }
    }
}

/// A refusal or an abort, with a reason a person can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// What kind of refusal, for a program to act on.
    pub code: RejectCode,
    /// Why, for a person; cut to 4096 bytes when sent.
    pub reason: String,
}

impl Reject {
    /// A refusal with its code and reason.
    pub fn new(code: RejectCode, reason: impl Into<String>) -> Self {
        Reject {
            code,
            reason: reason.into(),
        }
    }

    /// The payload of a `Reject` frame: code u16, then the reason as a string of at most
    /// 4096 bytes (cut at a character boundary).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut end = self.reason.len().min(MAX_REASON);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        Writer::new(&mut out)
            .u16(self.code as u16)
            .string(&self.reason[..end]);
        out
    }

    /// Reads a `Reject` payload; an unknown code reads as [`RejectCode::Other`], so a newer
    /// peer's refusal still reaches the user with its reason.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "Reject");
        let code = RejectCode::from_u16(r.u16()?);
        let reason = r.string("reject reason", MAX_REASON)?;
        r.finish()?;
        Ok(Reject { code, reason })
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?})", self.reason, self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> SessionHello {
        SessionHello {
            session: SessionId([7; 16]),
            channels: 4,
            pages_per_packet: 128,
            guest: GuestDescriptor {
                kind: "synthetic".into(),
                vcpus: 1,
                page_size: 4096,
                ranges: vec![
                    MemoryRange {
                        guest_addr: 0,
                        size: 1 << 20,
                    },
                    MemoryRange {
                        guest_addr: 1 << 32,
                        size: 1 << 21,
                    },
                ],
            },
            devices: DeviceSetup::default(),
            ram: RamTransfer::Copy,
            peer_timeout_ms: 30_000,
            postcopy: false,
            resume: false,
        }
    }

    #[test]
    fn session_hello_round_trip() {
        let h = hello();
        assert_eq!(SessionHello::decode(&h.encode()).unwrap(), h);
        let local = SessionHello {
            ram: RamTransfer::Local,
            ..hello()
        };
        assert_eq!(SessionHello::decode(&local.encode()).unwrap(), local);
        let mut bad = local.encode();
        // The RAM transfer byte, then the peer timeout (4 bytes), then the postcopy byte.
        let at = bad.len() - 6;
        bad[at] = 7;
        assert!(SessionHello::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("ram transfer"));
        let postcopy = SessionHello {
            postcopy: true,
            ..hello()
        };
        assert_eq!(SessionHello::decode(&postcopy.encode()).unwrap(), postcopy);
        let resume = SessionHello {
            postcopy: true,
            resume: true,
            ..hello()
        };
        assert_eq!(SessionHello::decode(&resume.encode()).unwrap(), resume);
        let mut bad = postcopy.encode();
        *bad.last_mut().unwrap() = 3;
        assert!(SessionHello::decode(&bad)
            .unwrap_err()
            .to_string()
            .contains("postcopy"));
    }

    #[test]
    fn memory_files_round_trip_and_bounds() {
        let m = MemoryFiles {
            offsets: vec![0, 1 << 30],
        };
        assert_eq!(MemoryFiles::decode(&m.encode(), 2).unwrap(), m);
        // One file per range of the hello, no more and no fewer.
        assert!(MemoryFiles::decode(&m.encode(), 3)
            .unwrap_err()
            .to_string()
            .contains("memory files"));
        let odd = MemoryFiles { offsets: vec![100] };
        assert!(MemoryFiles::decode(&odd.encode(), 1)
            .unwrap_err()
            .to_string()
            .contains("page-aligned"));
        assert!(MemoryFiles::decode(&m.encode()[..5], 2).is_err());
    }

    #[test]
    fn session_hello_rejects_bad_fields() {
        let mut h = hello();
        h.channels = 65;
        assert!(SessionHello::decode(&h.encode())
            .unwrap_err()
            .to_string()
            .contains("channels = 65"));
        let mut h = hello();
        h.guest.ranges[1].guest_addr = 4096; // overlaps range 0
        assert!(SessionHello::decode(&h.encode()).is_err());
        let mut h = hello();
        h.guest.ranges[0].size = 100;
        assert!(SessionHello::decode(&h.encode()).is_err());
        let mut h = hello();
        h.guest.page_size = 8192;
        assert!(SessionHello::decode(&h.encode()).is_err());
        for ms in [0, 199, 3_600_001] {
            let mut h = hello();
            h.peer_timeout_ms = ms;
            assert!(SessionHello::decode(&h.encode())
                .unwrap_err()
                .to_string()
                .contains("peer timeout"));
        }
    }

    #[test]
    fn session_accept_round_trip_and_bounds() {
        let a = SessionAccept {
            window: 8,
            buffer_cap: 1 << 28,
            peer_timeout_ms: 3000,
        };
        assert_eq!(SessionAccept::decode(&a.encode()).unwrap(), a);
        assert_eq!(a.peer_timeout(), std::time::Duration::from_secs(3));
        let bad = SessionAccept {
            peer_timeout_ms: 50,
            ..a
        };
        assert!(SessionAccept::decode(&bad.encode()).is_err());
        assert!(SessionAccept::decode(&a.encode()[..12]).is_err());
    }

    #[test]
    fn channel_hello_round_trip_and_truncation() {
        let c = ChannelHello {
            session: SessionId([1; 16]),
            index: 3,
        };
        let enc = c.encode();
        assert_eq!(ChannelHello::decode(&enc).unwrap(), c);
        assert!(ChannelHello::decode(&enc[..10]).is_err());
        let mut long = enc.clone();
        long.push(0);
        assert!(matches!(
            ChannelHello::decode(&long),
            Err(WireError::TrailingBytes { .. })
        ));
    }

    #[test]
    fn reject_round_trip() {
        let r = Reject::new(RejectCode::DuplicateChannel, "channel 2 joined twice");
        assert_eq!(Reject::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn session_id_displays_as_uuid() {
        assert_eq!(
            SessionId([0xab; 16]).to_string(),
            "abababab-abab-abab-abab-abababababab"
        );
    }
}
