//! Errors of the wire format. Every variant names what was wrong, so a person reading a
//! migration's failure knows which field of which message the peer got wrong.

use thiserror::Error;

/// An error found while decoding bytes received from a peer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic 0x{found:08x} (expected 0x{expected:08x}): the peer does not speak the livemig protocol")]
    BadMagic { found: u32, expected: u32 },
    #[error("unsupported protocol version {found} (this build speaks version {supported})")]
    UnsupportedVersion { found: u16, supported: u16 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    #[error("{kind} frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLong {
        kind: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{what}: expected {expected} bytes, got {found}")]
    BadLength {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    #[error("CRC32C mismatch in {kind} frame: header says 0x{expected:08x}, payload hashes to 0x{found:08x}")]
    BadCrc {
        kind: &'static str,
        expected: u32,
        found: u32,
    },
    #[error("{what} is truncated: needed {needed} more bytes")]
    Truncated { what: &'static str, needed: usize },
    #[error("{what} has {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("{field} = {value} is out of range ({reason})")]
    OutOfRange {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("{field} is not valid UTF-8")]
    BadUtf8 { field: &'static str },
    #[error("unexpected {found} frame while waiting for {expected}")]
    UnexpectedKind {
        expected: &'static str,
        found: &'static str,
    },
}
