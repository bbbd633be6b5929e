//! The KVM micro-VM: a real guest for livemig to migrate, behind [`livemig_engine::Guest`].
//!
//! - Guest memory is the engine's `vm-memory` [`GuestMemory`], one KVM memory slot per
//!   region, registered with `KVM_MEM_LOG_DIRTY_PAGES` in manual-protect mode ([`dirty`]).
//! - The VM has the in-kernel irqchip and a PIT; 1 vCPU by default, up to
//!   [`layout::MAX_VCPUS`]. No firmware and no kernel: the host puts each vCPU straight into
//!   64-bit mode (GDT, identity page tables with 2 MiB pages, CR0/CR4/EFER, CPUID from
//!   `KVM_GET_SUPPORTED_CPUID`), by default in ring 3, and starts livemig's own payload
//!   (`guest/payload.S`, assembled at build time).
//! - The payload writes the pages of a working set in turn, each with the next generation of
//!   [`crate::pattern`] (the synthetic guest's scheme, word for word), keeps the generation of
//!   every page in a table in guest memory and a per-vCPU counter that only grows, paces
//!   itself with `rdtsc` and sleeps through the host (`out` to a port), and reports progress
//!   by `out` too. All of its state is in guest memory or registers, so it migrates with RAM
//!   and vCPU state and nothing else.
//!
//! Why ring 3: on the nested hosts livemig is tested on (PVM, no VMX), guest ring-0 code is
//! emulated and slow while ring-3 code runs natively. The host enters the payload at CPL 3
//! directly (no privilege transition, which the emulator handles poorly) with IOPL 3 so its
//! `out` works. (Observed on PVM: the saved RFLAGS shows IOPL 0, yet `out` from ring 3 still
//! exits to the host; on VMX, IOPL 3 allows it, and failing that the TSS I/O bitmap KVM's
//! reset TR points at is in page 0, which stays zero, allowing every port.)
//! [`KvmConfig::user_mode`] = false runs it in ring 0 instead.
//!
//! Measured on such a host (guest counter over 0.5-1 s, `tests/kvm_guest.rs`): ring 3
//! unthrottled ~0.85-1.0 M pages/s (4 GB/s) with 1 vCPU, about the same with 2 (memory
//! bound); ring 0 unthrottled only ~180-220 pages/s (every instruction emulated: 512 stores
//! per page). Rate-limited, the guest keeps the rate exactly (20 000 pages/s measured
//! 20 000) at ~7% of a host core, as it sleeps through the host rather than spinning.
//! Pause takes ~0.1 ms, state save ~0.1 ms, restore ~0.2 ms.
//!
//! # Guest physical memory layout
//!
//! ```text
//! 0x0000_0000  page 0: unused, zero
//! 0x0000_1000  GDT: null, kernel code/data (0x08/0x10), user data/code (0x18/0x20)
//! 0x0000_2000  IDT: a zero page (any exception ends the guest with a shutdown exit)
//! 0x0000_3000  parameter block: static parameters (layout::param), then at 0x3100 one
//!              64-byte slot per vCPU (layout::slot: counter, busy, page, gen, count_at,
//!              cursor, deadline)
//! 0x0000_8000  PML4, 0x9000 PDPT, 0xa000.. up to 16 page directories (2 MiB pages, all
//!              guest memory identity-mapped, user-accessible; at most 16 GiB)
//! 0x0002_0000  payload code (at most 64 KiB)
//! 0x0004_0000  generation table: u32 per guest page (absolute page number)
//! data start   first 1 MiB boundary after the table (1 MiB for up to 192 MiB of memory;
//!              2 MiB for 1 GiB): data pages; the working set is the first
//!              `working_set_pages` of them, vCPU v writes pages v, v + n, v + 2n, ...
//! ```
//!
//! The host may fill a share of the data pages with generation 1 before the guest starts
//! (through `vm-memory`, so they count as VMM writes); their number is in the parameter block
//! as `host_writes`, so the generations always add up to host writes + vCPU counters.

mod dirty;
mod error;
pub mod layout;
mod payload;
pub mod state;
mod vcpu;
mod verify;
mod vm;

pub use error::KvmError;
pub use state::{KvmState, StateError, VERSION as STATE_VERSION};

