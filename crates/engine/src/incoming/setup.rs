//! Accepting a session: the main channel's hello, then each data channel's handshake.
//!
//! A connection that is not what we wait for (a foreign session, a duplicate or out-of-range
//! channel index, garbage) is refused with a Reject naming why, and waiting goes on: a stray
//! connection must not fail a migration that is under way.

use crate::cancel::CancelToken;
use crate::config::IncomingConfig;
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::transport::{Listener, Stream};
use livemig_wire::{ChannelHello, FrameKind, Reject, RejectCode, SessionAccept, SessionHello};
use std::time::Instant;

/// Waits for a connection that opens a session, refusing anything else.
pub(crate) fn accept_session(
    listener: &Listener,
    config: &IncomingConfig,
    log: &dyn Fn(String),
) -> Result<(SessionHello, Stream), IncomingError> {
    let ch = ChannelName::Incoming;
    loop {
        let s = listener
            .accept_cancellable(None, Some(&config.cancel))
            .map_err(|e| {
                if config.cancel.is_cancelled() {
                    IncomingError::Cancelled
                } else {
                    IncomingError::Accept(e)
                }
            })?;
        let Some(mut s) = secure(s, config, Some(&config.cancel), log)? else {
            continue;
        };
        let _ = s.set_read_timeout(Some(config.handshake_timeout));
        let mut buf = Vec::new();
        let refused = match framed::recv(&mut s, ch, &config.limits, &mut buf) {
            Ok(h) if h.kind == FrameKind::SessionHello => match SessionHello::decode(&buf) {
                Ok(hello) => match check_hello(&hello, config) {
                    Ok(()) => {
                        let _ = s.set_read_timeout(None);
                        return Ok((hello, s));
                    }
                    Err(reject) => reject,
                },
                Err(e) => Reject::new(RejectCode::Protocol, format!("bad SessionHello: {e}")),
            },
            Ok(h) => Reject::new(
                RejectCode::UnknownSession,
                format!(
                    "no session is open; a {} frame cannot start one",
                    h.kind.name()
                ),
            ),
            Err(e) => Reject::new(RejectCode::Protocol, plain_refusal(e)),
        };
        log(format!("refused a connection: {}", refused.reason));
        framed::send_reject(&mut s, ch, &refused);
    }
}

/// With TLS, runs the handshake on an accepted connection (within the handshake timeout).
/// A connection that fails it (no client certificate, one from another CA, not TLS) is
/// refused at the TLS layer and logged, and `None` says to wait for the next.
fn secure(
    s: Stream,
    config: &IncomingConfig,
    cancel: Option<&CancelToken>,
    log: &dyn Fn(String),
) -> Result<Option<Stream>, IncomingError> {
    let Some(tls) = &config.tls else {
        return Ok(Some(s));
    };
    match tls.accept(s, config.handshake_timeout, cancel) {
        Ok(s) => Ok(Some(s)),
        Err(_) if cancel.is_some_and(CancelToken::is_cancelled) => Err(IncomingError::Cancelled),
        Err(e) => {
            log(format!("refused a connection: {e}"));
            Ok(None)
        }
    }
}

/// Why a connection's first frame was refused; a TLS hello at a destination without TLS
/// is named as such.
fn plain_refusal(e: ChannelError) -> String {
    match &e {
        // A TLS record header: handshake (0x16), version 3.x.
        ChannelError::Wire {
            source: livemig_wire::WireError::BadMagic { found, .. },
            ..
        } if found & 0xffff == 0x0316 => {
            "a TLS client hello: this destination does not use TLS (start it with --tls-cert, --tls-key and --tls-ca)".into()
        }
        _ => e.to_string(),
    }
}

fn check_hello(hello: &SessionHello, config: &IncomingConfig) -> Result<(), Reject> {
    let bytes = hello.guest.memory_bytes();
    if bytes > config.max_guest_memory {
        return Err(Reject::new(
            RejectCode::TooLarge,
            format!(
                "guest memory of {bytes} bytes exceeds this destination's limit of {} bytes",
                config.max_guest_memory
            ),
        ));
    }
    if hello.pages_per_packet > config.limits.max_pages_per_packet {
        return Err(Reject::new(
            RejectCode::TooLarge,
            format!(
                "{} pages per packet exceeds this destination's limit of {}",
                hello.pages_per_packet, config.limits.max_pages_per_packet
            ),
        ));
    }
    Ok(())
}

/// The largest credit window granted, in chunks.
const MAX_WINDOW: u32 = 1 << 16;

