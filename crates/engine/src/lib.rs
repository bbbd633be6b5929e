//! # livemig-engine
//!
//! Moves a running guest from a source process to a destination process over one main
//! channel and N data channels. The source side is [`source::migrate`], the destination side
//! [`incoming::receive`]; both run on the caller's thread and own every thread they start, so
//! nothing outlives a migration, whatever its outcome.
//!
//! The engine knows guests only through the [`guest::Guest`] trait. `docs/threading.md` and
//! `docs/state-machines.md` in the repository describe the threads and states.
//!
//! # Embedding
//!
//! A VMM implements [`Guest`] for its VM (and [`Device`] or [`VmState`] for each device
//! whose state must move), and on the destination a [`GuestFactory`] and a
//! [`DeviceFactory`] that build their twins from what the source describes. The traits'
//! docs say when each method is called, on which thread, and what it must guarantee. The
//! source then calls [`migrate_vm`]; the destination [`receive_vm`]:
//!
//! ```no_run
//! use livemig_engine::{
//!     migrate_vm, receive_vm, DeviceFactory, Factories, GuestFactory, IncomingConfig,
//!     Listener, MigrationConfig, MigrationError, Vm,
//! };
//!
//! // Source: on success the guest runs on the destination and stays paused here.
//! fn send(vm: Vm<'_>) -> Result<(), Box<dyn std::error::Error>> {
//!     let config = MigrationConfig {
//!         channels: 4,
//!         ..Default::default()
//!     };
//!     match migrate_vm(vm, &"tcp:10.0.0.2:4444".parse()?, &config, &|p| eprintln!("{p:?}")) {
//!         Ok(report) => println!("downtime {:.1} ms", report.downtime_ms),
//!         // The destination may or may not run the guest: ask it before anything else.
//!         Err(e @ MigrationError::HandoverUnknown(_)) => return Err(e.into()),
//!         // Any other error: the guest runs on here, as before.
//!         Err(e) => eprintln!("migration failed, the guest runs on here: {e}"),
//!     }
//!     Ok(())
//! }
//!
//! // Destination: on success the guest was resumed here and is the caller's.
//! fn serve(
//!     guest: &dyn GuestFactory,
//!     devices: &dyn DeviceFactory,
//! ) -> Result<(), Box<dyn std::error::Error>> {
//!     let listener = Listener::bind(&"tcp:0.0.0.0:4444".parse()?)?;
//!     let factories = Factories { guest, devices };
//!     let config = IncomingConfig::default();
//!     let incoming = receive_vm(&listener, factories, &config, &|e| eprintln!("{e}"))?;
//!     println!("received in {:.0} ms", incoming.report.total_ms);
//!     // A real VMM keeps `incoming.guest` and its devices: they are the running VM now.
//!     Ok(())
//! }
//! ```

#![warn(missing_docs)]

pub mod cancel;
pub mod config;
pub mod device;
pub mod dirty;
pub mod error;
mod fdpass;
pub mod file;
mod framed;
pub mod guest;
mod hostmem;
pub mod incoming;
pub mod local;
pub mod postcopy;
pub mod prefault;
pub mod recovery;
pub mod report;
pub mod runtime;
pub mod source;
pub mod stats;
mod thp;
pub mod tls;
pub mod transport;
pub mod tunables;

pub use cancel::CancelToken;
pub use config::{
    ChunkOrder, IncomingConfig, MigrationConfig, NoConvergence, SourceTestHooks, TestHooks,
};
pub use device::{Device, DeviceDescriptor, DeviceError, DeviceFactory, SavePending, VmState};
pub use dirty::DirtyBitmap;
pub use error::{ChannelError, ChannelName, IncomingError, MigrationError};
pub use guest::{Guest, GuestError, GuestFactory, GuestMemory, VerifyReport};
pub use incoming::{receive, receive_vm, Factories, Incoming};
pub use recovery::{IncomingRecovery, Mailbox, SourceRecovery};
pub use report::{
    AbandonedSwitchover, DeviceReport, DowntimeBreakdown, IncomingEvent, IncomingReport,
    MigrationReport, Progress, RoundReport,
};
pub use source::{migrate, migrate_vm, Vm};
pub use stats::{LiveStats, StatsSnapshot};
pub use tls::{TlsConfig, TlsError};
pub use transport::{Endpoint, Listener, Stream};
pub use tunables::LiveParams;
