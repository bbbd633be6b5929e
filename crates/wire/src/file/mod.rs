//! The save file: a VM saved to disk, laid out so that threads write and read it in
//! parallel with positioned I/O (QEMU's `mapped-ram`). `docs/file-format.md` in the
//! repository describes it; in short:
//!
//! ```text
//! 0        prefix (32 bytes): magic "LMIGSAVE", version, header length and CRC32C, its own CRC
//! 32       header (FileHeader): guest, regions, devices, the section table, the file's length
//! aligned  region 0's pages: page i at data_offset + i * 4096 (absent pages are holes)
//! aligned  region 1's pages ...
//! tail     device chunks (any order, found through each device's chunk index), then the
//!          sections: per region a bitmap of pages present, a CRC32C per page and a pair of
//!          CRC32Cs per group of 1024 pages (so an on-demand restore reads and checks the
//!          tables a group at a time), per device its chunk index, the guest state, the
//!          small devices' blobs
//! ```
//!
//! Everything here is pure: encoders write into buffers, decoders read from slices and
//! check every number against a limit before anything is sized by it, so the decoders
//! can be fuzzed on their own (`fuzz/fuzz_targets/file.rs`).

mod header;
mod layout;

pub use header::{FileDevice, FileHeader, FileRegion, Section};
pub use layout::{
    decode_bitmap, decode_chunk_index, decode_group_sums, encode_chunk_index, encode_group_sums,
    group_slices, groups, plan, ChunkRef, GroupSlices, GroupSums, Plan,
};

use crate::cursor::{Reader, Writer};
use thiserror::Error;

/// The first 8 bytes of every save file.
pub const FILE_MAGIC: [u8; 8] = *b"LMIGSAVE";
/// The version of the file format this build writes and reads (2: the regions' tables are
/// checked per group of [`GROUP_PAGES`] pages too; version 1 files are refused).
pub const FILE_VERSION: u16 = 2;
/// Bytes of the fixed prefix before the header.
pub const PREFIX_LEN: usize = 32;
/// The largest header (64 devices of each kind with the largest configurations fit).
pub const MAX_HEADER_LEN: u32 = 1 << 20;
/// Each region's pages start at a multiple of this (1 MiB, as QEMU's mapped-ram), so a
/// region can be mapped, and read with direct I/O, in large aligned pieces.
pub const REGION_ALIGN: u64 = 1 << 20;
/// The most chunks one device's stream may have in a file (a 16-byte index entry each).
pub const MAX_DEVICE_CHUNKS: u32 = 1 << 20;
/// Bytes of one chunk index entry: offset u64, length u32, CRC32C u32.
pub const CHUNK_REF_LEN: usize = 16;
/// Pages per group of a region's tables: a group's present bits (16 u64 words) and page
/// CRCs (4 KiB) have a CRC32C each in the region's groups section.
pub const GROUP_PAGES: u64 = 1024;
/// Bytes of one groups section entry: CRC32C of the group's bitmap words, CRC32C of its
/// page CRCs.
pub const GROUP_SUMS_LEN: usize = 8;

/// What is wrong with a save file, found before anything was sized by it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FileFormatError {
    /// The file does not start with [`FILE_MAGIC`]: not a livemig save file, or a save that
    /// did not finish (the prefix is written last).
    #[error("not a livemig save file (it starts with {found:02x?}, not \"LMIGSAVE\"), or a save that did not finish")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// A version this build does not read.
    #[error("save file version {found}, this build reads version {supported} only")]
    UnsupportedVersion {
        /// The file's version.
        found: u16,
        /// [`FILE_VERSION`].
        supported: u16,
    },
    /// A CRC32C did not match: the file was damaged after it was written.
    #[error("{what} is corrupted: CRC32C 0x{found:08x}, the file says 0x{expected:08x}")]
    BadCrc {
        /// What was checked ("file prefix", "header", "region 0 bitmap", ...).
        what: String,
        /// The CRC the file holds.
        expected: u32,
        /// The CRC of the bytes read.
        found: u32,
    },
    /// The file is shorter than its header says: it was cut.
    #[error("the file is truncated: its header says {expected} bytes, it has {found}")]
    Truncated {
        /// The length the header gives.
        expected: u64,
        /// The file's length.
        found: u64,
    },
    /// A section, region or chunk lies where it cannot (outside the file, overlapping,
    /// unaligned) or is larger than its limit.
    #[error("bad layout: {what}: {detail}")]
    Layout {
        /// What is misplaced.
        what: String,
        /// How.
        detail: String,
    },
    /// A field of the prefix or header does not decode.
    #[error("malformed {what}: {source}")]
    Malformed {
        /// The part being read.
        what: &'static str,
        /// The field's error.
        #[source]
        source: crate::WireError,
    },
}

