//! [`PostcopyMemory`]: destination guest memory under userfaultfd, missing-page mode.
//!
//! Every region of the guest is registered with one userfaultfd. A page with no page-table
//! entry (never written, or discarded) blocks whoever touches it, a vCPU inside `KVM_RUN` or a
//! VMM thread, until a page is installed there with `UFFDIO_COPY` (data) or `UFFDIO_ZEROPAGE`
//! (zeros), which also wakes the waiters. A page with an entry is never reported again, and an
//! install over it fails with `EEXIST` ([`Installed::AlreadyThere`]): the first copy wins.
//! The module docs (`postcopy/mod.rs`) say who calls what.

use super::latency::{FaultLatency, FaultStamps};
use crate::guest::GuestMemory;
use livemig_wire::PAGE_SIZE;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use userfaultfd::{Event, FeatureFlags, IoctlFlags, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const PAGE: u64 = PAGE_SIZE as u64;

/// How many times an install is retried when the kernel answers `EAGAIN` (the address space
/// was changing under it: an `mremap`, `fork` or `madvise` in flight) before giving up.
const EAGAIN_RETRIES: u32 = 1000;

/// An error of postcopy memory, naming the operation and the guest address.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// The userfaultfd could not be created: no kernel support (`ENOSYS`), or not allowed
    /// (`EPERM`: handling faults of kernel accesses, which KVM's are, takes `CAP_SYS_PTRACE`
    /// or `vm.unprivileged_userfaultfd = 1`).
    #[error("userfaultfd unavailable: {0}")]
    Create(#[source] userfaultfd::Error),
    /// A guest region could not be registered (e.g. a mapping userfaultfd does not support).
    #[error("registering guest memory {addr:#x}+{len:#x} with userfaultfd: {source}")]
    Register {
        /// The region's first guest address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// What the kernel said.
        #[source]
        source: userfaultfd::Error,
    },
    /// A region was registered but the kernel offers no `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` or
    /// `UFFDIO_WAKE` on it.
    #[error("guest memory {addr:#x}+{len:#x} under userfaultfd lacks {missing:?}")]
    Unsupported {
        /// The region's first guest address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// The operations it lacks.
        missing: IoctlFlags,
    },
    /// A region is not a whole number of pages.
    #[error("guest memory {addr:#x}+{len:#x} is not page-aligned")]
    Unaligned {
        /// The region's first guest address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// An address given to an operation is not a page-aligned guest page.
    #[error("{op} of guest page {addr:#x}: not a page-aligned address in guest memory")]
    NotAPage {
        /// The operation (`"discard"`, `"UFFDIO_COPY"`, `"UFFDIO_ZEROPAGE"`).
        op: &'static str,
        /// The address given.
        addr: u64,
    },
    /// `madvise` refused to discard pages.
    #[error("discarding guest pages {addr:#x}+{len:#x}: {source}")]
    Discard {
        /// The first guest address of the run.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A page could not be installed (after [`PostcopyMemory::unregister`]: `ENOENT`).
    #[error("{op} of guest page {addr:#x}: {source}")]
    Install {
        /// `"UFFDIO_COPY"` or `"UFFDIO_ZEROPAGE"`.
        op: &'static str,
        /// The guest page.
        addr: u64,
        /// What the kernel said.
        #[source]
        source: userfaultfd::Error,
    },
    /// A region could not be unregistered.
    #[error("unregistering guest memory {addr:#x}+{len:#x} from userfaultfd: {source}")]
    Unregister {
        /// The region's first guest address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
        /// What the kernel said.
        #[source]
        source: userfaultfd::Error,
    },
    /// `poll` on the userfaultfd failed.
    #[error("polling the userfaultfd: {0}")]
    Poll(#[source] io::Error),
    /// Reading an event from the userfaultfd failed.
    #[error("reading the userfaultfd: {0}")]
    Read(#[source] userfaultfd::Error),
    /// The kernel reported a fault outside every registered region (a kernel or livemig bug).
    #[error("userfaultfd reported a fault at host address {host:#x}, outside guest memory")]
    FaultOutside {
        /// The host address reported.
        host: u64,
    },
}

impl PostcopyError {
    /// Whether this is userfaultfd being unavailable on this host (no kernel support, or not
    /// permitted), as opposed to a failure of a working one.
    pub fn is_unavailable(&self) -> bool {
        match self {
            PostcopyError::Create(userfaultfd::Error::SystemError(e)) => {
                matches!(*e as i32, libc::EPERM | libc::ENOSYS | libc::EACCES)
            }
            PostcopyError::Create(userfaultfd::Error::OpenDevUserfaultfd(e)) => matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::ENOSYS | libc::EACCES)
            ),
            _ => false,
        }
    }
}

/// What an install found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installed {
    /// The page was missing and now holds the data; its waiters were woken.
    New,
    /// The page was there already (installed by another thread, or never discarded): this
    /// copy was dropped, the page is unchanged.
    AlreadyThere,
}

/// A page fault read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The guest physical address of the faulting page (page-aligned).
    pub addr: u64,
    /// Whether the access was a write.
    pub write: bool,
    /// The faulting thread's id (`gettid`).
    pub thread: u32,
}

/// One registered region: where it is in the guest and in this process.
#[derive(Debug)]
struct Region {
    guest: u64,
    /// The host address of its first byte (an address, not a pointer: `PostcopyMemory` is
    /// shared between threads, and every access goes through the kernel).
    host: usize,
    len: u64,
    /// Backed by a shared file (a memfd): discarding must punch the file (`MADV_REMOVE`),
    /// `MADV_DONTNEED` only drops this mapping's view of pages the file keeps.
    shared: bool,
    /// The index of its first page among all the guest's pages (for [`FaultStamps`]).
    first_page: usize,
}

/// Guest memory under userfaultfd on the destination during postcopy.
///
/// Borrows the guest memory it registered, so it cannot outlive the mapping. All methods take
/// `&self` and may run on many threads at once. Dropping it unregisters every region (see
/// [`PostcopyMemory::unregister`]), then closes the userfaultfd.
#[derive(Debug)]
pub struct PostcopyMemory<'m> {
    uffd: Uffd,
    regions: Vec<Region>,
    registered: AtomicBool,
    stamps: FaultStamps,
    latency: FaultLatency,
    _memory: PhantomData<&'m GuestMemory>,
}

