//! A VM saved to a real file and restored from it, in one process: the synthetic guest
//! (dirtying during a live save, or paused first) with a VFIO-like device and a small
//! device; every page exact, the counter exactly where the guest paused, the device stream
//! loaded whole and in order; a second restore from the same file; and bad files (cut,
//! damaged, another version, too large, not a save file) refused with what was wrong.

use livemig_engine::file::{restore_vm, save_vm, FileError, RestoreConfig, Restored, SaveConfig};
use livemig_engine::{Device, Factories, Guest, VmState};
use livemig_vmm::devices::{DeviceModels, VfioSim, VfioSimConfig, VmStateSim};
use livemig_vmm::memory::Backing;
use livemig_vmm::synthetic::{SyntheticConfig, SyntheticGuest, Workload};
use livemig_vmm::Factory;
use livemig_wire::file::FileFormatError;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// The tests of this file run one at a time: one counts the process's `lm-save` threads.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn guest(rate: u64) -> SyntheticGuest {
    SyntheticGuest::start(&SyntheticConfig {
        memory_bytes: 64 * MIB,
        fill: 0.25,
        workload: Workload {
            working_set_pages: 2048,
            rate,
            threads: 2,
        },
        backing: Backing::Anonymous,
    })
    .unwrap()
}

fn vfio() -> VfioSim {
    VfioSim::new(
        "vfio0",
        VfioSimConfig {
            precopy: MIB,
            seed: 7,
            gen_ms: 50,
            ..VfioSimConfig::with_size(3 * MIB)
        },
    )
}

fn path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("livemig-file-{name}-{}.lmsave", std::process::id()))
}

fn restore(p: &std::path::Path, config: &RestoreConfig) -> Result<Restored, FileError> {
    let f = Factories {
        guest: &Factory,
        devices: &DeviceModels,
    };
    restore_vm(p, f, config)
}

fn verified() -> RestoreConfig {
    RestoreConfig {
        verify: true,
        ..RestoreConfig::default()
    }
}

/// Saves a dirtying guest live, leaving it paused; returns the file and its counter.
fn save_live(name: &str) -> (PathBuf, u64, livemig_engine::file::SaveReport) {
    let g = guest(0);
    std::thread::sleep(Duration::from_millis(100));
    let dev = vfio();
    let small = VmStateSim::new("vmstate0", Default::default());
    let devices: [&dyn Device; 1] = [&dev];
    let vmstates: [&dyn VmState; 1] = [&small];
    let vm = livemig_engine::Vm {
        guest: &g,
        devices: &devices,
        vmstates: &vmstates,
    };
    let p = path(name);
    let config = SaveConfig {
        downtime_limit: Duration::from_millis(1),
        max_rounds: 4,
        chunk_size: 256 << 10,
        resume: false,
        ..SaveConfig::default()
    };
    let report = save_vm(vm, &p, &config, &|_| {}).unwrap();
    let counter = g.counter();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        g.counter(),
        counter,
        "resume: false leaves the guest paused"
    );
    (p, counter, report)
}

#[test]
fn a_dirtying_guest_saved_live_restores_exact_twice() {
    let _serial = serial();
    let (p, counter, report) = save_live("live");
    assert!(report.live && report.rounds.len() >= 2, "{report:#?}");
    assert!(counter > 0);
    assert!(
        report.rounds[1..].iter().any(|r| r.pages > 0),
        "pages dirtied during round 0 were written again: {report:#?}"
    );
    assert!(report.device_bytes > 3 * MIB, "{report:#?}");
    // Sparse: the zero pages (three quarters of the guest but the working set) are holes,
    // never written: the file takes about the data, not the guest.
    let data = report.pages_in_file * 4096 + report.device_bytes;
    let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
    assert!(report.pages_in_file <= 16384 / 4 + 2048, "{report:#?}");
    assert!(
        allocated < data + 4 * MIB,
        "{allocated} bytes allocated for {data}"
    );
    for attempt in 0..2 {
        let r = restore(&p, &verified()).unwrap_or_else(|e| panic!("restore {attempt}: {e}"));
        let v = r.report.verify.clone().unwrap();
        assert_eq!(v.pages_checked, 16384);
        assert_eq!(v.pages_mismatched, 0, "{v:#?}");
        assert_eq!(v.counter, counter, "the counter is exactly where it paused");
        assert_eq!(r.devices.len(), 1);
        assert_eq!(r.report.device_bytes, report.device_bytes);
        assert_eq!(r.report.pages_read, report.pages_in_file);
        // The restored guest runs on.
        std::thread::sleep(Duration::from_millis(100));
        r.guest.pause().unwrap();
        let after = r.guest.verify().unwrap();
        assert_eq!(after.pages_mismatched, 0);
        assert!(after.counter > counter, "the restored guest runs on");
    }
    let _ = std::fs::remove_file(&p);
}