impl FileFormatError {
    pub(crate) fn layout(what: impl Into<String>, detail: impl Into<String>) -> Self {
        FileFormatError::Layout {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

/// The fixed 32 bytes at the start of a save file.
///
/// ```text
/// 0  magic "LMIGSAVE"   8 version u16   10 flags u16 (0)   12 header length u32
/// 16 header CRC32C u32  20 reserved (8 zero bytes)          28 CRC32C of bytes 0..28
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePrefix {
    /// Bytes of the header that follows, at most [`MAX_HEADER_LEN`].
    pub header_len: u32,
    /// CRC32C of those bytes.
    pub header_crc: u32,
}

impl FilePrefix {
    /// The prefix of `header` (its encoded bytes).
    pub fn for_header(header: &[u8]) -> Self {
        FilePrefix {
            header_len: header.len() as u32,
            header_crc: crc32c::crc32c(header),
        }
    }

    /// The prefix's 32 bytes.
    pub fn encode(&self) -> [u8; PREFIX_LEN] {
        let mut v = Vec::with_capacity(PREFIX_LEN);
        Writer::new(&mut v)
            .bytes(&FILE_MAGIC)
            .u16(FILE_VERSION)
            .u16(0)
            .u32(self.header_len)
            .u32(self.header_crc)
            .u64(0);
        let crc = crc32c::crc32c(&v);
        Writer::new(&mut v).u32(crc);
        let mut out = [0u8; PREFIX_LEN];
        out.copy_from_slice(&v);
        out
    }

    /// Checks the magic, then the version (so a file of another version is named as such,
    /// whatever its layout), then the prefix's CRC, flags and header length.
    pub fn decode(raw: &[u8; PREFIX_LEN]) -> Result<Self, FileFormatError> {
        let malformed = |source| FileFormatError::Malformed {
            what: "file prefix",
            source,
        };
        let mut r = Reader::new(raw, "file prefix");
        let magic: [u8; 8] = r.array().map_err(malformed)?;
        if magic != FILE_MAGIC {
            return Err(FileFormatError::BadMagic { found: magic });
        }
        let version = r.u16().map_err(malformed)?;
        if version != FILE_VERSION {
            return Err(FileFormatError::UnsupportedVersion {
                found: version,
                supported: FILE_VERSION,
            });
        }
        let expected = u32::from_le_bytes([raw[28], raw[29], raw[30], raw[31]]);
        let found = crc32c::crc32c(&raw[..28]);
        if expected != found {
            return Err(FileFormatError::BadCrc {
                what: "file prefix".into(),
                expected,
                found,
            });
        }
        let flags = r.u16().map_err(malformed)?;
        let header_len = r.u32().map_err(malformed)?;
        let header_crc = r.u32().map_err(malformed)?;
        if flags != 0 || r.u64().map_err(malformed)? != 0 {
            return Err(FileFormatError::layout(
                "file prefix",
                "flags and reserved bytes must be zero in version 2",
            ));
        }
        if header_len == 0 || header_len > MAX_HEADER_LEN {
            return Err(FileFormatError::layout(
                "header",
                format!("{header_len} bytes, must be 1 to {MAX_HEADER_LEN}"),
            ));
        }
        Ok(FilePrefix {
            header_len,
            header_crc,
        })
    }

    /// Checks `header` (the bytes after the prefix) against the prefix's CRC.
    pub fn check_header(&self, header: &[u8]) -> Result<(), FileFormatError> {
        if header.len() != self.header_len as usize {
            return Err(FileFormatError::Truncated {
                expected: (PREFIX_LEN + self.header_len as usize) as u64,
                found: (PREFIX_LEN + header.len()) as u64,
            });
        }
        let found = crc32c::crc32c(header);
        if found != self.header_crc {
            return Err(FileFormatError::BadCrc {
                what: "header".into(),
                expected: self.header_crc,
                found,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
