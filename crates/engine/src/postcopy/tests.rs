//! Postcopy memory against the real kernel: userfaultfd in this process (it needs root, or
//! `CAP_SYS_PTRACE`; elsewhere each test says SKIPPED). The tests play every part: a thread
//! touching memory is a vCPU, the test's own thread the fault thread, installers the
//! receivers.

use super::*;
use crate::guest::GuestMemory;
use livemig_wire::PAGE_SIZE;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::Duration;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend};

const PAGE: u64 = PAGE_SIZE as u64;
/// The second region's first guest address: a gap after the first, so guest and host
/// addresses differ by a different amount in each region.
const HIGH: u64 = 1 << 32;
const REGION: usize = 8 << 20;
/// Long enough for any fault to arrive on a loaded machine; a test waiting this long failed.
const PATIENCE: Duration = Duration::from_secs(10);

/// 16 MiB in two regions, at 0 and at 4 GiB, anonymous.
fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(HIGH), REGION)]).unwrap()
}

/// The page content that identifies `addr` (and `version`, to tell a new copy from a stale
/// one).
fn pattern(addr: u64, version: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    for (i, word) in page.chunks_exact_mut(8).enumerate() {
        let v = (addr ^ (version << 56)).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64;
        word.copy_from_slice(&v.to_le_bytes());
    }
    page
}

fn word(page: &[u8; PAGE_SIZE], offset: usize) -> u64 {
    u64::from_le_bytes(page[offset..offset + 8].try_into().unwrap())
}

fn read_page(mem: &GuestMemory, addr: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    mem.read_slice(&mut page, GuestAddress(addr)).unwrap();
    page
}

/// Postcopy memory over `mem`, or `None` (the test says SKIPPED) where this host has no
/// userfaultfd for us.
fn postcopy_or_skip(mem: &GuestMemory) -> Option<PostcopyMemory<'_>> {
    match PostcopyMemory::new(mem) {
        Ok(pm) => Some(pm),
        Err(e) if e.is_unavailable() => {
            let thread = std::thread::current();
            let line = format!("{}: SKIPPED ({e})", thread.name().unwrap_or("a test"));
            eprintln!("{line}");
            if let Some(path) = std::env::var_os("LIVEMIG_SKIP_LOG") {
                use std::io::Write;
                if let Ok(mut f) = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                {
                    let _ = f.write_all(format!("{line}\n").as_bytes());
                }
            }
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Unregisters on a panic, so a failing test's blocked threads are released and the scope
/// that joins them does not hang.
struct ReleaseOnPanic<'a, 'm>(&'a PostcopyMemory<'m>);

impl Drop for ReleaseOnPanic<'_, '_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.0.unregister();
        }
    }
}

fn expect_fault(pm: &PostcopyMemory<'_>) -> Fault {
    pm.next_fault(PATIENCE)
        .unwrap()
        .expect("no fault within the patience")
}

