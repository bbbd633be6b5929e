//! Knobs of a migration, with the defaults a user gets when saying nothing.
//!
//! [`MigrationConfig`] is the source's, [`IncomingConfig`] the destination's; both are
//! built with `..Default::default()` and only the fields that matter changed. Where the two
//! sides must agree (peer timeout, credit window, buffer cap) the source asks in its hello
//! and the destination decides, never granting more than its own configuration allows.

use crate::cancel::CancelToken;
use crate::error::MigrationError;
use crate::stats::LiveStats;
use crate::tls::TlsConfig;
use crate::tunables::LiveParams;
use livemig_wire::{
    DeviceTransfer, Limits, RamTransfer, DEFAULT_PAGES_PER_PACKET, MAX_CHANNELS, MAX_CHUNK_SIZE,
    MAX_PAGES_PER_PACKET,
};
use std::sync::Arc;
use std::time::Duration;

/// How long a silent peer is given by default before it is taken for dead (both sides).
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// Device state a destination buffers at most by default, across devices. With 1 MiB
/// chunks that is a window of 64 chunks for 4 devices; a hello asking for more (many
/// devices, large chunks, wide windows) gets narrower windows, never more memory.
pub const DEFAULT_BUFFER_CAP: u64 = 256 << 20;
/// The longest a guest stays paused for a switchover by default
/// ([`MigrationConfig::switchover_timeout`]).
pub const DEFAULT_SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest peer timeout [`MigrationConfig::validate`] allows (pings go out every
/// quarter of it).
pub const MIN_PEER_TIMEOUT: Duration = Duration::from_millis(200);

/// A peer timeout in whole milliseconds for the hello and the accept, within what the wire
/// allows (the shorter of the two sides' governs both).
pub(crate) fn wire_ms(d: Duration) -> u32 {
    let ms = u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    ms.clamp(
        *livemig_wire::PEER_TIMEOUT_MS.start(),
        *livemig_wire::PEER_TIMEOUT_MS.end(),
    )
}

/// How often an idle channel pings when the peer timeout is `t`: a quarter of it.
pub fn ping_interval(t: Duration) -> Duration {
    t / 4
}

/// The source's configuration of one outgoing migration ([`crate::migrate_vm`]).
///
/// [`MigrationConfig::validate`] checks it before anything is opened; an invalid one is
/// [`MigrationError::Config`]. Cloning shares the [`CancelToken`], the [`LiveStats`], the
/// [`LiveParams`] and the TLS configuration.
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Data channels (TCP or Unix connections besides the main one), 1 to
    /// [`MAX_CHANNELS`] (64). Default 4.
    pub channels: u16,
    /// Switch over once the expected downtime fits within this time: the remaining dirty
    /// memory at the measured rate, and the devices' final state as they report it
    /// ([`crate::Device::pending`]: read in parallel, sent over the same channels); more
    /// rounds may run while each still halves the rest, at most 8. See
    /// `docs/state-machines.md`. [`Self::live`] may change it mid-migration. Default
    /// 300 ms.
    pub downtime_limit: Duration,
    /// Cap on the bytes per second of guest RAM the data channels send, if any (device state
    /// is not paced). `Some(0)` is invalid. Default `None`: no cap.
    pub max_bandwidth: Option<u64>,
    /// The bandwidth, bytes per second, the switchover can count on (QEMU's
    /// `avail-switchover-bandwidth`): when set, the expected downtime takes it in place of
    /// the rates precopy measured (for the RAM's rest and the devices' bytes alike), e.g.
    /// when precopy is capped by [`Self::max_bandwidth`] but the switchover is not, or
    /// shares the link with other traffic. Only the estimate changes, not the pacing.
    /// `Some(0)` is invalid. Default `None`: the measured rates.
    pub avail_switchover_bandwidth: Option<u64>,
    /// Live overrides of [`Self::downtime_limit`], [`Self::max_bandwidth`] and
    /// [`Self::avail_switchover_bandwidth`], settable from any thread while the migration
    /// runs (QMP's `migrate-set-parameters`); read at the end of every round and before every
    /// batch of pages. Clones share it. Default: nothing set.
    pub live: LiveParams,
    /// Switch over after this many precopy rounds (round 0 included) even if not
    /// converged, or fail, as [`Self::on_no_convergence`] says. Default 30.
    pub max_rounds: u32,
    /// Switch over after this much precopy time even if not converged, or fail, as
    /// [`Self::on_no_convergence`] says (checked at the end of each round). Default 120 s.
    pub max_precopy_time: Duration,
    /// What happens when a round or time bound is hit before convergence. Default
    /// [`NoConvergence::Force`].
    pub on_no_convergence: NoConvergence,
    /// Whether (and when) the migration may switch to postcopy: the guest runs on the
    /// destination before all its memory has arrived, pages it touches are fetched on
    /// demand. Default: never.
    pub postcopy: PostcopyPolicy,
    /// Cap on the bytes per second of postcopy's background push (QEMU's
    /// `max-postcopy-bandwidth`); `None`: [`Self::max_bandwidth`]. Requested pages are
    /// never paced. `Some(0)` is invalid.
    pub max_postcopy_bandwidth: Option<u64>,
    /// Fired from outside (QMP's `migrate-start-postcopy`), switches a migration that may
    /// switch to postcopy at the end of the round under way.
    pub postcopy_trigger: PostcopyTrigger,
    /// How a postcopy broken by a lost link is resumed ([`crate::recovery`]). Default:
    /// reconnect to the same address for up to 60 s.
    pub postcopy_recovery: crate::recovery::SourceRecovery,
    /// QEMU's `pause-before-switchover`: once the guest is paused for the switchover (or
    /// the switch to postcopy), wait until the embedder posts to this gate (QMP's
    /// `migrate-continue`) before its devices' and vCPUs' state are saved, so that it can do
    /// its own work meanwhile (e.g. release a shared resource). The wait counts in the
    /// downtime; the switchover bound starts after it. A cancel during it resumes the guest
    /// here. Default none: no wait.
    pub pause_before_switchover: Option<crate::recovery::Mailbox<()>>,
    /// The guest is paused (stopped by its operator) as the migration starts: it is migrated
    /// as it is, never resumed here (not after a failure either), and stays paused on the
    /// destination (QEMU migrates a stopped guest so). Needs a destination with the `paused
    /// guest` feature (protocol version 5). Default false: a running guest.
    pub guest_paused: bool,
    /// Throttle the guest's vCPUs progressively while rounds stop shrinking (QEMU's
    /// auto-converge): after two rounds in a row that each saw at least half as many pages
    /// dirtied as they sent, the throttle goes to [`THROTTLE_INITIAL`] (20%), and up by
    /// [`THROTTLE_STEP`] (10 points) after every further two such rounds, to at most
    /// [`THROTTLE_MAX`] (99%). A guest whose [`crate::Guest::set_throttle`] fails migrates
    /// on unthrottled. Default on.
    pub auto_converge: bool,
    /// How auto-converge throttles (QEMU's `cpu-throttle-initial`, `cpu-throttle-increment`,
    /// `max-cpu-throttle`, `throttle-trigger-threshold`); settable live through
    /// [`Self::live`]. Default QEMU's: 20 %, +10 points, at most 99 %, a round counting as
    /// not shrinking when it saw at least 50 % as many pages dirtied as it sent.
    pub throttle: ThrottlePolicy,
    /// Pages (4 KiB) per RamPages packet, 1 to [`MAX_PAGES_PER_PACKET`]; the destination
    /// refuses a session asking for more than its [`Limits`] allow. Default
    /// [`DEFAULT_PAGES_PER_PACKET`].
    pub pages_per_packet: u32,
    /// Each page sent carries its CRC32C, checked by the destination. Off by default: the
    /// source trusts the transport, as QEMU, Cloud Hypervisor and Firecracker do (TCP's
    /// checksum; TLS authenticates every byte), and saves a pass over each page on both
    /// sides, which on a 2-core host is about a third of a migration's CPU. On, a page
    /// corrupted on the way is caught (one torn by the guest in precopy is sent again).
    pub page_checksums: bool,
    /// Compress RAM pages with zstd at this level (`None`: send them as they are, the
    /// default). For links slower than the CPU can compress; a packet goes compressed only
    /// when that makes it smaller. The level must be in zstd's range.
    pub compress: Option<i32>,
    /// How long to keep retrying a refused connection while the destination starts; once the
    /// main channel is open, the most the rest of set-up may take (a deadline, however the
    /// destination trickles its answers). Default 10 s.
    pub connect_timeout: Duration,
    /// The longest the guest may stay paused for the switchover: from its pause until the
    /// destination has loaded everything (its last pages, every device's last state within
    /// the destination's credit, the vCPU and VM state). Past it the attempt is torn down and
    /// the guest runs on here. The destination's `Resumed` after the handover is then awaited
    /// for the peer timeout. Must not be 0. Default [`DEFAULT_SWITCHOVER_TIMEOUT`] (30 s).
    pub switchover_timeout: Duration,
    /// A hard bound on the switchover's pause (QMP's `x-downtime-hard-limit`; `None`, the
    /// default: only [`Self::switchover_timeout`]). A switchover the destination has not
    /// loaded this long after the guest paused (a device's final read stalling, a link
    /// slowing down) is abandoned, not waited for: the devices are told to stop
    /// ([`crate::Device::interrupt_save`]), the guest runs on here with its dirty log
    /// running, and the same session goes on in a new connection from the pages the last
    /// switchover did not confirm, its expected downtime floored at what the abandoned one
    /// had taken. After [`Self::switchover_attempts`] abandoned switchovers,
    /// [`Self::on_no_convergence`] decides. Needs the destination's `switchover retry`
    /// feature; not with local mode or postcopy (yet).
    pub downtime_hard_limit: Option<Duration>,
    /// Wait for the destination's word that every device twin has loaded what its source
    /// must send before a switchover ([`crate::Device::switchover_ready`], QEMU's
    /// `switchover-ack`): precopy goes on, however well it converged, until it comes. A
    /// switchover forced by a round or time bound does not wait. Needs the destination's
    /// `switchover ack` feature. Off by default.
    pub switchover_ack: bool,
    /// How many switchovers may be abandoned past [`Self::downtime_hard_limit`] before
    /// [`Self::on_no_convergence`] decides: `Force` runs the next one without the bound,
    /// `Cancel` fails the migration (the guest running here). At least 1; default 3.
    pub switchover_attempts: u32,
    /// Device state on the data channels with credit (the default), or each device in turn
    /// on the main channel at switchover (the baseline livemig is compared with). See
    /// [`crate::device`] for the calls each makes.
    pub device_transfer: DeviceTransfer,
    /// Guest RAM copied over the data channels (the default), or, in local mode, the files
    /// backing it handed to a destination on the same host (`unix:` address and memfd-backed
    /// guest memory needed; see `local`).
    pub ram: RamTransfer,
    /// Bytes per device chunk: the `max` handed to [`crate::Device::save_precopy`] and
    /// [`crate::Device::save_final`], 1 byte to [`MAX_CHUNK_SIZE`]. Default 1 MiB.
    pub chunk_size: u32,
    /// Chunks of credit per device to ask the destination for (0, the default: whatever the
    /// destination's [`IncomingConfig::credit_window`] gives). The destination may grant
    /// fewer; the report says what it granted.
    pub credit_window: u32,
    /// Bytes of device chunks to ask the destination to buffer at most (0, the default: the
    /// destination's [`IncomingConfig::buffer_cap`]). The destination may grant less, and
    /// refuses the session if the cap cannot hold one chunk per device.
    pub buffer_cap: u64,
    /// A destination silent this long (no frame, not even a ping) or not reading for this
    /// long is taken for dead: the migration fails and the guest runs on here. Idle data
    /// channels ping every quarter of it. TCP keepalive and user timeout follow it too. The
    /// shorter of the two sides' timeouts governs both. At least [`MIN_PEER_TIMEOUT`];
    /// default [`DEFAULT_PEER_TIMEOUT`] (30 s).
    pub peer_timeout: Duration,
    /// TLS 1.3 with mutual authentication on every channel (none: plain sockets, the
    /// default). The destination must use TLS too. Not with local mode.
    pub tls: Option<Arc<TlsConfig>>,
    /// Cancels the migration from outside ([`CancelToken::cancel`] from any thread); the
    /// migration then fails with [`MigrationError::Cancelled`] and the guest runs on here,
    /// unless it was already handed over. A token already cancelled fails the next
    /// migration that uses it at once: use a fresh token per attempt.
    pub cancel: CancelToken,
    /// The live counters, for watching the migration from outside (reset when an attempt's
    /// session starts).
    pub stats: LiveStats,
    /// Fault injection for tests; empty without the `test-hooks` feature. Leave it at its
    /// default.
    pub test_hooks: SourceTestHooks,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            channels: 4,
            downtime_limit: Duration::from_millis(300),
            max_bandwidth: None,
            avail_switchover_bandwidth: None,
            live: LiveParams::new(),
            max_rounds: 30,
            max_precopy_time: Duration::from_secs(120),
            on_no_convergence: NoConvergence::Force,
            postcopy: PostcopyPolicy::default(),
            postcopy_trigger: PostcopyTrigger::default(),
            max_postcopy_bandwidth: None,
            postcopy_recovery: Default::default(),
            pause_before_switchover: None,
            guest_paused: false,
            auto_converge: true,
            throttle: ThrottlePolicy::default(),
            pages_per_packet: DEFAULT_PAGES_PER_PACKET,
            connect_timeout: Duration::from_secs(10),
            switchover_timeout: DEFAULT_SWITCHOVER_TIMEOUT,
            downtime_hard_limit: None,
            switchover_attempts: 3,
            switchover_ack: false,
            device_transfer: DeviceTransfer::Multifd,
            ram: RamTransfer::Copy,
            page_checksums: false,
            compress: None,
            chunk_size: 1 << 20,
            credit_window: 0,
            buffer_cap: 0,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            tls: None,
            cancel: CancelToken::new(),
            stats: LiveStats::new(),
            test_hooks: SourceTestHooks::default(),
        }
    }
}

