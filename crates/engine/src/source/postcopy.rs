//! Postcopy on the source: the guest is paused, its devices' streams and state go out as at
//! a switchover, then `PostcopyStart` lists the pages the destination does not hold in their
//! final version, and the destination runs the guest at once. Those pages follow: requested
//! ones on the urgent channel (the return path hands requests straight to it), the rest
//! pushed in the background on the data channels. From `PostcopyStart` on the guest's
//! memory is split between the hosts: the source never resumes its copy, and keeps it until
//! the destination says every page is installed (`PostcopyComplete`).

use super::coordinator::{unexpected, Coordinator, Event, Phase};
use super::devices::SaveStats;
use super::dispatch::Dispatcher;
use super::recover::ResumePoint;
use super::sender::Job;
use super::switchover::{SavedState, Saving};
use super::GuestState;
use crate::cancel::CancelToken;
use crate::config::MigrationConfig;
use crate::error::{ChannelName, MigrationError};
use crate::framed;
use crate::report::ms;
use crossbeam_channel::Receiver;
use livemig_wire::{FrameKind, PostcopyComplete, PostcopyStart, VmStates, PAGE_SIZE};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Postcopy under way.
pub(super) struct PostcopyRun {
    /// The destination said it runs the guest.
    resumed: bool,
}

impl PostcopyRun {
    /// Whether the destination said it runs the guest.
    pub fn resumed(&self) -> bool {
        self.resumed
    }
}

impl Coordinator<'_> {
    /// Pauses the guest for the switch to postcopy: the last dirty pass makes the list of
    /// pages still to send; the device and state saves run as at a switchover.
    pub(super) fn enter_postcopy(&mut self) -> Result<Phase, MigrationError> {
        self.pause_guest(false, true)?;
        Ok(Phase::Saving(Saving::new(self, true)))
    }

    /// Every save is in: the last precopy markers, the state, `PostcopyStart`; then every
    /// listed page is handed to the data channels, and each ends with `PostcopyDone`.
    pub(super) fn start_postcopy(
        &mut self,
        saved: SavedState,
        devices: Vec<SaveStats>,
    ) -> Result<Phase, MigrationError> {
        self.parts.down.state_save_ms = saved.ms;
        self.parts.down.device_save_ms = devices.iter().map(|s| s.final_ms).fold(0.0, f64::max);
        self.parts.device_stats = devices;
        let round = self.precopy.round;
        self.end_marker(round, true)?;
        self.send_serial_devices()?;
        let (guest_state, vmstates) = saved.into_parts();
        let main = ChannelName::Main;
        framed::send(&mut self.main, main, FrameKind::GuestState, &guest_state)?;
        let blobs = VmStates { blobs: vmstates };
        framed::send(&mut self.main, main, FrameKind::VmStates, &blobs.encode())?;
        let mut start = PostcopyStart::new(round + 1, self.precopy.dirty.ranges());
        for addr in self.precopy.dirty.addrs() {
            start.insert(addr);
        }
        self.parts.postcopy_pages = start.count();
        self.postcopy.round.store(round + 1, Relaxed);
        framed::send(
            &mut self.main,
            main,
            FrameKind::PostcopyStart,
            &start.encode(),
        )?;
        // From here the destination may run the guest: this copy must never run again.
        *self.state = GuestState::HandedOver;
        self.parts.postcopy_started = Some(Instant::now());
        let addrs: Vec<u64> = self.precopy.dirty.addrs().collect();
        self.push_pages(round + 1, addrs)?;
        Ok(Phase::Postcopy(PostcopyRun { resumed: false }))
    }

    /// A session resuming a broken postcopy (`recover.rs`): the guest runs on the
    /// destination already; the pages it still misses are pushed, its requests answered.
    pub(super) fn resume_postcopy(
        &mut self,
        point: ResumePoint,
        missing: PostcopyStart,
    ) -> Result<Phase, MigrationError> {
        self.parts = point.parts;
        self.parts.postcopy_recoveries += 1;
        self.precopy.rounds = point.rounds;
        *self.state = GuestState::HandedOver;
        self.push_pages(point.round, missing.addrs().collect())?;
        Ok(Phase::Postcopy(PostcopyRun { resumed: true }))
    }

    /// Hands the pages to the background push, which runs on its own thread
    /// (`lm-src-push`): the coordinator stays free for the destination's Resumed and
    /// PostcopyComplete.
    fn push_pages(&mut self, round: u32, addrs: Vec<u64>) -> Result<(), MigrationError> {
        let order = PushOrder {
            round,
            addrs,
            measured: self.precopy.rounds.last().map(|r| r.bytes_per_s),
        };
        let sent = self
            .push
            .as_ref()
            .is_some_and(|push| push.send(order).is_ok());
        if !sent {
            return Err(self.failure_cause());
        }
        Ok(())
    }

    /// The destination refused the switch before it ran the guest (its `Reject` came before
    /// any `Resumed`, on the same ordered channel): its copy never ran, this one has every
    /// page, so the guest is this side's again and runs on here (as after a failed
    /// switchover). The push and the urgent channel may have sent pages: to a guest that is
    /// dropped.
    pub(super) fn take_back(&mut self, e: MigrationError) -> MigrationError {
        *self.state = GuestState::Paused;
        self.parts.postcopy_started = None;
        e
    }

    /// Postcopy's events: the destination runs the guest (`Resumed`), then has every page.
    pub(super) fn on_postcopy_event(
        &mut self,
        mut run: PostcopyRun,
        ev: Event,
    ) -> Result<Phase, MigrationError> {
        match ev {
            Event::RoundSent(_) | Event::RoundAck(_) => Ok(Phase::Postcopy(run)),
            Event::Resumed if !run.resumed => {
                self.watchdog.disarm();
                run.resumed = true;
                let down = &mut self.parts.down;
                down.resume_ms = ms(self.parts.transfer_started.elapsed());
                self.parts.resumed_at = Some(Instant::now());
                Ok(Phase::Postcopy(run))
            }
            Event::PostcopyComplete(c) if run.resumed => self.finish_postcopy(c),
            other => Err(unexpected(other)),
        }
    }

    fn finish_postcopy(&mut self, c: PostcopyComplete) -> Result<Phase, MigrationError> {
        let pending = self.parts.postcopy_pages;
        if c.pages != pending {
            return Err(MigrationError::Channel(
                crate::error::ChannelError::Protocol {
                    channel: ChannelName::Main,
                    detail: format!(
                        "the destination installed {} pages of the {} postcopy listed",
                        c.pages, pending
                    ),
                },
            ));
        }
        self.parts.postcopy = Some(crate::report::PostcopyReport {
            pages: pending,
            requested: self.counters.postcopy_requests.load(Relaxed),
            dest_requested: c.requested,
            blocked_ms: c.blocked_us as f64 / 1e3,
            ms: self.parts.postcopy_started.map_or(0.0, |t| ms(t.elapsed())),
            recoveries: self.parts.postcopy_recoveries,
        });
        let loaded = livemig_wire::Loaded::default();
        Ok(Phase::Done(Box::new(self.report(&loaded))))
    }
}

