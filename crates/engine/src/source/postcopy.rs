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
    /// Pages the destination was told it must receive.
    pending: u64,
    resumed: bool,
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
        let pending = start.count();
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
        // The background push runs on its own thread (`lm-src-push`): the coordinator stays
        // free for the destination's Resumed and PostcopyComplete.
        let addrs: Vec<u64> = self.precopy.dirty.addrs().collect();
        let sent = self
            .push
            .as_ref()
            .is_some_and(|push| push.send((round + 1, addrs)).is_ok());
        if !sent {
            return Err(self.failure_cause());
        }
        Ok(Phase::Postcopy(PostcopyRun {
            pending,
            resumed: false,
        }))
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
            Event::PostcopyComplete(c) if run.resumed => self.finish_postcopy(&run, c),
            other => Err(unexpected(other)),
        }
    }

    fn finish_postcopy(
        &mut self,
        run: &PostcopyRun,
        c: PostcopyComplete,
    ) -> Result<Phase, MigrationError> {
        if c.pages != run.pending {
            return Err(MigrationError::Channel(
                crate::error::ChannelError::Protocol {
                    channel: ChannelName::Main,
                    detail: format!(
                        "the destination installed {} pages of the {} postcopy listed",
                        c.pages, run.pending
                    ),
                },
            ));
        }
        self.parts.postcopy = Some(crate::report::PostcopyReport {
            pages: run.pending,
            requested: self.postcopy.requested.load(Relaxed),
            dest_requested: c.requested,
            blocked_ms: c.blocked_us as f64 / 1e3,
            ms: self.parts.postcopy_started.map_or(0.0, |t| ms(t.elapsed())),
        });
        let loaded = livemig_wire::Loaded::default();
        Ok(Phase::Done(Box::new(self.report(&loaded))))
    }
}

/// The background push (`lm-src-push`, started with a postcopy session): waits for the
/// switch's list of pages, hands them to whichever data channel is free (paced to the
/// postcopy bandwidth), then ends every data channel with `PostcopyDone`. Ends at once when
/// the session ends without a switch, or when the channels stop.
pub(super) fn push(
    pages: Receiver<(u32, Vec<u64>)>,
    dispatch: Dispatcher,
    config: &MigrationConfig,
    cancel: &CancelToken,
) {
    let (round, addrs) = crossbeam_channel::select! {
        recv(pages) -> m => match m {
            Ok(m) => m,
            Err(_) => return,
        },
        recv(cancel.waiter()) -> _ => return,
    };
    let rate = config.max_postcopy_bandwidth.or(config.max_bandwidth_now());
    let start = Instant::now();
    let mut sent = 0u64;
    for batch in addrs.chunks(config.pages_per_packet as usize) {
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            let elapsed = start.elapsed();
            if due > elapsed && !cancel.sleep(due - elapsed) {
                return;
            }
        }
        sent += (batch.len() * PAGE_SIZE) as u64;
        let job = Job::Pages {
            round,
            addrs: batch.to_vec(),
        };
        if dispatch.send(job).is_err() {
            return;
        }
    }
    let _ = dispatch.broadcast(|| Job::PostcopyDone);
}