impl<'m> PostcopyMemory<'m> {
    /// Creates a userfaultfd (non-blocking, close-on-exec, handling kernel-mode faults too:
    /// KVM reaches guest memory from the kernel, through `get_user_pages`, and a user-mode-only
    /// userfaultfd fails those accesses instead of reporting them; KVM then turns the guest's
    /// access into an MMIO exit at that address, silently, as seen on Linux 6.18) and
    /// registers every region of `memory` in missing mode. Pages already present stay as they
    /// are; every missing page faults from now on.
    pub fn new(memory: &'m GuestMemory) -> Result<Self, PostcopyError> {
        let uffd = UffdBuilder::new()
            .require_features(FeatureFlags::THREAD_ID)
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(PostcopyError::Create)?;
        let mut regions = Vec::new();
        let mut pages = 0;
        for r in memory.iter() {
            let (guest, len) = (r.start_addr().0, r.len());
            if !guest.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
                return Err(PostcopyError::Unaligned { addr: guest, len });
            }
            let host = r.get_host_address(MemoryRegionAddress(0)).map_err(|_| {
                PostcopyError::NotAPage {
                    op: "register",
                    addr: guest,
                }
            })?;
            regions.push(Region {
                guest,
                host: host as usize,
                len,
                shared: r.file_offset().is_some(),
                first_page: pages,
            });
            pages += (len / PAGE) as usize;
        }
        let this = PostcopyMemory {
            uffd,
            regions,
            registered: AtomicBool::new(true),
            stamps: FaultStamps::new(pages),
            latency: FaultLatency::default(),
            _memory: PhantomData,
        };
        // On an error below, dropping `this` unregisters every region (errors ignored, for
        // those not registered yet) and closes the userfaultfd.
        let needed = IoctlFlags::COPY | IoctlFlags::ZEROPAGE | IoctlFlags::WAKE;
        for r in &this.regions {
            let ioctls = this
                .uffd
                .register(r.host as *mut libc::c_void, r.len as usize)
                .map_err(|source| PostcopyError::Register {
                    addr: r.guest,
                    len: r.len,
                    source,
                })?;
            if !ioctls.contains(needed) {
                return Err(PostcopyError::Unsupported {
                    addr: r.guest,
                    len: r.len,
                    missing: needed - ioctls,
                });
            }
        }
        Ok(this)
    }

    /// The region holding the whole page at guest address `addr`, and the page's host
    /// address and index among the guest's pages.
    fn page(&self, op: &'static str, addr: u64) -> Result<(&Region, usize, usize), PostcopyError> {
        if addr.is_multiple_of(PAGE) {
            for r in &self.regions {
                if addr >= r.guest && addr - r.guest < r.len {
                    let offset = addr - r.guest;
                    let index = r.first_page + (offset / PAGE) as usize;
                    return Ok((r, r.host + offset as usize, index));
                }
            }
        }
        Err(PostcopyError::NotAPage { op, addr })
    }

    /// Drops the pages at the guest addresses `addrs` (stale copies from precopy that the
    /// source will send again), so that the next access to each faults. Runs of consecutive
    /// addresses (ascending, within one region) are discarded with one `madvise` each.
    /// Returns the number of pages discarded.
    ///
    /// Only before the guest runs here and before any page is installed: a page discarded
    /// after its install would lose the only copy of it that counts.
    pub fn discard(&self, addrs: impl IntoIterator<Item = u64>) -> Result<u64, PostcopyError> {
        let mut run: Option<(&Region, u64, u64)> = None; // region, first guest address, bytes
        let mut pages = 0;
        for addr in addrs {
            let (region, _, _) = self.page("discard", addr)?;
            pages += 1;
            match &mut run {
                Some((r, start, len)) if std::ptr::eq(*r, region) && *start + *len == addr => {
                    *len += PAGE;
                }
                _ => {
                    if let Some((r, start, len)) = run.replace((region, addr, PAGE)) {
                        discard_run(r, start, len)?;
                    }
                }
            }
        }
        if let Some((r, start, len)) = run {
            discard_run(r, start, len)?;
        }
        Ok(pages)
    }

    /// Installs `data` as the page at guest address `addr` with `UFFDIO_COPY` (atomically:
    /// no access sees the page half-written) and wakes whoever waits on it. If the page is
    /// there already, nothing is written ([`Installed::AlreadyThere`]).
    pub fn install(&self, addr: u64, data: &[u8; PAGE_SIZE]) -> Result<Installed, PostcopyError> {
        const OP: &str = "UFFDIO_COPY";
        let (_, host, index) = self.page(OP, addr)?;
        self.retry(OP, addr, index, || {
            // SAFETY: `host` is a page of a region registered with this userfaultfd, inside a
            // mapping that outlives `self` (the `'m` borrow). UFFDIO_COPY writes it only if no
            // page is mapped there, atomically, from `data`, a readable page-sized buffer;
            // guest memory is only ever accessed volatile or by the guest, never through Rust
            // references that a write could invalidate.
            unsafe {
                self.uffd
                    .copy(data.as_ptr().cast(), host as *mut _, PAGE_SIZE, true)
            }
        })
    }

    /// Installs a zero page at guest address `addr` with `UFFDIO_ZEROPAGE` (the shared zero
    /// page until the guest writes it, so no memory is used) and wakes whoever waits on it.
    /// If the page is there already, nothing changes ([`Installed::AlreadyThere`]).
    pub fn install_zero(&self, addr: u64) -> Result<Installed, PostcopyError> {
        const OP: &str = "UFFDIO_ZEROPAGE";
        let (_, host, index) = self.page(OP, addr)?;
        self.retry(OP, addr, index, || {
            // SAFETY: as in `install`: a registered page of a live mapping, filled with zeros
            // by the kernel only if it is missing.
            unsafe { self.uffd.zeropage(host as *mut _, PAGE_SIZE, true) }
        })
    }

    /// Runs an install until the kernel stops answering `EAGAIN`; maps `EEXIST`; records the
    /// wait of the fault it answers.
    fn retry(
        &self,
        op: &'static str,
        addr: u64,
        index: usize,
        mut ioctl: impl FnMut() -> userfaultfd::Result<usize>,
    ) -> Result<Installed, PostcopyError> {
        let mut again = 0;
        loop {
            let source = match ioctl() {
                Ok(_) => {
                    if let Some((wait, tid)) = self.stamps.take(index) {
                        self.latency.record(wait, tid);
                    }
                    return Ok(Installed::New);
                }
                Err(userfaultfd::Error::CopyFailed(e) | userfaultfd::Error::ZeropageFailed(e))
                    if e as i32 == libc::EEXIST =>
                {
                    // The installer that won recorded the wait, unless the fault was read
                    // after its install (it raced with it): drop that stale stamp.
                    self.stamps.take(index);
                    return Ok(Installed::AlreadyThere);
                }
                Err(userfaultfd::Error::PartiallyCopied(_)) if again < EAGAIN_RETRIES => {
                    again += 1;
                    std::thread::yield_now();
                    continue;
                }
                Err(userfaultfd::Error::ZeropageFailed(e))
                    if e as i32 == libc::EAGAIN && again < EAGAIN_RETRIES =>
                {
                    again += 1;
                    std::thread::yield_now();
                    continue;
                }
                Err(source) => source,
            };
            return Err(PostcopyError::Install { op, addr, source });
        }
    }

    /// Waits up to `timeout` for a page fault and returns its guest page, or `None` if none
    /// came. Other events are skipped (none are asked for). A fault read here is stamped, and
    /// the install that answers it records the wait in [`PostcopyMemory::latency`].
    ///
    /// A fault is read once: the reader must get the page installed, or its vCPU waits
    /// until the memory is unregistered. One page may be reported more than once: by two
    /// vCPUs, or by one that a signal took out of `KVM_RUN` while it waited and that faults
    /// again on re-entering; the caller asks the source for a page once.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, PostcopyError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.uffd.read_event().map_err(PostcopyError::Read)? {
                Some(Event::Pagefault {
                    addr,
                    rw,
                    thread_id,
                    ..
                }) => {
                    let host = addr as usize & !(PAGE_SIZE - 1);
                    let Some(r) = self
                        .regions
                        .iter()
                        .find(|r| host >= r.host && ((host - r.host) as u64) < r.len)
                    else {
                        return Err(PostcopyError::FaultOutside { host: host as u64 });
                    };
                    let offset = (host - r.host) as u64;
                    let tid = u32::try_from(thread_id.as_raw()).unwrap_or(0);
                    self.stamps
                        .stamp(r.first_page + (offset / PAGE) as usize, tid);
                    return Ok(Some(Fault {
                        addr: r.guest + offset,
                        write: rw == userfaultfd::ReadWrite::Write,
                        thread: tid,
                    }));
                }
                Some(_) => continue,
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !poll_readable(self.uffd.as_raw_fd(), left)? {
                return Ok(None);
            }
        }
    }

    /// The fault latency histogram: each fault read by [`PostcopyMemory::next_fault`] to
    /// the install of its page.
    pub fn latency(&self) -> &FaultLatency {
        &self.latency
    }

    /// Unregisters every region: whoever waits on a fault is woken and, from then on, a
    /// missing page is filled as ordinary memory would be (zeros for anonymous memory, the
    /// file's page for a memfd), so nothing blocks again but what it reads is not the
    /// source's page. For teardown only: after a completed postcopy (every page installed,
    /// nothing missing) or a failed one whose guest will never run again. Installs after it
    /// fail (`ENOENT`). Idempotent; also done by drop.
    pub fn unregister(&self) -> Result<(), PostcopyError> {
        if !self.registered.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let mut first_error = None;
        for r in &self.regions {
            if let Err(source) = self
                .uffd
                .unregister(r.host as *mut libc::c_void, r.len as usize)
            {
                first_error.get_or_insert(PostcopyError::Unregister {
                    addr: r.guest,
                    len: r.len,
                    source,
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for PostcopyMemory<'_> {
    fn drop(&mut self) {
        // Closing the userfaultfd alone would release the waiters too (the kernel unregisters
        // a released userfaultfd's ranges and wakes them); unregistering first makes the order
        // explicit and the error visible to a caller of `unregister`.
        let _ = self.unregister();
    }
}

/// Discards `len` bytes of guest memory from guest address `start` in region `r`.
fn discard_run(r: &Region, start: u64, len: u64) -> Result<(), PostcopyError> {
    let advice = if r.shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let host = r.host + (start - r.guest) as usize;
    // SAFETY: [host, host + len) lies inside the region's mapping (checked page by page by
    // `PostcopyMemory::page`), which outlives the caller's borrow. Dropping pages changes only
    // their content (they read as missing), never the mapping; guest memory is not reached
    // through Rust references.
    let rc = unsafe { libc::madvise(host as *mut libc::c_void, len as usize, advice) };
    if rc != 0 {
        return Err(PostcopyError::Discard {
            addr: start,
            len,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Waits up to `timeout` for `fd` to be readable; false on timeout.
fn poll_readable(fd: RawFd, timeout: Duration) -> Result<bool, PostcopyError> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Rounded up, so a short timeout still waits rather than spinning.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, for the length of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(true) // Look again; the caller's deadline still holds.
            } else {
                Err(PostcopyError::Poll(e))
            }
        }
    }
}