#[test]
fn a_fault_is_answered_by_the_first_install_and_other_pages_never_fault() {
    let mem = memory();
    for base in [0, HIGH] {
        for page in 0..64 {
            let addr = base + page * PAGE;
            mem.write_slice(&pattern(addr, 0), GuestAddress(addr))
                .unwrap();
        }
    }
    let Some(pm) = postcopy_or_skip(&mem) else {
        return;
    };
    let discarded: Vec<u64> = (10..20)
        .map(|p| p * PAGE)
        .chain((5..8).map(|p| HIGH + p * PAGE))
        .collect();
    assert_eq!(pm.discard(discarded.iter().copied()).unwrap(), 13);

    let (mem, discarded) = (&mem, &discarded);
    std::thread::scope(|s| {
        let _release = ReleaseOnPanic(&pm);

        // A read of a discarded page in the high region blocks, and its fault names the
        // guest page, not the host address nor the byte read.
        let target = HIGH + 6 * PAGE;
        let reader = s.spawn(move || mem.read_obj::<u64>(GuestAddress(target + 24)).unwrap());
        let fault = expect_fault(&pm);
        assert_eq!((fault.addr, fault.write), (target, false));
        // The faulting thread is named: the reader, not this one.
        // SAFETY: gettid has no arguments and cannot fail.
        let me = unsafe { libc::gettid() } as u32;
        assert!(fault.thread != 0 && fault.thread != me, "{fault:?}");
        assert!(
            !reader.is_finished(),
            "the reader did not wait for the page"
        );
        let fresh = pattern(target, 1);
        assert_eq!(pm.install(target, &fresh).unwrap(), Installed::New);
        assert_eq!(reader.join().unwrap(), word(&fresh, 24));
        // The first copy wins: a second is dropped, whatever it holds.
        assert_eq!(
            pm.install(target, &pattern(target, 2)).unwrap(),
            Installed::AlreadyThere
        );
        assert_eq!(read_page(mem, target), fresh);

        // A write to a discarded page waits too, and lands on the installed page.
        let target = 12 * PAGE;
        let writer = s.spawn(move || mem.write_obj(0xdead_u64, GuestAddress(target + 8)));
        let fault = expect_fault(&pm);
        assert_eq!((fault.addr, fault.write), (target, true));
        let fresh = pattern(target, 1);
        assert_eq!(pm.install(target, &fresh).unwrap(), Installed::New);
        writer.join().unwrap().unwrap();
        let mut expected = fresh;
        expected[8..16].copy_from_slice(&0xdead_u64.to_le_bytes());
        assert_eq!(read_page(mem, target), expected);

        // A page precopy never wrote is missing as well: answered with a zero page, after
        // which neither a zero page nor data replaces it.
        let target = 1000 * PAGE;
        let reader = s.spawn(move || mem.read_obj::<u64>(GuestAddress(target)).unwrap());
        assert_eq!(expect_fault(&pm).addr, target);
        assert_eq!(pm.install_zero(target).unwrap(), Installed::New);
        assert_eq!(reader.join().unwrap(), 0);
        assert_eq!(pm.install_zero(target).unwrap(), Installed::AlreadyThere);
        assert_eq!(
            pm.install(target, &pattern(target, 1)).unwrap(),
            Installed::AlreadyThere
        );
        assert_eq!(read_page(mem, target), [0; PAGE_SIZE]);

        // Pages not discarded keep their precopy content and never fault.
        let reader = s.spawn(|| {
            for base in [0, HIGH] {
                for page in 0..64 {
                    let addr = base + page * PAGE;
                    if !discarded.contains(&addr) && addr != 12 * PAGE && addr != HIGH + 6 * PAGE {
                        assert_eq!(read_page(mem, addr), pattern(addr, 0), "{addr:#x}");
                    }
                }
            }
        });
        while !reader.is_finished() {
            if let Some(fault) = pm.next_fault(Duration::from_millis(50)).unwrap() {
                panic!("a page kept from precopy faulted: {fault:?}");
            }
        }
        reader.join().unwrap();
    });

    // Three faults answered, each wait recorded once.
    let latency = pm.latency().snapshot();
    assert_eq!(latency.count, 3);
    assert!(latency.max >= latency.p99 && latency.p99 >= latency.p50);
}

/// KVM reaches guest memory from the kernel (`get_user_pages`), not from user space. A
/// kernel access to a missing page must be reported and wait like a vCPU's: here the kernel
/// reads the page to send it over a socket.
#[test]
fn kernel_accesses_to_missing_pages_wait_for_the_install() {
    let mem = memory();
    let Some(pm) = postcopy_or_skip(&mem) else {
        return;
    };
    let target = HIGH + 100 * PAGE;
    let host = mem.get_host_address(GuestAddress(target)).unwrap() as usize;
    let (tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        let _release = ReleaseOnPanic(&pm);
        let sender = s.spawn(|| {
            // SAFETY: `host` is a whole page of guest memory, mapped for the test's length;
            // the kernel only reads it.
            unsafe { libc::write(tx.as_raw_fd(), host as *const libc::c_void, PAGE_SIZE) }
        });
        assert_eq!(expect_fault(&pm).addr, target);
        let fresh = pattern(target, 7);
        assert_eq!(pm.install(target, &fresh).unwrap(), Installed::New);
        assert_eq!(sender.join().unwrap(), PAGE_SIZE as isize);
        let mut got = [0u8; PAGE_SIZE];
        std::io::Read::read_exact(&mut rx, &mut got).unwrap();
        assert_eq!(got, fresh);
    });
}