impl MigrationConfig {
    /// The downtime limit in force: [`Self::live`]'s if set, else [`Self::downtime_limit`].
    pub fn downtime_limit_now(&self) -> Duration {
        self.live.downtime_limit().unwrap_or(self.downtime_limit)
    }

    /// The throttle policy in force: [`Self::live`]'s if set, else [`Self::throttle`].
    pub fn throttle_now(&self) -> ThrottlePolicy {
        self.live.throttle().unwrap_or(self.throttle)
    }

    /// The bandwidth cap in force: [`Self::live`]'s if set, else [`Self::max_bandwidth`].
    pub fn max_bandwidth_now(&self) -> Option<u64> {
        self.live.max_bandwidth().unwrap_or(self.max_bandwidth)
    }

    /// The switchover bandwidth in force: [`Self::live`]'s if set, else
    /// [`Self::avail_switchover_bandwidth`].
    pub fn avail_switchover_bandwidth_now(&self) -> Option<u64> {
        self.live
            .switchover_bandwidth()
            .unwrap_or(self.avail_switchover_bandwidth)
    }

    /// Checks every field against its range (channels, pages per packet, chunk size, peer
    /// timeout, switchover timeout, zstd level, bandwidth); [`crate::migrate_vm`] calls it
    /// first. An error names the field and its allowed range.
    pub fn validate(&self) -> Result<(), MigrationError> {
        self.throttle.validate().map_err(MigrationError::Config)?;
        if self.channels == 0 || self.channels > MAX_CHANNELS {
            return Err(MigrationError::Config(format!(
                "channels = {}: must be 1..={MAX_CHANNELS}",
                self.channels
            )));
        }
        if self.pages_per_packet == 0 || self.pages_per_packet > MAX_PAGES_PER_PACKET {
            return Err(MigrationError::Config(format!(
                "pages per packet = {}: must be 1..={MAX_PAGES_PER_PACKET}",
                self.pages_per_packet
            )));
        }
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(MigrationError::Config(format!(
                "chunk size = {}: must be 1 byte to {} MiB",
                self.chunk_size,
                MAX_CHUNK_SIZE >> 20
            )));
        }
        if self.peer_timeout < MIN_PEER_TIMEOUT {
            return Err(MigrationError::Config(format!(
                "peer timeout {:?}: must be at least {MIN_PEER_TIMEOUT:?}",
                self.peer_timeout
            )));
        }
        if self.switchover_timeout.is_zero() {
            return Err(MigrationError::Config(
                "switchover timeout 0: the guest could never be paused".into(),
            ));
        }
        if let Some(level) = self.compress {
            let levels = zstd::compression_level_range();
            if !levels.contains(&level) {
                return Err(MigrationError::Config(format!(
                    "zstd level {level}: must be {}..={}",
                    levels.start(),
                    levels.end()
                )));
            }
        }
        if self.on_no_convergence == NoConvergence::Postcopy && !self.postcopy.allowed {
            return Err(MigrationError::Config(
                "on no convergence 'postcopy' needs postcopy allowed".into(),
            ));
        }
        if self.postcopy.allowed && self.ram == RamTransfer::Local {
            return Err(MigrationError::Config(
                "postcopy and local mode do not go together: local mode moves no page".into(),
            ));
        }
        if self.postcopy.allowed && self.compress.is_some() {
            return Err(MigrationError::Config(
                "postcopy does not take compressed pages yet: leave compression off".into(),
            ));
        }
        if self.max_postcopy_bandwidth == Some(0) {
            return Err(MigrationError::Config(
                "max postcopy bandwidth 0 would never finish; leave it unset for no cap".into(),
            ));
        }
        self.validate_hard_limit()?;
        if self.avail_switchover_bandwidth == Some(0) {
            return Err(MigrationError::Config(
                "available switchover bandwidth 0: leave it unset to use the measured rate".into(),
            ));
        }
        if self.max_bandwidth == Some(0) {
            return Err(MigrationError::Config(
                "max bandwidth 0 would never finish; leave it unset for no cap".into(),
            ));
        }
        Ok(())
    }
}

