//! The KVM micro-VM: a real guest for livemig to migrate, behind [`livemig_engine::Guest`].
//!
//! - Guest memory is the engine's `vm-memory` [`GuestMemory`], one KVM memory slot per
//!   region, registered with `KVM_MEM_LOG_DIRTY_PAGES` in manual-protect mode ([`dirty`]).
//! - The VM has the in-kernel irqchip and a PIT (`create_irq_chip`, `create_pit2`), COM1
//!   (rust-vmm's `vm-superio`) and the debug port 0xe9 ([`console`]); 1 vCPU by default, up
//!   to [`layout::MAX_VCPUS`].
//! - It boots a kernel image through the PVH protocol ([`image`]: rust-vmm's `linux-loader`
//!   loads the ELF, `hvm_start_info`, the memory map and the command line): livemig's own
//!   image (`guest/image.S`, built at build time) by default, or any image that follows the
//!   same guest protocol (`docs/guest-image.md`). vCPU 0 starts at the PVH entry in 32-bit
//!   protected mode; the image builds its GDT and identity page tables (2 MiB pages), enters
//!   long mode and leaves ring 0 with `SYSEXIT`. Once vCPU 0 says so on the boot port, the
//!   other vCPUs start in 64-bit mode at the image's AP entry (livemig's loader sets their
//!   registers; QEMU runs the image with one vCPU).
//! - The image reads its work from its command line (derived from [`KvmConfig`] unless one is
//!   given), fills memory with generation 1 of [`crate::pattern`], says `ready` on COM1, then
//!   writes the pages of a working set in turn, each with its next generation, keeps the
//!   generation of every page in a table in guest memory and a per-vCPU counter that only
//!   grows, paces itself with `rdtsc` and sleeps through the host (`out` to a port). It
//!   answers `verify` and `status` on COM1. All of its state is in guest memory, registers and
//!   the UART, so it migrates with RAM, vCPU state and the UART's registers.
//!
//! Why ring 3: on the nested hosts livemig is tested on (PVM, no VMX), guest ring-0 code is
//! emulated and slow while ring-3 code runs natively. The image's ring-0 part is short (page
//! tables, long mode) and everything else runs at CPL 3 with IOPL 3, so its `in`/`out` work.
//! [`KvmConfig::user_mode`] = false keeps it in ring 0 (the `ring0` command-line key).
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
//! 0x0000_1000  GDT: null, kernel code/data (0x08/0x10), user data/code (0x18/0x20), the
//!              SYSEXIT pair user code/data (0x28/0x30)
//! 0x0000_2000  IDT: a zero page (any exception ends the guest with a shutdown exit)
//! 0x0000_3000  parameter block: parameters (layout::param), then at 0x3100 one 64-byte slot
//!              per vCPU (layout::slot: counter, busy, page, gen, count_at, cursor, deadline,
//!              flags)
//! 0x0000_4000  the image's copy of its command line; 0x5000 vCPU 0's boot stack
//! 0x0000_6000  hvm_start_info and the memory map (livemig's loader); 0x7000 command line
//! 0x0000_8000  PML4, 0x9000 PDPT, 0xa000.. up to 16 page directories (2 MiB pages, all
//!              guest memory identity-mapped, user-accessible; at most 16 GiB)
//! 0x0002_0000  one 4 KiB stack per vCPU
//! 0x0010_0000  the image (one segment, at most 64 KiB)
//! 0x0011_0000  generation table: u32 per guest page (absolute page number)
//! data start   first 1 MiB boundary after the table (2 MiB for up to 240 MiB of memory;
//!              3 MiB for 1 GiB): data pages; the fill is the first `fill` of them, the
//!              working set the first `ws`; vCPU v writes pages v, v + n, v + 2n, ...
//! ```
//!
//! The fill is the guest's own writes (generation 1, counted in the vCPUs' counters), so the
//! generations always add up to the vCPU counters (`host_writes` in the parameter block is
//! 0 and kept for the check's sake).

pub mod console;
mod dirty;
mod error;
pub mod image;
pub mod layout;
mod params;
pub mod state;
mod vcpu;
mod verify;
mod vm;

/// Builds a VM ahead of an incoming migration (a destination calls it before it listens), so
/// the guest that arrives costs only its memory slots and vCPUs. Does nothing where KVM is not
/// usable; errors are left for the guest's creation to report.
pub fn prepare_vm() {
    if kvm_usable() {
        vm::prepare();
    }
}

/// Drops the VM [`prepare_vm`] built if no guest took it (its descriptors are freed).
pub fn forget_prepared_vm() {
    vm::forget();
}

pub use error::KvmError;
pub use image::{GuestImage, ImageError, DEFAULT_IMAGE};
pub use state::{KvmState, StateError, VERSION as STATE_VERSION};

