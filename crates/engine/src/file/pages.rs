//! Pages between guest memory and the file: the batches a round is cut into, a save's
//! channel thread writing a batch (`pwrite` per run of data pages, zero pages left as or
//! made into holes), and a restore's reader filling a batch (`pread` per run of present
//! pages, each page checked against its CRC32C).

use super::error::FileError;
use super::io::{pread_exact, punch_hole, pwrite_all, RegionMap};
use crate::dirty::DirtyBitmap;
use crate::hostmem::{page_crc, page_is_zero};
use livemig_wire::PAGE_SIZE;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;

/// Pages per batch: 2 MiB, large enough for long sequential writes, small enough to
/// spread a round over the channels.
pub(crate) const BATCH_PAGES: usize = 512;

/// Some pages of one region, ascending.
pub(crate) struct Batch {
    pub region: usize,
    pub pages: Vec<u64>,
}

/// What a channel thread did with its batches.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Written {
    /// Pages looked at.
    pub pages: u64,
    /// Pages written with their data.
    pub data: u64,
    /// Zero pages (holes).
    pub zero: u64,
}

impl Written {
    pub fn add(&mut self, o: Written) {
        self.pages += o.pages;
        self.data += o.data;
        self.zero += o.zero;
    }
}

/// Cuts the pages marked in `dirty` into batches of at most [`BATCH_PAGES`] pages of one
/// region, handing each to `send` (which returns false to stop).
pub(crate) fn for_each_batch(
    dirty: &DirtyBitmap,
    regions: &[RegionMap],
    mut send: impl FnMut(Batch) -> Result<(), FileError>,
) -> Result<(), FileError> {
    let mut cur = Batch {
        region: 0,
        pages: Vec::with_capacity(BATCH_PAGES),
    };
    let mut region = 0;
    for addr in dirty.addrs() {
        while region < regions.len()
            && addr >= regions[region].guest_addr + regions[region].pages * PAGE_SIZE as u64
        {
            region += 1;
        }
        let Some(r) = regions.get(region) else { break };
        if (cur.region != region && !cur.pages.is_empty()) || cur.pages.len() == BATCH_PAGES {
            let next = Batch {
                region,
                pages: Vec::with_capacity(BATCH_PAGES),
            };
            send(std::mem::replace(&mut cur, next))?;
        }
        cur.region = region;
        cur.pages.push((addr - r.guest_addr) / PAGE_SIZE as u64);
    }
    if !cur.pages.is_empty() {
        send(cur)?;
    }
    Ok(())
}

/// A save's channel thread: writes `batch`'s data pages where they belong in the file,
/// one `pwrite` per run of consecutive data pages, recording each page's CRC32C and
/// presence. A zero page is not written; one the file holds from an earlier round becomes
/// a hole again.
pub(crate) fn write_batch(
    file: &File,
    path: &Path,
    regions: &[RegionMap],
    batch: &Batch,
) -> Result<Written, FileError> {
    let r = &regions[batch.region];
    let io = |e| FileError::io("write guest pages", path, e);
    let flush = |run: Option<(u64, u64)>| -> Result<(), FileError> {
        let Some((first, n)) = run else { return Ok(()) };
        let len = (n * PAGE_SIZE as u64) as usize;
        let at = r.data_offset + first * PAGE_SIZE as u64;
        // SAFETY: pages first..first+n lie inside the region's mapping, which the save
        // borrows; the kernel only reads them.
        unsafe { pwrite_all(file, r.page(first), len, at) }.map_err(io)
    };
    let mut w = Written::default();
    let mut run: Option<(u64, u64)> = None;
    for &i in &batch.pages {
        w.pages += 1;
        let p = r.page(i);
        // SAFETY: page i lies inside the region's mapping (batches come from its bitmap);
        // read volatile, as the guest may write it meanwhile.
        if unsafe { page_is_zero(p) } {
            flush(run.take())?;
            w.zero += 1;
            if r.is_present(i) {
                let at = r.data_offset + i * PAGE_SIZE as u64;
                punch_hole(file, at, PAGE_SIZE as u64).map_err(io)?;
                r.set_present(i, false);
                r.crcs[i as usize].store(0, Ordering::Relaxed);
            }
            continue;
        }
        // SAFETY: as above.
        let crc = unsafe { page_crc(p) };
        r.crcs[i as usize].store(crc, Ordering::Relaxed);
        r.set_present(i, true);
        w.data += 1;
        run = match run {
            Some((first, n)) if first + n == i => Some((first, n + 1)),
            other => {
                flush(other)?;
                Some((i, 1))
            }
        };
    }
    flush(run)?;
    Ok(w)
}

/// A restore's reader: reads `batch`'s pages (all present in the file) into guest memory,
/// one `pread` per run of consecutive pages, and checks each against its CRC32C.
pub(crate) fn read_batch(
    file: &File,
    path: &Path,
    regions: &[RegionMap],
    batch: &Batch,
) -> Result<u64, FileError> {
    let r = &regions[batch.region];
    let mut k = 0;
    while k < batch.pages.len() {
        let first = batch.pages[k];
        let mut n = 1;
        while k + n < batch.pages.len() && batch.pages[k + n] == first + n as u64 {
            n += 1;
        }
        let at = r.data_offset + first * PAGE_SIZE as u64;
        // SAFETY: pages first..first+n lie inside the region's mapping; the guest does not
        // run during a restore and each page is in one batch only.
        unsafe { pread_exact(file, r.page(first), n * PAGE_SIZE, at) }
            .map_err(|e| FileError::io("read guest pages", path, e))?;
        for i in first..first + n as u64 {
            let expected = r.crcs[i as usize].load(Ordering::Relaxed);
            // SAFETY: the page was just read into the mapping, as above.
            let found = unsafe { page_crc(r.page(i)) };
            if found != expected {
                return Err(FileError::PageCorrupted {
                    path: path.to_path_buf(),
                    addr: r.guest_addr + i * PAGE_SIZE as u64,
                    expected,
                    found,
                });
            }
        }
        k += n;
    }
    Ok(batch.pages.len() as u64)
}