use crate::memory::{self, Backing};
use crate::throttle::Throttle;
use layout::{Layout, LayoutError, Params};
use livemig_engine::{DirtyBitmap, Guest, GuestError, GuestMemory, VerifyReport};
use livemig_wire::{GuestDescriptor, MemoryRange, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vcpu::Vcpu;
use vm::Vm;
use vm_memory::{Bytes, GuestAddress};

/// The kind name in the wire's guest descriptor.
pub const KIND: &str = "kvm";

/// How to build a KVM guest on the source.
#[derive(Debug, Clone)]
pub struct KvmConfig {
    /// Guest memory; rounded down to a multiple of 2 MiB.
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// Share of data pages the host writes once (generation 1) before the guest starts.
    pub fill: f64,
    /// Data pages, from the first, that the guest keeps writing.
    pub working_set_pages: u64,
    /// Page writes per second over all vCPUs; 0 for as fast as the guest can.
    pub rate: u64,
    /// The payload reports progress by port I/O every this many pages (0: never).
    pub report_every: u64,
    /// Run the payload in ring 3 (native speed on nested hosts) rather than ring 0.
    pub user_mode: bool,
    /// Where guest memory lives (memfds for local mode).
    pub backing: Backing,
}

impl Default for KvmConfig {
    fn default() -> Self {
        KvmConfig {
            memory_bytes: 64 << 20,
            vcpus: 1,
            fill: 0.0,
            working_set_pages: 1024,
            rate: 0,
            report_every: 1024,
            user_mode: true,
            backing: Backing::Anonymous,
        }
    }
}

/// A running (or paused) KVM micro-VM. Fields drop in order: vCPUs, then the VM, then memory.
pub struct KvmGuest {
    /// Auto-converge's throttle, shared with every vCPU thread.
    throttle: Arc<Throttle>,
    vcpus: Vec<Vcpu>,
    vm: Vm,
    layout: Layout,
    tsc_khz: u64,
    counter_at_pause: AtomicU64,
    memory: GuestMemory,
}

fn gerr(op: &'static str) -> impl FnOnce(KvmError) -> GuestError {
    move |e| GuestError::new(op, e)
}

/// For tests that need /dev/kvm: true where it is usable. Elsewhere it says the calling
/// test is skipped, on stderr and as one line appended to the file named by the
/// `LIVEMIG_SKIP_LOG` environment variable (which `.ci/run` counts), and returns false.
pub fn usable_or_skip() -> bool {
    if kvm_usable() {
        return true;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    eprintln!("{test}: SKIPPED (no usable /dev/kvm)");
    if let Some(path) = std::env::var_os("LIVEMIG_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write of the whole line, so concurrent tests' lines never interleave.
            let _ = f.write_all(format!("{test}: SKIPPED (no usable /dev/kvm)\n").as_bytes());
        }
    }
    false
}

/// Whether /dev/kvm can be opened here and offers every capability this guest needs.
/// Setting `LIVEMIG_DISABLE_KVM=1` makes it answer no, to try the synthetic fallback (and
/// the skipping of KVM tests) on a machine that has KVM.
pub fn kvm_usable() -> bool {
    if std::env::var_os("LIVEMIG_DISABLE_KVM").is_some_and(|v| v == "1") {
        return false;
    }
    kvm_ioctls::Kvm::new()
        .map(|k| vm::check_caps(&k).is_ok() && k.create_vm().is_ok())
        .unwrap_or(false)
}

impl KvmGuest {
    /// Builds the VM on `memory` (one range at 0, from `memory::allocate` or handed over),
    /// with vCPUs created, nothing running and nothing written to memory.
    fn build(memory: GuestMemory, vcpus: u32) -> Result<Self, KvmError> {
        let ranges = memory::ranges_of(&memory);
        let [MemoryRange {
            guest_addr: 0,
            size,
        }] = ranges.as_slice()
        else {
            return Err(LayoutError::NotOneRangeAtZero.into());
        };
        if vcpus == 0 || vcpus > layout::MAX_VCPUS {
            return Err(LayoutError::Vcpus(vcpus).into());
        }
        let layout = Layout::new(*size)?;
        let vm = Vm::create(&memory)?;
        let mut tsc_khz = 0;
        let mut list = Vec::new();
        let throttle = Arc::new(Throttle::default());
        for i in 0..vcpus {
            let fd = vm
                .fd
                .create_vcpu(i as u64)
                .map_err(|source| KvmError::Vcpu {
                    index: i,
                    op: "create",
                    source,
                })?;
            if i == 0 {
                tsc_khz = fd.get_tsc_khz().map_err(|source| KvmError::Vcpu {
                    index: i,
                    op: "get TSC frequency",
                    source,
                })? as u64;
            }
            list.push(Vcpu::new(i, fd, &vm.cpuid, &vm.msr_indices, &throttle)?);
        }
        Ok(KvmGuest {
            throttle,
            vcpus: list,
            vm,
            layout,
            tsc_khz,
            counter_at_pause: AtomicU64::new(0),
            memory,
        })
    }

    /// Builds, fills and starts a guest.
    pub fn start(config: &KvmConfig) -> Result<Self, GuestError> {
        let size = config.memory_bytes / (2 << 20) * (2 << 20);
        let range = [MemoryRange {
            guest_addr: 0,
            size,
        }];
        let memory = memory::allocate(&range, config.backing)?;
        let g = Self::build(memory, config.vcpus).map_err(gerr("create"))?;
        let l = g.layout;
        let ws = config.working_set_pages.min(l.data_pages());
        let host_writes = g.fill(config.fill).map_err(gerr("fill"))?;
        let params = Params {
            vcpus: config.vcpus,
            first_data_page: l.first_data_page,
            working_set_pages: ws,
            ticks_per_page: g.ticks_per_page(config.rate),
            report_every: config.report_every,
            host_writes,
            ticks_per_us: (g.tsc_khz / 1000).max(1),
        };
        payload::load(&g.memory, &l, &params).map_err(gerr("load payload"))?;
        for v in &g.vcpus {
            v.boot(config.user_mode).map_err(gerr("boot vCPU"))?;
        }
        for v in &g.vcpus {
            v.resume().map_err(gerr("start vCPU"))?;
        }
        Ok(g)
    }

    /// TSC ticks between two page writes of one vCPU for `rate` writes/s over all vCPUs.
    fn ticks_per_page(&self, rate: u64) -> u64 {
        if rate == 0 {
            return 0;
        }
        (self.tsc_khz * 1000 * self.vcpus.len() as u64 / rate).max(1)
    }

    /// Writes generation 1 into the first `share` of every 100 data pages, on two threads.
    /// Returns the pages written.
    fn fill(&self, share: f64) -> Result<u64, KvmError> {
        let per100 = (share.clamp(0.0, 1.0) * 100.0).round() as u64;
        let (first, pages) = (self.layout.first_data_page, self.layout.pages());
        let written: Vec<Result<u64, KvmError>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2u64)
                .map(|part| {
                    let (mem, l) = (&self.memory, &self.layout);
                    s.spawn(move || {
                        let mut buf = [0u8; PAGE_SIZE];
                        let mut n = 0;
                        for p in (first + part..pages).step_by(2) {
                            if (p - first) % 100 >= per100 {
                                continue;
                            }
                            crate::pattern::fill(&mut buf, p, 1);
                            mem.write_slice(&buf, GuestAddress(p * PAGE_SIZE as u64))
                                .and_then(|_| mem.write_obj(1u32, GuestAddress(l.gen_addr(p))))
                                .map_err(|e| KvmError::Memory {
                                    op: "fill",
                                    detail: e.to_string(),
                                })?;
                            n += 1;
                        }
                        Ok(n)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(KvmError::Memory {
                            op: "fill",
                            detail: "a fill thread panicked".into(),
                        })
                    })
                })
                .collect()
        });
        written.into_iter().sum()
    }

    /// The write counter when the guest was last paused (0 if it never was). After a
    /// local-mode handover the memory is the destination's, so this is what the source saw.
    pub fn counter_at_pause(&self) -> u64 {
        self.counter_at_pause.load(Ordering::Relaxed)
    }

    /// Page writes of all vCPUs so far: only grows, carried across migrations.
    pub fn counter(&self) -> u64 {
        (0..self.vcpus.len() as u32)
            .filter_map(|v| payload::read_slot(&self.memory, v).ok())
            .map(|s| s.counter)
            .sum()
    }

    /// Progress the payload reported by port I/O, per vCPU: (low 32 bits of its counter at
    /// the last report, number of reports).
    pub fn reported(&self) -> Vec<(u64, u64)> {
        self.vcpus.iter().map(|v| v.progress()).collect()
    }

    /// Changes the working set and rate of the running guest.
    pub fn set_workload(&self, working_set_pages: u64, rate: u64) -> Result<(), GuestError> {
        let ws = working_set_pages.min(self.layout.data_pages());
        payload::set_workload(&self.memory, ws, self.ticks_per_page(rate))
            .map_err(gerr("set workload"))
    }

    /// Where things are in guest memory.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    fn restore(&self, blob: &[u8]) -> Result<(), KvmError> {
        let st = KvmState::decode(blob)?;
        if st.memory_bytes != self.layout.memory_bytes || st.vcpus.len() != self.vcpus.len() {
            return Err(KvmError::StateMismatch {
                found: format!("{} bytes and {} vCPUs", st.memory_bytes, st.vcpus.len()),
                expected: format!(
                    "{} bytes and {} vCPUs",
                    self.layout.memory_bytes,
                    self.vcpus.len()
                ),
            });
        }
        self.vm.restore(&st.vm)?;
        for (v, s) in self.vcpus.iter().zip(&st.vcpus) {
            v.restore(s)?;
        }
        Ok(())
    }
}

