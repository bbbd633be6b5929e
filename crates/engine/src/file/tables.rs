//! An on-demand restore's view of each region's tables (present bits and page CRCs), read
//! a group of [`GROUP_PAGES`] pages at a time when first needed, each group checked against
//! the CRC32Cs of the region's groups section (read whole, and checked, before anything is
//! built: 8 bytes per 4 MiB of guest). So the time before the guest runs does not grow with
//! the guest's size; a damaged group fails the restore when its first page is needed, and
//! no page is installed before its CRC32C was read from a checked group.

use super::error::FileError;
use super::io::read_vec;
use livemig_wire::file::{
    decode_bitmap, group_slices, groups, FileFormatError, FileRegion, GroupSums, GROUP_PAGES,
};
use livemig_wire::PAGE_SIZE;
use std::fs::File;
use std::path::Path;
use std::sync::OnceLock;

/// One group's tables, checked.
pub(crate) struct Group {
    /// Its pages' present bits (bit `i % 64` of word `i / 64`, `i` from the group's first
    /// page).
    pub present: Vec<u64>,
    /// Its pages' CRC32Cs.
    pub crcs: Vec<u32>,
}

impl Group {
    /// The CRC32C of the group's `k`th page, if the file holds it (else it is a hole).
    pub fn page(&self, k: u64) -> Option<u32> {
        let on = self.present[(k / 64) as usize] & (1 << (k % 64)) != 0;
        on.then(|| self.crcs[k as usize])
    }
}

/// One region's tables, each group read and checked when first asked for.
pub(crate) struct RegionTables {
    /// The region's index, for errors.
    region: usize,
    pages: u64,
    /// Where the region's bitmap and page CRC sections start.
    bitmap_at: u64,
    crcs_at: u64,
    sums: Vec<GroupSums>,
    groups: Vec<OnceLock<Group>>,
}

impl RegionTables {
    /// Region `region` of the file, with its groups section's `sums` (as many as the
    /// region has groups: the layout check and the decoder saw to it).
    pub fn new(region: usize, r: &FileRegion, sums: Vec<GroupSums>) -> Self {
        let pages = r.range.size / PAGE_SIZE as u64;
        let groups = (0..groups(pages)).map(|_| OnceLock::new()).collect();
        RegionTables {
            region,
            pages,
            bitmap_at: r.bitmap.offset,
            crcs_at: r.crcs.offset,
            sums,
            groups,
        }
    }

    /// Groups in the region.
    pub fn len(&self) -> u64 {
        self.groups.len() as u64
    }

    /// Group `g`'s first page and pages.
    pub fn span(&self, g: u64) -> (u64, u64) {
        let s = group_slices(self.pages, g);
        (s.first_page, s.pages)
    }

    /// Group `g` (< [`Self::len`]), read and checked the first time. Two threads asking at
    /// once may both read it; one copy is kept.
    pub fn group(&self, file: &File, path: &Path, g: u64) -> Result<&Group, FileError> {
        let cell = &self.groups[g as usize];
        if let Some(group) = cell.get() {
            return Ok(group);
        }
        let loaded = self.load(file, path, g)?;
        Ok(cell.get_or_init(|| loaded))
    }

    /// The CRC32C of page `i` (< the region's pages), if the file holds it.
    pub fn page(&self, file: &File, path: &Path, i: u64) -> Result<Option<u32>, FileError> {
        let g = i / GROUP_PAGES;
        Ok(self.group(file, path, g)?.page(i % GROUP_PAGES))
    }

    fn load(&self, file: &File, path: &Path, g: u64) -> Result<Group, FileError> {
        let s = group_slices(self.pages, g);
        let sums = self.sums[g as usize];
        let what = |table: &str| {
            let last = s.first_page + s.pages - 1;
            format!(
                "region {} {table} (pages {} to {last})",
                self.region, s.first_page
            )
        };
        let read = |at: u64, (off, len): (u64, u64), expected: u32, table: &str| {
            let raw = read_vec(file, len, at + off)
                .map_err(|e| FileError::io("read a region's tables", path, e))?;
            let found = crc32c::crc32c(&raw);
            match found == expected {
                true => Ok(raw),
                false => Err(FileError::format(
                    path,
                    FileFormatError::BadCrc {
                        what: what(table),
                        expected,
                        found,
                    },
                )),
            }
        };
        let raw = read(self.bitmap_at, s.bitmap, sums.bitmap, "bitmap")?;
        let present = decode_bitmap(&raw, s.pages).map_err(|e| FileError::format(path, e))?;
        let raw = read(self.crcs_at, s.crcs, sums.crcs, "page CRCs")?;
        let crcs = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Group { present, crcs })
    }
}
