//! Postcopy: the guest runs on the destination before all its memory has arrived.
//!
//! ```text
//! source                                        destination
//!   | (precopy rounds 0..rounds as usual)          |
//!   | (guest paused) data*: RoundEnd{rounds - 1},  |
//!   |   every device's last DeviceChunk (credit)   |
//!   | main: GuestState, VmStates,                  |
//!   |       PostcopyStart{rounds, bitmaps}         |  drain rounds, load devices, discard
//!   | -------------------------------------------> |  the listed pages, arm userfaultfd,
//!   |       Resumed{resume_us} | Reject           |  resume the guest
//!   | <------------------------------------------- |
//!   |       PageRequest{addrs}  (per fault)        |
//!   | <------------------------------------------- |
//!   | preempt: RamPages{round = rounds}  (answers) |
//!   | data*:   RamPages{round = rounds}  (push)    |
//!   | preempt, data*: PostcopyDone{pages}          |
//!   | -------------------------------------------> |  every listed page installed
//!   |       PostcopyComplete{pages, ...}           |
//!   | <------------------------------------------- |  the source may drop its copy
//! ```
//!
//! Pages keep travelling as `RamPages` frames ([`crate::ram`]), with the round number
//! [`PostcopyStart::rounds`]: the preempt channel (data channel index `channels`) carries the
//! answers to [`PageRequest`]s, the data channels the background push. [`PostcopyStart`]'s
//! bitmaps say which pages the destination does not hold in their final version; its decoder
//! takes the session's memory ranges and refuses any count or size that differs from them, so
//! the peer never sizes an allocation: the exact length is known from the ranges before a
//! byte of bitmap is read ([`PostcopyStart::payload_len`]).

use crate::cursor::{Reader, Writer};
use crate::{MemoryRange, WireError, PAGE_SIZE};

/// The most page addresses one [`PageRequest`] may carry.
pub const MAX_PAGE_REQUEST: usize = 64;

/// Bytes before the bitmaps for a guest of `ranges` ranges: rounds u32, count u16, then a
/// page count u64 per range.
const fn head_len(ranges: usize) -> u64 {
    4 + 2 + 8 * ranges as u64
}

/// Whole 4 KiB pages of a range (a range's size is page-aligned; a partial page would not
/// count).
fn pages_of(r: &MemoryRange) -> u64 {
    r.size / PAGE_SIZE as u64
}

/// u64 words of a bitmap of `pages` bits.
fn words_of(pages: u64) -> u64 {
    pages.div_ceil(64)
}

/// The bits of a range's last word that stand for pages (all of them if the range's pages
/// fill the word).
fn last_word_mask(pages: u64) -> u64 {
    match pages % 64 {
        0 => u64::MAX,
        n => (1u64 << n) - 1,
    }
}

/// The largest `PostcopyStart` payload of a guest of at most `max_guest_memory` bytes in at
/// most [`crate::MAX_REGIONS`] ranges: the frame kind's limit. One bit per page (1/32768 of
/// the guest's size), plus at most one partly used word and one page count per range.
pub const fn max_payload_len(max_guest_memory: u64) -> u64 {
    let regions = crate::MAX_REGIONS as u64;
    head_len(crate::MAX_REGIONS)
        + (max_guest_memory / PAGE_SIZE as u64).div_ceil(64) * 8
        + 8 * regions
}

/// Main channel, source to destination, once, with the guest paused: the switch to postcopy.
/// Sent after `GuestState` and `VmStates`; it stands where precopy's `Complete` and `Handover`
/// stand (the source never runs the guest again once it is sent, unless the destination
/// answers with a `Reject` before `Resumed`).
///
/// It lists the pages the destination does not hold in their final version: the pages the
/// guest wrote since the last precopy round sent them, and any never sent. The destination
/// discards them, registers guest memory with userfaultfd and resumes the guest; each of these
/// pages then arrives exactly once more (by request or by the background push).
///
/// One bitmap per guest memory range, in the hello's order: bit `i` of word `j` (`i` counted
/// from the least significant bit) stands for the range's page `64 j + i`, at guest address
/// `guest_addr + 4096 (64 j + i)`. Bits past a range's last page are 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostcopyStart {
    /// Precopy rounds run before the switch (as [`crate::Complete::rounds`]). Pages sent in
    /// postcopy carry this number as their round.
    pub rounds: u32,
    ranges: Vec<MemoryRange>,
    words: Vec<Vec<u64>>,
}

