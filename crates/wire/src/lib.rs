//! # livemig-wire
//!
//! The livemig wire format as pure functions: every encoder writes into a buffer, every
//! decoder reads from a slice, and nothing here does I/O. That keeps each decoder easy to
//! fuzz and to test on its own.
//!
//! Every frame starts with a fixed 16-byte [`FrameHeader`] (magic, version, kind, length,
//! CRC32C); [`FrameHeader::decode`] bounds the length by the frame kind before any payload is
//! read, so a peer can never make the receiver allocate more than its [`Limits`] allow.
//! The header's version is that of the payload's layout; the hello and the accept negotiate
//! the session's version and optional features ([`version`]). `docs/protocol.md` in the
//! repository describes the whole protocol, and what a release promises its neighbours.

#![warn(missing_docs)]

mod control;
mod cursor;
pub mod device;
mod error;
pub mod file;
mod frame;
mod postcopy;
pub mod ram;
mod session;
pub mod version;

pub use control::{Complete, Handover, Loaded, Resumed, RoundAck, RoundEnd, RoundStart};
pub use cursor::{Reader, Writer};
pub use device::{
    ChunkHeader, Credit, DeviceLoadStats, DeviceSetup, DeviceTransfer, VmStates, WireDevice,
    CHUNK_PREFIX, MAX_CHUNK_SIZE, MAX_DEVICES,
};
pub use error::WireError;
pub use frame::{
    decode_frame, encode_frame, encode_frame_versioned, verify_payload, FrameHeader, FrameKind,
    Limits, DEFAULT_MAX_GUEST_MEMORY, DEFAULT_PAGES_PER_PACKET, HEADER_LEN, MAGIC,
    MAX_PAGES_PER_PACKET,
};
pub use postcopy::{PageRequest, PostcopyComplete, PostcopyDone, PostcopyStart, MAX_PAGE_REQUEST};
pub use ram::{RamFlags, RamPacket, RamPrefix};
pub use session::{
    ChannelHello, GuestDescriptor, MemoryFiles, MemoryRange, RamTransfer, Reject, RejectCode,
    SessionAccept, SessionHello, SessionId, MAX_CHANNELS, MAX_REGIONS, MAX_VCPUS, PEER_TIMEOUT_MS,
};

pub use version::{
    Agreed, Features, NegotiationError, Offer, Versions, FRAME_VERSION, OLDEST_VERSION,
    PROTOCOL_VERSION,
};

/// The guest page size livemig migrates in.
pub const PAGE_SIZE: usize = 4096;
