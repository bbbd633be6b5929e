//! RamPages: a batch of guest pages on a data channel.
//!
//! ```text
//! +-------+--------+-------+-------+---------------------------+---------------------+-----------+
//! | round | normal | zero  | flags | offsets: normal then zero | normal pages' data  | page CRCs |
//! |  u32  |  u32   |  u32  |  u32  | u64 guest addresses       | normal x 4096 bytes | u32 each  |
//! +-------+--------+-------+-------+---------------------------+---------------------+-----------+
//!  \___ the prefix: the frame's CRC32C covers it _____________/                       (trailer)
//! ```
//!
//! Zero pages travel as offsets only. Each normal page carries its own CRC32C in the trailer
//! (unless the flags say [`UNCHECKED`]: the source trusts the transport, as QEMU does, and
//! there is no trailer), and the frame's CRC covers only the prefix: the source sends pages
//! straight from guest memory, which the guest may write while they are on their way, so a
//! page can arrive torn. The CRCs come after the data because the source takes them after
//! the kernel has copied the pages, from the cache, rather than reading every page from
//! memory twice; the destination checks them on pages it has just written, also cached.
//! A torn page in a precopy round is harmless (the guest wrote it, so it is dirty and is sent
//! again in a later round); the destination tells torn from corrupt by requiring every page
//! that failed its CRC to arrive again intact before the end (the last round runs with the
//! guest paused, where nothing can tear). The payload length must equal exactly what the
//! counts imply, every address must be page-aligned, and the counts are bounded by the
//! receiver's limit.
//!
//! Flags bit 1 ([`COMPRESSED`], `--compress zstd`): the page data is one zstd frame holding
//! the normal pages' bytes, everything between the prefix and the trailer; the CRCs are of the
//! pages as decompressed. A source sends a packet compressed only if that makes it smaller, so
//! the payload is never longer than the same packet uncompressed, and the destination
//! decompresses into a buffer of exactly `normal x 4096` bytes: anything else is refused.

use crate::cursor::{Reader, Writer};
use crate::{Limits, WireError, PAGE_SIZE};

/// Bytes before the offsets.
pub const PREFIX_FIXED: usize = 16;

/// Flag: the packet carries no page CRCs (the source trusts the transport).
pub const UNCHECKED: u32 = 1;
/// Flag: the page data is one zstd frame.
pub const COMPRESSED: u32 = 2;

/// How a packet's pages travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamFlags {
    /// A trailer of page CRCs follows the data.
    pub checked: bool,
    /// The data is one zstd frame of the pages' bytes.
    pub compressed: bool,
}

impl RamFlags {
    /// Pages as they are, each with its CRC: livemig's default.
    pub const CHECKED: RamFlags = RamFlags {
        checked: true,
        compressed: false,
    };

    fn bits(self) -> u32 {
        (if self.checked { 0 } else { UNCHECKED }) | (if self.compressed { COMPRESSED } else { 0 })
    }
}

/// Bytes of the prefix (everything before the page data) for these counts.
pub const fn prefix_len(normal: u32, zero: u32) -> u64 {
    PREFIX_FIXED as u64 + 8 * (normal as u64 + zero as u64)
}

/// Bytes of the trailer of page CRCs (none for a packet without them).
pub const fn trailer_len(normal: u32, checked: bool) -> u64 {
    if checked {
        4 * normal as u64
    } else {
        0
    }
}

/// Payload length of a packet with `normal` data pages and `zero` zero pages.
pub const fn payload_len(normal: u32, zero: u32, checked: bool) -> u64 {
    prefix_len(normal, zero) + PAGE_SIZE as u64 * normal as u64 + trailer_len(normal, checked)
}

/// How much of a RamPages payload its frame CRC covers: the prefix, as far as the fixed
/// part's counts say (the whole payload if it is too short to tell).
pub fn crc_span(payload: &[u8]) -> usize {
    let Some(fixed) = payload.get(..PREFIX_FIXED) else {
        return payload.len();
    };
    let word = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().expect("4 bytes"));
    let len = prefix_len(word(4), word(8));
    usize::try_from(len).map_or(payload.len(), |l| l.min(payload.len()))
}

/// Writes the part of a RamPages payload that precedes the page data.
pub fn encode_prefix(round: u32, normal: &[u64], zero: &[u64], flags: RamFlags, out: &mut Vec<u8>) {
    out.clear();
    let mut w = Writer::new(out);
    w.u32(round)
        .u32(normal.len() as u32)
        .u32(zero.len() as u32)
        .u32(flags.bits());
    for &a in normal.iter().chain(zero) {
        w.u64(a);
    }
}

