//! The contract between the engine and a guest.
//!
//! The engine migrates anything that implements [`Guest`]: the synthetic guest of the `vmm`
//! crate (threads dirtying memory), and the KVM micro-VM. The engine needs guest memory through
//! `vm-memory`, a dirty log it can read and clear, pause and resume, and the guest's
//! non-memory state as a versioned blob.

use crate::dirty::DirtyBitmap;
use livemig_wire::GuestDescriptor;
use std::error::Error as StdError;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory as the engine sees it: `vm-memory` regions with an atomic dirty bitmap that
/// records the writes the VMM itself makes.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// An error from a guest operation, naming the operation.
#[derive(Debug, thiserror::Error)]
#[error("guest {op} failed: {source}")]
pub struct GuestError {
    pub op: &'static str,
    #[source]
    pub source: Box<dyn StdError + Send + Sync>,
}

impl GuestError {
    pub fn new(op: &'static str, source: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        GuestError {
            op,
            source: source.into(),
        }
    }
}

/// The result of checking every page of a guest for exactness (a test instrument: guests
/// whose memory follows a known pattern can tell whether each page holds what it must).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub pages_checked: u64,
    pub pages_mismatched: u64,
    /// The guest workload's write counter at the check (0 for a guest without one). It only
    /// grows, so after a migration it must be exactly where the source paused.
    pub counter: u64,
    /// A few of the mismatches, described for a person.
    pub examples: Vec<String>,
}

/// A guest the engine can migrate. All methods take `&self`: the engine calls them from its
/// coordinator thread while its channel threads read memory.
pub trait Guest: Send + Sync {
    /// What the destination must build to receive this guest.
    fn descriptor(&self) -> GuestDescriptor;

    /// Guest memory.
    fn memory(&self) -> &GuestMemory;

    /// Starts dirty tracking; everything logged before is discarded.
    fn start_dirty_log(&self) -> Result<(), GuestError>;

    /// Adds every page written since the last call (or since `start_dirty_log`) to `out`, and
    /// clears the log. Pages the VMM wrote (the `vm-memory` bitmap) count too.
    fn sync_dirty_log(&self, out: &mut DirtyBitmap) -> Result<(), GuestError>;

    /// Stops dirty tracking.
    fn stop_dirty_log(&self) -> Result<(), GuestError>;

    /// Stops the guest; returns once it can no longer change memory or state.
    fn pause(&self) -> Result<(), GuestError>;

    /// Lets a paused guest run again.
    fn resume(&self) -> Result<(), GuestError>;

    /// The guest's non-memory state, versioned. Only called while paused.
    fn save_state(&self) -> Result<Vec<u8>, GuestError>;

    /// Loads state saved by `save_state`, on a paused guest.
    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError>;

    /// Checks every page for exactness. Only called while paused.
    fn verify(&self) -> Result<VerifyReport, GuestError>;

    /// Throttles the guest's vCPUs to run `100 - percent` percent of the time (0 lifts it),
    /// for auto-converge. A guest that cannot be throttled says so; the migration then goes
    /// on without.
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError> {
        let _ = percent;
        Err(GuestError::new(
            "throttle",
            "this guest cannot be throttled",
        ))
    }
}

/// Builds, on the destination, the guest a source described.
pub trait GuestFactory: Sync {
    fn create(&self, desc: &GuestDescriptor) -> Result<Box<dyn Guest>, GuestError>;

    /// Builds the guest on `memory` that already holds its RAM (local mode: the source's
    /// memory files, mapped here). It must not write that memory: until the handover the
    /// source guest still runs on it.
    fn create_on(
        &self,
        desc: &GuestDescriptor,
        memory: GuestMemory,
    ) -> Result<Box<dyn Guest>, GuestError> {
        let _ = (desc, memory);
        Err(GuestError::new(
            "create",
            "this destination cannot take guest memory over (local mode)",
        ))
    }
}
