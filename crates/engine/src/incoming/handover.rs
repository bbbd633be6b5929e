//! The last phases: AwaitingHandover (the source has been told Loaded and keeps its copy
//! paused until it hands the guest over) and Running (the guest resumed here), which ends
//! with the session's report, assembled from each phase's part.

use super::coordinator::Phase;
use super::loading::LoadTimes;
use super::receiving::Received;
use super::session::{Session, Shared};
use super::{protocol, Event};
use crate::error::{ChannelName, IncomingError};
use crate::framed;
use crate::report::{ms, IncomingEvent, IncomingReport};
use crate::transport::Stream;
use livemig_wire::{FrameKind, Resumed};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Loaded sent; Handover due by `due`.
pub(super) struct AwaitingHandover {
    received: Received,
    loaded: LoadTimes,
    due: Instant,
}

/// Handed over: the guest is to run here (or, stopped by its operator on the source, to
/// stay paused here).
pub(super) struct Running {
    received: Received,
    loaded: LoadTimes,
    keep_paused: bool,
}

impl AwaitingHandover {
    pub fn new(received: Received, loaded: LoadTimes, due: Instant) -> Self {
        AwaitingHandover {
            received,
            loaded,
            due,
        }
    }

    pub fn deadline(&self) -> (Instant, &'static str) {
        (self.due, "Handover")
    }

    /// Handover moves on to Running; late credit and round acks are of no more use;
    /// anything else is a protocol error.
    pub fn step(self, ev: Event) -> Result<Phase, IncomingError> {
        match ev {
            Event::Handover(h) => Ok(Phase::Running(Running {
                received: self.received,
                loaded: self.loaded,
                keep_paused: h.keep_paused,
            })),
            Event::Credit(..) | Event::RoundApplied(_) => Ok(Phase::AwaitingHandover(self)),
            Event::ChannelDone(_)
            | Event::State(_)
            | Event::VmStates(_)
            | Event::RoundStart(_)
            | Event::Complete(_)
            | Event::LoaderDone(..)
            | Event::PostcopyStart(_)
            | Event::PageWanted(_)
            | Event::PostcopyChannelDone => Err(protocol("expected Handover")),
        }
    }
}

impl Running {
    /// Resumes the guest and tells the source; the session's report.
    pub fn resume(
        self,
        s: &Session<'_>,
        shared: &Shared,
        main: &mut Stream,
    ) -> Result<IncomingReport, IncomingError> {
        let t = Instant::now();
        if !self.keep_paused {
            s.guest.resume()?;
        }
        let resume = t.elapsed();
        // The guest runs here now, whatever happens to the connection: it must never be
        // dropped for want of telling the source (which, not told, keeps its copy paused).
        if let Err(e) = framed::send(
            main,
            ChannelName::Main,
            FrameKind::Resumed,
            &Resumed {
                resume_us: resume.as_micros() as u64,
            }
            .encode(),
        ) {
            (s.log)(&IncomingEvent::ResumedUntold {
                error: e.to_string(),
            });
        }
        let mut r = report(s, shared, self.received, self.loaded, resume);
        r.paused = self.keep_paused;
        Ok(r)
    }
}

/// The session's report, from each phase's part.
pub(super) fn report(
    s: &Session<'_>,
    shared: &Shared,
    received: Received,
    loaded: LoadTimes,
    resume: Duration,
) -> IncomingReport {
    let hello = s.hello;
    let counters = &shared.counters;
    IncomingReport {
        session: hello.session.to_string(),
        paused: false,
        channels: hello.channels,
        guest_kind: hello.guest.kind.clone(),
        memory_bytes: hello.guest.memory_bytes(),
        total_ms: ms(s.start.elapsed()),
        received_bytes: counters.bytes.load(Relaxed),
        normal_pages: counters.normal_pages.load(Relaxed),
        zero_pages: counters.zero_pages.load(Relaxed),
        rounds: received.rounds,
        drain_ms: ms(received.drain),
        restore_ms: ms(loaded.restore),
        verify_ms: ms(loaded.verify_time),
        resume_ms: ms(resume),
        verify: loaded.verify,
        credit_window: s.accept.window,
        buffer_cap_bytes: s.accept.buffer_cap,
        device_peak_buffered_bytes: received
            .device_stats
            .iter()
            .map(|d| d.peak_buffered)
            .collect(),
        torn_pages: shared.torn.total(),
        postcopy_ms: 0.0,
        postcopy_faults: None,
    }
}
