//! Guest memory allocation: anonymous `vm-memory` regions with an atomic dirty bitmap,
//! advised to use transparent huge pages (first touch of fresh memory is the costly part on
//! these hosts, and huge pages take about half the faults' time).

use livemig_engine::{GuestError, GuestMemory};
use livemig_wire::MemoryRange;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Allocates guest memory for `ranges`.
pub fn allocate(ranges: &[MemoryRange]) -> Result<GuestMemory, GuestError> {
    let spec: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&spec).map_err(|e| GuestError::new("allocate memory", e))?;
    for region in mem.iter() {
        let mmap = region.get_mmap();
        // SAFETY: advises the kernel about a mapping this process owns, over its exact
        // extent; MADV_HUGEPAGE changes no content and no mapping.
        unsafe {
            libc::madvise(mmap.as_ptr().cast(), mmap.size(), libc::MADV_HUGEPAGE);
        }
    }
    Ok(mem)
}

/// The memory ranges of `mem`.
pub fn ranges_of(mem: &GuestMemory) -> Vec<MemoryRange> {
    mem.iter()
        .map(|r| MemoryRange {
            guest_addr: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}