impl MigrationConfig {
    /// The hard bound on the pause: not 0, not where a switchover cannot be abandoned and
    /// taken up again in a new connection.
    fn validate_hard_limit(&self) -> Result<(), MigrationError> {
        let Some(limit) = self.downtime_hard_limit else {
            return Ok(());
        };
        let refuse = |why: &str| {
            Err(MigrationError::Config(format!(
                "downtime hard limit: {why}"
            )))
        };
        if limit.is_zero() {
            return refuse("0 would abandon every switchover; leave it unset for no bound");
        }
        if self.switchover_attempts == 0 {
            return refuse("switchover attempts must be at least 1");
        }
        if self.ram == RamTransfer::Local {
            return refuse("not with local mode (its memory files are handed over once)");
        }
        if self.postcopy.allowed {
            return refuse("not with postcopy yet");
        }
        Ok(())
    }
}

/// What a migration that did not converge within its round or time bound does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NoConvergence {
    /// Switch over anyway; the report says it was forced and the downtime expected.
    #[default]
    Force,
    /// Give up: the migration fails with the expected downtime, the guest runs on here.
    Cancel,
    /// Switch to postcopy (needs [`PostcopyPolicy::allowed`]).
    Postcopy,
}

/// When a migration may switch to postcopy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PostcopyPolicy {
    /// The session is set up so that it can switch (an urgent channel for requested pages,
    /// data channels kept open after precopy). Off by default.
    pub allowed: bool,
    /// Switch after this many precopy rounds (round 0 included) unless precopy converged
    /// first; `None`: only on [`NoConvergence::Postcopy`] (or a command).
    pub after_rounds: Option<u32>,
}