impl PostcopyStart {
    /// A switch after `rounds` precopy rounds listing no page yet, over the guest's `ranges`
    /// (the hello's).
    pub fn new(rounds: u32, ranges: &[MemoryRange]) -> Self {
        PostcopyStart {
            rounds,
            ranges: ranges.to_vec(),
            words: ranges
                .iter()
                .map(|r| vec![0; words_of(pages_of(r)) as usize])
                .collect(),
        }
    }

    /// The exact payload length for a guest of `ranges`: what the receiver checks the frame
    /// header's length against before it reads the payload.
    pub fn payload_len(ranges: &[MemoryRange]) -> u64 {
        ranges.iter().fold(head_len(ranges.len()), |len, r| {
            len.saturating_add(8 * words_of(pages_of(r)))
        })
    }

    /// The memory ranges the bitmaps cover, in the hello's order.
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// The bitmap of range `index` (in the hello's order), empty for an index past the last.
    pub fn range_words(&self, index: usize) -> &[u64] {
        self.words.get(index).map_or(&[], Vec::as_slice)
    }

    /// The bitmaps, one per range, for a receiver that keeps them as its set of missing
    /// pages.
    pub fn into_words(self) -> Vec<Vec<u64>> {
        self.words
    }

    /// Where the page holding `addr` is: its range's index and its page in the range.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.ranges.iter().enumerate().find_map(|(i, r)| {
            let off = addr.checked_sub(r.guest_addr)?;
            let page = off / PAGE_SIZE as u64;
            (page < pages_of(r)).then_some((i, page))
        })
    }

    /// Lists the page holding guest address `addr`; false if no range holds it (nothing is
    /// listed then).
    pub fn insert(&mut self, addr: u64) -> bool {
        let Some((i, page)) = self.locate(addr) else {
            return false;
        };
        self.words[i][(page / 64) as usize] |= 1 << (page % 64);
        true
    }

    /// Takes the page holding `addr` off the list; true if it was listed (a receiver that
    /// keeps the list as its set of missing pages calls it as each page is installed).
    pub fn remove(&mut self, addr: u64) -> bool {
        let Some((i, page)) = self.locate(addr) else {
            return false;
        };
        let word = &mut self.words[i][(page / 64) as usize];
        let bit = 1 << (page % 64);
        let was = *word & bit != 0;
        *word &= !bit;
        was
    }

    /// Whether the page holding `addr` is listed.
    pub fn contains(&self, addr: u64) -> bool {
        self.locate(addr)
            .is_some_and(|(i, page)| self.words[i][(page / 64) as usize] & (1 << (page % 64)) != 0)
    }

    /// ORs a bitmap of range `index` (bit `i` = page `i` of the range, as a dirty log reads)
    /// into the list. Bits past the range and words past its bitmap are ignored, as is an
    /// index past the last range.
    pub fn or_range_words(&mut self, index: usize, words: &[u64]) {
        let (Some(dst), Some(r)) = (self.words.get_mut(index), self.ranges.get(index)) else {
            return;
        };
        for (d, s) in dst.iter_mut().zip(words) {
            *d |= s;
        }
        if let Some(last) = dst.last_mut() {
            *last &= last_word_mask(pages_of(r));
        }
    }

    /// How many pages are listed.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .flatten()
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// Whether no page is listed (every page already holds its final version).
    pub fn is_empty(&self) -> bool {
        self.words.iter().flatten().all(|&w| w == 0)
    }

    /// The guest addresses of the listed pages, ascending within each range, ranges in the
    /// hello's order.
    pub fn addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().zip(&self.words).flat_map(|(r, words)| {
            words.iter().enumerate().flat_map(move |(wi, &w)| {
                SetBits(w).map(move |b| r.guest_addr + (wi as u64 * 64 + b) * PAGE_SIZE as u64)
            })
        })
    }

    /// The listed pages as runs of adjacent pages: (guest address, length in bytes), in the
    /// order of [`Self::addrs`]. A destination discards each run with one call.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut addrs = self.addrs().peekable();
        std::iter::from_fn(move || {
            let start = addrs.next()?;
            let mut len = PAGE_SIZE as u64;
            while addrs.next_if_eq(&(start + len)).is_some() {
                len += PAGE_SIZE as u64;
            }
            Some((start, len))
        })
    }

    /// The payload of a `PostcopyStart` frame: rounds u32, count of ranges u16, each range's
    /// page count u64, then each range's bitmap as little-endian u64 words (`ceil(pages /
    /// 64)` of them).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::payload_len(&self.ranges) as usize);
        let mut w = Writer::new(&mut out);
        w.u32(self.rounds).u16(self.ranges.len() as u16);
        for r in &self.ranges {
            w.u64(pages_of(r));
        }
        for &word in self.words.iter().flatten() {
            w.u64(word);
        }
        out
    }

    /// Reads a `PostcopyStart` payload for a guest of `ranges` (the hello's). Refused, before
    /// any bitmap is allocated: a count of ranges or a range's page count other than the
    /// guest's, a payload of any length but [`Self::payload_len`]; then a bit set past a
    /// range's last page.
    pub fn decode(buf: &[u8], ranges: &[MemoryRange]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "PostcopyStart");
        let rounds = r.u32()?;
        let n = r.u16()?;
        if n as usize != ranges.len() {
            return Err(WireError::OutOfRange {
                field: "PostcopyStart ranges",
                value: n as u64,
                reason: "must equal the count of the hello's memory ranges",
            });
        }
        let mut bitmap_bytes = 0u64;
        for range in ranges {
            let pages = r.u64()?;
            if pages != pages_of(range) {
                return Err(WireError::OutOfRange {
                    field: "PostcopyStart range pages",
                    value: pages,
                    reason: "must equal the pages of the hello's memory range",
                });
            }
            bitmap_bytes = bitmap_bytes.saturating_add(8 * words_of(pages));
        }
        if r.remaining() as u64 != bitmap_bytes {
            return Err(WireError::BadLength {
                what: "PostcopyStart bitmaps",
                expected: bitmap_bytes,
                found: r.remaining() as u64,
            });
        }
        let mut words = Vec::with_capacity(ranges.len());
        for range in ranges {
            let pages = pages_of(range);
            let n = words_of(pages) as usize;
            let mut bitmap = Vec::with_capacity(n);
            for _ in 0..n {
                bitmap.push(r.u64()?);
            }
            if let Some(&last) = bitmap.last() {
                if last & !last_word_mask(pages) != 0 {
                    return Err(WireError::OutOfRange {
                        field: "PostcopyStart bitmap's last word",
                        value: last,
                        reason: "bits past the range's last page must be 0",
                    });
                }
            }
            words.push(bitmap);
        }
        r.finish()?;
        Ok(PostcopyStart {
            rounds,
            ranges: ranges.to_vec(),
            words,
        })
    }
}

