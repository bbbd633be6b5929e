//! Where things lie in a save file: the plan a save follows, the checks a restore makes
//! before it reads anything a header points at, and the per-region and per-device sections.

use super::{
    FileFormatError, FileHeader, Section, CHUNK_REF_LEN, GROUP_PAGES, GROUP_SUMS_LEN,
    MAX_DEVICE_CHUNKS, PREFIX_LEN, REGION_ALIGN,
};
use crate::{MemoryRange, MAX_CHUNK_SIZE, PAGE_SIZE};

/// Where a save puts the regions' pages, and where the tail (device chunks, sections)
/// begins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Each region's `data_offset`, in order.
    pub data_offsets: Vec<u64>,
    /// The first byte after the last region's pages.
    pub tail: u64,
}

fn align_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to) * to
}

/// The layout of a file whose header is `header_len` bytes long, for a guest of `ranges`:
/// each region's pages at the next multiple of [`REGION_ALIGN`].
pub fn plan(header_len: usize, ranges: &[MemoryRange]) -> Plan {
    let mut at = align_up((PREFIX_LEN + header_len) as u64, REGION_ALIGN);
    let mut data_offsets = Vec::with_capacity(ranges.len());
    for r in ranges {
        data_offsets.push(at);
        at = align_up(at.saturating_add(r.size), REGION_ALIGN);
    }
    Plan {
        data_offsets,
        tail: at,
    }
}

/// Words of a region's page bitmap.
pub(crate) fn bitmap_words(pages: u64) -> u64 {
    pages.div_ceil(64)
}

impl FileHeader {
    /// Checks that every part the header points at lies inside a file of `actual_len`
    /// bytes, after the header (of `header_len` bytes), with the length its counts give;
    /// that regions are aligned and apart; and that the state blobs are at most
    /// `max_state` bytes. After this, no offset or length from the header can send a read
    /// outside the file or size an allocation past these limits.
    pub fn check_layout(
        &self,
        header_len: u32,
        actual_len: u64,
        max_state: u64,
    ) -> Result<(), FileFormatError> {
        if actual_len < self.file_len {
            return Err(FileFormatError::Truncated {
                expected: self.file_len,
                found: actual_len,
            });
        }
        let start = PREFIX_LEN as u64 + header_len as u64;
        let inside = |what: String, s: &Section, len: u64| -> Result<(), FileFormatError> {
            if s.len != len {
                let detail = format!("{} bytes, must be {len}", s.len);
                return Err(FileFormatError::layout(what, detail));
            }
            match s.offset.checked_add(s.len) {
                Some(end) if s.offset >= start && end <= self.file_len => Ok(()),
                _ => Err(FileFormatError::layout(
                    what,
                    format!(
                        "bytes {}+{} lie outside {start}..{}",
                        s.offset, s.len, self.file_len
                    ),
                )),
            }
        };
        let mut data_end = start;
        for (i, r) in self.regions.iter().enumerate() {
            let pages = r.range.size / PAGE_SIZE as u64;
            let end = r.data_offset.checked_add(r.range.size);
            if !r.data_offset.is_multiple_of(REGION_ALIGN)
                || r.data_offset < data_end
                || end.is_none_or(|e| e > self.file_len)
            {
                let detail = format!(
                    "pages at {} (+{}) must be 1 MiB-aligned, after the header and the \
                     previous region, inside the file's {} bytes",
                    r.data_offset, r.range.size, self.file_len
                );
                return Err(FileFormatError::layout(format!("region {i}"), detail));
            }
            data_end = end.unwrap_or(u64::MAX);
            inside(
                format!("region {i} bitmap"),
                &r.bitmap,
                bitmap_words(pages) * 8,
            )?;
            inside(format!("region {i} page CRCs"), &r.crcs, pages * 4)?;
            let len = groups(pages) * GROUP_SUMS_LEN as u64;
            inside(format!("region {i} groups"), &r.groups, len)?;
        }
        for (i, d) in self.devices.iter().enumerate() {
            let len = d.chunks as u64 * CHUNK_REF_LEN as u64;
            inside(
                format!("device {i} ({}) chunk index", d.device.name),
                &d.index,
                len,
            )?;
        }
        for (what, s) in [
            ("guest state", &self.state),
            ("small devices' state", &self.vmstate_blobs),
        ] {
            if s.len > max_state {
                let detail = format!("{} bytes, more than the limit of {max_state}", s.len);
                return Err(FileFormatError::layout(what, detail));
            }
            inside(what.to_string(), s, s.len)?;
        }
        Ok(())
    }
}

/// Decodes a region's bitmap section (`pages` bits in little-endian u64 words); bits past
/// the region's last page must be clear.
pub fn decode_bitmap(buf: &[u8], pages: u64) -> Result<Vec<u64>, FileFormatError> {
    let words = bitmap_words(pages);
    if buf.len() as u64 != words * 8 {
        let detail = format!("{} bytes for {pages} pages", buf.len());
        return Err(FileFormatError::layout("bitmap", detail));
    }
    let out: Vec<u64> = buf
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    if !pages.is_multiple_of(64) {
        if let Some(last) = out.last() {
            if last >> (pages % 64) != 0 {
                return Err(FileFormatError::layout(
                    "bitmap",
                    "bits set past the region's last page",
                ));
            }
        }
    }
    Ok(out)
}