/// A switch to postcopy asked for from outside; clones share it.
#[derive(Debug, Clone, Default)]
pub struct PostcopyTrigger(Arc<std::sync::atomic::AtomicBool>);

impl PostcopyTrigger {
    /// Asks the migration to switch to postcopy at the end of its round under way.
    pub fn fire(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the switch was asked for.
    pub fn fired(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl PostcopyPolicy {
    /// Whether postcopy may happen at all.
    pub fn allowed(&self) -> bool {
        self.allowed
    }
}

/// How auto-converge throttles the guest's vCPUs (see [`MigrationConfig::throttle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottlePolicy {
    /// The first throttle, percent (1..=99).
    pub initial: u8,
    /// Points added after every further two rounds that do not shrink (1..=99).
    pub increment: u8,
    /// The most it throttles, percent (1..=99).
    pub max: u8,
    /// A round does not shrink when the pages dirtied during it reach this percentage of the
    /// pages it sent (1..=100).
    pub trigger_threshold: u8,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        ThrottlePolicy {
            initial: THROTTLE_INITIAL,
            increment: THROTTLE_STEP,
            max: THROTTLE_MAX,
            trigger_threshold: 50,
        }
    }
}

impl ThrottlePolicy {
    /// Each field within QEMU's ranges, or which is not.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v, top) in [
            ("cpu throttle initial", self.initial, 99),
            ("cpu throttle increment", self.increment, 99),
            ("max cpu throttle", self.max, 99),
            ("throttle trigger threshold", self.trigger_threshold, 100),
        ] {
            if !(1..=top).contains(&v) {
                return Err(format!("{name} = {v}: must be 1..={top}"));
            }
        }
        Ok(())
    }
}

