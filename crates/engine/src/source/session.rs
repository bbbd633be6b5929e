//! One connected session on the source: its threads started on the migration's runtime,
//! the coordinator run, and the one teardown whatever the outcome.
//!
//! Threads (all `lm-src-*`, all joined before this returns): `watch` (cancel and deadlines
//! cut the sockets), `return` (the destination's acks, credit and answers), `ch{i}` per data
//! channel, and the jobs `state` (the guest's and small devices' state at switchover) and
//! `dev{i}` per streamed device.

use super::abandon::ContinuePoint;
use super::connect::Connected;
use super::coordinator::{Coordinator, Event};
use super::credit::CreditTable;
use super::devices::{SaveError, SaveJob, Switchover};
use super::dispatch::Dispatcher;
use super::pacer::Pacer;
use super::precopy::Precopy;
use super::recover::ResumePoint;
use super::report::ReportParts;
use super::sender::ChannelSender;
use super::switchover::save_state;
use super::watchdog::Watchdog;
use super::{return_path, GuestState, Vm};
use crate::cancel::CancelToken;
use crate::config::MigrationConfig;
use crate::dirty::DirtyBitmap;
use crate::error::{ChannelError, ChannelName, MigrationError};
use crate::framed;
use crate::report::{MigrationReport, Progress};
use crate::runtime::{JobCancelled, JobError, Runtime};
use crate::stats::Counters;
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{DeviceTransfer, PostcopyStart, Reject, RejectCode};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::Duration;

/// What every thread of the session shares.
struct Shared<'a> {
    vm: Vm<'a>,
    config: &'a MigrationConfig,
    counters: &'a Counters,
    credits: CreditTable,
    switchover: Switchover,
    watchdog: Watchdog,
    postcopy: PostcopyShared,
    /// The destination's `SwitchoverAck` came.
    acked: AtomicBool,
}

/// What the return path and the coordinator share in a postcopy session.
#[derive(Default)]
pub(super) struct PostcopyShared {
    /// The round number postcopy pages carry (set at the switch).
    pub round: AtomicU32,
}

/// Where a session starts.
pub(super) enum Start {
    /// A new migration: precopy from round 0.
    Fresh,
    /// The resumption of a broken postcopy, with the pages the destination still misses.
    Resume(Box<ResumePoint>, PostcopyStart),
    /// The same migration going on after an abandoned switchover.
    Continue(Box<ContinuePoint>),
}

/// What a session that ended without completing leaves for the next one.
pub(super) enum Leftover {
    /// A postcopy broken by a lost link, to be resumed.
    Postcopy(Box<ResumePoint>),
    /// A switchover abandoned past its hard bound, to go on from.
    Switchover(Box<ContinuePoint>),
}

impl<'a> Shared<'a> {
    /// What the session's threads share, for a session that starts at `start`.
    fn new(
        vm: Vm<'a>,
        config: &'a MigrationConfig,
        accept: &livemig_wire::SessionAccept,
        start: &Start,
    ) -> Self {
        Shared {
            vm,
            config,
            counters: config.stats.counters(),
            credits: CreditTable::new(vm.devices.len(), accept.window.max(1)),
            switchover: Switchover::default(),
            watchdog: Watchdog::new(),
            acked: AtomicBool::new(false),
            postcopy: match start {
                Start::Fresh | Start::Continue(_) => PostcopyShared::default(),
                Start::Resume(point, _) => PostcopyShared {
                    round: AtomicU32::new(point.round),
                },
            },
        }
    }
}

/// The background push (`lm-src-push`), waiting for the switch's pages on the queue
/// returned.
fn start_push<'scope>(
    rt: &Runtime<'scope, '_>,
    dispatch: &Dispatcher,
    config: &'scope MigrationConfig,
) -> Sender<super::postcopy::PushOrder> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let (dispatch, cancel) = (dispatch.clone(), rt.cancel_token().clone());
    rt.spawn("push", move || {
        super::postcopy::push(rx, dispatch, config, &cancel)
    });
    tx
}

