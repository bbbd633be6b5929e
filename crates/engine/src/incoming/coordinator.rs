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

/// Runs the phases from Receiving to the guest running here, and returns the report.
pub(super) fn coordinate(
    s: &Session<'_>,
    shared: &Shared,
    main: &mut Stream,
    inbox: &Inbox<'_>,
) -> Result<IncomingReport, IncomingError> {
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
            // The guest runs here on memory still arriving: a failure loses it.
            Phase::Postcopy(run) => {
                let ev = inbox.next(main, None)?;
                match run.step(ev, s, shared, main)? {
                    Ok(run) => Phase::Postcopy(run),
                    Err(report) => return Ok(report),
                }
            }
            Phase::AwaitingHandover(a) => {
                let ev = inbox
                    .next(main, Some(a.deadline()))
                    .map_err(|e| IncomingError::NoHandover(Box::new(e)))?;
                a.step(ev)?
            }
            Phase::Running(r) => return r.resume(s, shared, main),
        };
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
