//! The source side of a migration.
//!
//! [`migrate`] runs one outgoing migration on the caller's thread (the coordinator) with one
//! thread per data channel and one return-path thread, all scoped: every thread is joined
//! before `migrate` returns, whatever the outcome.
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
//! [`dispatch`]). Every device has a save job of its own from the start of precopy: it sends
//! the device's precopy data while the guest runs and its final state from the moment the
//! guest pauses, never outside the destination's credit. At switchover the device jobs, the
//! RAM's last dirty pass (on the coordinator) and the guest/VM state save (on a worker of its
//! own) all run at the same time. After a round's last batch, every channel gets a RoundEnd marker; the
//! destination makes all channels meet at each marker before applying the next round, so an
//! older copy of a page can never land after a newer one.

mod credit;
mod devices;
mod dispatch;
mod pacer;
mod return_path;
mod sender;
pub mod watchdog;

use crate::cancel::CancelToken;
use crate::config::{MigrationConfig, NoConvergence};
use crate::device::{Device, DeviceError, VmState};
use crate::dirty::DirtyBitmap;
use crate::error::{panic_message, ChannelError, ChannelName, MigrationError};
use crate::framed;
use crate::guest::Guest;
use crate::pool::{join_everything, JobCancelled, JobDone, PoolError, PoolJobError, WorkerPool};
use crate::report::{ms, DeviceReport, DowntimeBreakdown, MigrationReport, Progress, RoundReport};
use crate::stats::Counters;
use crate::transport::{Endpoint, Stream};
use credit::CreditTable;
use crossbeam_channel::{select, Receiver};
use devices::{SaveError, SaveJob, SaveStats, Switchover};
use dispatch::Dispatcher;
use livemig_wire::{
    ChannelHello, ChunkHeader, Complete, DeviceSetup, DeviceTransfer, FrameKind, Limits, Loaded,
    RamTransfer, Reject, RejectCode, Resumed, RoundEnd, RoundStart, SessionAccept, SessionHello,
    SessionId, VmStates, WireDevice, PAGE_SIZE,
};
use pacer::Pacer;
use sender::{ChannelSender, Job};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use watchdog::{Awaited, Watchdog};

/// A VM as the engine migrates it: guest memory and state, streamed devices, and small
/// devices whose state is one blob.
#[derive(Clone, Copy)]
pub struct Vm<'a> {
    pub guest: &'a dyn Guest,
    pub devices: &'a [&'a dyn Device],
    pub vmstates: &'a [&'a dyn VmState],
}

/// The guest's non-memory state and the non-iterable devices' blobs, saved at switchover.
pub(crate) struct SavedState {
    guest: Vec<u8>,
    vmstates: Vec<Vec<u8>>,
    ms: f64,
}

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
    Resumed(Resumed),
    /// The return path failed or the destination refused.
    PeerFailed(ChannelError),
    /// A device's save job ended.
    DeviceDone(u16, Result<SaveStats, SaveError>),
    /// The state-save worker ended.
    StateSaved(Result<SavedState, MigrationError>),
}

/// Where the guest is, for cleaning up after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestState {
    Running,
    Paused,
    HandedOver,
}

/// Migrates `guest` (without devices) to the destination listening at `to`.
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
        check_local(vm, to, config)?;
    }
    let start = Instant::now();
    let session = SessionId(*uuid::Uuid::new_v4().as_bytes());
    let (main, data, accept) = connect_cancellable(vm, to, config, session)?;
    let setup = start.elapsed();
    let mut state = GuestState::Running;
    let result = run_session(
        vm, config, session, main, data, accept, start, setup, progress, &mut state,
    );
    // A cancel from outside shuts the sockets down, so threads see broken channels: the
    // cause is still the cancel (unless the guest was already handed over).
    let result = result.map_err(|e| match e {
        MigrationError::HandoverUnknown(_) => e,
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
        let devices = vm
            .devices
            .iter()
            .map(|d| d.abort_save())
            .find_map(Result::err);
        if state == GuestState::Paused {
            vm.guest.resume()?;
        }
        if let Some(d) = devices {
            return Err(MigrationError::Device(d));
        }
        return Err(e);
    }
    result
}

/// What local mode needs before anything is opened: a `unix:` address (the memory files go
/// over it), no TLS (nothing leaves the host), and guest memory backed by files.
fn check_local(vm: Vm<'_>, to: &Endpoint, config: &MigrationConfig) -> Result<(), MigrationError> {
    if !matches!(to, Endpoint::Unix(_)) {
        return Err(MigrationError::Config(format!(
            "local mode hands guest memory over a Unix socket: '{to}' is not a unix: address"
        )));
    }
    if config.tls.is_some() {
        return Err(MigrationError::Config(
            "local mode and TLS do not go together: nothing leaves the host".into(),
        ));
    }
    crate::local::memory_files(vm.guest.memory())
        .map(drop)
        .map_err(|e| MigrationError::Config(e.to_string()))
}