#[test]
fn a_paused_guest_is_saved_in_one_pass_and_stays_paused() {
    let _serial = serial();
    let g = guest(20_000);
    std::thread::sleep(Duration::from_millis(100));
    g.pause().unwrap();
    let counter = g.counter();
    let vm = livemig_engine::Vm {
        guest: &g,
        devices: &[],
        vmstates: &[],
    };
    let p = path("paused");
    let config = SaveConfig {
        paused: true,
        channels: 2,
        ..SaveConfig::default()
    };
    let report = save_vm(vm, &p, &config, &|_| {}).unwrap();
    assert_eq!(report.rounds.len(), 1);
    assert_eq!(report.rounds[0].pages, 16384);
    assert_eq!(report.downtime_ms, 0.0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.counter(), counter, "the guest stays paused");
    let r = restore(&p, &verified()).unwrap();
    assert_eq!(r.report.verify.unwrap().counter, counter);
    assert!(r.report.saved_paused && r.report.resumed_ms.is_some());
    // Following the saved run state, it comes back stopped.
    let as_saved = RestoreConfig {
        as_saved: true,
        ..verified()
    };
    let r = restore(&p, &as_saved).unwrap();
    assert_eq!(r.report.resumed_ms, None);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        r.guest.verify().unwrap().counter,
        counter,
        "it stays stopped"
    );
    let _ = std::fs::remove_file(&p);
}

#[test]
fn a_live_save_resumes_the_guest() {
    let _serial = serial();
    let g = guest(20_000);
    std::thread::sleep(Duration::from_millis(50));
    let vm = livemig_engine::Vm {
        guest: &g,
        devices: &[],
        vmstates: &[],
    };
    let p = path("resume");
    let report = save_vm(vm, &p, &SaveConfig::default(), &|_| {}).unwrap();
    let saved = restore(&p, &verified())
        .unwrap()
        .report
        .verify
        .unwrap()
        .counter;
    std::thread::sleep(Duration::from_millis(100));
    assert!(report.downtime_ms > 0.0);
    assert!(g.counter() > saved, "the source runs on after the save");
    let _ = std::fs::remove_file(&p);
}

/// Copies the file at `p` to a new file, changed by `damage`.
fn damaged(p: &std::path::Path, name: &str, damage: impl FnOnce(&std::fs::File)) -> PathBuf {
    let q = path(name);
    std::fs::copy(p, &q).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&q)
        .unwrap();
    damage(&f);
    q
}

fn format_error(r: Result<Restored, FileError>) -> FileFormatError {
    match r {
        Err(FileError::Format { source, .. }) => source,
        Err(e) => panic!("expected a format error, got {e}"),
        Ok(_) => panic!("a bad file was restored"),
    }
}

