//! The destination process runs inside a cgroup v1 memory group whose limit is the guest's
//! memory plus the device buffer cap plus a stated slack. Four VFIO-like devices send their
//! chunks in reverse order (each credit window back to front, so the destination must buffer
//! whole windows before loading anything): the migration completes, the destination is never
//! OOM-killed, and its measured peak stays under the limit. A destination that buffered a
//! device's whole state (37 MiB each here) would blow through the slack.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CGROUP_ROOT: &str = "/sys/fs/cgroup/memory";
const GUEST: u64 = 128 * MIB;
const BUFFER_CAP: u64 = 16 * MIB;
/// Everything of the destination that is neither guest memory nor buffered device chunks:
/// its heap, thread stacks, the chunk being read past the cap's accounting, page tables.
/// Measured peaks are 2 to 6 MiB above guest + cap; 16 MiB leaves room for a noisy host
/// while staying far below one device's state (37 MiB), so unbounded buffering would OOM.
/// (Socket buffers are kernel memory, not charged to a v1 group without a kmem limit; the
/// binary's text is page cache, reclaimable, and charged to whoever read it first.)
const SLACK: u64 = 16 * MIB;

/// A memory cgroup made for this test; on drop it kills the process in it and removes it,
/// whatever the test's outcome.
struct Cgroup {
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Cgroup {
    /// None when the v1 memory controller is absent or not writable here.
    fn create(limit: u64) -> Option<Cgroup> {
        if !Path::new(CGROUP_ROOT).is_dir() {
            return None;
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir =
            Path::new(CGROUP_ROOT).join(format!("livemig-test-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        let cg = Cgroup { dir, proc: None };
        cg.write("memory.limit_in_bytes", &limit.to_string());
        assert_eq!(cg.read_u64("memory.limit_in_bytes"), limit);
        Some(cg)
    }

    /// The process placed in the group.
    fn dest(&mut self) -> &mut Proc {
        self.proc.as_mut().expect("a process in the group")
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {file}: {e}"));
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
    }

    fn read_u64(&self, file: &str) -> u64 {
        self.read(file).trim().parse().unwrap()
    }

    /// The `oom_kill` count of memory.oom_control (kernels since 4.13 report it).
    fn oom_kills(&self) -> u64 {
        let oc = self.read("memory.oom_control");
        oc.lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or_else(|| panic!("no oom_kill count in memory.oom_control: {oc}"))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        // The group can be removed once its last task has gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn destination_within_guest_plus_cap_plus_slack_is_never_oom_killed() {
    let limit = GUEST + BUFFER_CAP + SLACK;
    let Some(mut cg) = Cgroup::create(limit) else {
        println!("SKIPPED (no cgroup v1 memory controller)");
        return;
    };
    let cap = format!("--max-buffer-cap={BUFFER_CAP}");
    let dest = Proc::spawn(&[
        "incoming",
        "--listen=tcp:127.0.0.1:0",
        "--json",
        "--verify",
        &cap,
    ]);
    // Into the group at once, before it has allocated anything worth counting.
    cg.write("cgroup.procs", &dest.child.id().to_string());
    let pid = dest.child.id();
    cg.proc = Some(dest);
    let cgroup_of = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cgroup_of.contains(cg.dir.file_name().unwrap().to_str().unwrap()),
        "the destination is not in the test's group: {cgroup_of}"
    );
    let addr = cg.dest().expect_event("listening")["addr"]
        .as_str()
        .unwrap()
        .to_string();

    let dev = "--device=vfio-sim,size=32M,rate=200M,precopy=4M";
    let options = [
        "--memory=128M",
        "--working-set=8M",
        "--warmup-ms=50",
        dev,
        "--device=vfio-sim,size=32M,rate=200M,seed=1",
        dev,
        "--device=vfio-sim,size=32M,rate=200M,seed=3",
        "--device=vmstate-sim",
    ];
    let mut src = synthetic_source_hooked(&addr, &options, &[], "chunk-order=reverse");
    let done = src.wait_for(&["completed"]);
    let status = cg.dest().wait_exit();
    let peak = cg.read_u64("memory.max_usage_in_bytes");
    let oom_kills = cg.oom_kills();
    println!(
        "destination peak {:.1} MiB in a group of {} MiB (guest {} + cap {} + slack {}), \
         {} failcnt, {oom_kills} OOM kills",
        peak as f64 / MIB as f64,
        limit >> 20,
        GUEST >> 20,
        BUFFER_CAP >> 20,
        SLACK >> 20,
        cg.read_u64("memory.failcnt"),
    );
    assert_eq!(oom_kills, 0, "the destination was OOM-killed");
    let done = done.unwrap_or_else(|e| panic!("migration did not complete ({e}): {:#?}", src.seen));
    assert!(status.success(), "destination exited with {status}");
    assert!(src.wait_exit().success());
    let received = cg
        .dest()
        .wait_for(&["received"])
        .expect("the destination printed its report");
    assert_eq!(
        u64_at(&received["report"]["verify"], &["pages_mismatched"]),
        0
    );

    let report = &done["report"];
    assert_eq!(u64_at(report, &["buffer_cap_bytes"]), BUFFER_CAP);
    let window = u64_at(report, &["credit_window"]);
    assert_eq!(window, 4, "16 MiB over 4 devices of 1 MiB chunks");
    let peaks: Vec<u64> = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| u64_at(d, &["peak_buffered_bytes"]))
        .collect();
    assert_eq!(peaks.len(), 4);
    for p in &peaks {
        assert!(*p > MIB && *p <= window * MIB, "peaks {peaks:?}");
    }
    assert!(peaks.iter().sum::<u64>() <= BUFFER_CAP, "peaks {peaks:?}");
    // The guest's memory was really charged to the group: the limit applied to it.
    assert!(
        peak >= GUEST,
        "peak {peak}: the destination was not charged here"
    );
}
