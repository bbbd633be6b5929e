//! The on-demand restore (Firecracker's way, on the postcopy fault path): guest memory is
//! put under userfaultfd ([`crate::postcopy::PostcopyMemory`]) before anything runs, the
//! devices and the guest's state are loaded, and the guest resumes at once, before any page
//! is read. A page the guest (or the VMM) touches first faults: the fault thread reads it
//! from the file (or installs a zero page for a hole) and installs it with `UFFDIO_COPY`.
//! From the resume one background thread reads every present page in file order and installs it;
//! whichever copy comes first is the page (the kernel refuses the second, so a page the
//! guest wrote since is never overwritten). Once every present page is in, the memory is
//! unregistered: the holes left are zero pages, as the file says.
//!
//! ```text
//! register memory --> fault thread | device loaders --> small devices, state
//!   --> resume (the guest runs, faulting on what is not in yet) | fill thread --> fill done
//!   --> unregister --> check (if asked) --> done
//! ```

use super::devices::load_device;
use super::io::{pread_exact, RegionMap};
use super::pages::BATCH_PAGES;
use super::restore::{checked, load_state, resumes, Checked, Loaded};
use super::save::wait;
use super::FileError;
use super::RestoreConfig;
use crate::cancel::CancelToken;
use crate::device::{Device, VmState};
use crate::guest::Guest;
use crate::postcopy::PostcopyMemory;
use crate::runtime::Runtime;
use livemig_wire::PAGE_SIZE;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the threads share.
struct Shared<'a> {
    path: &'a Path,
    c: &'a Checked,
    regions: &'a [RegionMap],
    memory: &'a PostcopyMemory<'a>,
    cancel: &'a CancelToken,
    /// Set once the memory is unregistered: the fault thread ends.
    stop: AtomicBool,
    faults: AtomicU64,
}

/// Restores on demand; see the module docs.
pub(super) fn run(
    path: &Path,
    c: &Checked,
    regions: &[RegionMap],
    guest: &dyn Guest,
    devices: &[Box<dyn Device>],
    vmstates: &[Box<dyn VmState>],
    config: &RestoreConfig,
) -> Result<Loaded, FileError> {
    let memory = PostcopyMemory::new(guest.memory()).map_err(FileError::OnDemand)?;
    let sh = Shared {
        path,
        c,
        regions,
        memory: &memory,
        cancel: &config.cancel,
        stop: AtomicBool::new(false),
        faults: AtomicU64::new(0),
    };
    let sh = &sh;
    std::thread::scope(|scope| {
        let rt = Runtime::new(scope, "lm-rst", config.cancel.clone());
        let threads = rt.completions();
        // Raised priority, as postcopy's fault thread: a vCPU waits on every fault it serves.
        let (fault_tx, fault_rx) = crossbeam_channel::bounded(1);
        rt.spawn_favoured("fault", move || {
            if let Err(e) = sh.serve_faults() {
                let _ = fault_tx.send(e);
                sh.cancel.cancel();
            }
        });
        let dev_rx = start_device_loads(&rt, sh, devices);
        let r = (|| {
            let mut device_bytes = 0;
            for _ in devices {
                device_bytes += wait(&dev_rx, &threads, sh.cancel)??;
            }
            load_state(c, guest, vmstates)?;
            let resume = resumes(config, c);
            let resumed = resume.then(Instant::now);
            if resume {
                guest.resume()?;
            }
            // The rest is read once the guest runs: until then it would only compete with
            // the devices' loading, which the guest waits for.
            let (fill_tx, fill_rx) = crossbeam_channel::bounded(1);
            rt.submit("fill", move || {
                let _ = fill_tx.send(sh.fill());
                Ok(())
            });
            let pages = wait(&fill_rx, &threads, sh.cancel)??;
            memory.unregister().map_err(FileError::OnDemand)?;
            sh.stop.store(true, Ordering::Release);
            let verify = match config.verify {
                true => Some(check(guest, resume)?),
                false => None,
            };
            Ok(Loaded {
                pages,
                device_bytes,
                verify,
                faults: sh.faults.load(Ordering::Relaxed),
                resumed,
            })
        })();
        sh.stop.store(true, Ordering::Release);
        let failure = rt.teardown(r.is_err());
        // A failed fault thread cancels the restore: its error (in the channel once the
        // thread is joined) is the one to tell.
        let r = match fault_rx.try_recv() {
            Ok(e) => Err(e),
            Err(_) => r,
        };
        match (r, failure) {
            (Ok(v), None) => Ok(v),
            (Ok(_), Some(f)) => Err(FileError::Job(f)),
            (Err(e), _) => Err(e),
        }
    })
}

