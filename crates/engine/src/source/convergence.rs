//! When precopy ends: the expected downtime (RAM and devices), the switchover decision
//! (converged, with polishing rounds) and auto-converge's throttle. Pure functions of the
//! rounds' reports and the devices' [`SavePending`].
//!
//! # The expected downtime
//!
//! Paused, the guest waits for three things that run at the same time (`switchover.rs`):
//! the RAM's last pass, each device's final save (every device on its own job, so devices
//! read in parallel) and the vCPU and small devices' state (small: a few KiB, not counted).
//! Each device's final bytes go out on the same data channels as the RAM's. So the pause
//! lasts at least the longest of
//!
//! - the RAM's rest at the rate its last round measured (`ram_expected_ms`: the figure the
//!   decision used before devices were counted, so a VM without reporting devices
//!   migrates as it did);
//! - the slowest device's final bytes at its own read rate (`device_read_ms`): a device
//!   bounded at 500 MiB/s with 256 MiB of state keeps the guest paused 512 ms whatever the
//!   link;
//! - the RAM's rest and every device's final bytes together at the channels' rate
//!   (`channel_bytes_per_s`): every byte the data channels sent over a round's time, the
//!   best of the latest rounds that moved enough to measure the link ([`ChannelRate`]).
//!
//! In serial mode (`DeviceTransfer::Main`) the devices are read one after another, their
//! precopy data too, so the read times add up instead.
//!
//! What this leaves out, and the bench measures (`bench --mode devices`, expected against
//! actual): the fixed costs of a switchover (pause, resume, the handover's round trip, a
//! few ms), the destination's loading when it is slower than the reading, and the CPU the
//! switchover will get: a device's bytes cost more per byte than RAM pages (read into a
//! buffer, copied, checked on arrival), so when other work takes the cores the devices'
//! path slows down while the rate measured on RAM does not say so (the bench saw actual
//! downtimes up to twice the estimate on a loaded 2-core host, within 20 % on a quiet one).
//!
//! With [`crate::MigrationConfig::avail_switchover_bandwidth`] set (QEMU's
//! `avail-switchover-bandwidth`), that rate stands for both measured rates.
//!
//! Devices that cannot say ([`crate::Device::pending`] is `None`) count for nothing.

use crate::config::ThrottlePolicy;
use crate::device::{Device, SavePending};
use crate::report::RoundReport;

/// Rounds run past the point where the rest would fit the downtime limit, at most.
const MAX_POLISH_ROUNDS: u32 = 8;
/// Expected downtime below which another round is not worth its fixed cost, milliseconds.
const POLISH_FLOOR_MS: f64 = 1.0;

/// Whether to switch over after the round `r`: once the rest would move within the downtime
/// limit, and another round would not at least halve it. A round that halves what is left
/// costs a few milliseconds of precopy (the guest runs) and takes as much off the downtime
/// (the guest is paused), so the downtime approaches the switchover's fixed cost rather than
/// the working set's last pass (QEMU switches over as soon as the rest fits). `polish`
/// counts the rounds run past the limit; at most [`MAX_POLISH_ROUNDS`].
///
/// Polishing only pays while the RAM's part is the downtime: once the devices' part is the
/// larger, another round takes nothing off it.
pub(super) fn switch_now(r: &RoundReport, limit_ms: f64, polish: &mut u32) -> bool {
    if r.expected_downtime_ms > limit_ms {
        return false;
    }
    let ram_bound = r.ram_expected_ms >= r.expected_downtime_ms;
    let halves = ram_bound && r.dirty_after * 2 < r.pages;
    if !halves || r.expected_downtime_ms < POLISH_FLOOR_MS || *polish >= MAX_POLISH_ROUNDS {
        return true;
    }
    *polish += 1;
    false
}

/// A round moving at least this much measures the link more than its latency.
const MIN_RATE_SAMPLE: u64 = 4 << 20;
/// The channels' rate is the best of this many latest samples.
const RATE_WINDOW: usize = 8;

/// The devices' part of a switchover, from what they report.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct DeviceOutlook {
    /// Bytes their final saves would read now, summed (serial: with their precopy data).
    pub final_bytes: u64,
    /// Time to read them out at the devices' own rates, milliseconds.
    pub read_ms: f64,
}

