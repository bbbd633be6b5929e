//! The source side of a migration.
//!
//! [`migrate`] runs one outgoing migration on the caller's thread (the coordinator) with one
//! thread per data channel, one return-path thread and a job per device save, all owned by
//! the migration's [`crate::runtime`]: every thread is joined before `migrate` returns,
//! whatever the outcome.
//!
//! The files follow the migration: `connect.rs` (set-up), `session.rs` (the threads and the
//! teardown), `coordinator.rs` (the phase machine), `precopy.rs`, `convergence.rs`,
//! `switchover.rs`, `handover.rs` (the phases' work), `report.rs`; below them the threads'
//! own code: `sender.rs`, `return_path.rs`, `devices.rs`, `dispatch.rs`, `credit.rs`,
//! `pacer.rs`, `watchdog.rs`.
//!
//! ```text
//!  Setup --> Precopy(round 0: every page) --> Precopy(round k: pages dirtied in k-1) --+
//!    |             |                                   ^                              |
//!    |             |                                   +---- not converged ----------+
//!    |             v                                                                  |
//!    |        converged, or round/time bound hit  <-----------------------------------+
//!    |             |
//!    |             v
//!    |        Switchover: pause, last dirty pass, save state, send the rest, Complete
//!    |             |
//!    |             v
//!    |        wait Loaded --> Handover --> wait Resumed --> Done (guest runs on the destination)
//!    |
//!    +--> any error before Handover: Failed, the source guest resumes here
//! ```
//!
//! Batches of page addresses and device chunks go to whichever data channel is free (see
//! `dispatch.rs`). Every device has a save job of its own from the start of precopy: it sends
//! the device's precopy data while the guest runs and its final state from the moment the
//! guest pauses, never outside the destination's credit. At switchover the device jobs, the
//! RAM's last dirty pass (on the coordinator) and the guest/VM state save (on a worker of its
//! own) all run at the same time. After a round's last batch, every channel gets a RoundEnd marker; the
//! destination makes all channels meet at each marker before applying the next round, so an
//! older copy of a page can never land after a newer one.

mod abandon;
mod connect;
mod convergence;
mod coordinator;
mod credit;
mod devices;
mod dispatch;
mod handover;
mod pacer;
mod postcopy;
mod precopy;
mod recover;
mod report;
mod return_path;
mod sender;
mod session;
mod switchover;
pub mod watchdog;

pub(crate) use coordinator::Event;

use crate::config::MigrationConfig;
use crate::device::{Device, VmState};
use crate::error::MigrationError;
use crate::guest::Guest;
use crate::report::{MigrationReport, Progress};
use crate::transport::Endpoint;
use livemig_wire::RamTransfer;

/// A VM as the engine migrates it: guest memory and state, streamed devices, and small
/// devices whose state is one blob. Borrowed for the migration: the embedder keeps
/// ownership and decides what to do with the (paused or running) VM afterwards.
#[derive(Clone, Copy)]
pub struct Vm<'a> {
    /// The guest: memory, dirty log, pause and resume, vCPU state.
    pub guest: &'a dyn Guest,
    /// Streamed devices, at most [`livemig_wire::MAX_DEVICES`]; the destination builds
    /// their twins in this order.
    pub devices: &'a [&'a dyn Device],
    /// Small devices, at most [`livemig_wire::MAX_DEVICES`]; saved at switchover and loaded
    /// on the destination in this order.
    pub vmstates: &'a [&'a dyn VmState],
}

/// Where the guest is, for cleaning up after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuestState {
    Running,
    Paused,
    HandedOver,
}