#[test]
fn bad_files_are_refused_saying_what_is_wrong() {
    let _serial = serial();
    let (p, _, report) = save_live("bad");
    let len = report.file_len;
    let cut = damaged(&p, "cut", |f| f.set_len(len - 100).unwrap());
    let e = format_error(restore(&cut, &verified()));
    assert!(matches!(e, FileFormatError::Truncated { .. }), "{e}");
    let version = damaged(&p, "version", |f| f.write_all_at(&[9], 8).unwrap());
    let e = format_error(restore(&version, &verified()));
    assert_eq!(
        e,
        FileFormatError::UnsupportedVersion {
            found: 9,
            supported: 2
        }
    );
    let header = damaged(&p, "header", |f| f.write_all_at(b"Z", 40).unwrap());
    let e = format_error(restore(&header, &verified()));
    assert!(matches!(e, FileFormatError::BadCrc { .. }), "{e}");
    let magic = damaged(&p, "magic", |f| f.write_all_at(b"NOTASAVE", 0).unwrap());
    let e = format_error(restore(&magic, &verified()));
    assert!(matches!(e, FileFormatError::BadMagic { .. }), "{e}");
    // Page 0 holds data (the first quarter of every 100 pages is filled): damage one byte.
    let data_at = 1 << 20;
    let page = damaged(&p, "page", |f| {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, data_at + 100).unwrap();
        f.write_all_at(&[b[0] ^ 1], data_at + 100).unwrap();
    });
    match restore(&page, &verified()) {
        Err(FileError::PageCorrupted { addr, .. }) => assert_eq!(addr, 0),
        Err(e) => panic!("expected a corrupted page, got {e}"),
        Ok(_) => panic!("a damaged page was restored"),
    }
    let small = RestoreConfig {
        max_guest_memory: 32 * MIB,
        ..verified()
    };
    match restore(&p, &small) {
        Err(FileError::TooLarge {
            memory_bytes, max, ..
        }) => assert_eq!((memory_bytes, max), (64 * MIB, 32 * MIB)),
        Err(e) => panic!("expected too large, got {e}"),
        Ok(_) => panic!("a guest over the limit was restored"),
    }
    for q in [&p, &cut, &version, &header, &magic, &page] {
        let _ = std::fs::remove_file(q);
    }
}

#[test]
fn an_on_demand_restore_runs_the_guest_before_its_pages_are_read() {
    let _serial = serial();
    let (p, counter, report) = save_live("ondemand");
    let config = RestoreConfig {
        on_demand: true,
        ..verified()
    };
    let r = match restore(&p, &config) {
        Err(FileError::OnDemand(e)) if e.is_unavailable() => {
            eprintln!("SKIPPED: userfaultfd is not available here: {e}");
            return;
        }
        r => r.unwrap(),
    };
    let v = r.report.verify.clone().unwrap();
    assert_eq!(v.pages_mismatched, 0, "{v:#?}");
    assert!(
        v.counter >= counter,
        "the counter goes on from where it paused"
    );
    assert_eq!(r.report.pages_read, report.pages_in_file);
    assert!(
        r.report.faults > 0,
        "the guest ran before its pages were read, faulting them in: {:#?}",
        r.report
    );
    r.guest.pause().unwrap();
    assert_eq!(r.guest.verify().unwrap().pages_mismatched, 0);
    let _ = std::fs::remove_file(&p);
}

/// A live save cancelled from another thread mid-rounds: it fails as cancelled, leaves no
/// file (nor a partial one), every thread of it is gone, and the guest runs on, exact.
#[test]
fn a_cancelled_save_leaves_no_file_and_the_guest_running() {
    let _serial = serial();
    let g = guest(0);
    let vm = livemig_engine::Vm {
        guest: &g,
        devices: &[],
        vmstates: &[],
    };
    let p = path("cancel");
    let config = SaveConfig {
        downtime_limit: Duration::ZERO,
        max_rounds: u32::MAX,
        ..SaveConfig::default()
    };
    let cancel = config.cancel.clone();
    // Cancelled as the save reports its first round (always one with the guest running),
    // from the progress callback: the save must stop at its next step, whatever it is.
    let r = save_vm(vm, &p, &config, &|_| cancel.cancel());
    assert!(matches!(r, Err(FileError::Cancelled)), "{r:?}");
    assert!(!p.exists());
    assert!(!PathBuf::from(format!("{}.partial", p.display())).exists());
    assert_eq!(livemig_engine::runtime::thread_count_named("lm-save"), 0);
    let before = g.counter();
    std::thread::sleep(Duration::from_millis(50));
    assert!(g.counter() > before, "the guest runs on");
    g.pause().unwrap();
    assert_eq!(g.verify().unwrap().pages_mismatched, 0);
}