/// Runs a connected session to its end; `state` says where the guest is when it fails. A
/// postcopy that breaks, or a switchover abandoned past its bound, leaves where it stood in
/// `left`, for the session that goes on.
pub(super) fn run(
    vm: Vm<'_>,
    config: &MigrationConfig,
    c: Connected,
    progress: &(dyn Fn(&Progress) + Sync),
    state: &mut GuestState,
    start: Start,
    left: &mut Option<Leftover>,
) -> Result<MigrationReport, MigrationError> {
    let (sockets, return_stream) = clones(&c)?;
    if let Start::Fresh = start {
        config.stats.reset();
    }
    let shared = Shared::new(vm, config, &c.accept, &start);
    // This attempt's own token: failures cancel it without touching the caller's, which
    // only ever cancels into it (through the watcher), so a retry starts afresh.
    let cancel = CancelToken::new();
    std::thread::scope(|scope| {
        let rt = Runtime::new(scope, "lm-src", cancel.clone());
        sockets.into_iter().for_each(|s| rt.keep_socket(s));
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        start_watch(&rt, &shared);
        // Its queue is the return path's: no readiness to wait for, so its ready queue is
        // kept but never read.
        let (urgent_ready, _never_read) = crossbeam_channel::unbounded();
        let urgent = c
            .urgent
            .map(|stream| start_urgent(&rt, &shared, stream, urgent_ready, &c.accept, &events_tx));
        let rp = (events_tx.clone(), (&shared.credits, &shared.acked));
        rt.spawn_favoured("return", move || {
            return_path::run(return_stream, rp.0, rp.1, urgent)
        });
        let dispatch = start_channels(&rt, &shared, c.data, &c.accept, &events_tx);
        // A resumed postcopy saves nothing: every device and the state went before the
        // switch.
        if !matches!(start, Start::Resume(..)) {
            start_jobs(&rt, &shared, &dispatch, &events_tx);
        }
        let push = config
            .postcopy
            .allowed()
            .then(|| start_push(&rt, &dispatch, config));
        drop(events_tx);

        let dirty = DirtyBitmap::new(&vm.guest.descriptor().ranges);
        let mut co = Coordinator {
            vm,
            config,
            main: c.main,
            events: events_rx,
            threads: rt.completions(),
            dispatch,
            counters: shared.counters,
            pacer: Pacer::new(config.max_bandwidth),
            progress,
            state,
            cancel: cancel.clone(),
            switchover: &shared.switchover,
            watchdog: &shared.watchdog,
            accept: c.accept,
            precopy: Precopy::new(dirty, true, config.auto_converge),
            postcopy: &shared.postcopy,
            push,
            parts: ReportParts::new(c.session, c.start, c.setup),
            hard_deadline: None,
            awaiting: "",
            acked: &shared.acked,
        };
        let outcome = match rt.failure() {
            Some(e) => Err(MigrationError::Job(e)),
            None => co.run(start),
        };
        finish(rt, &shared, co, outcome, left)
    })
}

