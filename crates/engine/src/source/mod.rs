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
//! Batches of page addresses go to whichever data channel is free: each channel thread
//! announces itself ready on the event queue and the coordinator hands the next batch to the
//! first ready channel. After a round's last batch, every channel gets a RoundEnd marker; the
//! destination makes all channels meet at each marker before applying the next round, so an
//! older copy of a page can never land after a newer one.

mod pacer;
mod return_path;
mod sender;
pub(crate) use sender::is_zero;

use crate::config::MigrationConfig;
use crate::dirty::DirtyBitmap;
use crate::error::{panic_message, ChannelError, ChannelName, MigrationError};
use crate::framed;
use crate::guest::Guest;
use crate::report::{ms, DowntimeBreakdown, MigrationReport, Progress, RoundReport};
use crate::transport::{Endpoint, Stream};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use livemig_wire::{
    ChannelHello, Complete, FrameKind, Limits, Loaded, Reject, RejectCode, Resumed, RoundEnd,
    RoundStart, SessionHello, SessionId, PAGE_SIZE,
};
use pacer::Pacer;
use sender::{ChannelSender, Counters, Job};
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// What the coordinator hears from its threads.
pub(crate) enum Event {
    /// A data channel can take another batch.
    Ready(u16),
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
}

/// Where the guest is, for cleaning up after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuestState {
    Running,
    Paused,
    HandedOver,
}

/// Migrates `guest` to the destination listening at `to`. On success the guest runs on the
/// destination and stays paused here; on failure before handover it runs here again.
pub fn migrate(
    guest: &dyn Guest,
    to: &Endpoint,
    config: &MigrationConfig,
    progress: &(dyn Fn(&Progress) + Sync),
) -> Result<MigrationReport, MigrationError> {
    config.validate()?;
    let start = Instant::now();
    let session = SessionId(*uuid::Uuid::new_v4().as_bytes());
    let (main, data) = connect_session(guest, to, config, session)?;
    let setup = start.elapsed();
    let mut state = GuestState::Running;
    let result = run_session(
        guest, config, session, main, data, start, setup, progress, &mut state,
    );
    if result.is_err() {
        let _ = guest.stop_dirty_log();
        if state == GuestState::Paused {
            guest.resume()?;
        }
    }
    result
}

/// Opens the main channel and every data channel, each with its handshake.
fn connect_session(
    guest: &dyn Guest,
    to: &Endpoint,
    config: &MigrationConfig,
    session: SessionId,
) -> Result<(Stream, Vec<Stream>), MigrationError> {
    let connect = || {
        Stream::connect(to, config.connect_timeout).map_err(|source| MigrationError::Connect {
            to: to.to_string(),
            source,
        })
    };
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut main = connect()?;
    let hello = SessionHello {
        session,
        channels: config.channels,
        pages_per_packet: config.pages_per_packet,
        guest: guest.descriptor(),
    };
    framed::send(
        &mut main,
        ChannelName::Main,
        FrameKind::SessionHello,
        &hello.encode(),
    )?;
    framed::recv_expect(
        &mut main,
        ChannelName::Main,
        &limits,
        &mut buf,
        FrameKind::SessionAccept,
    )?;
    let mut data = Vec::with_capacity(config.channels as usize);
    for index in 0..config.channels {
        let ch = ChannelName::Data(index);
        let mut s = connect()?;
        framed::send(
            &mut s,
            ch,
            FrameKind::ChannelHello,
            &ChannelHello { session, index }.encode(),
        )?;
        framed::recv_expect(&mut s, ch, &limits, &mut buf, FrameKind::ChannelAccept)?;
        data.push(s);
    }
    Ok((main, data))
}

#[allow(clippy::too_many_arguments)]
fn run_session(
    guest: &dyn Guest,
    config: &MigrationConfig,
    session: SessionId,
    main: Stream,
    data: Vec<Stream>,
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
    let counters = Counters::default();
    let (events_tx, events_rx) = crossbeam_channel::unbounded();

    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let rp_events = events_tx.clone();
        handles.push(
            std::thread::Builder::new()
                .name("lm-src-return".into())
                .spawn_scoped(scope, move || return_path::run(return_stream, rp_events))
                .map_err(|e| MigrationError::ThreadPanicked(format!("spawn: {e}")))?,
        );
        let mut jobs = Vec::new();
        for (i, stream) in data.into_iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            jobs.push(tx);
            let sender = ChannelSender {
                index: i as u16,
                stream,
                memory: guest.memory(),
                jobs: rx,
                events: events_tx.clone(),
                counters: &counters,
                pages_per_packet: config.pages_per_packet as usize,
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("lm-src-ch{i}"))
                    .spawn_scoped(scope, move || sender.run())
                    .map_err(|e| MigrationError::ThreadPanicked(format!("spawn: {e}")))?,
            );
        }
        drop(events_tx);

        let mut co = Coordinator {
            guest,
            config,
            main,
            events: events_rx,
            jobs,
            free: VecDeque::new(),
            counters: &counters,
            pacer: Pacer::new(config.max_bandwidth),
            progress,
            state,
        };
        let outcome = co.run(session, start, setup);
        let Coordinator { jobs, mut main, .. } = co;
        drop(jobs);
        if let Err(e) = &outcome {
            let why = Reject::new(
                RejectCode::Other,
                format!("source aborted the migration: {e}"),
            );
            framed::send_reject(&mut main, ChannelName::Main, &why);
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
            (Ok(_), Some(p)) => Err(MigrationError::ThreadPanicked(p)),
            (Ok(r), None) => Ok(r),
        }
    })
}

