//! Builds, on the destination, whichever guest a source describes.

use crate::{kvm, synthetic};
use livemig_engine::{Guest, GuestError, GuestFactory, GuestMemory};
use livemig_wire::GuestDescriptor;

/// The guests this build can receive.
#[derive(Debug, Default, Clone, Copy)]
pub struct Factory;

impl GuestFactory for Factory {
    fn create(&self, desc: &GuestDescriptor) -> Result<Box<dyn Guest>, GuestError> {
        match desc.kind.as_str() {
            synthetic::KIND => Ok(Box::new(synthetic::create_paused(desc)?)),
            kvm::KIND => Ok(Box::new(kvm::create_paused(desc)?)),
            other => Err(GuestError::new(
                "create",
                format!("guest kind '{other}' is not supported by this destination"),
            )),
        }
    }

    fn create_on(
        &self,
        desc: &GuestDescriptor,
        memory: GuestMemory,
    ) -> Result<Box<dyn Guest>, GuestError> {
        match desc.kind.as_str() {
            synthetic::KIND => Ok(Box::new(synthetic::create_paused_on(desc, memory)?)),
            kvm::KIND => Ok(Box::new(kvm::create_paused_on(desc, memory)?)),
            other => Err(GuestError::new(
                "create",
                format!("guest kind '{other}' is not supported by this destination"),
            )),
        }
    }
}