/// The one teardown, whatever the outcome: on failure the destination is told why (the
/// credit table and the switchover signal aborted first, waking the jobs); then the attempt
/// is cancelled (ending the watcher), the job queues close (the channel threads' loops end),
/// and the runtime shuts every socket and joins every thread. A broken postcopy leaves its
/// resume point in `left`, and the destination is told nothing: it pauses too. An abandoned
/// switchover interrupts the devices' saves first (so the joins are quick), tells the
/// destination to wait for the same session again, and leaves where it stood in `left`.
fn finish(
    rt: Runtime<'_, '_>,
    shared: &Shared<'_>,
    co: Coordinator<'_>,
    outcome: Result<MigrationReport, MigrationError>,
    left: &mut Option<Leftover>,
) -> Result<MigrationReport, MigrationError> {
    // Everything the coordinator holds of the threads goes now: the push's queue (a push
    // still waiting for a switch that did not come ends), the job queues.
    let Coordinator {
        dispatch,
        mut main,
        push,
        parts,
        precopy,
        ..
    } = co;
    drop(push);
    if outcome.is_err() {
        shared.credits.abort();
        shared.switchover.abort();
    }
    match &outcome {
        Err(MigrationError::PostcopyBroken(_)) if parts.postcopy_started.is_some() => {
            *left = Some(Leftover::Postcopy(Box::new(ResumePoint {
                parts,
                rounds: precopy.rounds,
                round: shared.postcopy.round.load(Relaxed),
            })));
        }
        Err(e @ MigrationError::SwitchoverAbandoned { waiting_for, .. }) => {
            shared.vm.devices.iter().for_each(|d| d.interrupt_save());
            let why = abandon_reject(shared.config, e, waiting_for, parts.abandoned.len());
            // The guest waits for this: a link too slow to take a Reject at once loses it
            // (the destination then fails on the broken channels, and so does the session
            // that would go on; the guest runs on here either way).
            let _ = main.set_write_timeout(Some(Duration::from_millis(50)));
            framed::send_reject(&mut main, ChannelName::Main, &why);
            *left = Some(Leftover::Switchover(Box::new(ContinuePoint::new(
                parts, precopy,
            ))));
        }
        Err(e) => {
            let why = Reject::new(
                RejectCode::Other,
                format!("source aborted the migration: {e}"),
            );
            // Best effort, and never stuck behind a peer that stopped reading.
            let _ = main.set_write_timeout(Some(Duration::from_secs(1)));
            framed::send_reject(&mut main, ChannelName::Main, &why);
        }
        Ok(_) => {}
    }
    rt.cancel();
    drop(dispatch);
    // Once the destination said it runs the guest, the migration has happened: a thread
    // found failed at the join (after its work was done) cannot undo that, and reporting a
    // failure would only hide where the guest runs.
    let _ = rt.teardown(false);
    outcome
}

/// What the destination is told of an abandoned switchover: to wait for the session to go
/// on, or, the last one allowed under `NoConvergence::Cancel`, that the migration ends.
fn abandon_reject(
    config: &MigrationConfig,
    e: &MigrationError,
    waiting_for: &str,
    abandoned: usize,
) -> Reject {
    let last = abandoned as u32 >= config.switchover_attempts
        && config.on_no_convergence == crate::config::NoConvergence::Cancel;
    match last {
        true => Reject::new(RejectCode::Cancelled, format!("source aborted the migration: {e}")),
        false => Reject::new(
            RejectCode::SwitchoverAbandoned,
            format!("switchover abandoned past the hard downtime limit (it waited for {waiting_for}); the session goes on in a new connection"),
        ),
    }
}

/// Clones of every socket, kept to shut them down (which wakes any thread blocked on one),
/// and the main channel's for the return path.
fn clones(c: &Connected) -> Result<(Vec<Stream>, Stream), MigrationError> {
    // Clones kept to shut the sockets down, which wakes any thread blocked on them.
    let clone = |s: &Stream, ch| {
        s.try_clone().map_err(|source| {
            MigrationError::Channel(ChannelError::Io {
                channel: ch,
                op: "clone socket",
                source,
            })
        })
    };
    let mut sockets = vec![clone(&c.main, ChannelName::Main)?];
    for (i, s) in c.data.iter().chain(c.urgent.iter()).enumerate() {
        sockets.push(clone(s, ChannelName::Data(i as u16))?);
    }
    let return_stream = clone(&c.main, ChannelName::Main)?;
    Ok((sockets, return_stream))
}

/// The watcher: a cancel from outside, or a deadline passing, shuts the sockets down, so a
/// coordinator blocked writing to a destination that stopped reading is freed too.
fn start_watch<'scope>(rt: &Runtime<'scope, '_>, shared: &'scope Shared<'_>) {
    let cut = rt.socket_clones();
    let (outer, attempt) = (&shared.config.cancel, rt.cancel_token().clone());
    let dog = &shared.watchdog;
    rt.spawn("watch", move || {
        dog.run(outer, &attempt, || cut.iter().for_each(Stream::shutdown))
    });
}

