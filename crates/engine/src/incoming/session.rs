//! One accepted session on the migration runtime: its threads started (the main channel's
//! reader, a loader per device, a receiver per data channel), the coordinator run, and the
//! teardown that follows whatever happened.

use super::barrier::RoundBarrier;
use super::coordinator::{self, Ended, Inbox};
use super::main_reader::read_main;
use super::postcopy::{self, PostcopyDest, Running};
use super::receiver::{ChannelReceiver, Counters};
use super::streams::{LoadError, Streams};
use super::{Event, Failure, Heard};
use crate::cancel::CancelToken;
use crate::config::IncomingConfig;
use crate::device::{Device, VmState};
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::guest::Guest;
use crate::hostmem::{PageClaims, Populated, TornPages};
use crate::report::IncomingEvent;
use crate::runtime::{JobCancelled, Runtime};
use crate::transport::Stream;
use crossbeam_channel::{Receiver, Sender};
use livemig_wire::{DeviceTransfer, RamTransfer, Reject, RejectCode, SessionAccept, SessionHello};
use std::time::{Duration, Instant};

/// One accepted session, with everything built for it.
pub(super) struct Session<'a> {
    pub guest: &'a dyn Guest,
    pub devices: &'a [Box<dyn Device>],
    pub vmstates: &'a [Box<dyn VmState>],
    pub hello: &'a SessionHello,
    /// Pages written here, over every session of the migration (a session that goes on
    /// after an abandoned switchover sends only what changed).
    pub populated: &'a Populated,
    pub accept: SessionAccept,
    /// The session agreed on `switchover ack`: tell the source once every twin is ready.
    pub switchover_ack: bool,
    pub config: &'a IncomingConfig,
    pub start: Instant,
    pub log: &'a (dyn Fn(&IncomingEvent) + Sync),
}

/// What the session's threads share: the round barrier, page bookkeeping, device streams
/// and counters.
pub(super) struct Shared<'p, 'm> {
    pub barrier: RoundBarrier,
    pub claims: PageClaims,
    pub populated: &'p Populated,
    pub torn: TornPages,
    pub streams: Streams,
    pub counters: Counters,
    /// A session that may switch to postcopy: the userfaultfd side of guest memory (which
    /// outlives a session: a broken postcopy resumes in another).
    pub postcopy: Option<&'p PostcopyDest<'m>>,
}

/// Dead-peer detection: every write is bounded, and a data channel hears from the source
/// (pages, chunks or a ping) at least every ping interval.
pub(super) fn arm_peer_timeouts(
    main: &Stream,
    data: &[Stream],
    accept: &SessionAccept,
) -> Result<(), ChannelError> {
    for (i, s) in data.iter().enumerate() {
        s.arm_peer_timeout(accept.peer_timeout())
            .and_then(|()| s.set_read_timeout(Some(accept.peer_timeout())))
            .map_err(|source| ChannelError::Io {
                channel: ChannelName::Data(i as u16),
                op: "arm the peer timeout",
                source,
            })?;
    }
    main.arm_peer_timeout(accept.peer_timeout())
        .map_err(|source| ChannelError::Io {
            channel: ChannelName::Main,
            op: "arm the peer timeout",
            source,
        })
}

fn clone_socket(s: &Stream, channel: ChannelName) -> Result<Stream, IncomingError> {
    s.try_clone().map_err(|source| {
        IncomingError::Channel(ChannelError::Io {
            channel,
            op: "clone socket",
            source,
        })
    })
}

fn add_socket(rt: &Runtime<'_, '_>, s: &Stream, channel: ChannelName) -> Result<(), IncomingError> {
    rt.add_socket(s).map_err(|source| {
        IncomingError::Channel(ChannelError::Io {
            channel,
            op: "clone socket",
            source,
        })
    })
}

