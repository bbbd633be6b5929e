//! The source's coordinator: a state machine over the migration's phases, on the caller's
//! thread. Each phase waits for its own events; [`Coordinator::step`] takes a phase and the
//! next event to the next phase. Entering a phase does its work (a round's pages handed to
//! the channels, the guest paused, the state sent); the phases' work is in `precopy.rs`,
//! `switchover.rs` and `handover.rs`.
//!
//! ```text
//!  begin ──► Precopy(round k) ──► round acked ──┬─ go on ───────────► Precopy(round k+1)
//!                                               ├─ converged/bound ─► Saving (guest paused)
//!                                               └─ bound, on_no_convergence=cancel ─► Err
//!  Saving ──► every device and the state saved ──► AwaitLoaded ──► Loaded ──► AwaitResumed
//!  AwaitResumed ──► Resumed ──► Done(report)
//! ```

use super::devices::{SaveError, SaveStats, Switchover};
use super::dispatch::Dispatcher;
use super::handover::HandedOver;
use super::pacer::Pacer;
use super::postcopy::PostcopyRun;
use super::precopy::{Precopy, RoundInFlight};
use super::report::ReportParts;
use super::session::{PostcopyShared, Start};
use super::switchover::{SavedState, Saving};
use super::watchdog::Watchdog;
use super::{GuestState, Vm};
use crate::cancel::CancelToken;
use crate::config::MigrationConfig;
use crate::error::{ChannelError, ChannelName, MigrationError};
use crate::report::{MigrationReport, Progress};
use crate::runtime::{ThreadDone, ThreadError};
use crate::stats::Counters;
use crate::transport::Stream;
use crossbeam_channel::{select, Receiver};
use livemig_wire::{Loaded, SessionAccept};
use std::time::{Duration, Instant};

/// What the coordinator hears from its threads.
pub(crate) enum Event {
    /// A data channel has sent its RoundEnd marker for a round.
    RoundSent(u32),
    /// A data channel failed.
    Failed(ChannelError),
    /// The destination has applied every page of a round.
    RoundAck(u32),
    /// The destination has loaded everything.
    Loaded(Loaded),
    /// The destination guest runs.
    Resumed,
    /// The return path failed or the destination refused.
    PeerFailed(ChannelError),
    /// A device's save job ended.
    DeviceDone(u16, Result<SaveStats, SaveError>),
    /// The state-save worker ended.
    StateSaved(Result<SavedState, MigrationError>),
    /// Postcopy: the destination has installed every page.
    PostcopyComplete(livemig_wire::PostcopyComplete),
}

/// Where the migration is.
pub(super) enum Phase {
    /// A precopy round is on its way: waiting for every channel's marker and the ack.
    Precopy(RoundInFlight),
    /// The guest is paused and the RAM's last pass handed out: waiting for the device saves
    /// and the state save.
    Saving(Saving),
    /// Everything is sent: waiting for the destination's Loaded.
    AwaitLoaded,
    /// Handover sent: waiting for the destination's Resumed.
    AwaitResumed(HandedOver),
    /// Postcopy: the destination runs (or is about to run) the guest while its last pages
    /// come; waiting for its Resumed, then its PostcopyComplete.
    Postcopy(PostcopyRun),
    /// The guest runs on the destination.
    Done(Box<MigrationReport>),
}

