//! Guest pages as host memory. The destination reads each page of a packet from the socket
//! straight into guest memory (one `readv` per packet) and checks it there; the source checks
//! each page for zeros, takes its CRC and hands it to the kernel (`writev`) straight from
//! guest memory. No page is copied by livemig on either side.
//!
//! On the source the guest keeps running and may write a page while it is read: the reads
//! here are volatile (never a Rust reference over memory another thread writes), and a page
//! that changes between its CRC and the kernel's copy arrives torn, which the destination
//! detects by its CRC and tolerates in precopy (see `livemig_wire::ram`).
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

    /// Unsets the page's bit; true if it was set.
    pub fn release(&self, addr: u64) -> bool {
        for (start, len, words) in &self.regions {
            if addr >= *start && addr - start < *len {
                let page = ((addr - start) / PAGE_SIZE as u64) as usize;
                let bit = 1u64 << (page % 64);
                return words[page / 64].fetch_and(!bit, Ordering::AcqRel) & bit != 0;
            }
        }
        false
    }

    /// The lowest address whose bit is set, if any.
    pub fn first(&self) -> Option<u64> {
        self.regions.iter().find_map(|(start, _, words)| {
            words.iter().enumerate().find_map(|(i, w)| {
                let v = w.load(Ordering::Acquire);
                (v != 0)
                    .then(|| start + (i as u64 * 64 + v.trailing_zeros() as u64) * PAGE_SIZE as u64)
            })
        })
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

/// Pages that arrived torn (their data did not match their CRC) and have not yet arrived
/// intact since. A torn page in precopy is one the guest wrote while it was sent, so it is
/// dirty and comes again; one still torn at the end was corrupted on the way.
pub(crate) struct TornPages {
    pages: PageClaims,
    /// Pages torn now.
    now: AtomicU64,
    /// Torn arrivals in all.
    total: AtomicU64,
}

impl TornPages {
    pub fn new(memory: &GuestMemory) -> Self {
        TornPages {
            pages: PageClaims::new(memory),
            now: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    /// Records the arrival of the page at `addr`, intact or not.
    pub fn arrived(&self, addr: u64, intact: bool) {
        if intact {
            if self.pages.release(addr) {
                self.now.fetch_sub(1, Ordering::AcqRel);
            }
        } else {
            self.total.fetch_add(1, Ordering::Relaxed);
            if self.pages.claim(addr) {
                self.now.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// How many pages are torn now, and the first of them.
    pub fn outstanding(&self) -> (u64, Option<u64>) {
        let n = self.now.load(Ordering::Acquire);
        (n, if n > 0 { self.pages.first() } else { None })
    }

    /// Torn arrivals in all (a statistic: each was sent again).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
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
    push_pages(iov, pages.iter().map(|&p| p.cast_const()), 0);
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
        consume(iov, &mut first, n as usize);
    }
    Ok(())
}

/// True when every byte of the guest page at `p` is zero. Volatile 8-byte reads, stopping at
/// the first non-zero word (the usual case for a page with data).
///
/// # Safety
/// `p` must point to a whole page of mapped guest memory (it may be written meanwhile).
pub(crate) unsafe fn page_is_zero(p: *const u8) -> bool {
    let words = p.cast::<u64>();
    (0..PAGE_SIZE / 8).all(|i| {
        // SAFETY: inside the page the caller vouches for; page addresses are 8-aligned.
        unsafe { std::ptr::read_volatile(words.add(i)) == 0 }
    })
}

/// The CRC32C of the guest page at `p` (what `crc32c::crc32c` gives for its bytes), read
/// with volatile loads: with SSE4.2's CRC32 instruction where the CPU has it, else through
/// one page-sized copy on the stack.
///
/// # Safety
/// `p` must point to a whole page of mapped guest memory (it may be written meanwhile).
pub(crate) unsafe fn page_crc(p: *const u8) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2; the page is as the caller vouches.
        return unsafe { page_crc_sse42(p) };
    }
    let mut copy = [0u8; PAGE_SIZE];
    for (i, b) in copy.iter_mut().enumerate() {
        // SAFETY: inside the page the caller vouches for.
        *b = unsafe { std::ptr::read_volatile(p.add(i)) };
    }
    crc32c::crc32c(&copy)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn page_crc_sse42(p: *const u8) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let words = p.cast::<u64>();
    // One stream: 8 bytes per CRC32 instruction (3 cycles' latency), ~8 GB/s, well above
    // what a channel sends; interleaving streams would need a CRC-combine step.
    let mut crc = !0u64;
    for i in 0..PAGE_SIZE / 8 {
        // SAFETY: inside the page the caller vouches for; page addresses are 8-aligned.
        let w = unsafe { std::ptr::read_volatile(words.add(i)) };
        crc = _mm_crc32_u64(crc, w);
    }
    !(crc as u32)
}

/// Appends one I/O vector entry per run of neighbouring pages; entries before `merge_from`
/// are never extended.
fn push_pages(
    iov: &mut Vec<libc::iovec>,
    pages: impl Iterator<Item = *const u8>,
    merge_from: usize,
) {
    for p in pages {
        let len = iov.len();
        match iov.last_mut() {
            Some(last)
                if len > merge_from
                    && (last.iov_base as *const u8).wrapping_add(last.iov_len) == p =>
            {
                last.iov_len += PAGE_SIZE
            }
            _ => iov.push(libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: PAGE_SIZE,
            }),
        }
    }
}

/// Advances `first` and the first unfinished entry past `n` bytes done by a vectored call.
fn consume(iov: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 {
        let v = &mut iov[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            *first += 1;
        } else {
            v.iov_base = (v.iov_base as *mut u8).wrapping_add(n).cast();
            v.iov_len -= n;
            n = 0;
        }
    }
}

/// Writes one frame whose payload is `prefix` followed by the guest pages at `pages`, in
/// one vectored write (neighbouring pages merged), handling partial writes.
///
/// # Safety
/// Each pointer must point to a whole page of mapped guest memory that stays mapped during
/// the call (the guest may write it meanwhile: the kernel copies what it finds).
pub(crate) unsafe fn write_pages(
    fd: RawFd,
    header: &[u8],
    prefix: &[u8],
    pages: &[*const u8],
    iov: &mut Vec<libc::iovec>,
) -> io::Result<()> {
    iov.clear();
    for head in [header, prefix] {
        iov.push(libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: head.len(),
        });
    }
    // Pages merge with each other, never with the header or prefix.
    push_pages(iov, pages.iter().copied(), 2);
    let mut first = 0;
    while first < iov.len() {
        let cnt = (iov.len() - first).min(1024) as libc::c_int;
        // SAFETY: the iovecs describe the caller's buffers and mapped guest pages; the
        // kernel only reads them.
        let n = unsafe { libc::writev(fd, iov[first..].as_ptr(), cnt) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        consume(iov, &mut first, n as usize);
        while first < iov.len() && iov[first].iov_len == 0 {
            first += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_crc_matches_the_crc32c_crate_and_zero_check_is_exact() {
        let mut page = vec![0u8; PAGE_SIZE * 2];
        // An 8-aligned page inside the buffer.
        let off = page.as_ptr().align_offset(8);
        let p = &mut page[off..off + PAGE_SIZE];
        // SAFETY: p is a whole page-sized, 8-aligned buffer owned here.
        assert!(unsafe { page_is_zero(p.as_ptr()) });
        assert_eq!(unsafe { page_crc(p.as_ptr()) }, crc32c::crc32c(p));
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        // SAFETY: as above.
        assert!(!unsafe { page_is_zero(p.as_ptr()) });
        assert_eq!(unsafe { page_crc(p.as_ptr()) }, crc32c::crc32c(p));
        p.fill(0);
        p[PAGE_SIZE - 1] = 1;
        // SAFETY: as above.
        assert!(!unsafe { page_is_zero(p.as_ptr()) });
    }
}
