//! Postcopy recovery on the destination ([`crate::recovery`]): after a break the session's
//! threads are gone, but guest memory stays under userfaultfd and the guest runs on, its
//! vCPUs waiting on any page not yet here. This loop waits for the source's resuming
//! session (on the same listener, or on one the embedder hands over), answers it with the
//! pages still missing (`PostcopyResume`), asks again for the pages vCPUs wait on, and runs
//! it as the postcopy phase went. A resume that fails in set-up is refused and the wait goes
//! on; one that breaks again pauses again.
//!
//! ```text
//!  Postcopy --link lost--> Paused --resume hello--> channels --PostcopyResume--> Postcopy
//!                            ^  |                                                 |
//!                            |  +--window over or cancelled: Err (guest dropped)   |
//!                            +----------------------link lost---------------------+
//! ```

use super::coordinator::Ended;
use super::postcopy::{self, PostcopyDest, Running};
use super::session::{self, Session};
use super::setup;
use crate::error::{ChannelName, IncomingError};
use crate::framed;
use crate::recovery::IncomingRecovery;
use crate::report::{IncomingEvent, IncomingReport};
use crate::transport::{Listener, Stream};
use livemig_wire::{FrameKind, Reject, RejectCode, SessionAccept, SessionHello};
use std::time::Instant;

/// Waits in postcopy-paused and resumes, until every page is here, the recovery window
/// passes or the wait is cancelled. `error` is what broke the postcopy.
pub(super) fn run(
    listener: &Listener,
    s: &Session<'_>,
    dest: &PostcopyDest<'_>,
    mut run: Box<Running>,
    mut error: IncomingError,
) -> Result<IncomingReport, IncomingError> {
    let config = s.config;
    let (window, mailbox) = match &config.postcopy_recovery {
        IncomingRecovery::Off => return Err(lost(error)),
        IncomingRecovery::SameListener { within } => (Some(*within), None),
        IncomingRecovery::OnRequest { listeners, within } => (*within, Some(listeners)),
    };
    let deadline = window.map(|w| Instant::now() + w);
    let mut given: Option<Listener> = None;
    (s.log)(&IncomingEvent::PostcopyPaused {
        error: error.to_string(),
    });
    loop {
        if let Some(m) = mailbox {
            // The newest listener handed over; the first one is waited for.
            if let Some(newest) = m.receiver().try_iter().last() {
                given = Some(newest);
            } else if given.is_none() {
                match next_listener(m.receiver(), deadline, &config.cancel) {
                    Some(l) => given = Some(l),
                    None => return Err(lost(error)),
                }
            }
        }
        let on = given.as_ref().unwrap_or(listener);
        let (hello, accept, main, data) = match resume_setup(on, s, dest, deadline) {
            Ok(r) => r,
            // The window passed, or the wait was cancelled.
            Err(e @ (IncomingError::Accept(_) | IncomingError::Cancelled)) => {
                return Err(lost(if given.is_some() { e } else { error }))
            }
            Err(e) => {
                error = e;
                continue;
            }
        };
        let resumed = Session {
            hello: &hello,
            accept,
            ..*s
        };
        match resumed.run(main, data, Some(dest), Some(run))? {
            Ended::Done(report) => return Ok(*report),
            Ended::Paused(r, e) => {
                run = r;
                error = e;
                (s.log)(&IncomingEvent::PostcopyPaused {
                    error: error.to_string(),
                });
            }
        }
    }
}

/// The first listener the embedder hands over, until `deadline` or a cancel.
fn next_listener(
    listeners: &crossbeam_channel::Receiver<Listener>,
    deadline: Option<Instant>,
    cancel: &crate::cancel::CancelToken,
) -> Option<Listener> {
    let timeout = match deadline {
        Some(d) => crossbeam_channel::at(d),
        None => crossbeam_channel::never(),
    };
    crossbeam_channel::select! {
        recv(listeners) -> l => l.ok(),
        recv(cancel.waiter()) -> _ => None,
        recv(timeout) -> _ => None,
    }
}

/// The resuming session's set-up: its hello (only the broken session's resume is taken),
/// the accept, every channel, then the pages still missing (`PostcopyResume`) and the pages
/// vCPUs wait on asked for again (their faults were read before the break and will not
/// come again).
fn resume_setup(
    on: &Listener,
    s: &Session<'_>,
    dest: &PostcopyDest<'_>,
    deadline: Option<Instant>,
) -> Result<(SessionHello, SessionAccept, Stream, Vec<Stream>), IncomingError> {
    let (config, ch) = (s.config, ChannelName::Main);
    let (hello, negotiated, mut main) = setup::accept_resume(on, config, s.log, s.hello, deadline)?;
    let accept = match setup::flow_bounds(&hello, config) {
        Ok(a) => a,
        Err(reject) => {
            negotiated.refuse(&mut main, &reject);
            return Err(IncomingError::Setup(reject.reason));
        }
    };
    negotiated.accept(&mut main, &accept)?;
    let data = setup::accept_channels(on, &main, &hello, config, s.log).inspect_err(|e| {
        let why = Reject::new(RejectCode::Other, e.to_string());
        framed::send_reject(&mut main, ch, &why)
    })?;
    session::arm_peer_timeouts(&main, &data, &accept)?;
    let missing = dest.missing(&hello.guest.ranges);
    framed::send(&mut main, ch, FrameKind::PostcopyResume, &missing.encode())?;
    postcopy::request(&mut main, &dest.awaited())?;
    (s.log)(&IncomingEvent::PostcopyResumed {
        session: hello.session.to_string(),
        missing_pages: missing.count(),
    });
    Ok((hello, accept, main, data))
}

/// The error a postcopy that was never resumed ends with: the guest, half arrived, is lost.
fn lost(e: IncomingError) -> IncomingError {
    IncomingError::PostcopyLost(Box::new(e))
}
