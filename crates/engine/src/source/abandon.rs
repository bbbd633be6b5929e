//! A hard bound on the switchover's pause ([`MigrationConfig::downtime_hard_limit`]), which
//! QEMU does not have: once the guest is paused there, a slow device or a stalled link makes
//! the downtime whatever it becomes. Here the source keeps the guest until the destination
//! has loaded everything, so a switchover still unfinished at the bound can be given up:
//!
//! ```text
//!  Saving / AwaitLoaded --bound passed--> devices interrupted, Reject(SwitchoverAbandoned),
//!      ^                                  session torn down, dirty log on, devices thawed,
//!      |                                  guest resumed here
//!      |                                        |
//!      |                                        v
//!      +-- converged again <-- precopy from the final round's pages, in a new connection
//!                              of the same session (the destination kept guest memory)
//! ```
//!
//! The session that goes on is the same migration: its id, rounds, report and counters go
//! on; the destination builds fresh device twins and keeps every page it has. The expected
//! downtime is floored at what the abandoned switchover had taken when it was cut (what was
//! learnt). After [`MigrationConfig::switchover_attempts`] abandoned switchovers,
//! [`MigrationConfig::on_no_convergence`] decides: `Force` runs the next one without the
//! bound, `Cancel` fails with [`MigrationError::SwitchoverAbandoned`].
//!
//! The bound covers the waits of the switchover (device and state saves, the destination's
//! `Loaded`) and the hand-out of the final round's pages; a write to a main channel that
//! stopped draining is bounded by [`MigrationConfig::switchover_timeout`] only.

use super::connect;
use super::coordinator::{Coordinator, Phase};
use super::precopy::Precopy;
use super::report::ReportParts;
use super::session::{self, Leftover, Start};
use super::{GuestState, Vm};
use crate::config::{MigrationConfig, NoConvergence};
use crate::error::MigrationError;
use crate::report::{ms, AbandonedSwitchover, MigrationReport, Progress};
use crate::transport::Endpoint;
use std::time::Instant;

/// Where an abandoned switchover left the migration: what the session that goes on needs.
pub(super) struct ContinuePoint {
    pub parts: ReportParts,
    /// Precopy's state, its next set the abandoned final round's pages.
    pub precopy: Precopy,
}

impl ContinuePoint {
    /// The point after the switchover the coordinator's `precopy` and `parts` describe was
    /// abandoned.
    pub fn new(parts: ReportParts, mut precopy: Precopy) -> Self {
        if let Some(set) = precopy.final_set.take() {
            precopy.dirty = set;
        }
        precopy.redirtied.clear();
        precopy.round_base += precopy.round + 1;
        precopy.round = 0;
        precopy.polish = 0;
        precopy.floor_ms = parts.abandoned.last().map_or(0.0, |a| a.cut_ms);
        ContinuePoint { parts, precopy }
    }
}

impl Coordinator<'_> {
    /// The guest just paused for a switchover: the bound starts, if one is set and attempts
    /// are left. The final round's pages are kept, to go again if it is abandoned.
    pub(super) fn arm_hard_limit(&mut self) {
        let abandoned = self.parts.abandoned.len() as u32;
        let Some(limit) = self.config.downtime_hard_limit else {
            return;
        };
        if abandoned >= self.config.switchover_attempts {
            return;
        }
        // As the switchover timeout, the bound starts after a `pause_before_switchover` hold.
        let from = match self.config.pause_before_switchover {
            Some(_) => Instant::now(),
            None => self.parts.paused_at,
        };
        self.hard_deadline = Some(from + limit);
        self.awaiting = "the final round's pages to go out";
        self.precopy.final_set = Some(self.precopy.dirty.clone());
    }

    /// Fires when the switchover under way runs past its bound (never without one).
    pub(super) fn hard_timer(&self) -> crossbeam_channel::Receiver<Instant> {
        match self.hard_deadline {
            Some(d) => crossbeam_channel::at(d),
            None => crossbeam_channel::never(),
        }
    }

    /// The switchover is given up: recorded, and the error that tears the session down (its
    /// teardown interrupts the devices and tells the destination, see `session.rs`).
    pub(super) fn abandon(&mut self) -> MigrationError {
        self.hard_deadline = None;
        let last = self.precopy.rounds.last();
        self.parts.abandoned.push(AbandonedSwitchover {
            round: self.precopy.round_base + self.precopy.round,
            expected_downtime_ms: last.map_or(0.0, |r| r.expected_downtime_ms),
            cut_ms: ms(self.parts.paused_at.elapsed()),
            paused_ms: 0.0,
            waiting_for: self.awaiting.to_string(),
        });
        MigrationError::SwitchoverAbandoned {
            attempts: self.parts.abandoned.len() as u32,
            limit_ms: self.config.downtime_hard_limit.map_or(0.0, ms),
            waiting_for: self.awaiting.to_string(),
        }
    }

    /// The session that goes on after an abandoned switchover: precopy from its pages.
    pub(super) fn continue_from(&mut self, point: ContinuePoint) -> Result<Phase, MigrationError> {
        let session = std::mem::replace(&mut self.parts, point.parts);
        self.parts.setup += session.setup;
        self.precopy = point.precopy;
        self.start_round()
    }
}

/// After an abandoned switchover (`error`): the guest runs here again, and the migration
/// goes on in new connections of the same session until one completes, a switchover is
/// abandoned once too often under `NoConvergence::Cancel`, or anything else fails.
pub(super) fn run(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    progress: &(dyn Fn(&Progress) + Sync),
    state: &mut GuestState,
    mut point: Box<ContinuePoint>,
    mut error: MigrationError,
) -> Result<MigrationReport, MigrationError> {
    loop {
        resume_here(vm, config, state, &mut point, progress)?;
        let abandoned = point.parts.abandoned.len() as u32;
        if abandoned >= config.switchover_attempts
            && config.on_no_convergence == NoConvergence::Cancel
        {
            return Err(error);
        }
        let connected = connect::continuing(vm, to, config, point.parts.session)?;
        let agreed = connect::within(config, &connected.agreed);
        let config = agreed.as_ref().unwrap_or(config);
        let mut left = None;
        let start = Start::Continue(point);
        match session::run(vm, config, connected, progress, state, start, &mut left) {
            Ok(report) => return Ok(report),
            Err(e) => match left {
                Some(Leftover::Switchover(p)) => {
                    point = p;
                    error = e;
                }
                _ => return Err(e),
            },
        }
    }
}

/// The guest runs here again: its dirty log on before it runs (every page it writes goes
/// again), the devices thawed, then its vCPUs (not a guest its operator stopped).
fn resume_here(
    vm: Vm<'_>,
    config: &MigrationConfig,
    state: &mut GuestState,
    point: &mut ContinuePoint,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<(), MigrationError> {
    if point.precopy.copy_ram {
        vm.guest.start_dirty_log()?;
    }
    super::thaw_and_resume(vm, config, state)?;
    let paused_ms = ms(point.parts.paused_at.elapsed());
    if let Some(last) = point.parts.abandoned.last_mut() {
        last.paused_ms = paused_ms;
        progress(&Progress::SwitchoverAbandoned(last.clone()));
    }
    Ok(())
}
