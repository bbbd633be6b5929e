//! The byte stream of a [`super::vfio_sim::VfioSim`]: section headers, the deterministic
//! content, and a sequential section writer. Pure functions, no I/O, no clocks.
//!
//! The format is described in the [`super::vfio_sim`] module docs.

/// "VFSM", little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VFSM");
pub const STREAM_VERSION: u8 = 1;
pub const HEADER_LEN: usize = 24;
pub const TRAILER_LEN: usize = 4;

/// The two kinds of section in a device's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// State sent while the guest runs; one section per device generation.
    Precopy = 1,
    /// The state at switchover; exactly one, last.
    Final = 2,
}

impl SectionKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(SectionKind::Precopy),
            2 => Some(SectionKind::Final),
            _ => None,
        }
    }

    /// How error messages name the section.
    pub fn describe(self) -> &'static str {
        match self {
            SectionKind::Precopy => "precopy data",
            SectionKind::Final => "final state",
        }
    }
}

/// A decoded section header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectionHeader {
    pub kind: SectionKind,
    pub generation: u64,
    pub len: u64,
}

impl SectionHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = STREAM_VERSION;
        h[5] = self.kind as u8;
        // h[6..8]: reserved, zero.
        h[8..16].copy_from_slice(&self.generation.to_le_bytes());
        h[16..24].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// Decodes a header, rejecting a wrong magic, version, kind or reserved field.
    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, String> {
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if magic != MAGIC {
            return Err(format!("bad section magic 0x{magic:08x}"));
        }
        if h[4] != STREAM_VERSION {
            return Err(format!("unknown stream version {}", h[4]));
        }
        let kind = SectionKind::from_u8(h[5]).ok_or(format!("unknown section kind {}", h[5]))?;
        if h[6] != 0 || h[7] != 0 {
            return Err("nonzero reserved header bytes".to_string());
        }
        Ok(SectionHeader {
            kind,
            generation: u64_at(8),
            len: u64_at(16),
        })
    }
}

/// splitmix64's finalizer: a fast, well-mixed 64-bit hash.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Words in the pattern's repeating table (4 KiB).
const TABLE_WORDS: usize = 512;

/// The content of one section's payload. Payload word `w` (bytes `8w..8w + 8`, little-endian)
/// is `table[w % 512] ^ tag(w / 512)`: a 4 KiB table and a per-4-KiB-block tag, both hashed
/// from (seed, kind, generation). Two blocks differ in every word position (their tags differ), so a
/// chunk at the wrong offset fails at its first word; and producing or checking the pattern
/// is a vectorizable XOR, far faster than the device rates it stands in for. Either side
/// produces or checks any byte without storing the stream.
#[derive(Debug, Clone)]
pub struct Pattern {
    key: u64,
    table: Box<[u64; TABLE_WORDS]>,
}

impl Pattern {
    pub fn new(seed: u64, kind: SectionKind, generation: u64) -> Self {
        let key = mix(seed ^ mix(generation ^ ((kind as u64) << 56)));
        let mut table = Box::new([0u64; TABLE_WORDS]);
        for (i, t) in table.iter_mut().enumerate() {
            *t = mix(key.rotate_left(17) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        Pattern { key, table }
    }

    fn tag(&self, block: u64) -> u64 {
        mix(self.key ^ block.wrapping_mul(0xd6e8_feb8_6659_fd93))
    }

    fn word(&self, w: u64) -> [u8; 8] {
        let t = self.table[(w % TABLE_WORDS as u64) as usize];
        (t ^ self.tag(w / TABLE_WORDS as u64)).to_le_bytes()
    }

    /// Writes the payload bytes at `offset..offset + buf.len()` into `buf`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        // Unaligned head, byte by byte.
        let head = ((8 - offset % 8) % 8).min(buf.len() as u64) as usize;
        for (i, b) in buf[..head].iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = self.word(off / 8)[(off % 8) as usize];
        }
        // Whole words, one table run per 4 KiB block.
        let words = (buf.len() - head) / 8;
        let mut w = (offset + head as u64) / 8;
        let mut rest = &mut buf[head..head + words * 8];
        while !rest.is_empty() {
            let start = (w % TABLE_WORDS as u64) as usize;
            let take = (TABLE_WORDS - start).min(rest.len() / 8);
            let tag = self.tag(w / TABLE_WORDS as u64);
            let (cur, next) = rest.split_at_mut(take * 8);
            for (c, t) in cur
                .chunks_exact_mut(8)
                .zip(&self.table[start..start + take])
            {
                c.copy_from_slice(&(t ^ tag).to_le_bytes());
            }
            rest = next;
            w += take as u64;
        }
        // Tail.
        let done = head + words * 8;
        for (i, b) in buf[done..].iter_mut().enumerate() {
            let off = offset + (done + i) as u64;
            *b = self.word(off / 8)[(off % 8) as usize];
        }
    }

    /// The first byte of `data` (at payload `offset`) that differs from the pattern, as
    /// (index into `data`, expected byte).
    pub fn first_mismatch(&self, offset: u64, data: &[u8]) -> Option<(usize, u8)> {
        let mut expected = [0u8; 8 * TABLE_WORDS];
        let mut i = 0;
        while i < data.len() {
            let take = expected.len().min(data.len() - i);
            let want = &mut expected[..take];
            self.fill(offset + i as u64, want);
            let got = &data[i..i + take];
            if got != &want[..] {
                let j = (0..take).find(|&j| got[j] != want[j]).unwrap_or(0);
                return Some((i + j, want[j]));
            }
            i += take;
        }
        None
    }
}

