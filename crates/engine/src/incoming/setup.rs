//! Accepting a session: the main channel's hello, then each data channel's handshake.
//!
//! The hello's frame version says its layout: a version-5 hello offers versions and features
//! and is answered with the version and features agreed, a version-4 one is taken as version
//! 4's; either is answered in its own version (see `livemig_wire::version`).
//!
//! A connection that is not what we wait for (a foreign session, a duplicate or out-of-range
//! channel index, garbage) is refused with a Reject naming why, and waiting goes on: a stray
//! connection must not fail a migration that is under way.

use crate::cancel::CancelToken;
use crate::config::{IncomingConfig, Protocol};
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::guest::GuestMemory;
use crate::report::IncomingEvent;
use crate::transport::{Listener, Stream};
use livemig_wire::version::{self, Agreed, Features, Versions};
use livemig_wire::{
    ChannelHello, FrameHeader, FrameKind, MemoryFiles, Reject, RejectCode, SessionAccept,
    SessionHello, WireError, HEADER_LEN,
};
use std::sync::Mutex;
use std::time::Instant;

/// What a session speaks: the layout of its hello (and so of the answer to it), and the
/// version and features agreed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Negotiated {
    /// The hello's layout version: the accept, or a refusal, goes in it.
    pub layout: u16,
    /// What the session uses.
    pub agreed: Agreed,
    /// The source waits for `SwitchoverAck` (it required the feature): only then is it sent.
    pub ack_wanted: bool,
}

impl Negotiated {
    /// Sends the SessionAccept, in the hello's layout.
    pub fn accept(&self, main: &mut Stream, accept: &SessionAccept) -> Result<(), ChannelError> {
        let payload = version::encode_accept(self.layout, &self.agreed, accept);
        framed::send_versioned(
            main,
            ChannelName::Main,
            self.layout,
            FrameKind::SessionAccept,
            &payload,
        )
    }

    /// Refuses the session (best effort), in the hello's layout: the source then knows the
    /// refusal is not that of a peer unable to read its hello.
    pub fn refuse(&self, main: &mut Stream, reject: &Reject) {
        framed::send_reject_versioned(main, ChannelName::Main, self.layout, reject);
    }
}

/// A session's hello, what it speaks, and its main channel.
pub(crate) type Opened = (SessionHello, Negotiated, Stream);

