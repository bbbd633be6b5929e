//! The destination side of a migration.
//!
//! [`receive`] accepts one session on a listener, builds the guest the source describes,
//! receives its memory on one thread per data channel, then loads its state and resumes it
//! only once the source has handed it over. All threads are scoped and joined before
//! `receive` returns; after any failure the guest is dropped, never resumed.
//!
//! ```text
//!  AwaitSession --> Setup (guest built, channels join) --> Receiving (rounds, synced at
//!       |                                                  every RoundEnd)
//!       |                                                       |
//!       |                                   Complete + every channel's last round
//!       |                                                       v
//!       |                            Loading (restore state, verify) --> Loaded sent
//!       |                                                       |
//!       |                                           Handover --> Resumed (guest runs here)
//!       +--> any error: Reject sent to the source, guest dropped, error returned
//! ```

mod barrier;
mod receiver;
mod setup;

use crate::config::IncomingConfig;
use crate::error::{panic_message, ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::guest::{Guest, GuestFactory};
use crate::hostmem::PageClaims;
use crate::prefault;
use crate::report::{ms, IncomingReport};
use crate::transport::{Listener, Stream};
use barrier::RoundBarrier;
use crossbeam_channel::{Receiver, Sender};
use livemig_wire::{
    Complete, FrameKind, Limits, Loaded, Reject, RejectCode, Resumed, RoundAck, RoundStart,
    SessionHello,
};
use receiver::{ChannelReceiver, Counters};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// What the coordinator hears from its threads.
pub(crate) enum Event {
    /// A data channel received its last round; the count of rounds it saw.
    ChannelDone(u32),
    ChannelFailed(ChannelError),
    /// Every data channel has applied every page of a round.
    RoundApplied(u32),
    State(Vec<u8>),
    RoundStart(RoundStart),
    Complete(Complete),
    Handover,
    MainFailed(ChannelError),
}

/// A guest received, loaded and running on this side.
pub struct Incoming {
    pub guest: Box<dyn Guest>,
    pub report: IncomingReport,
}

/// Waits for one incoming migration on `listener` and runs it to the end.
pub fn receive(
    listener: &Listener,
    factory: &dyn GuestFactory,
    config: &IncomingConfig,
    log: &(dyn Fn(String) + Sync),
) -> Result<Incoming, IncomingError> {
    let (hello, mut main) = setup::accept_session(listener, config, log)?;
    let start = Instant::now();
    log(format!(
        "session {}: {} guest, {} MiB, {} data channels",
        hello.session,
        hello.guest.kind,
        hello.guest.memory_bytes() >> 20,
        hello.channels
    ));
    let guest = match factory.create(&hello.guest) {
        Ok(g) => g,
        Err(e) => {
            framed::send_reject(
                &mut main,
                ChannelName::Main,
                &Reject::new(RejectCode::Unsupported, e.to_string()),
            );
            return Err(e.into());
        }
    };
    framed::send(&mut main, ChannelName::Main, FrameKind::SessionAccept, &[])?;
    let data = match setup::accept_channels(listener, &hello, config, log) {
        Ok(d) => d,
        Err(e) => {
            framed::send_reject(
                &mut main,
                ChannelName::Main,
                &Reject::new(RejectCode::Other, e.to_string()),
            );
            return Err(e);
        }
    };
    let report = run_session(&*guest, &hello, main, data, config, start, log)?;
    Ok(Incoming { guest, report })
}

fn run_session(
    guest: &dyn Guest,
    hello: &SessionHello,
    main: Stream,
    data: Vec<Stream>,
    config: &IncomingConfig,
    start: Instant,
    log: &(dyn Fn(String) + Sync),
) -> Result<IncomingReport, IncomingError> {
    let clone = |s: &Stream, ch| {
        s.try_clone().map_err(|source| {
            IncomingError::Channel(ChannelError::Io {
                channel: ch,
                op: "clone socket",
                source,
            })
        })
    };
    let mut shutters = vec![clone(&main, ChannelName::Main)?];
    for (i, s) in data.iter().enumerate() {
        shutters.push(clone(s, ChannelName::Data(i as u16))?);
    }
    let main_reader = clone(&main, ChannelName::Main)?;
    let barrier = RoundBarrier::new(data.len());
    let claims = PageClaims::new(guest.memory());
    let counters = Counters::default();
    let (tx, rx) = crossbeam_channel::unbounded();
    let stop_prefault = AtomicBool::new(false);

    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let spawn_err = |e: std::io::Error| IncomingError::ThreadPanicked(format!("spawn: {e}"));
        let stop = &stop_prefault;
        handles.push(
            std::thread::Builder::new()
                .name("lm-dst-prefault".into())
                .spawn_scoped(scope, move || {
                    prefault::populate(guest.memory(), stop);
                })
                .map_err(spawn_err)?,
        );
        let main_tx = tx.clone();
        let limits = config.limits;
        handles.push(
            std::thread::Builder::new()
                .name("lm-dst-main".into())
                .spawn_scoped(scope, move || read_main(main_reader, limits, main_tx))
                .map_err(spawn_err)?,
        );
        for (i, stream) in data.into_iter().enumerate() {
            let r = ChannelReceiver {
                index: i as u16,
                stream,
                memory: guest.memory(),
                barrier: &barrier,
                limits: config.limits,
                events: tx.clone(),
                counters: &counters,
                claims: &claims,
                hooks: config.test_hooks.clone(),
                pages: Vec::new(),
                iov: Vec::new(),
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("lm-dst-ch{i}"))
                    .spawn_scoped(scope, move || r.run())
                    .map_err(spawn_err)?,
            );
        }
        drop(tx);

        let mut main = main;
        let outcome = coordinate(guest, hello, &mut main, &rx, config, start, &counters, log);
        stop_prefault.store(true, Relaxed);
        if let Err(e) = &outcome {
            barrier.abort();
            framed::send_reject(
                &mut main,
                ChannelName::Main,
                &Reject::new(RejectCode::LoadFailed, e.to_string()),
            );
        }
        for s in &shutters {
            s.shutdown();
        }
        let mut panicked = None;
        for h in handles {
            if let Err(p) = h.join() {
                panicked = Some(panic_message(p));
            }
        }
        match (outcome, panicked) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(p)) => Err(IncomingError::ThreadPanicked(p)),
            (Ok(r), None) => Ok(r),
        }
    })
}

