//! The Receiving phase: while the data channels write pages and the loaders load device
//! chunks, the coordinator collects the main channel's messages, passes each round's end and
//! each loader's credit back to the source, and waits for the end of everything.

use super::coordinator::Phase;
use super::session::{Session, Shared};
use super::{protocol, Event};
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::hostmem::TornPages;
use crate::report::IncomingEvent;
use crate::transport::Stream;
use livemig_wire::{Complete, Credit, DeviceLoadStats, FrameKind, RoundAck};
use std::time::{Duration, Instant};

/// What has come so far.
pub(super) struct Receiving {
    channels: usize,
    peer_timeout: Duration,
    state: Option<Vec<u8>>,
    vmstates: Option<Vec<u8>>,
    /// Complete (or, in postcopy, PostcopyStart), and when it came.
    complete: Option<(End, Instant)>,
    channels_done: usize,
    /// The rounds the data channels carried.
    rounds: u32,
    device_stats: Vec<Option<DeviceLoadStats>>,
    /// Set once every data channel has seen its last round: Complete is then due.
    complete_due: Option<Instant>,
    /// `SwitchoverAck` sent (at most once a session).
    acked: bool,
}

/// How the source ended the stream: every page sent (Complete), or a switch to postcopy
/// with the pages it will still send.
pub(super) enum End {
    Complete(Complete),
    Postcopy(livemig_wire::PostcopyStart),
}

impl End {
    fn rounds(&self) -> u32 {
        match self {
            End::Complete(c) => c.rounds,
            End::Postcopy(p) => p.rounds,
        }
    }
}

/// Everything received, checked against what the source says it sent.
pub(super) struct Received {
    /// Postcopy: the pages still to come.
    pub postcopy: Option<livemig_wire::PostcopyStart>,
    /// The guest's own state.
    pub state: Vec<u8>,
    /// The small devices' blobs, encoded.
    pub vmstates: Vec<u8>,
    pub rounds: u32,
    /// From Complete to the last of everything.
    pub drain: Duration,
    /// Every streamed device's load, in device order.
    pub device_stats: Vec<DeviceLoadStats>,
}

/// Every part in (what [`Receiving::finish`] takes), not yet checked.
struct Gathered {
    complete: End,
    drain: Duration,
    state: Option<Vec<u8>>,
    vmstates: Option<Vec<u8>>,
    rounds: u32,
    device_stats: Vec<DeviceLoadStats>,
}

impl Receiving {
    pub fn new(channels: usize, devices: usize, peer_timeout: Duration) -> Self {
        Receiving {
            channels,
            peer_timeout,
            state: None,
            vmstates: None,
            complete: None,
            channels_done: 0,
            rounds: 0,
            device_stats: vec![None; devices],
            complete_due: None,
            acked: false,
        }
    }

    /// Complete's deadline, once every data channel has seen its last round.
    pub fn deadline(&self) -> Option<(Instant, &'static str)> {
        match (&self.complete, self.complete_due) {
            (None, Some(at)) => Some((at, "Complete")),
            _ => None,
        }
    }

    /// Takes `ev`; moves on to Loading once everything has come.
    pub fn step(
        mut self,
        ev: Event,
        s: &Session<'_>,
        shared: &Shared,
        main: &mut Stream,
    ) -> Result<Phase, IncomingError> {
        self.take(ev, s, main)?;
        self.ack_when_ready(s, main)?;
        match self.finish() {
            Some(all) => all.check(&shared.torn).map(Phase::Loading),
            None => Ok(Phase::Receiving(self)),
        }
    }

    /// `switchover-ack`: once every device twin is ready, the source is told, once.
    fn ack_when_ready(&mut self, s: &Session<'_>, main: &mut Stream) -> Result<(), IncomingError> {
        if !s.switchover_ack || self.acked || !s.devices.iter().all(|d| d.switchover_ready()) {
            return Ok(());
        }
        self.acked = true;
        framed::send(main, ChannelName::Main, FrameKind::SwitchoverAck, &[])?;
        Ok(())
    }

    fn take(&mut self, ev: Event, s: &Session<'_>, main: &mut Stream) -> Result<(), IncomingError> {
        match ev {
            Event::ChannelDone(r) => {
                self.channels_done += 1;
                self.rounds = r;
                if self.channels_done == self.channels {
                    self.complete_due = Some(Instant::now() + self.peer_timeout);
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
            // The loaders are numbered by the session's own device list.
            Event::LoaderDone(d, stats) => self.device_stats[d as usize] = Some(stats),
            Event::State(state) => self.state = Some(state),
            Event::VmStates(v) => self.vmstates = Some(v),
            Event::RoundStart(r) => (s.log)(&IncomingEvent::RoundStarted {
                round: r.round,
                pages: r.pages,
            }),
            Event::Complete(c) => self.complete = Some((End::Complete(c), Instant::now())),
            Event::PostcopyStart(p) => self.complete = Some((End::Postcopy(p), Instant::now())),
            Event::Handover(_) => return Err(protocol("Handover before Loaded")),
            Event::PageWanted(_) | Event::PostcopyChannelDone => {
                return Err(protocol("postcopy traffic before PostcopyStart"))
            }
        }
        Ok(())
    }

    /// Every part, once Complete, every data channel's last round and every loader's end
    /// have come.
    fn finish(&mut self) -> Option<Gathered> {
        if self.channels_done < self.channels {
            return None;
        }
        let device_stats = self
            .device_stats
            .iter()
            .cloned()
            .collect::<Option<Vec<_>>>()?;
        let (complete, at) = self.complete.take()?;
        Some(Gathered {
            complete,
            drain: at.elapsed(),
            state: self.state.take(),
            vmstates: self.vmstates.take(),
            rounds: self.rounds,
            device_stats,
        })
    }
}

impl Gathered {
    /// What came, checked: no page still torn, the rounds the source says it sent, the
    /// guest's and the small devices' state present.
    fn check(self, torn: &TornPages) -> Result<Received, IncomingError> {
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
        if self.complete.rounds() != self.rounds {
            return Err(protocol(&format!(
                "source sent {} rounds, data channels carried {}",
                self.complete.rounds(),
                self.rounds
            )));
        }
        Ok(Received {
            postcopy: match self.complete {
                End::Postcopy(p) => Some(p),
                End::Complete(_) => None,
            },
            state: self
                .state
                .ok_or_else(|| protocol("Complete without GuestState"))?,
            vmstates: self
                .vmstates
                .ok_or_else(|| protocol("Complete without VmStates"))?,
            rounds: self.rounds,
            drain: self.drain,
            device_stats: self.device_stats,
        })
    }
}
