//! The destination's main-channel reader thread (`lm-dst-main`). In serial mode it also
//! receives the device chunks, waiting for each device's loader to make room (the main
//! channel's own TCP backpressure then holds the source back).

use super::streams::Streams;
use super::{receiver, Event, Failure, Heard};
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{Complete, FrameKind, Limits, RoundStart};

const CH: ChannelName = ChannelName::Main;

/// Reads the main channel until Handover, a failure, or the coordinator is gone.
pub(super) fn read_main(
    mut stream: Stream,
    limits: Limits,
    events: Sender<Heard>,
    streams: &Streams,
    serial: bool,
) {
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    loop {
        let heard = match next_frame(&mut stream, &limits, &mut seen, streams, serial, &mut buf) {
            // A device chunk, handed to its stream.
            Ok(None) => continue,
            Ok(Some(ev)) => Ok(ev),
            Err(e) => Err(Failure::Main(e)),
        };
        let stop = matches!(heard, Err(_) | Ok(Event::Handover));
        if events.send(heard).is_err() || stop {
            return;
        }
    }
}

/// What has come so far: each of these at most once, and after Complete only Handover.
#[derive(Default)]
struct Seen {
    state: bool,
    vmstates: bool,
    complete: bool,
}

impl Seen {
    /// Refuses a frame that may not come now, before its payload is read.
    fn admit(&mut self, kind: FrameKind, serial: bool) -> Result<(), ChannelError> {
        let dup = match kind {
            FrameKind::GuestState => std::mem::replace(&mut self.state, true),
            FrameKind::VmStates => std::mem::replace(&mut self.vmstates, true),
            FrameKind::Complete => std::mem::replace(&mut self.complete, true),
            FrameKind::Handover | FrameKind::Reject => false,
            FrameKind::DeviceChunk => !serial || self.complete,
            _ => self.complete,
        };
        if dup {
            return Err(ChannelError::Protocol {
                channel: CH,
                detail: format!(
                    "unexpected {} frame on the main channel at this point",
                    kind.name()
                ),
            });
        }
        Ok(())
    }
}

/// The next frame's event, or `None` for a device chunk (serial mode), given to its stream.
fn next_frame(
    stream: &mut Stream,
    limits: &Limits,
    seen: &mut Seen,
    streams: &Streams,
    serial: bool,
    buf: &mut Vec<u8>,
) -> Result<Option<Event>, ChannelError> {
    let h = framed::recv_header(stream, CH, limits)?;
    seen.admit(h.kind, serial)?;
    if h.kind == FrameKind::DeviceChunk {
        receiver::receive_chunk(stream, CH, &h, streams, true)?;
        return Ok(None);
    }
    framed::recv_payload(stream, CH, &h, buf)?;
    let wire = |source| ChannelError::Wire {
        channel: CH,
        source,
    };
    Ok(Some(match h.kind {
        FrameKind::GuestState => Event::State(std::mem::take(buf)),
        FrameKind::VmStates => Event::VmStates(std::mem::take(buf)),
        FrameKind::RoundStart => Event::RoundStart(RoundStart::decode(buf).map_err(wire)?),
        FrameKind::Complete => Event::Complete(Complete::decode(buf).map_err(wire)?),
        FrameKind::Handover => Event::Handover,
        other => {
            return Err(ChannelError::Protocol {
                channel: CH,
                detail: format!("unexpected {} frame on the main channel", other.name()),
            })
        }
    }))
}