/// Which hello a destination waits for.
#[derive(Clone, Copy)]
pub(crate) enum Awaiting<'a> {
    /// A new session's.
    New,
    /// The resume of this session's broken postcopy (its id, its guest).
    Resume(&'a SessionHello),
    /// This session going on after its source abandoned a switchover (its id, its guest).
    Continuation(&'a SessionHello),
}

/// Waits for a connection that opens a session, refusing anything else.
pub(crate) fn accept_session(
    listener: &Listener,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<Opened, IncomingError> {
    accept_hello(listener, config, log, Awaiting::New, None)
}

/// Waits, until `deadline`, for the session that resumes the broken postcopy of `paused`
/// (its id, its guest), refusing anything else.
pub(crate) fn accept_resume(
    listener: &Listener,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
    paused: &SessionHello,
    deadline: Option<Instant>,
) -> Result<Opened, IncomingError> {
    accept_hello(listener, config, log, Awaiting::Resume(paused), deadline)
}

/// Waits, until `deadline`, for session `abandoned` to go on after its abandoned
/// switchover (its id, its guest, no resume), refusing anything else.
pub(crate) fn accept_continuation(
    listener: &Listener,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
    abandoned: &SessionHello,
    deadline: Instant,
) -> Result<Opened, IncomingError> {
    let awaiting = Awaiting::Continuation(abandoned);
    accept_hello(listener, config, log, awaiting, Some(deadline))
}

fn accept_hello(
    listener: &Listener,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
    awaiting: Awaiting<'_>,
    deadline: Option<Instant>,
) -> Result<Opened, IncomingError> {
    let ch = ChannelName::Incoming;
    let protocol = config.test_hooks.protocol();
    let spoken = protocol.versions();
    let decide = |mut s: Stream, first: First| {
        let refused = match first.frame {
            Ok(buf) => match open_session(first.version, &buf, config, protocol, awaiting) {
                Ok((hello, agreed, ack_wanted)) => {
                    let _ = s.set_read_timeout(None);
                    let _ = s.set_write_timeout(None);
                    let layout = first.version;
                    return Some((
                        hello,
                        Negotiated {
                            layout,
                            agreed,
                            ack_wanted,
                        },
                        s,
                    ));
                }
                Err(reject) => reject,
            },
            Err(ChannelError::Protocol { detail, .. }) => {
                Reject::new(RejectCode::UnknownSession, detail)
            }
            Err(e) => Reject::new(
                RejectCode::Protocol,
                plain_refusal(e, config.handshake_timeout),
            ),
        };
        log(&IncomingEvent::ConnectionRefused {
            reason: refused.reason.clone(),
        });
        // In the hello's version, or this side's newest if the hello is newer: an older
        // source reads the reason (a Reject's layout is the same in every version), a newer
        // one learns the version to say its hello again in.
        let answer = first.version.min(spoken.max);
        framed::send_reject_versioned(&mut s, ch, answer, &refused);
        None
    };
    let opening = |kind: FrameKind| {
        (kind != FrameKind::SessionHello).then(|| {
            format!(
                "no session is open; a {} frame cannot start one",
                kind.name()
            )
        })
    };
    handshakes(
        listener,
        deadline,
        Some(&config.cancel),
        &|| None,
        config,
        log,
        opening,
        decide,
    )
}

/// Reads a hello of layout `layout` and agrees on what the session speaks, or says why
/// not: a version this side does not speak is refused as a version-4 livemig refuses one
/// (a protocol error naming it, which tells a newer source to try an older hello), a
/// feature it lacks by name. `protocol`: what this side speaks and has.
fn open_session(
    layout: u16,
    buf: &[u8],
    config: &IncomingConfig,
    protocol: Protocol,
    awaiting: Awaiting<'_>,
) -> Result<(SessionHello, Agreed, bool), Reject> {
    let spoken = protocol.versions();
    if !spoken.contains(layout) {
        let e = WireError::UnsupportedVersion {
            found: layout,
            supported: spoken,
        };
        return Err(Reject::new(RejectCode::Protocol, e.to_string()));
    }
    let (offer, hello) = version::decode_hello(layout, buf)
        .map_err(|e| Reject::new(RejectCode::Protocol, format!("bad SessionHello: {e}")))?;
    let agreed = version::negotiate(&offer, spoken, protocol.features())
        .map_err(|e| Reject::new(RejectCode::Unsupported, e.to_string()))?;
    check_hello(&hello, config)?;
    check_awaited(&hello, awaiting)?;
    let ack_wanted = offer.required.contains(Features::SWITCHOVER_ACK);
    Ok((hello, agreed, ack_wanted))
}

/// A hello resumes a broken postcopy if and only if this side waits for that: the paused
/// session's own resume (same id, same guest); while a session waits to go on after an
/// abandoned switchover, only its own hello (same id, same guest, no resume) is taken.
fn check_awaited(hello: &SessionHello, awaiting: Awaiting<'_>) -> Result<(), Reject> {
    let refused = |why: String| Err(Reject::new(RejectCode::UnknownSession, why));
    match awaiting {
        Awaiting::New if hello.resume => refused(format!(
            "no broken postcopy here to resume (session {})",
            hello.session
        )),
        Awaiting::New => Ok(()),
        Awaiting::Resume(p) if !hello.resume || hello.session != p.session => refused(format!(
            "this destination is paused in the postcopy of session {}: only its resume is accepted",
            p.session
        )),
        Awaiting::Continuation(p) if hello.resume || hello.session != p.session => {
            refused(format!(
                "this destination waits for session {} to go on after its abandoned switchover",
                p.session
            ))
        }
        Awaiting::Resume(p) | Awaiting::Continuation(p) if hello.guest != p.guest => refused(
            format!("the hello of session {} describes another guest", p.session),
        ),
        Awaiting::Resume(_) | Awaiting::Continuation(_) => Ok(()),
    }
}

/// Accepts connections and reads each one's first frame on a thread of its own
/// (`lm-dst-hs`, within the handshake timeout, after TLS if configured), so a connection
/// that says nothing cannot hold up the others; `decide` (on this thread) takes each
/// connection with its first frame's payload, or the reason it has none, until it returns
/// a result. `unexpected` names a first frame of the wrong kind. At most
/// [`MAX_HANDSHAKES`] wait at once; more are closed at once. Handshakes still waiting at
/// the end are cut short (their sockets shut down) and their threads joined. `abandoned`,
/// asked at every turn of the loop, ends the wait with its error (a source gone meanwhile).
#[allow(clippy::too_many_arguments)]
fn handshakes<R>(
    listener: &Listener,
    deadline: Option<Instant>,
    cancel: Option<&CancelToken>,
    abandoned: &dyn Fn() -> Option<IncomingError>,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
    unexpected: impl Fn(FrameKind) -> Option<String> + Sync,
    mut decide: impl FnMut(Stream, First) -> Option<R>,
) -> Result<R, IncomingError> {
    let (tx, rx) = crossbeam_channel::unbounded::<Handshaken>();
    let pending = PendingSet::default();
    std::thread::scope(|scope| {
        let result = (|| {
            let mut next_id = 0u64;
            loop {
                if let Some(e) = abandoned() {
                    return Err(e);
                }
                if let Some(r) = pending.take_finished(&rx, &mut decide) {
                    return Ok(r);
                }
                pending.expire_overdue();
                let Some(s) = accept_next(listener, deadline, cancel, pending.poll())? else {
                    continue;
                };
                if pending.len() >= MAX_HANDSHAKES {
                    refuse_busy(s, config, log);
                    continue;
                }
                let Ok(cut) = s.try_clone() else { continue };
                let id = next_id;
                next_id += 1;
                pending.add(id, cut, config.handshake_timeout);
                let (tx, unexpected) = (tx.clone(), &unexpected);
                let started = std::thread::Builder::new()
                    .name("lm-dst-hs".into())
                    .spawn_scoped(scope, move || {
                        let done = first_frame(s, config, cancel, log, unexpected);
                        let _ = tx.send((id, done));
                    });
                if started.is_err() {
                    pending.remove(id);
                }
            }
        })();
        // Cut short whatever still handshakes, so the scope's joins are immediate.
        pending.cut_all();
        result
    })
}

/// A handshake's end: its id, and its connection with its first frame (`None`: nothing
/// more to say to it).
type Handshaken = (u64, Option<(Stream, First)>);

/// A connection's first frame: its payload, or why there is none; and the version its
/// header said (the newest this build speaks if none was read).
pub(crate) struct First {
    /// The header's version, one [`Versions::THIS`] holds (see `livemig_wire::version`).
    pub version: u16,
    /// The payload.
    pub frame: Result<Vec<u8>, ChannelError>,
}

/// Waits for the next connection until the poll slice or the deadline; `None` when the
/// slice passed with none.
fn accept_next(
    listener: &Listener,
    deadline: Option<Instant>,
    cancel: Option<&CancelToken>,
    poll: std::time::Duration,
) -> Result<Option<Stream>, IncomingError> {
    let slice = Instant::now() + poll;
    let until = deadline.map_or(slice, |d| d.min(slice));
    match listener.accept_cancellable(Some(until), cancel) {
        Ok(s) => Ok(Some(s)),
        Err(_) if cancel.is_some_and(CancelToken::is_cancelled) => Err(IncomingError::Cancelled),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => match deadline {
            Some(d) if Instant::now() >= d => Err(IncomingError::Accept(e)),
            _ => Ok(None),
        },
        Err(e) => Err(IncomingError::Accept(e)),
    }
}

/// Closes a connection beyond [`MAX_HANDSHAKES`], saying why.
fn refuse_busy(mut s: Stream, config: &IncomingConfig, log: &(dyn Fn(&IncomingEvent) + Sync)) {
    let why = format!(
        "{MAX_HANDSHAKES} connections are handshaking already (each is given {:?}); try again",
        config.handshake_timeout
    );
    log(&IncomingEvent::ConnectionRefused {
        reason: why.clone(),
    });
    // A fresh socket's buffer takes a small frame without blocking.
    let _ = s.set_write_timeout(Some(std::time::Duration::from_millis(100)));
    framed::send_reject(
        &mut s,
        ChannelName::Incoming,
        &Reject::new(RejectCode::Other, why),
    );
    s.shutdown();
}

/// The connections still handshaking.
#[derive(Default)]
struct PendingSet(Mutex<Vec<Pending>>);

impl PendingSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn add(&self, id: u64, cut: Stream, timeout: std::time::Duration) {
        self.lock().push(Pending {
            id,
            cut,
            deadline: Instant::now() + timeout,
            expired: false,
        });
    }

    /// Forgets `id`; whether it had been cut at its deadline.
    fn remove(&self, id: u64) -> bool {
        let mut expired = false;
        self.lock().retain(|p| {
            expired |= p.id == id && p.expired;
            p.id != id
        });
        expired
    }

    /// Hands every finished handshake to `decide`, until it returns a result.
    fn take_finished<R>(
        &self,
        rx: &crossbeam_channel::Receiver<Handshaken>,
        decide: &mut impl FnMut(Stream, First) -> Option<R>,
    ) -> Option<R> {
        while let Ok((id, done)) = rx.try_recv() {
            let expired = self.remove(id);
            if let Some((s, mut first)) = done {
                // Cut at its deadline: say so, not what the cut made of the read.
                if expired {
                    first.frame = Err(handshake_expired());
                }
                if let Some(r) = decide(s, first) {
                    return Some(r);
                }
            }
        }
        None
    }

    /// The handshake timeout is a deadline per connection, from its accept: a peer
    /// trickling bytes (or pings) keeps no slot past it. Its read half is shut, so its
    /// thread ends at once and the refusal can still be written.
    fn expire_overdue(&self) {
        let now = Instant::now();
        for p in self
            .lock()
            .iter_mut()
            .filter(|p| !p.expired && now >= p.deadline)
        {
            p.expired = true;
            p.cut_read();
        }
    }

    /// While a handshake is under way its answer is looked for every millisecond: a source
    /// opens its channels one after another, each waiting for its accept.
    fn poll(&self) -> std::time::Duration {
        if self.lock().is_empty() {
            HANDSHAKE_POLL
        } else {
            HANDSHAKE_PENDING_POLL
        }
    }

    fn cut_all(&self) {
        for p in self.lock().drain(..) {
            p.cut.shutdown();
        }
    }
}

/// A connection still handshaking.
struct Pending {
    id: u64,
    /// A clone of the accepted socket, taken before any TLS, to cut the handshake short.
    cut: Stream,
    /// Its handshake timeout, from its accept.
    deadline: Instant,
    /// Cut at the deadline.
    expired: bool,
}

impl Pending {
    /// Shuts the read half: the handshake's read ends, a refusal can still be written.
    /// (`cut` is the plain socket; a TLS stream, should one ever stand here, is shut whole.)
    fn cut_read(&self) {
        let _ = match &self.cut {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Read),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Read),
            Stream::Tls(_) => {
                self.cut.shutdown();
                Ok(())
            }
        };
    }
}

