//! Guest memory allocation: anonymous `vm-memory` regions with an atomic dirty bitmap,
//! advised to use transparent huge pages (first touch of fresh memory is the costly part on
//! these hosts, and huge pages take about half the faults' time).

use livemig_engine::{GuestError, GuestMemory};
use livemig_wire::MemoryRange;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory for `ranges`: the memory [`prepare`]d for this layout if there is some,
/// fresh memory otherwise.
pub fn allocate(ranges: &[MemoryRange]) -> Result<GuestMemory, GuestError> {
    match take_prepared(ranges) {
        Some(m) => Ok(m),
        None => allocate_fresh(ranges),
    }
}

fn allocate_fresh(ranges: &[MemoryRange]) -> Result<GuestMemory, GuestError> {
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

/// Guest memory allocated and pre-faulted before a migration arrives (`livemig incoming
/// --memory`), taken by the first [`allocate`] asking for exactly its layout.
static PREPARED: Mutex<Option<GuestMemory>> = Mutex::new(None);

/// Allocates memory for `ranges` now and pre-faults it, so that a later migration of a
/// guest with exactly this layout finds its memory ready.
pub fn prepare(ranges: &[MemoryRange]) -> Result<(), GuestError> {
    let mem = allocate_fresh(ranges)?;
    livemig_engine::prefault::populate(&mem, &AtomicBool::new(false));
    *PREPARED.lock().unwrap_or_else(|p| p.into_inner()) = Some(mem);
    Ok(())
}

fn take_prepared(ranges: &[MemoryRange]) -> Option<GuestMemory> {
    let mut slot = PREPARED.lock().unwrap_or_else(|p| p.into_inner());
    if slot.as_ref().is_some_and(|m| ranges_of(m) == ranges) {
        slot.take()
    } else {
        None
    }
}