fn io_err(channel: ChannelName, source: std::io::Error) -> MigrationError {
    MigrationError::Channel(ChannelError::Io {
        channel,
        op: "clone socket",
        source,
    })
}

/// The coordinator: decides rounds, hands out batches, drives switchover.
struct Coordinator<'a> {
    guest: &'a dyn Guest,
    config: &'a MigrationConfig,
    main: Stream,
    events: Receiver<Event>,
    jobs: Vec<Sender<Job>>,
    /// Data channels that asked for a batch and have not been given one.
    free: VecDeque<u16>,
    counters: &'a Counters,
    pacer: Pacer,
    progress: &'a (dyn Fn(&Progress) + Sync),
    state: &'a mut GuestState,
}

impl Coordinator<'_> {
    fn run(
        &mut self,
        session: SessionId,
        start: Instant,
        setup: Duration,
    ) -> Result<MigrationReport, MigrationError> {
        let desc = self.guest.descriptor();
        let mut dirty = DirtyBitmap::new(&desc.ranges);
        self.guest.start_dirty_log()?;
        dirty.set_all();
        (self.progress)(&Progress::Connected {
            session: session.to_string(),
            channels: self.config.channels,
            setup_ms: ms(setup),
            total_pages: dirty.count(),
        });

        let precopy_start = Instant::now();
        let mut rounds = Vec::new();
        let mut round = 0u32;
        let forced = loop {
            let mut report = self.send_round(round, &dirty, false)?;
            dirty.clear();
            self.guest.sync_dirty_log(&mut dirty)?;
            report.dirty_after = dirty.count();
            report.expected_downtime_ms =
                1e3 * (report.dirty_after * PAGE_SIZE as u64) as f64 / report.bytes_per_s.max(1.0);
            (self.progress)(&Progress::RoundDone(report.clone()));
            let converged = report.expected_downtime_ms <= ms(self.config.downtime_limit);
            rounds.push(report);
            round += 1;
            if converged {
                break false;
            }
            if round >= self.config.max_rounds
                || precopy_start.elapsed() >= self.config.max_precopy_time
            {
                break true;
            }
        };
        let precopy = precopy_start.elapsed();
        let expected_downtime_ms = rounds.last().map_or(0.0, |r| r.expected_downtime_ms);
        (self.progress)(&Progress::Switchover {
            remaining_pages: dirty.count(),
            expected_downtime_ms,
            forced,
        });

        // Switchover: from here the guest is paused until the destination runs it.
        let mut down = DowntimeBreakdown::default();
        let t_pause = Instant::now();
        self.guest.pause()?;
        *self.state = GuestState::Paused;
        down.pause_ms = ms(t_pause.elapsed());
        let t = Instant::now();
        self.guest.sync_dirty_log(&mut dirty)?;
        self.guest.stop_dirty_log()?;
        down.last_dirty_pass_ms = ms(t.elapsed());
        let t = Instant::now();
        let blob = self.guest.save_state()?;
        down.state_save_ms = ms(t.elapsed());

        let t_transfer = Instant::now();
        let last = self.send_round(round, &dirty, true)?;
        rounds.push(last);
        framed::send(
            &mut self.main,
            ChannelName::Main,
            FrameKind::GuestState,
            &blob,
        )?;
        framed::send(
            &mut self.main,
            ChannelName::Main,
            FrameKind::Complete,
            &Complete { rounds: round + 1 }.encode(),
        )?;
        let loaded = self.wait_for(|e| match e {
            Event::Loaded(l) => Some(l),
            _ => None,
        })?;
        let t_loaded = Instant::now();
        down.dest_restore_ms = loaded.restore_us as f64 / 1e3;
        down.dest_verify_ms = loaded.verify_us as f64 / 1e3;
        down.transfer_ms = ms(t_loaded - t_transfer) - down.dest_restore_ms - down.dest_verify_ms;

        framed::send(&mut self.main, ChannelName::Main, FrameKind::Handover, &[])?;
        *self.state = GuestState::HandedOver;
        self.wait_for(|e| match e {
            Event::Resumed(r) => Some(r),
            _ => None,
        })
        .map_err(|e| MigrationError::HandoverUnknown(e.to_string()))?;
        down.resume_ms = ms(t_loaded.elapsed());
        let downtime_ms = ms(t_pause.elapsed()) - down.dest_verify_ms;

        let c = self.counters;
        let total = start.elapsed();
        let bytes = c.bytes.load(Relaxed);
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
            bytes_per_s: bytes as f64 / (total - setup).as_secs_f64().max(1e-9),
            rounds,
            forced_switchover: forced,
            expected_downtime_ms,
            pages_checked: loaded.pages_checked,
            pages_mismatched: loaded.pages_mismatched,
        })
    }

    /// Sends every page of `dirty` as round `round`, then a RoundEnd on every channel. For a
    /// precopy round, waits until every channel has sent its marker, so the round's rate is
    /// measured; the switchover round does not wait (the destination's Loaded says when).
    fn send_round(
        &mut self,
        round: u32,
        dirty: &DirtyBitmap,
        last: bool,
    ) -> Result<RoundReport, MigrationError> {
        let t0 = Instant::now();
        let c = self.counters;
        let (b0, n0, z0) = (
            c.bytes.load(Relaxed),
            c.normal_pages.load(Relaxed),
            c.zero_pages.load(Relaxed),
        );
        let pages = dirty.count();
        framed::send(
            &mut self.main,
            ChannelName::Main,
            FrameKind::RoundStart,
            &RoundStart { round, pages }.encode(),
        )?;
        (self.progress)(&Progress::RoundStarted { round, pages });
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
        for tx in &self.jobs {
            // A closed queue means the channel died; its Failed event is on the way.
            let _ = tx.send(Job::RoundEnd(RoundEnd { round, last }));
        }
        if !last {
            // Wait until the destination has applied the whole round: then the rate is the
            // real end-to-end rate and nothing of this round is left in flight at switchover.
            let mut sent = 0;
            let mut acked = false;
            while sent < self.jobs.len() || !acked {
                match self.next_event(None)? {
                    Event::Ready(i) => self.free.push_back(i),
                    Event::RoundSent(r) if r == round => sent += 1,
                    Event::RoundAck(r) if r == round => acked = true,
                    other => return Err(unexpected(other)),
                }
            }
        }
        let elapsed = t0.elapsed();
        let bytes = c.bytes.load(Relaxed) - b0;
        Ok(RoundReport {
            round,
            pages,
            normal_pages: c.normal_pages.load(Relaxed) - n0,
            zero_pages: c.zero_pages.load(Relaxed) - z0,
            bytes,
            ms: ms(elapsed),
            bytes_per_s: bytes as f64 / elapsed.as_secs_f64().max(1e-9),
            ..Default::default()
        })
    }

    /// Hands a batch to the first free data channel.
    fn dispatch(&mut self, round: u32, addrs: Vec<u64>) -> Result<(), MigrationError> {
        self.pacer.admit((addrs.len() * PAGE_SIZE) as u64);
        let index = loop {
            if let Some(i) = self.free.pop_front() {
                break i;
            }
            match self.next_event(None)? {
                Event::Ready(i) => self.free.push_back(i),
                other => return Err(unexpected(other)),
            }
        };
        let _ = self.jobs[index as usize].send(Job::Pages { round, addrs });
        Ok(())
    }

    /// The next event; failures of any thread become errors.
    fn next_event(&mut self, timeout: Option<Duration>) -> Result<Event, MigrationError> {
        let ev = match timeout {
            None => self.events.recv().map_err(|_| {
                MigrationError::ThreadPanicked("every migration thread exited".into())
            })?,
            Some(t) => match self.events.recv_timeout(t) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => return Err(MigrationError::Timeout(t)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::ThreadPanicked(
                        "every migration thread exited".into(),
                    ))
                }
            },
        };
        match ev {
            Event::Failed(e) | Event::PeerFailed(e) => Err(e.into()),
            ev => Ok(ev),
        }
    }

    /// Waits for the event `pick` selects, ignoring channel bookkeeping meanwhile.
    fn wait_for<T>(
        &mut self,
        mut pick: impl FnMut(Event) -> Option<T>,
    ) -> Result<T, MigrationError> {
        let deadline = Instant::now() + self.config.completion_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrationError::Timeout(self.config.completion_timeout));
            }
            match self.next_event(Some(left))? {
                Event::Ready(_) | Event::RoundSent(..) | Event::RoundAck(_) => {}
                ev => {
                    if let Some(v) = pick(ev) {
                        return Ok(v);
                    }
                }
            }
        }
    }
}

fn unexpected(ev: Event) -> MigrationError {
    let what = match ev {
        Event::Loaded(_) => "Loaded",
        Event::Resumed(_) => "Resumed",
        Event::RoundSent(..) => "RoundSent",
        Event::RoundAck(_) => "RoundAck",
        _ => "event",
    };
    MigrationError::Channel(ChannelError::Protocol {
        channel: ChannelName::Main,
        detail: format!("unexpected {what} during precopy"),
    })
}