/// The coordinator: decides rounds, hands out RAM batches, drives switchover.
pub(super) struct Coordinator<'a> {
    pub vm: Vm<'a>,
    pub config: &'a MigrationConfig,
    pub main: Stream,
    pub events: Receiver<Event>,
    /// Endings of the migration's threads: a panicking one shows up here.
    pub threads: Receiver<ThreadDone>,
    pub dispatch: Dispatcher,
    pub counters: &'a Counters,
    pub pacer: Pacer,
    pub progress: &'a (dyn Fn(&Progress) + Sync),
    pub state: &'a mut GuestState,
    pub cancel: CancelToken,
    pub switchover: &'a Switchover,
    /// Deadlines of the waits on the destination.
    pub watchdog: &'a Watchdog,
    pub accept: SessionAccept,
    pub precopy: Precopy,
    /// Shared with the return path for postcopy's requests.
    pub postcopy: &'a PostcopyShared,
    /// The background push's queue, in a session that may switch to postcopy.
    pub push: Option<crossbeam_channel::Sender<super::postcopy::PushOrder>>,
    pub parts: ReportParts,
    /// While a switchover may be abandoned: when (see `abandon.rs`).
    pub hard_deadline: Option<Instant>,
    /// What the switchover waits for now, for the report of an abandoned one.
    pub awaiting: &'static str,
    /// The destination's `SwitchoverAck` came (set by the return path).
    pub acked: &'a std::sync::atomic::AtomicBool,
}

impl Coordinator<'_> {
    /// Runs the migration to its end: the guest runs on the destination, or an error.
    pub fn run(&mut self, start: Start) -> Result<MigrationReport, MigrationError> {
        self.run_phases(start).map_err(|e| match e {
            // Once PostcopyStart went out the guest's memory is split between the hosts,
            // whichever phase the failure came in.
            MigrationError::PostcopyBroken(_) | MigrationError::HandoverUnknown(_) => e,
            e if self.parts.postcopy_started.is_some() => {
                MigrationError::PostcopyBroken(Box::new(e))
            }
            e => e,
        })
    }

    fn run_phases(&mut self, start: Start) -> Result<MigrationReport, MigrationError> {
        let mut phase = match start {
            Start::Fresh => self.begin()?,
            Start::Resume(point, missing) => self.resume_postcopy(*point, missing)?,
            Start::Continue(point) => self.continue_from(*point)?,
        };
        loop {
            phase = match phase {
                Phase::Done(report) => return Ok(*report),
                // Once handed over, the destination may run the guest: whatever goes wrong
                // now leaves the outcome unknown.
                Phase::AwaitResumed(h) => {
                    self.next_event()
                        .and_then(|ev| self.on_resumed(h, ev))
                        .map_err(|e| MigrationError::HandoverUnknown(Box::new(e)))?
                }
                // The guest's memory is split between the hosts: neither may give up alone,
                // unless the destination refused before it ran the guest.
                Phase::Postcopy(run) => {
                    let resumed = run.resumed();
                    match self
                        .next_event()
                        .and_then(|ev| self.on_postcopy_event(run, ev))
                    {
                        Ok(phase) => phase,
                        Err(e @ MigrationError::Channel(ChannelError::Rejected { .. }))
                            if !resumed =>
                        {
                            return Err(self.take_back(e))
                        }
                        Err(e) => return Err(MigrationError::PostcopyBroken(Box::new(e))),
                    }
                }
                phase => {
                    let ev = self.next_event()?;
                    self.step(phase, ev)?
                }
            };
        }
    }

    /// From `phase`, on `ev`, to the next phase.
    fn step(&mut self, phase: Phase, ev: Event) -> Result<Phase, MigrationError> {
        match phase {
            Phase::Precopy(round) => self.on_round_event(round, ev),
            Phase::Saving(saving) => self.on_save_event(saving, ev),
            Phase::AwaitLoaded => self.on_loaded(ev),
            Phase::AwaitResumed(h) => self.on_resumed(h, ev),
            Phase::Postcopy(run) => self.on_postcopy_event(run, ev),
            Phase::Done(_) => Err(unexpected(ev)),
        }
    }

    /// A data channel broke: when the destination refused, it says why on the main channel
    /// just before it closes the channels, so its reason (not the broken pipe that follows)
    /// is the error to report. Waits briefly for it.
    fn peer_reason_or(&self, e: ChannelError) -> MigrationError {
        if !matches!(e, ChannelError::Io { .. } | ChannelError::Closed { .. }) {
            return e.into();
        }
        let deadline = Instant::now() + Duration::from_millis(300);
        while let Ok(ev) = self
            .events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Event::PeerFailed(r @ ChannelError::Rejected { .. }) = ev {
                return r.into();
            }
        }
        e.into()
    }

    /// Why the migration is being torn down: the first failure among the queued events, or
    /// a cancel.
    pub fn failure_cause(&self) -> MigrationError {
        // A deadline that passed cut the sockets: the failures that follow are its doing.
        if let Some(x) = self.watchdog.expired() {
            return MigrationError::Deadline(x);
        }
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                Event::Failed(e) => return self.peer_reason_or(e),
                Event::PeerFailed(e) => return e.into(),
                Event::DeviceDone(_, Err(SaveError::Device(e))) => return e.into(),
                Event::StateSaved(Err(e)) => return e,
                _ => {}
            }
        }
        MigrationError::Cancelled
    }

    /// The next event; failures of any thread or job, a cancel and a deadline passing (which
    /// cancels the attempt) become errors. A deadline that passed cut the sockets: whatever
    /// failure follows (a broken return path, a channel) is its doing, and it is the cause.
    fn next_event(&mut self) -> Result<Event, MigrationError> {
        self.next_event_or_failure()
            .map_err(|e| match self.watchdog.expired() {
                Some(x) => MigrationError::Deadline(x),
                None => e,
            })
    }

    fn next_event_or_failure(&mut self) -> Result<Event, MigrationError> {
        loop {
            let ev = select! {
                recv(self.events) -> ev => ev.map_err(|_| MigrationError::ThreadsGone)?,
                recv(self.hard_timer()) -> _ => return Err(self.abandon()),
                recv(self.threads) -> done => {
                    thread_failure(done)?;
                    continue;
                }
                recv(self.cancel.waiter()) -> _ => return Err(self.failure_cause()),
            };
            return self.check(ev);
        }
    }

    pub(super) fn check(&self, ev: Event) -> Result<Event, MigrationError> {
        match ev {
            Event::Failed(e) => Err(self.peer_reason_or(e)),
            Event::PeerFailed(e) => Err(e.into()),
            Event::DeviceDone(_, Err(SaveError::Device(e))) => Err(e.into()),
            // A job stopped because the attempt is being torn down: say why it is.
            Event::DeviceDone(_, Err(SaveError::Stopped)) => Err(self.failure_cause()),
            ev => Ok(ev),
        }
    }
}

