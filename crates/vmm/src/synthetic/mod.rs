//! The synthetic guest: guest memory in `vm-memory` with threads standing in for vCPUs that
//! dirty a working set at a set rate. Every write goes through `vm-memory`, so its dirty
//! bitmap is the dirty log; every page follows [`crate::pattern`], so the whole memory can be
//! checked for exactness against the generation table kept in the guest's state.
//!
//! It is the guest used where /dev/kvm is absent, and the one the engine's tests run on.

mod state;

pub use state::{StateError, SyntheticState, Workload, VERSION as STATE_VERSION};

use crate::memory::{self, Backing};
use crate::pattern;
use crate::throttle::{Throttle, ThrottleClock};
use livemig_engine::{DirtyBitmap, Guest, GuestError, GuestMemory, VerifyReport};
use livemig_wire::{GuestDescriptor, MemoryRange, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The kind name in the wire's guest descriptor.
pub const KIND: &str = "synthetic";

/// How to build a synthetic guest on the source.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    pub memory_bytes: u64,
    /// Share of pages written once before the migration (the rest stay zero), 0.0..=1.0.
    pub fill: f64,
    pub workload: Workload,
    /// Where guest memory lives (memfds for local mode).
    pub backing: Backing,
}

/// What the workload threads share with the guest.
struct Shared {
    memory: GuestMemory,
    gens: Vec<AtomicU32>,
    counter: AtomicU64,
    workload: Mutex<Workload>,
    pause_requested: AtomicBool,
    stop: AtomicBool,
    /// Auto-converge's throttle on the workload threads.
    throttle: Throttle,
    /// Workload threads parked at a pause.
    parked: Mutex<usize>,
    cv: Condvar,
}

/// A guest whose "vCPUs" are host threads writing checkable pages.
pub struct SyntheticGuest {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl SyntheticGuest {
    /// Builds, fills and starts a guest.
    pub fn start(config: &SyntheticConfig) -> Result<Self, GuestError> {
        let bytes = config.memory_bytes / PAGE_SIZE as u64 * PAGE_SIZE as u64;
        if bytes == 0 {
            return Err(GuestError::new(
                "create",
                "memory size must be at least one page",
            ));
        }
        let g = Self::build(memory::allocate(
            &[MemoryRange {
                guest_addr: 0,
                size: bytes,
            }],
            config.backing,
        )?);
        {
            let mut w = g.shared.workload.lock().unwrap_or_else(|p| p.into_inner());
            *w = config.workload;
            w.working_set_pages = w.working_set_pages.min(g.pages());
        }
        g.fill(config.fill);
        g.spawn_workers()?;
        Ok(g)
    }

    /// Builds a paused guest on `memory` without writing it (a migration's destination).
    fn build(memory: GuestMemory) -> Self {
        let pages = (memory.iter().map(|r| r.len()).sum::<u64>() / PAGE_SIZE as u64) as usize;
        SyntheticGuest {
            shared: Arc::new(Shared {
                memory,
                gens: (0..pages).map(|_| AtomicU32::new(0)).collect(),
                counter: AtomicU64::new(0),
                workload: Mutex::new(Workload {
                    working_set_pages: 0,
                    rate: 0,
                    threads: 1,
                }),
                pause_requested: AtomicBool::new(true),
                stop: AtomicBool::new(false),
                throttle: Throttle::default(),
                parked: Mutex::new(0),
                cv: Condvar::new(),
            }),
            workers: Mutex::new(Vec::new()),
        }
    }

    fn pages(&self) -> u64 {
        self.shared.gens.len() as u64
    }

    /// Page writes so far: a counter that only grows, carried across migrations.
    pub fn counter(&self) -> u64 {
        self.shared.counter.load(Ordering::Acquire)
    }

