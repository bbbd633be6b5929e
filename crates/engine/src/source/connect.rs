//! Set-up: the main channel and every data channel opened, each with its handshake, under a
//! watchdog that bounds the whole of it.

use super::recover::ResumePoint;
use super::watchdog::{Awaited, Watchdog};
use super::Vm;
use crate::cancel::CancelToken;
use crate::config::MigrationConfig;
use crate::error::{ChannelError, ChannelName, MigrationError};
use crate::framed;
use crate::transport::{Endpoint, Stream};
use livemig_wire::version::{self, Agreed, Features, Offer};
use livemig_wire::{
    ChannelHello, DeviceSetup, FrameKind, Limits, PostcopyStart, RamTransfer, Reject, RejectCode,
    SessionAccept, SessionHello, SessionId, WireDevice,
};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A session whose every channel is open and bound to it.
pub(super) struct Connected {
    pub session: SessionId,
    pub main: Stream,
    pub data: Vec<Stream>,
    /// The urgent channel for postcopy's requested pages (index `channels`), when the
    /// session may switch to postcopy.
    pub urgent: Option<Stream>,
    pub accept: SessionAccept,
    /// The protocol version and the features the destination agreed to.
    pub agreed: Agreed,
    /// When the migration started, and how long set-up took.
    pub start: Instant,
    pub setup: Duration,
}

/// What local mode needs before anything is opened: a `unix:` address (the memory files go
/// over it), no TLS (nothing leaves the host), and guest memory backed by files.
pub(super) fn check_local(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
) -> Result<(), MigrationError> {
    if !matches!(to, Endpoint::Unix(_)) {
        return Err(MigrationError::Config(format!(
            "local mode hands guest memory over a Unix socket: '{to}' is not a unix: address"
        )));
    }
    if config.tls.is_some() {
        return Err(MigrationError::Config(
            "local mode and TLS do not go together: nothing leaves the host".into(),
        ));
    }
    crate::local::memory_files(vm.guest.memory())
        .map(drop)
        .map_err(|e| MigrationError::Config(e.to_string()))
}

/// Opens every channel of a new session under a watchdog (`lm-src-watch`) that shuts down
/// every socket opened so far on cancel, or when set-up has not finished `connect_timeout`
/// after the main channel opened: a destination that accepts and then says nothing, or
/// trickles its answers, cannot hold the source in its set-up.
pub(super) fn connect(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
) -> Result<Connected, MigrationError> {
    let session = SessionId(*uuid::Uuid::new_v4().as_bytes());
    open_session(vm, to, config, session, false)
}

/// Opens a new connection of session `session`, which goes on after an abandoned
/// switchover (the destination waits for its id).
pub(super) fn continuing(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    session: SessionId,
) -> Result<Connected, MigrationError> {
    open_session(vm, to, config, session, false)
}

/// Opens a session that resumes the broken postcopy `point` (postcopy recovery), and reads
/// the destination's list of the pages it still misses.
pub(super) fn resume(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    point: &ResumePoint,
) -> Result<(Connected, PostcopyStart), MigrationError> {
    let mut c = open_session(vm, to, config, point.parts.session, true)?;
    let ch = ChannelName::Main;
    let mut buf = Vec::new();
    let wire = |source| ChannelError::Wire {
        channel: ch,
        source,
    };
    framed::recv_expect(
        &mut c.main,
        ch,
        &Limits::default(),
        &mut buf,
        FrameKind::PostcopyResume,
    )?;
    let missing = PostcopyStart::decode(&buf, &vm.guest.descriptor().ranges).map_err(wire)?;
    if missing.rounds != point.round {
        return Err(ChannelError::Protocol {
            channel: ch,
            detail: format!(
                "the destination resumes postcopy round {}, this side's is {}",
                missing.rounds, point.round
            ),
        }
        .into());
    }
    Ok((c, missing))
}