impl DeviceOutlook {
    /// What `devices` report now; `serial`: they are read one after another, precopy data
    /// and all ([`livemig_wire::DeviceTransfer::Main`]).
    pub fn of(devices: &[&dyn Device], serial: bool) -> DeviceOutlook {
        let pending: Vec<SavePending> = devices.iter().filter_map(|d| d.pending()).collect();
        Self::from_pending(&pending, serial)
    }

    fn from_pending(pending: &[SavePending], serial: bool) -> DeviceOutlook {
        let mut o = DeviceOutlook::default();
        for p in pending {
            let bytes = if serial {
                p.final_bytes + p.precopy_bytes
            } else {
                p.final_bytes
            };
            let ms = p
                .read_rate
                .filter(|&r| r > 0)
                .map_or(0.0, |r| 1e3 * bytes as f64 / r as f64);
            o.final_bytes += bytes;
            o.read_ms = if serial {
                o.read_ms + ms
            } else {
                o.read_ms.max(ms)
            };
        }
        o
    }
}

/// The channels' rate for the devices' bytes: the best of the latest [`RATE_WINDOW`]
/// rounds that moved at least [`MIN_RATE_SAMPLE`], else the best seen.
///
/// Why the best of a window and not the latest: a round's time is its bytes at the link's
/// rate plus a fixed cost (the markers, the acknowledgement's round trip), so a round of a
/// few MiB understates the link, and so does round 0 to a cold destination (its first touch
/// of every page, which device chunks, landing in reused buffers, do not pay: measured here,
/// 269 MB/s for round 0 against 2 GB/s the next round). An estimate too low would hold a
/// migration whose devices fit the limit until the round bound. The window lets a link that
/// slowed down show within a few rounds.
#[derive(Debug, Default)]
pub(super) struct ChannelRate {
    recent: std::collections::VecDeque<f64>,
    best: f64,
}

impl ChannelRate {
    /// A round sent `bytes` (everything on the data channels) in `ms`.
    pub fn record(&mut self, bytes: u64, ms: f64) {
        let rate = bytes as f64 / (ms / 1e3).max(1e-9);
        if bytes >= MIN_RATE_SAMPLE {
            if self.recent.len() == RATE_WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(rate);
        }
        self.best = self.best.max(rate);
    }

    /// Bytes per second, as estimated now.
    pub fn now(&self) -> f64 {
        match self.recent.iter().copied().reduce(f64::max) {
            Some(r) => r,
            None => self.best,
        }
    }
}

/// Fills in `r`'s expected downtime (and its parts) for the RAM left (`r.dirty_after`
/// pages at `r.bytes_per_s`), the devices' `dev` and the channels' `channel_rate`; with
/// `switchover_bw` (QEMU's `avail-switchover-bandwidth`), at that rate instead of both.
pub(super) fn estimate(
    r: &mut RoundReport,
    dev: DeviceOutlook,
    channel_rate: f64,
    switchover_bw: Option<u64>,
) {
    let ram_bytes = (r.dirty_after * livemig_wire::PAGE_SIZE as u64) as f64;
    let (ram_rate, channel_rate) = match switchover_bw {
        Some(bw) => (bw as f64, bw as f64),
        None => (r.bytes_per_s, channel_rate),
    };
    r.ram_expected_ms = 1e3 * ram_bytes / ram_rate.max(1.0);
    r.device_final_bytes = dev.final_bytes;
    r.device_read_ms = dev.read_ms;
    r.channel_bytes_per_s = channel_rate;
    r.expected_downtime_ms = if dev.final_bytes == 0 {
        r.ram_expected_ms
    } else {
        let wire_ms = 1e3 * (ram_bytes + dev.final_bytes as f64) / channel_rate.max(1.0);
        r.ram_expected_ms.max(dev.read_ms).max(wire_ms)
    };
}

/// The round's RAM would fit the limit but the devices keep the expected downtime above
/// it: another round right away would change nothing but the count of rounds.
pub(super) fn device_bound(r: &RoundReport, limit_ms: f64) -> bool {
    r.expected_downtime_ms > limit_ms && r.ram_expected_ms <= limit_ms
}

/// Auto-converge's state: QEMU's rule, a round whose dirtying reached half of what it sent
/// counts as not shrinking; two such rounds in a row raise the throttle a step.
pub(super) struct AutoConverge {
    pub enabled: bool,
    /// The throttle now, percent.
    pub throttle: u8,
    /// Rounds in a row that did not shrink.
    high: u32,
}