/// Migrates `guest` (without devices) to the destination listening at `to`: [`migrate_vm`]
/// with no devices.
pub fn migrate(
    guest: &dyn Guest,
    to: &Endpoint,
    config: &MigrationConfig,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<MigrationReport, MigrationError> {
    migrate_vm(
        Vm {
            guest,
            devices: &[],
            vmstates: &[],
        },
        to,
        config,
        progress,
    )
}

/// Migrates `vm` to the destination listening at `to`. On success the guest runs on the
/// destination and stays paused here; on failure or cancel before handover it runs here
/// again, memory and devices intact.
///
/// Runs on the caller's thread and blocks until the end; every thread it starts
/// (`lm-src-*`) is joined before it returns. `to` must be a destination in
/// [`crate::receive_vm`] (a refused connection is retried for
/// [`MigrationConfig::connect_timeout`] while it starts). `progress` is called on the
/// caller's thread at each step ([`Progress`]); it should return quickly, as the migration
/// waits for it. To cancel from another thread, keep a clone of
/// [`MigrationConfig::cancel`]; to watch the bytes move, a clone of
/// [`MigrationConfig::stats`].
///
/// On success the source guest is paused with its dirty log stopped, and must never run
/// again: the embedder tears it down (its devices' saves are complete). Errors, and where
/// the guest is after each, are described at [`MigrationError`]; only
/// [`MigrationError::HandoverUnknown`] (and a thread failure found after the handover) leave
/// the guest paused here.
pub fn migrate_vm(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<MigrationReport, MigrationError> {
    config.validate()?;
    if vm.devices.len() > livemig_wire::MAX_DEVICES || vm.vmstates.len() > livemig_wire::MAX_DEVICES
    {
        return Err(MigrationError::Config(format!(
            "at most {} devices of each kind",
            livemig_wire::MAX_DEVICES
        )));
    }
    if config.ram == RamTransfer::Local {
        connect::check_local(vm, to, config)?;
    }
    let connected = connect::connect(vm, to, config)?;
    // A feature the destination lacks and the source can do without is left off.
    let agreed = connect::within(config, &connected.agreed);
    let config = agreed.as_ref().unwrap_or(config);
    let mut state = GuestState::Running;
    let mut left = None;
    let start = session::Start::Fresh;
    let result = session::run(
        vm, config, connected, progress, &mut state, start, &mut left,
    );
    let result = match (result, left) {
        // A postcopy broken by a lost link waits to be resumed over a new connection.
        (Err(e), Some(session::Leftover::Postcopy(point))) => {
            recover::run(vm, to, config, progress, point, e)
        }
        // A switchover abandoned past its bound: the guest runs here again, and the
        // migration goes on.
        (Err(e), Some(session::Leftover::Switchover(point))) => {
            abandon::run(vm, to, config, progress, &mut state, point, e)
        }
        (result, _) => result,
    };
    // A cancel from outside shuts the sockets down, so threads see broken channels: the
    // cause is still the cancel (unless the guest was already handed over).
    let result = result.map_err(|e| match e {
        MigrationError::HandoverUnknown(_) | MigrationError::PostcopyBroken(_) => e,
        _ if config.cancel.is_cancelled() => MigrationError::Cancelled,
        e => e,
    });
    if let Err(e) = result {
        if state == GuestState::HandedOver {
            // The destination may run the guest: nothing here may run again.
            return Err(e);
        }
        // Every step is tried, whatever the others do; the first of their errors is kept
        // only if the migration's own error is not more telling.
        let _ = vm.guest.set_throttle(0);
        let _ = vm.guest.stop_dirty_log();
        thaw_and_resume(vm, config, &mut state)?;
        return Err(e);
    }
    result
}

/// The devices' saves undone (every one tried, the first error returned after the guest
/// resumed), then the guest resumed if the migration paused it (a guest its operator
/// stopped stays stopped); `state` is `Running` once nothing of the migration holds it.
fn thaw_and_resume(
    vm: Vm<'_>,
    config: &MigrationConfig,
    state: &mut GuestState,
) -> Result<(), MigrationError> {
    let devices = vm
        .devices
        .iter()
        .map(|d| d.abort_save())
        .find_map(Result::err);
    if *state == GuestState::Paused && !config.guest_paused {
        vm.guest.resume()?;
    }
    *state = GuestState::Running;
    match devices {
        Some(d) => Err(MigrationError::Device(d)),
        None => Ok(()),
    }
}
