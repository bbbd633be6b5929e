//! The numbers the pictures show, taken from a source report (`MigrationReport` in
//! `livemig-engine`). A negative or non-finite number reads as 0, so an odd report draws an
//! odd picture, never a panic or a NaN.

use livemig_engine::report::{DowntimeBreakdown, MigrationReport};
use serde::Serialize;

/// Bytes per guest page.
pub const PAGE_SIZE: f64 = 4096.0;

/// A number as plotted: itself if finite and non-negative, 0 otherwise.
fn clean(x: f64) -> f64 {
    if x.is_finite() && x >= 0.0 {
        x
    } else {
        0.0
    }
}

/// One round as plotted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundPoint {
    /// The round's number as the source counted it (0 is the first precopy round).
    pub round: u64,
    /// When the round started, in ms since the migration started.
    pub start_ms: f64,
    /// When the round ended, in ms since the migration started.
    pub end_ms: f64,
    /// The round's `bytes_per_s`.
    pub throughput_bytes_per_s: f64,
    /// Pages dirtied while the round was sent (what the next round has to send), in bytes.
    pub remaining_bytes: f64,
    /// Pages dirtied while the round was sent, per second of the round (0 for a 0 ms round).
    pub dirty_pages_per_s: f64,
    /// The last round: sent with the guest paused.
    pub switchover: bool,
}

/// The per-round series and the phases around them, on one time axis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// Connecting the channels, from 0.
    pub setup_ms: f64,
    /// The guest was paused from here (the end of precopy) ...
    pub paused_from_ms: f64,
    /// ... until here (downtime, plus the destination's page check if it ran).
    pub paused_until_ms: f64,
    /// The migration's whole duration as the source measured it.
    pub total_ms: f64,
    /// Every round in the order sent, the switchover round last (none in postcopy).
    pub rounds: Vec<RoundPoint>,
    /// Postcopy: from the switch until the destination had every page, in ms since the
    /// migration started (the guest ran on the destination meanwhile).
    pub postcopy: Option<(f64, f64)>,
}

impl Timeline {
    /// The timeline of a source report. Precopy rounds follow each other from the end of
    /// setup; the switchover round starts after the pause and the last dirty pass.
    pub fn from_report(rep: &MigrationReport) -> Timeline {
        let setup = clean(rep.setup_ms);
        let down = &rep.downtime;
        let mut points = Vec::with_capacity(rep.rounds.len());
        let mut t = setup;
        let mut paused_from = setup + clean(rep.precopy_ms);
        // In postcopy every round is a precopy round: the pause sends no RAM.
        let postcopy = rep.postcopy.is_some();
        for (i, r) in rep.rounds.iter().enumerate() {
            let ms = clean(r.ms);
            let switchover = i + 1 == rep.rounds.len() && !postcopy;
            if switchover {
                paused_from = paused_from.max(t);
                t = paused_from + clean(down.pause_ms) + clean(down.last_dirty_pass_ms);
            }
            let dirty_after = r.dirty_after as f64;
            points.push(RoundPoint {
                round: u64::from(r.round),
                start_ms: t,
                end_ms: t + ms,
                throughput_bytes_per_s: clean(r.bytes_per_s),
                remaining_bytes: dirty_after * PAGE_SIZE,
                dirty_pages_per_s: if ms > 0.0 {
                    dirty_after / (ms / 1e3)
                } else {
                    0.0
                },
                switchover,
            });
            t += ms;
        }
        let paused_until = if rep.rounds.is_empty() {
            paused_from
        } else {
            paused_from + clean(rep.downtime_ms) + clean(down.dest_verify_ms)
        };
        let total = clean(rep.total_ms);
        let postcopy = rep.postcopy.as_ref().map(|p| {
            let from = (total - clean(p.ms)).max(paused_from);
            (from, total.max(from))
        });
        Timeline {
            setup_ms: setup,
            paused_from_ms: paused_from,
            paused_until_ms: paused_until,
            total_ms: total,
            rounds: points,
            postcopy,
        }
    }

    /// Where the time axis ends: the last thing that happened.
    pub fn end_ms(&self) -> f64 {
        self.rounds
            .iter()
            .map(|r| r.end_ms)
            .fold(self.total_ms.max(self.paused_until_ms), f64::max)
    }
}

/// A part of the downtime: from `start_ms` (since the pause) for `ms`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Part {
    /// The report's field without `_ms`, e.g. `last_dirty_pass`; `other` for the rest.
    pub key: &'static str,
    /// What the picture calls it.
    pub label: &'static str,
    /// When it started, in ms since the guest paused.
    pub start_ms: f64,
    /// How long it took.
    pub ms: f64,
}

