//! Fault latency: how long a faulting vCPU waited, from the fault thread reading its fault to
//! the page being installed (the `postcopy-blocktime` figures and the report's histogram).
//!
//! Two lock-free parts: [`FaultStamps`], one slot per guest page holding when its first
//! unanswered fault was read, and [`FaultLatency`], a histogram of log-linear buckets in
//! microseconds (eight per power of two, so a percentile is within 12.5 % of the truth). The fault thread stamps; whichever thread installs the page takes the stamp
//! and records the wait. Neither blocks the fault path: a stamp is one compare-and-swap, a
//! record three atomic adds and a `fetch_max`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sub-buckets per power of two.
const SUB: u64 = 8;

/// Buckets of the histogram: waits under 8 us one bucket per microsecond, then eight buckets
/// per power of two ([`bucket_of`]); the last also holds anything longer (2^40 us is over
/// twelve days).
pub const BUCKETS: usize = 8 * 38;

/// The bucket of a wait of `us` microseconds: `us` itself below 8; else, with `e` the power
/// of two at or below `us`, one of eight equal parts of `[2^e, 2^(e+1))`.
fn bucket_of(us: u64) -> usize {
    if us < SUB {
        return us as usize;
    }
    let e = (u64::BITS - 1 - us.leading_zeros()) as u64;
    let mantissa = us >> (e - 3);
    (((e - 3) * SUB + mantissa) as usize).min(BUCKETS - 1)
}

/// The first wait, in microseconds, above bucket `i` (its exclusive upper bound).
fn upper_bound_us(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i + 1;
    }
    let e = i / SUB + 2;
    let mantissa = i % SUB + SUB;
    (mantissa + 1) << (e - 3)
}

/// A histogram of fault latencies, shared by every thread that installs pages, and each
/// faulting thread's share (QEMU's per-vCPU blocktime).
#[derive(Debug)]
pub struct FaultLatency {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    total_us: AtomicU64,
    max_us: AtomicU64,
    /// Per faulting thread (by thread id): faults and time blocked. A handful of threads
    /// (the vCPUs, a VMM thread): a short list under a lock, taken once per answered fault.
    threads: Mutex<Vec<ThreadBlocked>>,
}

/// One faulting thread's waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadBlocked {
    /// The thread's id (`gettid`), as the kernel reported it with the fault; 0 if unknown.
    pub tid: u32,
    /// Its faults answered.
    pub faults: u64,
    /// Its time blocked on them, added up (each wait in whole microseconds, as the
    /// histogram's total, so the threads' add up to it).
    pub total: Duration,
}

/// The most faulting threads told apart; the rest are added to the last entry.
const MAX_THREADS: usize = 256;

/// The histogram read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Faults answered (waits recorded).
    pub count: u64,
    /// The sum of every wait (QEMU's `postcopy-blocktime` total, counted per fault).
    pub total: Duration,
    /// The median wait, as its bucket's upper bound (so at most 12.5 % above the true
    /// value), never above `max`.
    pub p50: Duration,
    /// The 99th percentile wait, as `p50`.
    pub p99: Duration,
    /// The longest wait, exact to the microsecond.
    pub max: Duration,
    /// The buckets' counts (see [`BUCKETS`]).
    pub buckets: [u64; BUCKETS],
    /// Each faulting thread's waits, in the order they first faulted.
    pub threads: Vec<ThreadBlocked>,
}

impl LatencySnapshot {
    /// The non-empty buckets as (exclusive upper bound in microseconds, count), shortest
    /// first: the histogram as a report carries it.
    pub fn histogram(&self) -> Vec<(u64, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (upper_bound_us(i), *n))
            .collect()
    }
}

impl Default for FaultLatency {
    fn default() -> Self {
        FaultLatency {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            total_us: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        }
    }
}

