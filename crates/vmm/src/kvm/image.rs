//! Guest images: ELF64 kernels booted through the PVH protocol, loaded with rust-vmm's
//! `linux-loader` (`Elf` for the segments, `PvhBootConfigurator` for `hvm_start_info` and
//! the memory map, `load_cmdline` for the command line).
//!
//! livemig's own image (`guest/image.S`, built by `build.rs`) is [`DEFAULT_IMAGE`]. Any image
//! livemig boots must follow the same guest protocol (docs/guest-image.md): a PVH note
//! (`XEN_ELFNOTE_PHYS32_ENTRY`), a "livemig" note with the 64-bit entry of application
//! processors, one loadable segment within `[IMAGE_ADDR, IMAGE_ADDR + IMAGE_MAX)`, and the
//! layout, parameter block and console of [`super::layout`].

use super::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, IMAGE_ADDR, IMAGE_MAX, MEMMAP_ADDR, START_INFO_ADDR,
};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use livemig_engine::GuestMemory;
use livemig_wire::PAGE_SIZE;
use std::io::Cursor;
use vm_memory::GuestAddress;

/// livemig's own guest image (an ELF64 PVH kernel, `guest/image.S`).
pub static DEFAULT_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/image.elf"));

/// The `hvm_start_info` magic ("xEn3" with the 0x80 bit of the "E" set).
const START_MAGIC: u32 = 0x336e_c578;
/// Type of the "livemig" note holding the 64-bit AP entry.
const NOTE_AP_ENTRY: u32 = 0x4c4d_0001;
const ELF_HEADER: usize = 64;
const PHDR: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
/// The largest image file livemig reads.
pub const MAX_IMAGE_FILE: usize = 16 << 20;