fn wire_devices(vm: Vm<'_>, config: &MigrationConfig) -> DeviceSetup {
    let conv = |d: crate::device::DeviceDescriptor| WireDevice {
        kind: d.kind,
        name: d.name,
        config: d.config,
    };
    DeviceSetup {
        transfer: config.device_transfer,
        chunk_size: config.chunk_size,
        window: config.credit_window,
        buffer_cap: config.buffer_cap,
        devices: vm.devices.iter().map(|d| conv(d.descriptor())).collect(),
        vmstates: vm.vmstates.iter().map(|d| conv(d.descriptor())).collect(),
    }
}

/// [`connect_session`] under a watchdog (`lm-src-watch`) that shuts down every socket opened
/// so far on cancel, or when set-up has not finished `connect_timeout` after the main channel
/// opened: a destination that accepts and then says nothing, or trickles its answers, cannot
/// hold the source in its set-up.
fn connect_cancellable(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    session: SessionId,
) -> Result<(Stream, Vec<Stream>, SessionAccept), MigrationError> {
    let open: Mutex<Vec<Stream>> = Mutex::new(Vec::new());
    let watchdog = Watchdog::new();
    let attempt = CancelToken::new();
    let result = std::thread::scope(|scope| {
        let (open, watchdog, attempt) = (&open, &watchdog, &attempt);
        let watcher = std::thread::Builder::new()
            .name("lm-src-watch".into())
            .spawn_scoped(scope, move || {
                watchdog.run(&config.cancel, attempt, || {
                    open.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .for_each(Stream::shutdown)
                })
            })
            .map_err(MigrationError::Spawn)?;
        let r = connect_session(vm, to, config, session, open, watchdog, attempt);
        // Ends the watch (a no-op if it already cancelled).
        attempt.cancel();
        let _ = watcher.join();
        r
    });
    result.map_err(|e| {
        if config.cancel.is_cancelled() {
            MigrationError::Cancelled
        } else if let Some(x) = watchdog.expired() {
            MigrationError::Deadline(x)
        } else {
            e
        }
    })
}

/// Opens the main channel and every data channel, each with its handshake. Each socket is
/// put in `open` as soon as it exists; once the main channel is open, the rest must be done
/// within `connect_timeout` (the watchdog's deadline; `attempt` is cancelled when it passes).
fn connect_session(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    session: SessionId,
    open: &Mutex<Vec<Stream>>,
    watchdog: &Watchdog,
    attempt: &CancelToken,
) -> Result<(Stream, Vec<Stream>, SessionAccept), MigrationError> {
    let connect_err = |source| MigrationError::Connect {
        to: to.to_string(),
        source,
    };
    let tls_err = |e: crate::tls::TlsError| match e {
        crate::tls::TlsError::Cancelled => MigrationError::Cancelled,
        e => connect_err(std::io::Error::other(e)),
    };
    if let Some(tls) = &config.tls {
        // A unix: address without a server name fails here, before anything is opened.
        tls.server_name(to).map_err(tls_err)?;
    }
    let connect = || -> Result<Stream, MigrationError> {
        let s = Stream::connect_cancellable(to, config.connect_timeout, Some(attempt))
            .map_err(connect_err)?;
        let register = |s: &Stream| -> Result<(), MigrationError> {
            open.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(s.try_clone().map_err(connect_err)?);
            // Registered after the watcher may have run: look again.
            if attempt.is_cancelled() {
                return Err(MigrationError::Cancelled);
            }
            Ok(())
        };
        // The network socket first: a cancel during the TLS handshake shuts it.
        register(&s)?;
        let s = match &config.tls {
            None => s,
            Some(tls) => {
                let s = tls
                    .connect(s, to, config.connect_timeout, Some(attempt))
                    .map_err(tls_err)?;
                register(&s)?;
                s
            }
        };
        let _ = s.set_read_timeout(Some(config.connect_timeout));
        Ok(s)
    };
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut main = connect()?;
    watchdog.arm(Awaited::SetUp, config.connect_timeout);
    let hello = SessionHello {
        session,
        channels: config.channels,
        pages_per_packet: config.pages_per_packet,
        guest: vm.guest.descriptor(),
        devices: wire_devices(vm, config),
        ram: config.ram,
        peer_timeout_ms: crate::config::wire_ms(config.peer_timeout),
    };
    framed::send(
        &mut main,
        ChannelName::Main,
        FrameKind::SessionHello,
        &hello.encode(),
    )?;
    if config.ram == RamTransfer::Local {
        let (fds, layout) = crate::local::memory_files(vm.guest.memory())
            .map_err(|e| MigrationError::Config(e.to_string()))?;
        framed::send_with_fds(
            &mut main,
            ChannelName::Main,
            FrameKind::MemoryFiles,
            &layout.encode(),
            &fds,
        )?;
    }
    framed::recv_expect(
        &mut main,
        ChannelName::Main,
        &limits,
        &mut buf,
        FrameKind::SessionAccept,
    )?;
    let accept = SessionAccept::decode(&buf).map_err(|source| ChannelError::Wire {
        channel: ChannelName::Main,
        source,
    })?;
    if accept.peer_timeout_ms > hello.peer_timeout_ms {
        // The agreed timeout is the shorter of the two: a longer one is not an agreement.
        return Err(ChannelError::Protocol {
            channel: ChannelName::Main,
            detail: format!(
                "the destination answered a peer timeout of {} ms to the source's {} ms",
                accept.peer_timeout_ms, hello.peer_timeout_ms
            ),
        }
        .into());
    }
    let peer_timeout = accept.peer_timeout();
    // Every data channel's hello goes out before any answer is awaited: the destination
    // handshakes them side by side, so set-up costs one round trip, not one per channel.
    let mut data = Vec::with_capacity(config.channels as usize);
    for index in 0..config.channels {
        let mut s = connect()?;
        framed::send(
            &mut s,
            ChannelName::Data(index),
            FrameKind::ChannelHello,
            &ChannelHello { session, index }.encode(),
        )?;
        data.push(s);
    }
    for (index, s) in data.iter_mut().enumerate() {
        let ch = ChannelName::Data(index as u16);
        framed::recv_expect(s, ch, &limits, &mut buf, FrameKind::ChannelAccept)?;
    }
    for s in data.iter().chain([&main]) {
        let _ = s.set_read_timeout(None);
        s.arm_peer_timeout(peer_timeout)
            .map_err(|e| io_err_op(ChannelName::Main, "arm the peer timeout", e))?;
    }
    // The return path hears from the destination at least every ping interval.
    let _ = main.set_read_timeout(Some(peer_timeout));
    Ok((main, data, accept))
}