/// Every device's stream loaded in order, each on a job of its own (`lm-rst-dev{i}`); their
/// results come on the channel returned.
fn start_device_loads<'scope>(
    rt: &Runtime<'scope, '_>,
    sh: &'scope Shared<'scope>,
    devices: &'scope [Box<dyn Device>],
) -> crossbeam_channel::Receiver<Result<u64, FileError>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    for (i, d) in devices.iter().enumerate() {
        let tx = tx.clone();
        let c = sh.c;
        let name = &c.header.devices[i].device.name;
        rt.submit(&format!("dev{i}"), move || {
            let r = load_device(&c.file, sh.path, name, &**d, &c.chunks[i], sh.cancel);
            let _ = tx.send(r);
            Ok(())
        });
    }
    rx
}

/// Checks every page of a guest that may be running (paused for the check).
fn check(guest: &dyn Guest, running: bool) -> Result<crate::guest::VerifyReport, FileError> {
    if running {
        guest.pause()?;
    }
    let v = guest.verify();
    if running {
        guest.resume()?;
    }
    checked(v?)
}

impl Shared<'_> {
    /// The region and page index of guest address `addr`.
    fn locate(&self, addr: u64) -> Option<(&RegionMap, u64)> {
        self.regions.iter().find_map(|r| {
            let off = addr.checked_sub(r.guest_addr)?;
            (off < r.pages * PAGE_SIZE as u64).then_some((r, off / PAGE_SIZE as u64))
        })
    }

    /// Checks `data`, page `i` of `r` as read from the file, against its CRC32C.
    fn check_page(&self, r: &RegionMap, i: u64, data: &[u8]) -> Result<(), FileError> {
        let expected = r.crcs[i as usize].load(Ordering::Relaxed);
        let found = crc32c::crc32c(data);
        match found == expected {
            true => Ok(()),
            false => Err(FileError::PageCorrupted {
                path: self.path.to_path_buf(),
                addr: r.guest_addr + i * PAGE_SIZE as u64,
                expected,
                found,
            }),
        }
    }

    /// The fault thread: each missing page touched is read from the file and installed (a
    /// hole as a zero page), until the memory is unregistered.
    fn serve_faults(&self) -> Result<(), FileError> {
        let mut page = Box::new([0u8; PAGE_SIZE]);
        while !self.stop.load(Ordering::Acquire) && !self.cancel.is_cancelled() {
            let fault = self.memory.next_fault(Duration::from_millis(20));
            let Some(f) = fault.map_err(FileError::OnDemand)? else {
                continue;
            };
            self.faults.fetch_add(1, Ordering::Relaxed);
            let Some((r, i)) = self.locate(f.addr) else {
                continue;
            };
            let installed = match r.is_present(i) {
                true => {
                    let at = r.data_offset + i * PAGE_SIZE as u64;
                    // SAFETY: `page` is our own buffer of PAGE_SIZE bytes.
                    unsafe { pread_exact(&self.c.file, page.as_mut_ptr(), PAGE_SIZE, at) }
                        .map_err(|e| FileError::io("read a faulting page", self.path, e))?;
                    self.check_page(r, i, &page[..])?;
                    self.memory.install(f.addr, &page)
                }
                false => self.memory.install_zero(f.addr),
            };
            installed.map_err(FileError::OnDemand)?;
        }
        Ok(())
    }

    /// The background thread: every present page, in file order, read in runs and
    /// installed unless the guest faulted it in first. Returns the pages read.
    fn fill(&self) -> Result<u64, FileError> {
        let mut buf = vec![0u8; BATCH_PAGES * PAGE_SIZE];
        let mut pages = 0;
        for r in self.regions {
            let mut i = 0;
            while i < r.pages {
                if self.cancel.is_cancelled() {
                    return Err(FileError::Cancelled);
                }
                if !r.is_present(i) {
                    i += 1;
                    continue;
                }
                let mut n = 1;
                while i + n < r.pages && n < BATCH_PAGES as u64 && r.is_present(i + n) {
                    n += 1;
                }
                let at = r.data_offset + i * PAGE_SIZE as u64;
                let len = n as usize * PAGE_SIZE;
                // SAFETY: `buf` is our own buffer of BATCH_PAGES pages, n <= BATCH_PAGES.
                unsafe { pread_exact(&self.c.file, buf.as_mut_ptr(), len, at) }
                    .map_err(|e| FileError::io("read guest pages", self.path, e))?;
                for (k, data) in buf[..len].chunks_exact(PAGE_SIZE).enumerate() {
                    let page = i + k as u64;
                    self.check_page(r, page, data)?;
                    let data: &[u8; PAGE_SIZE] = data.try_into().unwrap_or(&[0; PAGE_SIZE]);
                    let addr = r.guest_addr + page * PAGE_SIZE as u64;
                    self.memory
                        .install(addr, data)
                        .map_err(FileError::OnDemand)?;
                }
                pages += n;
                i += n;
            }
        }
        Ok(pages)
    }
}