/// A whole payload from `data` (the normal pages' bytes, one page each, in order): for
/// tests, fuzz seeds and tools. The engine writes its packets in parts, from guest memory.
pub fn encode_packet(
    round: u32,
    normal: &[u64],
    data: &[u8],
    zero: &[u64],
    checked: bool,
) -> Vec<u8> {
    debug_assert_eq!(data.len(), normal.len() * PAGE_SIZE);
    let flags = RamFlags {
        checked,
        compressed: false,
    };
    let mut out = Vec::new();
    encode_prefix(round, normal, zero, flags, &mut out);
    out.extend_from_slice(data);
    if checked {
        let crcs: Vec<u32> = data.chunks_exact(PAGE_SIZE).map(crc32c::crc32c).collect();
        let mut t = Vec::new();
        encode_trailer(&crcs, &mut t);
        out.extend(t);
    }
    out
}

/// A whole compressed payload: `frame` stands for the zstd frame (this crate does not
/// compress), `page_crcs` for the trailer, if any.
pub fn encode_compressed_packet(
    round: u32,
    normal: &[u64],
    zero: &[u64],
    frame: &[u8],
    page_crcs: Option<&[u32]>,
) -> Vec<u8> {
    let flags = RamFlags {
        checked: page_crcs.is_some(),
        compressed: true,
    };
    let mut out = Vec::new();
    encode_prefix(round, normal, zero, flags, &mut out);
    out.extend_from_slice(frame);
    let mut t = Vec::new();
    encode_trailer(page_crcs.unwrap_or_default(), &mut t);
    out.extend(t);
    out
}

/// Writes the trailer: the CRC32C of each normal page, in order.
pub fn encode_trailer(page_crcs: &[u32], out: &mut Vec<u8>) {
    out.clear();
    let mut w = Writer::new(out);
    for &c in page_crcs {
        w.u32(c);
    }
}

/// The fixed first 16 bytes of a RamPages payload, validated against the frame's length.
/// A receiver that places page data straight into guest memory reads this first, then the
/// offsets, then the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPrefix {
    /// The round the pages belong to.
    pub round: u32,
    /// Pages sent with their 4096 bytes.
    pub normal: u32,
    /// Pages sent as their address only: they read as zeros.
    pub zero: u32,
    /// Whether page CRCs follow the page data.
    pub checked: bool,
    /// Whether the page data is one zstd frame.
    pub compressed: bool,
    /// Bytes of the page data: `normal x 4096`, or the compressed frame's length.
    pub data_len: usize,
}

impl RamPrefix {
    /// Decodes the fixed prefix of a payload that is `payload_len` bytes long in all.
    pub fn decode(
        fixed: &[u8; PREFIX_FIXED],
        len: u32,
        limits: &Limits,
    ) -> Result<Self, WireError> {
        let mut r = Reader::new(fixed, "RamPages");
        let round = r.u32()?;
        let normal = r.u32()?;
        let zero = r.u32()?;
        let flags = r.u32()?;
        if flags & !(UNCHECKED | COMPRESSED) != 0 {
            return Err(WireError::OutOfRange {
                field: "RamPages flags",
                value: flags as u64,
                reason: "only bits 0 (no page CRCs) and 1 (compressed) are defined",
            });
        }
        let checked = flags & UNCHECKED == 0;
        let compressed = flags & COMPRESSED != 0;
        let pages = normal as u64 + zero as u64;
        if pages > limits.max_pages_per_packet as u64 {
            return Err(WireError::OutOfRange {
                field: "pages in packet",
                value: pages,
                reason: "more than the receiver's per-packet limit",
            });
        }
        let whole = payload_len(normal, zero, checked);
        let around = prefix_len(normal, zero) + trailer_len(normal, checked);
        let data_len = if compressed {
            // Never longer than the same pages uncompressed, and some data to decompress.
            if normal == 0 || (len as u64) <= around || len as u64 >= whole {
                return Err(WireError::OutOfRange {
                    field: "compressed RamPages payload length",
                    value: len as u64,
                    reason: "compressed pages must be present and smaller than uncompressed",
                });
            }
            len as u64 - around
        } else {
            if len as u64 != whole {
                return Err(WireError::BadLength {
                    what: "RamPages payload",
                    expected: whole,
                    found: len as u64,
                });
            }
            PAGE_SIZE as u64 * normal as u64
        };
        Ok(RamPrefix {
            round,
            normal,
            zero,
            checked,
            compressed,
            data_len: data_len as usize,
        })
    }

    /// Bytes of the offsets that follow the fixed prefix.
    pub fn offsets_len(&self) -> usize {
        8 * (self.normal as usize + self.zero as usize)
    }

    /// Bytes of the page CRCs that follow the page data.
    pub fn trailer_len(&self) -> usize {
        trailer_len(self.normal, self.checked) as usize
    }
}

/// The page CRCs of a trailer.
pub fn decode_page_crcs(raw: &[u8]) -> impl Iterator<Item = u32> + '_ {
    raw.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("chunks_exact(4)")))
}

