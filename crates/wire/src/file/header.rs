//! The header of a save file: the guest, its regions, the devices and where each part of
//! the file lies. Every field is fixed-width but the names and configurations, so a header
//! encoded before the save (offsets still zero) has the same length as the final one.

use super::{FileFormatError, MAX_DEVICE_CHUNKS};
use crate::cursor::{Reader, Writer};
use crate::{
    GuestDescriptor, MemoryRange, WireDevice, WireError, MAX_DEVICES, MAX_REGIONS, MAX_VCPUS,
    PAGE_SIZE,
};

const MAX_NAME: usize = 64;

/// Where a section lies in the file, and the CRC32C of its bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Section {
    /// Its first byte's offset in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// CRC32C of its bytes.
    pub crc: u32,
}

impl Section {
    /// The section holding `bytes` at `offset`.
    pub fn of(offset: u64, bytes: &[u8]) -> Self {
        Section {
            offset,
            len: bytes.len() as u64,
            crc: crc32c::crc32c(bytes),
        }
    }

    fn write(&self, w: &mut Writer<'_>) {
        w.u64(self.offset).u64(self.len).u32(self.crc);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(Section {
            offset: r.u64()?,
            len: r.u64()?,
            crc: r.u32()?,
        })
    }

    /// Checks `bytes` (read from this section) against its CRC; `what` names the section.
    pub fn check(&self, what: &str, bytes: &[u8]) -> Result<(), FileFormatError> {
        let found = crc32c::crc32c(bytes);
        if found != self.crc || bytes.len() as u64 != self.len {
            return Err(FileFormatError::BadCrc {
                what: what.to_string(),
                expected: self.crc,
                found,
            });
        }
        Ok(())
    }
}

/// One guest memory region in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRegion {
    /// The region's guest range (page-aligned).
    pub range: MemoryRange,
    /// Where its page 0 lies; page i at `data_offset + i * 4096`.
    pub data_offset: u64,
    /// A bit per page (u64 words, little-endian): set if the page's data is in the file;
    /// a clear bit is a zero page, a hole.
    pub bitmap: Section,
    /// A CRC32C per page (u32, little-endian), 0 for absent pages.
    pub crcs: Section,
    /// Per group of [`super::GROUP_PAGES`] pages, the CRC32C of its words of `bitmap` and
    /// of its entries of `crcs` ([`super::GroupSums`]): the tables checked a group at a
    /// time, as an on-demand restore reads them.
    pub groups: Section,
}

/// A streamed device in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDevice {
    /// Its kind, name and configuration, as on the wire.
    pub device: WireDevice,
    /// Its chunk index: `chunks` entries of [`super::ChunkRef`], in stream order.
    pub index: Section,
    /// Chunks in its stream, at most [`MAX_DEVICE_CHUNKS`].
    pub chunks: u32,
    /// Bytes in its stream.
    pub bytes: u64,
}

/// The header of a save file (after the prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileHeader {
    /// The guest's kind and vCPUs, and its memory ranges as the regions give them.
    pub guest_kind: String,
    /// The guest's vCPUs.
    pub vcpus: u16,
    /// The guest's memory regions, sorted, not overlapping.
    pub regions: Vec<FileRegion>,
    /// Streamed devices, in the VM's order.
    pub devices: Vec<FileDevice>,
    /// Small devices, in the VM's order; their blobs are in `vmstate_blobs`.
    pub vmstates: Vec<WireDevice>,
    /// The guest's state blob ([`crate::PAGE_SIZE`]-independent, opaque).
    pub state: Section,
    /// The small devices' blobs ([`crate::VmStates`] encoding).
    pub vmstate_blobs: Section,
    /// The file's length when the save ended.
    pub file_len: u64,
    /// Rounds the save took (1 for a paused guest), for reports.
    pub rounds: u32,
    /// The guest was stopped when it was saved (a byte, 0 or 1): a restore that follows the
    /// saved run state leaves it stopped, as QEMU's does.
    pub paused: bool,
}

impl FileHeader {
    /// The guest as the wire describes it, for a [`GuestDescriptor`]-taking factory.
    pub fn guest(&self) -> GuestDescriptor {
        GuestDescriptor {
            kind: self.guest_kind.clone(),
            vcpus: self.vcpus,
            page_size: PAGE_SIZE as u32,
            ranges: self.regions.iter().map(|r| r.range).collect(),
        }
    }