/// Opens every channel of session `session` (a new one, or, with `resume`, the broken
/// postcopy it resumes).
fn open_session(
    vm: Vm<'_>,
    to: &Endpoint,
    config: &MigrationConfig,
    session: SessionId,
    resume: bool,
) -> Result<Connected, MigrationError> {
    let start = Instant::now();
    let open: Mutex<Vec<Stream>> = Mutex::new(Vec::new());
    let watchdog = Watchdog::new();
    let attempt = CancelToken::new();
    let result = std::thread::scope(|scope| {
        let (open, watchdog, attempt) = (&open, &watchdog, &attempt);
        let watcher = std::thread::Builder::new()
            .name("lm-src-watch".into())
            .spawn_scoped(scope, move || {
                watchdog.run(&config.cancel, attempt, || {
                    open.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .for_each(Stream::shutdown)
                })
            })
            .map_err(MigrationError::Spawn)?;
        let opener = Opener {
            to,
            config,
            open,
            attempt,
            resume,
        };
        let r = opener.session(vm, session, watchdog);
        // Ends the watch (a no-op if it already cancelled).
        attempt.cancel();
        let _ = watcher.join();
        r
    });
    let (main, mut data, (agreed, accept)) = result.map_err(|e| {
        if config.cancel.is_cancelled() {
            MigrationError::Cancelled
        } else if let Some(x) = watchdog.expired() {
            MigrationError::Deadline(x)
        } else {
            e
        }
    })?;
    let urgent = if config.postcopy.allowed() {
        data.pop()
    } else {
        None
    };
    Ok(Connected {
        session,
        main,
        data,
        urgent,
        accept,
        agreed,
        start,
        setup: start.elapsed(),
    })
}

/// Opens sockets for one set-up attempt. Each socket is put in `open` as soon as it exists;
/// once the main channel is open, the rest must be done within `connect_timeout` (the
/// watchdog's deadline; `attempt` is cancelled when it passes).
struct Opener<'a> {
    to: &'a Endpoint,
    config: &'a MigrationConfig,
    open: &'a Mutex<Vec<Stream>>,
    attempt: &'a CancelToken,
    /// The hello resumes a broken postcopy.
    resume: bool,
}

