//! Guest pages as host memory, for the destination's receive path: each page of a packet is
//! read from the socket straight into guest memory (one `readv` per packet), and checked
//! there, so no page is copied twice.
//!
//! Soundness rests on one rule, enforced by [`PageClaims`]: within a round, a page is written
//! by one data channel thread only, the one that claimed it; a second claim (a page sent twice
//! in a round, by a buggy or hostile peer) is a protocol error before any byte is written. The
//! destination guest does not run while pages arrive, and rounds are separated by the round
//! barrier, whose last arrival clears the claims while every channel waits.

use crate::guest::GuestMemory;
use livemig_wire::PAGE_SIZE;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// A guest page's host address, or `None` if the page is not wholly inside guest memory.
pub(crate) fn page_ptr(memory: &GuestMemory, addr: u64) -> Option<*mut u8> {
    let region = memory.find_region(GuestAddress(addr))?;
    let offset = addr - region.start_addr().0;
    if offset.checked_add(PAGE_SIZE as u64)? > region.len() {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok()
}

/// Which pages some data channel has claimed in the current round, one bit per page.
pub(crate) struct PageClaims {
    /// (first guest address, words) per memory region.
    regions: Vec<(u64, u64, Vec<AtomicU64>)>,
}

impl PageClaims {
    pub fn new(memory: &GuestMemory) -> Self {
        let regions = memory
            .iter()
            .map(|r| {
                let pages = (r.len() / PAGE_SIZE as u64) as usize;
                let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
                (r.start_addr().0, r.len(), words)
            })
            .collect();
        PageClaims { regions }
    }

    /// Claims the page at `addr` for the calling thread. False if it was claimed already in
    /// this round or lies outside guest memory.
    pub fn claim(&self, addr: u64) -> bool {
        for (start, len, words) in &self.regions {
            if addr >= *start && addr - start < *len {
                let page = ((addr - start) / PAGE_SIZE as u64) as usize;
                let bit = 1u64 << (page % 64);
                return words[page / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0;
            }
        }
        false
    }

    /// Forgets every claim. Called only while no channel is receiving (inside the barrier).
    pub fn clear(&self) {
        for (_, _, words) in &self.regions {
            for w in words {
                w.store(0, Ordering::Release);
            }
        }
    }
}

/// Reads exactly `pages.len()` pages from `fd` into the given page addresses, merging
/// neighbouring pages into one I/O vector entry.
///
/// # Safety
/// Each pointer must point to a page of writable guest memory that stays mapped during the
/// call and that no other thread reads or writes meanwhile (the caller claimed it).
pub(crate) unsafe fn read_pages(
    fd: RawFd,
    pages: &[*mut u8],
    iov: &mut Vec<libc::iovec>,
) -> io::Result<()> {
    iov.clear();
    for &p in pages {
        match iov.last_mut() {
            Some(last) if (last.iov_base as *mut u8).wrapping_add(last.iov_len) == p => {
                last.iov_len += PAGE_SIZE
            }
            _ => iov.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: PAGE_SIZE,
            }),
        }
    }
    let mut first = 0;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(1024) as libc::c_int;
        // SAFETY: the iovecs describe pages the caller guarantees are writable and ours alone.
        let n = unsafe { libc::readv(fd, iov[first..].as_ptr(), cnt) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed inside a packet's page data",
            ));
        }
        let mut n = n as usize;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = (v.iov_base as *mut u8).wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}
