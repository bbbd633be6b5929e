//! The contract between the engine and a guest.
//!
//! The engine migrates anything that implements [`Guest`]: the synthetic guest of the `vmm`
//! crate (threads dirtying memory), and the KVM micro-VM. The engine needs guest memory through
//! `vm-memory`, a dirty log it can read and clear, pause and resume, and the guest's
//! non-memory state as a versioned blob.
//!
//! # Which side calls what, and when
//!
//! ```text
//! source (migrate_vm, on the caller's thread unless noted):
//!   descriptor, memory                    set-up (memory() also from every data channel thread)
//!   start_dirty_log                       start of precopy (not in local mode)
//!   sync_dirty_log                        after every precopy round
//!   set_throttle(p)                       between rounds, with auto-converge
//!   pause                                 switchover begins
//!   sync_dirty_log, stop_dirty_log        the last dirty pass, guest paused
//!   save_state                            on the `lm-src-state` job thread, guest paused
//!   on failure before the handover:       set_throttle(0), stop_dirty_log (errors ignored),
//!                                         then resume if the guest had been paused
//! destination (receive_vm):
//!   GuestFactory::create / create_on      once the session's hello is read
//!   memory                                every data channel thread writes pages into it
//!   restore_state, then verify (if asked) once every page and device has arrived
//!   resume                                after the source's Handover, never before
//! ```
//!
//! On success the source guest is left paused (and its dirty log stopped) for the embedder
//! to tear down; on the destination a guest whose migration failed is dropped, never resumed.

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
    /// The operation that failed, e.g. `"pause"` or `"dirty log"`: a short fixed name for
    /// messages.
    pub op: &'static str,
    /// What the guest's implementation reported.
    #[source]
    pub source: Box<dyn StdError + Send + Sync>,
}

impl GuestError {
    /// An error of operation `op`, caused by `source` (any error, or a message as a
    /// `&str`/`String`).
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
    /// Pages (4 KiB) the check looked at.
    pub pages_checked: u64,
    /// Of those, pages that did not hold what they must. Any at all fails the incoming
    /// migration ([`crate::IncomingError::Verify`]).
    pub pages_mismatched: u64,
    /// The guest workload's write counter at the check (0 for a guest without one). It only
    /// grows, so after a migration it must be exactly where the source paused.
    pub counter: u64,
    /// A few of the mismatches, described for a person.
    pub examples: Vec<String>,
}

/// A guest the engine can migrate.
///
/// All methods take `&self` and the trait is `Send + Sync`: the engine calls the control
/// methods from the coordinator (the caller's thread of [`crate::migrate_vm`] or
/// [`crate::receive_vm`]) and `save_state` from a job thread of its own, while its data
/// channel threads read (source) or write (destination) [`Guest::memory`] at the same time.
/// Control methods are not called concurrently with one another, with one exception: at
/// switchover, `save_state` (on its job thread) runs at the same time as the coordinator's
/// last `sync_dirty_log` and `stop_dirty_log`, the guest paused. The module docs list the
/// order of the calls.
///
/// Any `Err` fails the migration with [`crate::MigrationError::Guest`] or
/// [`crate::IncomingError::Guest`], naming [`GuestError::op`].
pub trait Guest: Send + Sync {
    /// What the destination must build to receive this guest: its kind, vCPUs and memory
    /// ranges (page-aligned, sorted, at most [`livemig_wire::MAX_REGIONS`]). The ranges must
    /// be those of [`Guest::memory`]; the dirty bitmap and every page sent follow them. Called
    /// on the source at set-up; must not change during a migration.
    fn descriptor(&self) -> GuestDescriptor;

    /// Guest memory: the same regions for the guest's whole life. The source's data channel
    /// threads read pages from it while the guest runs (a page torn by a concurrent guest
    /// write is resent, as it is dirty again); the destination's write pages into it before
    /// the guest is resumed. For local mode the regions must be backed by sealed files (see
    /// [`crate::local`]).
    fn memory(&self) -> &GuestMemory;

    /// Starts dirty tracking; everything logged before is discarded. Called once on the
    /// source, when precopy begins (never in local mode, where no page is sent).
    fn start_dirty_log(&self) -> Result<(), GuestError>;