/// What the background push is handed at the switch (or at a resume): the round postcopy
/// pages carry, the pages, and the rate precopy measured end to end (bytes per second), if
/// a round ran.
pub(super) struct PushOrder {
    pub round: u32,
    pub addrs: Vec<u64>,
    pub measured: Option<f64>,
}

/// The share of precopy's measured rate the push keeps to when no bandwidth is configured:
/// a push at the link's full rate fills the link's queue, and every requested page (on the
/// urgent channel, through the same link) would wait behind it.
const PUSH_HEADROOM: f64 = 0.95;

/// Pages per packet of a push paced to the measured rate: what a channel writes at once
/// queues on the link at once, so a requested page waits behind at most this much (128 KiB,
/// 1 ms at 1 Gbit/s).
const PACED_PUSH_PAGES: usize = 32;

/// The background push (`lm-src-push`, started with a postcopy session): waits for the
/// switch's list of pages, hands them to whichever data channel is free (paced to the
/// postcopy bandwidth, or, with none configured, a little below the rate precopy measured,
/// in small packets, so requested pages find the link's queue short), then ends every data
/// channel with `PostcopyDone`. Ends at once when the session ends without a switch, or
/// when the channels stop.
pub(super) fn push(
    orders: Receiver<PushOrder>,
    dispatch: Dispatcher,
    config: &MigrationConfig,
    cancel: &CancelToken,
) {
    let order = crossbeam_channel::select! {
        recv(orders) -> m => match m {
            Ok(m) => m,
            Err(_) => return,
        },
        recv(cancel.waiter()) -> _ => return,
    };
    let configured = config.max_postcopy_bandwidth.or(config.max_bandwidth_now());
    let headroom = order
        .measured
        .filter(|r| *r > 0.0)
        .map(|r| (r * PUSH_HEADROOM) as u64);
    let rate = configured.or(headroom);
    let per = match (configured, headroom) {
        (None, Some(_)) => PACED_PUSH_PAGES.min(config.pages_per_packet as usize),
        _ => config.pages_per_packet as usize,
    };
    let start = Instant::now();
    let mut sent = 0u64;
    for batch in order.addrs.chunks(per) {
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            let elapsed = start.elapsed();
            if due > elapsed && !cancel.sleep(due - elapsed) {
                return;
            }
        }
        sent += (batch.len() * PAGE_SIZE) as u64;
        let job = Job::Pages {
            round: order.round,
            addrs: batch.to_vec(),
        };
        if dispatch.send(job).is_err() {
            return;
        }
    }
    let _ = dispatch.broadcast(|| Job::PostcopyDone);
}
