//! The destination side of a migration.
//!
//! [`receive_vm`] accepts one session on a listener, builds the guest and the devices the
//! source describes, receives memory and device chunks on one thread per data channel, loads
//! each device's stream in order on a loader thread of its own (started at setup, so precopy
//! device data loads while the guest still runs on the source), then applies the small
//! devices' blobs in list order, the guest's state last, and resumes the guest only once the
//! source has handed it over. All threads are scoped and joined before
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
mod streams;

use crate::config::IncomingConfig;
use crate::device::{Device, DeviceError, DeviceFactory, VmState};
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::guest::{Guest, GuestFactory};
use crate::hostmem::{PageClaims, Populated, TornPages};
use crate::pool::{join_everything, JobCancelled, JobDone, PoolError, WorkerPool};
use crate::report::{ms, IncomingEvent, IncomingReport};
use crate::transport::{Listener, Stream};
use barrier::RoundBarrier;
use crossbeam_channel::{Receiver, Sender};
use livemig_wire::{
    Complete, Credit, DeviceTransfer, FrameKind, Limits, Loaded, RamTransfer, Reject, RejectCode,
    Resumed, RoundAck, RoundStart, SessionAccept, SessionHello, VmStates,
};
use receiver::{ChannelReceiver, Counters};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use streams::{LoadError, Streams};

/// What the coordinator hears from its threads.
pub(crate) enum Event {
    /// A data channel received its last round; the count of rounds it saw.
    ChannelDone(u32),
    ChannelFailed(ChannelError),
    /// Every data channel has applied every page of a round.
    RoundApplied(u32),
    State(Vec<u8>),
    VmStates(Vec<u8>),
    RoundStart(RoundStart),
    Complete(Complete),
    Handover,
    MainFailed(ChannelError),
    /// A device's loader consumed a chunk: the source may send up to `up_to`.
    Credit(u16, u32),
    LoaderDone(u16, livemig_wire::DeviceLoadStats),
    LoaderFailed(DeviceError),
}

/// Builds what a source describes.
#[derive(Clone, Copy)]
pub struct Factories<'a> {
    pub guest: &'a dyn GuestFactory,
    pub devices: &'a dyn DeviceFactory,
}

/// A VM received, loaded and running on this side.
pub struct Incoming {
    pub guest: Box<dyn Guest>,
    pub devices: Vec<Box<dyn Device>>,
    pub vmstates: Vec<Box<dyn VmState>>,
    pub report: IncomingReport,
}

/// Refuses every device: for destinations that receive bare guests.
struct NoDevices;

impl DeviceFactory for NoDevices {
    fn create_device(
        &self,
        d: &crate::device::DeviceDescriptor,
    ) -> Result<Box<dyn Device>, DeviceError> {
        Err(DeviceError::new(
            &d.name,
            "create",
            "this destination takes no devices",
        ))
    }
    fn create_vmstate(
        &self,
        d: &crate::device::DeviceDescriptor,
    ) -> Result<Box<dyn VmState>, DeviceError> {
        Err(DeviceError::new(
            &d.name,
            "create",
            "this destination takes no devices",
        ))
    }
}