/// The credit window and buffer cap for the session's devices: the destination's own bounds,
/// lowered where the source asks for less. Refused when the cap cannot hold one chunk per
/// device (the loaders could then deadlock).
pub(crate) fn flow_bounds(
    hello: &SessionHello,
    config: &IncomingConfig,
) -> Result<SessionAccept, Reject> {
    let d = &hello.devices;
    let n = d.devices.len() as u64;
    let chunk = d.chunk_size as u64;
    let mut window = match config.credit_window {
        0 => 2 * hello.channels as u32,
        w => w,
    };
    if d.window > 0 {
        window = window.min(d.window);
    }
    let mut cap = match config.buffer_cap {
        0 => n * window as u64 * chunk,
        c => c,
    };
    if d.buffer_cap > 0 {
        cap = cap.min(d.buffer_cap);
    }
    if n > 0 {
        if cap < n * chunk {
            return Err(Reject::new(
                RejectCode::TooLarge,
                format!("a buffer cap of {cap} bytes cannot hold one {chunk}-byte chunk for each of {n} devices"),
            ));
        }
        window = window
            .min(u32::try_from(cap / (n * chunk)).unwrap_or(u32::MAX))
            .max(1);
    }
    // More credit than this buys nothing and would let indices run near u32::MAX.
    let window = window.min(MAX_WINDOW);
    Ok(SessionAccept {
        window,
        buffer_cap: cap,
    })
}

/// Accepts data channels until every index of the session has joined, or the deadline.
pub(crate) fn accept_channels(
    listener: &Listener,
    hello: &SessionHello,
    config: &IncomingConfig,
    log: &dyn Fn(String),
) -> Result<Vec<Stream>, IncomingError> {
    let deadline = Instant::now() + config.setup_timeout;
    let mut slots: Vec<Option<Stream>> = (0..hello.channels).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        let s = listener.accept_until(Some(deadline)).map_err(|e| {
            let missing: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_none()).collect();
            IncomingError::Setup(format!(
                "data channels {missing:?} did not join within {:?}: {e}",
                config.setup_timeout
            ))
        })?;
        // A session under way is not cancelled from here (see IncomingConfig::cancel).
        let Some(mut s) = secure(s, config, None, log)? else {
            continue;
        };
        let _ = s.set_read_timeout(Some(config.handshake_timeout));
        let mut buf = Vec::new();
        let verdict = match framed::recv(&mut s, ChannelName::Incoming, &config.limits, &mut buf) {
            Ok(h) if h.kind == FrameKind::ChannelHello => match ChannelHello::decode(&buf) {
                Ok(c) => check_channel(&c, hello, &slots),
                Err(e) => Err(Reject::new(
                    RejectCode::Protocol,
                    format!("bad ChannelHello: {e}"),
                )),
            },
            Ok(h) => Err(Reject::new(
                RejectCode::Protocol,
                format!("expected ChannelHello, got a {} frame", h.kind.name()),
            )),
            Err(e) => Err(Reject::new(RejectCode::Protocol, plain_refusal(e))),
        };
        match verdict {
            Ok(index) => {
                framed::send(
                    &mut s,
                    ChannelName::Data(index),
                    FrameKind::ChannelAccept,
                    &[],
                )?;
                let _ = s.set_read_timeout(None);
                slots[index as usize] = Some(s);
            }
            Err(reject) => {
                log(format!("refused a data channel: {}", reject.reason));
                framed::send_reject(&mut s, ChannelName::Incoming, &reject);
            }
        }
    }
    Ok(slots.into_iter().flatten().collect())
}

fn check_channel(
    c: &ChannelHello,
    hello: &SessionHello,
    slots: &[Option<Stream>],
) -> Result<u16, Reject> {
    if c.session != hello.session {
        return Err(Reject::new(
            RejectCode::UnknownSession,
            format!(
                "unknown session {} (this destination serves {})",
                c.session, hello.session
            ),
        ));
    }
    match slots.get(c.index as usize) {
        None => Err(Reject::new(
            RejectCode::BadChannelIndex,
            format!(
                "channel index {} out of range (session has {} channels)",
                c.index, hello.channels
            ),
        )),
        Some(Some(_)) => Err(Reject::new(
            RejectCode::DuplicateChannel,
            format!("channel index {} has already joined", c.index),
        )),
        Some(None) => Ok(c.index),
    }
}

impl From<ChannelError> for Reject {
    fn from(e: ChannelError) -> Self {
        Reject::new(RejectCode::Protocol, e.to_string())
    }
}