    /// The guest's memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.range.size).sum()
    }

    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.string(&self.guest_kind)
            .u16(self.vcpus)
            .u32(PAGE_SIZE as u32)
            .u16(self.regions.len() as u16);
        for r in &self.regions {
            w.u64(r.range.guest_addr)
                .u64(r.range.size)
                .u64(r.data_offset);
            r.bitmap.write(&mut w);
            r.crcs.write(&mut w);
            r.groups.write(&mut w);
        }
        w.u16(self.devices.len() as u16);
        for d in &self.devices {
            write_device(&mut w, &d.device);
            d.index.write(&mut w);
            w.u32(d.chunks).u64(d.bytes);
        }
        w.u16(self.vmstates.len() as u16);
        for d in &self.vmstates {
            write_device(&mut w, d);
        }
        self.state.write(&mut w);
        self.vmstate_blobs.write(&mut w);
        w.u64(self.file_len).u32(self.rounds).u8(self.paused as u8);
        out
    }

    /// Reads a header, checking each count and field against its limit as it goes. The
    /// layout (where sections lie against the file's length) is checked apart, by
    /// [`FileHeader::check_layout`].
    pub fn decode(buf: &[u8]) -> Result<Self, FileFormatError> {
        Self::read(buf).map_err(|source| FileFormatError::Malformed {
            what: "header",
            source,
        })
    }

    fn read(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "file header");
        let guest_kind = r.string("guest kind", MAX_NAME)?;
        let vcpus = r.u16()?;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(out_of_range("vcpus", vcpus as u64, "1 to 256"));
        }
        let page_size = r.u32()?;
        if page_size != PAGE_SIZE as u32 {
            let why = "only 4096-byte pages are supported";
            return Err(out_of_range("page_size", page_size as u64, why));
        }
        let regions = read_regions(&mut r)?;
        let n = count(&mut r, "devices", MAX_DEVICES)?;
        let mut devices = Vec::with_capacity(n);
        for _ in 0..n {
            let device = read_device(&mut r)?;
            let index = Section::read(&mut r)?;
            let chunks = r.u32()?;
            if chunks > MAX_DEVICE_CHUNKS {
                return Err(out_of_range("chunks", chunks as u64, "at most 2^20"));
            }
            let bytes = r.u64()?;
            devices.push(FileDevice {
                device,
                index,
                chunks,
                bytes,
            });
        }
        let n = count(&mut r, "vmstates", MAX_DEVICES)?;
        let vmstates = (0..n)
            .map(|_| read_device(&mut r))
            .collect::<Result<_, _>>()?;
        let header = FileHeader {
            guest_kind,
            vcpus,
            regions,
            devices,
            vmstates,
            state: Section::read(&mut r)?,
            vmstate_blobs: Section::read(&mut r)?,
            file_len: r.u64()?,
            rounds: r.u32()?,
            paused: match r.u8()? {
                0 => false,
                1 => true,
                v => return Err(out_of_range("paused", v as u64, "0 or 1")),
            },
        };
        r.finish()?;
        Ok(header)
    }
}

fn out_of_range(field: &'static str, value: u64, reason: &'static str) -> WireError {
    WireError::OutOfRange {
        field,
        value,
        reason,
    }
}

/// A u16 count, at most `max`.
fn count(r: &mut Reader<'_>, field: &'static str, max: usize) -> Result<usize, WireError> {
    let n = r.u16()? as usize;
    if n > max {
        return Err(out_of_range(field, n as u64, "too many"));
    }
    Ok(n)
}

fn write_device(w: &mut Writer<'_>, d: &WireDevice) {
    w.string(&d.kind)
        .string(&d.name)
        .u16(d.config.len() as u16)
        .bytes(&d.config);
}

fn read_device(r: &mut Reader<'_>) -> Result<WireDevice, WireError> {
    let kind = r.string("device kind", MAX_NAME)?;
    let name = r.string("device name", MAX_NAME)?;
    let len = r.u16()? as usize;
    if len > crate::device::MAX_DEVICE_CONFIG {
        return Err(out_of_range("device config", len as u64, "at most 4096"));
    }
    Ok(WireDevice {
        kind,
        name,
        config: r.bytes(len)?.to_vec(),
    })
}

/// The regions: 1 to [`MAX_REGIONS`], page-aligned, non-empty, sorted, not overlapping.
fn read_regions(r: &mut Reader<'_>) -> Result<Vec<FileRegion>, WireError> {
    let n = r.u16()? as usize;
    if n == 0 || n > MAX_REGIONS {
        return Err(out_of_range("regions", n as u64, "1 to 64"));
    }
    let mut regions: Vec<FileRegion> = Vec::with_capacity(n);
    for _ in 0..n {
        let range = MemoryRange {
            guest_addr: r.u64()?,
            size: r.u64()?,
        };
        let page = PAGE_SIZE as u64;
        if range.size == 0
            || !range.size.is_multiple_of(page)
            || !range.guest_addr.is_multiple_of(page)
        {
            return Err(out_of_range(
                "region size",
                range.size,
                "page-aligned and not empty",
            ));
        }
        if range.guest_addr.checked_add(range.size).is_none() {
            return Err(out_of_range("region end", range.guest_addr, "past 2^64"));
        }
        if let Some(prev) = regions.last() {
            if range.guest_addr < prev.range.guest_addr + prev.range.size {
                let why = "regions must be sorted and not overlap";
                return Err(out_of_range("region address", range.guest_addr, why));
            }
        }
        regions.push(FileRegion {
            range,
            data_offset: r.u64()?,
            bitmap: Section::read(r)?,
            crcs: Section::read(r)?,
            groups: Section::read(r)?,
        });
    }
    Ok(regions)
}