/// The error a handshake cut at its deadline is refused with.
fn handshake_expired() -> ChannelError {
    ChannelError::Io {
        channel: ChannelName::Incoming,
        op: "handshake",
        source: std::io::ErrorKind::TimedOut.into(),
    }
}

/// How often the handshake loop looks at finished handshakes while none arrives.
const HANDSHAKE_POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// ... and while some connection is handshaking (its answer holds up the source).
const HANDSHAKE_PENDING_POLL: std::time::Duration = std::time::Duration::from_millis(1);
/// Connections handshaking at once, at most.
pub const MAX_HANDSHAKES: usize = 64;

/// A connection's first frame (after TLS), read within the handshake timeout. `None` when
/// TLS refused it (logged there) or the wait was cancelled: nothing more to say to it.
fn first_frame(
    s: Stream,
    config: &IncomingConfig,
    cancel: Option<&CancelToken>,
    log: &(dyn Fn(&IncomingEvent) + Sync),
    unexpected: &(dyn Fn(FrameKind) -> Option<String> + Sync),
) -> Option<(Stream, First)> {
    let ch = ChannelName::Incoming;
    let mut s = secure(s, config, cancel, log).ok().flatten()?;
    let _ = s.set_read_timeout(Some(config.handshake_timeout));
    let _ = s.set_write_timeout(Some(config.handshake_timeout));
    let mut buf = Vec::new();
    let mut version = Versions::THIS.max;
    let frame = first_header(&mut s, config, &mut version).and_then(|h| match unexpected(h.kind) {
        Some(detail) => Err(ChannelError::Protocol {
            channel: ch,
            detail,
        }),
        None => framed::recv_payload(&mut s, ch, &h, &mut buf).map(|()| buf),
    });
    Some((s, First { version, frame }))
}