/// Decodes page addresses, checking that each is page-aligned.
pub fn decode_offsets(raw: &[u8]) -> impl Iterator<Item = Result<u64, WireError>> + '_ {
    raw.chunks_exact(8).map(|c| {
        let a = u64::from_le_bytes(c.try_into().expect("chunks_exact(8)"));
        if a % PAGE_SIZE as u64 == 0 {
            Ok(a)
        } else {
            Err(WireError::OutOfRange {
                field: "page address",
                value: a,
                reason: "not page-aligned",
            })
        }
    })
}

/// A decoded, validated RamPages payload borrowing the received bytes.
#[derive(Debug, Clone, Copy)]
pub struct RamPacket<'a> {
    /// The round the pages belong to.
    pub round: u32,
    normal_offsets: &'a [u8],
    zero_offsets: &'a [u8],
    /// None: the packet carries no page CRCs.
    page_crcs: Option<&'a [u8]>,
    compressed: bool,
    data: &'a [u8],
}

impl<'a> RamPacket<'a> {
    /// Validates counts, exact length and alignment. Allocates nothing.
    pub fn decode(payload: &'a [u8], limits: &Limits) -> Result<Self, WireError> {
        let mut r = Reader::new(payload, "RamPages");
        let len = u32::try_from(payload.len()).map_err(|_| WireError::TooLong {
            kind: "RamPages",
            len: payload.len() as u64,
            limit: u32::MAX as u64,
        })?;
        let RamPrefix {
            round,
            normal,
            zero,
            checked,
            compressed,
            data_len,
        } = RamPrefix::decode(&r.array()?, len, limits)?;
        let normal_offsets = r.bytes(8 * normal as usize)?;
        let zero_offsets = r.bytes(8 * zero as usize)?;
        let data = r.bytes(data_len)?;
        let page_crcs = if checked {
            Some(r.bytes(4 * normal as usize)?)
        } else {
            None
        };
        r.finish()?;
        let pkt = RamPacket {
            round,
            normal_offsets,
            zero_offsets,
            page_crcs,
            compressed,
            data,
        };
        for a in decode_offsets(normal_offsets).chain(decode_offsets(zero_offsets)) {
            a?;
        }
        Ok(pkt)
    }

    /// How many pages came with their data.
    pub fn normal_count(&self) -> usize {
        self.normal_offsets.len() / 8
    }
    /// How many pages came as their address only (zero pages).
    pub fn zero_count(&self) -> usize {
        self.zero_offsets.len() / 8
    }