    /// Adds (ORs) every page written since the last call (or since `start_dirty_log`) to
    /// `out`, and clears the log, so no write is ever lost between two calls. Pages the VMM
    /// wrote (the `vm-memory` bitmap) count too. `out` covers [`Guest::descriptor`]'s
    /// ranges. Called after each precopy round, and once more with the guest paused.
    fn sync_dirty_log(&self, out: &mut DirtyBitmap) -> Result<(), GuestError>;

    /// Stops dirty tracking. Called after the last dirty pass, and on the failure path
    /// whatever happened before, so it must also succeed (or harmlessly fail: the error is
    /// ignored there) when tracking was never started or is already stopped.
    fn stop_dirty_log(&self) -> Result<(), GuestError>;

    /// Stops the guest; returns once it can no longer change memory or state (every vCPU
    /// and every VMM thread writing guest memory stopped). The switchover's downtime starts
    /// here (reported as [`crate::DowntimeBreakdown::pause_ms`]).
    fn pause(&self) -> Result<(), GuestError>;

    /// Lets a paused guest run again: on the destination once the source has handed it
    /// over; on the source when a migration that paused it fails or is cancelled before the
    /// handover. Its error is returned to the caller in place of the migration's.
    fn resume(&self) -> Result<(), GuestError>;

    /// The guest's non-memory state (vCPUs, interrupt controller, ...), versioned so the
    /// destination's `restore_state` can refuse a blob it does not understand. Only called
    /// on the source while paused, on a job thread of the migration, possibly while the
    /// coordinator takes the last dirty pass. It travels on the main channel during the
    /// downtime, so it should stay small; the destination refuses a blob over its
    /// [`livemig_wire::Limits::max_state_bytes`] (64 MiB by default).
    fn save_state(&self) -> Result<Vec<u8>, GuestError>;

    /// Loads state saved by `save_state`, on the destination, with the guest not yet
    /// running, after every page has arrived and every device has loaded.
    fn restore_state(&self, blob: &[u8]) -> Result<(), GuestError>;

    /// Checks every page for exactness. Only called on the destination, before the guest
    /// runs, and only when [`crate::IncomingConfig::verify`] asks for it (a test
    /// instrument: a guest that cannot check may return an error, which fails the session).
    fn verify(&self) -> Result<VerifyReport, GuestError>;

    /// Throttles the guest's vCPUs to run `100 - percent` percent of the time (0 lifts it),
    /// for auto-converge ([`crate::MigrationConfig::auto_converge`]); `percent` is at most
    /// [`crate::config::THROTTLE_MAX`]. A guest that cannot be throttled says so (the
    /// default does); the migration then goes on without. Called with 0 on the failure path
    /// (error ignored); on success the throttle is left in place on the paused source guest.
    fn set_throttle(&self, percent: u8) -> Result<(), GuestError> {
        let _ = percent;
        Err(GuestError::new(
            "throttle",
            "this guest cannot be throttled",
        ))
    }
}

/// Builds, on the destination, the guest a source described.
///
/// Called on [`crate::receive_vm`]'s thread, once per session offered, after the session's
/// size is checked against [`crate::IncomingConfig::max_guest_memory`]. An `Err` refuses
/// that session (the source gets a `Reject` with the error's text, and
/// [`crate::IncomingEvent::SessionRefused`] is logged); the destination then waits for the
/// next one.
pub trait GuestFactory: Sync {
    /// Builds a paused guest with fresh memory laid out as `desc.ranges`, into which the
    /// engine writes the pages the source sends. That memory must read as zero when created:
    /// a page the source sends as zero is not written unless this side already wrote it (so
    /// the destination's RSS follows the data, not the guest's size). The guest must not run
    /// until [`Guest::resume`]; if the migration fails it is dropped without running.
    fn create(&self, desc: &GuestDescriptor) -> Result<Box<dyn Guest>, GuestError>;

    /// Builds the guest on `memory` that already holds its RAM (local mode: the source's
    /// memory files, mapped here). It must not write that memory: until the handover the
    /// source guest still runs on it; dropping the guest after a failed attempt must only
    /// unmap it. The default refuses, so a destination without local-mode support refuses
    /// local sessions.
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
