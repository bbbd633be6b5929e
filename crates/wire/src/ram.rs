//! RamPages: a batch of guest pages on a data channel.
//!
//! ```text
//! +-------+--------+-------+-------+--------------------------+-------------+---------------------+
//! | round | normal | zero  | flags | offsets: normal then zero| page CRCs   | normal pages' data  |
//! |  u32  |  u32   |  u32  |  u32  | u64 guest addresses      | u32, normal | normal x 4096 bytes |
//! +-------+--------+-------+-------+--------------------------+-------------+---------------------+
//!  \_______________________ the prefix: the frame's CRC32C covers it ____/
//! ```
//!
//! Zero pages travel as offsets only. Each normal page carries its own CRC32C (unless the
//! flags say [`UNCHECKED`]: the source trusts the transport, as QEMU does, and the page CRCs
//! are absent), and the frame's CRC covers only the prefix: the source sends pages straight from guest memory, which the
//! guest may write while they are on their way, so a page can arrive torn. A torn page in a
//! precopy round is harmless (the guest wrote it, so it is dirty and is sent again in a later
//! round); the destination tells torn from corrupt by requiring every page that failed its
//! CRC to arrive again intact before the end (the last round runs with the guest paused, where
//! nothing can tear). The payload length must equal exactly what the counts imply, every
//! address must be page-aligned, and the counts are bounded by the receiver's limit.

use crate::cursor::{Reader, Writer};
use crate::{Limits, WireError, PAGE_SIZE};

/// Bytes before the offsets.
pub const PREFIX_FIXED: usize = 16;

/// Flag: the packet carries no page CRCs (the source trusts the transport).
pub const UNCHECKED: u32 = 1;

/// Bytes of the prefix (everything before the page data) for these counts, with or without
/// page CRCs.
pub const fn prefix_len(normal: u32, zero: u32, checked: bool) -> u64 {
    let crcs = if checked { 4 * normal as u64 } else { 0 };
    PREFIX_FIXED as u64 + 8 * (normal as u64 + zero as u64) + crcs
}

/// Payload length of a packet with `normal` data pages and `zero` zero pages.
pub const fn payload_len(normal: u32, zero: u32, checked: bool) -> u64 {
    prefix_len(normal, zero, checked) + PAGE_SIZE as u64 * normal as u64
}

/// How much of a RamPages payload its frame CRC covers: the prefix, as far as the fixed
/// part's counts say (the whole payload if it is too short to tell).
pub fn crc_span(payload: &[u8]) -> usize {
    let Some(fixed) = payload.get(..PREFIX_FIXED) else {
        return payload.len();
    };
    let word = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().expect("4 bytes"));
    let len = prefix_len(word(4), word(8), word(12) & UNCHECKED == 0);
    usize::try_from(len).map_or(payload.len(), |l| l.min(payload.len()))
}

/// Writes the part of a RamPages payload that precedes the page data. `page_crcs` holds
/// the CRC32C of each normal page, in order, or is `None` for a packet without them.
pub fn encode_prefix(
    round: u32,
    normal: &[u64],
    zero: &[u64],
    page_crcs: Option<&[u32]>,
    out: &mut Vec<u8>,
) {
    debug_assert!(page_crcs.is_none_or(|c| c.len() == normal.len()));
    out.clear();
    let mut w = Writer::new(out);
    w.u32(round)
        .u32(normal.len() as u32)
        .u32(zero.len() as u32)
        .u32(if page_crcs.is_some() { 0 } else { UNCHECKED });
    for &a in normal.iter().chain(zero) {
        w.u64(a);
    }
    for &c in page_crcs.unwrap_or_default() {
        w.u32(c);
    }
}