/// Receiving, loading and handover, on the caller's thread.
#[allow(clippy::too_many_arguments)]
fn coordinate(
    guest: &dyn Guest,
    hello: &SessionHello,
    main: &mut Stream,
    events: &Receiver<Event>,
    config: &IncomingConfig,
    start: Instant,
    counters: &Counters,
    log: &(dyn Fn(String) + Sync),
) -> Result<IncomingReport, IncomingError> {
    let next = || -> Result<Event, IncomingError> {
        match events.recv() {
            Ok(Event::ChannelFailed(e)) | Ok(Event::MainFailed(e)) => Err(e.into()),
            Ok(ev) => Ok(ev),
            Err(_) => Err(IncomingError::ThreadPanicked(
                "every migration thread exited".into(),
            )),
        }
    };
    let mut state = None;
    let mut complete = None;
    let mut done = 0usize;
    let mut rounds = 0;
    let mut t_complete = Instant::now();
    while complete.is_none() || done < hello.channels as usize {
        match next()? {
            Event::ChannelDone(r) => {
                done += 1;
                rounds = r;
            }
            Event::State(s) => state = Some(s),
            Event::RoundApplied(round) => framed::send(
                main,
                ChannelName::Main,
                FrameKind::RoundAck,
                &RoundAck { round }.encode(),
            )?,
            Event::RoundStart(r) => log(format!("round {}: {} pages", r.round, r.pages)),
            Event::Complete(c) => {
                complete = Some(c);
                t_complete = Instant::now();
            }
            Event::Handover => return Err(protocol("Handover before Loaded")),
            Event::ChannelFailed(_) | Event::MainFailed(_) => unreachable!("mapped by next()"),
        }
    }
    let drain = t_complete.elapsed();
    let complete = complete.expect("loop ends only with Complete");
    if complete.rounds != rounds {
        return Err(protocol(&format!(
            "source sent {} rounds, data channels carried {rounds}",
            complete.rounds
        )));
    }
    let state = state.ok_or_else(|| protocol("Complete without GuestState"))?;

    let t = Instant::now();
    guest.restore_state(&state)?;
    let restore = t.elapsed();
    let t = Instant::now();
    let verify = if config.verify {
        let v = guest.verify()?;
        if v.pages_mismatched > 0 {
            return Err(IncomingError::Verify {
                checked: v.pages_checked,
                mismatched: v.pages_mismatched,
                example: v.examples.first().cloned().unwrap_or_default(),
            });
        }
        Some(v)
    } else {
        None
    };
    let verify_time = t.elapsed();
    let loaded = Loaded {
        drain_us: drain.as_micros() as u64,
        restore_us: restore.as_micros() as u64,
        verify_us: verify_time.as_micros() as u64,
        pages_checked: verify.as_ref().map_or(0, |v| v.pages_checked),
        pages_mismatched: verify.as_ref().map_or(0, |v| v.pages_mismatched),
    };
    framed::send(main, ChannelName::Main, FrameKind::Loaded, &loaded.encode())?;
    match next() {
        Ok(Event::Handover) => {}
        Ok(_) => return Err(protocol("expected Handover")),
        Err(e) => return Err(IncomingError::NoHandover(e.to_string())),
    }
    let t = Instant::now();
    guest.resume()?;
    let resume = t.elapsed();
    framed::send(
        main,
        ChannelName::Main,
        FrameKind::Resumed,
        &Resumed {
            resume_us: resume.as_micros() as u64,
        }
        .encode(),
    )?;
    Ok(IncomingReport {
        session: hello.session.to_string(),
        channels: hello.channels,
        guest_kind: hello.guest.kind.clone(),
        memory_bytes: hello.guest.memory_bytes(),
        total_ms: ms(start.elapsed()),
        received_bytes: counters.bytes.load(Relaxed),
        normal_pages: counters.normal_pages.load(Relaxed),
        zero_pages: counters.zero_pages.load(Relaxed),
        rounds,
        drain_ms: ms(drain),
        restore_ms: ms(restore),
        verify_ms: ms(verify_time),
        resume_ms: ms(resume),
        verify,
    })
}