impl AutoConverge {
    pub fn new(enabled: bool) -> Self {
        AutoConverge {
            enabled,
            throttle: 0,
            high: 0,
        }
    }

    /// The throttle the next round should run at, if it changes.
    pub fn after_round(&mut self, r: &RoundReport, p: &ThrottlePolicy) -> Option<u8> {
        if !self.enabled {
            return None;
        }
        let threshold = u64::from(p.trigger_threshold);
        if r.dirty_after * 100 >= threshold * r.pages.max(1) {
            self.high += 1;
        } else {
            self.high = 0;
        }
        if self.high < 2 || self.throttle >= p.max {
            return None;
        }
        self.high = 0;
        Some(if self.throttle == 0 {
            p.initial.min(p.max)
        } else {
            self.throttle.saturating_add(p.increment).min(p.max)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_converge_follows_the_throttle_policy() {
        let round = |pages, dirty_after| RoundReport {
            pages,
            dirty_after,
            ..Default::default()
        };
        // QEMU's defaults: two rounds at half or more raise it to 20, then +10.
        let qemu = ThrottlePolicy::default();
        let mut a = AutoConverge::new(true);
        assert_eq!(a.after_round(&round(100, 50), &qemu), None);
        assert_eq!(a.after_round(&round(100, 50), &qemu), Some(20));
        a.throttle = 20;
        a.after_round(&round(100, 60), &qemu);
        assert_eq!(a.after_round(&round(100, 60), &qemu), Some(30));
        // A stricter trigger (80 %) ignores rounds at 60 %; its steps and cap apply.
        let p = ThrottlePolicy {
            initial: 40,
            increment: 25,
            max: 70,
            trigger_threshold: 80,
        };
        let mut b = AutoConverge::new(true);
        assert_eq!(b.after_round(&round(100, 60), &p), None);
        assert_eq!(b.after_round(&round(100, 60), &p), None);
        b.after_round(&round(100, 80), &p);
        assert_eq!(b.after_round(&round(100, 90), &p), Some(40));
        b.throttle = 60;
        b.after_round(&round(100, 90), &p);
        assert_eq!(
            b.after_round(&round(100, 90), &p),
            Some(70),
            "capped at max"
        );
        b.throttle = 70;
        b.after_round(&round(100, 90), &p);
        assert_eq!(b.after_round(&round(100, 90), &p), None, "at max");
        assert!(ThrottlePolicy { max: 0, ..p }.validate().is_err());
        assert!(ThrottlePolicy {
            trigger_threshold: 101,
            ..p
        }
        .validate()
        .is_err());
    }

    fn round(pages: u64, dirty_after: u64, expected_downtime_ms: f64) -> RoundReport {
        RoundReport {
            pages,
            dirty_after,
            expected_downtime_ms,
            ram_expected_ms: expected_downtime_ms,
            ..Default::default()
        }
    }

    #[test]
    fn over_the_limit_never_switches() {
        let mut polish = 0;
        assert!(!switch_now(&round(1000, 900, 500.0), 300.0, &mut polish));
        assert_eq!(polish, 0);
    }

    #[test]
    fn under_the_limit_a_round_that_halves_the_rest_is_run() {
        let mut polish = 0;
        // 64 MiB left of a 1.5 GiB first round: fits, but another round halves it.
        assert!(!switch_now(
            &round(393_216, 16_384, 32.0),
            300.0,
            &mut polish
        ));
        assert_eq!(polish, 1);
        // The rest stopped halving: switch.
        assert!(switch_now(&round(400, 300, 1.5), 300.0, &mut polish));
    }

    #[test]
    fn a_rest_below_the_floor_or_an_idle_guest_switches_at_once() {
        let mut polish = 0;
        assert!(switch_now(&round(393_216, 0, 0.0), 300.0, &mut polish));
        assert!(switch_now(&round(1000, 10, 0.5), 300.0, &mut polish));
        assert_eq!(polish, 0);
    }

    #[test]
    fn polishing_is_bounded() {
        let mut polish = 0;
        let r = round(1000, 100, 50.0);
        let extra = (0..100)
            .take_while(|_| !switch_now(&r, 300.0, &mut polish))
            .count();
        assert_eq!(extra as u32, MAX_POLISH_ROUNDS);
    }
    fn dev(final_bytes: u64, rate: Option<u64>) -> SavePending {
        SavePending {
            precopy_bytes: 1 << 20,
            final_bytes,
            read_rate: rate,
        }
    }

    #[test]
    fn devices_read_in_parallel_and_serial_adds_them_up() {
        const MIB: u64 = 1 << 20;
        let four = [dev(256 * MIB, Some(500 * MIB)); 4];
        let p = DeviceOutlook::from_pending(&four, false);
        assert_eq!(p.final_bytes, 1024 * MIB);
        assert!((p.read_ms - 512.0).abs() < 1e-6, "{p:?}");
        let s = DeviceOutlook::from_pending(&four, true);
        assert_eq!(
            s.final_bytes,
            1028 * MIB,
            "serial sends precopy data paused too"
        );
        assert!((s.read_ms - 4.0 * 514.0).abs() < 1e-6, "{s:?}");
        let unbounded = DeviceOutlook::from_pending(&[dev(MIB, None)], false);
        assert_eq!(unbounded.read_ms, 0.0);
    }

    #[test]
    fn the_estimate_is_the_largest_part() {
        const MIB: u64 = 1 << 20;
        let gbps = 1e9;
        // No device reports: the RAM's figure alone, as before devices were counted.
        let mut r = round(1000, 25_000, 0.0);
        r.bytes_per_s = 1e9;
        estimate(&mut r, DeviceOutlook::default(), gbps, None);
        assert!((r.expected_downtime_ms - 102.4).abs() < 0.01, "{r:?}");
        assert_eq!(r.ram_expected_ms, r.expected_downtime_ms);
        // Four devices of 256 MiB at 500 MiB/s: their reading, 512 ms.
        let four = DeviceOutlook::from_pending(&[dev(256 * MIB, Some(500 * MIB)); 4], false);
        estimate(&mut r, four, 4e9, None);
        assert!((r.expected_downtime_ms - 512.0).abs() < 0.01, "{r:?}");
        assert!(device_bound(&r, 300.0));
        assert!(!device_bound(&r, 600.0));
        // Over a slow link the bytes on the wire are the downtime: 1 GiB + 100 MiB at 1 GB/s.
        estimate(&mut r, four, gbps, None);
        let wire = 1e3 * (25_000 * 4096 + 1024 * MIB) as f64 / gbps;
        assert!((r.expected_downtime_ms - wire).abs() < 0.01, "{r:?}");
        // A switchover bandwidth given replaces both measured rates.
        estimate(&mut r, four, 4e9, Some(1_000_000_000));
        assert!((r.expected_downtime_ms - wire).abs() < 0.01, "{r:?}");
        assert!((r.ram_expected_ms - 102.4).abs() < 0.01, "{r:?}");
    }

    #[test]
    fn polishing_stops_when_devices_are_the_downtime() {
        let mut polish = 0;
        let mut r = round(393_216, 16_384, 200.0);
        r.ram_expected_ms = 30.0;
        assert!(
            switch_now(&r, 300.0, &mut polish),
            "RAM rounds would take nothing off"
        );
        assert_eq!(polish, 0);
    }

    #[test]
    fn the_channel_rate_comes_from_rounds_that_measure_the_link() {
        const MIB: u64 = 1 << 20;
        let mut c = ChannelRate::default();
        c.record(4096, 1.0);
        assert!(
            (c.now() - 4.096e6).abs() < 1.0,
            "no sample yet: the best seen"
        );
        // Round 0 to a cold destination, then a round at the link's rate.
        c.record(256 * MIB, 1000.0);
        c.record(28 * MIB, 14.0);
        let link = (28 * MIB) as f64 / 0.014;
        assert!((c.now() - link).abs() < 1.0, "the best of the window");
        c.record(MIB, 50.0);
        assert!(
            (c.now() - link).abs() < 1.0,
            "a round of 1 MiB measures latency"
        );
        // A link that slowed down shows once the fast sample leaves the window.
        for _ in 0..RATE_WINDOW {
            c.record(8 * MIB, 80.0);
        }
        let slow = (8 * MIB) as f64 / 0.08;
        assert!((c.now() - slow).abs() < 1.0, "{}", c.now());
    }
}
