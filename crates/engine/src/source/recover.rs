//! Postcopy recovery on the source ([`crate::recovery`]): after a break the session's
//! threads are gone, the guest stays paused here with every page, and this loop waits for a
//! way back to the destination (the same address again, or one the embedder names), opens a
//! resuming session, and runs it from the pages the destination still misses. A resume that
//! fails (nobody there yet, refused, broken again) pauses again.
//!
//! ```text
//!  Postcopy --link lost--> Paused --address--> resume set-up --PostcopyResume--> Postcopy
//!                            ^  |                   |                              |
//!                            |  +--window over or   +--failed----+                 |
//!                            |     cancelled: Err               |                 |
//!                            +------------------------------------+---link lost----+
//! ```

use super::connect;
use super::report::ReportParts;
use super::session::{self, Leftover, Start};
use super::{GuestState, Vm};
use crate::config::MigrationConfig;
use crate::error::MigrationError;
use crate::recovery::SourceRecovery;
use crate::report::{MigrationReport, Progress, RoundReport};
use crate::transport::Endpoint;
use std::time::{Duration, Instant};

/// Where a broken postcopy stands: what a resuming session needs to go on, and the report's
/// parts so far.
pub(super) struct ResumePoint {
    pub parts: ReportParts,
    pub rounds: Vec<RoundReport>,
    /// The round number postcopy pages carry.
    pub round: u32,
}

/// Pause between two attempts to reconnect by ourselves.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Waits in postcopy-paused and resumes, until the migration completes, the recovery window
/// passes, or the caller cancels. `error` is what broke the postcopy.
pub(super) fn run(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    progress: &(dyn Fn(&Progress) + Sync),
    mut point: Box<ResumePoint>,
    mut error: MigrationError,
) -> Result<MigrationReport, MigrationError> {
    let window = match &config.postcopy_recovery {
        SourceRecovery::Off => None,
        SourceRecovery::Reconnect { within } => Some(Some(*within)),
        SourceRecovery::OnRequest { within, .. } => Some(*within),
    };
    let Some(window) = window else {
        return Err(broken(error));
    };
    let deadline = window.map(|w| Instant::now() + w);
    let mut attempts = 0u32;
    let pause = |error: &MigrationError| {
        progress(&Progress::PostcopyPaused {
            error: error.to_string(),
        })
    };
    pause(&error);
    loop {
        let Some(target) = next_target(config, to, deadline, attempts) else {
            return Err(broken(error));
        };
        attempts += 1;
        let (connected, missing) = match connect::resume(vm, &target, config, &point) {
            Ok(c) => c,
            Err(e) => {
                error = e;
                // An attempt the embedder asked for is answered: paused again, it waits
                // for the next address. Reconnecting by ourselves just tries again.
                if let SourceRecovery::OnRequest { .. } = config.postcopy_recovery {
                    pause(&error);
                }
                continue;
            }
        };
        progress(&Progress::PostcopyResumed {
            missing_pages: missing.count(),
        });
        let mut broke = None;
        let mut state = GuestState::HandedOver;
        let start = Start::Resume(point, missing);
        match session::run(
            vm, config, connected, progress, &mut state, start, &mut broke,
        ) {
            Ok(report) => return Ok(report),
            Err(e) => match broke {
                Some(Leftover::Postcopy(p)) => {
                    point = p;
                    error = unwrap_broken(e);
                    pause(&error);
                }
                _ => return Err(e),
            },
        }
    }
}

/// The address to try next: the same one again after a short pause (reconnecting by
/// ourselves), or the next one the embedder names; `None` once the window has passed or
/// the migration is cancelled.
fn next_target(
    config: &MigrationConfig,
    to: &Endpoint,
    deadline: Option<Instant>,
    attempts: u32,
) -> Option<Endpoint> {
    let left = |d: Instant| d.saturating_duration_since(Instant::now());
    if deadline.is_some_and(|d| left(d).is_zero()) || config.cancel.is_cancelled() {
        return None;
    }
    match &config.postcopy_recovery {
        SourceRecovery::Off => None,
        SourceRecovery::Reconnect { .. } => {
            let pause = if attempts == 0 {
                Duration::ZERO
            } else {
                RETRY_PAUSE
            };
            config.cancel.sleep(pause).then(|| to.clone())
        }
        SourceRecovery::OnRequest { addresses, .. } => {
            let never = crossbeam_channel::never();
            let timeout = match deadline {
                Some(d) => crossbeam_channel::after(left(d)),
                None => never,
            };
            crossbeam_channel::select! {
                recv(addresses.receiver()) -> a => a.ok(),
                recv(config.cancel.waiter()) -> _ => None,
                recv(timeout) -> _ => None,
            }
        }
    }
}

/// The error a broken postcopy ends with.
fn broken(e: MigrationError) -> MigrationError {
    match e {
        e @ MigrationError::PostcopyBroken(_) => e,
        e => MigrationError::PostcopyBroken(Box::new(e)),
    }
}

/// What broke, without the wrapper a broken session's error comes in.
fn unwrap_broken(e: MigrationError) -> MigrationError {
    match e {
        MigrationError::PostcopyBroken(inner) => *inner,
        e => e,
    }
}