    /// Writes generation 1 into the first `share` of every 100 pages, on two threads.
    fn fill(&self, share: f64) {
        let per100 = (share.clamp(0.0, 1.0) * 100.0).round() as u64;
        let pages = self.pages();
        std::thread::scope(|s| {
            for part in 0..2u64 {
                let shared = &self.shared;
                s.spawn(move || {
                    let mut buf = [0u8; PAGE_SIZE];
                    for p in (part..pages).step_by(2).filter(|p| p % 100 < per100) {
                        shared.write_page(p, &mut buf);
                    }
                });
            }
        });
    }

    /// Starts the workload threads (once; they then follow pause and resume).
    fn spawn_workers(&self) -> Result<(), GuestError> {
        let mut workers = self.workers.lock().unwrap_or_else(|p| p.into_inner());
        if !workers.is_empty() {
            return Ok(());
        }
        let threads = self.shared.workload().threads;
        self.shared.pause_requested.store(false, Ordering::Release);
        for t in 0..threads {
            let shared = Arc::clone(&self.shared);
            let h = std::thread::Builder::new()
                .name(format!("synthetic-vcpu{t}"))
                .spawn(move || shared.work(t, threads))
                .map_err(|e| GuestError::new("start workload", e))?;
            workers.push(h);
        }
        Ok(())
    }
}

impl Shared {
    fn workload(&self) -> Workload {
        *self.workload.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the next generation of page `p`. Only one thread ever writes a given page.
    fn write_page(&self, p: u64, buf: &mut [u8; PAGE_SIZE]) {
        let gen = self.gens[p as usize].load(Ordering::Relaxed) + 1;
        pattern::fill(buf, p, gen);
        // Memory first, then the generation: a pause always sees both.
        if self
            .memory
            .write_slice(buf, GuestAddress(p * PAGE_SIZE as u64))
            .is_ok()
        {
            self.gens[p as usize].store(gen, Ordering::Release);
            self.counter.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A workload thread: writes pages `t, t + threads, ...` of the working set in turn.
    fn work(&self, t: u32, threads: u32) {
        let mut buf = [0u8; PAGE_SIZE];
        let mut next = t as u64;
        let mut written = 0u64;
        let mut since = Instant::now();
        let mut clock = ThrottleClock::default();
        loop {
            if self.pause_requested.load(Ordering::Acquire) {
                self.park();
                written = 0;
                since = Instant::now();
                clock.restart();
            }
            if let Some(d) = clock.due(&self.throttle) {
                self.sleep(d);
                clock.restart();
                // The rate schedule restarts too: throttled time is not made up later.
                written = 0;
                since = Instant::now();
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            let w = self.workload();
            if w.working_set_pages == 0 {
                self.sleep(Duration::from_millis(50));
                continue;
            }
            if next >= w.working_set_pages {
                next = t as u64 % w.working_set_pages.max(1);
            }
            self.write_page(next, &mut buf);
            next += threads as u64;
            written += 1;
            if w.rate > 0 {
                let per_thread = (w.rate as f64 / threads as f64).max(1.0);
                let due = Duration::from_secs_f64(written as f64 / per_thread);
                let elapsed = since.elapsed();
                if due > elapsed + Duration::from_millis(1) {
                    self.sleep(due - elapsed);
                }
            }
        }
    }

    /// Sleeps up to `d`, waking early for a pause or stop.
    fn sleep(&self, d: Duration) {
        let parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.cv.wait_timeout_while(parked, d, |_| {
            !self.pause_requested.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire)
        });
    }

    /// Waits out a pause, counted as parked so `pause()` knows this thread is still.
    fn park(&self) {
        let mut parked = self.parked.lock().unwrap_or_else(|p| p.into_inner());
        *parked += 1;
        self.cv.notify_all();
        while self.pause_requested.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            parked = self.cv.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        *parked -= 1;
    }
}

impl Guest for SyntheticGuest {
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError> {
        self.shared.throttle.set(percent);
        Ok(())
    }

    fn descriptor(&self) -> GuestDescriptor {
        GuestDescriptor {
            kind: KIND.into(),
            vcpus: self.shared.workload().threads as u16,
            page_size: PAGE_SIZE as u32,
            ranges: memory::ranges_of(&self.shared.memory),
        }
    }

    fn memory(&self) -> &GuestMemory {
        &self.shared.memory
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        for r in self.shared.memory.iter() {
            r.get_mmap().bitmap().reset();
        }
        Ok(())
    }

    fn sync_dirty_log(&self, out: &mut DirtyBitmap) -> Result<(), GuestError> {
        for (i, r) in self.shared.memory.iter().enumerate() {
            out.or_range_words(i, &r.get_mmap().bitmap().get_and_reset());
        }
        Ok(())
    }

    fn stop_dirty_log(&self) -> Result<(), GuestError> {
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        let s = &self.shared;
        s.pause_requested.store(true, Ordering::Release);
        s.cv.notify_all();
        let running = self.workers.lock().unwrap_or_else(|p| p.into_inner()).len();
        let mut parked = s.parked.lock().unwrap_or_else(|p| p.into_inner());
        while *parked < running {
            parked = s.cv.wait(parked).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        if self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            return self.spawn_workers();
        }
        let s = &self.shared;
        let _parked = s.parked.lock().unwrap_or_else(|p| p.into_inner());
        s.pause_requested.store(false, Ordering::Release);
        s.cv.notify_all();
        Ok(())
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let s = &self.shared;
        Ok(SyntheticState {
            counter: s.counter.load(Ordering::Acquire),
            workload: s.workload(),
            gens: s.gens.iter().map(|g| g.load(Ordering::Acquire)).collect(),
        }
        .encode())
    }

    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let st = SyntheticState::decode(blob, self.pages())
            .map_err(|e| GuestError::new("restore state", e))?;
        let s = &self.shared;
        for (g, v) in s.gens.iter().zip(&st.gens) {
            g.store(*v, Ordering::Release);
        }
        s.counter.store(st.counter, Ordering::Release);
        *s.workload.lock().unwrap_or_else(|p| p.into_inner()) = st.workload;
        Ok(())
    }

    fn verify(&self) -> Result<VerifyReport, GuestError> {
        let s = &self.shared;
        let pages = self.pages();
        let mut report = VerifyReport::default();
        let results: Vec<VerifyReport> = std::thread::scope(|sc| {
            let parts: Vec<_> = (0..2u64)
                .map(|part| {
                    sc.spawn(move || {
                        let mut r = VerifyReport::default();
                        let mut buf = [0u8; PAGE_SIZE];
                        for p in (part..pages).step_by(2) {
                            r.pages_checked += 1;
                            let gen = s.gens[p as usize].load(Ordering::Acquire);
                            let ok = s
                                .memory
                                .read_slice(&mut buf, GuestAddress(p * PAGE_SIZE as u64))
                                .is_ok();
                            let verdict = if ok {
                                pattern::check(&buf, p, gen)
                            } else {
                                Err(pattern::Mismatch::Corrupt)
                            };
                            if let Err(m) = verdict {
                                r.pages_mismatched += 1;
                                if r.examples.len() < 5 {
                                    r.examples.push(format!(
                                        "page {p} (0x{:x}): {m:?}",
                                        p * PAGE_SIZE as u64
                                    ));
                                }
                            }
                        }
                        r
                    })
                })
                .collect();
            parts
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        });
        for r in results {
            report.pages_checked += r.pages_checked;
            report.pages_mismatched += r.pages_mismatched;
            report.examples.extend(r.examples);
        }
        let total: u64 = s
            .gens
            .iter()
            .map(|g| g.load(Ordering::Acquire) as u64)
            .sum();
        let counter = s.counter.load(Ordering::Acquire);
        if total != counter {
            report.pages_mismatched += 1;
            report.examples.push(format!(
                "write counter is {counter} but the pages hold {total} writes: the counter was reset or repeated"
            ));
        }
        report.examples.truncate(5);
        report.counter = counter;
        Ok(report)
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        let s = &self.shared;
        {
            let _parked = s.parked.lock().unwrap_or_else(|p| p.into_inner());
            s.stop.store(true, Ordering::Release);
            s.cv.notify_all();
        }
        for h in self
            .workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = h.join();
        }
    }
}

/// Builds the destination's synthetic guest from a source's description.
pub fn create_paused(desc: &GuestDescriptor) -> Result<SyntheticGuest, GuestError> {
    let memory = memory::allocate(&desc.ranges, Backing::Anonymous)?;
    create_paused_on(desc, memory)
}

/// Builds a paused guest for `desc` on `memory` that already holds its RAM (local mode).
pub fn create_paused_on(
    desc: &GuestDescriptor,
    memory: GuestMemory,
) -> Result<SyntheticGuest, GuestError> {
    if memory::ranges_of(&memory) != desc.ranges {
        return Err(GuestError::new(
            "create",
            "memory does not match the described ranges",
        ));
    }
    Ok(SyntheticGuest::build(memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(rate: u64) -> SyntheticGuest {
        SyntheticGuest::start(&SyntheticConfig {
            memory_bytes: 4 << 20,
            fill: 0.5,
            workload: Workload {
                working_set_pages: 64,
                rate,
                threads: 2,
            },
            backing: Default::default(),
        })
        .unwrap()
    }

    #[test]
    fn memory_is_exact_while_paused_and_counter_grows() {
        let g = small(0);
        std::thread::sleep(Duration::from_millis(30));
        g.pause().unwrap();
        let c1 = g.counter();
        let v = g.verify().unwrap();
        assert_eq!(v.pages_checked, 1024);
        assert_eq!(v.pages_mismatched, 0, "{:?}", v.examples);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.counter(), c1, "a paused guest must not write");
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(g.counter() > c1);
    }

    #[test]
    fn dirty_log_sees_the_workload() {
        let g = small(0);
        g.start_dirty_log().unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let mut d = DirtyBitmap::new(&g.descriptor().ranges);
        g.sync_dirty_log(&mut d).unwrap();
        assert!(d.count() > 0 && d.count() <= 64, "dirty {}", d.count());
        assert!(d.addrs().all(|a| a < 64 * PAGE_SIZE as u64));
    }

    #[test]
    fn verify_catches_a_stale_page() {
        let g = small(0);
        std::thread::sleep(Duration::from_millis(20));
        g.pause().unwrap();
        let mut buf = [0u8; PAGE_SIZE];
        let gen = g.shared.gens[3].load(Ordering::Acquire);
        assert!(gen >= 2);
        pattern::fill(&mut buf, 3, gen - 1);
        g.memory()
            .write_slice(&buf, GuestAddress(3 * PAGE_SIZE as u64))
            .unwrap();
        let v = g.verify().unwrap();
        assert_eq!(v.pages_mismatched, 1);
        assert!(
            v.examples[0].contains("WrongGeneration"),
            "{:?}",
            v.examples
        );
    }

    #[test]
    fn state_moves_to_a_new_guest() {
        let g = small(0);
        std::thread::sleep(Duration::from_millis(20));
        g.pause().unwrap();
        let blob = g.save_state().unwrap();
        let d = create_paused(&g.descriptor()).unwrap();
        // Copy memory by hand, as a migration would.
        let mut buf = [0u8; PAGE_SIZE];
        for p in 0..1024u64 {
            let a = GuestAddress(p * PAGE_SIZE as u64);
            g.memory().read_slice(&mut buf, a).unwrap();
            d.memory().write_slice(&buf, a).unwrap();
        }
        d.restore_state(&blob).unwrap();
        assert_eq!(d.counter(), g.counter());
        assert_eq!(d.verify().unwrap().pages_mismatched, 0);
        d.resume().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        d.pause().unwrap();
        assert!(d.counter() > g.counter());
        assert_eq!(d.verify().unwrap().pages_mismatched, 0);
    }
}
