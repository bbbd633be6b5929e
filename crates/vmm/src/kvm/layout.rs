//! Guest physical memory layout of livemig's guest image (`guest/image.S`), the system
//! structures the image builds in it at boot (GDT, identity page tables), the parameter block
//! it keeps, and the vCPU registers livemig starts it with (PVH entry, application
//! processors).
//!
//! Addresses and offsets here are mirrored in `guest/image.S` and `guest/image.ld`; keep them
//! in sync. Everything in this file is pure (bytes and register values), so verify can rebuild
//! the expected system pages and compare them after a migration.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use livemig_wire::PAGE_SIZE;

/// The GDT the image copies at boot (see [`GDT`]).
pub const GDT_ADDR: u64 = 0x1000;
/// A zero page used as the IDT: any exception ends the guest (KVM reports a shutdown).
pub const IDT_ADDR: u64 = 0x2000;
/// The parameter block (the image writes it from its command line; per-vCPU slots from
/// `SLOTS_ADDR`).
pub const PARAMS_ADDR: u64 = 0x3000;
/// Per-vCPU slots, `SLOT_SIZE` bytes each.
pub const SLOTS_ADDR: u64 = 0x3100;
pub const SLOT_SIZE: u64 = 64;
/// The image's copy of its command line (read before anything else is written).
pub const CMDLINE_COPY_ADDR: u64 = 0x4000;
/// vCPU 0's ring-0 boot stack (the page below this address).
pub const BOOT_STACK_TOP: u64 = 0x6000;
/// Where livemig's loader puts `hvm_start_info` and the memory map after it.
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MEMMAP_ADDR: u64 = 0x6040;
/// Where livemig's loader puts the command line (NUL-terminated, at most `CMDLINE_MAX`
/// bytes before the NUL).
pub const CMDLINE_ADDR: u64 = 0x7000;
pub const CMDLINE_MAX: usize = 4095;
/// The page-map level 4 table; the PDPT follows, then up to `MAX_PDS` page directories.
pub const PML4_ADDR: u64 = 0x8000;
pub const PDPT_ADDR: u64 = 0x9000;
pub const PD_ADDR: u64 = 0xa000;
pub const MAX_PDS: u64 = 16;
/// One 4 KiB stack per vCPU: vCPU v's is the page at `STACKS_ADDR + v * 4096`.
pub const STACKS_ADDR: u64 = 0x2_0000;
/// The image's one loadable segment: code, read-only data, notes (`guest/image.ld`). Below
/// 1 MiB, firmware (QEMU's SeaBIOS) may use memory before the image runs.
pub const IMAGE_ADDR: u64 = 0x10_0000;
pub const IMAGE_MAX: u64 = 0x1_0000;
/// The generation table: one u32 per guest page (absolute page number), written by the guest.
pub const GEN_TABLE_ADDR: u64 = 0x11_0000;
/// Data pages start at the first 1 MiB boundary after the generation table.
const DATA_ALIGN: u64 = 1 << 20;
const HUGE_PAGE: u64 = 2 << 20;
/// Largest guest: what `MAX_PDS` page directories of 2 MiB pages map.
pub const MAX_MEMORY: u64 = MAX_PDS * 512 * HUGE_PAGE;
/// Most vCPUs the parameter block has slots for.
pub const MAX_VCPUS: u32 = 16;

/// Ports the image writes to (`out`): boot (vCPU index; vCPU 0's tells livemig the GDT and
/// page tables exist, so the other vCPUs may start), progress (low 32 bits of the vCPU's
/// counter), sleep (microseconds the host should let this vCPU sleep).
pub const PORT_BOOT: u16 = 0x510;
pub const PORT_PROGRESS: u16 = 0x511;
pub const PORT_SLEEP: u16 = 0x512;
/// The console: COM1 (8 ports) and the debug port.
pub const PORT_COM1: u16 = 0x3f8;
pub const PORT_DEBUGCON: u16 = 0xe9;

