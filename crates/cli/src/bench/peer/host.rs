//! What touching fresh memory costs on this host, measured in the run: the figure a cold
//! destination's CPU time mostly stands on, for either tool.

use std::time::Duration;

const PAGE: usize = 4096;
const GIB: f64 = (1u64 << 30) as f64;

/// CPU seconds per GiB this thread spends faulting in fresh anonymous memory: `settled`
/// after waiting `settle` (memory freed earlier has been handed back to the hypervisor where
/// the host does that), `warm` right after freeing the same amount.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(super) struct FirstTouch {
    pub(super) settled_s_per_gib: f64,
    pub(super) warm_s_per_gib: f64,
}

/// Touches `bytes` of fresh memory one byte a page, returns the CPU seconds it took.
fn touch(bytes: usize) -> f64 {
    // calloc of this size maps fresh zero pages: nothing is touched until written.
    let mut v = vec![0u8; bytes];
    let start = thread_cpu_s();
    for i in (0..bytes).step_by(PAGE) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
    thread_cpu_s() - start
}

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the one it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

impl FirstTouch {
    /// Measures over `bytes`: after `settle`, then again at once.
    pub(super) fn measure(bytes: usize, settle: Duration) -> FirstTouch {
        std::thread::sleep(settle);
        let settled = touch(bytes);
        let warm = touch(bytes);
        let per_gib = |s: f64| s * GIB / bytes as f64;
        FirstTouch {
            settled_s_per_gib: per_gib(settled),
            warm_s_per_gib: per_gib(warm),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_memory_costs_something() {
        let t = FirstTouch::measure(16 << 20, Duration::ZERO);
        assert!(t.settled_s_per_gib > 0.0 && t.warm_s_per_gib > 0.0, "{t:?}");
        assert!(t.settled_s_per_gib < 100.0, "{t:?}");
    }
}