/// Waits for one incoming migration of a guest without devices and runs it to the end.
pub fn receive(
    listener: &Listener,
    factory: &dyn GuestFactory,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<Incoming, IncomingError> {
    let f = Factories {
        guest: factory,
        devices: &NoDevices,
    };
    receive_vm(listener, f, config, log)
}

/// What a session needs built before it is accepted: its flow bounds, guest and devices.
type Built = (
    SessionAccept,
    Box<dyn Guest>,
    Vec<Box<dyn Device>>,
    Vec<Box<dyn VmState>>,
);

/// Builds what `hello` describes, or the Reject that says why this side cannot.
fn build_session(
    hello: &SessionHello,
    main: &mut Stream,
    factories: Factories<'_>,
    config: &IncomingConfig,
) -> Result<Built, Reject> {
    let accept = setup::flow_bounds(hello, config)?;
    let unsupported =
        |e: &dyn std::fmt::Display| Reject::new(RejectCode::Unsupported, e.to_string());
    let guest = match hello.ram {
        RamTransfer::Copy => factories.guest.create(&hello.guest),
        RamTransfer::Local => {
            let memory = setup::receive_memory_files(main, hello, config)?;
            factories.guest.create_on(&hello.guest, memory)
        }
    }
    .map_err(|e| unsupported(&e))?;
    let descriptor = |w: &livemig_wire::WireDevice| crate::device::DeviceDescriptor {
        kind: w.kind.clone(),
        name: w.name.clone(),
        config: w.config.clone(),
    };
    let devices = hello
        .devices
        .devices
        .iter()
        .map(|w| factories.devices.create_device(&descriptor(w)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unsupported(&e))?;
    let vmstates = hello
        .devices
        .vmstates
        .iter()
        .map(|w| factories.devices.create_vmstate(&descriptor(w)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unsupported(&e))?;
    Ok((accept, guest, devices, vmstates))
}

/// Waits for one incoming migration on `listener` and runs it to the end.
pub fn receive_vm(
    listener: &Listener,
    factories: Factories<'_>,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<Incoming, IncomingError> {
    // A session this side cannot build (too much buffering asked, an unknown guest or device
    // kind) is refused with the reason, and the wait goes on for one it can.
    let (hello, mut main, accept, guest, devices, vmstates) = loop {
        let (hello, mut main) = setup::accept_session(listener, config, log)?;
        match build_session(&hello, &mut main, factories, config) {
            Ok((accept, guest, devices, vmstates)) => {
                break (hello, main, accept, guest, devices, vmstates)
            }
            Err(reject) => {
                log(&IncomingEvent::SessionRefused {
                    session: hello.session.to_string(),
                    reason: reject.reason.clone(),
                });
                framed::send_reject(&mut main, ChannelName::Main, &reject);
            }
        }
    };
    let start = Instant::now();
    log(&IncomingEvent::SessionAccepted {
        session: hello.session.to_string(),
        guest_kind: hello.guest.kind.clone(),
        memory_bytes: hello.guest.memory_bytes(),
        channels: hello.channels,
        devices: hello.devices.devices.len() + hello.devices.vmstates.len(),
    });
    let refuse = |main: &mut Stream, code, e: &dyn std::fmt::Display| {
        framed::send_reject(main, ChannelName::Main, &Reject::new(code, e.to_string()));
    };
    framed::send(
        &mut main,
        ChannelName::Main,
        FrameKind::SessionAccept,
        &accept.encode(),
    )?;
    let data = setup::accept_channels(listener, &main, &hello, config, log)
        .inspect_err(|e| refuse(&mut main, RejectCode::Other, e))?;
    // Dead-peer detection: every write is bounded, and a data channel hears from the source
    // (pages, chunks or a ping) at least every ping interval.
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
        })?;
    let session = Session {
        guest: &*guest,
        devices: &devices,
        vmstates: &vmstates,
        hello: &hello,
        accept,
        config,
        start,
        log,
    };
    let report = session.run(main, data)?;
    Ok(Incoming {
        guest,
        devices,
        vmstates,
        report,
    })
}

/// One accepted session, with everything built for it.
struct Session<'a> {
    guest: &'a dyn Guest,
    devices: &'a [Box<dyn Device>],
    vmstates: &'a [Box<dyn VmState>],
    hello: &'a SessionHello,
    accept: SessionAccept,
    config: &'a IncomingConfig,
    start: Instant,
    log: &'a (dyn Fn(&IncomingEvent) + Sync),
}

