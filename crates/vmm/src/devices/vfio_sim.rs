//! A VFIO-like device: state of any size, readable only sequentially at a bounded rate,
//! loadable only in order, every byte checked on the destination without storing anything.
//!
//! # The stream
//!
//! What [`VfioSim`] saves is a sequence of sections: zero or more precopy sections while the
//! guest runs, then exactly one final section at switchover. A section is
//!
//! ```text
//! header (24 bytes, little-endian)
//!   0  magic    u32  "VFSM"
//!   4  version  u8   1
//!   5  kind     u8   1 = precopy, 2 = final
//!   6  reserved u16  0
//!   8  generation u64
//!   16 length   u64  payload bytes: `precopy` for precopy sections, `size` for the final one
//! payload (length bytes): the pattern of (seed, kind, generation), see `vfio_stream::Pattern`
//! trailer: crc32c u32 of header and payload
//! ```
//!
//! # Generations
//!
//! The device's state "changes while the guest runs": its generation advances every
//! `gen_ms` of wall time (and on [`VfioSim::advance_generation`]). `save_precopy` offers one
//! precopy section per generation (the generation current when the section starts) and
//! returns 0 once the current generation's section has been read. At the first `save_final`
//! the generation freezes (the guest is paused) and the final section carries it; a section
//! of precopy data left half-read is finished first, so the stream stays whole. `begin_save`
//! thaws the generation and restarts the stream, so a retried migration starts afresh.
//!
//! # Pacing
//!
//! Reads sleep so that bytes read / time since the phase began never exceeds `rate`: the
//! precopy phase starts at `begin_save`, the final phase at the first `save_final`.
//!
//! # What it reports
//!
//! [`Device::pending`] answers as a VFIO device does (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`,
//! precopy info): the precopy data still to read now (the rest of a section begun, or a
//! whole section when the generation moved on since the last one was read; it shrinks as
//! precopy reads it and grows back with the next generation), the bytes a final save would
//! read now (the rest of a precopy section begun, which the final save finishes first, and
//! the final section; once the final save has begun, what is left of it), and `rate`.
//!
//! # Loading
//!
//! The destination's twin ([`VfioSim::from_descriptor`]) checks every byte against the
//! pattern at its offset as it arrives, and each section's digest at its end; the first
//! wrong byte breaks the device for good, like real hardware, with an error naming the
//! offset. Only counters and a running crc are kept, never the state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use livemig_engine::{Device, DeviceDescriptor, DeviceError, SavePending};

pub use super::vfio_config::VfioSimConfig;
use super::vfio_load::StreamLoader;
use super::vfio_stream::{section_total, SectionHeader, SectionKind, SectionWriter};

pub const KIND: &str = "vfio-sim";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The device generation: advances with wall time unless frozen (guest paused).
#[derive(Debug)]
struct GenClock {
    base: u64,
    epoch: Instant,
    frozen: Option<u64>,
}

impl GenClock {
    fn new(base: u64) -> Self {
        GenClock {
            base,
            epoch: Instant::now(),
            frozen: None,
        }
    }

    fn current(&self, gen_ms: u64) -> u64 {
        match (self.frozen, gen_ms) {
            (Some(g), _) => g,
            (None, 0) => self.base,
            (None, ms) => {
                let ticks = u64::try_from(self.epoch.elapsed().as_millis() / u128::from(ms));
                self.base.saturating_add(ticks.unwrap_or(u64::MAX))
            }
        }
    }
}

/// Source-side state.
struct SaveState {
    gen: GenClock,
    /// A precopy section being read.
    precopy: Option<SectionWriter>,
    last_precopy_gen: Option<u64>,
    precopy_clock: (Instant, u64),
    /// The final section, from the first `save_final` of this attempt.
    final_: Option<SectionWriter>,
    final_clock: (Instant, u64),
    /// Test hooks still armed (save hooks fire once; `fail_load_at` is only carried).
    hooks: VfioSimConfig,
}

/// A VFIO-like device model (source or destination side; see the module docs).
pub struct VfioSim {
    name: String,
    cfg: VfioSimConfig,
    save: Mutex<SaveState>,
    load: Mutex<StreamLoader>,
    bytes_saved: AtomicU64,
    bytes_loaded: AtomicU64,
    /// Set by `interrupt_save` (cleared by `begin_save`): a stalled final save ends.
    interrupted: (Mutex<bool>, std::sync::Condvar),
}

impl VfioSim {
    pub fn new(name: impl Into<String>, cfg: VfioSimConfig) -> Self {
        let now = Instant::now();
        VfioSim {
            name: name.into(),
            save: Mutex::new(SaveState {
                gen: GenClock::new(0),
                precopy: None,
                last_precopy_gen: None,
                precopy_clock: (now, 0),
                final_: None,
                final_clock: (now, 0),
                hooks: cfg.clone(),
            }),
            load: Mutex::new(StreamLoader::new(&cfg)),
            interrupted: Default::default(),
            cfg,
            bytes_saved: AtomicU64::new(0),
            bytes_loaded: AtomicU64::new(0),
        }
    }

