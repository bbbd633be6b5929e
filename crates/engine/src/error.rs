//! Errors of the engine, each naming the channel or phase where it happened.
//!
//! What an embedder must know first is where the guest is after an error: on the source
//! ([`MigrationError`]) it runs on there, resumed and with its devices' saves aborted, except
//! after [`MigrationError::HandoverUnknown`]; on the destination ([`IncomingError`]) the
//! guest built for the session is dropped, never resumed.

use crate::guest::GuestError;
use livemig_wire::{Reject, WireError};
use std::fmt;
use std::io;

/// Which connection of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelName {
    /// The main channel: session set-up, control messages, the state at switchover, and
    /// the return path from the destination.
    Main,
    /// Data channel `n` (from 0): RAM pages and device chunks.
    Data(u16),
    /// A connection not yet bound to a channel (during the handshake).
    Incoming,
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelName::Main => write!(f, "main channel"),
            ChannelName::Data(i) => write!(f, "data channel {i}"),
            ChannelName::Incoming => write!(f, "incoming connection"),
        }
    }
}

/// A failure on one connection. Every variant names the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A socket operation failed. A timeout (`WouldBlock`/`TimedOut`) means the peer sent
    /// or read nothing within the peer timeout: it is dead, stuck or cut off.
    #[error("{channel}: {op} failed: {}", describe_io(source))]
    Io {
        /// The connection.
        channel: ChannelName,
        /// What was being done, e.g. `"send"` or `"clone socket"`.
        op: &'static str,
        /// The system's error.
        #[source]
        source: io::Error,
    },
    /// The peer sent bytes that do not decode (bad magic, version, CRC, a length over the
    /// limits, an unknown value): a peer of another version or a corrupted link.
    #[error("{channel}: malformed data from peer: {source}")]
    Wire {
        /// The connection.
        channel: ChannelName,
        /// What the decoder found wrong.
        #[source]
        source: WireError,
    },
    /// The peer refused and said why (a `Reject` frame: a session it cannot build, a
    /// failure on its side). The reason is the peer's, and usually the one to show.
    #[error("{channel}: peer refused: {reject}")]
    Rejected {
        /// The connection.
        channel: ChannelName,
        /// The peer's code and reason.
        reject: Reject,
    },
    /// The peer closed the connection where the protocol expected more.
    #[error("{channel}: peer closed the connection")]
    Closed {
        /// The connection.
        channel: ChannelName,
    },
    /// The peer sent a well-formed frame at the wrong moment, or failed to send one in
    /// time (e.g. no `Handover` within the peer timeout).
    #[error("{channel}: protocol error: {detail}")]
    Protocol {
        /// The connection.
        channel: ChannelName,
        /// What was expected and what came.
        detail: String,
    },
}

