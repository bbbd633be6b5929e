//! Positioned I/O on the save file straight from and into guest memory, and the page
//! tables (present bits, CRCs) the channel threads share.
//!
//! Guest memory may be written by the guest while a live save reads it, so it is never
//! borrowed as a Rust slice: the kernel copies from the raw pointer (`pwrite`), as the
//! migration's `writev` does (`hostmem.rs`).

use crate::guest::GuestMemory;
use livemig_wire::PAGE_SIZE;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Which way a positioned transfer goes.
#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// Transfers `len` bytes between `ptr` and the file at `offset`, whatever the short
/// transfers and interruptions; a read past the file's end is `UnexpectedEof`.
///
/// # Safety
/// `ptr..ptr + len` must be mapped for the whole call: readable to write it out; to read
/// into it, writable and not read or written by anything else meanwhile.
unsafe fn transfer(file: &File, ptr: *mut u8, len: usize, offset: u64, dir: Dir) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let mut done = 0usize;
    while done < len {
        let (p, left, at) = (
            ptr.wrapping_add(done),
            len - done,
            (offset + done as u64) as i64,
        );
        let n = match dir {
            // SAFETY: `p..p + left` lies in the caller's range (done < len), readable; the
            // kernel only reads it.
            Dir::Write => unsafe { libc::pwrite(fd, p.cast(), left, at) },
            // SAFETY: as above, writable and the caller's alone.
            Dir::Read => unsafe { libc::pread(fd, p.cast(), left, at) },
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => {
                return Err(match dir {
                    Dir::Write => io::ErrorKind::WriteZero.into(),
                    Dir::Read => io::ErrorKind::UnexpectedEof.into(),
                })
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Writes `len` bytes from `ptr` at `offset`, whatever the short writes.
///
/// # Safety
/// `ptr..ptr + len` must be mapped and readable for the whole call.
pub(crate) unsafe fn pwrite_all(
    file: &File,
    ptr: *const u8,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: the caller's guarantee; a write only reads the range.
    unsafe { transfer(file, ptr.cast_mut(), len, offset, Dir::Write) }
}

/// Reads exactly `len` bytes at `offset` into `ptr`; a file that ends first is an
/// `UnexpectedEof` error.
///
/// # Safety
/// `ptr..ptr + len` must be mapped and writable, and not be read or written by anything
/// else during the call.
pub(crate) unsafe fn pread_exact(
    file: &File,
    ptr: *mut u8,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    // SAFETY: the caller's guarantee.
    unsafe { transfer(file, ptr, len, offset, Dir::Read) }
}

/// One page of a buffer aligned as a page, as direct I/O needs (page reads of an
/// on-demand restore go through these).
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
pub(crate) struct Page(pub [u8; PAGE_SIZE]);

impl Page {
    /// `n` zeroed pages.
    pub fn buffer(n: usize) -> Vec<Page> {
        vec![Page([0; PAGE_SIZE]); n]
    }
}

/// The descriptor pages are written or read through: with `direct`, a second descriptor
/// of `path` opened with `O_DIRECT` (the page cache bypassed, as QEMU's `direct-io`; the
/// pages lie at page-aligned offsets and move from and to page-aligned memory); else a
/// duplicate of `file`. Headers, sections and device state always go through `file`.
pub(crate) fn pages_fd(
    file: &File,
    path: &std::path::Path,
    direct: bool,
    write: bool,
) -> Result<File, super::FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    if !direct {
        return file
            .try_clone()
            .map_err(|e| super::FileError::io("duplicate the descriptor", path, e));
    }
    File::options()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::EINVAL) => super::FileError::DirectIo {
                path: path.to_path_buf(),
                source,
            },
            _ => super::FileError::io("open with O_DIRECT", path, source),
        })
}

/// Reads `len` bytes at `offset` into a new buffer (`len` bounded by the caller's checked
/// limits).
pub(crate) fn read_vec(file: &File, len: u64, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    // SAFETY: the buffer is ours and `len` bytes long.
    unsafe { pread_exact(file, buf.as_mut_ptr(), buf.len(), offset)? };
    Ok(buf)
}

/// Writes `buf` at `offset`.
pub(crate) fn write_buf(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    // SAFETY: `buf` is a live slice of `buf.len()` bytes.
    unsafe { pwrite_all(file, buf.as_ptr(), buf.len(), offset) }
}

