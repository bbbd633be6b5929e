//! What the bench reads about a process from /proc: CPU time, with the guest's vCPU threads
//! set apart, and peak RSS.

use anyhow::Context;

/// CPU seconds a process has used so far (user + system, threads that ended included), and
/// the part of it its guest vCPU threads ran.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cpu {
    pub(super) process_s: f64,
    pub(super) vcpu_s: f64,
}

impl Cpu {
    /// Reads `/proc/PID/stat` and each thread's `/proc/PID/task/TID/stat`.
    pub(super) fn of(pid: u32) -> anyhow::Result<Cpu> {
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
    pub(super) fn vmm_since(&self, earlier: &Cpu) -> f64 {
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
pub(super) fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("no VmHWM in /proc/{pid}/status"))
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
