//! Direct I/O (`--direct-io`, QEMU's `direct-io`) between processes: a save writes the
//! guest's pages past the page cache, and a restore (eager, then on demand) reads them past
//! it, every page exact; seen through `mincore` on the file, which says which of its pages
//! the page cache holds. A filesystem that refuses `O_DIRECT` (ramfs) fails the save and the
//! restore with an error saying so, and leaves no file behind.

mod common;
use common::*;

use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const GUEST: &[&str] = &[
    "--guest=synthetic",
    "--memory=64M",
    "--fill=0.5",
    "--working-set=0",
    "--dirty-rate=0",
    "--warmup-ms=50",
    "--device=vfio-sim,size=1M",
];

/// Where region 0's pages start in a file of this guest (its header is under 1 MiB).
const DATA: u64 = 1 << 20;
const DATA_LEN: u64 = 64 << 20;

fn file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("livemig-dio-{name}-{}.lmsave", std::process::id()))
}

/// Whether `dir`'s filesystem opens files with `O_DIRECT`.
fn direct_io_allowed(dir: &Path) -> Result<(), std::io::Error> {
    let probe = dir.join(format!("livemig-dio-probe-{}", std::process::id()));
    let r = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .map(drop);
    let _ = std::fs::remove_file(&probe);
    r
}

/// Pages of `path`'s bytes `offset..offset + len` that the page cache holds.
fn cached_pages(path: &Path, offset: u64, len: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a fresh shared read-only mapping of our own descriptor, never dereferenced:
    // only given to mincore and unmapped below.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            offset as i64,
        )
    };
    assert_ne!(at, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    let mut resident = vec![0u8; (len as usize).div_ceil(4096)];
    // SAFETY: `at` maps `len` bytes; `resident` has a byte per page of them.
    let r = unsafe { libc::mincore(at, len as usize, resident.as_mut_ptr()) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: the mapping made above, unmapped once.
    unsafe { libc::munmap(at, len as usize) };
    resident.iter().filter(|&&b| b & 1 != 0).count() as u64
}

/// Drops `path`'s pages from the page cache.
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: an advisory call on our own descriptor; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}

/// A source saving the paused guest to `path`, with `extra` options (`--direct-io`).
fn save(path: &Path, extra: &[&str]) -> Proc {
    let to = format!("--to=file:{}", path.display());
    let mut args = vec!["migrate", "--json", to.as_str(), "--stop-first"];
    args.extend_from_slice(extra);
    args.extend_from_slice(GUEST);
    Proc::spawn(&args)
}

/// Restores `path` in a new process with `extra` flags; returns its report, every page
/// checked exact.
fn restore(path: &Path, extra: &[&str]) -> serde_json::Value {
    let from = format!("--from=file:{}", path.display());
    let mut args = vec!["incoming", "--json", from.as_str(), "--verify"];
    args.extend_from_slice(extra);
    let mut dest = Proc::spawn(&args);
    let recv = dest.expect_event("received");
    assert!(dest.wait_exit().success());
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), 16384, "{v:#}");
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    recv["report"].clone()
}

#[test]
fn direct_io_saves_and_restores_past_the_page_cache() {
    let path = file("ok");
    if let Err(e) = direct_io_allowed(path.parent().unwrap()) {
        eprintln!(
            "SKIPPED: the temp dir's filesystem refuses O_DIRECT ({e}); see `stat -f {}`",
            std::env::temp_dir().display()
        );
        return;
    }
    let mut src = save(&path, &["--direct-io"]);
    let done = src.expect_event("completed");
    assert!(src.wait_exit().success());
    let r = &done["report"];
    assert_eq!(r["direct_io"], true, "{r:#}");
    assert!(u64_at(r, &["pages_in_file"]) > 8000, "{r:#}");
    assert_eq!(
        cached_pages(&path, DATA, DATA_LEN),
        0,
        "pages written with O_DIRECT are not left in the page cache"
    );
    for extra in [&["--direct-io"][..], &["--direct-io", "--on-demand"]] {
        evict(&path);
        let report = restore(&path, extra);
        assert_eq!(report["direct_io"], true, "{report:#}");
        assert_eq!(
            cached_pages(&path, DATA, DATA_LEN),
            0,
            "pages read with O_DIRECT do not enter the page cache ({extra:?})"
        );
    }
    // The contrast: a buffered restore brings the pages it reads into the cache.
    evict(&path);
    let report = restore(&path, &[]);
    assert_eq!(report["direct_io"], false);
    assert!(cached_pages(&path, DATA, DATA_LEN) > 8000);
    let _ = std::fs::remove_file(&path);
}

/// A ramfs mounted for the test (ramfs refuses `O_DIRECT`), unmounted when dropped.
struct Ramfs(PathBuf);

impl Ramfs {
    fn mount() -> Result<Ramfs, String> {
        let dir = std::env::temp_dir().join(format!("livemig-ramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "ramfs", "livemig-test", dir.to_str().unwrap()])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Ramfs(dir))
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_filesystem_refusing_direct_io_fails_the_save_and_the_restore_saying_so() {
    let ram = match Ramfs::mount() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a ramfs (needs root): {e}");
            return;
        }
    };
    let path = ram.0.join("vm.lmsave");
    let mut src = save(&path, &["--direct-io"]);
    let failed = src.expect_event("attempt_failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("direct I/O (O_DIRECT) refused"), "{error}");
    assert!(!src.wait_exit().success());
    let left: Vec<_> = std::fs::read_dir(&ram.0).unwrap().collect();
    assert!(left.is_empty(), "nothing is left behind: {left:?}");

    // The same save without direct I/O works there; its restore with direct I/O is refused
    // before anything is built, and works without.
    let mut src = save(&path, &[]);
    src.expect_event("completed");
    assert!(src.wait_exit().success());
    let from = format!("--from=file:{}", path.display());
    let mut dest = Proc::spawn(&["incoming", "--json", from.as_str(), "--direct-io"]);
    let failed = dest.expect_event("failed");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("direct I/O (O_DIRECT) refused"), "{error}");
    assert!(!dest.wait_exit().success());
    assert_eq!(restore(&path, &[])["direct_io"], false);
}