/// The first frame's header (pings skipped), its version noted in `version` as soon as its
/// bytes are in, even if the header is refused (a version this build does not speak).
fn first_header(
    s: &mut Stream,
    config: &IncomingConfig,
    version: &mut u16,
) -> Result<FrameHeader, ChannelError> {
    let channel = ChannelName::Incoming;
    loop {
        let mut raw = [0u8; HEADER_LEN];
        framed::read_exact(s, channel, &mut raw, true)?;
        if raw[..4] == livemig_wire::MAGIC.to_le_bytes() {
            *version = u16::from_le_bytes([raw[4], raw[5]]);
        }
        let h = FrameHeader::decode(&raw, &config.limits)
            .map_err(|source| ChannelError::Wire { channel, source })?;
        if h.kind != FrameKind::Ping {
            return Ok(h);
        }
    }
}

/// With TLS, runs the handshake on an accepted connection (within the handshake timeout).
/// A connection that fails it (no client certificate, one from another CA, not TLS) is
/// refused at the TLS layer and logged, and `None` says to wait for the next.
fn secure(
    s: Stream,
    config: &IncomingConfig,
    cancel: Option<&CancelToken>,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<Option<Stream>, IncomingError> {
    let Some(tls) = &config.tls else {
        return Ok(Some(s));
    };
    match tls.accept(s, config.handshake_timeout, cancel) {
        Ok(s) => Ok(Some(s)),
        Err(_) if cancel.is_some_and(CancelToken::is_cancelled) => Err(IncomingError::Cancelled),
        Err(e) => {
            log(&IncomingEvent::ConnectionRefused {
                reason: e.to_string(),
            });
            Ok(None)
        }
    }
}

/// Why a connection's first frame was refused; a TLS hello at a destination without TLS
/// is named as such, and silence as the handshake timeout it ran into.
fn plain_refusal(e: ChannelError, handshake_timeout: std::time::Duration) -> String {
    match &e {
        ChannelError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!("no complete first frame within the handshake timeout ({handshake_timeout:?}, from the connection's accept)")
        }
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

/// Local mode: the MemoryFiles frame that follows the hello, with the files backing guest
/// memory, mapped here after their length and seals are checked (see `local`).
pub(crate) fn receive_memory_files(
    main: &mut Stream,
    hello: &SessionHello,
    config: &IncomingConfig,
) -> Result<GuestMemory, Reject> {
    let ch = ChannelName::Main;
    let local = |e: &dyn std::fmt::Display| {
        Reject::new(
            RejectCode::Protocol,
            format!("local mode: cannot take the guest memory files: {e}"),
        )
    };
    let _ = main.set_read_timeout(Some(config.handshake_timeout));
    let ranges = hello.guest.ranges.len();
    let (h, files) =
        framed::recv_header_with_fds(main, ch, &config.limits, ranges).map_err(|e| local(&e))?;
    if h.kind != FrameKind::MemoryFiles {
        return Err(Reject::new(
            RejectCode::Protocol,
            format!(
                "local mode: a {} frame where the MemoryFiles frame was due",
                h.kind.name()
            ),
        ));
    }
    let mut buf = Vec::new();
    framed::recv_payload(main, ch, &h, &mut buf).map_err(|e| local(&e))?;
    let _ = main.set_read_timeout(None);
    let layout = MemoryFiles::decode(&buf, ranges).map_err(|e| local(&e))?;
    crate::local::map_memory_files(&hello.guest.ranges, files, &layout).map_err(|e| {
        Reject::new(
            RejectCode::Unsupported,
            format!("local mode: cannot take the guest memory files: {e}"),
        )
    })
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
        // The shorter of the two governs both sides (the hello's is within the wire's range).
        peer_timeout_ms: hello
            .peer_timeout_ms
            .min(crate::config::wire_ms(config.peer_timeout)),
    })
}

