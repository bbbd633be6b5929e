//! Guest physical memory layout, the system structures the host builds in it (GDT, identity
//! page tables), the parameter block the payload reads, and the 64-bit register setup.
//!
//! Addresses and offsets here are mirrored in `guest/payload.S`; keep them in sync. Everything
//! in this file is pure (bytes and register values), so verify can rebuild the expected
//! system pages and compare them after a migration.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use livemig_wire::PAGE_SIZE;

/// The GDT: null, kernel code/data, user data/code (see [`gdt`]).
pub const GDT_ADDR: u64 = 0x1000;
/// A zero page used as the IDT: any exception ends the guest (KVM reports a shutdown).
pub const IDT_ADDR: u64 = 0x2000;
/// The parameter block (static parameters at the start, per-vCPU slots from `SLOTS`).
pub const PARAMS_ADDR: u64 = 0x3000;
/// Per-vCPU slots, `SLOT_SIZE` bytes each.
pub const SLOTS_ADDR: u64 = 0x3100;
pub const SLOT_SIZE: u64 = 64;
/// The page-map level 4 table; the PDPT follows, then up to `MAX_PDS` page directories.
pub const PML4_ADDR: u64 = 0x8000;
pub const PDPT_ADDR: u64 = 0x9000;
pub const PD_ADDR: u64 = 0xa000;
pub const MAX_PDS: u64 = 16;
/// The payload's code.
pub const CODE_ADDR: u64 = 0x2_0000;
pub const CODE_MAX: u64 = 0x1_0000;
/// The generation table: one u32 per guest page (absolute page number), written by the guest.
pub const GEN_TABLE_ADDR: u64 = 0x4_0000;
/// Data pages start at the first 1 MiB boundary after the generation table.
const DATA_ALIGN: u64 = 1 << 20;
const HUGE_PAGE: u64 = 2 << 20;
/// Largest guest: what `MAX_PDS` page directories of 2 MiB pages map.
pub const MAX_MEMORY: u64 = MAX_PDS * 512 * HUGE_PAGE;
/// Most vCPUs the parameter block has slots for.
pub const MAX_VCPUS: u32 = 16;

/// Ports the payload writes to (`out`): boot (vCPU index), progress (low 32 bits of the
/// vCPU's counter), sleep (microseconds the host should let this vCPU sleep).
pub const PORT_BOOT: u16 = 0x510;
pub const PORT_PROGRESS: u16 = 0x511;
pub const PORT_SLEEP: u16 = 0x512;

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
    /// Bytes of the static part.
    pub const END: u64 = 0x68;
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
}

/// "LMKVMPB1": a parameter block written by this layout.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"LMKVMPB1");
pub const PARAMS_VERSION: u64 = 1;

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
                min: HUGE_PAGE,
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

    /// The system pages the host writes once and the guest never changes: `(address, bytes)`.
    /// `payload` is the guest code.
    pub fn system_pages(&self, payload: &[u8]) -> Vec<(u64, Vec<u8>)> {
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
        let code_pages = (payload.len() as u64).div_ceil(PAGE_SIZE as u64).max(1);
        let mut code = payload.to_vec();
        code.resize((code_pages * PAGE_SIZE as u64) as usize, 0);
        out.push((CODE_ADDR, code));
        out
    }
}

// The areas do not overlap: page tables below the code, the code below the generation table,
// the vCPU slots within the parameter page.
const _: () = assert!(PD_ADDR + MAX_PDS * 4096 <= CODE_ADDR);
const _: () = assert!(CODE_ADDR + CODE_MAX <= GEN_TABLE_ADDR);
const _: () = assert!(SLOTS_ADDR + SLOT_SIZE * MAX_VCPUS as u64 <= PARAMS_ADDR + 4096);
const _: () = assert!(PARAMS_ADDR + param::END <= SLOTS_ADDR);

/// Present, writable, user.
const PTE_TABLE: u64 = 0x7;
/// Present, writable, user, 2 MiB page.
const PTE_HUGE: u64 = 0x87;

