//! The session's coordinator, on the caller's thread: the phases of a received migration as
//! a state machine, each step consuming the phase it leaves (see the module docs' diagram).

use super::handover::{AwaitingHandover, Running};
use super::receiving::{Received, Receiving};
use super::session::{Session, Shared};
use super::{loading, protocol, Event, Heard};
use crate::error::{ChannelName, IncomingError};
use crate::framed;
use crate::report::IncomingReport;
use crate::runtime::{ThreadDone, ThreadError};
use crate::transport::Stream;
use crossbeam_channel::Receiver;
use livemig_wire::SessionAccept;
use std::time::{Duration, Instant};

/// Where the session stands.
pub(super) enum Phase {
    /// Rounds of pages, device chunks, the guest's and small devices' state, Complete.
    Receiving(Receiving),
    /// Everything received and checked: state to restore, in order, then verify.
    Loading(Received),
    /// Loaded told to the source; its Handover is awaited.
    AwaitingHandover(AwaitingHandover),
    /// Handed over: the guest is resumed here.
    Running(Running),
    /// Postcopy: the guest runs here while its last pages come.
    Postcopy(super::postcopy::Running),
}

/// How a session ended, when it did not fail.
pub(super) enum Ended {
    /// The guest runs here with all its memory: the report.
    Done(Box<IncomingReport>),
    /// Postcopy broke (the link): the guest runs here on memory still arriving, and a
    /// session resuming it goes on from where this one stood (`recover.rs`).
    Paused(Box<super::postcopy::Running>, IncomingError),
}

/// Runs the phases from Receiving to the guest running here, and returns the report.
pub(super) fn coordinate(
    s: &Session<'_>,
    shared: &Shared,
    main: &mut Stream,
    inbox: &Inbox<'_>,
) -> Result<Ended, IncomingError> {
    let mut phase = Phase::Receiving(Receiving::new(
        s.hello.channels as usize,
        s.devices.len(),
        s.accept.peer_timeout(),
    ));
    loop {
        phase = match phase {
            Phase::Receiving(r) => {
                let ev = inbox.next(main, r.deadline())?;
                r.step(ev, s, shared, main)?
            }
            Phase::Loading(received) if received.postcopy.is_some() => {
                super::postcopy::start(s, shared, main, received)?
            }
            Phase::Loading(received) => loading::load(s, main, received)?,
            Phase::Postcopy(run) => return postcopy(s, shared, main, inbox, run),
            Phase::AwaitingHandover(a) => {
                let ev = inbox
                    .next(main, Some(a.deadline()))
                    .map_err(|e| IncomingError::NoHandover(Box::new(e)))?;
                a.step(ev)?
            }
            Phase::Running(r) => {
                return r.resume(s, shared, main).map(|r| Ended::Done(Box::new(r)))
            }
        };
    }
}

/// Postcopy, to every page in: the guest runs here on memory still arriving, so a broken
/// link (any channel's error) pauses the session instead of failing it; anything else
/// (this side's userfaultfd failing, the guest's check) fails it.
pub(super) fn postcopy(
    s: &Session<'_>,
    shared: &Shared,
    main: &mut Stream,
    inbox: &Inbox<'_>,
    mut run: super::postcopy::Running,
) -> Result<Ended, IncomingError> {
    let Some(dest) = shared.postcopy else {
        return Err(protocol("postcopy without its state"));
    };
    let outcome = loop {
        match inbox.next(main, None).and_then(|ev| run.step(ev, s, main)) {
            Ok(false) => continue,
            Ok(true) => break run.finish(s, dest, main),
            Err(e) => break Err(e),
        }
    };
    match outcome {
        Ok(()) => Ok(Ended::Done(Box::new(run.report(s, shared, dest)))),
        Err(e @ IncomingError::Channel(_)) => Ok(Ended::Paused(Box::new(run), e)),
        Err(e) => Err(e),
    }
}

/// What the coordinator waits on: its threads' events and endings, and the time to ping.
pub(super) struct Inbox<'a> {
    events: &'a Receiver<Heard>,
    endings: Receiver<ThreadDone>,
    peer_timeout: Duration,
    ping_every: Duration,
}

impl<'a> Inbox<'a> {
    pub fn new(
        events: &'a Receiver<Heard>,
        endings: Receiver<ThreadDone>,
        accept: &SessionAccept,
    ) -> Self {
        let peer_timeout = accept.peer_timeout();
        Inbox {
            events,
            endings,
            peer_timeout,
            ping_every: crate::config::ping_interval(peer_timeout),
        }
    }

    /// The next event; when none comes for a ping interval, pings the source (so its return
    /// path knows this side lives) and gives up once `deadline` has passed. A thread's
    /// failure, or a thread that panicked or could not start, is an error at once.
    pub fn next(
        &self,
        main: &mut Stream,
        deadline: Option<(Instant, &str)>,
    ) -> Result<Event, IncomingError> {
        loop {
            let heard = crossbeam_channel::select! {
                recv(self.events) -> heard => heard,
                recv(self.endings) -> done => match done {
                    Ok(ThreadDone { result: Err(e), .. }) => match self.thread_failed(e) {
                        Some(err) => return Err(err),
                        None => continue,
                    },
                    Ok(ThreadDone { result: Ok(()), .. }) | Err(_) => continue,
                },
                default(self.ping_every) => {
                    if let Some((at, what)) = deadline {
                        if Instant::now() >= at {
                            return Err(protocol(&format!(
                                "no {what} from the source within the peer timeout ({:?}): it is dead, stuck or cut off",
                                self.peer_timeout
                            )));
                        }
                    }
                    framed::send_ping(main, ChannelName::Main)?;
                    continue;
                }
            };
            return match heard {
                Ok(Ok(ev)) => Ok(ev),
                Ok(Err(failure)) => Err(failure.into()),
                Err(_) => Err(IncomingError::ThreadsGone),
            };
        }
    }

    /// The error a thread's failed ending is: a job that failed said why on the events
    /// channel before it ended, and that (typed) reason is preferred.
    pub fn thread_failed(&self, e: ThreadError) -> Option<IncomingError> {
        match e {
            ThreadError::Cancelled => None,
            e @ (ThreadError::Panicked { .. } | ThreadError::Spawn { .. }) => {
                Some(IncomingError::Job(e))
            }
            e @ ThreadError::Failed { .. } => Some(
                self.events
                    .try_iter()
                    .find_map(Result::err)
                    .map_or(IncomingError::Job(e), Into::into),
            ),
        }
    }
}
