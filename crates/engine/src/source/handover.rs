//! Handover: the destination has loaded everything; it is told to run the guest and says
//! when it does. From the Handover on, the guest must never run here again.

use super::coordinator::{out_of_order, Coordinator, Event, Phase};
use super::watchdog::Awaited;
use super::GuestState;
use crate::error::{ChannelName, MigrationError};
use crate::framed;
use crate::report::ms;
use livemig_wire::{FrameKind, Loaded};
use std::time::Instant;

/// Handover sent, after the destination's Loaded.
pub(super) struct HandedOver {
    loaded: Loaded,
    at: Instant,
}

impl Coordinator<'_> {
    /// Waiting for Loaded; a channel's marker or ack may still come meanwhile.
    pub(super) fn on_loaded(&mut self, ev: Event) -> Result<Phase, MigrationError> {
        let loaded = match ev {
            Event::RoundSent(_) | Event::RoundAck(_) => return Ok(Phase::AwaitLoaded),
            Event::Loaded(l) => l,
            other => return Err(out_of_order(other, "Loaded")),
        };
        let at = Instant::now();
        // From the handover on the switchover cannot be taken back.
        self.hard_deadline = None;
        // Told to run the guest, a live destination says so at once.
        self.watchdog
            .arm(Awaited::Resumed, self.accept.peer_timeout());
        let down = &mut self.parts.down;
        down.dest_restore_ms = loaded.restore_us as f64 / 1e3;
        down.dest_verify_ms = loaded.verify_us as f64 / 1e3;
        down.transfer_ms =
            ms(at - self.parts.transfer_started) - down.dest_restore_ms - down.dest_verify_ms;
        let handover = livemig_wire::Handover {
            keep_paused: self.config.guest_paused,
        };
        framed::send(
            &mut self.main,
            ChannelName::Main,
            FrameKind::Handover,
            &handover.encode(),
        )?;
        *self.state = GuestState::HandedOver;
        Ok(Phase::AwaitResumed(HandedOver { loaded, at }))
    }

    /// Waiting for Resumed: the guest runs on the destination.
    pub(super) fn on_resumed(&mut self, h: HandedOver, ev: Event) -> Result<Phase, MigrationError> {
        match ev {
            Event::RoundSent(_) | Event::RoundAck(_) => Ok(Phase::AwaitResumed(h)),
            Event::Resumed => {
                self.watchdog.disarm();
                self.parts.down.resume_ms = ms(h.at.elapsed());
                Ok(Phase::Done(Box::new(self.report(&h.loaded))))
            }
            other => Err(out_of_order(other, "Resumed")),
        }
    }
}