/// Auto-converge's first throttle, percent (QEMU's default).
pub const THROTTLE_INITIAL: u8 = 20;
/// Auto-converge's step, percentage points added after every two rounds that do not shrink
/// (QEMU's default).
pub const THROTTLE_STEP: u8 = 10;
/// Auto-converge's ceiling, percent (QEMU's default).
pub const THROTTLE_MAX: u8 = 99;

/// Fault injection for tests: arrival orders made adversarial, the engine broken on purpose
/// to prove the tests catch it. Compiled in only with the `test-hooks` cargo feature (the
/// cli's tests turn it on through a dev-dependency), so a release build's hot paths carry
/// none of it; a process takes them from [`test_hooks::TEST_HOOKS_ENV`].
pub mod test_hooks {
    use livemig_wire::{Features, Versions};
    use std::time::Duration;

    /// The environment variable a process reads its test hooks from: a comma-separated list
    /// of `chunk-order=natural|reverse|delay-channel`, `break-round-order`,
    /// `tls-no-client-cert`, `late-first-loaded=MS` (the destination's first `Loaded` is
    /// sent MS late), `protocol=N` (speak protocol version N only, as a release of
    /// that version would, both sides) and `lack=FEATURE` (`zstd`, `page-checksums`,
    /// `local`, `postcopy`, `postcopy-recovery`: neither offer nor accept it). A process
    /// hands it on to the processes it starts.
    pub const TEST_HOOKS_ENV: &str = "LIVEMIG_TEST_HOOKS";