/// Groups of [`GROUP_PAGES`] pages in a region of `pages` pages (the last may be short).
pub fn groups(pages: u64) -> u64 {
    pages.div_ceil(GROUP_PAGES)
}

/// Where group `g` of a region of `pages` pages lies in the region's tables: its pages,
/// and its bytes of the bitmap and page CRC sections (offsets from each section's start).
/// Groups start on a bitmap word (64 divides [`GROUP_PAGES`]), so a group's words hold
/// its pages' bits only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupSlices {
    /// The group's first page.
    pub first_page: u64,
    /// Its pages (1 to [`GROUP_PAGES`]).
    pub pages: u64,
    /// Its words of the bitmap section: offset and length in bytes.
    pub bitmap: (u64, u64),
    /// Its entries of the page CRC section: offset and length in bytes.
    pub crcs: (u64, u64),
}

/// Group `g`'s place (`g` < [`groups`]`(pages)`).
pub fn group_slices(pages: u64, g: u64) -> GroupSlices {
    let first_page = g.saturating_mul(GROUP_PAGES);
    let n = GROUP_PAGES.min(pages.saturating_sub(first_page));
    GroupSlices {
        first_page,
        pages: n,
        bitmap: (first_page / 8, bitmap_words(n) * 8),
        crcs: (first_page * 4, n * 4),
    }
}

/// The CRC32Cs of one group's slices of a region's tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupSums {
    /// CRC32C of the group's bitmap words.
    pub bitmap: u32,
    /// CRC32C of the group's page CRCs.
    pub crcs: u32,
}

/// A region's groups section, from its bitmap and page CRC sections' bytes (`pages`
/// pages; the sections as [`FileHeader::check_layout`] sizes them).
pub fn encode_group_sums(bitmap: &[u8], crcs: &[u8], pages: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(groups(pages) as usize * GROUP_SUMS_LEN);
    for g in 0..groups(pages) {
        let s = group_slices(pages, g);
        let part = |b: &[u8], (at, len): (u64, u64)| {
            let at = (at as usize).min(b.len());
            crc32c::crc32c(&b[at..(at + len as usize).min(b.len())])
        };
        out.extend_from_slice(&part(bitmap, s.bitmap).to_le_bytes());
        out.extend_from_slice(&part(crcs, s.crcs).to_le_bytes());
    }
    out
}

/// Decodes a region's groups section (`pages` pages).
pub fn decode_group_sums(buf: &[u8], pages: u64) -> Result<Vec<GroupSums>, FileFormatError> {
    if buf.len() as u64 != groups(pages).saturating_mul(GROUP_SUMS_LEN as u64) {
        let detail = format!("{} bytes for {pages} pages", buf.len());
        return Err(FileFormatError::layout("groups", detail));
    }
    Ok(buf
        .chunks_exact(GROUP_SUMS_LEN)
        .map(|e| GroupSums {
            bitmap: u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
            crcs: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
        })
        .collect())
}

/// Where one chunk of a device's stream lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Its first byte in the file.
    pub offset: u64,
    /// Its length, 1 to [`MAX_CHUNK_SIZE`].
    pub len: u32,
    /// CRC32C of its bytes.
    pub crc: u32,
}

/// A device's chunk index: 16 bytes per chunk (offset u64, length u32, CRC32C u32).
pub fn encode_chunk_index(chunks: &[ChunkRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunks.len() * CHUNK_REF_LEN);
    for c in chunks {
        out.extend_from_slice(&c.offset.to_le_bytes());
        out.extend_from_slice(&c.len.to_le_bytes());
        out.extend_from_slice(&c.crc.to_le_bytes());
    }
    out
}

/// Decodes a device's chunk index of `chunks` entries; each chunk must be 1 to
/// [`MAX_CHUNK_SIZE`] bytes and lie inside the first `file_len` bytes.
pub fn decode_chunk_index(
    buf: &[u8],
    chunks: u32,
    file_len: u64,
) -> Result<Vec<ChunkRef>, FileFormatError> {
    if chunks > MAX_DEVICE_CHUNKS || buf.len() as u64 != chunks as u64 * CHUNK_REF_LEN as u64 {
        let detail = format!("{} bytes for {chunks} chunks", buf.len());
        return Err(FileFormatError::layout("chunk index", detail));
    }
    buf.chunks_exact(CHUNK_REF_LEN)
        .enumerate()
        .map(|(i, e)| {
            let u32_at = |k: usize| u32::from_le_bytes([e[k], e[k + 1], e[k + 2], e[k + 3]]);
            let c = ChunkRef {
                offset: u64::from(u32_at(0)) | u64::from(u32_at(4)) << 32,
                len: u32_at(8),
                crc: u32_at(12),
            };
            let end = c.offset.checked_add(c.len as u64);
            if c.len == 0 || c.len > MAX_CHUNK_SIZE || end.is_none_or(|e| e > file_len) {
                let detail = format!(
                    "{} bytes at {}, past the file or the limit",
                    c.len, c.offset
                );
                return Err(FileFormatError::layout(format!("chunk {i}"), detail));
            }
            Ok(c)
        })
        .collect()
}