/// Accepts data channels until every index of the session has joined, or the deadline.
pub(crate) fn accept_channels(
    listener: &Listener,
    main: &Stream,
    hello: &SessionHello,
    config: &IncomingConfig,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Result<Vec<Stream>, IncomingError> {
    let deadline = Instant::now() + config.setup_timeout;
    // A postcopy session has one more: the urgent channel, index `channels`.
    let count = hello.channels + hello.postcopy as u16;
    let mut slots: Vec<Option<Stream>> = (0..count).map(|_| None).collect();
    let unexpected = |kind: FrameKind| {
        (kind != FrameKind::ChannelHello)
            .then(|| format!("expected ChannelHello, got a {} frame", kind.name()))
    };
    // A source that gave up (its main channel closed) is not waited for until the deadline.
    let gone = || {
        main.peer_closed().then(|| {
            IncomingError::Setup(
                "the source closed the main channel while its data channels were awaited".into(),
            )
        })
    };
    // A session under way is not cancelled from here (see IncomingConfig::cancel).
    let joined = handshakes(
        listener,
        Some(deadline),
        None,
        &gone,
        config,
        log,
        unexpected,
        |s, first| {
            let verdict = channel_verdict(first, hello, &slots, config);
            if let Some((index, s)) = join_channel(s, verdict, log) {
                slots[index as usize] = Some(s);
            }
            slots.iter().all(Option::is_some).then_some(())
        },
    );
    match joined {
        Ok(()) => Ok(slots.into_iter().flatten().collect()),
        Err(IncomingError::Accept(e)) => {
            let missing: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_none()).collect();
            Err(IncomingError::Setup(format!(
                "data channels {missing:?} did not join within {:?}: {e}",
                config.setup_timeout
            )))
        }
        Err(e) => Err(e),
    }
}