/// Offsets in the parameter block (all u64).
pub mod param {
    pub const MAGIC: u64 = 0x00;
    pub const VERSION: u64 = 0x08;
    pub const NVCPUS: u64 = 0x10;
    pub const FIRST_PAGE: u64 = 0x18;
    pub const WS_PAGES: u64 = 0x20;
    pub const TICKS_PER_PAGE: u64 = 0x28;
    pub const REPORT_EVERY: u64 = 0x30;
    pub const GEN_TABLE: u64 = 0x38;
    pub const HOST_WRITES: u64 = 0x40;
    pub const MAX_LAG: u64 = 0x48;
    pub const SLEEP_MIN: u64 = 0x50;
    pub const TICKS_PER_US: u64 = 0x58;
    pub const IDLE_US: u64 = 0x60;
    pub const PAGES: u64 = 0x68;
    pub const FILL_PAGES: u64 = 0x70;
    pub const PACE: u64 = 0x78;
    pub const TSC_KHZ: u64 = 0x80;
    /// Set by vCPU 0 while it verifies; the others park.
    pub const STOP: u64 = 0x88;
    /// 1: vCPU 0 set the block up; 2: every vCPU filled its share.
    pub const READY: u64 = 0x90;
    /// Bytes of the static part and the command buffer.
    pub const END: u64 = 0x100;
}

/// Offsets in a per-vCPU slot (all u64).
pub mod slot {
    pub const COUNTER: u64 = 0x00;
    pub const BUSY: u64 = 0x08;
    pub const PAGE: u64 = 0x10;
    pub const GEN: u64 = 0x18;
    pub const COUNT_AT: u64 = 0x20;
    pub const CURSOR: u64 = 0x28;
    pub const DEADLINE: u64 = 0x30;
    pub const FLAGS: u64 = 0x38;
}

/// "LMKVMPB2": a parameter block written by this layout.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"LMKVMPB2");
pub const PARAMS_VERSION: u64 = 2;

/// Why a memory size cannot hold the layout.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("memory of {bytes} bytes is too small: the layout needs at least {min} bytes")]
    TooSmall { bytes: u64, min: u64 },
    #[error("memory of {bytes} bytes is too large: at most {MAX_MEMORY} bytes are mapped")]
    TooLarge { bytes: u64 },
    #[error("memory of {bytes} bytes is not a multiple of 2 MiB")]
    Unaligned { bytes: u64 },
    #[error("guest memory must be one range starting at address 0")]
    NotOneRangeAtZero,
    #[error("{0} vCPUs: must be 1..={MAX_VCPUS}")]
    Vcpus(u32),
}

/// Where things are for a guest of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub memory_bytes: u64,
    /// First data (pattern) page, as an absolute page number.
    pub first_data_page: u64,
}

impl Layout {
    pub fn new(memory_bytes: u64) -> Result<Self, LayoutError> {
        if memory_bytes & (HUGE_PAGE - 1) != 0 {
            return Err(LayoutError::Unaligned {
                bytes: memory_bytes,
            });
        }
        if memory_bytes > MAX_MEMORY {
            return Err(LayoutError::TooLarge {
                bytes: memory_bytes,
            });
        }
        let pages = memory_bytes / PAGE_SIZE as u64;
        let data = (GEN_TABLE_ADDR + 4 * pages).div_ceil(DATA_ALIGN) * DATA_ALIGN;
        if data >= memory_bytes {
            return Err(LayoutError::TooSmall {
                bytes: memory_bytes,
                min: 2 * HUGE_PAGE,
            });
        }
        Ok(Layout {
            memory_bytes,
            first_data_page: data / PAGE_SIZE as u64,
        })
    }

    pub fn pages(&self) -> u64 {
        self.memory_bytes / PAGE_SIZE as u64
    }

    pub fn data_pages(&self) -> u64 {
        self.pages() - self.first_data_page
    }

    pub fn gen_addr(&self, page: u64) -> u64 {
        GEN_TABLE_ADDR + 4 * page
    }

    /// The page directories used.
    fn pds(&self) -> u64 {
        self.memory_bytes.div_ceil(HUGE_PAGE).div_ceil(512)
    }

    /// The system pages the image builds at boot and never changes: `(address, bytes)`.
    pub fn system_pages(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = vec![
            (GDT_ADDR, page_of(&gdt_bytes())),
            (IDT_ADDR, vec![0; PAGE_SIZE]),
        ];
        let mut pml4 = [0u64; 512];
        pml4[0] = PDPT_ADDR | PTE_TABLE;
        out.push((PML4_ADDR, page_of_words(&pml4)));
        let mut pdpt = [0u64; 512];
        for (i, e) in pdpt.iter_mut().enumerate().take(self.pds() as usize) {
            *e = (PD_ADDR + i as u64 * PAGE_SIZE as u64) | PTE_TABLE;
        }
        out.push((PDPT_ADDR, page_of_words(&pdpt)));
        let huge = self.memory_bytes.div_ceil(HUGE_PAGE);
        for pd in 0..self.pds() {
            let mut t = [0u64; 512];
            for (i, e) in t.iter_mut().enumerate() {
                let n = pd * 512 + i as u64;
                if n < huge {
                    *e = (n * HUGE_PAGE) | PTE_HUGE;
                }
            }
            out.push((PD_ADDR + pd * PAGE_SIZE as u64, page_of_words(&t)));
        }
        out
    }

