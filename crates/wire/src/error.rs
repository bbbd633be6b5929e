//! Errors of the wire format. Every variant names what was wrong, so a person reading a
//! migration's failure knows which field of which message the peer got wrong.

use thiserror::Error;

/// An error found while decoding bytes received from a peer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// A frame header did not start with `"LMIG"`: the peer speaks something else.
    #[error("bad magic 0x{found:08x} (expected 0x{expected:08x}): the peer does not speak the livemig protocol")]
    BadMagic {
        /// The first four bytes, as a little-endian u32.
        found: u32,
        /// [`crate::MAGIC`].
        expected: u32,
    },
    /// A frame header carried a protocol version this build does not speak.
    #[error("unsupported protocol version {found} (this build speaks {supported})")]
    UnsupportedVersion {
        /// The peer's version.
        found: u16,
        /// What this build speaks ([`crate::Versions::THIS`]).
        supported: crate::Versions,
    },
    /// A frame header's kind is none of [`crate::FrameKind`]'s values.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("{kind} frame of {len} bytes exceeds the limit of {limit} bytes")]
    /// A frame header announced a payload longer than its kind's limit (checked before
    /// anything is read or allocated).
    TooLong {
        /// The frame's kind.
        kind: &'static str,
        /// The length the header announced.
        len: u64,
        /// The most that kind may carry ([`crate::Limits`]).
        limit: u64,
    },
    #[error("{what}: expected {expected} bytes, got {found}")]
    /// A payload or field was not the length its message says it must be (an empty frame
    /// that is not empty, pages whose count and length disagree, a state blob of the wrong
    /// size).
    BadLength {
        /// The message or field.
        what: &'static str,
        /// The length it must have.
        expected: u64,
        /// The length it had.
        found: u64,
    },
    #[error("CRC32C mismatch in {kind} frame: header says 0x{expected:08x}, payload hashes to 0x{found:08x}")]
    /// A payload (or a page) does not hash to the CRC32C sent with it: it was damaged on
    /// the way.
    BadCrc {
        /// The frame's kind (or what in it was checked).
        kind: &'static str,
        /// The CRC that came with it.
        expected: u32,
        /// The CRC of the bytes that arrived.
        found: u32,
    },
    #[error("{what} is truncated: needed {needed} more bytes")]
    /// A message ended before its fields did.
    Truncated {
        /// The message being read.
        what: &'static str,
        /// How many more bytes the next field needed.
        needed: usize,
    },
    #[error("{what} has {extra} unexpected trailing bytes")]
    /// A message went on after its last field: every message must be exactly as long as
    /// its fields.
    TrailingBytes {
        /// The message being read.
        what: &'static str,
        /// The bytes left over.
        extra: usize,
    },
    #[error("{field} = {value} is out of range ({reason})")]
    /// A field's value is outside what the protocol or this side's limits allow (a count
    /// over its cap, an unknown code, an unaligned address).
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value (a length for strings).
        value: u64,
        /// What it must be.
        reason: &'static str,
    },
    #[error("{field} is not valid UTF-8")]
    /// A string field was not valid UTF-8.
    BadUtf8 {
        /// The field.
        field: &'static str,
    },
    #[error("unexpected {found} frame while waiting for {expected}")]
    /// A frame of another kind came where the protocol has one kind only.
    UnexpectedKind {
        /// The kind the protocol has here.
        expected: &'static str,
        /// The kind that came.
        found: &'static str,
    },
}