    /// The destination's twin of a device a source described.
    pub fn from_descriptor(desc: &DeviceDescriptor) -> Result<Self, DeviceError> {
        if desc.kind != KIND {
            return Err(DeviceError::new(
                &desc.name,
                "create",
                format!("kind '{}' is not {KIND}", desc.kind),
            ));
        }
        let cfg = VfioSimConfig::decode(&desc.config)
            .map_err(|e| DeviceError::new(&desc.name, "create", e))?;
        Ok(VfioSim::new(desc.name.clone(), cfg))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &VfioSimConfig {
        &self.cfg
    }

    /// The device's generation now.
    pub fn generation(&self) -> u64 {
        let s = lock(&self.save);
        s.gen.current(self.cfg.gen_ms)
    }

    /// Test hook: the guest changes the device's state now.
    pub fn advance_generation(&self) {
        let mut s = lock(&self.save);
        if s.gen.frozen.is_none() {
            s.gen.base = s.gen.base.saturating_add(1);
        }
    }

    /// The guest runs again (after a failed attempt): the generation, frozen at the first
    /// `save_final`, advances again from where it stopped. `begin_save` does this too.
    pub fn resume(&self) {
        let mut s = lock(&self.save);
        if let Some(g) = s.gen.frozen.take() {
            s.gen = GenClock::new(g);
        }
    }

    /// Test hook: disarm every failure injection (later descriptors carry none).
    pub fn disarm(&self) {
        lock(&self.save).hooks = self.cfg.without_hooks();
    }

    /// Bytes returned by `save_precopy` and `save_final` since creation.
    pub fn bytes_saved(&self) -> u64 {
        self.bytes_saved.load(Ordering::Relaxed)
    }

    /// Bytes accepted by `load` since creation.
    pub fn bytes_loaded(&self) -> u64 {
        self.bytes_loaded.load(Ordering::Relaxed)
    }

    /// True once the final section has been loaded whole, in order, digest matching.
    pub fn loaded_in_order_ok(&self) -> bool {
        lock(&self.load).is_done()
    }

    /// Checks that the source device is intact: it still produces its whole state for its
    /// current generation, and a fresh twin loads that state in order with matching digests.
    /// Independent of any save in progress.
    pub fn verify_intact(&self) -> Result<(), DeviceError> {
        let gen = self.generation();
        let twin = VfioSim::new(self.name.clone(), self.cfg.without_hooks());
        let hdr = SectionHeader {
            kind: SectionKind::Final,
            generation: gen,
            len: self.cfg.size,
        };
        let mut w = SectionWriter::new(self.cfg.seed, hdr);
        let mut buf = Vec::with_capacity(1 << 20);
        while !w.is_done() {
            buf.clear();
            w.write(&mut buf, 1 << 20);
            twin.load(&buf)
                .map_err(|e| DeviceError::new(&self.name, "verify_intact", e.detail))?;
        }
        twin.load_complete()
            .map_err(|e| DeviceError::new(&self.name, "verify_intact", e.detail))
    }

    /// The stall hook: waits `d`, or less if the save is interrupted (then fails).
    fn stall(&self, d: Duration) -> Result<(), DeviceError> {
        let flag = lock(&self.interrupted.0);
        let (flag, _) = self
            .interrupted
            .1
            .wait_timeout_while(flag, d, |interrupted| !*interrupted)
            .unwrap_or_else(|p| p.into_inner());
        match *flag {
            true => Err(self.err("save_final", "interrupted during the injected stall")),
            false => Ok(()),
        }
    }

    fn err(&self, op: &'static str, detail: impl std::fmt::Display) -> DeviceError {
        DeviceError::new(&self.name, op, detail)
    }
}

/// How long to sleep so that `bytes` since `start` do not exceed `rate` bytes/s.
fn pace_delay(start: Instant, bytes: u64, rate: u64) -> Option<Duration> {
    if rate == 0 {
        return None;
    }
    let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(rate);
    let due = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
    due.checked_sub(start.elapsed()).filter(|d| !d.is_zero())
}

impl Device for VfioSim {
    fn descriptor(&self) -> DeviceDescriptor {
        let hooks = lock(&self.save).hooks.clone();
        DeviceDescriptor {
            kind: KIND.to_string(),
            name: self.name.clone(),
            config: hooks.encode(),
        }
    }

    fn begin_save(&self) -> Result<(), DeviceError> {
        self.resume();
        *lock(&self.interrupted.0) = false;
        let mut s = lock(&self.save);
        s.precopy = None;
        s.last_precopy_gen = None;
        s.final_ = None;
        s.precopy_clock = (Instant::now(), 0);
        Ok(())
    }

