//! Postcopy on the destination: guest memory that the guest may run on before all of it has
//! arrived (DESIGN.md section 8, issue 15).
//!
//! # What postcopy needs from memory
//!
//! At the switch the source pauses the guest, sends its state and the list of pages the
//! destination does not have yet (dirtied since they were last sent), and the destination
//! resumes the guest at once. From then on a guest access to a page it does not have must
//! stop the accessing vCPU, not read a stale or zero page, until that page has arrived; pages
//! arrive both on request (a vCPU waits) and by the background push, in any order, possibly
//! twice (requested while already on its way). [`PostcopyMemory`] gives that with
//! userfaultfd in missing-page mode:
//!
//! - [`PostcopyMemory::new`] registers every region. Pages precopy wrote stay mapped and never
//!   fault.
//! - [`PostcopyMemory::discard`] drops the stale precopy copies of the pages the source will
//!   send again (`MADV_DONTNEED`, or `MADV_REMOVE` for memfd-backed memory), so they fault.
//!   Only before the guest runs and before any install.
//! - [`PostcopyMemory::next_fault`] reads a fault: the guest page a vCPU (or a VMM thread)
//!   waits on.
//! - [`PostcopyMemory::install`] (`UFFDIO_COPY`) and [`PostcopyMemory::install_zero`]
//!   (`UFFDIO_ZEROPAGE`) place a page atomically and wake its waiters.
//!
//! # The invariant: a page is written once, by `UFFDIO_COPY`, the first copy wins
//!
//! Once the guest runs here it owns its memory: any later write by livemig would overwrite
//! what the guest wrote since. So after the switch no receiver writes guest memory directly;
//! every page goes through `install`, which the kernel performs only on a missing page and
//! answers `EEXIST` otherwise ([`Installed::AlreadyThere`]). That is correct because in
//! postcopy every copy of a page is final (the source's guest is paused: the page cannot
//! change there), so whichever copy arrives first is the page, and later ones, a request's
//! answer racing the push or a push racing a request, are dropped. No lock, no "received"
//! bitmap is needed for correctness; the kernel's page table is the arbiter.
//!
//! A page the destination never wrote during precopy is missing too, and faults. With the lazy
//! destination (a page that arrives as zero is not written, see `hostmem::Populated`) that
//! includes every page the source sent as zero: the fault thread must answer those itself with
//! `install_zero`, without asking the source, by consulting what precopy received (QEMU's
//! `receivedmap` plays this part).
//!
//! # Threads
//!
//! ```text
//!  vCPU / VMM thread           fault thread                   receivers (urgent + data channels)
//!  touches a missing page
//!  blocks in the kernel ────► next_fault() -> Fault { addr }
//!                             known zero: install_zero(addr) ─┐
//!                             else: request addr on the       │
//!                             return path (urgent channel)    │   page arrives (answer or push)
//!                                                             │   install(addr, &data)
//!  woken, re-reads ◄───────── the install wakes its waiters ◄─┘   -> New | AlreadyThere
//! ```
//!
//! One fault thread reads faults (several may: reads are atomic per event); any number of
//! receivers install concurrently (all methods take `&self`). A page can be reported more
//! than once (two vCPUs on it, or one kicked out of `KVM_RUN` that faults again), so the
//! fault thread remembers what it requested and asks the source for a page once. The install that answers a
//! fault need not come from the fault thread: the push may win, and its install wakes the
//! vCPU just the same. [`PostcopyMemory::latency`] records, per fault, the time from
//! `next_fault` reading it to the page's install ([`FaultLatency`]), whoever installed it.
//!
//! # Teardown
//!
//! A vCPU waiting on a fault is in the kernel, inside `KVM_RUN`'s `get_user_pages`. An
//! install lets it go on. A signal (the vCPU kick) makes `KVM_RUN` return `EINTR`, so a
//! guest can be paused while pages are missing; re-entering `KVM_RUN` faults on the same page
//! again, a second report of it (both seen on Linux 6.18 with a real vCPU).
//! [`PostcopyMemory::unregister`] (and drop) wakes every waiter for good, but a page still
//! missing then reads as zeros: that is for a guest that will never run again (a failed
//! destination) or for the end of a completed postcopy (nothing missing). A broken link
//! mid-postcopy is neither: the memory stays registered and the vCPUs stay blocked (or
//! paused) until a new connection resumes the transfer (postcopy recovery).
//!
//! Pages installed here are 4 KiB: a missing-mode fault in a transparent-huge-page region is
//! answered one 4 KiB page at a time, and khugepaged does not collapse a 2 MiB range under
//! userfaultfd while one of its pages is missing, so postcopied memory is 4 KiB pages until
//! khugepaged collapses it later (QEMU has the same limit; it postcopies huge pages only from
//! hugetlbfs).

// Wired in by the postcopy coordinators next (issue 15); until then nothing outside the
// tests calls this module (and the re-exports below are unused).
#![allow(dead_code)]

mod latency;
mod uffd;

#[cfg(test)]
mod tests;

#[allow(unused_imports)]
pub use latency::{FaultLatency, LatencySnapshot, BUCKETS};
#[allow(unused_imports)]
pub use uffd::{Fault, Installed, PostcopyError, PostcopyMemory};