    /// The order in which the source sends a device's chunks.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub enum ChunkOrder {
        /// In stream order, each to whichever channel is free.
        #[default]
        Natural,
        /// Each credit window's chunks back to front: the chunk the loader needs arrives
        /// last, so the destination must buffer a whole window before it can load anything.
        Reverse,
        /// Data channel 0 waits this long before sending each chunk, so chunks overtake it.
        DelayChannel0(Duration),
    }

    /// The source's hooks.
    #[derive(Debug, Clone, Default)]
    pub struct SourceTestHooks {
        /// The order of device chunks.
        #[cfg(feature = "test-hooks")]
        pub chunk_order: ChunkOrder,
        /// What the source speaks and offers in its hello.
        #[cfg(feature = "test-hooks")]
        pub protocol: Protocol,
    }

    /// The destination's hooks.
    #[derive(Debug, Clone, Default)]
    pub struct TestHooks {
        /// Skip the end-of-round sync between data channels and apply data channel 0's
        /// pages late, newest first, so older copies of a page land after newer ones.
        #[cfg(feature = "test-hooks")]
        pub break_round_order: bool,
        /// Fail to put guest memory under userfaultfd at the switch to postcopy, as a host
        /// without userfaultfd would, before the guest runs here.
        #[cfg(feature = "test-hooks")]
        pub postcopy_arm_fails: bool,
        /// What the destination speaks and accepts.
        #[cfg(feature = "test-hooks")]
        pub protocol: Protocol,
        /// The first session to load everything waits this long before it sends `Loaded`,
        /// as a destination whose load is slow (later sessions, e.g. the continuation of
        /// an abandoned switchover, do not).
        #[cfg(feature = "test-hooks")]
        pub late_first_loaded: Option<LateOnce>,
    }

    /// A delay taken once per process, by whichever session comes to it first.
    #[derive(Debug, Clone)]
    pub struct LateOnce {
        /// How late.
        pub delay: Duration,
        taken: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl LateOnce {
        /// A delay not yet taken.
        pub fn new(delay: Duration) -> Self {
            LateOnce {
                delay,
                taken: Default::default(),
            }
        }

        /// The delay the first time it is asked for, then none.
        pub fn take(&self) -> Option<Duration> {
            use std::sync::atomic::Ordering::SeqCst;
            (!self.taken.swap(true, SeqCst)).then_some(self.delay)
        }
    }

    /// The protocol a side speaks, narrowed for tests: one version only (a release of that
    /// version), features taken away.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Protocol {
        /// Speak this version only (`None`: every version this build speaks).
        pub only: Option<u16>,
        /// Features this side does without.
        pub lack: Features,
    }

    impl Protocol {
        /// The versions spoken.
        pub fn versions(&self) -> Versions {
            self.only
                .map_or(Versions::THIS, |v| Versions { min: v, max: v })
        }

        /// The features had.
        pub fn features(&self) -> Features {
            Features::ALL.without(self.lack)
        }
    }

    impl SourceTestHooks {
        /// How long data channel `index` waits before each device chunk (never, without the
        /// feature).
        #[inline]
        pub fn chunk_delay(&self, index: u16) -> Option<Duration> {
            #[cfg(feature = "test-hooks")]
            if let (ChunkOrder::DelayChannel0(d), 0) = (self.chunk_order, index) {
                return Some(d);
            }
            let _ = index;
            None
        }

        /// Whether device chunks go out back to front, window by window.
        #[inline]
        pub fn reverse_chunks(&self) -> bool {
            #[cfg(feature = "test-hooks")]
            return self.chunk_order == ChunkOrder::Reverse;
            #[cfg(not(feature = "test-hooks"))]
            false
        }

        /// What the source speaks and offers (everything, without the feature).
        pub fn protocol(&self) -> Protocol {
            #[cfg(feature = "test-hooks")]
            return self.protocol;
            #[cfg(not(feature = "test-hooks"))]
            Protocol::default()
        }
    }

    impl TestHooks {
        /// Whether the destination breaks round order on purpose (a constant false without
        /// the feature, so the receive loop's branches fold away).
        #[inline]
        pub fn break_round_order(&self) -> bool {
            #[cfg(feature = "test-hooks")]
            return self.break_round_order;
            #[cfg(not(feature = "test-hooks"))]
            false
        }

        /// Whether the switch to postcopy fails here on purpose before the guest runs.
        #[inline]
        pub fn postcopy_arm_fails(&self) -> bool {
            #[cfg(feature = "test-hooks")]
            return self.postcopy_arm_fails;
            #[cfg(not(feature = "test-hooks"))]
            false
        }

        /// What the destination speaks and accepts (everything, without the feature).
        pub fn protocol(&self) -> Protocol {
            #[cfg(feature = "test-hooks")]
            return self.protocol;
            #[cfg(not(feature = "test-hooks"))]
            Protocol::default()
        }
    }

    /// Both sides' hooks as [`TEST_HOOKS_ENV`] spells them.
    #[derive(Debug, Clone, Default)]
    pub struct Hooks {
        /// The source's.
        pub source: SourceTestHooks,
        /// The destination's.
        pub destination: TestHooks,
        /// A TLS client that presents no certificate (to show a destination refuses it).
        pub tls_no_client_cert: bool,
    }

    impl Hooks {
        /// The hooks [`TEST_HOOKS_ENV`] asks for (none when it is unset). Set in a build
        /// without the `test-hooks` feature, or naming an unknown hook, it is an error.
        pub fn from_env() -> Result<Hooks, String> {
            match std::env::var(TEST_HOOKS_ENV) {
                Ok(spec) if !spec.is_empty() => Hooks::parse(&spec),
                _ => Ok(Hooks::default()),
            }
        }

        #[cfg(not(feature = "test-hooks"))]
        fn parse(_spec: &str) -> Result<Hooks, String> {
            Err(format!(
                "{TEST_HOOKS_ENV} is set, but this build has no test hooks (the engine's \
                 `test-hooks` feature is off)"
            ))
        }

        #[cfg(feature = "test-hooks")]
        fn parse(spec: &str) -> Result<Hooks, String> {
            let mut hooks = Hooks::default();
            for item in spec.split(',').map(str::trim) {
                match item {
                    "break-round-order" => hooks.destination.break_round_order = true,
                    "postcopy-arm-fails" => hooks.destination.postcopy_arm_fails = true,
                    "tls-no-client-cert" => hooks.tls_no_client_cert = true,
                    "chunk-order=natural" => hooks.source.chunk_order = ChunkOrder::Natural,
                    "chunk-order=reverse" => hooks.source.chunk_order = ChunkOrder::Reverse,
                    "chunk-order=delay-channel" => {
                        hooks.source.chunk_order =
                            ChunkOrder::DelayChannel0(Duration::from_millis(5))
                    }
                    other if other.starts_with("late-first-loaded=") => {
                        let ms = other["late-first-loaded=".len()..]
                            .parse::<u64>()
                            .map_err(|_| format!("{TEST_HOOKS_ENV}: '{other}': milliseconds"))?;
                        hooks.destination.late_first_loaded =
                            Some(LateOnce::new(Duration::from_millis(ms)));
                    }
                    other => hooks.protocol(other)?,
                }
            }
            Ok(hooks)
        }

        /// `protocol=N` and `lack=FEATURE`, for both sides.
        #[cfg(feature = "test-hooks")]
        fn protocol(&mut self, item: &str) -> Result<(), String> {
            let mut p = self.source.protocol;
            if let Some(v) = item.strip_prefix("protocol=") {
                match v.parse::<u16>() {
                    Ok(v) if Versions::THIS.contains(v) => p.only = Some(v),
                    _ => {
                        return Err(format!(
                            "{TEST_HOOKS_ENV}: '{item}': this build speaks {}",
                            Versions::THIS
                        ))
                    }
                }
            } else if let Some(name) = item.strip_prefix("lack=") {
                let f = Features::from_name(name)
                    .ok_or_else(|| format!("{TEST_HOOKS_ENV}: '{item}': no such feature"))?;
                p.lack = p.lack.union(f);
            } else {
                return Err(format!("{TEST_HOOKS_ENV}: unknown hook '{item}'"));
            }
            self.source.protocol = p;
            self.destination.protocol = p;
            Ok(())
        }
    }
}
pub use test_hooks::{ChunkOrder, LateOnce, Protocol, SourceTestHooks, TestHooks};