impl FaultLatency {
    /// Records one wait of thread `tid` (0: unknown).
    pub fn record(&self, wait: Duration, tid: u32) {
        let us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let at = match threads.iter().position(|t| t.tid == tid) {
            Some(i) => i,
            None if threads.len() < MAX_THREADS => {
                threads.push(ThreadBlocked {
                    tid,
                    faults: 0,
                    total: Duration::ZERO,
                });
                threads.len() - 1
            }
            None => threads.len() - 1,
        };
        threads[at].faults += 1;
        // In whole microseconds, as the total: the threads' times add up to it.
        threads[at].total += Duration::from_micros(us);
        drop(threads);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.total_us.fetch_add(us, Ordering::Relaxed);
        self.max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// The histogram now. Taken while waits are recorded, its fields may disagree by the
    /// few records in flight (a count one ahead of the buckets); each is exact on its own.
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: [u64; BUCKETS] =
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let max_us = self.max_us.load(Ordering::Relaxed);
        let seen: u64 = buckets.iter().sum();
        let quantile = |q: f64| {
            // The rank of the q-quantile among `seen` waits, 1-based.
            let rank = ((q * seen as f64).ceil() as u64).max(1);
            let mut below = 0;
            for (i, n) in buckets.iter().enumerate() {
                below += n;
                if below >= rank {
                    return Duration::from_micros(upper_bound_us(i).min(max_us));
                }
            }
            Duration::from_micros(max_us)
        };
        LatencySnapshot {
            count: self.count.load(Ordering::Relaxed),
            total: Duration::from_micros(self.total_us.load(Ordering::Relaxed)),
            p50: if seen == 0 {
                Duration::ZERO
            } else {
                quantile(0.50)
            },
            p99: if seen == 0 {
                Duration::ZERO
            } else {
                quantile(0.99)
            },
            max: Duration::from_micros(max_us),
            buckets,
            threads: self
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// When each guest page's pending fault was read, and by which thread: one slot per page (12
/// bytes per 4 KiB, 3 MiB per GiB of guest), 0 for none, else nanoseconds since `epoch` plus
/// one.
#[derive(Debug)]
pub(crate) struct FaultStamps {
    epoch: Instant,
    slots: Vec<AtomicU64>,
    threads: Vec<AtomicU32>,
}

/// # Safety
/// Every byte zero is a valid value of the type.
unsafe trait ZeroValid {}
// SAFETY: AtomicU64 has the bit validity of u64, of which zero is a value.
unsafe impl ZeroValid for AtomicU64 {}
// SAFETY: AtomicU32 has the bit validity of u32, of which zero is a value.
unsafe impl ZeroValid for AtomicU32 {}

/// `n` zeros, from memory the allocator hands out zeroed (fresh pages of a large table are
/// not touched until used): a large guest's table costs nothing before its first fault,
/// where writing each slot would take milliseconds per GiB before the guest may run.
fn zeroed<T: ZeroValid>(n: usize) -> Vec<T> {
    let layout = match std::alloc::Layout::array::<T>(n) {
        Ok(l) if l.size() > 0 => l,
        Ok(_) => return Vec::new(),
        Err(_) => std::alloc::handle_alloc_error(std::alloc::Layout::new::<T>()),
    };
    // SAFETY: the layout's size is not zero.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<T>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` comes from the global allocator with the layout of `n` T (so capacity
    // `n`), and its `n` elements are initialized: all-zero bytes are a T (ZeroValid).
    unsafe { Vec::from_raw_parts(ptr, n, n) }
}

impl FaultStamps {
    pub fn new(pages: usize) -> Self {
        FaultStamps {
            epoch: Instant::now(),
            slots: zeroed(pages),
            threads: zeroed(pages),
        }
    }

    /// Stamps page `index` as faulting now by thread `tid`, unless a fault of it is already
    /// pending (two vCPUs faulting on one page wait from the first fault, which is counted).
    pub fn stamp(&self, index: usize, tid: u32) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1;
        // The thread first: a taker that sees the stamp sees its thread (Release/Acquire).
        if self.slots[index].load(Ordering::Relaxed) == 0 {
            self.threads[index].store(tid, Ordering::Relaxed);
        }
        let _ = self.slots[index].compare_exchange(0, now, Ordering::Release, Ordering::Relaxed);
    }

    /// Takes page `index`'s stamp: how long ago its fault was read, and by which thread, if
    /// one was pending.
    pub fn take(&self, index: usize) -> Option<(Duration, u32)> {
        match self.slots[index].swap(0, Ordering::Acquire) {
            0 => None,
            stamp => {
                let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                let tid = self.threads[index].load(Ordering::Relaxed);
                Some((Duration::from_nanos(now.saturating_sub(stamp - 1)), tid))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_tile_the_microseconds_eight_per_power_of_two() {
        let mut last = 0;
        for us in 0..1 << 20u64 {
            let b = bucket_of(us);
            assert!(
                b == last || b == last + 1,
                "{us} us: bucket {b} after {last}"
            );
            assert!(us < upper_bound_us(b), "{us} us in bucket {b}");
            if b > 0 {
                assert!(us >= upper_bound_us(b - 1), "{us} us in bucket {b}");
            }
            last = b;
        }
        // Within 12.5 %: [1024, 1152) is one bucket.
        assert_eq!(bucket_of(1024), bucket_of(1151));
        assert_ne!(bucket_of(1151), bucket_of(1152));
        assert_eq!(upper_bound_us(bucket_of(1024)), 1152);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_are_bucket_upper_bounds_capped_by_max() {
        let h = FaultLatency::default();
        assert_eq!(h.snapshot().p99, Duration::ZERO);
        // 98 waits of 50 us (bucket [48, 52)), one of 700 us, one of 3 ms.
        for _ in 0..98 {
            h.record(Duration::from_micros(50), 7);
        }
        h.record(Duration::from_micros(700), 7);
        h.record(Duration::from_millis(3), 9);
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50, Duration::from_micros(52));
        // 700 us lies in [640, 704).
        assert_eq!(s.p99, Duration::from_micros(704));
        assert_eq!(s.max, Duration::from_micros(3000));
        assert_eq!(s.total, Duration::from_micros(98 * 50 + 700 + 3000));
        assert_eq!(s.buckets[bucket_of(50)], 98);
        // Per thread, in the order they first faulted.
        assert_eq!(s.threads.len(), 2);
        assert_eq!((s.threads[0].tid, s.threads[0].faults), (7, 99));
        assert_eq!(s.threads[0].total, Duration::from_micros(98 * 50 + 700));
        assert_eq!((s.threads[1].tid, s.threads[1].faults), (9, 1));
        assert_eq!(s.histogram(), vec![(52, 98), (704, 1), (3072, 1)]);

        let one = FaultLatency::default();
        one.record(Duration::from_micros(5), 0);
        // Bucket [5, 6), capped by the max.
        assert_eq!(one.snapshot().p50, Duration::from_micros(5));
        one.record(Duration::from_nanos(300), 0);
        assert_eq!(one.snapshot().buckets[0], 1);
    }

    #[test]
    fn a_stamp_is_taken_once_and_the_first_fault_counts() {
        let s = FaultStamps::new(4);
        assert_eq!(s.take(2), None);
        s.stamp(2, 41);
        std::thread::sleep(Duration::from_millis(2));
        s.stamp(2, 42);
        let (waited, tid) = s.take(2).unwrap();
        assert!(waited >= Duration::from_millis(2), "{waited:?}");
        assert_eq!(tid, 41, "the first fault's thread");
        assert_eq!(s.take(2), None);
    }
}