/// Why an image cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("guest image of {0} bytes is larger than the {MAX_IMAGE_FILE} bytes livemig reads")]
    FileTooBig(usize),
    #[error("guest image is not an ELF file (bad magic)")]
    NotElf,
    #[error("guest image is not a little-endian ELF64 for x86-64 (class {class}, data {data}, machine {machine})")]
    NotX86_64 { class: u8, data: u8, machine: u16 },
    #[error("guest image: program header table at {offset} ({count} entries) is outside the file")]
    BadProgramHeaders { offset: u64, count: u16 },
    #[error("guest image has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY, type 18, name \"Xen\", in a PT_NOTE segment)")]
    MissingPvhNote,
    #[error("guest image has no \"livemig\" note with its 64-bit AP entry (is it a livemig guest image?)")]
    MissingApNote,
    #[error("guest image has no loadable segment")]
    NoSegment,
    #[error("guest image segment at 0x{addr:x} of {size} bytes is outside 0x{IMAGE_ADDR:x}..0x{:x} (the image area of livemig's guest layout)", IMAGE_ADDR + IMAGE_MAX)]
    SegmentOutside { addr: u64, size: u64 },
    #[error("guest image entry 0x{entry:x} is outside its segments")]
    EntryOutside { entry: u64 },
    #[error("kernel command line of {len} bytes is longer than {CMDLINE_MAX}")]
    CmdlineTooLong { len: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error("loading the guest image: {0}")]
    Load(#[source] linux_loader::loader::Error),
    #[error("writing the PVH start info: {0}")]
    StartInfo(#[source] linux_loader::configurator::Error),
    #[error("writing the kernel command line: {0}")]
    Cmdline(String),
}

/// A checked guest image: where it enters, and the pages it occupies once loaded.
#[derive(Debug, Clone)]
pub struct GuestImage {
    bytes: Vec<u8>,
    /// The PVH entry (32-bit protected mode).
    pub pvh_entry: u64,
    /// The 64-bit entry of application processors.
    pub ap_entry: u64,
    /// `(guest address, memory size)` of each loadable segment.
    pub segments: Vec<(u64, u64)>,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// The notes in `data`: `(name, type, desc)`.
fn notes(data: &[u8]) -> Vec<(&[u8], u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 12 <= data.len() {
        let (namesz, descsz, kind) = (
            u32_at(data, at) as usize,
            u32_at(data, at + 4) as usize,
            u32_at(data, at + 8),
        );
        let name_at = at + 12;
        let desc_at = name_at + namesz.next_multiple_of(4);
        let end = desc_at + descsz.next_multiple_of(4);
        if namesz > data.len() || descsz > data.len() || end > data.len() {
            break;
        }
        let name = &data[name_at..name_at + namesz];
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        out.push((name, kind, &data[desc_at..desc_at + descsz]));
        at = end;
    }
    out
}

/// An x86-64 ELF file's program header table: its offset and its entry count, checked to
/// lie inside the file.
fn program_header_table(bytes: &[u8]) -> Result<(u64, u16), ImageError> {
    if bytes.len() < ELF_HEADER || bytes[..4] != *b"\x7fELF" {
        return Err(ImageError::NotElf);
    }
    let (class, data, machine) = (bytes[4], bytes[5], u16_at(bytes, 18));
    if class != 2 || data != 1 || machine != EM_X86_64 {
        return Err(ImageError::NotX86_64 {
            class,
            data,
            machine,
        });
    }
    let (phoff, phentsize, phnum) = (
        u64_at(bytes, 32),
        u16_at(bytes, 54) as usize,
        u16_at(bytes, 56),
    );
    let table_end = (phnum as u64)
        .checked_mul(PHDR as u64)
        .and_then(|n| n.checked_add(phoff));
    if phentsize != PHDR || table_end.is_none_or(|e| e > bytes.len() as u64) {
        return Err(ImageError::BadProgramHeaders {
            offset: phoff,
            count: phnum,
        });
    }
    Ok((phoff, phnum))
}

/// What the program headers say: the entry points from the notes, and the loadable
/// segments (guest address, size).
#[derive(Default)]
struct ProgramHeaders {
    pvh_entry: Option<u64>,
    ap_entry: Option<u64>,
    segments: Vec<(u64, u64)>,
}

/// Reads the `phnum` program headers at `phoff`: each must lie inside the file, each
/// segment inside the image's area; the notes give the entry points.
fn read_program_headers(
    bytes: &[u8],
    phoff: u64,
    phnum: u16,
) -> Result<ProgramHeaders, ImageError> {
    let mut found = ProgramHeaders::default();
    for i in 0..phnum as usize {
        let h = phoff as usize + i * PHDR;
        let (kind, offset, paddr, filesz, memsz) = (
            u32_at(bytes, h),
            u64_at(bytes, h + 8),
            u64_at(bytes, h + 24),
            u64_at(bytes, h + 32),
            u64_at(bytes, h + 40),
        );
        let in_file = offset
            .checked_add(filesz)
            .is_some_and(|e| e <= bytes.len() as u64);
        if !in_file {
            return Err(ImageError::BadProgramHeaders {
                offset: phoff,
                count: phnum,
            });
        }
        match kind {
            PT_LOAD => {
                let end = paddr.checked_add(memsz);
                if paddr < IMAGE_ADDR || end.is_none_or(|e| e > IMAGE_ADDR + IMAGE_MAX) {
                    return Err(ImageError::SegmentOutside {
                        addr: paddr,
                        size: memsz,
                    });
                }
                found.segments.push((paddr, memsz));
            }
            PT_NOTE => {
                let data = &bytes[offset as usize..(offset + filesz) as usize];
                for (name, kind, desc) in notes(data) {
                    match (name, kind) {
                        (b"Xen", 18) if desc.len() >= 4 => {
                            found.pvh_entry = Some(u32_at(desc, 0) as u64)
                        }
                        (b"livemig", NOTE_AP_ENTRY) if desc.len() >= 8 => {
                            found.ap_entry = Some(u64_at(desc, 0))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

impl GuestImage {
    /// livemig's own image.
    pub fn default_image() -> Self {
        Self::parse(DEFAULT_IMAGE.to_vec()).expect("the embedded guest image is valid")
    }

    /// Checks an image file's bytes.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, ImageError> {
        if bytes.len() > MAX_IMAGE_FILE {
            return Err(ImageError::FileTooBig(bytes.len()));
        }
        let (phoff, phnum) = program_header_table(&bytes)?;
        let found = read_program_headers(&bytes, phoff, phnum)?;
        let pvh_entry = found.pvh_entry.ok_or(ImageError::MissingPvhNote)?;
        let ap_entry = found.ap_entry.ok_or(ImageError::MissingApNote)?;
        let segments = found.segments;
        if segments.is_empty() {
            return Err(ImageError::NoSegment);
        }
        for entry in [pvh_entry, ap_entry] {
            if !segments.iter().any(|&(a, s)| (a..a + s).contains(&entry)) {
                return Err(ImageError::EntryOutside { entry });
            }
        }
        Ok(GuestImage {
            bytes,
            pvh_entry,
            ap_entry,
            segments,
        })
    }

    /// The image file's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The guest pages the segments occupy.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        let p = PAGE_SIZE as u64;
        self.segments
            .iter()
            .flat_map(move |&(a, s)| a / p..(a + s).div_ceil(p))
    }

    /// Loads the segments, the command line and `hvm_start_info` (version 1, with a memory
    /// map of one RAM entry over all of `memory_bytes`) into `mem`.
    pub fn load(
        &self,
        mem: &GuestMemory,
        memory_bytes: u64,
        cmdline: &str,
    ) -> Result<(), ImageError> {
        if cmdline.len() > CMDLINE_MAX {
            return Err(ImageError::CmdlineTooLong { len: cmdline.len() });
        }
        if cmdline.contains('\0') {
            return Err(ImageError::CmdlineNul);
        }
        let loaded =
            Elf::load(mem, None, &mut Cursor::new(&self.bytes), None).map_err(ImageError::Load)?;
        if !matches!(loaded.pvh_boot_cap, PvhBootCapability::PvhEntryPresent(_)) {
            return Err(ImageError::MissingPvhNote);
        }
        let mut line = linux_loader::cmdline::Cmdline::new(CMDLINE_MAX + 1)
            .map_err(|e| ImageError::Cmdline(e.to_string()))?;
        if !cmdline.is_empty() {
            line.insert_str(cmdline)
                .map_err(|e| ImageError::Cmdline(e.to_string()))?;
        }
        linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &line)
            .map_err(|e| ImageError::Cmdline(e.to_string()))?;
        let memmap = [hvm_memmap_table_entry {
            addr: 0,
            size: memory_bytes,
            type_: 1,
            reserved: 0,
        }];
        let start_info = hvm_start_info {
            magic: START_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE_ADDR,
            memmap_paddr: MEMMAP_ADDR,
            memmap_entries: memmap.len() as u32,
            ..Default::default()
        };
        let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
        params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
        PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
            .map_err(ImageError::StartInfo)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn the_default_image_has_both_notes_and_one_segment() {
        let i = GuestImage::default_image();
        assert_eq!(i.segments.len(), 1);
        assert_eq!(i.segments[0].0, IMAGE_ADDR);
        assert_eq!(i.pvh_entry, IMAGE_ADDR);
        assert!(i.ap_entry > IMAGE_ADDR && i.ap_entry < IMAGE_ADDR + IMAGE_MAX);
        // No multiboot header (QEMU would try it first and refuse a 64-bit ELF).
        let magic = 0x1bad_b002u32.to_le_bytes();
        assert!(!DEFAULT_IMAGE[..DEFAULT_IMAGE.len().min(8192)]
            .windows(4)
            .any(|w| w == magic));
    }

    #[test]
    fn bad_images_are_named() {
        let e = GuestImage::parse(
            b"not an elf at all, just some text that is long enough to pass the size check"
                .to_vec(),
        )
        .unwrap_err();
        assert!(matches!(e, ImageError::NotElf), "{e}");
        let mut b = DEFAULT_IMAGE.to_vec();
        b[4] = 1;
        let e = GuestImage::parse(b).unwrap_err();
        assert!(e.to_string().contains("ELF64"), "{e}");
        // Rename the Xen note: no PVH entry.
        let mut b = DEFAULT_IMAGE.to_vec();
        let at = b.windows(4).position(|w| w == b"Xen\0").unwrap();
        b[at] = b'Y';
        let e = GuestImage::parse(b).unwrap_err();
        assert!(matches!(e, ImageError::MissingPvhNote), "{e}");
        assert!(e.to_string().contains("PVH note"), "{e}");
        let mut b = DEFAULT_IMAGE.to_vec();
        let at = b.windows(8).position(|w| w == b"livemig\0").unwrap();
        b[at] = b'X';
        assert!(matches!(
            GuestImage::parse(b),
            Err(ImageError::MissingApNote)
        ));
        // Move the segment below 1 MiB.
        let mut b = DEFAULT_IMAGE.to_vec();
        let phoff = u64_at(&b, 32) as usize;
        b[phoff + 24..phoff + 32].copy_from_slice(&0x8000u64.to_le_bytes());
        let e = GuestImage::parse(b).unwrap_err();
        assert!(
            matches!(e, ImageError::SegmentOutside { addr: 0x8000, .. }),
            "{e}"
        );
        let e = GuestImage::parse(vec![0; MAX_IMAGE_FILE + 1]).unwrap_err();
        assert!(matches!(e, ImageError::FileTooBig(_)), "{e}");
    }

    #[test]
    fn a_command_line_too_long_is_refused() {
        let i = GuestImage::default_image();
        let mem = crate::memory::allocate(
            &[livemig_wire::MemoryRange {
                guest_addr: 0,
                size: 4 << 20,
            }],
            crate::memory::Backing::Anonymous,
        )
        .unwrap();
        let long = "x".repeat(CMDLINE_MAX + 1);
        let e = i.load(&mem, 4 << 20, &long).unwrap_err();
        assert!(
            matches!(e, ImageError::CmdlineTooLong { len } if len == CMDLINE_MAX + 1),
            "{e}"
        );
        i.load(&mem, 4 << 20, "fill=1M ws=0").unwrap();
        let mut line = [0u8; 13];
        mem.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"fill=1M ws=0\0");
        let magic: u32 = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(magic, START_MAGIC);
        let entries: u32 = mem.read_obj(GuestAddress(START_INFO_ADDR + 48)).unwrap();
        assert_eq!(entries, 1);
        let size: u64 = mem.read_obj(GuestAddress(MEMMAP_ADDR + 8)).unwrap();
        assert_eq!(size, 4 << 20);
    }
}
