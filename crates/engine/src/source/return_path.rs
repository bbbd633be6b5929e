//! The source's return-path thread: reads what the destination says on the main channel and
//! turns it into coordinator events.

use super::credit::CreditTable;
use super::sender::Job;
use super::Event;
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{
    Credit, FrameKind, Limits, Loaded, PageRequest, PostcopyComplete, Resumed, RoundAck,
};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};

/// Where the destination's page requests go in postcopy: the urgent channel's queue, with
/// the round number postcopy pages carry (set at the switch).
pub(crate) struct Urgent<'a> {
    pub queue: Sender<Job>,
    pub round: &'a AtomicU32,
    /// Pages requested so far.
    pub requested: &'a AtomicU64,
}

/// Reads the destination until it fails or is done; `acked` is set by its `SwitchoverAck`.
pub(crate) fn run(
    mut stream: Stream,
    events: Sender<Event>,
    (credits, acked): (&CreditTable, &AtomicBool),
    urgent: Option<Urgent<'_>>,
) {
    let limits = Limits::default();
    let mut buf = Vec::new();
    loop {
        let ev = match framed::recv(&mut stream, CH, &limits, &mut buf) {
            Ok(h) if h.kind == FrameKind::PageRequest => match request(&buf, urgent.as_ref()) {
                Ok(true) => continue,
                // The urgent channel is gone: the attempt is ending.
                Ok(false) => return,
                Err(e) => Event::PeerFailed(e),
            },
            Ok(h) if h.kind == FrameKind::SwitchoverAck => {
                acked.store(true, Relaxed);
                continue;
            }
            Ok(h) => match answer(h.kind, &buf, credits, urgent.is_some()) {
                Ok(Some(ev)) => ev,
                Ok(None) => continue,
                Err(e) => Event::PeerFailed(e),
            },
            Err(e) => Event::PeerFailed(e),
        };
        // In a postcopy session the destination still asks for pages after it resumed.
        let last = match ev {
            Event::PeerFailed(_) | Event::PostcopyComplete(_) => true,
            Event::Resumed => urgent.is_none(),
            _ => false,
        };
        if events.send(ev).is_err() || last {
            return;
        }
    }
}

const CH: ChannelName = ChannelName::Main;

fn wire(source: livemig_wire::WireError) -> ChannelError {
    ChannelError::Wire {
        channel: CH,
        source,
    }
}

/// A page request, straight to the urgent channel: it never waits behind the coordinator or
/// the background push. False once the urgent channel is gone.
fn request(buf: &[u8], urgent: Option<&Urgent<'_>>) -> Result<bool, ChannelError> {
    let Some(u) = urgent else {
        return Err(ChannelError::Protocol {
            channel: CH,
            detail: "a PageRequest in a session that is not in postcopy".into(),
        });
    };
    let req = PageRequest::decode(buf).map_err(wire)?;
    u.requested.fetch_add(req.addrs.len() as u64, Relaxed);
    let job = Job::Pages {
        round: u.round.load(Relaxed),
        addrs: req.addrs,
    };
    Ok(u.queue.send(job).is_ok())
}

/// What the destination said, as the coordinator's event (`None` for credit, which goes
/// straight into the credit table).
fn answer(
    kind: FrameKind,
    buf: &[u8],
    credits: &CreditTable,
    postcopy: bool,
) -> Result<Option<Event>, ChannelError> {
    Ok(Some(match kind {
        FrameKind::Loaded => Event::Loaded(Loaded::decode(buf).map_err(wire)?),
        FrameKind::RoundAck => Event::RoundAck(RoundAck::decode(buf).map_err(wire)?.round),
        FrameKind::Credit => {
            let c = Credit::decode(buf).map_err(wire)?;
            if !credits.grant(c.device as usize, c.up_to) {
                return Err(ChannelError::Protocol {
                    channel: CH,
                    detail: format!("credit for unknown device {}", c.device),
                });
            }
            return Ok(None);
        }
        FrameKind::Resumed => {
            Resumed::decode(buf).map_err(wire)?;
            Event::Resumed
        }
        FrameKind::PostcopyComplete if postcopy => {
            Event::PostcopyComplete(PostcopyComplete::decode(buf).map_err(wire)?)
        }
        other => {
            return Err(ChannelError::Protocol {
                channel: CH,
                detail: format!("unexpected {} frame on the return path", other.name()),
            })
        }
    }))
}