impl Session<'_> {
    /// Runs the session on a runtime of its own and tears it down: on failure the barrier
    /// and the device streams are aborted and the source told why (a Reject on main, within
    /// a second), then every socket is shut and every thread joined, whatever happened.
    /// `postcopy` is guest memory's userfaultfd side in a session that may switch to
    /// postcopy; `resume`, where a broken postcopy stood when this session resumes it (then
    /// every channel carries postcopy pages only, and no device loads).
    pub fn run(
        &self,
        main: Stream,
        data: Vec<Stream>,
        postcopy: Option<&PostcopyDest<'_>>,
        resume: Option<Box<Running>>,
    ) -> Result<Ended, IncomingError> {
        let main_reader = clone_socket(&main, ChannelName::Main)?;
        let memory = self.guest.memory();
        let shared = Shared {
            barrier: RoundBarrier::new(self.hello.channels as usize),
            claims: PageClaims::new(memory),
            populated: self.populated,
            torn: TornPages::new(memory),
            streams: Streams::new(
                self.devices.len(),
                self.hello.devices.chunk_size as usize,
                self.accept.window,
            ),
            counters: Counters::default(),
            postcopy,
        };
        let resuming = resume.is_some();
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::scope(|scope| {
            // A session under way is not cancelled from outside (see IncomingConfig::cancel).
            let rt = Runtime::new(scope, "lm-dst", CancelToken::new());
            let mut main = main;
            let outcome = self
                .start_threads(&rt, &main, main_reader, data, &shared, tx, resuming)
                .and_then(|()| {
                    let inbox = Inbox::new(&rx, rt.completions(), &self.accept);
                    // A thread that could not be started fails the migration, but never
                    // skips the teardown: every thread already started is woken and joined.
                    match rt.failure().and_then(|e| inbox.thread_failed(e)) {
                        Some(e) => Err(e),
                        None => match resume {
                            None => coordinator::coordinate(self, &shared, &mut main, &inbox),
                            Some(mut run) => {
                                run.resuming();
                                coordinator::postcopy(self, &shared, &mut main, &inbox, *run)
                            }
                        }
                        .map_err(|e| prefer_peer_reason(e, &rx)),
                    }
                });
            // Threads waiting for a switch to postcopy that did not come (or failed) go.
            if let Some(p) = &shared.postcopy {
                p.abort();
            }
            if let Err(e) = &outcome {
                shared.barrier.abort();
                shared.streams.abort();
                let _ = main.set_write_timeout(Some(Duration::from_secs(1)));
                framed::send_reject(
                    &mut main,
                    ChannelName::Main,
                    &Reject::new(RejectCode::LoadFailed, e.to_string()),
                );
            }
            // A paused postcopy stops its threads (the fault thread among them) too.
            let failed = !matches!(outcome, Ok(Ended::Done(_)));
            // Once the guest runs here (and the source was told), a thread found failed at
            // the join cannot undo the migration: dropping the guest now would lose it.
            let _ = rt.teardown(failed);
            outcome
        })
    }

    /// Starts the main channel's reader, every device's loader (now, so precopy device data
    /// loads while the guest still runs on the source) and a receiver per data channel, each
    /// socket registered with the runtime to be shut at teardown. A session resuming a
    /// broken postcopy has no reader on main (the source sends nothing more there) and no
    /// loader (every device loaded before the guest ran here).
    #[allow(clippy::too_many_arguments)]
    fn start_threads<'scope>(
        &'scope self,
        rt: &Runtime<'scope, '_>,
        main: &Stream,
        main_reader: Stream,
        data: Vec<Stream>,
        shared: &'scope Shared,
        tx: Sender<Heard>,
        resuming: bool,
    ) -> Result<(), IncomingError> {
        add_socket(rt, main, ChannelName::Main)?;
        for (i, s) in data.iter().enumerate() {
            add_socket(rt, s, ChannelName::Data(i as u16))?;
        }
        let (limits, streams) = (self.config.limits, &shared.streams);
        let serial = self.hello.devices.transfer == DeviceTransfer::Main;
        let main_tx = tx.clone();
        let ranges = self.hello.postcopy.then_some(&self.hello.guest.ranges[..]);
        if !resuming {
            rt.spawn("main", move || {
                read_main(main_reader, limits, main_tx, streams, serial, ranges)
            });
        }
        if let Some(dest) = shared.postcopy {
            let (tx, cancel) = (tx.clone(), rt.cancel_token().clone());
            rt.spawn_favoured("fault", move || postcopy::serve_faults(dest, tx, &cancel));
        }
        let loaders = if resuming { 0 } else { self.devices.len() };
        for i in 0..loaders {
            let tx = tx.clone();
            rt.submit(&format!("load{i}"), move || {
                self.load_device(i, shared, &tx)
            });
        }
        for (i, stream) in data.into_iter().enumerate() {
            let mut r = self.receiver(i as u16, stream, shared, tx.clone());
            r.resumed = resuming;
            // The urgent channel (postcopy's requested pages) is the last.
            if i == self.hello.channels as usize {
                rt.spawn_favoured("urgent", move || r.run());
            } else {
                rt.spawn(&format!("ch{i}"), move || r.run());
            }
        }
        Ok(())
    }

    /// Device `i`'s loader job: its chunks in order, credit after each, its end reported.
    fn load_device(
        &self,
        i: usize,
        shared: &Shared,
        tx: &Sender<Heard>,
    ) -> Result<(), crate::runtime::JobError> {
        let credit = |up_to| {
            let _ = tx.send(Ok(Event::Credit(i as u16, up_to)));
        };
        match shared
            .streams
            .run_loader(i, &*self.devices[i], self.start, credit)
        {
            Ok(stats) => {
                let _ = tx.send(Ok(Event::LoaderDone(i as u16, stats)));
                Ok(())
            }
            Err(LoadError::Device(e)) => {
                // Heard by the coordinator before the job's own ending.
                let _ = tx.send(Err(Failure::Loader(e.clone())));
                Err(Box::new(e))
            }
            Err(LoadError::Aborted) => Err(Box::new(JobCancelled)),
        }
    }

    fn receiver<'s>(
        &'s self,
        index: u16,
        stream: Stream,
        shared: &'s Shared,
        events: Sender<Heard>,
    ) -> ChannelReceiver<'s> {
        ChannelReceiver {
            index,
            stream,
            memory: self.guest.memory(),
            barrier: &shared.barrier,
            limits: self.config.limits,
            events,
            counters: &shared.counters,
            claims: &shared.claims,
            populated: shared.populated,
            torn: &shared.torn,
            streams: &shared.streams,
            hooks: self.config.test_hooks.clone(),
            local: self.hello.ram == RamTransfer::Local,
            postcopy: shared.postcopy.map(|p| p as &dyn postcopy::PostcopyPages),
            urgent: index == self.hello.channels,
            resumed: false,
        }
    }
}

/// A broken connection is often the echo of the source's refusal, which the main reader
/// may deliver a moment later: report the source's reason when it comes soon enough.
fn prefer_peer_reason(e: IncomingError, events: &Receiver<Heard>) -> IncomingError {
    if !matches!(
        e,
        IncomingError::Channel(ChannelError::Io { .. } | ChannelError::Closed { .. })
    ) {
        return e;
    }
    let from_data = matches!(
        e,
        IncomingError::Channel(
            ChannelError::Io {
                channel: ChannelName::Data(_),
                ..
            } | ChannelError::Closed {
                channel: ChannelName::Data(_)
            }
        )
    );
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok(heard) = events.recv_deadline(deadline) {
        match heard {
            Err(Failure::Main(r @ ChannelError::Rejected { .. })) => return r.into(),
            // A data channel that ended is often the echo of what happened to the main
            // channel (the source tears down every channel when it loses the main one):
            // the main channel's fate is the cause to report.
            Err(Failure::Main(m)) if from_data => return m.into(),
            _ => {}
        }
    }
    e
}
