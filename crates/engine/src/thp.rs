//! Guest memory filled from outside (an eager restore, a migration received) while the VMM
//! advised it for transparent huge pages (`MADV_HUGEPAGE`, as livemig's is).
//!
//! **An eager restore.** The first page read into an untouched 2 MiB block would fault in the
//! whole block as a huge page: a sparse guest, a few pages of data per block, would end up
//! resident whole. And where the file holds a block whole, its huge page costs more to
//! fault in than its 512 small pages on the hosts measured (a cold restore of 1 GiB of data:
//! 0.8 to 7.7 s with huge pages, 80 % of it zeroing them in the kernel, against 0.62 to
//! 0.66 s with small pages, side by side; README). So for the read, every 2 MiB block the
//! file holds pages of is advised `MADV_NOHUGEPAGE` (each page read is a 4 KiB page, holes
//! stay untouched), as QEMU's postcopy does for all of RAM while pages arrive; blocks of
//! holes are left alone. After the read the VMM's advice is given back (as QEMU's
//! `postcopy_ram_incoming_cleanup` does), so `khugepaged` may collapse the blocks again
//! and the memory the guest touches later is huge-page backed.
//!
//! **A migration received.** The same holds for pages arriving from a source: a cold
//! destination spent 15-16 CPU-s per GiB received faulting in huge pages on the host measured
//! (`bench --peer qemu`, README), most of it zeroing them. So while a precopy session
//! receives, its guest memory is advised `MADV_NOHUGEPAGE` whole ([`SmallPages::receiving`]),
//! and the VMM's advice is given back when the session ends, whatever its outcome.

use crate::file::io::RegionMap;
use crate::guest::GuestMemory;
use livemig_wire::PAGE_SIZE;
use vm_memory::GuestMemoryBackend;

const HUGE: usize = 2 << 20;

/// Ranges advised `MADV_NOHUGEPAGE` for a restore's read; [`SmallPages::give_back`] (or
/// the drop) restores `MADV_HUGEPAGE` on them.
pub(crate) struct SmallPages {
    ranges: Vec<(usize, usize)>,
}

impl SmallPages {
    /// Advises the 2 MiB blocks the file holds pages of, in every region of `regions` whose
    /// memory is advised `MADV_HUGEPAGE` (nothing if none is).
    pub fn for_read(regions: &[RegionMap]) -> SmallPages {
        let mut ranges = Vec::new();
        for r in regions {
            let (start, len) = (r.host as usize, (r.pages as usize) * PAGE_SIZE);
            if r.host.is_null() || !advised_huge(start, len) {
                continue;
            }
            ranges.extend(blocks_read(r));
        }
        for &(at, len) in &ranges {
            advise(at, len, libc::MADV_NOHUGEPAGE);
        }
        SmallPages { ranges }
    }

    /// Advises every region of `memory` advised `MADV_HUGEPAGE` (its 2 MiB-aligned inside)
    /// for small pages while a migration's pages arrive.
    pub fn receiving(memory: &GuestMemory) -> SmallPages {
        let mut ranges = Vec::new();
        for region in memory.iter() {
            let mmap = region.get_mmap();
            let (start, len) = (mmap.as_ptr() as usize, mmap.size());
            let (from, to) = (start.div_ceil(HUGE) * HUGE, (start + len) / HUGE * HUGE);
            if to > from && advised_huge(start, len) {
                ranges.push((from, to - from));
            }
        }
        for &(at, len) in &ranges {
            advise(at, len, libc::MADV_NOHUGEPAGE);
        }
        SmallPages { ranges }
    }

    /// Gives the VMM's advice back.
    pub fn give_back(mut self) {
        self.restore();
    }

    fn restore(&mut self) {
        for (at, len) in self.ranges.drain(..) {
            advise(at, len, libc::MADV_HUGEPAGE);
        }
    }

    /// Bytes kept from huge pages during the read.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.ranges.iter().map(|r| r.1).sum()
    }
}