impl Guest for KvmGuest {
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError> {
        self.throttle.set(percent);
        Ok(())
    }

    fn descriptor(&self) -> GuestDescriptor {
        GuestDescriptor {
            kind: KIND.into(),
            vcpus: self.vcpus.len() as u16,
            page_size: PAGE_SIZE as u32,
            ranges: memory::ranges_of(&self.memory),
        }
    }

    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        dirty::reset(&self.vm.fd, &self.vm.slots, &self.memory).map_err(gerr("start dirty log"))
    }

    fn sync_dirty_log(&self, out: &mut DirtyBitmap) -> Result<(), GuestError> {
        dirty::sync(&self.vm.fd, &self.vm.slots, &self.memory, out).map_err(gerr("sync dirty log"))
    }

    /// Logging stays on in KVM (it costs little here); the next start discards it.
    fn stop_dirty_log(&self) -> Result<(), GuestError> {
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        for v in &self.vcpus {
            v.pause().map_err(gerr("pause"))?;
        }
        // Kept, because in local mode this memory is the destination's once handed over.
        self.counter_at_pause
            .store(self.counter(), Ordering::Relaxed);
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        for v in &self.vcpus {
            v.resume().map_err(gerr("resume"))?;
        }
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let vm = self.vm.save().map_err(gerr("save state"))?;
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| v.save())
            .collect::<Result<_, _>>()
            .map_err(gerr("save state"))?;
        Ok(KvmState {
            memory_bytes: self.layout.memory_bytes,
            vm,
            vcpus,
        }
        .encode())
    }

    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        self.restore(blob).map_err(gerr("restore state"))
    }

    fn verify(&self) -> Result<VerifyReport, GuestError> {
        let mut report = verify::verify(&self.memory, &self.layout, self.vcpus.len() as u32)
            .map_err(gerr("verify"))?;
        report.counter = self.counter();
        Ok(report)
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        for v in &self.vcpus {
            v.shutdown();
        }
    }
}

/// Builds the destination's KVM guest from a source's description: memory, VM and vCPUs
/// created, nothing running until `restore_state` and `resume`.
pub fn create_paused(desc: &GuestDescriptor) -> Result<KvmGuest, GuestError> {
    let memory = memory::allocate(&desc.ranges, Backing::Anonymous)?;
    create_paused_on(desc, memory)
}

/// Builds a paused, empty guest for `desc` on `memory` that already holds its RAM (local
/// mode); nothing is written to it.
pub fn create_paused_on(
    desc: &GuestDescriptor,
    memory: GuestMemory,
) -> Result<KvmGuest, GuestError> {
    if desc.page_size != PAGE_SIZE as u32 {
        return Err(GuestError::new(
            "create",
            format!("page size {} is not {PAGE_SIZE}", desc.page_size),
        ));
    }
    if memory::ranges_of(&memory) != desc.ranges {
        return Err(GuestError::new(
            "create",
            "memory does not match the described ranges",
        ));
    }
    KvmGuest::build(memory, desc.vcpus as u32).map_err(gerr("create"))
}

#[cfg(test)]
mod tests;
