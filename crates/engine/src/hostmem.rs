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

/// A set of guest pages, one atomic bit per page: which pages some data channel has claimed
/// in the current round ([`PageClaims`]), which arrived torn ([`TornPages`]), which the
/// destination has written data into ([`Populated`]).
pub(crate) struct PageBitmap {
    /// (first guest address, bytes, words) per memory region.
    regions: Vec<(u64, u64, Vec<AtomicU64>)>,
}

/// Which pages some data channel has claimed in the current round.
pub(crate) type PageClaims = PageBitmap;

impl PageBitmap {
    pub fn new(memory: &GuestMemory) -> Self {
        let regions = memory
            .iter()
            .map(|r| {
                let pages = (r.len() / PAGE_SIZE as u64) as usize;
                let words = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
                (r.start_addr().0, r.len(), words)
            })
            .collect();
        PageBitmap { regions }
    }

    /// The word and bit of the page at `addr`, if it lies in guest memory.
    fn bit(&self, addr: u64) -> Option<(&AtomicU64, u64)> {
        self.regions.iter().find_map(|(start, len, words)| {
            (addr >= *start && addr - start < *len).then(|| {
                let page = ((addr - start) / PAGE_SIZE as u64) as usize;
                (&words[page / 64], 1u64 << (page % 64))
            })
        })
    }

    /// Adds the page at `addr`. False if it was in the set already or lies outside guest
    /// memory (so, as a claim: false if another thread claimed it first).
    pub fn insert(&self, addr: u64) -> bool {
        self.bit(addr)
            .is_some_and(|(w, bit)| w.fetch_or(bit, Ordering::AcqRel) & bit == 0)
    }

    /// Removes the page at `addr`; true if it was in the set.
    pub fn remove(&self, addr: u64) -> bool {
        self.bit(addr)
            .is_some_and(|(w, bit)| w.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    /// Whether the page at `addr` is in the set.
    pub fn contains(&self, addr: u64) -> bool {
        self.bit(addr)
            .is_some_and(|(w, bit)| w.load(Ordering::Acquire) & bit != 0)
    }

    /// The lowest address in the set, if any.
    pub fn first(&self) -> Option<u64> {
        self.regions.iter().find_map(|(start, _, words)| {
            words.iter().enumerate().find_map(|(i, w)| {
                let v = w.load(Ordering::Acquire);
                (v != 0)
                    .then(|| start + (i as u64 * 64 + v.trailing_zeros() as u64) * PAGE_SIZE as u64)
            })
        })
    }

    /// Every address in the set, lowest first (as it is while the iteration passes).
    pub fn addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|(start, _, words)| {
            words.iter().enumerate().flat_map(move |(i, w)| {
                let mut v = w.load(Ordering::Acquire);
                std::iter::from_fn(move || {
                    (v != 0).then(|| {
                        let bit = v.trailing_zeros() as u64;
                        v &= v - 1;
                        start + (i as u64 * 64 + bit) * PAGE_SIZE as u64
                    })
                })
            })
        })
    }

    /// Empties the set. For claims: called only while no channel is receiving (inside the
    /// barrier).
    pub fn clear(&self) {
        for (_, _, words) in &self.regions {
            for w in words {
                w.store(0, Ordering::Release);
            }
        }
    }
}

/// The destination's pages that hold data it received (QEMU's `receivedmap`). Guest memory
/// starts out as untouched anonymous memory, which reads as zero without being populated, so
/// a zero page for a page outside this set needs no write at all: the destination touches
/// only what it receives, and its RSS follows the data, not the guest's size. A zero page
/// for a page in the set overwrites an older copy (the page became zero on the source).
pub(crate) struct Populated(PageBitmap);

impl Populated {
    pub fn new(memory: &GuestMemory) -> Self {
        Populated(PageBitmap::new(memory))
    }

    /// Records that data was written to the page at `addr`.
    pub fn mark(&self, addr: u64) {
        // A load first: most marks find the bit set already in later rounds, and a load
        // keeps the cache line shared between the channel threads.
        if !self.0.contains(addr) {
            self.0.insert(addr);
        }
    }

    /// Whether data was ever written to the page at `addr`.
    pub fn holds_data(&self, addr: u64) -> bool {
        self.0.contains(addr)
    }
}

