//! Embedding livemig-engine: a guest and a device of your own, migrated between two threads
//! over a loopback TCP socket.
//!
//! Run it with `cargo run -p livemig-engine --example embed`. What a VMM writes to embed
//! the engine is the two contracts below: [`Guest`] (memory, a dirty log, pause/resume and
//! a state blob) with a [`GuestFactory`] to build its twin on the destination, and
//! [`Device`] (a strictly ordered state stream) with a [`DeviceFactory`]. The engine does
//! the rest: channels, precopy rounds, switchover, handover.

use livemig_engine::device::{Device, DeviceDescriptor, DeviceError, DeviceFactory, VmState};
use livemig_engine::guest::{Guest, GuestError, GuestFactory, GuestMemory, VerifyReport};
use livemig_engine::incoming::{receive_vm, Factories};
use livemig_engine::source::{migrate_vm, Vm};
use livemig_engine::{DirtyBitmap, Endpoint, IncomingConfig, Listener, MigrationConfig};
use livemig_wire::{GuestDescriptor, MemoryRange, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MEMORY: u64 = 8 << 20;
const DEVICE_STATE: usize = 300 << 10;

/// A guest over an anonymous mmap (vm-memory), with one "vCPU": a thread that writes pages
/// while the guest runs. `running` is the vCPU's gate: it writes only while holding it
/// true, so `pause` returns once no write can happen any more.
struct RamGuest {
    memory: GuestMemory,
    running: Mutex<bool>,
    /// Writes made so far: the guest's non-memory state (think of it as its registers).
    counter: Mutex<u64>,
    /// Destination: the page hashes the source's state blob carried, for `verify`.
    expected: Mutex<Vec<u64>>,
}

impl RamGuest {
    /// `size` bytes of guest memory at guest address 0 (vm-memory maps them anonymous).
    fn new(size: u64, running: bool) -> Result<RamGuest, GuestError> {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| GuestError::new("create", e))?;
        Ok(RamGuest {
            memory,
            running: Mutex::new(running),
            counter: Mutex::new(0),
            expected: Mutex::new(Vec::new()),
        })
    }

    /// One vCPU step: while running, writes the next counter value into the next page. Every
    /// write through vm-memory marks its page in the region's dirty bitmap.
    fn step(&self) {
        let running = self.running.lock().unwrap();
        if *running {
            let mut n = self.counter.lock().unwrap();
            *n += 1;
            let page = *n % (MEMORY / PAGE_SIZE as u64);
            let addr = GuestAddress(page * PAGE_SIZE as u64 + (*n % 64) * 8);
            self.memory
                .write_obj(*n, addr)
                .expect("inside guest memory");
        }
    }

    /// Every page, hashed (FNV-1a): the guest's fingerprint, carried in its state blob.
    fn page_hashes(&self) -> Vec<u64> {
        let mut page = vec![0u8; PAGE_SIZE];
        (0..MEMORY / PAGE_SIZE as u64)
            .map(|p| {
                self.memory
                    .read_slice(&mut page, GuestAddress(p * PAGE_SIZE as u64))
                    .unwrap();
                page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                    (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
                })
            })
            .collect()
    }
}