    fn addrs(raw: &'a [u8]) -> impl Iterator<Item = u64> + 'a {
        raw.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("chunks_exact(8)")))
    }

    /// The normal pages' guest addresses, in the order their data follows.
    pub fn normal_addrs(&self) -> impl Iterator<Item = u64> + 'a {
        Self::addrs(self.normal_offsets)
    }
    /// The zero pages' guest addresses.
    pub fn zero_addrs(&self) -> impl Iterator<Item = u64> + 'a {
        Self::addrs(self.zero_offsets)
    }

    /// The normal pages: (guest address, 4096 bytes of data); none for a compressed
    /// packet, whose data is [`RamPacket::compressed_data`].
    pub fn pages(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        let data = if self.compressed { &[][..] } else { self.data };
        self.normal_addrs().zip(data.chunks_exact(PAGE_SIZE))
    }

    /// The zstd frame of a compressed packet.
    pub fn compressed_data(&self) -> Option<&'a [u8]> {
        self.compressed.then_some(self.data)
    }

    /// The normal pages with whether each arrived intact (its data matches its CRC; a
    /// packet without page CRCs is taken as intact).
    pub fn checked_pages(&self) -> impl Iterator<Item = (u64, &'a [u8], bool)> + 'a {
        let crcs = self.page_crcs.map(decode_page_crcs);
        let mut crcs = crcs.into_iter().flatten();
        self.pages().map(move |(a, d)| match crcs.next() {
            Some(crc) => (a, d, crc32c::crc32c(d) == crc),
            None => (a, d, true),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_frame, FrameHeader, FrameKind, HEADER_LEN};

    fn packet(round: u32, normal: &[u64], zero: &[u64]) -> Vec<u8> {
        let data: Vec<u8> = (0..normal.len())
            .flat_map(|i| vec![i as u8 + 1; PAGE_SIZE])
            .collect();
        encode_packet(round, normal, &data, zero, true)
    }

    #[test]
    fn a_torn_page_is_told_apart_and_the_frame_crc_covers_the_prefix_only() {
        let mut p = packet(2, &[0, 4096], &[]);
        let span = crc_span(&p);
        assert_eq!(span as u64, prefix_len(2, 0));
        let last = span + 2 * PAGE_SIZE - 1;
        p[last] ^= 1; // the second page tears after its CRC was taken
        let pkt = RamPacket::decode(&p, &Limits::default()).unwrap();
        let ok: Vec<bool> = pkt.checked_pages().map(|(_, _, ok)| ok).collect();
        assert_eq!(ok, vec![true, false]);
        assert_eq!(crc_span(&p[..3]), 3, "too short to tell: everything");
    }

    #[test]
    fn a_packet_without_page_crcs_is_shorter_and_taken_as_intact() {
        let mut p = Vec::new();
        let flags = RamFlags {
            checked: false,
            compressed: false,
        };
        encode_prefix(4, &[0, 4096], &[8192], flags, &mut p);
        assert_eq!(p.len() as u64, prefix_len(2, 1));
        assert_eq!(crc_span(&p), p.len());
        p.extend(vec![7u8; 2 * PAGE_SIZE]);
        let pkt = RamPacket::decode(&p, &Limits::default()).unwrap();
        assert!(pkt.checked_pages().all(|(_, _, ok)| ok));
        assert_eq!(pkt.zero_addrs().collect::<Vec<_>>(), vec![8192]);
        // A length that would fit a checked packet does not fit an unchecked one.
        p.extend([0u8; 8]);
        assert!(matches!(
            RamPacket::decode(&p, &Limits::default()),
            Err(WireError::BadLength { .. })
        ));
        // Unknown flags are refused.
        p.truncate(p.len() - 8);
        p[12] = 5;
        assert!(RamPacket::decode(&p, &Limits::default()).is_err());
    }

    #[test]
    fn a_compressed_packet_is_bounded_by_its_uncompressed_size() {
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3];
        let p = encode_compressed_packet(5, &[0, 4096], &[8192], &frame, Some(&[1, 2]));
        let pkt = RamPacket::decode(&p, &Limits::default()).unwrap();
        assert_eq!(pkt.compressed_data(), Some(&frame[..]));
        assert_eq!(pkt.pages().count(), 0, "compressed pages are not pages");
        assert_eq!(pkt.zero_addrs().collect::<Vec<_>>(), vec![8192]);
        let fixed: [u8; PREFIX_FIXED] = p[..PREFIX_FIXED].try_into().unwrap();
        let h = RamPrefix::decode(&fixed, p.len() as u32, &Limits::default()).unwrap();
        assert!(h.compressed && h.checked);
        assert_eq!(h.data_len, frame.len());
        // As long as the pages uncompressed, or longer: refused, as is an empty frame.
        let whole = payload_len(2, 1, true) as u32;
        for len in [
            whole,
            whole + 1,
            (prefix_len(2, 1) + trailer_len(2, true)) as u32,
        ] {
            assert!(
                RamPrefix::decode(&fixed, len, &Limits::default()).is_err(),
                "{len}"
            );
        }
        // A compressed packet must hold pages.
        let empty = encode_compressed_packet(5, &[], &[8192], &frame, None);
        assert!(RamPacket::decode(&empty, &Limits::default()).is_err());
    }

    #[test]
    fn round_trip() {
        let p = packet(3, &[0, 8192], &[4096]);
        let pkt = RamPacket::decode(&p, &Limits::default()).unwrap();
        assert_eq!(pkt.round, 3);
        assert_eq!(pkt.zero_addrs().collect::<Vec<_>>(), vec![4096]);
        let pages: Vec<_> = pkt.pages().collect();
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[1].0, 8192);
        assert!(pages[1].1.iter().all(|&b| b == 2));
    }

    #[test]
    fn through_a_frame() {
        let p = packet(1, &[4096], &[]);
        let mut f = FrameHeader::for_payload(FrameKind::RamPages, &p)
            .encode()
            .to_vec();
        f.extend_from_slice(&p);
        let (h, payload) = decode_frame(&f, &Limits::default()).unwrap();
        assert_eq!(h.kind, FrameKind::RamPages);
        assert_eq!(payload.len(), f.len() - HEADER_LEN);
    }

    #[test]
    fn rejects_misaligned_address() {
        let p = packet(0, &[4097], &[]);
        let e = RamPacket::decode(&p, &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("page-aligned"), "{e}");
    }

    #[test]
    fn rejects_count_length_mismatch() {
        let mut p = packet(0, &[0, 4096], &[]);
        p.truncate(p.len() - 1);
        assert!(matches!(
            RamPacket::decode(&p, &Limits::default()),
            Err(WireError::BadLength { .. })
        ));
    }

    #[test]
    fn rejects_counts_above_limit_without_allocating() {
        let mut p = Vec::new();
        encode_prefix(0, &[], &[], RamFlags::CHECKED, &mut p);
        p[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            RamPacket::decode(&p, &Limits::default()),
            Err(WireError::OutOfRange { .. })
        ));
    }
}