/// On demand, a damaged page is found by whichever thread reads it first (the guest's fault
/// or the fill): the restore fails naming the page, and returns (no vCPU or thread is left
/// waiting on a page that never comes).
#[test]
fn an_on_demand_restore_of_a_damaged_page_fails_and_returns() {
    let _serial = serial();
    let (p, _, _) = save_live("ondemand-bad");
    let page = damaged(&p, "ondemand-page", |f| {
        let at = (1 << 20) + 4096 * 3 + 9;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[!b[0]], at).unwrap();
    });
    let config = RestoreConfig {
        on_demand: true,
        ..verified()
    };
    match restore(&page, &config) {
        Err(FileError::OnDemand(e)) if e.is_unavailable() => {
            eprintln!("SKIPPED: userfaultfd is not available here: {e}")
        }
        Err(FileError::PageCorrupted { addr, .. }) => assert_eq!(addr, 3 * 4096),
        Err(e) => panic!("expected a corrupted page, got {e}"),
        Ok(_) => panic!("a damaged page was restored"),
    }
    assert_eq!(livemig_engine::runtime::thread_count_named("lm-rst"), 0);
    for q in [&p, &page] {
        let _ = std::fs::remove_file(q);
    }
}

/// The header of the save file at `p`.
fn header_of(p: &std::path::Path) -> livemig_wire::file::FileHeader {
    use livemig_wire::file::{FileHeader, FilePrefix, PREFIX_LEN};
    let f = std::fs::File::open(p).unwrap();
    let mut raw = [0u8; PREFIX_LEN];
    f.read_exact_at(&mut raw, 0).unwrap();
    let prefix = FilePrefix::decode(&raw).unwrap();
    let mut body = vec![0u8; prefix.header_len as usize];
    f.read_exact_at(&mut body, PREFIX_LEN as u64).unwrap();
    FileHeader::decode(&body).unwrap()
}

/// Flips one bit of the byte at `at` in `f`.
fn flip(f: &std::fs::File, at: u64) {
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
}

/// On demand, the regions' tables are read a group of 1024 pages at a time, once the guest
/// runs, each group checked against the groups section (checked whole before anything is
/// built). A damaged page CRC entry or bitmap word fails the restore naming the table and
/// its pages, whichever thread reads the group first; a damaged groups section is refused
/// before anything is built; an eager restore refuses the damaged tables up front.
#[test]
fn an_on_demand_restore_checks_the_tables_group_by_group() {
    let _serial = serial();
    let (p, _, _) = save_live("tables");
    let h = header_of(&p);
    let r = &h.regions[0];
    assert_eq!(r.groups.len, 16 * 8, "64 MiB: 16 groups of 1024 pages");
    // A config each time: a failed restore cancels its config's token.
    let on_demand = || RestoreConfig {
        on_demand: true,
        ..verified()
    };
    // Group 5's first page CRC entry; group 9's first bitmap word.
    let crc = damaged(&p, "tables-crc", |f| flip(f, r.crcs.offset + 5 * 4096));
    let bitmap = damaged(&p, "tables-bitmap", |f| flip(f, r.bitmap.offset + 9 * 128));
    let sums = damaged(&p, "tables-sums", |f| flip(f, r.groups.offset + 3));
    for (q, says) in [
        (&crc, "region 0 page CRCs (pages 5120 to 6143)"),
        (&bitmap, "region 0 bitmap (pages 9216 to 10239)"),
    ] {
        match restore(q, &on_demand()) {
            Err(FileError::OnDemand(e)) if e.is_unavailable() => {
                eprintln!("SKIPPED: userfaultfd is not available here: {e}");
                return;
            }
            Err(e @ FileError::Format { .. }) => {
                assert!(e.to_string().contains(says), "{e}");
                assert!(e.to_string().contains("is corrupted"), "{e}");
            }
            Err(e) => panic!("expected a damaged table, got {e}"),
            Ok(_) => panic!("a damaged table was restored"),
        }
        assert_eq!(livemig_engine::runtime::thread_count_named("lm-rst"), 0);
        let e = format_error(restore(q, &verified()));
        assert!(matches!(e, FileFormatError::BadCrc { .. }), "eager: {e}");
    }
    let e = format_error(restore(&sums, &on_demand()));
    assert!(
        e.to_string().contains("region 0 groups is corrupted"),
        "{e}"
    );
    for q in [&p, &crc, &bitmap, &sums] {
        let _ = std::fs::remove_file(q);
    }
}