/// The downtime split honestly: parts that follow each other and add up to the downtime,
/// and the saves that ran at the same time inside one of them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Downtime {
    /// The guest's pause as the source measured it as a whole.
    pub downtime_ms: f64,
    /// What precopy expected at the moment of switchover.
    pub expected_ms: f64,
    /// One after the other from the pause: pause, last dirty pass, sending until the
    /// destination had everything, its restore, handover and resume, and `other` for what
    /// the parts do not account for (the downtime measured as a whole minus their sum).
    pub sequential: Vec<Part>,
    /// At the same time, inside `transfer`: the device saves, the state save and the RAM's
    /// last pages. Adding them to the sequential parts would overstate the downtime.
    pub concurrent: Vec<Part>,
    /// The destination's page check: the guest waits for it, but it is a test instrument
    /// and not counted as downtime.
    pub dest_verify_ms: f64,
    /// "multifd" or "main" (devices in turn on the main channel, after the RAM).
    pub device_transfer: String,
    /// Devices whose state was streamed (`devices[]` of the report).
    pub streamed_devices: usize,
}

/// A part's time in the report's downtime breakdown.
type Field = fn(&DowntimeBreakdown) -> f64;

/// The parts of the downtime that follow each other, in order: key, label and the field each
/// is read from.
const SEQUENTIAL: [(&str, &str, Field); 5] = [
    ("pause", "pause", |d| d.pause_ms),
    ("last_dirty_pass", "last dirty pass", |d| {
        d.last_dirty_pass_ms
    }),
    ("transfer", "send until destination has all", |d| {
        d.transfer_ms
    }),
    ("dest_restore", "destination restore", |d| d.dest_restore_ms),
    ("resume", "handover + resume", |d| d.resume_ms),
];

impl Downtime {
    /// The downtime of a source report: the sequential parts from the pause on, and the
    /// saves that ran inside the send placed where they started.
    pub fn from_report(rep: &MigrationReport) -> Downtime {
        let downtime_ms = clean(rep.downtime_ms);
        Downtime {
            downtime_ms,
            expected_ms: clean(rep.expected_downtime_ms),
            sequential: sequential_parts(&rep.downtime, downtime_ms),
            concurrent: concurrent_parts(rep),
            dest_verify_ms: clean(rep.downtime.dest_verify_ms),
            device_transfer: rep.device_transfer.clone(),
            streamed_devices: rep.devices.len(),
        }
    }

    /// Where the time axis ends: the downtime, the end of any part, or the estimate.
    pub fn end_ms(&self) -> f64 {
        self.sequential
            .iter()
            .chain(&self.concurrent)
            .map(|p| p.start_ms + p.ms)
            .fold(self.downtime_ms.max(self.expected_ms), f64::max)
    }

    /// Nothing to draw: no downtime and no part.
    pub fn is_empty(&self) -> bool {
        self.end_ms() <= 0.0
    }
}

/// The parts that follow each other from the pause, and `other` for a rest of the
/// downtime worth seeing.
fn sequential_parts(d: &DowntimeBreakdown, downtime_ms: f64) -> Vec<Part> {
    let mut sequential = Vec::with_capacity(SEQUENTIAL.len() + 1);
    let mut t = 0.0;
    for (key, label, field) in SEQUENTIAL {
        let ms = clean(field(d));
        sequential.push(Part {
            key,
            label,
            start_ms: t,
            ms,
        });
        t += ms;
    }
    // The parts are timed one by one; the downtime as a whole. A rest worth seeing is
    // shown, not hidden in another part.
    let rest = downtime_ms - t;
    if rest > 0.01_f64.max(downtime_ms * 1e-3) {
        sequential.push(Part {
            key: "other",
            label: "not in a part",
            start_ms: t,
            ms: rest,
        });
    }
    sequential
}

/// The saves that ran at the same time inside the send: device saves, state save, the
/// RAM's last pages.
fn concurrent_parts(rep: &MigrationReport) -> Vec<Part> {
    let d = &rep.downtime;
    let pause = clean(d.pause_ms);
    let ldp = clean(d.last_dirty_pass_ms);
    let ram = clean(d.ram_final_ms);
    let state = clean(d.state_save_ms);
    let serial = rep.device_transfer == "main";
    // Device jobs and the state save start at the pause; the RAM's last pages after the
    // last dirty pass. Serial device state goes on the main channel once the RAM's
    // switchover round is done (and the state saved).
    let switchover_round_ms = rep.rounds.last().map_or(0.0, |r| clean(r.ms));
    let device_start = if serial {
        (pause + ldp + ram.max(switchover_round_ms)).max(pause + state)
    } else {
        pause
    };
    vec![
        Part {
            key: "device_save",
            label: if serial {
                "device state (serial, main channel)"
            } else {
                "device saves (slowest)"
            },
            start_ms: device_start,
            ms: clean(d.device_save_ms),
        },
        Part {
            key: "state_save",
            label: "vCPU/VM state save",
            start_ms: pause,
            ms: state,
        },
        Part {
            key: "ram_final",
            label: "RAM last pages handed out",
            start_ms: pause + ldp,
            ms: ram,
        },
    ]
}