fn protocol(detail: &str) -> IncomingError {
    IncomingError::Channel(ChannelError::Protocol {
        channel: ChannelName::Main,
        detail: detail.to_string(),
    })
}

/// The destination's main-channel reader thread.
fn read_main(mut stream: Stream, limits: Limits, events: Sender<Event>) {
    let ch = ChannelName::Main;
    let mut buf = Vec::new();
    loop {
        let ev = match framed::recv(&mut stream, ch, &limits, &mut buf) {
            Ok(h) => {
                let wire = |source| {
                    Event::MainFailed(ChannelError::Wire {
                        channel: ch,
                        source,
                    })
                };
                match h.kind {
                    FrameKind::GuestState => Event::State(std::mem::take(&mut buf)),
                    FrameKind::RoundStart => {
                        RoundStart::decode(&buf).map_or_else(wire, Event::RoundStart)
                    }
                    FrameKind::Complete => {
                        Complete::decode(&buf).map_or_else(wire, Event::Complete)
                    }
                    FrameKind::Handover => Event::Handover,
                    other => Event::MainFailed(ChannelError::Protocol {
                        channel: ch,
                        detail: format!("unexpected {} frame on the main channel", other.name()),
                    }),
                }
            }
            Err(e) => Event::MainFailed(e),
        };
        let stop = matches!(ev, Event::MainFailed(_) | Event::Handover);
        if events.send(ev).is_err() || stop {
            return;
        }
    }
}