/// The fixed first 16 bytes of a RamPages payload, validated against the frame's length.
/// A receiver that places page data straight into guest memory reads this first, then the
/// offsets, then the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPrefix {
    pub round: u32,
    pub normal: u32,
    pub zero: u32,
    /// Whether page CRCs follow the offsets.
    pub checked: bool,
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
        if flags & !UNCHECKED != 0 {
            return Err(WireError::OutOfRange {
                field: "RamPages flags",
                value: flags as u64,
                reason: "only bit 0 (no page CRCs) is defined",
            });
        }
        let checked = flags & UNCHECKED == 0;
        let pages = normal as u64 + zero as u64;
        if pages > limits.max_pages_per_packet as u64 {
            return Err(WireError::OutOfRange {
                field: "pages in packet",
                value: pages,
                reason: "more than the receiver's per-packet limit",
            });
        }
        let expected = payload_len(normal, zero, checked);
        if len as u64 != expected {
            return Err(WireError::BadLength {
                what: "RamPages payload",
                expected,
                found: len as u64,
            });
        }
        Ok(RamPrefix {
            round,
            normal,
            zero,
            checked,
        })
    }

    /// Bytes of the offsets that follow the fixed prefix.
    pub fn offsets_len(&self) -> usize {
        8 * (self.normal as usize + self.zero as usize)
    }

    /// Bytes of the offsets and page CRCs that follow the fixed prefix.
    pub fn rest_of_prefix_len(&self) -> usize {
        self.offsets_len()
            + if self.checked {
                4 * self.normal as usize
            } else {
                0
            }
    }
}

/// The page CRCs of a prefix's tail (after the offsets).
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
    pub round: u32,
    normal_offsets: &'a [u8],
    zero_offsets: &'a [u8],
    /// None: the packet carries no page CRCs.
    page_crcs: Option<&'a [u8]>,
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
        } = RamPrefix::decode(&r.array()?, len, limits)?;
        let normal_offsets = r.bytes(8 * normal as usize)?;
        let zero_offsets = r.bytes(8 * zero as usize)?;
        let page_crcs = if checked {
            Some(r.bytes(4 * normal as usize)?)
        } else {
            None
        };
        let data = r.rest();
        let pkt = RamPacket {
            round,
            normal_offsets,
            zero_offsets,
            page_crcs,
            data,
        };
        for a in decode_offsets(normal_offsets).chain(decode_offsets(zero_offsets)) {
            a?;
        }
        Ok(pkt)
    }

    pub fn normal_count(&self) -> usize {
        self.normal_offsets.len() / 8
    }
    pub fn zero_count(&self) -> usize {
        self.zero_offsets.len() / 8
    }

    fn addrs(raw: &'a [u8]) -> impl Iterator<Item = u64> + 'a {
        raw.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("chunks_exact(8)")))
    }

    pub fn normal_addrs(&self) -> impl Iterator<Item = u64> + 'a {
        Self::addrs(self.normal_offsets)
    }
    pub fn zero_addrs(&self) -> impl Iterator<Item = u64> + 'a {
        Self::addrs(self.zero_offsets)
    }

    /// The normal pages: (guest address, 4096 bytes of data).
    pub fn pages(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        self.normal_addrs().zip(self.data.chunks_exact(PAGE_SIZE))
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
        let page = |i: usize| vec![i as u8 + 1; PAGE_SIZE];
        let crcs: Vec<u32> = (0..normal.len())
            .map(|i| crc32c::crc32c(&page(i)))
            .collect();
        let mut p = Vec::new();
        encode_prefix(round, normal, zero, Some(&crcs), &mut p);
        for i in 0..normal.len() {
            p.extend(page(i));
        }
        p
    }

    #[test]
    fn a_torn_page_is_told_apart_and_the_frame_crc_covers_the_prefix_only() {
        let mut p = packet(2, &[0, 4096], &[]);
        let span = crc_span(&p);
        assert_eq!(span as u64, prefix_len(2, 0, true));
        let last = p.len() - 1;
        p[last] ^= 1; // the second page tears after its CRC was taken
        let pkt = RamPacket::decode(&p, &Limits::default()).unwrap();
        let ok: Vec<bool> = pkt.checked_pages().map(|(_, _, ok)| ok).collect();
        assert_eq!(ok, vec![true, false]);
        assert_eq!(crc_span(&p[..3]), 3, "too short to tell: everything");
    }

    #[test]
    fn a_packet_without_page_crcs_is_shorter_and_taken_as_intact() {
        let mut p = Vec::new();
        encode_prefix(4, &[0, 4096], &[8192], None, &mut p);
        assert_eq!(p.len() as u64, prefix_len(2, 1, false));
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
        p[12] = 3;
        assert!(RamPacket::decode(&p, &Limits::default()).is_err());
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
        encode_prefix(0, &[], &[], Some(&[]), &mut p);
        p[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            RamPacket::decode(&p, &Limits::default()),
            Err(WireError::OutOfRange { .. })
        ));
    }
}