/// A report for tests, written as JSON with only the fields that matter: the fields left
/// out, in the report, its downtime and each round, take their `Default`.
#[cfg(test)]
pub(crate) fn fixture(v: serde_json::Value) -> MigrationReport {
    use livemig_engine::report::RoundReport;
    use serde_json::Value;
    fn over<T: Default + Serialize>(v: Value) -> Value {
        let mut base = serde_json::to_value(T::default()).unwrap();
        if let (Value::Object(b), Value::Object(o)) = (&mut base, v) {
            b.extend(o);
        }
        base
    }
    let mut v = over::<MigrationReport>(v);
    v["downtime"] = over::<DowntimeBreakdown>(v["downtime"].take());
    if let Some(rounds) = v["rounds"].as_array_mut() {
        for r in rounds {
            *r = over::<RoundReport>(r.take());
        }
    }
    serde_json::from_value(v).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> MigrationReport {
        fixture(json!({
            "setup_ms": 2.0, "precopy_ms": 500.0, "total_ms": 700.0,
            "downtime_ms": 133.0, "expected_downtime_ms": 58.0, "device_transfer": "multifd",
            "downtime": {"pause_ms": 0.5, "last_dirty_pass_ms": 0.5, "state_save_ms": 1.6,
                "ram_final_ms": 68.0, "device_save_ms": 130.0, "transfer_ms": 131.0,
                "dest_restore_ms": 0.75, "dest_verify_ms": 73.0, "resume_ms": 0.25},
            "rounds": [
                {"round": 0, "ms": 490.0, "bytes_per_s": 1.1e9, "dirty_after": 16384},
                {"round": 1, "ms": 130.0, "bytes_per_s": 5.1e8, "dirty_after": 0},
            ]
        }))
    }

    #[test]
    fn rounds_become_points_on_one_time_axis() {
        let t = Timeline::from_report(&sample());
        assert_eq!(t.rounds.len(), 2);
        let (r0, r1) = (&t.rounds[0], &t.rounds[1]);
        assert_eq!((r0.start_ms, r0.end_ms), (2.0, 492.0));
        assert_eq!(r0.remaining_bytes, 16384.0 * 4096.0);
        assert!((r0.dirty_pages_per_s - 16384.0 / 0.49).abs() < 1e-6);
        assert!(!r0.switchover && r1.switchover);
        // The switchover round starts after precopy, the pause and the last dirty pass.
        assert_eq!(r1.start_ms, 503.0);
        assert_eq!(t.paused_from_ms, 502.0);
        assert_eq!(t.paused_until_ms, 502.0 + 133.0 + 73.0);
        assert_eq!(t.end_ms(), 708.0);
    }

    #[test]
    fn sequential_parts_add_up_and_concurrent_ones_sit_inside() {
        let d = Downtime::from_report(&sample());
        let sum: f64 = d.sequential.iter().map(|p| p.ms).sum();
        assert!((sum - 133.0).abs() < 1e-9, "{d:#?}");
        assert!(d.sequential.iter().all(|p| p.key != "other"), "{d:#?}");
        let transfer = d.sequential.iter().find(|p| p.key == "transfer").unwrap();
        assert_eq!(transfer.start_ms, 1.0);
        for c in &d.concurrent {
            assert!(
                c.start_ms + c.ms <= transfer.start_ms + transfer.ms + 1e-9,
                "{c:?}"
            );
        }
        assert_eq!(d.dest_verify_ms, 73.0);
        // What the parts miss shows as its own part.
        let mut v = sample();
        v.downtime_ms = 140.0;
        let d = Downtime::from_report(&v);
        let other = d.sequential.last().unwrap();
        assert_eq!((other.key, other.start_ms, other.ms), ("other", 133.0, 7.0));
    }

    #[test]
    fn odd_input_reads_as_zeros() {
        // Input that is not a report at all is refused where JSON comes in (`write_report`);
        // a report's odd numbers read as 0 here.
        for v in [
            fixture(json!({})),
            fixture(json!({"rounds": [{"ms": 0, "dirty_after": 5}, {"ms": -1}]})),
            fixture(json!({"downtime_ms": -1.0, "total_ms": -5})),
        ] {
            let mut odd = v.clone();
            odd.downtime_ms = f64::NAN;
            odd.setup_ms = f64::INFINITY;
            for r in &mut odd.rounds {
                r.bytes_per_s = f64::NAN;
            }
            for v in [v, odd] {
                let t = Timeline::from_report(&v);
                for r in &t.rounds {
                    for x in [r.start_ms, r.end_ms, r.remaining_bytes, r.dirty_pages_per_s] {
                        assert!(x.is_finite() && x >= 0.0, "{v:?}: {t:?}");
                    }
                }
                assert!(t.end_ms().is_finite());
                let d = Downtime::from_report(&v);
                assert!(d.end_ms().is_finite() && d.end_ms() >= 0.0);
            }
        }
        assert_eq!(
            Timeline::from_report(&fixture(json!({"rounds": [{"ms": 0, "dirty_after": 5}]})))
                .rounds[0]
                .dirty_pages_per_s,
            0.0
        );
        assert!(Downtime::from_report(&fixture(json!({}))).is_empty());
    }

    #[test]
    fn serial_device_state_starts_after_the_ram() {
        let mut v = sample();
        v.device_transfer = "main".into();
        let d = Downtime::from_report(&v);
        let dev = d
            .concurrent
            .iter()
            .find(|p| p.key == "device_save")
            .unwrap();
        assert_eq!(dev.start_ms, 0.5 + 0.5 + 130.0);
    }
}