impl Guest for RamGuest {
    fn descriptor(&self) -> GuestDescriptor {
        let ranges = vec![MemoryRange {
            guest_addr: 0,
            size: MEMORY,
        }];
        GuestDescriptor {
            kind: "embed".into(),
            vcpus: 1,
            page_size: PAGE_SIZE as u32,
            ranges,
        }
    }
    fn memory(&self) -> &GuestMemory {
        &self.memory
    }
    fn start_dirty_log(&self) -> Result<(), GuestError> {
        self.memory
            .iter()
            .for_each(|r| r.get_mmap().bitmap().reset());
        Ok(())
    }
    fn sync_dirty_log(&self, out: &mut DirtyBitmap) -> Result<(), GuestError> {
        for (i, r) in self.memory.iter().enumerate() {
            out.or_range_words(i, &r.get_mmap().bitmap().get_and_reset());
        }
        Ok(())
    }
    fn stop_dirty_log(&self) -> Result<(), GuestError> {
        Ok(())
    }
    fn pause(&self) -> Result<(), GuestError> {
        *self.running.lock().unwrap() = false;
        Ok(())
    }
    fn resume(&self) -> Result<(), GuestError> {
        *self.running.lock().unwrap() = true;
        Ok(())
    }
    /// The counter, then every page's hash (saved while paused: memory is final).
    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let mut blob = self.counter.lock().unwrap().to_le_bytes().to_vec();
        self.page_hashes()
            .iter()
            .for_each(|h| blob.extend(h.to_le_bytes()));
        Ok(blob)
    }
    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let mut words = blob
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()));
        *self.counter.lock().unwrap() = words.next().unwrap_or(0);
        *self.expected.lock().unwrap() = words.collect();
        Ok(())
    }
    /// With `IncomingConfig::verify`, the engine calls this before resuming the guest: the
    /// pages must hash as they did on the source at the pause.
    fn verify(&self) -> Result<VerifyReport, GuestError> {
        let expected = self.expected.lock().unwrap();
        let mut report = VerifyReport::default();
        for (p, (got, want)) in self.page_hashes().iter().zip(expected.iter()).enumerate() {
            report.pages_checked += 1;
            if got != want {
                report.pages_mismatched += 1;
                report.examples.push(format!("page {p} differs"));
            }
        }
        report.counter = *self.counter.lock().unwrap();
        Ok(report)
    }
}

/// Builds the destination's twin: same memory layout, paused, its vCPU not yet running.
struct RamGuestFactory;

impl GuestFactory for RamGuestFactory {
    fn create(&self, desc: &GuestDescriptor) -> Result<Box<dyn Guest>, GuestError> {
        Ok(Box::new(RamGuest::new(desc.memory_bytes(), false)?))
    }
}

/// A device whose migration state is one ordered byte stream (think of a VFIO device's
/// migration data): its bulk goes while the guest runs, its last 4 KiB once paused.
struct StreamDevice {
    /// The device's state: live on the source, what was loaded on the destination.
    state: Arc<Mutex<Vec<u8>>>,
    /// Source: how far the stream has been saved.
    sent: Mutex<usize>,
    /// The stream's length.
    len: usize,
}

impl StreamDevice {
    /// A device holding `state`, or (destination) an empty one that will load `len` bytes.
    fn new(state: Vec<u8>, len: usize) -> StreamDevice {
        StreamDevice {
            len,
            state: Arc::new(Mutex::new(state)),
            sent: Mutex::new(0),
        }
    }

    /// Appends the stream from where it stopped up to `end` (at most `max` bytes).
    fn save_up_to(&self, end: usize, out: &mut Vec<u8>, max: usize) -> usize {
        let state = self.state.lock().unwrap();
        let mut sent = self.sent.lock().unwrap();
        let n = end.saturating_sub(*sent).min(max);
        out.extend_from_slice(&state[*sent..*sent + n]);
        *sent += n;
        n
    }
}