/// The destination's configuration ([`crate::receive_vm`]).
#[derive(Debug, Clone)]
pub struct IncomingConfig {
    /// Bounds on what a peer may make this side allocate (frame sizes, pages per packet):
    /// every length a peer sends is checked against them before anything is allocated.
    /// Default [`Limits::default`].
    pub limits: Limits,
    /// The largest guest memory, in bytes, a source may ask this side to allocate; a
    /// session asking for more is refused (and the wait goes on). Default: this host's
    /// total RAM ([`host_memory_bytes`]), or 16 GiB if `/proc/meminfo` cannot be read.
    pub max_guest_memory: u64,
    /// Time for all data channels to join once the session is accepted; past it the
    /// session fails with [`crate::IncomingError::Setup`]. Default 10 s.
    pub setup_timeout: Duration,
    /// Time for a new connection, from its accept, to complete its TLS handshake (if any)
    /// and send its first frame; a connection that does not is refused and the wait goes on.
    /// Default 5 s.
    pub handshake_timeout: Duration,
    /// Check every page of the loaded guest ([`crate::Guest::verify`]) before resuming it,
    /// failing the session on any wrong page (a test instrument). Default off.
    pub verify: bool,
    /// Chunks of credit each device gets at most (0, the default: 2 x the session's data
    /// channels). A source may ask for less; the buffer cap may narrow it further.
    pub credit_window: u32,
    /// Bytes of device chunks buffered at most across devices (default 256 MiB; 0: every
    /// device's full window, as large as the hello makes it). A source may ask for less,
    /// never for more: the destination's memory is its own decision.
    pub buffer_cap: u64,
    /// A source silent this long on a data channel (no frame, not even a ping), not reading
    /// for this long, or this late with `Complete` or `Handover` once due, is taken for dead:
    /// the session fails and the guest is dropped, never resumed. The main channel pings the
    /// source every quarter of it. The shorter of the two sides' timeouts governs both.
    /// Default [`DEFAULT_PEER_TIMEOUT`] (30 s).
    pub peer_timeout: Duration,
    /// TLS 1.3 with mutual authentication on every channel (none: plain sockets): a
    /// connection without a valid client certificate is refused at the TLS layer. Default
    /// none.
    pub tls: Option<Arc<TlsConfig>>,
    /// Stops waiting for a source (a session already under way runs to its end: cancel it
    /// on the source). [`crate::receive_vm`] then fails with
    /// [`crate::IncomingError::Cancelled`].
    pub cancel: CancelToken,
    /// How this side waits for the source to resume a postcopy broken by a lost link
    /// ([`crate::recovery`]). Default: on the same listener, for up to 60 s.
    pub postcopy_recovery: crate::recovery::IncomingRecovery,
    /// Fault injection for tests; empty without the `test-hooks` feature. Leave it at its
    /// default.
    pub test_hooks: TestHooks,
}

impl Default for IncomingConfig {
    fn default() -> Self {
        IncomingConfig {
            limits: Limits::default(),
            max_guest_memory: host_memory_bytes().unwrap_or(16 << 30),
            setup_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            verify: false,
            credit_window: 0,
            buffer_cap: DEFAULT_BUFFER_CAP,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            tls: None,
            cancel: CancelToken::new(),
            postcopy_recovery: Default::default(),
            test_hooks: TestHooks::default(),
        }
    }
}

/// Total RAM of this host, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