impl Opener<'_> {
    fn connect_err(&self, source: std::io::Error) -> MigrationError {
        MigrationError::Connect {
            to: self.to.to_string(),
            source,
        }
    }

    fn tls_err(&self, e: crate::tls::TlsError) -> MigrationError {
        match e {
            crate::tls::TlsError::Cancelled => MigrationError::Cancelled,
            e => self.connect_err(std::io::Error::other(e)),
        }
    }

    /// Registers `s` for the watchdog to shut.
    fn register(&self, s: &Stream) -> Result<(), MigrationError> {
        let clone = s.try_clone().map_err(|e| self.connect_err(e))?;
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(clone);
        // Registered after the watcher may have run: look again.
        if self.attempt.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    /// One connection, with TLS when configured.
    fn stream(&self) -> Result<Stream, MigrationError> {
        let timeout = self.config.connect_timeout;
        let s = Stream::connect_cancellable(self.to, timeout, Some(self.attempt))
            .map_err(|e| self.connect_err(e))?;
        // The network socket first: a cancel during the TLS handshake shuts it.
        self.register(&s)?;
        let s = match &self.config.tls {
            None => s,
            Some(tls) => {
                let s = tls
                    .connect(s, self.to, timeout, Some(self.attempt))
                    .map_err(|e| self.tls_err(e))?;
                self.register(&s)?;
                s
            }
        };
        let _ = s.set_read_timeout(Some(timeout));
        Ok(s)
    }

    /// The whole set-up: main channel and hello, then every data channel.
    fn session(
        &self,
        vm: Vm<'_>,
        session: SessionId,
        watchdog: &Watchdog,
    ) -> Result<(Stream, Vec<Stream>, Accepted), MigrationError> {
        if let Some(tls) = &self.config.tls {
            // A unix: address without a server name fails here, before anything is opened.
            tls.server_name(self.to).map_err(|e| self.tls_err(e))?;
        }
        let main = self.stream()?;
        watchdog.arm(Awaited::SetUp, self.config.connect_timeout);
        let (main, (agreed, accept)) = self.negotiate(vm, session, main)?;
        let data = self.data_channels(session)?;
        let peer_timeout = accept.peer_timeout();
        for s in data.iter().chain([&main]) {
            let _ = s.set_read_timeout(None);
            s.arm_peer_timeout(peer_timeout).map_err(|source| {
                MigrationError::Channel(ChannelError::Io {
                    channel: ChannelName::Main,
                    op: "arm the peer timeout",
                    source,
                })
            })?;
        }
        // The return path hears from the destination at least every ping interval.
        let _ = main.set_read_timeout(Some(peer_timeout));
        Ok((main, data, (agreed, accept)))
    }

    /// The hello in the newest version this side speaks; if the destination refuses it as
    /// a peer of an older version does (it cannot read it), once more in that version, on a
    /// new connection. Returns the main channel the session was accepted on.
    fn negotiate(
        &self,
        vm: Vm<'_>,
        session: SessionId,
        mut main: Stream,
    ) -> Result<(Stream, Accepted), MigrationError> {
        let versions = self.config.test_hooks.protocol().versions();
        let (speaks, reject) = match self.hello(vm, session, &mut main, versions.max)? {
            Answer::Accepted(a) => return Ok((main, a)),
            Answer::Older { speaks, reject } => (speaks, reject),
        };
        let refused = |reject: Reject, detail: String| {
            MigrationError::Channel(ChannelError::Rejected {
                channel: ChannelName::Main,
                reject: Reject::new(reject.code, format!("{}; {detail}", reject.reason)),
            })
        };
        if !versions.contains(speaks) {
            let detail =
                format!("the destination speaks protocol version {speaks}, this source {versions}");
            return Err(refused(reject, detail));
        }
        main.shutdown();
        let mut again = self.stream()?;
        match self.hello(vm, session, &mut again, speaks)? {
            Answer::Accepted(a) => Ok((again, a)),
            Answer::Older { reject, .. } => Err(refused(
                reject,
                format!("refused again in protocol version {speaks}"),
            )),
        }
    }

    /// What this source offers for `hello`: every version and feature it has, and as
    /// required the features the migration uses (compression is only offered: without it,
    /// pages go as they are).
    fn offer(&self, hello: &SessionHello) -> Result<Offer, MigrationError> {
        let protocol = self.config.test_hooks.protocol();
        let mut required = version::hello_needs(hello);
        if self.config.page_checksums {
            required = required.union(Features::PAGE_CHECKSUMS);
        }
        if self.config.guest_paused {
            required = required.union(Features::PAUSED_GUEST);
        }
        if self.config.downtime_hard_limit.is_some() {
            required = required.union(Features::SWITCHOVER_RETRY);
        }
        if self.config.switchover_ack {
            required = required.union(Features::SWITCHOVER_ACK);
        }
        let missing = required.without(protocol.features());
        if !missing.is_empty() {
            return Err(MigrationError::Config(format!(
                "this source does without {missing}"
            )));
        }
        Ok(Offer {
            versions: protocol.versions(),
            features: protocol.features(),
            required,
        })
    }

    /// The session's hello on the main channel in the layout of `version` (and local mode's
    /// memory files), and the destination's answer.
    fn hello(
        &self,
        vm: Vm<'_>,
        session: SessionId,
        main: &mut Stream,
        version: u16,
    ) -> Result<Answer, MigrationError> {
        let config = self.config;
        let hello = SessionHello {
            session,
            channels: config.channels,
            pages_per_packet: config.pages_per_packet,
            guest: vm.guest.descriptor(),
            devices: wire_devices(vm, config),
            ram: config.ram,
            peer_timeout_ms: crate::config::wire_ms(config.peer_timeout),
            postcopy: config.postcopy.allowed() || self.resume,
            resume: self.resume,
        };
        let offer = self.offer(&hello)?;
        let ch = ChannelName::Main;
        let payload = version::encode_hello(version, &offer, &hello);
        framed::send_versioned(main, ch, version, FrameKind::SessionHello, &payload)?;
        // A destination that cannot read the hello closes the connection after its refusal:
        // the refusal is still read, and the files' error only reported without one.
        let sent = match config.ram {
            RamTransfer::Local => {
                let (fds, layout) = crate::local::memory_files(vm.guest.memory())
                    .map_err(|e| MigrationError::Config(e.to_string()))?;
                framed::send_with_fds(main, ch, FrameKind::MemoryFiles, &layout.encode(), &fds)
            }
            RamTransfer::Copy => Ok(()),
        };
        match (answer(main, version, &offer, hello.peer_timeout_ms), sent) {
            (Ok(Answer::Accepted(_)), Err(e)) => Err(e.into()),
            (answer, _) => answer,
        }
    }

    /// Every data channel's hello goes out before any answer is awaited: the destination
    /// handshakes them side by side, so set-up costs one round trip, not one per channel.
    /// A postcopy session has one more, the urgent channel (index `channels`).
    fn data_channels(&self, session: SessionId) -> Result<Vec<Stream>, MigrationError> {
        let count = self.config.channels + self.config.postcopy.allowed() as u16;
        let mut data = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut s = self.stream()?;
            framed::send(
                &mut s,
                ChannelName::Data(index),
                FrameKind::ChannelHello,
                &ChannelHello { session, index }.encode(),
            )?;
            data.push(s);
        }
        let mut buf = Vec::new();
        for (index, s) in data.iter_mut().enumerate() {
            let ch = ChannelName::Data(index as u16);
            framed::recv_expect(
                s,
                ch,
                &Limits::default(),
                &mut buf,
                FrameKind::ChannelAccept,
            )?;
        }
        Ok(data)
    }
}