/// Keeps a started thread's handle, or records why it could not start.
fn spawned<'scope, T>(
    handles: &mut Vec<std::thread::ScopedJoinHandle<'scope, T>>,
    failure: &mut Option<MigrationError>,
    started: std::io::Result<std::thread::ScopedJoinHandle<'scope, T>>,
) {
    match started {
        Ok(h) => handles.push(h),
        Err(e) => {
            failure.get_or_insert(MigrationError::Spawn(e));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_session(
    vm: Vm<'_>,
    config: &MigrationConfig,
    session: SessionId,
    main: Stream,
    data: Vec<Stream>,
    accept: SessionAccept,
    start: Instant,
    setup: Duration,
    progress: &(dyn Fn(&Progress) + Sync),
    state: &mut GuestState,
) -> Result<MigrationReport, MigrationError> {
    // Clones kept to shut the sockets down, which wakes any thread blocked on them.
    let mut shutters = vec![main
        .try_clone()
        .map_err(|source| io_err(ChannelName::Main, source))?];
    for (i, s) in data.iter().enumerate() {
        shutters.push(
            s.try_clone()
                .map_err(|source| io_err(ChannelName::Data(i as u16), source))?,
        );
    }
    let return_stream = main
        .try_clone()
        .map_err(|source| io_err(ChannelName::Main, source))?;
    config.stats.reset();
    let counters = config.stats.counters();
    // This attempt's own token: failures cancel it without touching the caller's, which
    // only ever cancels into it (through the watcher below), so a retry starts afresh.
    let cancel = CancelToken::new();
    let credits = CreditTable::new(vm.devices.len(), accept.window.max(1));
    let switchover = Switchover::default();
    let watchdog = Watchdog::new();
    let multifd_devices = config.device_transfer == DeviceTransfer::Multifd;
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();

    std::thread::scope(|scope| {
        let mut channel_threads = Vec::new();
        let mut job_threads = Vec::new();
        // A thread that cannot be started fails the migration, but never skips the teardown
        // below: every thread already started must be woken and joined.
        let mut failure: Option<MigrationError> = None;
        let (outer, inner) = (&config.cancel, cancel.clone());
        // A cancel from outside, or a deadline passing, also shuts the sockets down: a
        // coordinator blocked writing to a destination that stopped reading must be freed too.
        let cut: Vec<Stream> = shutters.iter().filter_map(|s| s.try_clone().ok()).collect();
        let dog = &watchdog;
        spawned(
            &mut job_threads,
            &mut failure,
            std::thread::Builder::new()
                .name("lm-src-watch".into())
                .spawn_scoped(scope, move || {
                    dog.run(outer, &inner, || cut.iter().for_each(Stream::shutdown))
                }),
        );
        let rp_events = events_tx.clone();
        let rp_credits = &credits;
        spawned(
            &mut channel_threads,
            &mut failure,
            std::thread::Builder::new()
                .name("lm-src-return".into())
                .spawn_scoped(scope, move || {
                    return_path::run(return_stream, rp_events, rp_credits)
                }),
        );
        let mut jobs = Vec::new();
        for (i, stream) in data.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            jobs.push(tx);
            let sender = ChannelSender {
                index: i as u16,
                stream,
                memory: vm.guest.memory(),
                jobs: rx,
                ready: ready_tx.clone(),
                events: events_tx.clone(),
                cancel: cancel.clone(),
                counters,
                ping_every: crate::config::ping_interval(accept.peer_timeout()),
                pages_per_packet: config.pages_per_packet as usize,
                page_checksums: config.page_checksums,
                compress: config.compress,
                chunk_delay: config.test_hooks.chunk_delay(i as u16),
            };
            spawned(
                &mut channel_threads,
                &mut failure,
                std::thread::Builder::new()
                    .name(format!("lm-src-ch{i}"))
                    .spawn_scoped(scope, move || sender.run()),
            );
        }
        drop(ready_tx);
        let dispatch = Dispatcher::new(ready_rx, jobs, cancel.clone());

        // The migration's worker pool: the state save and every device's save are jobs of it.
        let pool = WorkerPool::new(scope, "lm-src");
        let state_events = events_tx.clone();
        let sw = &switchover;
        pool.submit("state", move |_| {
            // Waits for the pause, then saves the guest and the small devices.
            if sw.wait_started().is_some() {
                let _ = state_events.send(Event::StateSaved(save_state(vm)));
            }
            Ok(())
        })
        .unwrap_or_else(|e| {
            failure.get_or_insert(MigrationError::Job(e));
        });
        if multifd_devices {
            for (i, device) in vm.devices.iter().enumerate() {
                let job = SaveJob {
                    index: i as u16,
                    reverse: config.test_hooks.reverse_chunks(),
                    device: *device,
                    chunk_size: config.chunk_size as usize,
                    dispatch: dispatch.clone(),
                    credits: &credits,
                    switchover: &switchover,
                };
                let tx = events_tx.clone();
                pool.submit(&format!("dev{i}"), move |_| {
                    let r = job.run();
                    let outcome: Result<(), PoolJobError> = match &r {
                        Ok(_) => Ok(()),
                        Err(SaveError::Device(e)) => Err(Box::new(e.clone())),
                        Err(SaveError::Stopped) => Err(Box::new(JobCancelled)),
                    };
                    let _ = tx.send(Event::DeviceDone(i as u16, r));
                    outcome
                })
                .unwrap_or_else(|e| {
                    failure.get_or_insert(MigrationError::Job(e));
                });
            }
        }
        drop(events_tx);

        let mut co = Coordinator {
            vm,
            config,
            main,
            events: events_rx,
            jobs: pool.completions(),
            dispatch,
            counters,
            pacer: Pacer::new(config.max_bandwidth),
            progress,
            state,
            cancel: cancel.clone(),
            switchover: &switchover,
            watchdog: &watchdog,
            accept,
        };
        let outcome = match failure {
            Some(e) => Err(e),
            None => co.run(session, start, setup),
        };
        let Coordinator {
            dispatch, mut main, ..
        } = co;
        // Ends the cancel watcher; on success nothing else is waiting by now.
        cancel.cancel();
        if let Err(e) = &outcome {
            credits.abort();
            switchover.abort();
            let why = Reject::new(
                RejectCode::Other,
                format!("source aborted the migration: {e}"),
            );
            // Best effort, and never stuck behind a peer that stopped reading.
            let _ = main.set_write_timeout(Some(Duration::from_secs(1)));
            framed::send_reject(&mut main, ChannelName::Main, &why);
        }
        // Jobs first: they hold queues of the channel threads, which end when all are dropped.
        let mut panicked = join_everything(pool, job_threads, outcome.is_err());
        drop(dispatch);
        for s in &shutters {
            s.shutdown();
        }
        for h in channel_threads {
            if let Err(p) = h.join() {
                panicked = Some(panic_message(p.as_ref()));
            }
        }
        match (outcome, panicked) {
            (Err(e), _) => Err(e),
            (Ok(_), Some(p)) => Err(MigrationError::ThreadPanicked(p)),
            (Ok(r), None) => Ok(r),
        }
    })
}

/// The state-save worker's work: the guest's state, then every small device's blob.
fn save_state(vm: Vm<'_>) -> Result<SavedState, MigrationError> {
    let t = Instant::now();
    let guest = vm.guest.save_state()?;
    let vmstates = vm
        .vmstates
        .iter()
        .map(|d| d.save())
        .collect::<Result<Vec<_>, DeviceError>>()?;
    Ok(SavedState {
        guest,
        vmstates,
        ms: ms(t.elapsed()),
    })
}

fn io_err(channel: ChannelName, source: std::io::Error) -> MigrationError {
    io_err_op(channel, "clone socket", source)
}

fn io_err_op(channel: ChannelName, op: &'static str, source: std::io::Error) -> MigrationError {
    MigrationError::Channel(ChannelError::Io {
        channel,
        op,
        source,
    })
}

/// The coordinator: decides rounds, hands out RAM batches, drives switchover.
struct Coordinator<'a> {
    vm: Vm<'a>,
    config: &'a MigrationConfig,
    main: Stream,
    events: Receiver<Event>,
    /// Completions of the pool's jobs: a panicking job shows up here.
    jobs: Receiver<JobDone>,
    dispatch: Dispatcher,
    counters: &'a Counters,
    pacer: Pacer,
    progress: &'a (dyn Fn(&Progress) + Sync),
    state: &'a mut GuestState,
    cancel: CancelToken,
    switchover: &'a Switchover,
    /// Deadlines of the waits on the destination.
    watchdog: &'a Watchdog,
    accept: SessionAccept,
}

impl Coordinator<'_> {
    fn run(
        &mut self,
        session: SessionId,
        start: Instant,
        setup: Duration,
    ) -> Result<MigrationReport, MigrationError> {
        let guest = self.vm.guest;
        let desc = guest.descriptor();
        let mut dirty = DirtyBitmap::new(&desc.ranges);
        // In local mode the destination maps the very memory the guest writes: no page is
        // sent, so nothing is tracked, and precopy is one empty round (devices still stream).
        let copy_ram = self.config.ram == RamTransfer::Copy;
        if copy_ram {
            guest.start_dirty_log()?;
            dirty.set_all();
        }
        (self.progress)(&Progress::Connected {
            session: session.to_string(),
            channels: self.config.channels,
            setup_ms: ms(setup),
            total_pages: dirty.count(),
            devices: self.vm.devices.len(),
        });

        let precopy_start = Instant::now();
        let mut rounds = Vec::new();
        let mut round = 0u32;
        let mut converge = AutoConverge::new(self.config.auto_converge);
        let mut polish = 0u32;
        let forced = loop {
            let mut report = self.precopy_round(round, &dirty)?;
            report.throttle_percent = converge.throttle;
            dirty.clear();
            if copy_ram {
                guest.sync_dirty_log(&mut dirty)?;
            }
            report.dirty_after = dirty.count();
            report.expected_downtime_ms =
                1e3 * (report.dirty_after * PAGE_SIZE as u64) as f64 / report.bytes_per_s.max(1.0);
            (self.progress)(&Progress::RoundDone(report.clone()));
            let converged = switch_now(&report, ms(self.config.downtime_limit), &mut polish);
            let next_throttle = converge.after_round(&report);
            rounds.push(report);
            round += 1;
            if converged {
                break false;
            }
            if round >= self.config.max_rounds
                || precopy_start.elapsed() >= self.config.max_precopy_time
            {
                if self.config.on_no_convergence == NoConvergence::Cancel {
                    return Err(MigrationError::NotConverged {
                        rounds: round,
                        expected_downtime_ms: rounds.last().map_or(0.0, |r| r.expected_downtime_ms),
                        limit_ms: ms(self.config.downtime_limit),
                        throttle_percent: converge.throttle,
                    });
                }
                break true;
            }
            if let Some(p) = next_throttle {
                // A guest that cannot be throttled migrates on without it.
                if guest.set_throttle(p).is_err() {
                    converge.enabled = false;
                } else {
                    converge.throttle = p;
                }
            }
        };
        let precopy = precopy_start.elapsed();
        let expected_downtime_ms = rounds.last().map_or(0.0, |r| r.expected_downtime_ms);
        (self.progress)(&Progress::Switchover {
            remaining_pages: dirty.count(),
            expected_downtime_ms,
            forced,
        });

        // Switchover: from here the guest is paused until the destination runs it. Device
        // saves, the RAM's last pass and the state save run at the same time.
        let mut down = DowntimeBreakdown::default();
        let t_pause = Instant::now();
        // The guest is never paused longer than this: past it, the attempt is torn down and
        // the guest runs on here.
        self.watchdog
            .arm(Awaited::Switchover, self.config.switchover_timeout);
        guest.pause()?;
        *self.state = GuestState::Paused;
        self.switchover.start();
        down.pause_ms = ms(t_pause.elapsed());
        let t = Instant::now();
        if copy_ram {
            guest.sync_dirty_log(&mut dirty)?;
            guest.stop_dirty_log()?;
        }
        down.last_dirty_pass_ms = ms(t.elapsed());

        let t_transfer = Instant::now();
        let last = self.send_pages(round, &dirty)?;
        down.ram_final_ms = ms(t_transfer.elapsed());
        let (saved, device_stats) = self.wait_device_saves()?;
        down.state_save_ms = saved.ms;
        down.device_save_ms = device_stats.iter().map(|s| s.final_ms).fold(0.0, f64::max);
        let mut final_round = self.finish_round(round, last, t_transfer)?;
        final_round.throttle_percent = converge.throttle;
        rounds.push(final_round);
        let main = ChannelName::Main;
        if self.config.device_transfer == DeviceTransfer::Main {
            let t = Instant::now();
            self.send_devices_on_main()?;
            down.device_save_ms = ms(t.elapsed());
        }
        framed::send(&mut self.main, main, FrameKind::GuestState, &saved.guest)?;
        framed::send(
            &mut self.main,
            main,
            FrameKind::VmStates,
            &VmStates {
                blobs: saved.vmstates,
            }
            .encode(),
        )?;
        framed::send(
            &mut self.main,
            main,
            FrameKind::Complete,
            &Complete { rounds: round + 1 }.encode(),
        )?;
        let loaded = self.wait_for("Loaded", |e| match e {
            Event::Loaded(l) => Ok(l),
            other => Err(other),
        })?;
        let t_loaded = Instant::now();
        // Told to run the guest, a live destination says so at once.
        self.watchdog
            .arm(Awaited::Resumed, self.accept.peer_timeout());
        down.dest_restore_ms = loaded.restore_us as f64 / 1e3;
        down.dest_verify_ms = loaded.verify_us as f64 / 1e3;
        down.transfer_ms = ms(t_loaded - t_transfer) - down.dest_restore_ms - down.dest_verify_ms;

        framed::send(&mut self.main, main, FrameKind::Handover, &[])?;
        *self.state = GuestState::HandedOver;
        self.wait_for("Resumed", |e| match e {
            Event::Resumed(r) => Ok(r),
            other => Err(other),
        })
        .map_err(|e| MigrationError::HandoverUnknown(e.to_string()))?;
        self.watchdog.disarm();
        down.resume_ms = ms(t_loaded.elapsed());
        let downtime_ms = ms(t_pause.elapsed()) - down.dest_verify_ms;

        let c = self.counters;
        let total = start.elapsed();
        let bytes = c.bytes.load(Relaxed);
        let devices = self
            .vm
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = device_stats.get(i).cloned().unwrap_or_default();
                let l = loaded.devices.get(i).copied().unwrap_or_default();
                DeviceReport {
                    name: d.descriptor().name,
                    bytes: l.bytes,
                    chunks: l.chunks,
                    precopy_bytes: s.precopy_bytes,
                    final_save_ms: s.final_ms,
                    peak_buffered_bytes: l.peak_buffered,
                }
            })
            .collect();
        Ok(MigrationReport {
            session: session.to_string(),
            channels: self.config.channels,
            total_ms: ms(total),
            setup_ms: ms(setup),
            precopy_ms: ms(precopy),
            downtime_ms,
            downtime: down,
            transferred_bytes: bytes,
            normal_pages: c.normal_pages.load(Relaxed),
            zero_pages: c.zero_pages.load(Relaxed),
            device_bytes: c.device_bytes.load(Relaxed),
            bytes_per_s: bytes as f64 / (total - setup).as_secs_f64().max(1e-9),
            rounds,
            forced_switchover: forced,
            expected_downtime_ms,
            pages_checked: loaded.pages_checked,
            pages_mismatched: loaded.pages_mismatched,
            device_transfer: match self.config.device_transfer {
                DeviceTransfer::Multifd => "multifd",
                DeviceTransfer::Main => "main",
            }
            .into(),
            credit_window: self.accept.window,
            buffer_cap_bytes: self.accept.buffer_cap,
            devices,
        })
    }

    /// One precopy round: every page of `dirty`, RoundEnd on every channel, then waiting
    /// until the destination has applied the whole round, so the rate is the real end-to-end
    /// rate and nothing of this round is left in flight at switchover.
    fn precopy_round(
        &mut self,
        round: u32,
        dirty: &DirtyBitmap,
    ) -> Result<RoundReport, MigrationError> {
        let t0 = Instant::now();
        let start = self.send_pages(round, dirty)?;
        self.finish_round(round, start, t0)
    }

    /// Sends every page of `dirty` as round `round`; returns the counters before, for the
    /// round's report.
    fn send_pages(
        &mut self,
        round: u32,
        dirty: &DirtyBitmap,
    ) -> Result<RoundStartCounters, MigrationError> {
        let c = self.counters;
        let before = RoundStartCounters {
            bytes: c.ram_bytes.load(Relaxed),
            normal: c.normal_pages.load(Relaxed),
            zero: c.zero_pages.load(Relaxed),
            pages: dirty.count(),
        };
        framed::send(
            &mut self.main,
            ChannelName::Main,
            FrameKind::RoundStart,
            &RoundStart {
                round,
                pages: before.pages,
            }
            .encode(),
        )?;
        (self.progress)(&Progress::RoundStarted {
            round,
            pages: before.pages,
        });
        let per = self.config.pages_per_packet as usize;
        let mut batch = Vec::with_capacity(per);
        for addr in dirty.addrs() {
            batch.push(addr);
            if batch.len() == per {
                self.dispatch(
                    round,
                    std::mem::replace(&mut batch, Vec::with_capacity(per)),
                )?;
            }
        }
        if !batch.is_empty() {
            self.dispatch(round, batch)?;
        }
        Ok(before)
    }

    /// Ends a round with a RoundEnd on every channel. A precopy round then waits for every
    /// marker to be sent and for the destination's RoundAck; the last round does not (the
    /// destination's Loaded says when it is in).
    fn finish_round(
        &mut self,
        round: u32,
        before: RoundStartCounters,
        t0: Instant,
    ) -> Result<RoundReport, MigrationError> {
        let last = self.switchover.started();
        if self
            .dispatch
            .broadcast(|| Job::RoundEnd(RoundEnd { round, last }))
            .is_err()
        {
            return Err(self.failure_cause());
        }
        if !last {
            let mut sent = 0;
            let mut acked = false;
            while sent < self.dispatch.channels() || !acked {
                match self.next_event()? {
                    Event::RoundSent(r) if r == round => {
                        sent += 1;
                        if sent == self.dispatch.channels() && !acked {
                            // All of the round is on its way: a live destination that reads
                            // acknowledges it within the peer timeout, pings or not.
                            self.watchdog
                                .arm(Awaited::RoundAck(round), self.accept.peer_timeout());
                        }
                    }
                    Event::RoundAck(r) if r == round => acked = true,
                    other => return Err(unexpected(other)),
                }
            }
            self.watchdog.disarm();
        }
        let c = self.counters;
        let elapsed = t0.elapsed();
        let bytes = c.ram_bytes.load(Relaxed) - before.bytes;
        Ok(RoundReport {
            round,
            pages: before.pages,
            normal_pages: c.normal_pages.load(Relaxed) - before.normal,
            zero_pages: c.zero_pages.load(Relaxed) - before.zero,
            bytes,
            ms: ms(elapsed),
            bytes_per_s: bytes as f64 / elapsed.as_secs_f64().max(1e-9),
            ..Default::default()
        })
    }

    /// Waits for every device save job and the state-save worker.
    fn wait_device_saves(&mut self) -> Result<(SavedState, Vec<SaveStats>), MigrationError> {
        let n = if self.config.device_transfer == DeviceTransfer::Multifd {
            self.vm.devices.len()
        } else {
            0
        };
        let mut stats: Vec<Option<SaveStats>> = vec![None; n];
        let mut saved = None;
        while saved.is_none() || stats.iter().any(Option::is_none) {
            match self.next_event()? {
                Event::DeviceDone(i, Ok(s)) => stats[i as usize] = Some(s),
                Event::DeviceDone(_, Err(SaveError::Device(e))) => return Err(e.into()),
                Event::DeviceDone(_, Err(SaveError::Stopped)) => return Err(self.failure_cause()),
                Event::StateSaved(r) => saved = Some(r?),
                Event::RoundSent(_) | Event::RoundAck(_) => {}
                other => return Err(unexpected(other)),
            }
        }
        let saved = saved.expect("loop ends with the state saved");
        Ok((saved, stats.into_iter().flatten().collect()))
    }

    /// The serial baseline: each device's whole stream in turn on the main channel.
    fn send_devices_on_main(&mut self) -> Result<(), MigrationError> {
        let chunk = self.config.chunk_size as usize;
        for (i, d) in self.vm.devices.iter().enumerate() {
            d.begin_save()?;
            let mut idx = 0u32;
            let mut precopy_done = false;
            loop {
                if self.cancel.is_cancelled() {
                    return Err(self.failure_cause());
                }
                let mut buf = Vec::with_capacity(chunk);
                let n = if precopy_done {
                    d.save_final(&mut buf, chunk)?
                } else {
                    match d.save_precopy(&mut buf, chunk)? {
                        0 => {
                            precopy_done = true;
                            continue;
                        }
                        n => n,
                    }
                };
                let last = precopy_done && n == 0;
                let header = ChunkHeader {
                    device: i as u16,
                    idx,
                    last,
                }
                .encode();
                framed::send_parts(
                    &mut self.main,
                    ChannelName::Main,
                    FrameKind::DeviceChunk,
                    &[&header, &buf],
                )?;
                self.counters.device_bytes.fetch_add(n as u64, Relaxed);
                self.counters.bytes.fetch_add(n as u64, Relaxed);
                idx += 1;
                if last {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Hands a batch to the first free data channel.
    fn dispatch(&mut self, round: u32, addrs: Vec<u64>) -> Result<(), MigrationError> {
        self.pacer.admit((addrs.len() * PAGE_SIZE) as u64);
        self.dispatch
            .send(Job::Pages { round, addrs })
            .map_err(|_| self.failure_cause())
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
    fn failure_cause(&self) -> MigrationError {
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
    /// cancels the attempt) become errors.
    fn next_event(&mut self) -> Result<Event, MigrationError> {
        loop {
            let ev = select! {
                recv(self.events) -> ev => ev.map_err(|_| {
                    MigrationError::ThreadPanicked("every migration thread exited".into())
                })?,
                recv(self.jobs) -> done => {
                    job_failure(done)?;
                    continue;
                }
                recv(self.cancel.waiter()) -> _ => return Err(self.failure_cause()),
            };
            return self.check(ev);
        }
    }

    fn check(&self, ev: Event) -> Result<Event, MigrationError> {
        match ev {
            Event::Failed(e) => Err(self.peer_reason_or(e)),
            Event::PeerFailed(e) => Err(e.into()),
            Event::DeviceDone(_, Err(SaveError::Device(e))) => Err(e.into()),
            // A job stopped because the attempt is being torn down: say why it is.
            Event::DeviceDone(_, Err(SaveError::Stopped)) => Err(self.failure_cause()),
            ev => Ok(ev),
        }
    }

    /// Waits for the control message `name` that `pick` takes, ignoring channel
    /// bookkeeping meanwhile; any other message is out of order, a protocol error (e.g. a
    /// `Resumed` before `Loaded`). The watchdog's armed deadline bounds the wait.
    fn wait_for<T>(
        &mut self,
        name: &str,
        mut pick: impl FnMut(Event) -> Result<T, Event>,
    ) -> Result<T, MigrationError> {
        loop {
            match self.next_event()? {
                Event::RoundSent(..) | Event::RoundAck(_) => {}
                ev => {
                    return pick(ev).map_err(|other| {
                        MigrationError::Channel(ChannelError::Protocol {
                            channel: ChannelName::Main,
                            detail: format!(
                                "{} while waiting for {name}: out of order",
                                event_name(&other)
                            ),
                        })
                    })
                }
            }
        }
    }
}

/// A job that panicked (or could not start) fails the migration; other endings are seen
/// through the job's own event.
fn job_failure(done: Result<JobDone, crossbeam_channel::RecvError>) -> Result<(), MigrationError> {
    match done {
        Ok(JobDone {
            result: Err(e @ (PoolError::Panicked { .. } | PoolError::Spawn { .. })),
            ..
        }) => Err(MigrationError::Job(e)),
        _ => Ok(()),
    }
}

/// Rounds run past the point where the rest would fit the downtime limit, at most.
const MAX_POLISH_ROUNDS: u32 = 8;
/// Expected downtime below which another round is not worth its fixed cost, milliseconds.
const POLISH_FLOOR_MS: f64 = 1.0;

/// Whether to switch over after the round `r`: once the rest would move within the downtime
/// limit, and another round would not at least halve it. A round that halves what is left
/// costs a few milliseconds of precopy (the guest runs) and takes as much off the downtime
/// (the guest is paused), so the downtime approaches the switchover's fixed cost rather than
/// the working set's last pass (QEMU switches over as soon as the rest fits). `polish`
/// counts the rounds run past the limit; at most [`MAX_POLISH_ROUNDS`].
fn switch_now(r: &RoundReport, limit_ms: f64, polish: &mut u32) -> bool {
    if r.expected_downtime_ms > limit_ms {
        return false;
    }
    let halves = r.dirty_after * 2 < r.pages;
    if !halves || r.expected_downtime_ms < POLISH_FLOOR_MS || *polish >= MAX_POLISH_ROUNDS {
        return true;
    }
    *polish += 1;
    false
}

/// Auto-converge's state: QEMU's rule, a round whose dirtying reached half of what it sent
/// counts as not shrinking; two such rounds in a row raise the throttle a step.
struct AutoConverge {
    enabled: bool,
    /// The throttle now, percent.
    throttle: u8,
    /// Rounds in a row that did not shrink.
    high: u32,
}

impl AutoConverge {
    fn new(enabled: bool) -> Self {
        AutoConverge {
            enabled,
            throttle: 0,
            high: 0,
        }
    }

    /// The throttle the next round should run at, if it changes.
    fn after_round(&mut self, r: &RoundReport) -> Option<u8> {
        if !self.enabled {
            return None;
        }
        if r.dirty_after * 2 >= r.pages.max(1) {
            self.high += 1;
        } else {
            self.high = 0;
        }
        if self.high < 2 || self.throttle >= crate::config::THROTTLE_MAX {
            return None;
        }
        self.high = 0;
        Some(if self.throttle == 0 {
            crate::config::THROTTLE_INITIAL
        } else {
            self.throttle
                .saturating_add(crate::config::THROTTLE_STEP)
                .min(crate::config::THROTTLE_MAX)
        })
    }
}

/// Counters at the start of a round.
struct RoundStartCounters {
    bytes: u64,
    normal: u64,
    zero: u64,
    pages: u64,
}

fn unexpected(ev: Event) -> MigrationError {
    let what = event_name(&ev);
    MigrationError::Channel(ChannelError::Protocol {
        channel: ChannelName::Main,
        detail: format!("unexpected {what} at this point of the migration"),
    })
}

/// What an event is, for errors.
fn event_name(ev: &Event) -> &'static str {
    match ev {
        Event::Loaded(_) => "Loaded",
        Event::Resumed(_) => "Resumed",
        Event::RoundSent(..) => "RoundSent",
        Event::RoundAck(_) => "RoundAck",
        Event::DeviceDone(..) => "a device save ending",
        Event::StateSaved(_) => "the state saved",
        Event::Failed(_) | Event::PeerFailed(_) => "a failure",
    }
}

#[cfg(test)]
mod tests {
    use super::{switch_now, RoundReport, MAX_POLISH_ROUNDS};

    fn round(pages: u64, dirty_after: u64, expected_downtime_ms: f64) -> RoundReport {
        RoundReport {
            pages,
            dirty_after,
            expected_downtime_ms,
            ..Default::default()
        }
    }

    #[test]
    fn over_the_limit_never_switches() {
        let mut polish = 0;
        assert!(!switch_now(&round(1000, 900, 500.0), 300.0, &mut polish));
        assert_eq!(polish, 0);
    }

    #[test]
    fn under_the_limit_a_round_that_halves_the_rest_is_run() {
        let mut polish = 0;
        // 64 MiB left of a 1.5 GiB first round: fits, but another round halves it.
        assert!(!switch_now(
            &round(393_216, 16_384, 32.0),
            300.0,
            &mut polish
        ));
        assert_eq!(polish, 1);
        // The rest stopped halving: switch.
        assert!(switch_now(&round(400, 300, 1.5), 300.0, &mut polish));
    }

    #[test]
    fn a_rest_below_the_floor_or_an_idle_guest_switches_at_once() {
        let mut polish = 0;
        assert!(switch_now(&round(393_216, 0, 0.0), 300.0, &mut polish));
        assert!(switch_now(&round(1000, 10, 0.5), 300.0, &mut polish));
        assert_eq!(polish, 0);
    }

    #[test]
    fn polishing_is_bounded() {
        let mut polish = 0;
        let r = round(1000, 100, 50.0);
        let extra = (0..100)
            .take_while(|_| !switch_now(&r, 300.0, &mut polish))
            .count();
        assert_eq!(extra as u32, MAX_POLISH_ROUNDS);
    }
}