/// Iterates the set bits of a word, lowest first.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as u64;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

/// Main channel, destination to source, during postcopy: pages a faulting vCPU waits for.
/// The source sends them on the preempt channel, ahead of the background push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Page-aligned guest addresses, 1 to [`MAX_PAGE_REQUEST`] of them.
    pub addrs: Vec<u64>,
}

impl PageRequest {
    /// The payload of a `PageRequest` frame: count u16, then each address u64. A sender
    /// keeps to 1 to [`MAX_PAGE_REQUEST`] page-aligned addresses (the decoder refuses
    /// anything else).
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!((1..=MAX_PAGE_REQUEST).contains(&self.addrs.len()));
        let mut out = Vec::with_capacity(2 + 8 * self.addrs.len());
        let mut w = Writer::new(&mut out);
        w.u16(self.addrs.len() as u16);
        for &a in &self.addrs {
            w.u64(a);
        }
        out
    }

    /// Reads a `PageRequest` payload; a count of 0 or over [`MAX_PAGE_REQUEST`] (found before
    /// anything is allocated) or an address that is not page-aligned is an error. Whether
    /// each address lies in guest memory is the source's check.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "PageRequest");
        let n = r.u16()? as usize;
        if n == 0 || n > MAX_PAGE_REQUEST {
            return Err(WireError::OutOfRange {
                field: "PageRequest count",
                value: n as u64,
                reason: "must be 1..=64",
            });
        }
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let a = r.u64()?;
            if a % PAGE_SIZE as u64 != 0 {
                return Err(WireError::OutOfRange {
                    field: "PageRequest address",
                    value: a,
                    reason: "not page-aligned",
                });
            }
            addrs.push(a);
        }
        r.finish()?;
        Ok(PageRequest { addrs })
    }
}

