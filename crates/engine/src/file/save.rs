//! [`save_vm`]: the coordinator of a save (the caller's thread), its rounds and its
//! switchover. The module docs of [`super`] draw the phases.

use super::devices::DeviceSink;
use super::io::{write_buf, RegionMap};
use super::pages::{for_each_batch, write_batch, Batch, Written};
use super::{FileError, SaveConfig, SaveReport, SaveRound};
use crate::cancel::CancelToken;
use crate::dirty::DirtyBitmap;
use crate::runtime::{Runtime, ThreadDone, ThreadError};
use crate::source::Vm;
use crossbeam_channel::{Receiver, SendTimeoutError, Sender};
use livemig_wire::file::{
    encode_chunk_index, encode_group_sums, plan, ChunkRef, FileDevice, FileHeader, FilePrefix,
    FileRegion, Section, MAX_HEADER_LEN,
};
use livemig_wire::{VmStates, WireDevice};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The file being written: `PATH.partial` until it is whole.
struct Target {
    file: File,
    /// Where pages are written: `file` again, or a direct-I/O descriptor of it.
    pages: File,
    path: PathBuf,
    partial: PathBuf,
    /// The header with the regions laid out and every section still empty.
    header: FileHeader,
    header_len: usize,
    tail: u64,
}

/// What the save took from the guest and devices, before the file is finished.
struct Captured {
    rounds: Vec<SaveRound>,
    chunks: Vec<Vec<ChunkRef>>,
    state: Vec<u8>,
    vmstates: Vec<u8>,
}

/// Saves `vm` to a file at `path` (replacing any file there once the save is whole).
///
/// With [`SaveConfig::paused`] false the guest runs during the save (a live save: rounds,
/// then a short pause) and resumes after it unless [`SaveConfig::resume`] is false; with it
/// true the guest must be paused already, is saved in one pass and stays paused. Devices are
/// thawed (`abort_save`) after the save, whatever its outcome, so they run on with the
/// guest. `progress` is called on the caller's thread after each round.
///
/// On error no file is left at `path` (nor `PATH.partial`), the guest's dirty log is
/// stopped and a guest this call paused is resumed.
pub fn save_vm(
    vm: Vm<'_>,
    path: &Path,
    config: &SaveConfig,
    progress: &(dyn Fn(&SaveRound) + Sync),
) -> Result<SaveReport, FileError> {
    config.validate()?;
    let start = Instant::now();
    let mut target = Target::create(vm, path, config.direct_io)?;
    target.header.paused = config.paused;
    let regions = RegionMap::of(vm.guest.memory(), &plan_offsets(&target.header));
    let mut paused_at = None;
    let saver = Saver {
        vm,
        config,
        target: &target,
        regions: &regions,
        tail: AtomicU64::new(target.tail),
        paused: CancelToken::new(),
        progress,
    };
    let captured = std::thread::scope(|scope| {
        let rt = Runtime::new(scope, "lm-save", config.cancel.clone());
        let r = saver.capture(&rt, &mut paused_at);
        let failure = rt.teardown(r.is_err());
        match (r, failure) {
            (Ok(c), None) => Ok((c, saver.tail.load(Ordering::Relaxed))),
            (Ok(_), Some(f)) => Err(FileError::Job(f)),
            (Err(e), _) => Err(e),
        }
    });
    let downtime = paused_at.map(|t: Instant| t.elapsed());
    let after = after_capture(vm, config, paused_at.is_some(), captured.is_ok());
    let finished = captured
        .and_then(|c| after.map(|()| c))
        .and_then(|(c, tail)| target.finish(&regions, &c, tail).map(|r| (c, r)));
    let (c, (file_len, fsync_ms)) = finished.inspect_err(|_| {
        let _ = std::fs::remove_file(&target.partial);
    })?;
    Ok(SaveReport {
        live: !config.paused,
        memory_bytes: target.header.memory_bytes(),
        pages_in_file: regions
            .iter()
            .flat_map(|r| &r.present)
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum(),
        device_bytes: c.chunks.iter().flatten().map(|c| c.len as u64).sum(),
        rounds: c.rounds,
        file_len,
        downtime_ms: downtime.map_or(0.0, |d| d.as_secs_f64() * 1e3),
        fsync_ms,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
        direct_io: config.direct_io,
    })
}

