//! The source's return-path thread: reads what the destination says on the main channel and
//! turns it into coordinator events.

use super::credit::CreditTable;
use super::Event;
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{Credit, FrameKind, Limits, Loaded, Resumed, RoundAck};

pub(crate) fn run(mut stream: Stream, events: Sender<Event>, credits: &CreditTable) {
    let ch = ChannelName::Main;
    let limits = Limits::default();
    let mut buf = Vec::new();
    loop {
        let ev = match framed::recv(&mut stream, ch, &limits, &mut buf) {
            Ok(h) => match h.kind {
                FrameKind::Loaded => {
                    Loaded::decode(&buf)
                        .map(Event::Loaded)
                        .unwrap_or_else(|source| {
                            Event::PeerFailed(ChannelError::Wire {
                                channel: ch,
                                source,
                            })
                        })
                }
                FrameKind::RoundAck => RoundAck::decode(&buf)
                    .map(|a| Event::RoundAck(a.round))
                    .unwrap_or_else(|source| {
                        Event::PeerFailed(ChannelError::Wire {
                            channel: ch,
                            source,
                        })
                    }),
                FrameKind::Credit => match Credit::decode(&buf) {
                    Ok(c) if credits.grant(c.device as usize, c.up_to) => continue,
                    Ok(c) => Event::PeerFailed(ChannelError::Protocol {
                        channel: ch,
                        detail: format!("credit for unknown device {}", c.device),
                    }),
                    Err(source) => Event::PeerFailed(ChannelError::Wire {
                        channel: ch,
                        source,
                    }),
                },
                FrameKind::Resumed => Resumed::decode(&buf)
                    .map(|_| Event::Resumed)
                    .unwrap_or_else(|source| {
                        Event::PeerFailed(ChannelError::Wire {
                            channel: ch,
                            source,
                        })
                    }),
                other => Event::PeerFailed(ChannelError::Protocol {
                    channel: ch,
                    detail: format!("unexpected {} frame on the return path", other.name()),
                }),
            },
            Err(e) => Event::PeerFailed(e),
        };
        let last = matches!(ev, Event::PeerFailed(_) | Event::Resumed);
        if events.send(ev).is_err() || last {
            return;
        }
    }
}
