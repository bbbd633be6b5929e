//! Errors of the engine, each naming the channel or phase where it happened.

use crate::guest::GuestError;
use livemig_wire::{Reject, WireError};
use std::fmt;
use std::io;

/// Which connection of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelName {
    Main,
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

/// A failure on one connection.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{channel}: {op} failed: {}", describe_io(source))]
    Io {
        channel: ChannelName,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{channel}: malformed data from peer: {source}")]
    Wire {
        channel: ChannelName,
        #[source]
        source: WireError,
    },
    #[error("{channel}: peer refused: {reject}")]
    Rejected {
        channel: ChannelName,
        reject: Reject,
    },
    #[error("{channel}: peer closed the connection")]
    Closed { channel: ChannelName },
    #[error("{channel}: protocol error: {detail}")]
    Protocol {
        channel: ChannelName,
        detail: String,
    },
}

/// Why an outgoing migration failed. Unless it says otherwise, the source guest runs on.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("connecting to {to} failed: {source}")]
    Connect {
        to: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "did not converge: after {rounds} rounds ({throttle_percent}% throttle) the rest would take {expected_downtime_ms:.0} ms against a limit of {limit_ms:.0} ms; cancelled as configured, the guest runs on here"
    )]
    NotConverged {
        rounds: u32,
        expected_downtime_ms: f64,
        limit_ms: f64,
        throttle_percent: u8,
    },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("every migration thread exited before the migration ended")]
    ThreadsGone,
    #[error("gave up waiting for {}: it did not finish within {:?}", .0.awaited, .0.limit)]
    Deadline(crate::source::watchdog::Expired),
    #[error("migration cancelled")]
    Cancelled,
    #[error("cannot start a migration thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("a migration thread failed: {0}")]
    Job(#[source] crate::runtime::ThreadError),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("handover outcome unknown: the destination did not confirm it resumed ({0}); the source guest stays paused")]
    HandoverUnknown(#[source] Box<MigrationError>),
}

/// Why an incoming migration failed. The destination never resumes a guest after one.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] io::Error),
    #[error("session set-up failed: {0}")]
    Setup(String),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(
        "guest memory check failed: {mismatched} of {checked} pages are wrong, e.g. {example}"
    )]
    Verify {
        checked: u64,
        mismatched: u64,
        example: String,
    },
    #[error("every migration thread exited before the migration ended")]
    ThreadsGone,
    #[error("source did not hand over the guest: {0}")]
    NoHandover(#[source] Box<IncomingError>),
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    #[error("a migration thread failed: {0}")]
    Job(#[source] crate::runtime::ThreadError),
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
