//! [`restore_vm`]: a saved VM brought back. Everything the file says is read and checked
//! first (prefix, header, layout, every section's CRC32C); only then are the guest and its
//! devices built, the pages read in parallel and the devices loaded.

use super::devices::load_device;
use super::io::{read_vec, RegionMap};
use super::pages::{for_each_batch, read_batch, Batch};
use super::save::wait;
use super::tables::RegionTables;
use super::{FileError, RestoreConfig, RestoreReport};
use crate::device::{Device, DeviceDescriptor, VmState};
use crate::dirty::DirtyBitmap;
use crate::guest::Guest;
use crate::incoming::Factories;
use crate::runtime::Runtime;
use livemig_wire::file::{
    decode_bitmap, decode_chunk_index, decode_group_sums, ChunkRef, FileFormatError, FileHeader,
    FilePrefix, GroupSums, Section, PREFIX_LEN,
};
use livemig_wire::{VmStates, WireDevice, PAGE_SIZE};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// A VM restored from a file: the embedder now owns it.
pub struct Restored {
    /// The guest, resumed (unless [`RestoreConfig::resume`] is false).
    pub guest: Box<dyn Guest>,
    /// The streamed devices, loaded, in the saved order.
    pub devices: Vec<Box<dyn Device>>,
    /// The small devices, loaded, in the saved order.
    pub vmstates: Vec<Box<dyn VmState>>,
    /// How the restore went.
    pub report: RestoreReport,
}

/// The regions' tables as a restore reads them before anything is built.
pub(super) enum Tables {
    /// Eager: per region, the present bits and the page CRCs, read whole (taken by the
    /// region maps).
    Whole(Vec<(Vec<u64>, Vec<u32>)>),
    /// On demand: per region, the groups section; the tables are read a group at a time
    /// once the guest runs ([`RegionTables`]).
    Groups(Vec<Vec<GroupSums>>),
}

impl Default for Tables {
    fn default() -> Self {
        Tables::Groups(Vec::new())
    }
}

/// A file read and checked, nothing built yet.
pub(super) struct Checked {
    pub file: File,
    /// Where pages are read: `file` again, or a direct-I/O descriptor of it.
    pub pages: File,
    pub header: FileHeader,
    pub tables: Tables,
    pub chunks: Vec<Vec<ChunkRef>>,
    pub state: Vec<u8>,
    pub vmstates: VmStates,
}

/// Restores the VM saved at `path`: builds the guest and devices the file describes with
/// `factories`, reads its pages with [`RestoreConfig::readers`] threads while every
/// device loads its stream, then loads the small devices and the guest's state and resumes
/// the guest.
///
/// The file is checked before anything is built: a file that is not a save file, of
/// another version, cut short, damaged (a CRC32C that does not match), or whose guest is
/// larger than [`RestoreConfig::max_guest_memory`] is refused with
/// [`FileError::Format`] or [`FileError::TooLarge`]. A damaged page or device chunk found
/// while reading fails the restore ([`FileError::PageCorrupted`],
/// [`FileError::ChunkCorrupted`]) and the guest is dropped, never run.
pub fn restore_vm(
    path: &Path,
    factories: Factories<'_>,
    config: &RestoreConfig,
) -> Result<Restored, FileError> {
    let start = Instant::now();
    if !(1..=livemig_wire::MAX_CHANNELS).contains(&config.readers) {
        return Err(FileError::Config(format!(
            "{} readers: 1 to 64",
            config.readers
        )));
    }
    let mut c = Checked::read(path, config)?;
    let guest = factories.guest.create(&c.header.guest())?;
    let descriptor = |w: &WireDevice| DeviceDescriptor {
        kind: w.kind.clone(),
        name: w.name.clone(),
        config: w.config.clone(),
    };
    let devices = c
        .header
        .devices
        .iter()
        .map(|d| factories.devices.create_device(&descriptor(&d.device)))
        .collect::<Result<Vec<_>, _>>()?;
    let vmstates = c
        .header
        .vmstates
        .iter()
        .map(|d| factories.devices.create_vmstate(&descriptor(d)))
        .collect::<Result<Vec<_>, _>>()?;
    let offsets: Vec<u64> = c.header.regions.iter().map(|r| r.data_offset).collect();
    if !super::io::same_layout(guest.memory(), &c.header.guest().ranges) {
        return Err(FileError::Config(
            "the guest built has other memory regions than the file".into(),
        ));
    }
    let loaded = match std::mem::take(&mut c.tables) {
        Tables::Whole(tables) => {
            let regions = RegionMap::with_tables(guest.memory(), &offsets, tables);
            eager(path, &c, &regions, &*guest, &devices, &vmstates, config)?
        }
        Tables::Groups(sums) => {
            let regions = RegionMap::bare(guest.memory(), &offsets);
            let tables: Vec<RegionTables> = (c.header.regions.iter().zip(sums).enumerate())
                .map(|(i, (r, sums))| RegionTables::new(i, r, sums))
                .collect();
            let parts = super::ondemand::Parts {
                regions: &regions,
                tables: &tables,
                guest: &*guest,
                devices: &devices,
                vmstates: &vmstates,
            };
            super::ondemand::run(path, &c, parts, config)?
        }
    };
    let report = RestoreReport {
        guest_kind: c.header.guest_kind.clone(),
        memory_bytes: c.header.memory_bytes(),
        pages_read: loaded.pages,
        device_bytes: loaded.device_bytes,
        saved_rounds: c.header.rounds,
        saved_paused: c.header.paused,
        verify: loaded.verify,
        on_demand: config.on_demand,
        direct_io: config.direct_io,
        faults: loaded.faults,
        resumed_ms: loaded.resumed.map(|t| (t - start).as_secs_f64() * 1e3),
        total_ms: start.elapsed().as_secs_f64() * 1e3,
    };
    Ok(Restored {
        guest,
        devices,
        vmstates,
        report,
    })
}