/// A thread that panicked (or could not start) fails the migration; other endings are seen
/// through the thread's own events.
fn thread_failure(
    done: Result<ThreadDone, crossbeam_channel::RecvError>,
) -> Result<(), MigrationError> {
    match done {
        Ok(ThreadDone {
            result: Err(e @ (ThreadError::Panicked { .. } | ThreadError::Spawn { .. })),
            ..
        }) => Err(MigrationError::Job(e)),
        _ => Ok(()),
    }
}

/// An event no phase expects at this point.
pub(super) fn unexpected(ev: Event) -> MigrationError {
    let what = event_name(&ev);
    MigrationError::Channel(ChannelError::Protocol {
        channel: ChannelName::Main,
        detail: format!("unexpected {what} at this point of the migration"),
    })
}

/// A control message that came while another was awaited (e.g. a `Resumed` before
/// `Loaded`).
pub(super) fn out_of_order(ev: Event, awaited: &str) -> MigrationError {
    MigrationError::Channel(ChannelError::Protocol {
        channel: ChannelName::Main,
        detail: format!(
            "{} while waiting for {awaited}: out of order",
            event_name(&ev)
        ),
    })
}

/// What an event is, for errors.
fn event_name(ev: &Event) -> &'static str {
    match ev {
        Event::Loaded(_) => "Loaded",
        Event::Resumed => "Resumed",
        Event::RoundSent(..) => "RoundSent",
        Event::RoundAck(_) => "RoundAck",
        Event::DeviceDone(..) => "a device save ending",
        Event::StateSaved(_) => "the state saved",
        Event::Failed(_) | Event::PeerFailed(_) => "a failure",
        Event::PostcopyComplete(_) => "PostcopyComplete",
    }
}