    /// Pages whose content changes while the guest runs or that only the loader knows: the
    /// parameter block, the command line copy, the boot information, the stacks, the
    /// generation table, the image. Verify does not compare them with anything (the image
    /// pages: see `KvmGuest`'s loaded-page digests).
    pub fn dynamic_pages(&self) -> impl Iterator<Item = u64> {
        let page = |a: u64| a / PAGE_SIZE as u64;
        let table_pages = (4 * self.pages()).div_ceil(PAGE_SIZE as u64);
        (page(PARAMS_ADDR)..page(PML4_ADDR))
            .chain(page(STACKS_ADDR)..page(STACKS_ADDR) + MAX_VCPUS as u64)
            .chain(page(IMAGE_ADDR)..page(IMAGE_ADDR + IMAGE_MAX))
            .chain(page(GEN_TABLE_ADDR)..page(GEN_TABLE_ADDR) + table_pages)
    }
}

// The areas do not overlap: the parameter page, command line copy, boot stack and boot
// information below the page tables, the page tables below the stacks, the stacks below the
// image, the image below the generation table, the vCPU slots within the parameter page.
const _: () = assert!(BOOT_STACK_TOP <= START_INFO_ADDR && CMDLINE_ADDR + 4096 <= PML4_ADDR);
const _: () = assert!(PD_ADDR + MAX_PDS * 4096 <= STACKS_ADDR);
const _: () = assert!(STACKS_ADDR + MAX_VCPUS as u64 * 4096 <= 0xa_0000);
const _: () = assert!(IMAGE_ADDR + IMAGE_MAX <= GEN_TABLE_ADDR);
const _: () = assert!(SLOTS_ADDR + SLOT_SIZE * MAX_VCPUS as u64 <= PARAMS_ADDR + 4096);
const _: () = assert!(PARAMS_ADDR + param::END <= SLOTS_ADDR);

/// Present, writable, user.
const PTE_TABLE: u64 = 0x7;
/// Present, writable, user, 2 MiB page.
const PTE_HUGE: u64 = 0x87;

/// Selectors of the image's GDT.
const KERNEL_CODE: u16 = 0x08;
const KERNEL_DATA: u16 = 0x10;
/// The pair SYSEXIT loads (SYSENTER_CS 0x08 + 32 and + 40).
const USER_CODE: u16 = 0x28;
const USER_DATA: u16 = 0x30;

const GDT: [u64; 7] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10: kernel data
    0x00cf_f300_0000_ffff, // 0x18: user data (DPL 3)
    0x00af_fb00_0000_ffff, // 0x20: user code, 64-bit (DPL 3)
    0x00af_fb00_0000_ffff, // 0x28: user code, 64-bit (DPL 3), SYSEXIT's
    0x00cf_f300_0000_ffff, // 0x30: user data (DPL 3), SYSEXIT's
];