/// What loading did, for the report.
pub(super) struct Loaded {
    pub pages: u64,
    pub device_bytes: u64,
    pub verify: Option<crate::guest::VerifyReport>,
    pub faults: u64,
    /// When the guest was resumed (None: left paused).
    pub resumed: Option<Instant>,
}

/// The eager restore: every page and device loaded, then the small devices and the guest's
/// state, the check (if asked) and the resume.
fn eager(
    path: &Path,
    c: &Checked,
    regions: &[RegionMap],
    guest: &dyn Guest,
    devices: &[Box<dyn Device>],
    vmstates: &[Box<dyn VmState>],
    config: &RestoreConfig,
) -> Result<Loaded, FileError> {
    let small = crate::thp::SmallPages::for_read(regions);
    let (pages, device_bytes) = load(path, c, regions, guest, devices, config)?;
    small.give_back();
    load_state(c, guest, vmstates)?;
    let verify = match config.verify {
        true => Some(checked(guest.verify()?)?),
        false => None,
    };
    let resume = resumes(config, c);
    let resumed = resume.then(Instant::now);
    if resume {
        guest.resume()?;
    }
    Ok(Loaded {
        pages,
        device_bytes,
        verify,
        faults: 0,
        resumed,
    })
}

/// Whether the restored guest is resumed: as asked, unless it was saved stopped and the
/// saved run state is followed.
pub(super) fn resumes(config: &RestoreConfig, c: &Checked) -> bool {
    config.resume && !(config.as_saved && c.header.paused)
}

/// The small devices' blobs in list order, then the guest's state.
pub(super) fn load_state(
    c: &Checked,
    guest: &dyn Guest,
    vmstates: &[Box<dyn VmState>],
) -> Result<(), FileError> {
    for (d, blob) in vmstates.iter().zip(&c.vmstates.blobs) {
        d.load(blob)?;
    }
    guest.restore_state(&c.state)?;
    Ok(())
}

/// A check with a wrong page is an error.
pub(super) fn checked(
    v: crate::guest::VerifyReport,
) -> Result<crate::guest::VerifyReport, FileError> {
    match v.pages_mismatched {
        0 => Ok(v),
        _ => Err(FileError::Verify(v)),
    }
}

