//! # livemig-vmm
//!
//! The guests livemig migrates, behind the engine's [`livemig_engine::Guest`] trait:
//! - [`synthetic`]: memory dirtied by host threads, checkable page by page;
//! - the KVM micro-VM (next).
//!
//! [`Factory`] builds the destination's guest from the source's description.

pub mod devices;
mod factory;
pub mod kvm;
pub mod memory;
pub mod pattern;
pub mod synthetic;
pub mod throttle;

pub use factory::Factory;