/// A reader blocked on a missing page, with its fault read and never answered, is released
/// by `release`; returns what it read.
fn blocked_reader_released_by(release: impl FnOnce(PostcopyMemory<'_>)) -> Option<u64> {
    let mem = Arc::new(memory());
    let target = 3 * PAGE;
    mem.write_slice(&pattern(target, 0), GuestAddress(target))
        .unwrap();
    let pm = postcopy_or_skip(&mem)?;
    pm.discard([target]).unwrap();
    let (done, read) = mpsc::channel();
    // Not a scoped thread: if the release fails, the test fails instead of hanging in a join.
    std::thread::spawn({
        let mem = Arc::clone(&mem);
        move || done.send(mem.read_obj::<u64>(GuestAddress(target)).unwrap())
    });
    assert_eq!(expect_fault(&pm).addr, target);
    assert!(read.recv_timeout(Duration::from_millis(100)).is_err());
    release(pm);
    Some(
        read.recv_timeout(PATIENCE)
            .expect("the reader is still blocked"),
    )
}

#[test]
fn unregister_releases_a_blocked_reader_and_later_installs_fail() {
    let read = blocked_reader_released_by(|pm| {
        pm.unregister().unwrap();
        pm.unregister().unwrap(); // Idempotent.
        match pm.install(3 * PAGE, &pattern(3 * PAGE, 1)) {
            Err(PostcopyError::Install { addr, .. }) => assert_eq!(addr, 3 * PAGE),
            other => panic!("an install after unregister: {other:?}"),
        }
    });
    // Released, the reader got what anonymous memory holds when missing: zeros, not the
    // page. Teardown is for guests that never run again.
    assert!(matches!(read, None | Some(0)), "{read:?}");
}

#[test]
fn dropping_the_postcopy_memory_releases_a_blocked_reader() {
    let read = blocked_reader_released_by(|pm| drop(pm));
    assert!(matches!(read, None | Some(0)), "{read:?}");
}

/// Receivers install concurrently: two threads install every page (the same final copies,
/// as postcopy's are), each page is new exactly once, and a vCPU reading them all meanwhile,
/// with no fault thread at all, is woken by whichever install comes first.
#[test]
fn installs_from_two_threads_at_once_place_each_page_once() {
    const PAGES: u64 = 2048;
    let mem = memory();
    for page in 0..PAGES {
        mem.write_slice(&pattern(page * PAGE, 0), GuestAddress(page * PAGE))
            .unwrap();
    }
    let Some(pm) = postcopy_or_skip(&mem) else {
        return;
    };
    assert_eq!(pm.discard((0..PAGES).map(|p| p * PAGE)).unwrap(), PAGES);
    let new_by: Vec<AtomicU64> = (0..PAGES).map(|_| AtomicU64::new(0)).collect();
    // The vCPU and both installers start together.
    let start = Barrier::new(3);
    std::thread::scope(|s| {
        let _release = ReleaseOnPanic(&pm);
        let vcpu = s.spawn(|| {
            start.wait();
            // Strided, so it waits on pages in the middle of both installers' ways.
            for i in 0..PAGES {
                let addr = (i * 389 % PAGES) * PAGE;
                assert_eq!(read_page(&mem, addr), pattern(addr, 1), "{addr:#x}");
            }
        });
        let installers: Vec<_> = [false, true]
            .into_iter()
            .map(|reverse| {
                let (pm, new_by, start) = (&pm, &new_by, &start);
                s.spawn(move || {
                    start.wait();
                    let mut order: Vec<u64> = (0..PAGES).collect();
                    if reverse {
                        order.reverse();
                    }
                    for page in order {
                        let addr = page * PAGE;
                        if pm.install(addr, &pattern(addr, 1)).unwrap() == Installed::New {
                            new_by[page as usize].fetch_add(1 + reverse as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for installer in installers {
            installer.join().unwrap();
        }
        vcpu.join().unwrap();
    });
    let mut by = [0u64; 3];
    for (page, n) in new_by.iter().enumerate() {
        let n = n.load(Ordering::Relaxed);
        assert!(
            n == 1 || n == 2,
            "page {page} installed new {n} (1: forward, 2: reverse, else both or none)"
        );
        by[n as usize] += 1;
    }
    eprintln!(
        "pages installed new by the forward installer: {}, by the reverse one: {}",
        by[1], by[2]
    );
    for page in 0..PAGES {
        assert_eq!(read_page(&mem, page * PAGE), pattern(page * PAGE, 1));
    }
}

/// Memory backed by a memfd (local mode's guest memory) keeps discarded pages in the file
/// unless the file itself is punched: discard must remove them there, or the page would be
/// found again and never fault.
#[test]
fn discarding_memfd_backed_memory_makes_its_pages_fault() {
    // SAFETY: memfd_create with a valid C string; the descriptor is owned by the File made
    // from it at once.
    let file = unsafe {
        let fd = libc::memfd_create(c"livemig-postcopy-test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        std::fs::File::from_raw_fd(fd)
    };
    file.set_len(REGION as u64).unwrap();
    let mem = GuestMemory::from_ranges_with_files([(
        GuestAddress(0),
        REGION,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    let target = 17 * PAGE;
    mem.write_slice(&pattern(target, 0), GuestAddress(target))
        .unwrap();
    mem.write_slice(&pattern(target + PAGE, 0), GuestAddress(target + PAGE))
        .unwrap();
    let Some(pm) = postcopy_or_skip(&mem) else {
        return;
    };
    pm.discard([target]).unwrap();
    std::thread::scope(|s| {
        let _release = ReleaseOnPanic(&pm);
        let reader = s.spawn(|| read_page(&mem, target));
        assert_eq!(expect_fault(&pm).addr, target);
        assert_eq!(
            pm.install(target, &pattern(target, 1)).unwrap(),
            Installed::New
        );
        assert_eq!(reader.join().unwrap(), pattern(target, 1));
        // Its neighbour was kept.
        assert_eq!(read_page(&mem, target + PAGE), pattern(target + PAGE, 0));
        assert_eq!(pm.next_fault(Duration::ZERO).unwrap(), None);
    });
}

#[test]
fn addresses_outside_guest_memory_or_unaligned_are_refused() {
    let mem = memory();
    let Some(pm) = postcopy_or_skip(&mem) else {
        return;
    };
    let refused = |r: Result<_, PostcopyError>, at: u64| match r {
        Err(PostcopyError::NotAPage { addr, .. }) => assert_eq!(addr, at),
        other => panic!("{at:#x}: {other:?}"),
    };
    refused(pm.discard([PAGE, 2 * PAGE + 8]).map(|_| ()), 2 * PAGE + 8);
    refused(pm.discard([REGION as u64]).map(|_| ()), REGION as u64);
    refused(
        pm.install(HIGH + REGION as u64, &[0; PAGE_SIZE])
            .map(|_| ()),
        HIGH + REGION as u64,
    );
    refused(pm.install_zero(HIGH - PAGE).map(|_| ()), HIGH - PAGE);
    assert_eq!(pm.next_fault(Duration::from_millis(1)).unwrap(), None);
}