impl Drop for SmallPages {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The 2 MiB-aligned blocks inside `r`'s memory holding present pages, adjacent ones
/// merged: `(host address, bytes)`. (The unaligned ends of a region are never huge pages.)
fn blocks_read(r: &RegionMap) -> Vec<(usize, usize)> {
    let (start, end) = (
        r.host as usize,
        r.host as usize + r.pages as usize * PAGE_SIZE,
    );
    let per_block = (HUGE / PAGE_SIZE) as u64;
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut block = start.div_ceil(HUGE) * HUGE;
    while block + HUGE <= end {
        let first = ((block - start) / PAGE_SIZE) as u64;
        if (first..first + per_block).any(|i| r.is_present(i)) {
            match out.last_mut() {
                Some((at, len)) if *at + *len == block => *len += HUGE,
                _ => out.push((block, HUGE)),
            }
        }
        block += HUGE;
    }
    out
}

fn advise(at: usize, len: usize, advice: libc::c_int) {
    // SAFETY: advice on guest memory this process maps (the restore borrows the guest for
    // the whole read); the huge-page advice changes no content and no mapping. A failure
    // only leaves the kernel's default, so it is ignored.
    let _ = unsafe { libc::madvise(at as *mut libc::c_void, len, advice) };
}

/// Whether the mapping at `start..start + len` is advised `MADV_HUGEPAGE`.
fn advised_huge(start: usize, len: usize) -> bool {
    mapping_has_flag(start, len, "hg")
}

/// Whether a mapping overlapping `start..start + len` carries `flag` in its
/// `/proc/self/smaps` `VmFlags` (`hg`: `MADV_HUGEPAGE`, `nh`: `MADV_NOHUGEPAGE`).
fn mapping_has_flag(start: usize, len: usize, flag: &str) -> bool {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return false;
    };
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
        if let Some((a, b)) = range {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                inside = a < start + len && start < b;
                continue;
            }
        }
        let flags = line.strip_prefix("VmFlags:").filter(|_| inside);
        if flags.is_some_and(|f| f.split_whitespace().any(|f| f == flag)) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::GuestMemory;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

    /// 16 MiB advised for huge pages; the file holds block 1 whole, one page of block 2, none
    /// of the rest: blocks 1 and 2 are kept small for the read, the rest left alone, and the
    /// huge-page advice comes back after.
    #[test]
    fn blocks_read_are_kept_from_huge_pages_for_the_read() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
        advise(host as usize, 16 << 20, libc::MADV_HUGEPAGE);
        let maps = RegionMap::of(&mem, &[1 << 20]);
        let r = &maps[0];
        let aligned = (host as usize).div_ceil(HUGE) * HUGE;
        let page_of = |addr: usize| ((addr - host as usize) / PAGE_SIZE) as u64;
        for i in 0..512 {
            r.set_present(page_of(aligned + HUGE) + i, true);
        }
        r.set_present(page_of(aligned + 2 * HUGE) + 7, true);
        assert_eq!(blocks_read(r), vec![(aligned + HUGE, 2 * HUGE)]);
        assert!(advised_huge(host as usize, 16 << 20));
        let small = SmallPages::for_read(&maps);
        assert_eq!(small.bytes(), 2 * HUGE);
        let nh = |addr| mapping_has_flag(addr, PAGE_SIZE, "nh");
        assert!(
            nh(aligned + 2 * HUGE),
            "the partly present block is kept small"
        );
        assert!(nh(aligned + HUGE), "so is the block held whole");
        assert!(!nh(aligned + 3 * HUGE), "blocks of holes are left alone");
        small.give_back();
        assert!(!nh(aligned + 2 * HUGE), "the advice is given back");
        assert!(advised_huge(aligned + 2 * HUGE, PAGE_SIZE));
    }

    /// A received guest's memory advised for huge pages is kept small while pages arrive,
    /// its 2 MiB-aligned inside whole; memory not advised is left alone; the advice comes
    /// back after.
    #[test]
    fn a_receiving_guest_is_kept_from_huge_pages_until_the_end() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let host = mem.iter().next().unwrap().get_mmap().as_ptr() as usize;
        let nh = |addr| mapping_has_flag(addr, PAGE_SIZE, "nh");
        let plain = SmallPages::receiving(&mem);
        assert_eq!(
            plain.bytes(),
            0,
            "memory the VMM did not advise is left alone"
        );
        drop(plain);
        advise(host, 16 << 20, libc::MADV_HUGEPAGE);
        let small = SmallPages::receiving(&mem);
        let aligned = host.div_ceil(HUGE) * HUGE;
        assert_eq!(small.bytes(), (host + (16 << 20)) / HUGE * HUGE - aligned);
        assert!(
            nh(aligned) && nh(aligned + 4 * HUGE),
            "kept small while pages arrive"
        );
        drop(small);
        assert!(!nh(aligned), "the advice is given back");
        assert!(advised_huge(aligned, HUGE));
    }
}
