//! Guest memory allocation: anonymous (or, for local mode, memfd-backed) `vm-memory`
//! regions with an atomic dirty bitmap, advised to use transparent huge pages (first touch of fresh memory is the costly part on
//! these hosts, and huge pages take about half the faults' time).

use livemig_engine::local::REQUIRED_SEALS;
use livemig_engine::{GuestError, GuestMemory};
use livemig_wire::MemoryRange;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Where a guest's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory (the default).
    #[default]
    Anonymous,
    /// One memfd per range, mapped shared and sealed against resizing: what local mode
    /// hands to a destination on the same host instead of copying pages.
    Shared,
}

/// Guest memory for `ranges`: anonymous memory [`prepare`]d for this layout if there is
/// some, fresh memory otherwise; or memfd-backed memory.
pub fn allocate(ranges: &[MemoryRange], backing: Backing) -> Result<GuestMemory, GuestError> {
    match backing {
        Backing::Shared => allocate_shared(ranges),
        Backing::Anonymous => match take_prepared(ranges) {
            Some(m) => Ok(m),
            None => allocate_fresh(ranges),
        },
    }
}

fn allocate_shared(ranges: &[MemoryRange]) -> Result<GuestMemory, GuestError> {
    let err = |e: std::io::Error| GuestError::new("allocate shared memory", e);
    let mut spec = Vec::with_capacity(ranges.len());
    for r in ranges {
        // SAFETY: memfd_create with a valid C string; the new descriptor is owned by the
        // File made from it at once.
        let file = unsafe {
            let fd = libc::memfd_create(
                c"livemig-guest".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            );
            if fd < 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
            File::from_raw_fd(fd)
        };
        file.set_len(r.size).map_err(err)?;
        // SAFETY: F_ADD_SEALS on a descriptor owned here; it only restricts later resizing.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, REQUIRED_SEALS) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        spec.push((
            GuestAddress(r.guest_addr),
            r.size as usize,
            Some(FileOffset::new(file, 0)),
        ));
    }
    let mem = GuestMemory::from_ranges_with_files(spec)
        .map_err(|e| GuestError::new("map shared memory", e))?;
    advise_huge_pages(&mem);
    Ok(mem)
}

fn allocate_fresh(ranges: &[MemoryRange]) -> Result<GuestMemory, GuestError> {
    let spec: Vec<(GuestAddress, usize)> = ranges
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&spec).map_err(|e| GuestError::new("allocate memory", e))?;
    advise_huge_pages(&mem);
    Ok(mem)
}

fn advise_huge_pages(mem: &GuestMemory) {
    for region in mem.iter() {
        let mmap = region.get_mmap();
        // SAFETY: advises the kernel about a mapping this process owns, over its exact
        // extent; MADV_HUGEPAGE changes no content and no mapping.
        unsafe {
            libc::madvise(mmap.as_ptr().cast(), mmap.size(), libc::MADV_HUGEPAGE);
        }
    }
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
    let prefault = livemig_engine::prefault::default_threads();
    livemig_engine::prefault::populate_parallel(&mem, &AtomicBool::new(false), prefault);
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