fn gdt_bytes() -> Vec<u8> {
    GDT.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn page_of(bytes: &[u8]) -> Vec<u8> {
    let mut p = bytes.to_vec();
    p.resize(PAGE_SIZE, 0);
    p
}

fn page_of_words(words: &[u64; 512]) -> Vec<u8> {
    words.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn segment(selector: u16, code: bool, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector | dpl as u16,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: if code && long { 0 } else { 1 },
        s: 1,
        l: if code && long { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` (as KVM created them) into the PVH entry state: flat 32-bit protected mode,
/// paging off (the boot CPU, at the image's PVH entry).
pub fn pvh_sregs(sregs: &mut kvm_sregs) {
    let code = segment(KERNEL_CODE, true, 0, false);
    let data = segment(KERNEL_DATA, false, 0, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = 0;
    sregs.gdt.limit = 0;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x1 | 0x10; // PE, ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Puts `sregs` (as KVM created them) into 64-bit mode on the image's GDT and page tables, in
/// ring 3 when `user_mode`: the state the boot CPU reaches at `vcpu_main` (an application
/// processor, at the image's 64-bit AP entry).
pub fn long_mode_sregs(sregs: &mut kvm_sregs, user_mode: bool) {
    let (code, data) = if user_mode {
        (
            segment(USER_CODE, true, 3, true),
            segment(USER_DATA, false, 3, true),
        )
    } else {
        (
            segment(KERNEL_CODE, true, 0, true),
            segment(KERNEL_DATA, false, 0, true),
        )
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0xfff;
    sregs.cr3 = PML4_ADDR;
    // PAE, OSFXSR, OSXMMEXCPT.
    sregs.cr4 = 0x20 | 0x200 | 0x400;
    // PE, MP, ET, NE, WP, PG.
    sregs.cr0 = 0x1 | 0x2 | 0x10 | 0x20 | 0x1_0000 | 0x8000_0000;
    // LME, LMA.
    sregs.efer = 0x100 | 0x400;
}

/// The boot CPU's registers at the PVH entry: `%ebx` = `hvm_start_info`.
pub fn pvh_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rbx: START_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

/// An application processor's registers at the image's 64-bit AP entry: `%rdi` = its index.
pub fn ap_regs(entry: u64, index: u32, user_mode: bool) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: index as u64,
        // Bit 1 is reserved (always 1); IOPL 3 lets ring 3 use `in`/`out`. Interrupts stay off.
        rflags: 0x2 | if user_mode { 0x3000 } else { 0 },
        ..Default::default()
    }
}

/// How the image paces its writes while waiting for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    /// Ask livemig's host to sleep (port 0x512): no CPU spent, livemig only.
    Sleep,
    /// Spin on `rdtsc`: works under any VMM.
    Spin,
}

/// The image's command line (docs/guest-image.md), as livemig derives it from its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCmdline {
    pub fill_bytes: u64,
    pub ws_bytes: u64,
    /// Page writes per second over all vCPUs; 0 for as fast as possible.
    pub rate: u64,
    pub pace: Pace,
    pub report_every: u64,
    pub vcpus: u32,
    /// The TSC's frequency; 0 lets the image measure it against the PIT.
    pub tsc_khz: u64,
    pub ring0: bool,
}

impl GuestCmdline {
    pub fn render(&self) -> String {
        let mut s = format!(
            "fill={} ws={} rate={} pace={} report={} vcpus={}",
            self.fill_bytes,
            self.ws_bytes,
            self.rate,
            match self.pace {
                Pace::Sleep => "sleep",
                Pace::Spin => "spin",
            },
            self.report_every,
            self.vcpus
        );
        if self.tsc_khz > 0 {
            s.push_str(&format!(" tsc_khz={}", self.tsc_khz));
        }
        if self.ring0 {
            s.push_str(" ring0");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_64_mib() {
        let l = Layout::new(64 << 20).unwrap();
        // 16384 pages: a 64 KiB table at 0x110000, data from 2 MiB.
        assert_eq!(l.first_data_page, 512);
        assert_eq!(l.data_pages(), 16384 - 512);
        let sys = l.system_pages();
        // GDT, IDT, PML4, PDPT, one PD.
        assert_eq!(sys.len(), 5);
        assert!(sys
            .iter()
            .all(|(a, b)| a % 4096 == 0 && b.len() % 4096 == 0));
        let pd = &sys[4].1;
        assert_eq!(
            u64::from_le_bytes(pd[8..16].try_into().unwrap()),
            (2 << 20) | 0x87
        );
        assert_eq!(
            u64::from_le_bytes(pd[32 * 8..33 * 8].try_into().unwrap()),
            0
        );
        let dynamic: Vec<u64> = l.dynamic_pages().collect();
        assert!(dynamic.contains(&3) && dynamic.contains(&0x20) && dynamic.contains(&0x110));
        assert!(!dynamic.contains(&8) && !dynamic.contains(&1));
    }

    #[test]
    fn layout_limits() {
        assert!(matches!(
            Layout::new(3 << 20),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(Layout::new(0), Err(LayoutError::TooSmall { .. })));
        assert!(matches!(
            Layout::new(2 << 20),
            Err(LayoutError::TooSmall { .. })
        ));
        assert_eq!(Layout::new(4 << 20).unwrap().first_data_page, 512);
        assert!(matches!(
            Layout::new(MAX_MEMORY + (2 << 20)),
            Err(LayoutError::TooLarge { .. })
        ));
        let big = Layout::new(MAX_MEMORY).unwrap();
        assert_eq!(big.pds(), MAX_PDS);
    }

    #[test]
    fn cmdline_renders_every_key() {
        let c = GuestCmdline {
            fill_bytes: 1 << 20,
            ws_bytes: 4096,
            rate: 500,
            pace: Pace::Sleep,
            report_every: 64,
            vcpus: 2,
            tsc_khz: 3000,
            ring0: true,
        };
        assert_eq!(
            c.render(),
            "fill=1048576 ws=4096 rate=500 pace=sleep report=64 vcpus=2 tsc_khz=3000 ring0"
        );
    }
}
