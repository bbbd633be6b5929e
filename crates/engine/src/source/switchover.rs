//! Switchover: from here the guest is paused until the destination runs it. Device saves,
//! the RAM's last pass and the state save run at the same time; once all are in, the last
//! markers, the state and `Complete` go out.

use super::coordinator::{unexpected, Coordinator, Event, Phase};
use super::devices::{SaveError, SaveStats};
use super::precopy::RoundStartCounters;
use super::watchdog::Awaited;
use super::{GuestState, Vm};
use crate::device::{Device, DeviceError};
use crate::error::{ChannelName, MigrationError};
use crate::framed;
use crate::report::{ms, Progress};
use livemig_wire::{ChunkHeader, Complete, DeviceTransfer, FrameKind, VmStates};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// The guest's non-memory state and the non-iterable devices' blobs, saved at switchover.
pub(crate) struct SavedState {
    guest: Vec<u8>,
    vmstates: Vec<Vec<u8>>,
    /// How long the save took, milliseconds.
    pub(super) ms: f64,
}

impl SavedState {
    /// The guest's state and the small devices' blobs.
    pub(super) fn into_parts(self) -> (Vec<u8>, Vec<Vec<u8>>) {
        (self.guest, self.vmstates)
    }
}

/// The state-save worker's work: the guest's state, then every small device's blob.
pub(super) fn save_state(vm: Vm<'_>) -> Result<SavedState, MigrationError> {
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

/// The guest is paused; the saves are under way.
pub(super) struct Saving {
    /// Counters when the final round started (no final round before postcopy).
    before: Option<RoundStartCounters>,
    /// The saves lead to postcopy, not to the end of a switchover.
    postcopy: bool,
    /// Per streamed device (multifd), its save once it ended.
    devices: Vec<Option<SaveStats>>,
    state: Option<SavedState>,
}

impl Saving {
    /// Every save, once all are in; otherwise the wait goes on.
    fn done(&mut self) -> Option<Saved> {
        if self.devices.iter().any(Option::is_none) {
            return None;
        }
        Some(Saved {
            state: self.state.take()?,
            devices: std::mem::take(&mut self.devices)
                .into_iter()
                .flatten()
                .collect(),
            before: self.before.take(),
            postcopy: self.postcopy,
        })
    }

    /// The saves to wait for, as the configuration streams devices.
    pub(super) fn new(co: &Coordinator<'_>, postcopy: bool) -> Saving {
        let streamed = match co.config.device_transfer {
            DeviceTransfer::Multifd => co.vm.devices.len(),
            DeviceTransfer::Main => 0,
        };
        Saving {
            before: None,
            postcopy,
            devices: vec![None; streamed],
            state: None,
        }
    }
}

/// Every save of a switchover.
struct Saved {
    state: SavedState,
    devices: Vec<SaveStats>,
    before: Option<RoundStartCounters>,
    postcopy: bool,
}

impl Coordinator<'_> {
    /// Pauses the guest, takes the last dirty pass and hands the rest of the RAM out; the
    /// device and state saves, released by the pause, run meanwhile.
    pub(super) fn enter_switchover(&mut self, forced: bool) -> Result<Phase, MigrationError> {
        self.pause_guest(forced, false)?;
        self.arm_hard_limit();
        let before = self.send_pages(self.precopy.round, false)?;
        self.awaiting = "the device and state saves";
        self.parts.down.ram_final_ms = ms(self.parts.transfer_started.elapsed());
        let mut saving = Saving::new(self, false);
        saving.before = Some(before);
        Ok(Phase::Saving(saving))
    }

    /// The pause, for a switchover or the switch to postcopy: the guest's vCPUs stopped, the
    /// saves released, the dirty log read one last time (the pages still to send) and
    /// stopped. The guest is never paused longer than the switchover bound: past it, the
    /// attempt is torn down (and, before the handover, the guest runs on here).
    pub(super) fn pause_guest(
        &mut self,
        forced: bool,
        postcopy: bool,
    ) -> Result<(), MigrationError> {
        let guest = self.vm.guest;
        let parts = &mut self.parts;
        parts.precopy = self.precopy.start.elapsed();
        parts.forced = forced;
        parts.expected_downtime_ms = self
            .precopy
            .rounds
            .last()
            .map_or(0.0, |r| r.expected_downtime_ms);
        (self.progress)(&Progress::Switchover {
            remaining_pages: self.precopy.dirty.count(),
            expected_downtime_ms: parts.expected_downtime_ms,
            forced,
            postcopy,
        });
        self.watchdog
            .arm(Awaited::Switchover, self.config.switchover_timeout);
        parts.paused_at = Instant::now();
        // A guest its operator stopped is paused already, and stays so.
        if !self.config.guest_paused {
            guest.pause()?;
        }
        *self.state = GuestState::Paused;
        if let Some(gate) = &self.config.pause_before_switchover {
            self.hold_switchover(gate)?;
        }
        let parts = &mut self.parts;
        self.switchover.start();
        parts.down.pause_ms = ms(parts.paused_at.elapsed());
        let t = Instant::now();
        if self.precopy.copy_ram {
            guest.sync_dirty_log(&mut self.precopy.dirty)?;
            guest.stop_dirty_log()?;
        }
        parts.down.last_dirty_pass_ms = ms(t.elapsed());
        parts.transfer_started = Instant::now();
        Ok(())
    }

    /// `pause_before_switchover`: the guest paused, waits for the gate (the switchover bound
    /// waits too); a failure or a cancel meanwhile ends the attempt (the guest runs on here).
    fn hold_switchover(
        &mut self,
        gate: &crate::recovery::Mailbox<()>,
    ) -> Result<(), MigrationError> {
        self.watchdog.disarm();
        (self.progress)(&Progress::PreSwitchover);
        loop {
            crossbeam_channel::select! {
                recv(gate.receiver()) -> _ => break,
                recv(self.cancel.waiter()) -> _ => return Err(self.failure_cause()),
                recv(self.events) -> ev => {
                    // Nothing is due now but a failure (a lost destination).
                    self.check(ev.map_err(|_| MigrationError::ThreadsGone)?)?;
                }
            }
        }
        (self.progress)(&Progress::SavingDevices);
        self.watchdog
            .arm(Awaited::Switchover, self.config.switchover_timeout);
        Ok(())
    }

    /// The saves' endings; a channel's marker or ack of the round before may still come.
    pub(super) fn on_save_event(
        &mut self,
        mut s: Saving,
        ev: Event,
    ) -> Result<Phase, MigrationError> {
        match ev {
            Event::DeviceDone(i, Ok(stats)) if (i as usize) < s.devices.len() => {
                s.devices[i as usize] = Some(stats)
            }
            Event::DeviceDone(_, Err(SaveError::Device(e))) => return Err(e.into()),
            Event::DeviceDone(_, Err(SaveError::Stopped)) => return Err(self.failure_cause()),
            Event::StateSaved(r) => s.state = Some(r?),
            Event::RoundSent(_) | Event::RoundAck(_) => {}
            other => return Err(unexpected(other)),
        }
        match s.done() {
            Some(Saved {
                state,
                devices,
                postcopy: true,
                ..
            }) => self.start_postcopy(state, devices),
            Some(Saved {
                state,
                devices,
                before: Some(before),
                ..
            }) => self.finish_switchover(state, devices, before),
            Some(Saved { before: None, .. }) => Err(MigrationError::Channel(
                crate::error::ChannelError::Protocol {
                    channel: ChannelName::Main,
                    detail: "a switchover without its final round".into(),
                },
            )),
            None => Ok(Phase::Saving(s)),
        }
    }

    /// Everything is saved: the last markers, serial mode's device streams, the state and
    /// `Complete`.
    fn finish_switchover(
        &mut self,
        saved: SavedState,
        devices: Vec<SaveStats>,
        before: RoundStartCounters,
    ) -> Result<Phase, MigrationError> {
        let down = &mut self.parts.down;
        down.state_save_ms = saved.ms;
        down.device_save_ms = devices.iter().map(|s| s.final_ms).fold(0.0, f64::max);
        self.parts.device_stats = devices;
        let round = self.precopy.round;
        self.awaiting = "the destination to load the state";
        // The destination's Loaded says when the last round is in: no wait for its markers.
        self.end_marker(round, true)?;
        let mut last = self.round_report(round, &before, self.parts.transfer_started);
        last.throttle_percent = self.precopy.converge.throttle;
        self.precopy.rounds.push(last);
        self.send_serial_devices()?;
        let main = ChannelName::Main;
        framed::send(&mut self.main, main, FrameKind::GuestState, &saved.guest)?;
        let vmstates = VmStates {
            blobs: saved.vmstates,
        };
        framed::send(
            &mut self.main,
            main,
            FrameKind::VmStates,
            &vmstates.encode(),
        )?;
        let complete = Complete { rounds: round + 1 };
        framed::send(
            &mut self.main,
            main,
            FrameKind::Complete,
            &complete.encode(),
        )?;
        Ok(Phase::AwaitLoaded)
    }

    /// The serial baseline, when configured: each device's whole stream in turn on the main
    /// channel.
    pub(super) fn send_serial_devices(&mut self) -> Result<(), MigrationError> {
        if self.config.device_transfer != DeviceTransfer::Main {
            return Ok(());
        }
        let t = Instant::now();
        for (i, d) in self.vm.devices.iter().enumerate() {
            self.send_device_on_main(i as u16, *d)?;
        }
        self.parts.down.device_save_ms = ms(t.elapsed());
        Ok(())
    }

    /// The serial baseline: a device's whole stream on the main channel.
    fn send_device_on_main(&mut self, index: u16, d: &dyn Device) -> Result<(), MigrationError> {
        let chunk = self.config.chunk_size as usize;
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
                device: index,
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
                return Ok(());
            }
        }
    }
}
