//! Precopy: rounds of pages while the guest runs, each ended by a marker on every channel
//! and the destination's acknowledgement, until the rest fits the downtime limit (or a
//! bound is hit).

use super::convergence::DeviceOutlook;
use super::convergence::{device_bound, estimate, switch_now, AutoConverge, ChannelRate};
use super::coordinator::{unexpected, Coordinator, Event, Phase};
use super::dispatch::{Dispatcher, NotSent};
use super::pacer::Pacer;
use super::sender::Job;
use super::watchdog::Awaited;
use crate::config::{MigrationConfig, NoConvergence};
use crate::dirty::DirtyBitmap;
use crate::error::{ChannelName, MigrationError};
use crate::framed;
use crate::report::{ms, Progress, RoundReport};
use livemig_wire::{DeviceTransfer, FrameKind, RamTransfer, RoundEnd, RoundStart, PAGE_SIZE};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Rounds whose RAM would fit the limit while the devices keep the expected downtime above
/// it start this long after the one before, at the soonest: the devices' figures change at
/// their own pace (precopy data read, a limit raised over QMP), and rounds in a tight loop
/// would only use up [`crate::MigrationConfig::max_rounds`] in milliseconds. QEMU's
/// migration thread iterates at a similar pace (its 100 ms rate-limit window).
const DEVICE_BOUND_PAUSE: Duration = Duration::from_millis(100);

/// Precopy's state across rounds.
pub(super) struct Precopy {
    /// Pages to send in the next round (every page before round 0).
    pub dirty: DirtyBitmap,
    /// Pages the guest wrote during the round under way, seen by passes over the dirty log
    /// in the middle of it: not sent in this round if their turn has not come (they are in
    /// the next round's set); the round's end starts the next set from them.
    pub redirtied: DirtyBitmap,
    /// False in local mode: the destination maps the very memory the guest writes, no page
    /// is sent, nothing is tracked, and precopy is one empty round (devices still stream).
    pub copy_ram: bool,
    /// The round being sent (or, at switchover, the final round's number).
    pub round: u32,
    /// Every round so far, the switchover round last once it is done.
    pub rounds: Vec<RoundReport>,
    pub converge: AutoConverge,
    /// Rounds run past the point where the rest fit the limit.
    pub polish: u32,
    /// The channels' rate the devices' final bytes are expected to go at.
    pub channel: ChannelRate,
    pub start: Instant,
    /// Rounds run in earlier sessions of this migration: after an abandoned switchover the
    /// session that goes on numbers its rounds from 0 on the wire, the report goes on.
    pub round_base: u32,
    /// What the last abandoned switchover had taken when it was cut, milliseconds: the
    /// expected downtime is not taken for less (what was learnt).
    pub floor_ms: f64,
    /// The final round's pages, kept while a hard bound may abandon the switchover: they
    /// go again in the session that goes on.
    pub final_set: Option<DirtyBitmap>,
}

impl Precopy {
    pub fn new(dirty: DirtyBitmap, copy_ram: bool, auto_converge: bool) -> Self {
        Precopy {
            redirtied: DirtyBitmap::new(dirty.ranges()),
            dirty,
            copy_ram,
            round: 0,
            rounds: Vec::new(),
            converge: AutoConverge::new(auto_converge),
            polish: 0,
            channel: ChannelRate::default(),
            start: Instant::now(),
            round_base: 0,
            floor_ms: 0.0,
            final_set: None,
        }
    }
}

/// How often a round that runs while the guest does looks at the dirty log (see
/// [`Precopy::redirtied`]).
const MID_ROUND_SYNC: Duration = Duration::from_millis(200);

/// Counters at the start of a round, and the pages it skipped.
pub(super) struct RoundStartCounters {
    bytes: u64,
    /// Every byte the data channels sent (RAM, device chunks, markers).
    all_bytes: u64,
    normal: u64,
    zero: u64,
    pages: u64,
    skipped: u64,
}

/// A precopy round on its way.
pub(super) struct RoundInFlight {
    round: u32,
    before: RoundStartCounters,
    t0: Instant,
    /// Channels that have sent their RoundEnd marker.
    sent: usize,
    acked: bool,
}

