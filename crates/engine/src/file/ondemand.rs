//! The on-demand restore (Firecracker's way, on the postcopy fault path): guest memory is
//! put under userfaultfd ([`crate::postcopy::PostcopyMemory`]) before anything runs, the
//! devices and the guest's state are loaded, and the guest resumes at once, before any page
//! is read, and before the regions' tables are: only their groups sections are read and
//! checked before ([`super::tables`]). A page the guest (or the VMM) touches first faults:
//! the fault thread reads its group's tables if not read yet (checking them), then the page
//! (checking its CRC32C), or installs a zero page for a hole, with `UFFDIO_COPY`. From the
//! resume one background thread reads every present page in file order, group by group, and
//! installs it;
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
use super::io::{pread_exact, Page, RegionMap};
use super::pages::BATCH_PAGES;
use super::restore::{checked, load_state, resumes, Checked, Loaded};
use super::save::wait;
use super::tables::{Group, RegionTables};
use super::FileError;
use super::RestoreConfig;
use crate::cancel::CancelToken;
use crate::device::{Device, VmState};
use crate::guest::Guest;
use crate::postcopy::PostcopyMemory;
use crate::runtime::Runtime;
use livemig_wire::file::GROUP_PAGES;
use livemig_wire::PAGE_SIZE;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What an on-demand restore works on: the guest and devices built, the regions' places
/// and their tables (read on first use).
pub(super) struct Parts<'a> {
    pub regions: &'a [RegionMap],
    pub tables: &'a [RegionTables],
    pub guest: &'a dyn Guest,
    pub devices: &'a [Box<dyn Device>],
    pub vmstates: &'a [Box<dyn VmState>],
}

/// What the threads share.
struct Shared<'a> {
    path: &'a Path,
    c: &'a Checked,
    regions: &'a [RegionMap],
    tables: &'a [RegionTables],
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
    parts: Parts<'_>,
    config: &RestoreConfig,
) -> Result<Loaded, FileError> {
    let (guest, devices, vmstates) = (parts.guest, parts.devices, parts.vmstates);
    let memory = PostcopyMemory::new(guest.memory()).map_err(FileError::OnDemand)?;
    let sh = Shared {
        path,
        c,
        regions: parts.regions,
        tables: parts.tables,
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
    /// The region index and page index of guest address `addr`.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(k, r)| {
            let off = addr.checked_sub(r.guest_addr)?;
            (off < r.pages * PAGE_SIZE as u64).then_some((k, off / PAGE_SIZE as u64))
        })
    }

    /// Checks `data`, page `i` of `r` as read from the file, against `expected`, its
    /// CRC32C in the (checked) tables.
    fn check_page(
        &self,
        r: &RegionMap,
        i: u64,
        expected: u32,
        data: &[u8],
    ) -> Result<(), FileError> {
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
        let mut page = Page::buffer(1);
        while !self.stop.load(Ordering::Acquire) && !self.cancel.is_cancelled() {
            let fault = self.memory.next_fault(Duration::from_millis(20));
            let Some(f) = fault.map_err(FileError::OnDemand)? else {
                continue;
            };
            self.faults.fetch_add(1, Ordering::Relaxed);
            let Some((k, i)) = self.locate(f.addr) else {
                continue;
            };
            let r = &self.regions[k];
            let installed = match self.tables[k].page(&self.c.file, self.path, i)? {
                Some(crc) => {
                    let at = r.data_offset + i * PAGE_SIZE as u64;
                    // SAFETY: `page` is our own buffer of one page.
                    unsafe { pread_exact(&self.c.pages, page.as_mut_ptr().cast(), PAGE_SIZE, at) }
                        .map_err(|e| FileError::io("read a faulting page", self.path, e))?;
                    self.check_page(r, i, crc, &page[0].0)?;
                    self.memory.install(f.addr, &page[0].0)
                }
                None => self.memory.install_zero(f.addr),
            };
            installed.map_err(FileError::OnDemand)?;
        }
        Ok(())
    }

    /// The background thread: every present page, in file order, group by group, read in
    /// runs and installed unless the guest faulted it in first. Returns the pages read.
    fn fill(&self) -> Result<u64, FileError> {
        let mut buf = Page::buffer(BATCH_PAGES);
        let mut pages = 0;
        for (r, tables) in self.regions.iter().zip(self.tables) {
            for g in 0..tables.len() {
                if self.cancel.is_cancelled() {
                    return Err(FileError::Cancelled);
                }
                let group = tables.group(&self.c.file, self.path, g)?;
                let (first, n) = tables.span(g);
                let mut k = 0;
                while k < n {
                    let run = present_run(group, k, n);
                    if run > 0 {
                        self.fill_run(r, group, first + k, run, &mut buf)?;
                        pages += run;
                    }
                    k += run.max(1);
                }
            }
        }
        Ok(pages)
    }

    /// Reads `run` pages of `r` from page `from` on (all present, all in `group`, at most
    /// [`BATCH_PAGES`]) into `buf`, checks each against `group`'s CRC32Cs and installs it.
    fn fill_run(
        &self,
        r: &RegionMap,
        group: &Group,
        from: u64,
        run: u64,
        buf: &mut [Page],
    ) -> Result<(), FileError> {
        let at = r.data_offset + from * PAGE_SIZE as u64;
        let run = (run as usize).min(buf.len());
        // SAFETY: `buf` is our own buffer of at least `run` pages.
        unsafe { pread_exact(&self.c.pages, buf.as_mut_ptr().cast(), run * PAGE_SIZE, at) }
            .map_err(|e| FileError::io("read guest pages", self.path, e))?;
        for (j, Page(data)) in buf[..run].iter().enumerate() {
            let i = from + j as u64;
            let expected = group.page(i % GROUP_PAGES).unwrap_or(0);
            self.check_page(r, i, expected, data)?;
            let addr = r.guest_addr + i * PAGE_SIZE as u64;
            self.memory
                .install(addr, data)
                .map_err(FileError::OnDemand)?;
        }
        Ok(())
    }
}

/// Present pages of `group` from its page `k` on (at most [`BATCH_PAGES`], and not past
/// its `n` pages): 0 if page `k` is a hole.
fn present_run(group: &Group, k: u64, n: u64) -> u64 {
    let mut run = 0;
    while k + run < n && run < BATCH_PAGES as u64 && group.page(k + run).is_some() {
        run += 1;
    }
    run
}