/// What the destination agreed to, and its accept.
type Accepted = (Agreed, SessionAccept);

/// The destination's answer to a hello.
enum Answer {
    /// The session is accepted, in this version with these features.
    Accepted(Accepted),
    /// Refused, as a peer that cannot read the hello refuses it: a protocol error, in a
    /// frame of an older version, the newest the destination speaks (a version-4 livemig
    /// answers any other version so).
    Older { speaks: u16, reject: Reject },
}

/// Reads the destination's answer to a hello of `version` offering `offer`: its accept in
/// the hello's layout, checked against the offer and the peer timeout asked for, or its
/// refusal of a version it cannot read.
fn answer(
    main: &mut Stream,
    version: u16,
    offer: &Offer,
    peer_timeout_ms: u32,
) -> Result<Answer, MigrationError> {
    let ch = ChannelName::Main;
    let mut buf = Vec::new();
    let h = framed::recv_header(main, ch, &Limits::default())?;
    match framed::recv_payload(main, ch, &h, &mut buf) {
        Err(ChannelError::Rejected { reject, .. })
            if h.version < version && reject.code == RejectCode::Protocol =>
        {
            return Ok(Answer::Older {
                speaks: h.version,
                reject,
            })
        }
        r => r?,
    }
    let wire = |source| ChannelError::Wire {
        channel: ch,
        source,
    };
    h.expect(FrameKind::SessionAccept).map_err(wire)?;
    let protocol = |detail: String| ChannelError::Protocol {
        channel: ch,
        detail,
    };
    if h.version != version {
        return Err(protocol(format!(
            "the destination answered a hello of protocol version {version} with an accept of version {}",
            h.version
        ))
        .into());
    }
    let (agreed, accept) = version::decode_accept(version, &buf).map_err(wire)?;
    offer.check(&agreed).map_err(wire)?;
    if accept.peer_timeout_ms > peer_timeout_ms {
        // The agreed timeout is the shorter of the two: a longer one is not an agreement.
        return Err(protocol(format!(
            "the destination answered a peer timeout of {} ms to the source's {peer_timeout_ms} ms",
            accept.peer_timeout_ms
        ))
        .into());
    }
    Ok(Answer::Accepted((agreed, accept)))
}

/// The configuration a session runs with once agreed: compression left off if the
/// destination lacks it (`None`: as configured).
pub(super) fn within(config: &MigrationConfig, agreed: &Agreed) -> Option<MigrationConfig> {
    (config.compress.is_some() && !agreed.features.contains(Features::ZSTD)).then(|| {
        MigrationConfig {
            compress: None,
            ..config.clone()
        }
    })
}

/// The devices as the hello describes them.
fn wire_devices(vm: Vm<'_>, config: &MigrationConfig) -> DeviceSetup {
    let conv = |d: crate::device::DeviceDescriptor| WireDevice {
        kind: d.kind,
        name: d.name,
        config: d.config,
    };
    DeviceSetup {
        transfer: config.device_transfer,
        chunk_size: config.chunk_size,
        window: config.credit_window,
        buffer_cap: config.buffer_cap,
        devices: vm.devices.iter().map(|d| conv(d.descriptor())).collect(),
        vmstates: vm.vmstates.iter().map(|d| conv(d.descriptor())).collect(),
    }
}