const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: kernel code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10: kernel data
    0x00cf_f300_0000_ffff, // 0x18: user data (DPL 3)
    0x00af_fb00_0000_ffff, // 0x20: user code, 64-bit (DPL 3)
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

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: selector | dpl as u16,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` (as KVM created them) into 64-bit mode, in ring 3 when `user_mode`.
pub fn long_mode_sregs(sregs: &mut kvm_sregs, user_mode: bool) {
    let (code, data) = if user_mode {
        (segment(0x20, true, 3), segment(0x18, false, 3))
    } else {
        (segment(0x08, true, 0), segment(0x10, false, 0))
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

/// The registers a vCPU starts the payload with.
pub fn entry_regs(index: u32, user_mode: bool) -> kvm_regs {
    kvm_regs {
        rip: CODE_ADDR,
        rdi: index as u64,
        // Bit 1 is reserved (always 1); IOPL 3 lets ring 3 use `out`. Interrupts stay off.
        rflags: 0x2 | if user_mode { 0x3000 } else { 0 },
        ..Default::default()
    }
}

/// The static parameters the payload reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub vcpus: u32,
    pub first_data_page: u64,
    pub working_set_pages: u64,
    /// TSC ticks between two page writes of one vCPU; 0 for as fast as possible.
    pub ticks_per_page: u64,
    pub report_every: u64,
    pub host_writes: u64,
    pub ticks_per_us: u64,
}

impl Params {
    /// The static part of the parameter block, to be written at `PARAMS_ADDR`.
    pub fn encode(&self) -> Vec<u8> {
        let tpu = self.ticks_per_us.max(1);
        let words: [u64; (param::END / 8) as usize] = [
            PARAMS_MAGIC,
            PARAMS_VERSION,
            self.vcpus as u64,
            self.first_data_page,
            self.working_set_pages,
            self.ticks_per_page,
            self.report_every,
            GEN_TABLE_ADDR,
            self.host_writes,
            // Behind schedule by more than 20 ms (a pause, a migration): start afresh.
            20_000 * tpu,
            // Sleep only when at least 1 ms ahead (at most ~1000 sleep exits/s per vCPU).
            1000 * tpu,
            tpu,
            // An idle vCPU looks at its parameters again every 10 ms.
            10_000,
        ];
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_of_64_mib() {
        let l = Layout::new(64 << 20).unwrap();
        // 16384 pages: a 64 KiB table at 0x40000, data from 1 MiB.
        assert_eq!(l.first_data_page, 256);
        assert_eq!(l.data_pages(), 16384 - 256);
        let sys = l.system_pages(&[0x90; 10]);
        // GDT, IDT, PML4, PDPT, one PD, one code page.
        assert_eq!(sys.len(), 6);
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
    }

    #[test]
    fn layout_limits() {
        assert!(matches!(
            Layout::new(3 << 20),
            Err(LayoutError::Unaligned { .. })
        ));
        assert!(matches!(Layout::new(0), Err(LayoutError::TooSmall { .. })));
        assert_eq!(Layout::new(2 << 20).unwrap().first_data_page, 256);
        assert!(matches!(
            Layout::new(MAX_MEMORY + (2 << 20)),
            Err(LayoutError::TooLarge { .. })
        ));
        let big = Layout::new(MAX_MEMORY).unwrap();
        assert_eq!(big.pds(), MAX_PDS);
    }

    #[test]
    fn params_encode_at_their_offsets() {
        let p = Params {
            vcpus: 2,
            first_data_page: 256,
            working_set_pages: 100,
            ticks_per_page: 7,
            report_every: 64,
            host_writes: 5,
            ticks_per_us: 3000,
        };
        let b = p.encode();
        let at = |o: u64| u64::from_le_bytes(b[o as usize..o as usize + 8].try_into().unwrap());
        assert_eq!(b.len() as u64, param::END);
        assert_eq!(at(param::MAGIC), PARAMS_MAGIC);
        assert_eq!(at(param::NVCPUS), 2);
        assert_eq!(at(param::WS_PAGES), 100);
        assert_eq!(at(param::GEN_TABLE), GEN_TABLE_ADDR);
        assert_eq!(at(param::TICKS_PER_US), 3000);
    }
}