/// What to answer a data channel's first frame: the index it joins, or why it is refused.
fn channel_verdict(
    first: First,
    hello: &SessionHello,
    slots: &[Option<Stream>],
    config: &IncomingConfig,
) -> Result<u16, Reject> {
    match first.frame {
        Ok(buf) => match ChannelHello::decode(&buf) {
            Ok(c) => check_channel(&c, hello, slots),
            Err(e) => Err(Reject::new(
                RejectCode::Protocol,
                format!("bad ChannelHello: {e}"),
            )),
        },
        Err(ChannelError::Protocol { detail, .. }) => {
            Err(Reject::new(RejectCode::Protocol, detail))
        }
        Err(e) => Err(Reject::new(
            RejectCode::Protocol,
            plain_refusal(e, config.handshake_timeout),
        )),
    }
}

/// Accepts a data channel into its slot (`Some`, ready to receive), or refuses it; one whose
/// accept cannot be written has left, and is logged.
fn join_channel(
    mut s: Stream,
    verdict: Result<u16, Reject>,
    log: &(dyn Fn(&IncomingEvent) + Sync),
) -> Option<(u16, Stream)> {
    match verdict {
        Ok(index) => {
            if let Err(e) = framed::send(
                &mut s,
                ChannelName::Data(index),
                FrameKind::ChannelAccept,
                &[],
            ) {
                log(&IncomingEvent::DataChannelLeft {
                    index,
                    error: e.to_string(),
                });
                return None;
            }
            let _ = s.set_read_timeout(None);
            let _ = s.set_write_timeout(None);
            Some((index, s))
        }
        Err(reject) => {
            log(&IncomingEvent::DataChannelRefused {
                reason: reject.reason.clone(),
            });
            framed::send_reject(&mut s, ChannelName::Incoming, &reject);
            None
        }
    }
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

#[cfg(test)]
mod tests;