impl Coordinator<'_> {
    /// Starts tracking dirty pages and sends round 0: every page.
    pub(super) fn begin(&mut self) -> Result<Phase, MigrationError> {
        let guest = self.vm.guest;
        self.precopy.copy_ram = self.config.ram == RamTransfer::Copy;
        if self.precopy.copy_ram {
            guest.start_dirty_log()?;
            self.precopy.dirty.set_all();
        }
        (self.progress)(&Progress::Connected {
            session: self.parts.session.to_string(),
            channels: self.config.channels,
            setup_ms: ms(self.parts.setup),
            total_pages: self.precopy.dirty.count(),
            devices: self.vm.devices.len(),
        });
        self.precopy.start = Instant::now();
        self.start_round()
    }

    /// Sends every dirty page as the next round, then a RoundEnd on every channel.
    pub(super) fn start_round(&mut self) -> Result<Phase, MigrationError> {
        let t0 = Instant::now();
        let round = self.precopy.round;
        let before = self.send_pages(round, true)?;
        self.end_marker(round, false)?;
        Ok(Phase::Precopy(RoundInFlight {
            round,
            before,
            t0,
            sent: 0,
            acked: false,
        }))
    }

    /// Precopy's events: a channel's marker sent, the destination's ack. Once both are in,
    /// the round is over: nothing of it is in flight, so its rate is the end-to-end rate.
    pub(super) fn on_round_event(
        &mut self,
        mut r: RoundInFlight,
        ev: Event,
    ) -> Result<Phase, MigrationError> {
        let channels = self.dispatch.channels();
        match ev {
            Event::RoundSent(n) if n == r.round => {
                r.sent += 1;
                if r.sent == channels && !r.acked {
                    // All of the round is on its way: a live destination that reads
                    // acknowledges it within the peer timeout, pings or not.
                    self.watchdog
                        .arm(Awaited::RoundAck(r.round), self.accept.peer_timeout());
                }
            }
            Event::RoundAck(n) if n == r.round => r.acked = true,
            other => return Err(unexpected(other)),
        }
        if r.sent < channels || !r.acked {
            return Ok(Phase::Precopy(r));
        }
        self.watchdog.disarm();
        let report = self.round_report(r.round, &r.before, r.t0);
        let all = self.counters.bytes.load(Relaxed) - r.before.all_bytes;
        self.precopy.channel.record(all, report.ms);
        self.end_round(report, r.t0)
    }

    /// After a round: what is dirty now, what the devices hold, the expected downtime,
    /// then the decision.
    fn end_round(&mut self, mut report: RoundReport, t0: Instant) -> Result<Phase, MigrationError> {
        let p = &mut self.precopy;
        report.throttle_percent = p.converge.throttle;
        // The next round: what the middle of this one saw written, and the rest of the log.
        std::mem::swap(&mut p.dirty, &mut p.redirtied);
        p.redirtied.clear();
        if p.copy_ram {
            self.vm.guest.sync_dirty_log(&mut p.dirty)?;
        }
        report.dirty_after = p.dirty.count();
        let serial = self.config.device_transfer == DeviceTransfer::Main;
        let devices = DeviceOutlook::of(self.vm.devices, serial);
        let switchover_bw = self.config.avail_switchover_bandwidth_now();
        estimate(&mut report, devices, p.channel.now(), switchover_bw);
        report.expected_downtime_ms = report.expected_downtime_ms.max(p.floor_ms);
        report.downtime_limit_ms = ms(self.config.downtime_limit_now());
        (self.progress)(&Progress::RoundDone(report.clone()));
        self.after_round(report, t0)
    }

    /// Whether to switch over, to postcopy, give up at a bound, or run another round (after
    /// a pause when only the devices keep the downtime above the limit).
    fn after_round(
        &mut self,
        mut report: RoundReport,
        t0: Instant,
    ) -> Result<Phase, MigrationError> {
        let p = &mut self.precopy;
        let limit_ms = report.downtime_limit_ms;
        let fits = switch_now(&report, limit_ms, &mut p.polish);
        // With switchover-ack, a precopy that converged goes on until the devices' twins
        // have loaded what must come first.
        let unacked = self.config.switchover_ack && !self.acked.load(Relaxed);
        let converged = fits && !unacked;
        let wait_for_devices = device_bound(&report, limit_ms) || (fits && unacked);
        // Throttling the guest takes nothing off the devices' part: only the RAM's rounds
        // count for auto-converge.
        let next_throttle = match wait_for_devices {
            true => None,
            false => p.converge.after_round(&report, &self.config.throttle_now()),
        };
        let expected_downtime_ms = report.expected_downtime_ms;
        report.switchover_ack_awaited = fits && unacked;
        p.rounds.push(report);
        p.round += 1;
        if converged {
            return self.enter_switchover(false);
        }
        let policy = self.config.postcopy;
        let asked = policy.after_rounds.is_some_and(|n| p.round >= n)
            || self.config.postcopy_trigger.fired();
        if policy.allowed && asked {
            return self.enter_postcopy();
        }
        let rounds = p.round_base + p.round;
        if rounds >= self.config.max_rounds || p.start.elapsed() >= self.config.max_precopy_time {
            match self.config.on_no_convergence {
                NoConvergence::Cancel => {
                    return Err(MigrationError::NotConverged {
                        rounds,
                        expected_downtime_ms,
                        limit_ms,
                        throttle_percent: p.converge.throttle,
                    })
                }
                NoConvergence::Postcopy => return self.enter_postcopy(),
                NoConvergence::Force => return self.enter_switchover(true),
            }
        }
        if let Some(t) = next_throttle {
            // A guest that cannot be throttled migrates on without it.
            if self.vm.guest.set_throttle(t).is_err() {
                p.converge.enabled = false;
            } else {
                p.converge.throttle = t;
            }
        }
        if wait_for_devices
            && !self
                .cancel
                .sleep(DEVICE_BOUND_PAUSE.saturating_sub(t0.elapsed()))
        {
            return Err(self.failure_cause());
        }
        self.start_round()
    }

    /// Sends every page of the dirty bitmap as round `round`; returns the counters before,
    /// for the round's report. In a `live` round (the guest running) the dirty log is read
    /// every [`MID_ROUND_SYNC`] while the round is handed out, and a page written again
    /// before its turn is left to the next round.
    pub(super) fn send_pages(
        &mut self,
        round: u32,
        live: bool,
    ) -> Result<RoundStartCounters, MigrationError> {
        let c = self.counters;
        let mut before = RoundStartCounters {
            bytes: c.ram_bytes.load(Relaxed),
            all_bytes: c.bytes.load(Relaxed),
            normal: c.normal_pages.load(Relaxed),
            zero: c.zero_pages.load(Relaxed),
            pages: self.precopy.dirty.count(),
            skipped: 0,
        };
        let start = RoundStart {
            round,
            pages: before.pages,
        };
        framed::send(
            &mut self.main,
            ChannelName::Main,
            FrameKind::RoundStart,
            &start.encode(),
        )?;
        (self.progress)(&Progress::RoundStarted {
            round,
            pages: before.pages,
        });
        let per = self.config.pages_per_packet as usize;
        let live = live && self.precopy.copy_ram;
        // The final pass of a switchover with a hard bound gives up at the bound.
        let deadline = if live { None } else { self.hard_deadline };
        let mut batch = Vec::with_capacity(per);
        let mut synced = Instant::now();
        let (mut stopped, mut cut) = (false, false);
        for addr in self.precopy.dirty.addrs() {
            if self.precopy.redirtied.contains(addr) {
                before.skipped += 1;
                continue;
            }
            batch.push(addr);
            if batch.len() < per {
                continue;
            }
            let full = std::mem::replace(&mut batch, Vec::with_capacity(per));
            let (pacer, dispatch) = (&mut self.pacer, &self.dispatch);
            match hand_out(pacer, dispatch, self.config, deadline, (round, full)) {
                Ok(()) => {}
                Err(NotSent::Late) => {
                    cut = true;
                    break;
                }
                Err(NotSent::Stopped) => {
                    stopped = true;
                    break;
                }
            }
            if live && synced.elapsed() >= MID_ROUND_SYNC {
                self.vm.guest.sync_dirty_log(&mut self.precopy.redirtied)?;
                synced = Instant::now();
            }
        }
        if cut {
            return Err(self.abandon());
        }
        if stopped {
            return Err(self.failure_cause());
        }
        let (pacer, dispatch) = (&mut self.pacer, &self.dispatch);
        match hand_out(pacer, dispatch, self.config, deadline, (round, batch)) {
            Ok(()) => {}
            Err(NotSent::Late) => return Err(self.abandon()),
            Err(NotSent::Stopped) => return Err(self.failure_cause()),
        }
        Ok(before)
    }

    /// A RoundEnd on every channel (`last` for the switchover round, after which a channel
    /// carries nothing more).
    pub(super) fn end_marker(&mut self, round: u32, last: bool) -> Result<(), MigrationError> {
        if self
            .dispatch
            .broadcast(|| Job::RoundEnd(RoundEnd { round, last }))
            .is_err()
        {
            return Err(self.failure_cause());
        }
        Ok(())
    }

    /// A round's report from the counters now and at its start.
    pub(super) fn round_report(
        &self,
        round: u32,
        before: &RoundStartCounters,
        t0: Instant,
    ) -> RoundReport {
        let c = self.counters;
        let elapsed = t0.elapsed();
        let bytes = c.ram_bytes.load(Relaxed) - before.bytes;
        RoundReport {
            round: self.precopy.round_base + round,
            pages: before.pages,
            normal_pages: c.normal_pages.load(Relaxed) - before.normal,
            zero_pages: c.zero_pages.load(Relaxed) - before.zero,
            bytes,
            ms: ms(elapsed),
            bytes_per_s: bytes as f64 / elapsed.as_secs_f64().max(1e-9),
            skipped_pages: before.skipped,
            ..Default::default()
        }
    }
}

/// Hands a batch (none if empty) to the first free data channel, within the bandwidth limit
/// in force now; `Late` once `deadline` (a switchover's hard bound) has passed.
fn hand_out(
    pacer: &mut Pacer,
    dispatch: &Dispatcher,
    config: &MigrationConfig,
    deadline: Option<Instant>,
    (round, addrs): (u32, Vec<u64>),
) -> Result<(), NotSent> {
    if addrs.is_empty() {
        return Ok(());
    }
    if deadline.is_some_and(|d| Instant::now() >= d) {
        return Err(NotSent::Late);
    }
    pacer.admit((addrs.len() * PAGE_SIZE) as u64, config.max_bandwidth_now());
    dispatch.send_until(Job::Pages { round, addrs }, deadline)
}