impl Session<'_> {
    fn run(&self, main: Stream, data: Vec<Stream>) -> Result<IncomingReport, IncomingError> {
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
        let guest = self.guest;
        let barrier = RoundBarrier::new(data.len());
        let claims = PageClaims::new(guest.memory());
        let populated = Populated::new(guest.memory());
        let torn = TornPages::new(guest.memory());
        let streams = Streams::new(
            self.devices.len(),
            self.hello.devices.chunk_size as usize,
            self.accept.window,
        );
        let counters = Counters::default();
        let (tx, rx) = crossbeam_channel::unbounded();
        let serial = self.hello.devices.transfer == DeviceTransfer::Main;

        std::thread::scope(|scope| {
            let mut handles = Vec::new();
            // A thread that cannot be started fails the migration, but never skips the
            // teardown below: every thread already started must be woken and joined.
            let mut failure: Option<IncomingError> = None;
            let mut keep = |started: std::io::Result<_>, handles: &mut Vec<_>| match started {
                Ok(h) => handles.push(h),
                Err(e) => {
                    failure.get_or_insert(IncomingError::Spawn(e));
                }
            };
            let main_tx = tx.clone();
            let limits = self.config.limits;
            let main_streams = &streams;
            keep(
                std::thread::Builder::new()
                    .name("lm-dst-main".into())
                    .spawn_scoped(scope, move || {
                        read_main(main_reader, limits, main_tx, main_streams, serial)
                    }),
                &mut handles,
            );
            // Every device's loader is a job of the migration's pool, started now, so precopy
            // device data loads while the guest still runs on the source.
            let pool = WorkerPool::new(scope, "lm-dst");
            let mut pool_failure = None;
            for (i, device) in self.devices.iter().enumerate() {
                let tx = tx.clone();
                let streams = &streams;
                let start = self.start;
                pool.submit(&format!("load{i}"), move |_| {
                    let credit = |up_to| {
                        let _ = tx.send(Event::Credit(i as u16, up_to));
                    };
                    match streams.run_loader(i, &**device, start, credit) {
                        Ok(stats) => {
                            let _ = tx.send(Event::LoaderDone(i as u16, stats));
                            Ok(())
                        }
                        Err(LoadError::Device(e)) => {
                            let _ = tx.send(Event::LoaderFailed(e.clone()));
                            Err(Box::new(e))
                        }
                        Err(LoadError::Aborted) => Err(Box::new(JobCancelled)),
                    }
                })
                .unwrap_or_else(|e| {
                    pool_failure.get_or_insert(IncomingError::Job(e));
                });
            }
            for (i, stream) in data.into_iter().enumerate() {
                let r = ChannelReceiver {
                    index: i as u16,
                    stream,
                    memory: guest.memory(),
                    barrier: &barrier,
                    limits: self.config.limits,
                    events: tx.clone(),
                    counters: &counters,
                    claims: &claims,
                    populated: &populated,
                    torn: &torn,
                    streams: &streams,
                    hooks: self.config.test_hooks.clone(),
                    local: self.hello.ram == RamTransfer::Local,
                };
                keep(
                    std::thread::Builder::new()
                        .name(format!("lm-dst-ch{i}"))
                        .spawn_scoped(scope, move || r.run()),
                    &mut handles,
                );
            }
            drop(tx);

            let mut main = main;
            let outcome = match failure.or(pool_failure) {
                Some(e) => Err(e),
                None => self
                    .coordinate(&mut main, &rx, &pool.completions(), &counters, &torn)
                    .map_err(|e| prefer_peer_reason(e, &rx)),
            };
            if let Err(e) = &outcome {
                barrier.abort();
                streams.abort();
                let _ = main.set_write_timeout(Some(std::time::Duration::from_secs(1)));
                framed::send_reject(
                    &mut main,
                    ChannelName::Main,
                    &Reject::new(RejectCode::LoadFailed, e.to_string()),
                );
            }
            for s in &shutters {
                s.shutdown();
            }
            let panicked = join_everything(pool, handles, outcome.is_err());
            match (outcome, panicked) {
                (Err(e), _) => Err(e),
                (Ok(_), Some(p)) => Err(IncomingError::ThreadPanicked(p)),
                (Ok(r), None) => Ok(r),
            }
        })
    }

    /// Receiving, loading and handover, on the caller's thread.
    fn coordinate(
        &self,
        main: &mut Stream,
        events: &Receiver<Event>,
        jobs: &Receiver<JobDone>,
        counters: &Counters,
        torn: &TornPages,
    ) -> Result<IncomingReport, IncomingError> {
        let hello = self.hello;
        let peer_timeout = self.accept.peer_timeout();
        let ping_every = crate::config::ping_interval(peer_timeout);
        // The next event; when none comes for a ping interval, pings the source (so its
        // return path knows this side lives) and gives up once `deadline` has passed.
        let next = |main: &mut Stream,
                    deadline: Option<(Instant, &str)>|
         -> Result<Event, IncomingError> {
            loop {
                let ev = crossbeam_channel::select! {
                    recv(events) -> ev => ev,
                    recv(jobs) -> done => match done {
                        Ok(JobDone {
                            result: Err(e @ (PoolError::Panicked { .. } | PoolError::Spawn { .. })),
                            ..
                        }) => return Err(IncomingError::Job(e)),
                        _ => continue,
                    },
                    default(ping_every) => {
                        if let Some((at, what)) = deadline {
                            if Instant::now() >= at {
                                return Err(protocol(&format!(
                                    "no {what} from the source within the peer timeout ({:?}): it is dead, stuck or cut off",
                                    self.accept.peer_timeout()
                                )));
                            }
                        }
                        framed::send_ping(main, ChannelName::Main)?;
                        continue;
                    }
                };
                return match ev {
                    Ok(Event::ChannelFailed(e)) | Ok(Event::MainFailed(e)) => Err(e.into()),
                    Ok(Event::LoaderFailed(e)) => Err(e.into()),
                    Ok(ev) => Ok(ev),
                    Err(_) => Err(IncomingError::ThreadPanicked(
                        "every migration thread exited".into(),
                    )),
                };
            }
        };
        let mut state = None;
        let mut vmstates = None;
        let mut complete = None;
        let mut channels_done = 0usize;
        let mut device_stats = vec![None; self.devices.len()];
        let mut rounds = 0;
        let mut t_complete = Instant::now();
        // Set once every data channel has seen its last round: Complete is then due.
        let mut complete_due: Option<Instant> = None;
        while complete.is_none()
            || channels_done < hello.channels as usize
            || device_stats.iter().any(Option::is_none)
        {
            let deadline = match (complete.is_none(), complete_due) {
                (true, Some(at)) => Some((at, "Complete")),
                _ => None,
            };
            match next(main, deadline)? {
                Event::ChannelDone(r) => {
                    channels_done += 1;
                    rounds = r;
                    if channels_done == hello.channels as usize {
                        complete_due = Some(Instant::now() + self.accept.peer_timeout());
                    }
                }
                Event::RoundApplied(round) => framed::send(
                    main,
                    ChannelName::Main,
                    FrameKind::RoundAck,
                    &RoundAck { round }.encode(),
                )?,
                Event::Credit(device, up_to) => framed::send(
                    main,
                    ChannelName::Main,
                    FrameKind::Credit,
                    &Credit { device, up_to }.encode(),
                )?,
                Event::LoaderDone(d, stats) => device_stats[d as usize] = Some(stats),
                Event::State(s) => state = Some(s),
                Event::VmStates(v) => vmstates = Some(v),
                Event::RoundStart(r) => (self.log)(&IncomingEvent::RoundStarted {
                    round: r.round,
                    pages: r.pages,
                }),
                Event::Complete(c) => {
                    complete = Some(c);
                    t_complete = Instant::now();
                }
                Event::Handover => return Err(protocol("Handover before Loaded")),
                Event::ChannelFailed(_) | Event::MainFailed(_) | Event::LoaderFailed(_) => {
                    unreachable!("mapped by next()")
                }
            }
        }
        let drain = t_complete.elapsed();
        let complete = complete.expect("loop ends only with Complete");
        // A page torn in precopy was written by the guest and has come again; one still torn
        // now (the last round ran with the guest paused) was corrupted on the way.
        if let (n @ 1.., first) = torn.outstanding() {
            return Err(IncomingError::Channel(ChannelError::Protocol {
                channel: ChannelName::Main,
                detail: format!(
                    "{n} page(s) failed their CRC32C check and never arrived intact (first at 0x{:x}): data corrupted on the way",
                    first.unwrap_or(0)
                ),
            }));
        }
        if complete.rounds != rounds {
            return Err(protocol(&format!(
                "source sent {} rounds, data channels carried {rounds}",
                complete.rounds
            )));
        }
        let state = state.ok_or_else(|| protocol("Complete without GuestState"))?;
        let vmstates = vmstates.ok_or_else(|| protocol("Complete without VmStates"))?;

        // Apply in a defined order: every streamed device has loaded (above), then the small
        // devices in list order, then the guest's own state.
        let t = Instant::now();
        let blobs = VmStates::decode(&vmstates, self.vmstates.len()).map_err(|source| {
            IncomingError::Channel(ChannelError::Wire {
                channel: ChannelName::Main,
                source,
            })
        })?;
        for (dev, blob) in self.vmstates.iter().zip(&blobs.blobs) {
            dev.load(blob)?;
        }
        self.guest.restore_state(&state)?;
        let restore = t.elapsed();
        let t = Instant::now();
        let verify = if self.config.verify {
            let v = self.guest.verify()?;
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
        let device_stats: Vec<_> = device_stats.into_iter().flatten().collect();
        let loaded = Loaded {
            drain_us: drain.as_micros() as u64,
            restore_us: restore.as_micros() as u64,
            verify_us: verify_time.as_micros() as u64,
            pages_checked: verify.as_ref().map_or(0, |v| v.pages_checked),
            pages_mismatched: verify.as_ref().map_or(0, |v| v.pages_mismatched),
            devices: device_stats.clone(),
        };
        framed::send(main, ChannelName::Main, FrameKind::Loaded, &loaded.encode())?;
        let handover_due = Instant::now() + self.accept.peer_timeout();
        loop {
            match next(main, Some((handover_due, "Handover"))) {
                Ok(Event::Handover) => break,
                Ok(Event::Credit(..)) | Ok(Event::RoundApplied(_)) => {}
                Ok(_) => return Err(protocol("expected Handover")),
                Err(e) => return Err(IncomingError::NoHandover(e.to_string())),
            }
        }
        let t = Instant::now();
        self.guest.resume()?;
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
            (self.log)(&IncomingEvent::ResumedUntold {
                error: e.to_string(),
            });
        }
        Ok(IncomingReport {
            session: hello.session.to_string(),
            channels: hello.channels,
            guest_kind: hello.guest.kind.clone(),
            memory_bytes: hello.guest.memory_bytes(),
            total_ms: ms(self.start.elapsed()),
            received_bytes: counters.bytes.load(Relaxed),
            normal_pages: counters.normal_pages.load(Relaxed),
            zero_pages: counters.zero_pages.load(Relaxed),
            rounds,
            drain_ms: ms(drain),
            restore_ms: ms(restore),
            verify_ms: ms(verify_time),
            resume_ms: ms(resume),
            verify,
            credit_window: self.accept.window,
            buffer_cap_bytes: self.accept.buffer_cap,
            device_peak_buffered_bytes: device_stats.iter().map(|d| d.peak_buffered).collect(),
            torn_pages: torn.total(),
        })
    }
}

