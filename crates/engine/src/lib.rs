//! # livemig-engine
//!
//! Moves a running guest from a source process to a destination process over one main
//! channel and N data channels. The source side is [`source::migrate`], the destination side
//! [`incoming::receive`]; both run on the caller's thread and own every thread they start, so
//! nothing outlives a migration, whatever its outcome.
//!
//! The engine knows guests only through the [`guest::Guest`] trait. `docs/threading.md` and
//! `docs/state-machines.md` in the repository describe the threads and states.

#![warn(missing_docs)]

pub mod cancel;
pub mod config;
pub mod device;
pub mod dirty;
pub mod error;
mod fdpass;
mod framed;
pub mod guest;
mod hostmem;
pub mod incoming;
pub mod local;
pub mod prefault;
pub mod report;
pub mod runtime;
pub mod source;
pub mod stats;
pub mod tls;
pub mod transport;

pub use cancel::CancelToken;
pub use config::{
    ChunkOrder, IncomingConfig, MigrationConfig, NoConvergence, SourceTestHooks, TestHooks,
};
pub use device::{Device, DeviceDescriptor, DeviceError, DeviceFactory, VmState};
pub use dirty::DirtyBitmap;
pub use error::{ChannelError, ChannelName, IncomingError, MigrationError};
pub use guest::{Guest, GuestError, GuestFactory, GuestMemory, VerifyReport};
pub use incoming::{receive, receive_vm, Factories, Incoming};
pub use report::{
    DeviceReport, DowntimeBreakdown, IncomingEvent, IncomingReport, MigrationReport, Progress,
    RoundReport,
};
pub use source::{migrate, migrate_vm, Vm};
pub use stats::{LiveStats, StatsSnapshot};
pub use tls::{TlsConfig, TlsError};
pub use transport::{Endpoint, Listener, Stream};