/// Reads the pages with the reader threads while each device loads on a thread of its
/// own; returns the pages read and the device bytes loaded.
fn load(
    path: &Path,
    c: &Checked,
    regions: &[RegionMap],
    guest: &dyn Guest,
    devices: &[Box<dyn Device>],
    config: &RestoreConfig,
) -> Result<(u64, u64), FileError> {
    let cancel = &config.cancel;
    std::thread::scope(|scope| {
        let rt = Runtime::new(scope, "lm-rst", cancel.clone());
        let threads = rt.completions();
        let (batch_tx, batch_rx) = crossbeam_channel::bounded::<Batch>(config.readers as usize * 2);
        let (read_tx, read_rx) = crossbeam_channel::unbounded();
        for i in 0..config.readers {
            let (rx, tx) = (batch_rx.clone(), read_tx.clone());
            rt.spawn(&format!("rd{i}"), move || {
                for b in rx.iter() {
                    let r = match cancel.is_cancelled() {
                        true => Err(FileError::Cancelled),
                        false => read_batch(&c.pages, path, regions, &b),
                    };
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        let (dev_tx, dev_rx) = crossbeam_channel::unbounded();
        for (i, d) in devices.iter().enumerate() {
            let tx = dev_tx.clone();
            let name = &c.header.devices[i].device.name;
            rt.submit(&format!("dev{i}"), move || {
                let _ = tx.send(load_device(&c.file, path, name, &**d, &c.chunks[i], cancel));
                Ok(())
            });
        }
        let r = (|| {
            let mut present = DirtyBitmap::new(&guest.descriptor().ranges);
            for (i, r) in regions.iter().enumerate() {
                let words: Vec<u64> = r
                    .present
                    .iter()
                    .map(|w| w.load(Ordering::Relaxed))
                    .collect();
                present.or_range_words(i, &words);
            }
            let (mut sent, mut pages) = (0u64, 0u64);
            for_each_batch(&present, regions, |b| {
                sent += 1;
                batch_tx.send(b).map_err(|_| FileError::Cancelled)
            })?;
            drop(batch_tx);
            for _ in 0..sent {
                pages += wait(&read_rx, &threads, cancel)??;
            }
            let mut bytes = 0;
            for _ in devices {
                bytes += wait(&dev_rx, &threads, cancel)??;
            }
            Ok((pages, bytes))
        })();
        let failure = rt.teardown(r.is_err());
        match (r, failure) {
            (Ok(v), None) => Ok(v),
            (Ok(_), Some(f)) => Err(FileError::Job(f)),
            (Err(e), _) => Err(e),
        }
    })
}

impl Checked {
    /// Reads and checks everything but the pages and device chunks themselves.
    fn read(path: &Path, config: &RestoreConfig) -> Result<Checked, FileError> {
        let file = File::open(path).map_err(|e| FileError::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| FileError::io("stat", path, e))?
            .len();
        let format = |e| FileError::format(path, e);
        let need = |n: u64| match len < n {
            true => Err(format(FileFormatError::Truncated {
                expected: n,
                found: len,
            })),
            false => Ok(()),
        };
        need(PREFIX_LEN as u64)?;
        let raw = read_vec(&file, PREFIX_LEN as u64, 0)
            .map_err(|e| FileError::io("read the prefix", path, e))?;
        let mut fixed = [0u8; PREFIX_LEN];
        fixed.copy_from_slice(&raw);
        let prefix = FilePrefix::decode(&fixed).map_err(format)?;
        need(PREFIX_LEN as u64 + prefix.header_len as u64)?;
        let body = read_vec(&file, prefix.header_len as u64, PREFIX_LEN as u64)
            .map_err(|e| FileError::io("read the header", path, e))?;
        prefix.check_header(&body).map_err(format)?;
        let header = FileHeader::decode(&body).map_err(format)?;
        if header.memory_bytes() > config.max_guest_memory {
            return Err(FileError::TooLarge {
                path: path.to_path_buf(),
                memory_bytes: header.memory_bytes(),
                max: config.max_guest_memory,
            });
        }
        header
            .check_layout(prefix.header_len, len, config.max_state_bytes)
            .map_err(format)?;
        let sections = Sections { file: &file, path };
        let tables = sections.tables(&header, config.on_demand)?;
        let chunks = header
            .devices
            .iter()
            .map(|d| {
                let what = format!("device {} chunk index", d.device.name);
                let raw = sections.read(&what, &d.index)?;
                decode_chunk_index(&raw, d.chunks, header.file_len).map_err(format)
            })
            .collect::<Result<_, _>>()?;
        let state = sections.read("guest state", &header.state)?;
        let raw = sections.read("small devices' state", &header.vmstate_blobs)?;
        let vmstates = VmStates::decode(&raw, header.vmstates.len()).map_err(|source| {
            format(FileFormatError::Malformed {
                what: "small devices' state",
                source,
            })
        })?;
        let pages = super::io::pages_fd(&file, path, config.direct_io, false)?;
        Ok(Checked {
            file,
            pages,
            header,
            tables,
            chunks,
            state,
            vmstates,
        })
    }
}

/// Reads sections (whose place and length the layout check accepted).
struct Sections<'a> {
    file: &'a File,
    path: &'a Path,
}

impl Sections<'_> {
    fn read(&self, what: &str, s: &Section) -> Result<Vec<u8>, FileError> {
        let raw = read_vec(self.file, s.len, s.offset)
            .map_err(|e| FileError::io("read a section", self.path, e))?;
        s.check(what, &raw)
            .map_err(|e| FileError::format(self.path, e))?;
        Ok(raw)
    }

    /// The regions' tables: whole (eager), or only their groups sections (on demand).
    fn tables(&self, header: &FileHeader, on_demand: bool) -> Result<Tables, FileError> {
        let pages = |r: &livemig_wire::file::FileRegion| r.range.size / PAGE_SIZE as u64;
        let regions = header.regions.iter().enumerate();
        Ok(match on_demand {
            false => Tables::Whole(
                regions
                    .map(|(i, r)| self.region(i, pages(r), &r.bitmap, &r.crcs))
                    .collect::<Result<_, _>>()?,
            ),
            true => Tables::Groups(
                regions
                    .map(|(i, r)| {
                        let raw = self.read(&format!("region {i} groups"), &r.groups)?;
                        decode_group_sums(&raw, pages(r))
                            .map_err(|e| FileError::format(self.path, e))
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Region `i`'s present bits and page CRCs.
    #[allow(clippy::type_complexity)]
    fn region(
        &self,
        i: usize,
        pages: u64,
        bitmap: &Section,
        crcs: &Section,
    ) -> Result<(Vec<u64>, Vec<u32>), FileError> {
        let raw = self.read(&format!("region {i} bitmap"), bitmap)?;
        let words = decode_bitmap(&raw, pages).map_err(|e| FileError::format(self.path, e))?;
        let raw = self.read(&format!("region {i} page CRCs"), crcs)?;
        let crcs = raw
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok((words, crcs))
    }
}