/// Writes one section (header, payload, crc32c trailer) sequentially, in pieces of any size.
#[derive(Debug, Clone)]
pub struct SectionWriter {
    header: SectionHeader,
    encoded: [u8; HEADER_LEN],
    pattern: Pattern,
    pos: u64,
    crc: u32,
}

impl SectionWriter {
    pub fn new(seed: u64, header: SectionHeader) -> Self {
        SectionWriter {
            header,
            encoded: header.encode(),
            pattern: Pattern::new(seed, header.kind, header.generation),
            pos: 0,
            crc: 0,
        }
    }

    pub fn header(&self) -> SectionHeader {
        self.header
    }

    /// Header, payload and trailer bytes.
    pub fn total(&self) -> u64 {
        section_total(self.header.len)
    }

    /// Bytes written so far (the offset of the next byte within the section).
    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn remaining(&self) -> u64 {
        self.total() - self.pos
    }

    pub fn is_done(&self) -> bool {
        self.pos == self.total()
    }

    /// Appends the next at most `max` bytes of the section to `out`; returns how many.
    pub fn write(&mut self, out: &mut Vec<u8>, max: usize) -> usize {
        let n = usize::try_from(self.remaining())
            .unwrap_or(usize::MAX)
            .min(max);
        let start = out.len();
        out.resize(start + n, 0);
        let h = HEADER_LEN as u64;
        let len = self.header.len;
        let mut i = start;
        while i < start + n {
            let room = (start + n - i) as u64;
            let take;
            if self.pos < h {
                let p = self.pos as usize;
                let t = (HEADER_LEN - p).min(room as usize);
                out[i..i + t].copy_from_slice(&self.encoded[p..p + t]);
                self.crc = crc32c::crc32c_append(self.crc, &out[i..i + t]);
                take = t;
            } else if self.pos < h + len {
                let p = self.pos - h;
                let t = (len - p).min(room) as usize;
                self.pattern.fill(p, &mut out[i..i + t]);
                self.crc = crc32c::crc32c_append(self.crc, &out[i..i + t]);
                take = t;
            } else {
                let p = (self.pos - h - len) as usize;
                let t = (TRAILER_LEN - p).min(room as usize);
                out[i..i + t].copy_from_slice(&self.crc.to_le_bytes()[p..p + t]);
                take = t;
            }
            i += take;
            self.pos += take as u64;
        }
        n
    }
}

/// Header, payload and trailer bytes of a section whose payload is `len` bytes.
pub fn section_total(len: u64) -> u64 {
    HEADER_LEN as u64 + len + TRAILER_LEN as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_rejections() {
        let h = SectionHeader {
            kind: SectionKind::Final,
            generation: 9,
            len: 1 << 30,
        };
        let enc = h.encode();
        assert_eq!(SectionHeader::decode(&enc), Ok(h));
        let mut bad = enc;
        bad[0] ^= 1;
        assert!(SectionHeader::decode(&bad).is_err_and(|e| e.contains("magic")));
        let mut bad = enc;
        bad[4] = 2;
        assert!(SectionHeader::decode(&bad).is_err_and(|e| e.contains("version")));
        let mut bad = enc;
        bad[5] = 3;
        assert!(SectionHeader::decode(&bad).is_err_and(|e| e.contains("kind")));
    }

    #[test]
    fn pattern_fill_matches_any_split() {
        let p = Pattern::new(7, SectionKind::Final, 3);
        let mut whole = vec![0u8; 20_000];
        p.fill(0, &mut whole);
        for (at, len) in [(13, 333), (4090, 9000), (8192, 4096), (5, 2), (0, 20_000)] {
            let mut piece = vec![0u8; len];
            p.fill(at as u64, &mut piece);
            assert_eq!(piece[..], whole[at..at + len], "{at}+{len}");
            assert_eq!(p.first_mismatch(at as u64, &piece), None);
        }
        // 4 KiB blocks differ from each other everywhere.
        assert_ne!(whole[..8], whole[4096..4104]);
        let mut piece = vec![0u8; 333];
        p.fill(13, &mut piece);
        assert_eq!(p.first_mismatch(13, &piece), None);
        piece[100] ^= 0xff;
        assert_eq!(p.first_mismatch(13, &piece), Some((100, whole[113])));
        // Another generation is another content.
        let q = Pattern::new(7, SectionKind::Final, 4);
        assert!(q.first_mismatch(0, &whole).is_some());
    }

    #[test]
    fn writer_pieces_equal_one_write() {
        let header = SectionHeader {
            kind: SectionKind::Precopy,
            generation: 1,
            len: 5000,
        };
        let mut one = SectionWriter::new(3, header);
        let mut all = Vec::new();
        assert_eq!(one.write(&mut all, usize::MAX), 5028);
        assert!(one.is_done());
        let mut w = SectionWriter::new(3, header);
        let mut pieces = Vec::new();
        while w.write(&mut pieces, 7) > 0 {}
        assert_eq!(pieces, all);
        let crc = crc32c::crc32c(&all[..5024]);
        assert_eq!(all[5024..], crc.to_le_bytes());
    }
}