/// After the threads are joined: the dirty log stopped (on failure), the devices thawed,
/// and the guest resumed if this save paused it (and should resume it, or failed). The
/// first error is returned, the guest's resume first among them.
fn after_capture(
    vm: Vm<'_>,
    config: &SaveConfig,
    paused_here: bool,
    ok: bool,
) -> Result<(), FileError> {
    if !ok && !config.paused {
        let _ = vm.guest.stop_dirty_log();
    }
    let devices = vm
        .devices
        .iter()
        .map(|d| d.abort_save())
        .find_map(Result::err);
    if paused_here && (config.resume || !ok) {
        vm.guest.resume()?;
    }
    devices.map_or(Ok(()), |e| Err(e.into()))
}

/// The header of `vm`'s file before the save: every section empty, regions not yet placed.
fn template(vm: Vm<'_>) -> Result<FileHeader, FileError> {
    let desc = vm.guest.descriptor();
    let wire = |d: crate::device::DeviceDescriptor| -> Result<WireDevice, FileError> {
        if d.kind.len() > 64 || d.name.len() > 64 || d.config.len() > 4096 {
            return Err(FileError::Config(format!(
                "device {}: kind and name must be at most 64 bytes, config 4096",
                d.name
            )));
        }
        Ok(WireDevice {
            kind: d.kind,
            name: d.name,
            config: d.config,
        })
    };
    let too_many = vm.devices.len().max(vm.vmstates.len()) > livemig_wire::MAX_DEVICES;
    let memory_matches = super::io::same_layout(vm.guest.memory(), &desc.ranges);
    if too_many || !memory_matches || desc.kind.len() > 64 || desc.ranges.is_empty() {
        return Err(FileError::Config(
            "at most 64 devices of each kind, a guest kind of at most 64 bytes, and guest \
             memory regions as the descriptor's ranges"
                .into(),
        ));
    }
    Ok(FileHeader {
        guest_kind: desc.kind.clone(),
        vcpus: desc.vcpus,
        regions: desc
            .ranges
            .iter()
            .map(|&range| FileRegion {
                range,
                data_offset: 0,
                bitmap: Section::default(),
                crcs: Section::default(),
                groups: Section::default(),
            })
            .collect(),
        devices: vm
            .devices
            .iter()
            .map(|d| {
                Ok(FileDevice {
                    device: wire(d.descriptor())?,
                    index: Section::default(),
                    chunks: 0,
                    bytes: 0,
                })
            })
            .collect::<Result<_, FileError>>()?,
        vmstates: vm
            .vmstates
            .iter()
            .map(|d| wire(d.descriptor()))
            .collect::<Result<_, _>>()?,
        state: Section::default(),
        vmstate_blobs: Section::default(),
        file_len: 0,
        rounds: 0,
        paused: false,
    })
}

fn plan_offsets(h: &FileHeader) -> Vec<u64> {
    h.regions.iter().map(|r| r.data_offset).collect()
}

