//! What livemig reads about a process from /proc and getrusage: CPU time, with the guest's
//! vCPU threads set apart, and peak RSS (`VmHWM`).
//!
//! Two users: `livemig migrate` and `livemig incoming` measure themselves ([`CpuMark`],
//! [`own_peak_rss`]) and print it in their final JSON line ([`CpuUsage`]), which the bench
//! suite reads back; `bench --peer qemu` measures the VMM processes it started ([`Cpu::of`],
//! [`peak_rss`]).

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// CPU seconds a process has used so far (user + system, threads that ended included), and
/// the part of it its guest vCPU threads ran.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) process_s: f64,
    pub(crate) vcpu_s: f64,
}

impl Cpu {
    /// Reads `/proc/PID/stat` and each thread's `/proc/PID/task/TID/stat`.
    pub(crate) fn of(pid: u32) -> anyhow::Result<Cpu> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
        let (_, process_ticks) = parse_stat(&stat)
            .with_context(|| format!("cannot parse /proc/{pid}/stat: {stat:?}"))?;
        let mut vcpu_ticks = 0;
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("cannot list /proc/{pid}/task"))?;
        for t in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue; // the thread ended meanwhile
            };
            if let Some((name, ticks)) = parse_stat(&stat) {
                if is_vcpu_thread(name) {
                    vcpu_ticks += ticks;
                }
            }
        }
        let hz = clock_ticks_per_s();
        Ok(Cpu {
            process_s: process_ticks as f64 / hz,
            vcpu_s: vcpu_ticks as f64 / hz,
        })
    }

    /// CPU seconds the VMM spent between `earlier` and `self`, without its vCPU threads.
    pub(crate) fn vmm_since(&self, earlier: &Cpu) -> f64 {
        ((self.process_s - self.vcpu_s) - (earlier.process_s - earlier.vcpu_s)).max(0.0)
    }
}

/// A vCPU thread: QEMU's `CPU 0/KVM` (with `-name debug-threads=on`), livemig's `kvm-vcpu0`.
fn is_vcpu_thread(name: &str) -> bool {
    name.ends_with("/KVM") || name.to_ascii_lowercase().contains("vcpu")
}

/// A stat line's command name and utime + stime in clock ticks.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    // After the name: state (field 3), ..., utime (field 14), stime (field 15).
    let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    Some((&stat[open + 1..close], n(11)? + n(12)?))
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The peak resident set size (`VmHWM`) of a process, in bytes.
pub(crate) fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))
}

/// This process's peak resident set size (VmHWM), in bytes.
pub(crate) fn own_peak_rss() -> Option<u64> {
    peak_rss(std::process::id()).ok()
}

/// User and system CPU seconds of this whole process, every thread that ever ran included.
fn own_cpu_s() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the buffer it is given, which is large enough.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: zero-initialized and, on success, filled in by the kernel.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU seconds of this process's guest threads still alive (KVM vCPUs `kvm-vcpuN`, the
/// synthetic guest's dirtying threads `synthetic-vcpuN`): the guest's work, not the
/// migration's.
fn own_guest_threads_cpu_s() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let mut ticks = 0u64;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        match parse_stat(&stat) {
            Some((name, n)) if name.contains("vcpu") => ticks += n,
            _ => {}
        }
    }
    ticks as f64 / clock_ticks_per_s()
}

/// CPU time at one moment, to report what a migration cost from then on.
pub(crate) struct CpuMark {
    process_s: f64,
    guest_s: f64,
}

/// What a process's migration cost in CPU, as `migrate` and `incoming` print it (`"cpu"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct CpuUsage {
    /// The whole process so far.
    pub(crate) process_s: f64,
    /// Since the mark, without the guest's threads.
    pub(crate) migration_s: f64,
    /// The guest's threads since the mark.
    pub(crate) guest_s: f64,
}

impl CpuMark {
    pub(crate) fn now() -> CpuMark {
        CpuMark {
            process_s: own_cpu_s(),
            guest_s: own_guest_threads_cpu_s(),
        }
    }

    /// What was used since the mark.
    pub(crate) fn usage(&self) -> CpuUsage {
        let process = own_cpu_s();
        let guest = (own_guest_threads_cpu_s() - self.guest_s).max(0.0);
        CpuUsage {
            process_s: process,
            migration_s: (process - self.process_s - guest).max(0.0),
            guest_s: guest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names() {
        let s = "4242 (CPU 0/KVM) R 1 2 3 4 5 6 7 8 9 10 250 30 0 0 20 0 1 0";
        assert_eq!(parse_stat(s), Some(("CPU 0/KVM", 280)));
        let s = "7 (a) b) (c) S 1 2 3 4 5 6 7 8 9 10 5 6 0 0";
        assert_eq!(parse_stat(s), Some(("a) b) (c", 11)));
        assert!(is_vcpu_thread("CPU 1/KVM") && is_vcpu_thread("kvm-vcpu0"));
        assert!(!is_vcpu_thread("multifdrecv_0") && !is_vcpu_thread("lm-vm"));
    }

    #[test]
    fn this_process() {
        let me = std::process::id();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < std::time::Duration::from_millis(30) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        let cpu = Cpu::of(me).unwrap();
        assert!(cpu.process_s > 0.0 && cpu.vcpu_s == 0.0, "{cpu:?}");
        assert!(peak_rss(me).unwrap() > 1 << 20);
    }
}