/// Gives `len` bytes at `offset` back to the filesystem (a hole, reading as zeros); where
/// the filesystem cannot, writes zeros.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on our own descriptor, no memory passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        return Ok(());
    }
    // Aligned, in case `file` is the direct-I/O descriptor (`len` is whole pages).
    let zeros = Page::buffer((len as usize).div_ceil(PAGE_SIZE));
    // SAFETY: the buffer is ours, at least `len` bytes.
    unsafe { pwrite_all(file, zeros.as_ptr().cast(), len as usize, offset) }
}

/// One guest memory region: where its pages are in host memory and in the file, which of
/// them the file holds and each one's CRC32C.
pub(crate) struct RegionMap {
    pub guest_addr: u64,
    pub pages: u64,
    /// Host address of the region's first page.
    pub host: *mut u8,
    /// Where the region's page 0 lies in the file.
    pub data_offset: u64,
    pub present: Vec<AtomicU64>,
    pub crcs: Vec<AtomicU32>,
}

// SAFETY: `host` points into guest memory, which outlives every use (the save or restore
// borrows the guest); threads touch distinct pages within a round, ordered by channels.
unsafe impl Send for RegionMap {}
// SAFETY: as above; the shared tables are atomics.
unsafe impl Sync for RegionMap {}

/// Whether `memory`'s regions are exactly `ranges`, in order.
pub(crate) fn same_layout(memory: &GuestMemory, ranges: &[livemig_wire::MemoryRange]) -> bool {
    memory.num_regions() == ranges.len()
        && memory
            .iter()
            .zip(ranges)
            .all(|(r, m)| r.start_addr().0 == m.guest_addr && r.len() == m.size)
}

impl RegionMap {
    /// The regions of `memory`, in order, with their pages at `data_offsets` in the file.
    pub fn of(memory: &GuestMemory, data_offsets: &[u64]) -> Vec<RegionMap> {
        let mut maps = Self::bare(memory, data_offsets);
        for m in &mut maps {
            m.present = (0..m.pages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect();
            m.crcs = (0..m.pages).map(|_| AtomicU32::new(0)).collect();
        }
        maps
    }

    /// The regions without their tables (an on-demand restore keeps them apart,
    /// [`super::tables::RegionTables`]).
    pub fn bare(memory: &GuestMemory, data_offsets: &[u64]) -> Vec<RegionMap> {
        memory
            .iter()
            .zip(data_offsets)
            .map(|(r, &data_offset)| {
                let pages = r.len() / PAGE_SIZE as u64;
                RegionMap {
                    guest_addr: r.start_addr().0,
                    pages,
                    host: r
                        .get_host_address(MemoryRegionAddress(0))
                        .unwrap_or(std::ptr::null_mut()),
                    data_offset,
                    present: Vec::new(),
                    crcs: Vec::new(),
                }
            })
            .collect()
    }

    /// The regions of `memory` with their pages at `data_offsets`, and each one's present
    /// bits and page CRCs as the file gives them (same lengths as [`RegionMap::of`] makes:
    /// the layout check saw to it). The tables are taken over, not copied.
    pub fn with_tables(
        memory: &GuestMemory,
        data_offsets: &[u64],
        tables: Vec<(Vec<u64>, Vec<u32>)>,
    ) -> Vec<RegionMap> {
        let mut maps = Self::bare(memory, data_offsets);
        for (m, (present, crcs)) in maps.iter_mut().zip(tables) {
            m.present = present.into_iter().map(AtomicU64::new).collect();
            m.crcs = crcs.into_iter().map(AtomicU32::new).collect();
        }
        maps
    }

    /// Host address of page `i` (i < pages).
    pub fn page(&self, i: u64) -> *mut u8 {
        self.host.wrapping_add((i * PAGE_SIZE as u64) as usize)
    }

    pub fn is_present(&self, i: u64) -> bool {
        self.present[(i / 64) as usize].load(Ordering::Relaxed) & (1 << (i % 64)) != 0
    }

    pub fn set_present(&self, i: u64, on: bool) {
        let w = &self.present[(i / 64) as usize];
        if on {
            w.fetch_or(1 << (i % 64), Ordering::Relaxed);
        } else {
            w.fetch_and(!(1 << (i % 64)), Ordering::Relaxed);
        }
    }

    /// The bitmap section's bytes.
    pub fn bitmap_bytes(&self) -> Vec<u8> {
        self.present
            .iter()
            .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
            .collect()
    }

    /// The page CRC section's bytes.
    pub fn crc_bytes(&self) -> Vec<u8> {
        self.crcs
            .iter()
            .flat_map(|c| c.load(Ordering::Relaxed).to_le_bytes())
            .collect()
    }
}