use crate::memory::{self, Backing};
use crate::throttle::Throttle;
use console::Console;
use layout::{GuestCmdline, Layout, LayoutError, Pace};
use livemig_engine::{DirtyBitmap, Guest, GuestError, GuestMemory, VerifyReport};
use livemig_wire::{GuestDescriptor, MemoryRange, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vcpu::Vcpu;
use vm::Vm;
use vm_memory::{Bytes, GuestAddress};

/// How long a guest may take from its first instruction to its `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a console command may take to be answered.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The kind name in the wire's guest descriptor.
pub const KIND: &str = "kvm";

/// How to build a KVM guest on the source.
#[derive(Debug, Clone)]
pub struct KvmConfig {
    /// Guest memory; rounded down to a multiple of 2 MiB.
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// Share of data pages the guest fills (generation 1) before it says `ready`, from the
    /// first.
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
    /// The kernel image to boot; `None` for livemig's own.
    pub image: Option<Arc<GuestImage>>,
    /// The kernel command line; `None` derives it from the fields above (with livemig's
    /// image, the same work as always).
    pub cmdline: Option<String>,
    /// Echo the guest's console lines to stderr after this prefix.
    pub echo_console: Option<String>,
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
            image: None,
            cmdline: None,
            echo_console: None,
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
    /// COM1 and the debug port.
    console: Arc<Console>,
    /// CRC32C of each page the loader wrote (the image), known where the image was loaded.
    loaded: Mutex<Vec<(u64, u32)>>,
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
    fn build(memory: GuestMemory, vcpus: u32, echo: Option<String>) -> Result<Self, KvmError> {
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
        let console = Arc::new(Console::new(echo));
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
            list.push(Vcpu::new(
                i,
                fd,
                &vm.cpuid,
                &vm.msr_indices,
                &throttle,
                &console,
            )?);
        }
        Ok(KvmGuest {
            throttle,
            vcpus: list,
            vm,
            layout,
            tsc_khz,
            counter_at_pause: AtomicU64::new(0),
            console,
            loaded: Mutex::new(Vec::new()),
            memory,
        })
    }

    /// Builds and boots a guest, and waits for its `ready` line (memory filled).
    pub fn start(config: &KvmConfig) -> Result<Self, GuestError> {
        let size = config.memory_bytes / (2 << 20) * (2 << 20);
        let range = [MemoryRange {
            guest_addr: 0,
            size,
        }];
        let memory = memory::allocate(&range, config.backing)?;
        let g = Self::build(memory, config.vcpus, config.echo_console.clone())
            .map_err(gerr("create"))?;
        let image = match &config.image {
            Some(i) => Arc::clone(i),
            None => Arc::new(GuestImage::default_image()),
        };
        let cmdline = match &config.cmdline {
            Some(c) => g.complete_cmdline(c),
            None => g.cmdline_for(config).render(),
        };
        g.boot(&image, &cmdline, config.user_mode)
            .map_err(gerr("boot"))?;
        Ok(g)
    }

    /// livemig's command line for `config`'s work.
    fn cmdline_for(&self, config: &KvmConfig) -> GuestCmdline {
        let l = &self.layout;
        let per100 = (config.fill.clamp(0.0, 1.0) * 100.0).round() as u64;
        GuestCmdline {
            fill_bytes: l.data_pages() * per100 / 100 * PAGE_SIZE as u64,
            ws_bytes: config.working_set_pages.min(l.data_pages()) * PAGE_SIZE as u64,
            rate: config.rate,
            pace: Pace::Sleep,
            report_every: config.report_every,
            vcpus: self.vcpus.len() as u32,
            tsc_khz: self.tsc_khz,
            ring0: !config.user_mode,
        }
    }

    /// A given command line, with the vCPU count and TSC frequency livemig knows added where
    /// it does not say them.
    fn complete_cmdline(&self, given: &str) -> String {
        let has = |k: &str| given.split_whitespace().any(|t| t.starts_with(k));
        let mut c = given.trim().to_string();
        if !has("vcpus=") {
            c.push_str(&format!(" vcpus={}", self.vcpus.len()));
        }
        if !has("tsc_khz=") {
            c.push_str(&format!(" tsc_khz={}", self.tsc_khz));
        }
        c.trim().to_string()
    }

    /// Loads `image` with `cmdline`, starts vCPU 0 at its PVH entry, the others at its AP
    /// entry once vCPU 0 has built the page tables, and waits for the `ready` line.
    fn boot(&self, image: &GuestImage, cmdline: &str, user_mode: bool) -> Result<(), KvmError> {
        image.load(&self.memory, self.layout.memory_bytes, cmdline)?;
        let mut loaded = Vec::new();
        let mut buf = [0u8; PAGE_SIZE];
        for p in image.pages() {
            self.memory
                .read_slice(&mut buf, GuestAddress(p * PAGE_SIZE as u64))
                .map_err(|e| KvmError::Memory {
                    op: "read loaded image",
                    detail: e.to_string(),
                })?;
            loaded.push((p, crc32c::crc32c(&buf)));
        }
        *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = loaded;
        let (bsp, aps) = self.vcpus.split_first().expect("at least one vCPU");
        bsp.boot_pvh(image.pvh_entry)?;
        bsp.resume()?;
        let t = Instant::now();
        while !bsp.booted() {
            if let Some(reason) = bsp.stopped() {
                return Err(self.boot_error(format!("stopped while booting ({reason})")));
            }
            if t.elapsed() > READY_TIMEOUT {
                return Err(self.boot_error(format!(
                    "did not reach its boot port within {READY_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for v in aps {
            v.boot_ap(image.ap_entry, user_mode)?;
            v.resume()?;
        }
        let stopped = || self.vcpus.iter().find_map(|v| v.stopped());
        let ready = self.console.wait_line(
            0,
            READY_TIMEOUT.saturating_sub(t.elapsed()),
            |l| l.starts_with("livemig-guest: ready"),
            || stopped().is_some(),
        );
        match (ready, stopped()) {
            (_, Some(reason)) => Err(self.boot_error(format!("stopped ({reason})"))),
            (None, None) => {
                Err(self.boot_error(format!("did not say ready within {READY_TIMEOUT:?}")))
            }
            (Some(_), None) => Ok(()),
        }
    }

    fn boot_error(&self, what: String) -> KvmError {
        let mut lines = self.console.lines();
        if lines.is_empty() {
            lines = self.console.debug_lines();
        }
        let console = if lines.is_empty() {
            "nothing".to_string()
        } else {
            lines.join(" | ")
        };
        KvmError::Boot { what, console }
    }

    /// TSC ticks between two page writes of one vCPU for `rate` writes/s over all vCPUs (as
    /// the image computes it from the same `tsc_khz`).
    fn ticks_per_page(&self, rate: u64) -> u64 {
        if rate == 0 {
            return 0;
        }
        (self.tsc_khz * 1000 * self.vcpus.len() as u64 / rate).max(1)
    }

    /// The guest's console (COM1 and the debug port).
    pub fn console(&self) -> &Console {
        &self.console
    }

    /// Sends `command` on COM1 and returns the guest's first answer line that starts with
    /// `answer` (e.g. `verify` and `"livemig-guest: verify"`). The guest must be running.
    pub fn command(
        &self,
        command: &str,
        answer: &str,
        timeout: Duration,
    ) -> Result<String, KvmError> {
        let after = self.console.line_count();
        let line = format!("{command}\n");
        if self.console.send(line.as_bytes(), timeout) != line.len() {
            return Err(KvmError::Console(format!(
                "the guest did not read {command:?} within {timeout:?}"
            )));
        }
        let stopped = || self.vcpus.iter().find_map(|v| v.stopped());
        self.console
            .wait_line(
                after,
                timeout,
                |l| l.starts_with(answer),
                || stopped().is_some(),
            )
            .ok_or_else(|| match stopped() {
                Some(reason) => KvmError::Console(format!("the guest stopped: {reason}")),
                None => KvmError::Console(format!(
                    "no answer to {command:?} starting with {answer:?} within {timeout:?}"
                )),
            })
    }

    /// The write counter when the guest was last paused (0 if it never was). After a
    /// local-mode handover the memory is the destination's, so this is what the source saw.
    pub fn counter_at_pause(&self) -> u64 {
        self.counter_at_pause.load(Ordering::Relaxed)
    }

    /// Page writes of all vCPUs so far: only grows, carried across migrations.
    pub fn counter(&self) -> u64 {
        (0..self.vcpus.len() as u32)
            .filter_map(|v| params::read_slot(&self.memory, v).ok())
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
        params::set_workload(&self.memory, ws, self.ticks_per_page(rate))
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
        if !self.console.restore(&st.vm.serial) {
            return Err(KvmError::Console(format!(
                "the saved UART FIFO holds {} bytes, more than the UART's",
                st.vm.serial.in_buffer.len()
            )));
        }
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
        let mut vm = self.vm.save().map_err(gerr("save state"))?;
        vm.serial = self.console.state();
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
        let loaded = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut report =
            verify::verify(&self.memory, &self.layout, self.vcpus.len() as u32, &loaded)
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
    KvmGuest::build(memory, desc.vcpus as u32, None).map_err(gerr("create"))
}

#[cfg(test)]
mod tests;