impl Target {
    /// Opens `PATH.partial` (and its direct-I/O descriptor if `direct`) and lays the file
    /// out for `vm`.
    fn create(vm: Vm<'_>, path: &Path, direct: bool) -> Result<Target, FileError> {
        let mut header = template(vm)?;
        let header_len = header.encode().len();
        if header_len > MAX_HEADER_LEN as usize {
            return Err(FileError::Config(
                "the devices' descriptions are too large".into(),
            ));
        }
        let plan = plan(header_len, &header.guest().ranges);
        for (r, off) in header.regions.iter_mut().zip(&plan.data_offsets) {
            r.data_offset = *off;
        }
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(|e| FileError::io("create", &partial, e))?;
        let pages = file
            .set_len(plan.tail)
            .map_err(|e| FileError::io("size the file", &partial, e))
            .and_then(|()| super::io::pages_fd(&file, &partial, direct, true))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&partial);
            })?;
        Ok(Target {
            file,
            pages,
            path: path.to_path_buf(),
            partial,
            header,
            header_len,
            tail: plan.tail,
        })
    }

    /// Appends `bytes` at `*at` as a section.
    fn section(&self, at: &mut u64, bytes: &[u8]) -> Result<Section, FileError> {
        write_buf(&self.file, bytes, *at)
            .map_err(|e| FileError::io("write a section", &self.partial, e))?;
        let s = Section::of(*at, bytes);
        *at += bytes.len() as u64;
        Ok(s)
    }

    /// Writes the sections after `tail`, syncs the data, writes the prefix and header,
    /// syncs again and renames the file to its path. Returns the file's length and the
    /// syncs' time in milliseconds.
    fn finish(
        &self,
        regions: &[RegionMap],
        c: &Captured,
        tail: u64,
    ) -> Result<(u64, f64), FileError> {
        let mut h = self.header.clone();
        let mut at = tail;
        for (r, m) in h.regions.iter_mut().zip(regions) {
            let (bitmap, crcs) = (m.bitmap_bytes(), m.crc_bytes());
            r.bitmap = self.section(&mut at, &bitmap)?;
            r.crcs = self.section(&mut at, &crcs)?;
            r.groups = self.section(&mut at, &encode_group_sums(&bitmap, &crcs, m.pages))?;
        }
        for (d, chunks) in h.devices.iter_mut().zip(&c.chunks) {
            d.index = self.section(&mut at, &encode_chunk_index(chunks))?;
            d.chunks = chunks.len() as u32;
            d.bytes = chunks.iter().map(|c| c.len as u64).sum();
        }
        h.state = self.section(&mut at, &c.state)?;
        h.vmstate_blobs = self.section(&mut at, &c.vmstates)?;
        h.file_len = at;
        h.rounds = c.rounds.len() as u32;
        let body = h.encode();
        if body.len() != self.header_len {
            return Err(FileError::Config("the header changed its length".into()));
        }
        let io = |op| move |e| FileError::io(op, &self.partial, e);
        let t = Instant::now();
        self.file.set_len(at).map_err(io("size the file"))?;
        self.file.sync_data().map_err(io("fsync"))?;
        let mut head = FilePrefix::for_header(&body).encode().to_vec();
        head.extend_from_slice(&body);
        write_buf(&self.file, &head, 0).map_err(io("write the header"))?;
        self.file.sync_all().map_err(io("fsync"))?;
        std::fs::rename(&self.partial, &self.path).map_err(io("rename"))?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok((at, t.elapsed().as_secs_f64() * 1e3))
    }
}

/// The channels between the coordinator and its threads.
struct Channels {
    batches: Sender<Batch>,
    written: Receiver<Result<Written, FileError>>,
    threads: Receiver<ThreadDone>,
}

struct Saver<'a, 'p> {
    vm: Vm<'a>,
    config: &'a SaveConfig,
    target: &'a Target,
    regions: &'a [RegionMap],
    tail: AtomicU64,
    /// Cancelled at the guest's pause: devices read their final state.
    paused: CancelToken,
    progress: &'p (dyn Fn(&SaveRound) + Sync),
}

