//! The destination's main-channel reader thread (`lm-dst-main`). In serial mode it also
//! receives the device chunks, waiting for each device's loader to make room (the main
//! channel's own TCP backpressure then holds the source back).

use super::streams::Streams;
use super::{receiver, Event, Failure, Heard};
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{
    Complete, FrameHeader, FrameKind, Handover, Limits, MemoryRange, PostcopyStart, RoundStart,
};

const CH: ChannelName = ChannelName::Main;

/// Reads the main channel until Handover, a failure, or the coordinator is gone.
pub(super) fn read_main(
    mut stream: Stream,
    limits: Limits,
    events: Sender<Heard>,
    streams: &Streams,
    serial: bool,
    postcopy: Option<&[MemoryRange]>,
) {
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    let how = How {
        limits: &limits,
        streams,
        serial,
        postcopy,
    };
    loop {
        let heard = match next_frame(&mut stream, &how, &mut seen, &mut buf) {
            // A device chunk, handed to its stream.
            Ok(None) => continue,
            Ok(Some(ev)) => Ok(ev),
            Err(e) => Err(Failure::Main(e)),
        };
        let stop = matches!(
            heard,
            Err(_) | Ok(Event::Handover(_)) | Ok(Event::PostcopyStart(_))
        );
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
            // Complete and PostcopyStart each end the session's stream: one of them, once.
            FrameKind::Complete | FrameKind::PostcopyStart => {
                std::mem::replace(&mut self.complete, true)
            }
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

/// How the main channel is read: limits, device streams (serial mode), and the guest's
/// ranges when the session may switch to postcopy.
struct How<'a> {
    limits: &'a Limits,
    streams: &'a Streams,
    serial: bool,
    postcopy: Option<&'a [MemoryRange]>,
}

/// The next frame's event, or `None` for a device chunk (serial mode), given to its stream.
fn next_frame(
    stream: &mut Stream,
    how: &How<'_>,
    seen: &mut Seen,
    buf: &mut Vec<u8>,
) -> Result<Option<Event>, ChannelError> {
    let h = framed::recv_header(stream, CH, how.limits)?;
    seen.admit(h.kind, how.serial)?;
    if h.kind == FrameKind::DeviceChunk {
        receiver::receive_chunk(stream, CH, &h, how.streams, true)?;
        return Ok(None);
    }
    if h.kind == FrameKind::PostcopyStart {
        return postcopy_start(stream, &h, how.postcopy, buf).map(Some);
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
        FrameKind::Handover => Event::Handover(Handover::decode(buf).map_err(wire)?),
        other => {
            return Err(ChannelError::Protocol {
                channel: CH,
                detail: format!("unexpected {} frame on the main channel", other.name()),
            })
        }
    }))
}

/// A `PostcopyStart`: only in a session that may switch, and only as long as the guest's
/// own ranges make it (checked before its payload is read).
fn postcopy_start(
    stream: &mut Stream,
    h: &FrameHeader,
    ranges: Option<&[MemoryRange]>,
    buf: &mut Vec<u8>,
) -> Result<Event, ChannelError> {
    let Some(ranges) = ranges else {
        return Err(ChannelError::Protocol {
            channel: CH,
            detail: "PostcopyStart in a session that may not switch to postcopy".into(),
        });
    };
    let want = PostcopyStart::payload_len(ranges);
    if h.len as u64 != want {
        return Err(ChannelError::Protocol {
            channel: CH,
            detail: format!(
                "PostcopyStart of {} bytes; this guest's ranges make {want}",
                h.len
            ),
        });
    }
    framed::recv_payload(stream, CH, h, buf)?;
    let start = PostcopyStart::decode(buf, ranges).map_err(|source| ChannelError::Wire {
        channel: CH,
        source,
    })?;
    Ok(Event::PostcopyStart(start))
}