/// Pages that arrived torn (their data did not match their CRC) and have not yet arrived
/// intact since. A torn page in precopy is one the guest wrote while it was sent, so it is
/// dirty and comes again; one still torn at the end was corrupted on the way.
pub(crate) struct TornPages {
    pages: PageBitmap,
    /// Pages torn now.
    now: AtomicU64,
    /// Torn arrivals in all.
    total: AtomicU64,
}

impl TornPages {
    pub fn new(memory: &GuestMemory) -> Self {
        TornPages {
            pages: PageBitmap::new(memory),
            now: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    /// Records the arrival of the page at `addr`, intact or not.
    pub fn arrived(&self, addr: u64, intact: bool) {
        if intact {
            if self.pages.remove(addr) {
                self.now.fetch_sub(1, Ordering::AcqRel);
            }
        } else {
            self.total.fetch_add(1, Ordering::Relaxed);
            if self.pages.insert(addr) {
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

/// True when every byte of the guest page at `p` is zero: volatile loads, the first word
/// alone first (the usual answer for a page with data), then 128 bytes per step with AVX2
/// where the CPU has it, 8 otherwise.
///
/// # Safety
/// `p` must point to a whole page of mapped guest memory, page-aligned (it may be written
/// meanwhile).
pub(crate) unsafe fn page_is_zero(p: *const u8) -> bool {
    debug_assert_eq!(p as usize % PAGE_SIZE, 0, "a guest page is page-aligned");
    let words = p.cast::<u64>();
    // SAFETY: inside the page the caller vouches for; page addresses are 8-aligned. Most
    // pages of a used guest are not zero, and say so in their first word.
    if unsafe { std::ptr::read_volatile(words) } != 0 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2; the page is as the caller vouches.
        return unsafe { page_is_zero_avx2(p) };
    }
    (0..PAGE_SIZE / 8).all(|i| {
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(words.add(i)) == 0 }
    })
}

/// The zero check 128 bytes at a time: four 32-byte loads ORed, one test.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn page_is_zero_avx2(p: *const u8) -> bool {
    use std::arch::x86_64::{__m256i, _mm256_or_si256, _mm256_testz_si256};
    let v = p.cast::<__m256i>();
    // SAFETY: inside the page the caller vouches for; pages are page-aligned, so every
    // 32-byte load is aligned as read_volatile of __m256i needs.
    let load = |i: usize| unsafe { std::ptr::read_volatile(v.add(i)) };
    (0..PAGE_SIZE / 128).all(|k| {
        let i = 4 * k;
        let acc = _mm256_or_si256(
            _mm256_or_si256(load(i), load(i + 1)),
            _mm256_or_si256(load(i + 2), load(i + 3)),
        );
        _mm256_testz_si256(acc, acc) == 1
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

/// Words of each of the three CRC streams interleaved over a page (3 x 170 words = 4080
/// bytes; the last 16 bytes follow on the combined stream).
#[cfg(target_arch = "x86_64")]
const LANE_WORDS: usize = 170;

/// The CRC32C register after `LANE_WORDS * 8` zero bytes, as a table per byte of the
/// starting register: the register update is linear, so shifting a stream's register past
/// the bytes of the next lane costs four lookups.
#[cfg(target_arch = "x86_64")]
struct LaneShift([[u32; 256]; 4]);

#[cfg(target_arch = "x86_64")]
impl LaneShift {
    /// The table, built on first use.
    ///
    /// # Safety
    /// The CPU must have SSE4.2 (building the table uses its CRC32 instruction).
    unsafe fn get() -> &'static LaneShift {
        static TABLE: std::sync::OnceLock<Box<LaneShift>> = std::sync::OnceLock::new();
        TABLE.get_or_init(|| {
            let mut t = Box::new(LaneShift([[0; 256]; 4]));
            for (k, row) in t.0.iter_mut().enumerate() {
                for (b, slot) in row.iter_mut().enumerate() {
                    // SAFETY: the caller vouches for SSE4.2.
                    *slot = unsafe { crc_zeros((b as u64) << (8 * k), LANE_WORDS) };
                }
            }
            t
        })
    }

    fn apply(&self, x: u32) -> u32 {
        let t = &self.0;
        t[0][(x & 0xff) as usize]
            ^ t[1][((x >> 8) & 0xff) as usize]
            ^ t[2][((x >> 16) & 0xff) as usize]
            ^ t[3][(x >> 24) as usize]
    }
}

/// The raw CRC32C register `crc` after `words` zero words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn crc_zeros(mut crc: u64, words: usize) -> u32 {
    for _ in 0..words {
        crc = std::arch::x86_64::_mm_crc32_u64(crc, 0);
    }
    crc as u32
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn page_crc_sse42(p: *const u8) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let words = p.cast::<u64>();
    // Three independent streams keep the CRC32 unit busy (1 per cycle) instead of waiting out
    // one stream's 3-cycle latency: about 3x the single-stream rate.
    // SAFETY: every load is inside the page the caller vouches for, and page addresses are
    // 8-aligned.
    let load = |i: usize| unsafe { std::ptr::read_volatile(words.add(i)) };
    let (mut a, mut b, mut c) = (!0u64, 0u64, 0u64);
    for i in 0..LANE_WORDS {
        a = _mm_crc32_u64(a, load(i));
        b = _mm_crc32_u64(b, load(LANE_WORDS + i));
        c = _mm_crc32_u64(c, load(2 * LANE_WORDS + i));
    }
    // SAFETY: this function runs only where SSE4.2 was detected (see page_crc).
    let shift = unsafe { LaneShift::get() };
    let ab = shift.apply(a as u32) ^ b as u32;
    let mut crc = (shift.apply(ab) ^ c as u32) as u64;
    for i in 3 * LANE_WORDS..PAGE_SIZE / 8 {
        crc = _mm_crc32_u64(crc, load(i));
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
    fn a_bitmap_lists_its_pages_in_order_across_regions() {
        use vm_memory::GuestAddress;
        let memory = GuestMemory::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let set = PageBitmap::new(&memory);
        let pages = [0x1000, 0x3f000, 0x40000, (1 << 32) + 0xff000, 0x0];
        for &a in &pages {
            assert!(set.insert(a));
        }
        assert!(!set.insert(0x2000_0000), "outside guest memory");
        let mut want = pages.to_vec();
        want.sort_unstable();
        assert_eq!(set.addrs().collect::<Vec<_>>(), want);
        set.remove(0x3f000);
        want.retain(|&a| a != 0x3f000);
        assert_eq!(set.addrs().collect::<Vec<_>>(), want);
    }

    /// A page-aligned page of memory owned by the test.
    fn page() -> (Vec<u8>, usize) {
        let buf = vec![0u8; PAGE_SIZE * 2];
        let off = buf.as_ptr().align_offset(PAGE_SIZE);
        (buf, off)
    }

    #[test]
    fn page_crc_matches_the_crc32c_crate_and_zero_check_is_exact() {
        let (mut buf, off) = page();
        let p = &mut buf[off..off + PAGE_SIZE];
        // SAFETY: p is a whole page-aligned page owned here.
        assert!(unsafe { page_is_zero(p.as_ptr()) });
        // SAFETY: as above.
        assert_eq!(unsafe { page_crc(p.as_ptr()) }, crc32c::crc32c(p));
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        // SAFETY: as above.
        assert!(!unsafe { page_is_zero(p.as_ptr()) });
        // SAFETY: as above.
        assert_eq!(unsafe { page_crc(p.as_ptr()) }, crc32c::crc32c(p));
        // A single set bit anywhere is found, by the first-word check and by every lane of
        // the wide one.
        for at in [0, 7, 8, 31, 32, 127, 128, 2048, PAGE_SIZE - 1] {
            p.fill(0);
            p[at] = 0x80;
            // SAFETY: as above.
            assert!(!unsafe { page_is_zero(p.as_ptr()) }, "byte {at}");
        }
    }

    proptest::proptest! {
        /// The three-stream CRC equals the crate's for any page: a change in any lane, or
        /// in the 16-byte tail, shows.
        #[test]
        fn three_stream_page_crc_is_crc32c(seed: u64, flips in proptest::collection::vec(0usize..PAGE_SIZE, 0..8)) {
            let (mut buf, off) = page();
            let p = &mut buf[off..off + PAGE_SIZE];
            let mut x = seed | 1;
            for b in p.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            for f in flips {
                p[f] ^= 0xff;
            }
            // SAFETY: a whole page-aligned page owned here.
            let got = unsafe { page_crc(p.as_ptr()) };
            proptest::prop_assert_eq!(got, crc32c::crc32c(p));
        }
    }
}