/// Source to destination, on each data channel and on the preempt channel, during postcopy:
/// this channel carries no more pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyDone {
    /// Pages (normal and zero) this channel carried since the switch; the destination checks
    /// it read as many.
    pub pages: u64,
}

impl PostcopyDone {
    /// The payload of a `PostcopyDone` frame: pages u64.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).u64(self.pages);
        out
    }

    /// Reads a `PostcopyDone` payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "PostcopyDone");
        let v = PostcopyDone { pages: r.u64()? };
        r.finish()?;
        Ok(v)
    }
}

/// Main channel, destination to source: every page [`PostcopyStart`] listed is installed; the
/// source may release its copy of the guest. The migration ends here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyComplete {
    /// Pages installed since the switch: [`PostcopyStart::count`] (the source checks it).
    pub pages: u64,
    /// Of which arrived because a vCPU faulted on them and the destination asked.
    pub requested: u64,
    /// Time the vCPUs spent blocked on missing pages, added up over vCPUs, microseconds.
    pub blocked_us: u64,
}

impl PostcopyComplete {
    /// The payload of a `PostcopyComplete` frame: pages, requested, blocked_us (3 x u64).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out)
            .u64(self.pages)
            .u64(self.requested)
            .u64(self.blocked_us);
        out
    }

    /// Reads a `PostcopyComplete` payload; more pages requested than installed is an error.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "PostcopyComplete");
        let v = PostcopyComplete {
            pages: r.u64()?,
            requested: r.u64()?,
            blocked_us: r.u64()?,
        };
        r.finish()?;
        if v.requested > v.pages {
            return Err(WireError::OutOfRange {
                field: "PostcopyComplete requested",
                value: v.requested,
                reason: "at most the pages installed",
            });
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode_frame, encode_frame, FrameHeader, FrameKind, Limits, HEADER_LEN};
    use proptest::prelude::*;

    /// A 1 MiB range (256 pages: 4 full words) and a 100-page range at 4 GiB (2 words, the
    /// last partly used).
    fn ranges() -> Vec<MemoryRange> {
        vec![
            MemoryRange {
                guest_addr: 0,
                size: 1 << 20,
            },
            MemoryRange {
                guest_addr: 1 << 32,
                size: 100 * PAGE_SIZE as u64,
            },
        ]
    }

    fn start() -> PostcopyStart {
        let mut s = PostcopyStart::new(5, &ranges());
        for a in [0, 4096, 8192, 255 * 4096, (1 << 32) + 99 * 4096] {
            assert!(s.insert(a));
        }
        s
    }

    #[test]
    fn start_round_trip_lists_pages_and_runs() {
        let s = start();
        let enc = s.encode();
        assert_eq!(enc.len() as u64, PostcopyStart::payload_len(&ranges()));
        assert_eq!(enc.len(), 4 + 2 + 2 * 8 + (4 + 2) * 8);
        let d = PostcopyStart::decode(&enc, &ranges()).unwrap();
        assert_eq!(d, s);
        assert_eq!(d.rounds, 5);
        assert_eq!(d.count(), 5);
        assert_eq!(
            d.addrs().collect::<Vec<_>>(),
            vec![0, 4096, 8192, 255 * 4096, (1 << 32) + 99 * 4096]
        );
        assert_eq!(
            d.runs().collect::<Vec<_>>(),
            vec![
                (0, 3 * 4096),
                (255 * 4096, 4096),
                ((1 << 32) + 99 * 4096, 4096)
            ]
        );
        assert_eq!(d.range_words(1), &[0, 1 << 35]);
        assert!(d.range_words(2).is_empty());
    }

    #[test]
    fn start_insert_remove_contains() {
        let mut s = PostcopyStart::new(0, &ranges());
        assert!(s.is_empty());
        assert!(!s.insert(1 << 20), "between the ranges");
        assert!(!s.insert((1 << 32) + 100 * 4096), "just past the last page");
        assert!(s.insert((1 << 32) + 4095), "the page holding it");
        assert!(s.contains(1 << 32));
        assert!(!s.contains(0));
        assert!(s.remove(1 << 32));
        assert!(!s.remove(1 << 32), "already taken off");
        assert!(s.is_empty());
        s.or_range_words(1, &[u64::MAX, u64::MAX, u64::MAX]);
        assert_eq!(s.count(), 100, "bits past the range ignored");
        s.or_range_words(7, &[1]);
        assert_eq!(s.count(), 100);
        assert_eq!(s.into_words()[1], vec![u64::MAX, (1 << 36) - 1]);
    }

    #[test]
    fn start_rejects_other_ranges_before_allocating() {
        let enc = start().encode();
        // Fewer or more ranges than the hello's.
        let e = PostcopyStart::decode(&enc, &ranges()[..1]).unwrap_err();
        assert!(e.to_string().contains("PostcopyStart ranges = 2"), "{e}");
        // A range's size that differs: the page count is refused before the bitmaps.
        let mut other = ranges();
        other[1].size += PAGE_SIZE as u64;
        let e = PostcopyStart::decode(&enc, &other).unwrap_err();
        assert!(e.to_string().contains("range pages = 100"), "{e}");
        // A page count that claims a huge range, with the hello's ranges: refused by value,
        // never sized.
        let mut huge = enc.clone();
        huge[6..14].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(matches!(
            PostcopyStart::decode(&huge, &ranges()),
            Err(WireError::OutOfRange { .. })
        ));
        // A count of ranges that is not the hello's, even when the bytes would fit it.
        let mut n = enc.clone();
        n[4..6].copy_from_slice(&1u16.to_le_bytes());
        assert!(PostcopyStart::decode(&n, &ranges()).is_err());
    }

    #[test]
    fn start_rejects_wrong_length_and_stray_bits() {
        let enc = start().encode();
        for cut in 0..enc.len() {
            assert!(
                PostcopyStart::decode(&enc[..cut], &ranges()).is_err(),
                "{cut}"
            );
        }
        let mut long = enc.clone();
        long.extend([0; 8]);
        let e = PostcopyStart::decode(&long, &ranges()).unwrap_err();
        assert_eq!(
            e,
            WireError::BadLength {
                what: "PostcopyStart bitmaps",
                expected: 48,
                found: 56
            }
        );
        long.truncate(enc.len() + 1);
        assert!(matches!(
            PostcopyStart::decode(&long, &ranges()),
            Err(WireError::BadLength { .. })
        ));
        // Page 100 of the 100-page range: past its end.
        let mut stray = enc.clone();
        let last = stray.len() - 8;
        stray[last..].copy_from_slice(&(1u64 << 36).to_le_bytes());
        let e = PostcopyStart::decode(&stray, &ranges()).unwrap_err();
        assert!(e.to_string().contains("past the range's last page"), "{e}");
    }

    #[test]
    fn start_of_an_empty_range_list_and_of_full_words() {
        let one = [MemoryRange {
            guest_addr: 1 << 20,
            size: 64 * PAGE_SIZE as u64,
        }];
        let mut s = PostcopyStart::new(1, &one);
        s.or_range_words(0, &[u64::MAX]);
        let d = PostcopyStart::decode(&s.encode(), &one).unwrap();
        assert_eq!(d.count(), 64);
        assert_eq!(d.runs().collect::<Vec<_>>(), vec![(1 << 20, 64 * 4096)]);
        let none = PostcopyStart::new(3, &[]);
        assert_eq!(PostcopyStart::decode(&none.encode(), &[]).unwrap(), none);
    }

    #[test]
    fn start_frame_limit_fits_the_largest_guest() {
        let l = Limits::default();
        let limit = FrameKind::PostcopyStart.max_payload(&l);
        assert_eq!(limit, max_payload_len(l.max_guest_memory));
        // The largest guest, cut into the most ranges with a partly used last word each.
        let per = l.max_guest_memory / crate::MAX_REGIONS as u64 - PAGE_SIZE as u64;
        let big: Vec<MemoryRange> = (0..crate::MAX_REGIONS as u64)
            .map(|i| MemoryRange {
                guest_addr: i * (1 << 46),
                size: per,
            })
            .collect();
        assert!(PostcopyStart::payload_len(&big) <= limit);
        let whole = [MemoryRange {
            guest_addr: 0,
            size: l.max_guest_memory,
        }];
        assert!(PostcopyStart::payload_len(&whole) <= limit);
        assert!(limit <= u32::MAX as u64, "a frame's length is a u32");
    }

    #[test]
    fn start_through_a_frame() {
        let f = encode_frame(FrameKind::PostcopyStart, &start().encode());
        let (h, payload) = decode_frame(&f, &Limits::default()).unwrap();
        assert_eq!(h.kind, FrameKind::PostcopyStart);
        assert_eq!(h.len as u64, PostcopyStart::payload_len(&ranges()));
        assert_eq!(PostcopyStart::decode(payload, &ranges()).unwrap(), start());
        // A header longer than the limit is refused before the payload is read.
        let l = Limits {
            max_guest_memory: 1 << 30,
            ..Limits::default()
        };
        let mut head: [u8; HEADER_LEN] = f[..HEADER_LEN].try_into().unwrap();
        let over = max_payload_len(1 << 30) as u32 + 1;
        head[8..12].copy_from_slice(&over.to_le_bytes());
        assert!(matches!(
            FrameHeader::decode(&head, &l),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn page_request_round_trip_and_rejections() {
        let p = PageRequest {
            addrs: vec![0, 4096, 1 << 32],
        };
        let enc = p.encode();
        assert_eq!(enc.len(), 2 + 3 * 8);
        assert_eq!(PageRequest::decode(&enc).unwrap(), p);
        let full = PageRequest {
            addrs: (0..MAX_PAGE_REQUEST as u64).map(|i| i * 4096).collect(),
        };
        assert_eq!(PageRequest::decode(&full.encode()).unwrap(), full);

        let e = PageRequest::decode(&0u16.to_le_bytes()).unwrap_err();
        assert!(e.to_string().contains("PageRequest count = 0"), "{e}");
        // 65 addresses: refused by the count, before they are read.
        let mut many = 65u16.to_le_bytes().to_vec();
        many.extend(vec![0; 65 * 8]);
        let e = PageRequest::decode(&many).unwrap_err();
        assert!(e.to_string().contains("PageRequest count = 65"), "{e}");
        let e = PageRequest::decode(&u16::MAX.to_le_bytes()).unwrap_err();
        assert!(matches!(e, WireError::OutOfRange { .. }));
        let odd = PageRequest {
            addrs: vec![4096, 4097],
        };
        let e = PageRequest::decode(&odd.encode()).unwrap_err();
        assert!(e.to_string().contains("PageRequest address = 4097"), "{e}");
        assert!(e.to_string().contains("page-aligned"), "{e}");
        assert!(matches!(
            PageRequest::decode(&enc[..enc.len() - 1]),
            Err(WireError::Truncated { .. })
        ));
        let mut long = enc.clone();
        long.push(0);
        assert!(matches!(
            PageRequest::decode(&long),
            Err(WireError::TrailingBytes { .. })
        ));
        assert!(PageRequest::decode(&[]).is_err());
    }

    #[test]
    fn done_and_complete_round_trip_and_rejections() {
        let d = PostcopyDone { pages: 12345 };
        assert_eq!(PostcopyDone::decode(&d.encode()).unwrap(), d);
        assert!(PostcopyDone::decode(&d.encode()[..7]).is_err());
        assert!(PostcopyDone::decode(&[0; 9]).is_err());
        let c = PostcopyComplete {
            pages: 10,
            requested: 3,
            blocked_us: 777,
        };
        assert_eq!(PostcopyComplete::decode(&c.encode()).unwrap(), c);
        assert!(PostcopyComplete::decode(&c.encode()[..23]).is_err());
        assert!(PostcopyComplete::decode(&[0; 25]).is_err());
        let bad = PostcopyComplete { requested: 11, ..c };
        let e = PostcopyComplete::decode(&bad.encode()).unwrap_err();
        assert!(e.to_string().contains("requested = 11"), "{e}");
        for (k, p) in [
            (FrameKind::PostcopyDone, d.encode()),
            (FrameKind::PostcopyComplete, c.encode()),
            (
                FrameKind::PageRequest,
                PageRequest { addrs: vec![0] }.encode(),
            ),
        ] {
            assert!(decode_frame(&encode_frame(k, &p), &Limits::default()).is_ok());
        }
    }

    /// Up to 4 ranges of 1 to 300 pages, page-aligned and apart, with a bitmap each.
    fn ranges_and_pages() -> impl Strategy<Value = (Vec<MemoryRange>, Vec<Vec<u64>>)> {
        proptest::collection::vec(
            (1u64..300).prop_flat_map(|pages| {
                (
                    Just(pages),
                    proptest::collection::vec(any::<u64>(), pages.div_ceil(64) as usize),
                )
            }),
            0..4,
        )
        .prop_map(|spec| {
            let ranges = spec
                .iter()
                .enumerate()
                .map(|(i, (pages, _))| MemoryRange {
                    guest_addr: (i as u64) << 32,
                    size: pages * PAGE_SIZE as u64,
                })
                .collect();
            (ranges, spec.into_iter().map(|(_, w)| w).collect())
        })
    }

    proptest! {
        #[test]
        fn start_round_trip(rounds in any::<u32>(), (ranges, words) in ranges_and_pages()) {
            let mut s = PostcopyStart::new(rounds, &ranges);
            for (i, w) in words.iter().enumerate() {
                s.or_range_words(i, w);
            }
            let enc = s.encode();
            prop_assert_eq!(enc.len() as u64, PostcopyStart::payload_len(&ranges));
            let d = PostcopyStart::decode(&enc, &ranges).unwrap();
            prop_assert_eq!(&d, &s);
            let addrs: Vec<u64> = d.addrs().collect();
            prop_assert_eq!(addrs.len() as u64, d.count());
            prop_assert!(addrs.iter().all(|&a| d.contains(a)));
            let from_runs: u64 = d.runs().map(|(_, len)| len / PAGE_SIZE as u64).sum();
            prop_assert_eq!(from_runs, d.count());
            let mut copy = PostcopyStart::new(rounds, &ranges);
            for &a in &addrs {
                prop_assert!(copy.insert(a));
            }
            prop_assert_eq!(copy, d);
        }

        #[test]
        fn page_request_round_trip(pages in proptest::collection::vec(any::<u64>(), 1..=MAX_PAGE_REQUEST)) {
            let p = PageRequest { addrs: pages.iter().map(|a| a & !(PAGE_SIZE as u64 - 1)).collect() };
            prop_assert_eq!(PageRequest::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn small_frames_round_trip(pages in any::<u64>(), requested in any::<u64>(), blocked_us in any::<u64>()) {
            let d = PostcopyDone { pages };
            prop_assert_eq!(PostcopyDone::decode(&d.encode()).unwrap(), d);
            let c = PostcopyComplete { pages: pages.max(requested), requested, blocked_us };
            prop_assert_eq!(PostcopyComplete::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(s) = PostcopyStart::decode(&bytes, &ranges()) {
                prop_assert_eq!(s.encode(), bytes.clone());
            }
            if let Ok(p) = PageRequest::decode(&bytes) {
                prop_assert_eq!(p.encode(), bytes.clone());
            }
            let _ = PostcopyDone::decode(&bytes);
            let _ = PostcopyComplete::decode(&bytes);
        }
    }
}