/// One sender thread per data channel; the dispatcher hands work to whichever is free.
fn start_channels<'scope>(
    rt: &Runtime<'scope, '_>,
    shared: &'scope Shared<'_>,
    data: Vec<Stream>,
    accept: &livemig_wire::SessionAccept,
    events: &Sender<Event>,
) -> Dispatcher {
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let mut queues = Vec::new();
    for (i, stream) in data.into_iter().enumerate() {
        let (tx, rx) = crossbeam_channel::unbounded();
        queues.push(tx);
        let sender = channel_sender(
            rt,
            shared,
            stream,
            i as u16,
            rx,
            ready_tx.clone(),
            accept,
            events,
        );
        rt.spawn(&format!("ch{i}"), move || sender.run());
    }
    Dispatcher::new(ready_rx, queues, rt.cancel_token().clone())
}

/// Postcopy's urgent channel: a sender whose queue the return path fills with the pages the
/// destination asks for.
fn start_urgent<'scope>(
    rt: &Runtime<'scope, '_>,
    shared: &'scope Shared<'_>,
    stream: Stream,
    ready: Sender<u16>,
    accept: &livemig_wire::SessionAccept,
    events: &Sender<Event>,
) -> return_path::Urgent<'scope> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let index = shared.config.channels;
    let sender = channel_sender(rt, shared, stream, index, rx, ready, accept, events);
    rt.spawn_favoured("urgent", move || sender.run());
    return_path::Urgent {
        queue: tx,
        round: &shared.postcopy.round,
        requested: &shared.counters.postcopy_requests,
    }
}

/// The sender of data channel `index` (or the urgent channel), taking jobs from `jobs`.
#[allow(clippy::too_many_arguments)]
fn channel_sender<'scope>(
    rt: &Runtime<'scope, '_>,
    shared: &'scope Shared<'_>,
    stream: Stream,
    index: u16,
    jobs: crossbeam_channel::Receiver<super::sender::Job>,
    ready: Sender<u16>,
    accept: &livemig_wire::SessionAccept,
    events: &Sender<Event>,
) -> ChannelSender<'scope> {
    let config = shared.config;
    ChannelSender {
        index,
        stream,
        memory: shared.vm.guest.memory(),
        jobs,
        ready,
        events: events.clone(),
        cancel: rt.cancel_token().clone(),
        counters: shared.counters,
        ping_every: crate::config::ping_interval(accept.peer_timeout()),
        pages_per_packet: config.pages_per_packet as usize,
        page_checksums: config.page_checksums,
        compress: config.compress,
        #[cfg(feature = "test-hooks")]
        chunk_delay: config.test_hooks.chunk_delay(index),
    }
}

/// The migration's jobs: the state save, and every streamed device's save.
fn start_jobs<'scope>(
    rt: &Runtime<'scope, '_>,
    shared: &'scope Shared<'_>,
    dispatch: &Dispatcher,
    events: &Sender<Event>,
) {
    let (vm, config) = (shared.vm, shared.config);
    let state_events = events.clone();
    let sw = &shared.switchover;
    rt.submit("state", move || {
        // Waits for the pause, then saves the guest and the small devices.
        if sw.wait_started().is_some() {
            let _ = state_events.send(Event::StateSaved(save_state(vm)));
        }
        Ok(())
    });
    if config.device_transfer != DeviceTransfer::Multifd {
        return;
    }
    for (i, device) in vm.devices.iter().enumerate() {
        let job = SaveJob {
            index: i as u16,
            #[cfg(feature = "test-hooks")]
            reverse: config.test_hooks.reverse_chunks(),
            device: *device,
            chunk_size: config.chunk_size as usize,
            dispatch: dispatch.clone(),
            credits: &shared.credits,
            switchover: &shared.switchover,
        };
        let tx = events.clone();
        rt.submit(&format!("dev{i}"), move || {
            let r = job.run();
            let outcome: Result<(), JobError> = match &r {
                Ok(_) => Ok(()),
                Err(SaveError::Device(e)) => Err(Box::new(e.clone())),
                Err(SaveError::Stopped) => Err(Box::new(JobCancelled)),
            };
            let _ = tx.send(Event::DeviceDone(i as u16, r));
            outcome
        });
    }
}