impl Device for StreamDevice {
    /// The destination learns the stream's length from the descriptor's config blob.
    fn descriptor(&self) -> DeviceDescriptor {
        let config = (self.len as u32).to_le_bytes().to_vec();
        DeviceDescriptor {
            kind: "embed-dev".into(),
            name: "dev0".into(),
            config,
        }
    }
    fn begin_save(&self) -> Result<(), DeviceError> {
        *self.sent.lock().unwrap() = 0;
        Ok(())
    }
    fn save_precopy(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError> {
        Ok(self.save_up_to(self.len - 4096, out, max))
    }
    fn save_final(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError> {
        Ok(self.save_up_to(self.len, out, max))
    }
    fn abort_save(&self) -> Result<(), DeviceError> {
        Ok(()) // Saving changed nothing in the device: it runs on as it was.
    }
    /// Destination: the pieces come strictly in saved order, so appending rebuilds it.
    fn load(&self, data: &[u8]) -> Result<(), DeviceError> {
        self.state.lock().unwrap().extend_from_slice(data);
        Ok(())
    }
    fn load_complete(&self) -> Result<(), DeviceError> {
        match self.state.lock().unwrap().len() {
            n if n == self.len => Ok(()),
            n => Err(DeviceError::new(
                "dev0",
                "load",
                format!("{n} of {} bytes", self.len),
            )),
        }
    }
}

/// Builds the destination's devices, and keeps a handle on each one's state to check.
#[derive(Default)]
struct DeviceTwins {
    built: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
}

impl DeviceFactory for DeviceTwins {
    fn create_device(&self, desc: &DeviceDescriptor) -> Result<Box<dyn Device>, DeviceError> {
        let len = desc.config.get(..4).and_then(|b| b.try_into().ok());
        let len = len.ok_or(DeviceError::new(&desc.name, "create", "bad config"))?;
        let device = StreamDevice::new(Vec::new(), u32::from_le_bytes(len) as usize);
        self.built.lock().unwrap().push(device.state.clone());
        Ok(Box::new(device))
    }
    fn create_vmstate(&self, desc: &DeviceDescriptor) -> Result<Box<dyn VmState>, DeviceError> {
        Err(DeviceError::new(&desc.name, "create", "none here"))
    }
}

/// What arrived, compared with what left.
#[derive(Debug)]
pub struct Outcome {
    pub memory_exact: bool,
    pub device_exact: bool,
    pub counter: (u64, u64),
    pub rounds: usize,
    pub downtime_ms: f64,
}

/// Migrates a running guest with one device from a source thread to a destination thread
/// over loopback TCP, and compares both sides once the destination runs it.
pub fn run() -> Result<Outcome, Box<dyn std::error::Error>> {
    let guest = RamGuest::new(MEMORY, true)?;
    let state = (0..DEVICE_STATE).map(|i| (i * 7 % 251) as u8).collect();
    let device = StreamDevice::new(state, DEVICE_STATE);
    let twins = DeviceTwins::default();
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse::<Endpoint>()?)?;
    let to = listener.local_endpoint()?;
    let stop = AtomicBool::new(false);
    let (report, incoming) = std::thread::scope(|s| {
        // The guest's vCPU runs through the whole migration, dirtying pages.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                guest.step();
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let destination = s.spawn(|| {
            let factories = Factories {
                guest: &RamGuestFactory,
                devices: &twins,
            };
            let config = IncomingConfig {
                verify: true,
                ..Default::default()
            };
            receive_vm(&listener, factories, &config, &|_| {})
        });
        let vm = Vm {
            guest: &guest,
            devices: &[&device],
            vmstates: &[],
        };
        let report = migrate_vm(vm, &to, &MigrationConfig::default(), &|_| {});
        stop.store(true, Ordering::Relaxed);
        (report, destination.join().expect("destination thread"))
    });
    let (report, incoming) = (report?, incoming?);
    // The source guest stays paused after the handover: its memory is what was sent.
    let mut here = vec![0u8; MEMORY as usize];
    let mut there = vec![0u8; MEMORY as usize];
    guest.memory.read_slice(&mut here, GuestAddress(0))?;
    incoming
        .guest
        .memory()
        .read_slice(&mut there, GuestAddress(0))?;
    let device_here = device.state.lock().unwrap().clone();
    let device_there = twins.built.lock().unwrap()[0].lock().unwrap().clone();
    let counter_here = *guest.counter.lock().unwrap();
    let counter_there = u64::from_le_bytes(incoming.guest.save_state()?[..8].try_into()?);
    Ok(Outcome {
        memory_exact: here == there,
        device_exact: device_here == device_there,
        counter: (counter_here, counter_there),
        rounds: report.rounds.len(),
        downtime_ms: report.downtime_ms,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let o = run()?;
    let exact = |b| if b { "exact" } else { "DIFFERS" };
    let (memory, device) = (exact(o.memory_exact), exact(o.device_exact));
    println!(
        "migrated {} MiB + a {} KiB device in {} rounds, {:.1} ms downtime: memory {memory}, device {device}, vCPU writes {} -> {}",
        MEMORY >> 20, DEVICE_STATE >> 10, o.rounds, o.downtime_ms, o.counter.0, o.counter.1
    );
    Ok(())
}

#[test]
fn memory_device_and_state_arrive_exactly() {
    let o = run().unwrap();
    assert!(o.memory_exact, "guest memory differs: {o:?}");
    assert!(o.device_exact, "device state differs: {o:?}");
    assert_eq!(o.counter.0, o.counter.1, "guest state differs");
    assert!(o.counter.0 > 0, "the vCPU never ran: {o:?}");
}