    fn save_precopy(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError> {
        let delay;
        let n;
        {
            let mut s = lock(&self.save);
            if s.final_.is_some() {
                return Err(self.err("save_precopy", "called after save_final began"));
            }
            if self.cfg.precopy == 0 {
                return Ok(0);
            }
            if s.precopy.is_none() {
                let generation = s.gen.current(self.cfg.gen_ms);
                if s.last_precopy_gen == Some(generation) {
                    return Ok(0);
                }
                let hdr = SectionHeader {
                    kind: SectionKind::Precopy,
                    generation,
                    len: self.cfg.precopy,
                };
                s.precopy = Some(SectionWriter::new(self.cfg.seed, hdr));
            }
            let Some(w) = s.precopy.as_mut() else {
                return Ok(0);
            };
            n = w.write(out, max);
            if w.is_done() {
                let generation = w.header().generation;
                s.precopy = None;
                s.last_precopy_gen = Some(generation);
            }
            s.precopy_clock.1 += n as u64;
            delay = pace_delay(s.precopy_clock.0, s.precopy_clock.1, self.cfg.rate);
        }
        self.bytes_saved.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        Ok(n)
    }

    fn save_final(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError> {
        let start_len = out.len();
        let stall = lock(&self.save).hooks.stall_final_ms.take();
        if let Some(ms) = stall {
            self.stall(Duration::from_millis(ms))?;
        }
        let mut s = lock(&self.save);
        if s.final_.is_none() {
            let generation = s.gen.current(self.cfg.gen_ms);
            s.gen.frozen = Some(generation);
            let hdr = SectionHeader {
                kind: SectionKind::Final,
                generation,
                len: self.cfg.size,
            };
            s.final_ = Some(SectionWriter::new(self.cfg.seed, hdr));
            s.final_clock = (Instant::now(), 0);
        }
        // First the rest of a half-read precopy section, so the stream stays whole.
        let mut n = 0;
        if let Some(w) = s.precopy.as_mut() {
            n += w.write(out, max);
            if w.is_done() {
                let generation = w.header().generation;
                s.precopy = None;
                s.last_precopy_gen = Some(generation);
            }
        }
        let hooks = (s.hooks.fail_save_at, s.hooks.panic_save_at);
        let Some(w) = s.final_.as_mut() else {
            return Err(self.err("save_final", "no final section"));
        };
        let from = w.pos();
        let want = (max - n).min(usize::try_from(w.remaining()).unwrap_or(usize::MAX));
        let hits = |at: Option<u64>| at.filter(|&a| a >= from && a < from + want as u64);
        if let Some(at) = hits(hooks.0) {
            s.hooks.fail_save_at = None;
            out.truncate(start_len);
            return Err(self.err(
                "save_final",
                format!("injected failure at byte {at} of the final state"),
            ));
        }
        if let Some(at) = hits(hooks.1) {
            s.hooks.panic_save_at = None;
            out.truncate(start_len);
            drop(s);
            panic!(
                "vfio-sim {}: injected panic at byte {at} of the final state",
                self.name
            );
        }
        n += w.write(out, want);
        s.final_clock.1 += n as u64;
        let delay = pace_delay(s.final_clock.0, s.final_clock.1, self.cfg.rate);
        drop(s);
        self.bytes_saved.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(d) = delay {
            std::thread::sleep(d);
        }
        Ok(n)
    }

    fn pending(&self) -> Option<SavePending> {
        let s = lock(&self.save);
        let begun = s.precopy.as_ref().map_or(0, SectionWriter::remaining);
        let generation = s.gen.current(self.cfg.gen_ms);
        let next = match (&s.final_, &s.precopy) {
            (None, None) if self.cfg.precopy > 0 && s.last_precopy_gen != Some(generation) => {
                section_total(self.cfg.precopy)
            }
            _ => 0,
        };
        let final_rest = s
            .final_
            .as_ref()
            .map_or(section_total(self.cfg.size), SectionWriter::remaining);
        Some(SavePending {
            precopy_bytes: begun + next,
            final_bytes: begun + final_rest,
            read_rate: (self.cfg.rate > 0).then_some(self.cfg.rate),
        })
    }

    fn interrupt_save(&self) {
        *lock(&self.interrupted.0) = true;
        self.interrupted.1.notify_all();
    }

    fn abort_save(&self) -> Result<(), DeviceError> {
        self.resume();
        Ok(())
    }

    fn load(&self, data: &[u8]) -> Result<(), DeviceError> {
        lock(&self.load)
            .load(data)
            .map_err(|detail| self.err("load", detail))?;
        self.bytes_loaded
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn switchover_ready(&self) -> bool {
        lock(&self.load).initial_loaded()
    }

    fn load_complete(&self) -> Result<(), DeviceError> {
        let generation = lock(&self.load)
            .complete()
            .map_err(|detail| self.err("load_complete", detail))?;
        // This twin now holds the state: a later migration continues from it.
        lock(&self.save).gen = GenClock::new(generation);
        Ok(())
    }
}

#[cfg(test)]
#[path = "vfio_sim_tests.rs"]
mod tests;