/// A broken connection is often the echo of the source's refusal, which the main reader
/// may deliver a moment later: report the source's reason when it comes soon enough.
fn prefer_peer_reason(e: IncomingError, events: &Receiver<Event>) -> IncomingError {
    if !matches!(
        e,
        IncomingError::Channel(ChannelError::Io { .. } | ChannelError::Closed { .. })
    ) {
        return e;
    }
    let deadline = Instant::now() + std::time::Duration::from_millis(500);
    while let Ok(ev) = events.recv_deadline(deadline) {
        if let Event::MainFailed(r @ ChannelError::Rejected { .. }) = ev {
            return r.into();
        }
    }
    e
}

fn protocol(detail: &str) -> IncomingError {
    IncomingError::Channel(ChannelError::Protocol {
        channel: ChannelName::Main,
        detail: detail.to_string(),
    })
}

/// The destination's main-channel reader thread. In serial mode it also receives the device
/// chunks, waiting for each device's loader to make room (the main channel's own TCP
/// backpressure then holds the source back).
fn read_main(
    mut stream: Stream,
    limits: Limits,
    events: Sender<Event>,
    streams: &Streams,
    serial: bool,
) {
    let ch = ChannelName::Main;
    let mut buf = Vec::new();
    // What has come so far: each of these at most once, and after Complete only Handover.
    let (mut state, mut vmstates, mut complete) = (false, false, false);
    loop {
        let header = framed::recv_header(&mut stream, ch, &limits).and_then(|h| {
            let dup = match h.kind {
                FrameKind::GuestState => std::mem::replace(&mut state, true),
                FrameKind::VmStates => std::mem::replace(&mut vmstates, true),
                FrameKind::Complete => std::mem::replace(&mut complete, true),
                FrameKind::Handover | FrameKind::Reject => false,
                FrameKind::DeviceChunk => !serial || complete,
                _ => complete,
            };
            if dup {
                // Refused before its payload is read.
                return Err(ChannelError::Protocol {
                    channel: ch,
                    detail: format!(
                        "unexpected {} frame on the main channel at this point",
                        h.kind.name()
                    ),
                });
            }
            Ok(h)
        });
        let ev = match header {
            Ok(h) if h.kind == FrameKind::DeviceChunk => {
                match receiver::receive_chunk(&mut stream, ch, &h, streams, true) {
                    Ok(()) => continue,
                    Err(e) => Event::MainFailed(e),
                }
            }
            Ok(h) => match framed::recv_payload(&mut stream, ch, &h, &mut buf) {
                Err(e) => Event::MainFailed(e),
                Ok(()) => {
                    let wire = |source| {
                        Event::MainFailed(ChannelError::Wire {
                            channel: ch,
                            source,
                        })
                    };
                    match h.kind {
                        FrameKind::GuestState => Event::State(std::mem::take(&mut buf)),
                        FrameKind::VmStates => Event::VmStates(std::mem::take(&mut buf)),
                        FrameKind::RoundStart => {
                            RoundStart::decode(&buf).map_or_else(wire, Event::RoundStart)
                        }
                        FrameKind::Complete => {
                            Complete::decode(&buf).map_or_else(wire, Event::Complete)
                        }
                        FrameKind::Handover => Event::Handover,
                        other => Event::MainFailed(ChannelError::Protocol {
                            channel: ch,
                            detail: format!(
                                "unexpected {} frame on the main channel",
                                other.name()
                            ),
                        }),
                    }
                }
            },
            Err(e) => Event::MainFailed(e),
        };
        let stop = matches!(ev, Event::MainFailed(_) | Event::Handover);
        if events.send(ev).is_err() || stop {
            return;
        }
    }
}