impl<'a> Saver<'a, '_> {
    /// Starts the threads, runs the rounds and the switchover; returns what the file's
    /// tail needs. `paused_at` is set when this save pauses the guest.
    fn capture<'s>(
        &'s self,
        rt: &Runtime<'s, '_>,
        paused_at: &mut Option<Instant>,
    ) -> Result<Captured, FileError> {
        let live = !self.config.paused;
        let ch = self.start_writers(rt);
        let devices = self.start_devices(rt, live);
        let ranges = self.vm.guest.descriptor().ranges;
        let (mut dirty, mut rounds) = if live {
            self.live_rounds(&ch, &ranges)?
        } else {
            let mut all = DirtyBitmap::new(&ranges);
            all.set_all();
            (all, Vec::new())
        };
        if self.config.cancel.is_cancelled() {
            return Err(FileError::Cancelled);
        }
        if live {
            self.vm.guest.pause()?;
            *paused_at = Some(Instant::now());
        }
        self.paused.cancel();
        if live {
            self.vm.guest.sync_dirty_log(&mut dirty)?;
            self.vm.guest.stop_dirty_log()?;
        }
        let state = self.start_state(rt);
        let mut last = self.save_pages(&ch, &dirty, rounds.len() as u32)?;
        last.dirty_after = 0;
        (self.progress)(&last);
        rounds.push(last);
        drop(ch.batches);
        let (state, vmstates) = self.wait(&state, &ch.threads)??;
        let mut chunks = vec![Vec::new(); self.vm.devices.len()];
        for _ in 0..chunks.len() {
            let (i, r) = self.wait(&devices, &ch.threads)?;
            chunks[i] = r?;
        }
        Ok(Captured {
            rounds,
            chunks,
            state,
            vmstates,
        })
    }

    /// Rounds with the guest running: every page, then the pages dirtied meanwhile, until
    /// the rest would be written within the downtime limit (or the round bound). Returns
    /// the pages still to write and the rounds.
    fn live_rounds(
        &self,
        ch: &Channels,
        ranges: &[livemig_wire::MemoryRange],
    ) -> Result<(DirtyBitmap, Vec<SaveRound>), FileError> {
        self.vm.guest.start_dirty_log()?;
        let mut dirty = DirtyBitmap::new(ranges);
        dirty.set_all();
        let mut rounds = Vec::new();
        loop {
            let mut r = self.save_pages(ch, &dirty, rounds.len() as u32)?;
            dirty.clear();
            self.vm.guest.sync_dirty_log(&mut dirty)?;
            r.dirty_after = dirty.count();
            (self.progress)(&r);
            let per_ms = r.pages as f64 / r.ms.max(1e-3);
            let expected_ms = r.dirty_after as f64 / per_ms.max(1e-9);
            let limit_ms = self.config.downtime_limit.as_secs_f64() * 1e3;
            rounds.push(r);
            if expected_ms <= limit_ms || rounds.len() as u32 >= self.config.max_rounds {
                return Ok((dirty, rounds));
            }
        }
    }

    fn start_writers<'s>(&'s self, rt: &Runtime<'s, '_>) -> Channels {
        let n = self.config.channels as usize;
        let (batches, batch_rx) = crossbeam_channel::bounded::<Batch>(n * 2);
        let (written_tx, written) = crossbeam_channel::unbounded();
        for i in 0..n {
            let (rx, tx) = (batch_rx.clone(), written_tx.clone());
            let cancel = &self.config.cancel;
            rt.spawn(&format!("ch{i}"), move || {
                for b in rx.iter() {
                    let r = match cancel.is_cancelled() {
                        true => Err(FileError::Cancelled),
                        false => {
                            write_batch(&self.target.pages, &self.target.partial, self.regions, &b)
                        }
                    };
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        Channels {
            batches,
            written,
            threads: rt.completions(),
        }
    }

    /// A job per device, saving its stream; each sends `(index, chunks)` when done.
    fn start_devices<'s>(
        &'s self,
        rt: &Runtime<'s, '_>,
        live: bool,
    ) -> Receiver<(usize, Result<Vec<ChunkRef>, FileError>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        for (i, &d) in self.vm.devices.iter().enumerate() {
            let tx = tx.clone();
            rt.submit(&format!("dev{i}"), move || {
                let sink = DeviceSink {
                    file: &self.target.file,
                    path: &self.target.partial,
                    tail: &self.tail,
                    chunk_size: self.config.chunk_size as usize,
                    paused: &self.paused,
                    cancel: &self.config.cancel,
                };
                let _ = tx.send((i, sink.save(d, live)));
                Ok(())
            });
        }
        rx
    }

    /// The guest's state and the small devices' blobs, saved on a job of their own while
    /// the last round is written.
    #[allow(clippy::type_complexity)]
    fn start_state<'s>(
        &'s self,
        rt: &Runtime<'s, '_>,
    ) -> Receiver<Result<(Vec<u8>, Vec<u8>), FileError>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        rt.submit("state", move || {
            let blobs = || -> Result<(Vec<u8>, Vec<u8>), FileError> {
                let state = self.vm.guest.save_state()?;
                let blobs = self
                    .vm
                    .vmstates
                    .iter()
                    .map(|d| d.save())
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((state, VmStates { blobs }.encode()))
            };
            let _ = tx.send(blobs());
            Ok(())
        });
        rx
    }

    /// Writes the pages marked in `dirty` through the channel threads; returns once every
    /// batch is written.
    fn save_pages(
        &self,
        ch: &Channels,
        dirty: &DirtyBitmap,
        round: u32,
    ) -> Result<SaveRound, FileError> {
        if self.config.cancel.is_cancelled() {
            return Err(FileError::Cancelled);
        }
        let t = Instant::now();
        let (mut sent, mut got, mut w) = (0u64, 0u64, Written::default());
        for_each_batch(dirty, self.regions, |mut b| loop {
            while let Ok(r) = ch.written.try_recv() {
                got += 1;
                w.add(r?);
            }
            match ch.batches.send_timeout(b, Duration::from_millis(50)) {
                Ok(()) => {
                    sent += 1;
                    return Ok(());
                }
                Err(SendTimeoutError::Timeout(back)) => {
                    b = back;
                    self.check_threads(&ch.threads)?;
                }
                Err(SendTimeoutError::Disconnected(_)) => return Err(FileError::Cancelled),
            }
        })?;
        while got < sent {
            got += 1;
            w.add(self.wait(&ch.written, &ch.threads)??);
        }
        Ok(SaveRound {
            round,
            pages: w.pages,
            data_pages: w.data,
            zero_pages: w.zero,
            ms: t.elapsed().as_secs_f64() * 1e3,
            dirty_after: 0,
        })
    }

    /// A failed or panicked thread, or a cancel, as an error.
    fn check_threads(&self, threads: &Receiver<ThreadDone>) -> Result<(), FileError> {
        if self.config.cancel.is_cancelled() {
            return Err(FileError::Cancelled);
        }
        while let Ok(d) = threads.try_recv() {
            thread_failure(d)?;
        }
        Ok(())
    }

    fn wait<T>(&self, rx: &Receiver<T>, threads: &Receiver<ThreadDone>) -> Result<T, FileError> {
        wait(rx, threads, &self.config.cancel)
    }
}

/// The next message on `rx`, unless a thread fails or `cancel` is cancelled first.
pub(super) fn wait<T>(
    rx: &Receiver<T>,
    threads: &Receiver<ThreadDone>,
    cancel: &CancelToken,
) -> Result<T, FileError> {
    loop {
        crossbeam_channel::select! {
            recv(rx) -> m => match m {
                Ok(m) => return Ok(m),
                // Its senders are gone without a word: a thread failed; say which.
                Err(_) => {
                    while let Ok(d) = threads.recv_timeout(Duration::from_secs(1)) {
                        thread_failure(d)?;
                    }
                    return Err(FileError::Cancelled);
                }
            },
            recv(threads) -> d => if let Ok(d) = d { thread_failure(d)? },
            recv(cancel.waiter()) -> _ => return Err(FileError::Cancelled),
        }
    }
}

fn thread_failure(d: ThreadDone) -> Result<(), FileError> {
    match d.result {
        Ok(()) => Ok(()),
        Err(ThreadError::Cancelled) => Err(FileError::Cancelled),
        Err(e) => Err(FileError::Job(e)),
    }
}