/// Why an outgoing migration ([`crate::migrate_vm`]) failed.
///
/// Unless the variant says otherwise, the source guest runs on: [`crate::migrate_vm`] has
/// lifted any throttle, stopped the dirty log, called [`crate::Device::abort_save`] on every
/// streamed device and resumed the guest if it had paused it, and the destination has been
/// sent a `Reject` saying why, so it drops its copy. Such a migration may simply be retried
/// (with a fresh [`crate::CancelToken`] if it was cancelled).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The configuration or the VM cannot be migrated as asked (a field out of range, too
    /// many devices, local mode without a `unix:` address or file-backed memory). Nothing
    /// was opened and the guest was not touched; fix the configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Set-up failed: the destination could not be reached within the connect timeout, or
    /// a channel's connect or TLS handshake failed. The guest was not touched.
    #[error("connecting to {to} failed: {source}")]
    Connect {
        /// The address, as given.
        to: String,
        /// Why (a TLS failure is wrapped as [`io::ErrorKind::Other`] holding a
        /// [`crate::TlsError`]).
        #[source]
        source: io::Error,
    },
    /// Precopy hit [`crate::MigrationConfig::max_rounds`] or
    /// [`crate::MigrationConfig::max_precopy_time`] without converging, and
    /// [`crate::NoConvergence::Cancel`] was configured. The guest runs on here; retry with a
    /// larger downtime limit, more bandwidth, or auto-converge (which does nothing for
    /// devices whose final state alone takes longer than the limit to read).
    #[error(
        "did not converge: after {rounds} rounds ({throttle_percent}% throttle) the rest (RAM and device state) would take {expected_downtime_ms:.0} ms against a limit of {limit_ms:.0} ms; cancelled as configured, the guest runs on here"
    )]
    NotConverged {
        /// Precopy rounds run.
        rounds: u32,
        /// The downtime the last round predicted, milliseconds.
        expected_downtime_ms: f64,
        /// The downtime limit in force ([`crate::MigrationConfig::downtime_limit_now`]),
        /// milliseconds.
        limit_ms: f64,
        /// Auto-converge's throttle at the end, percent.
        throttle_percent: u8,
    },
    /// A switchover ran past [`crate::MigrationConfig::downtime_hard_limit`] and was
    /// abandoned. Within a migration the engine takes this up itself (the guest resumes
    /// here, the session goes on in a new connection); it ends one only once
    /// [`crate::MigrationConfig::switchover_attempts`] switchovers were abandoned and
    /// [`crate::NoConvergence::Cancel`] is configured. The guest runs on here.
    #[error(
        "switchover abandoned {attempts} times past the hard downtime limit of {limit_ms:.0} ms (the last waited for {waiting_for}); cancelled as configured, the guest runs on here"
    )]
    SwitchoverAbandoned {
        /// Switchovers abandoned.
        attempts: u32,
        /// The bound, milliseconds.
        limit_ms: f64,
        /// What the last one still waited for when it was cut.
        waiting_for: String,
    },
    /// A connection failed, or the destination refused ([`ChannelError::Rejected`] carries
    /// its reason, e.g. a device it could not load).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A [`crate::Guest`] method failed. If it was [`crate::Guest::resume`] on the failure
    /// path, this error replaces the migration's own and the guest may still be paused.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// Every migration thread exited before the migration ended (their events queue closed):
    /// a bug, reported rather than waited on.
    #[error("every migration thread exited before the migration ended")]
    ThreadsGone,
    /// The destination is alive but did not do what it must in time (set-up within the
    /// connect timeout, a round's acknowledgement within the peer timeout, the whole
    /// switchover within [`crate::MigrationConfig::switchover_timeout`]); what was awaited
    /// and the limit are named.
    #[error("gave up waiting for {}: it did not finish within {:?}", .0.awaited, .0.limit)]
    Deadline(crate::source::watchdog::Expired),
    /// [`crate::MigrationConfig::cancel`] was cancelled before the handover.
    #[error("migration cancelled")]
    Cancelled,
    /// The set-up watch thread could not be started.
    #[error("cannot start a migration thread: {0}")]
    Spawn(#[source] io::Error),
    /// A migration thread failed, panicked or could not be started.
    #[error("a migration thread failed: {0}")]
    Job(#[source] crate::runtime::ThreadError),
    /// A [`crate::Device`] or [`crate::VmState`] failed to save, or
    /// [`crate::Device::abort_save`] failed on the failure path (then this replaces the
    /// migration's own error).
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// The guest was handed over, but the destination did not confirm that it runs it (the
    /// connection broke, or no `Resumed` within the peer timeout, or a cancel came). The
    /// destination may or may not run the guest: the source guest stays paused and must not
    /// be resumed blindly. Ask the destination (its VMM knows whether it resumed) before
    /// resuming or destroying the source guest.
    #[error("handover outcome unknown: the destination did not confirm it resumed ({0}); the source guest stays paused")]
    HandoverUnknown(#[source] Box<MigrationError>),
    /// Postcopy broke after the switch: the guest's memory is split between the two hosts, so
    /// the source keeps its copy paused (and its memory) and must not resume it. With
    /// [`crate::MigrationConfig::postcopy_recovery`] this comes only once no resume
    /// succeeded within its window.
    #[error("postcopy broke after the switch ({0}); the guest's memory is split between the hosts, the source keeps its copy paused")]
    PostcopyBroken(#[source] Box<MigrationError>),
}

/// Why an incoming migration ([`crate::receive_vm`]) failed.
///
/// The destination never resumes a guest after one: the guest and devices built for the
/// session (if one was under way) are dropped, the source is sent a `Reject` saying why (so
/// its guest runs on there), and every thread has been joined. The listener stays usable: call
/// [`crate::receive_vm`] again to wait for the next attempt.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// The listener failed to accept a connection (no session was under way).
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] io::Error),
    /// The session could not be set up: its data channels did not all join within
    /// [`crate::IncomingConfig::setup_timeout`], or the source closed its main channel
    /// meanwhile.
    #[error("session set-up failed: {0}")]
    Setup(String),
    /// A connection failed, or the source refused or aborted ([`ChannelError::Rejected`]
    /// carries its reason, e.g. a cancel on the source).
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// A [`crate::Guest`] method failed (restoring its state, resuming it, ...).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// [`crate::IncomingConfig::verify`] found pages that are not what the source had.
    #[error(
        "guest memory check failed: {mismatched} of {checked} pages are wrong, e.g. {example}"
    )]
    Verify {
        /// Pages checked.
        checked: u64,
        /// Pages found wrong.
        mismatched: u64,
        /// The first mismatch, described for a person.
        example: String,
    },
    /// Every migration thread exited before the session ended (their events queue closed):
    /// a bug, reported rather than waited on.
    #[error("every migration thread exited before the migration ended")]
    ThreadsGone,
    /// Everything was loaded and `Loaded` sent, but the source's `Handover` did not come
    /// (the connection broke or the peer timeout passed); the cause is carried. The source
    /// decides: its guest runs on there unless it had already sent the handover.
    #[error("source did not hand over the guest: {0}")]
    NoHandover(#[source] Box<IncomingError>),
    /// Postcopy broke ([`crate::recovery`]) and was not resumed within the recovery window
    /// (or recovery is off, or the wait was cancelled): the guest, whose memory was split
    /// between the hosts, is dropped here; the source keeps its paused copy.
    #[error("postcopy broke ({0}) and was not resumed: the guest, half arrived, is dropped here; the source keeps its paused copy")]
    PostcopyLost(#[source] Box<IncomingError>),
    /// A [`crate::Device`] or [`crate::VmState`] twin failed to load.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// A migration thread failed, panicked or could not be started.
    #[error("a migration thread failed: {0}")]
    Job(#[source] crate::runtime::ThreadError),
    /// Postcopy's userfaultfd side failed (registering guest memory, installing a page,
    /// reading faults).
    #[error(transparent)]
    Postcopy(#[from] crate::postcopy::PostcopyError),
    /// [`crate::IncomingConfig::cancel`] was cancelled while waiting for a source (a
    /// session already under way is not cancelled from this side).
    #[error("incoming migration cancelled before a source connected")]
    Cancelled,
}

/// An I/O error as a person should read it: a socket timeout means the peer went quiet.
fn describe_io(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "no progress within the peer timeout: the peer is dead, stuck or cut off".into()
        }
        _ => e.to_string(),
    }
}

/// Text of a panic payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}
