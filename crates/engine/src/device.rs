//! The contract between the engine and a device.
//!
//! A device's migration state is a byte stream that must be loaded strictly in the order it
//! was saved (the Linux VFIO migration interface: `read()` the state from the device's
//! migration fd, `write()` it back on the destination in the same order). The engine cuts the
//! stream into chunks, sends them on any data channel, and on the destination hands them back
//! to [`Device::load`] in order.
//!
//! Every method that saves or loads is required: a device cannot "support" migration by
//! doing nothing (unlike cloud-hypervisor's all-defaults `Migratable`), and the trait says
//! exactly what the engine calls when:
//!
//! ```text
//! source:       begin_save ─► save_precopy* (guest running) ─► save_final* (guest paused) ─► 0
//!                    └──────── on failure or cancel, at any point: abort_save (device runs on)
//!               a switchover past its hard bound: interrupt_save, then abort_save; the
//!               next attempt starts again at begin_save
//! destination:  load* (precopy bytes, then final bytes, in saved order) ─► load_complete
//! ```
//!
//! With [`livemig_wire::DeviceTransfer::Multifd`] (the default) each device has a save job
//! (`lm-src-dev{i}`) from the start of precopy: `begin_save`, then `save_precopy` polled
//! while the guest runs (every 20 ms while it returns 0), then, from the guest's pause,
//! `save_final` until it returns 0. With [`livemig_wire::DeviceTransfer::Main`] (the serial
//! baseline) the coordinator does it all at switchover, device after device, the guest
//! already paused: `begin_save`, `save_precopy` until it returns 0, `save_final` until it
//! returns 0. `abort_save` is called on the caller's thread after every migration thread
//! has been joined.
//!
//! # What a device still holds
//!
//! [`Device::pending`] is the one optional method: it tells the engine how many bytes the
//! device still holds to save and how fast it reads them out, as a VFIO device does
//! (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` gives the bytes a stop-copy would read now, the
//! `VFIO_MIG_GET_PRECOPY_INFO` ioctl the precopy data still to read, its initial and dirty
//! bytes). The switchover decision counts it (see `source/convergence.rs`): the guest is not
//! paused while the devices' final state could not be read and sent within the downtime
//! limit. It has a default, unlike the rest, because it is an estimate, not a part of the
//! state: a device that does not report (the default, `None`) is migrated exactly as
//! before and counts for nothing in the expected downtime (QEMU, when the data-size query
//! fails, assumes 100 MiB; livemig assumes nothing rather than invent a figure).
//!
//! Small devices whose whole state is one blob saved while paused implement [`VmState`]
//! instead; their blobs travel on the main channel and are applied in a defined order (the
//! order of the device list) after every streamed device has completed loading.
//!
//! Devices are matched by position: the destination builds the twin of the source's i-th
//! device as its i-th device, and [`crate::Incoming::devices`] keeps that order.

use std::fmt;

/// An error of a device operation, naming the device and the operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("device {device}: {op} failed: {detail}")]
pub struct DeviceError {
    /// The device's name ([`DeviceDescriptor::name`]).
    pub device: String,
    /// The operation that failed, e.g. `"save"`, `"load"` or `"create"`.
    pub op: &'static str,
    /// What went wrong, for a person.
    pub detail: String,
}

impl DeviceError {
    /// An error of `op` on `device`, described by `detail`.
    pub fn new(device: impl Into<String>, op: &'static str, detail: impl fmt::Display) -> Self {
        DeviceError {
            device: device.into(),
            op,
            detail: detail.to_string(),
        }
    }
}

/// What the destination needs to build the twin of a device: its kind and a kind-specific
/// configuration blob (bounded by the wire format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescriptor {
    /// What the [`DeviceFactory`] builds, e.g. "vfio-sim"; a kind the destination does not
    /// know makes its factory refuse the session.
    pub kind: String,
    /// A name unique within the VM, for messages and reports.
    pub name: String,
    /// Kind-specific configuration the twin is built from (opaque to the engine; its size is
    /// bounded by the wire format).
    pub config: Vec<u8>,
}

/// What a device still holds to save, and how fast it reads it out
/// ([`Device::pending`]): VFIO's sizes as the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SavePending {
    /// Bytes of precopy data the device could still hand out while the guest runs (VFIO's
    /// precopy `initial_bytes + dirty_bytes`). Reading them does not pause the guest; it
    /// tells the engine that precopy has more to do for this device.
    pub precopy_bytes: u64,
    /// Bytes [`Device::save_final`] would return in all if the guest were paused now (VFIO's
    /// `stop_copy_length`): what the device adds to the downtime. It includes any precopy
    /// data a final save must finish first.
    pub final_bytes: u64,
    /// Bytes per second the device reads its state out at, when it is bounded by the device
    /// (a VFIO device's migration fd); `None`: as fast as the channels take it.
    pub read_rate: Option<u64>,
}

/// A device with a streamed, strictly ordered migration state (VFIO-like).
///
/// Methods take `&self`: the engine calls the save methods from the device's save job thread
/// (`lm-src-dev{i}`; in serial mode the caller's thread) and the load methods from the
/// device's loader thread (`lm-dst-load{i}`), never two at once for the same device (save
/// methods, that is: [`Device::pending`] may come at any time, from the coordinator). The
/// device's vCPU-side work goes on meanwhile: the save job runs concurrently with the guest
/// until the pause.
///
/// Any `Err` fails the migration ([`crate::MigrationError::Device`] on the source, where
/// the guest and every device then run on; [`crate::IncomingError::Device`] on the
/// destination, where the twin is dropped).
pub trait Device: Send + Sync {
    /// How the destination builds this device's twin. Called on the source at set-up and
    /// for the report; must not change during a migration.
    fn descriptor(&self) -> DeviceDescriptor;

    /// A migration begins: start the state stream from its beginning. Called on the source
    /// before any other save method, again for every new attempt after a failed one (after
    /// that attempt's `abort_save`).
    fn begin_save(&self) -> Result<(), DeviceError>;

    /// While the guest runs: appends at most `max` bytes of precopy data to `out` and returns
    /// how many; 0 when the device has nothing to send now. `out` is empty on entry; what is
    /// appended is sent as one chunk, so the count returned must be `out.len()`. `max` is
    /// [`crate::MigrationConfig::chunk_size`].
    ///
    /// Returning 0 does not end precopy in the default (multifd) mode: the device is asked
    /// again 20 ms later, until the guest pauses. In serial mode
    /// ([`livemig_wire::DeviceTransfer::Main`]) it is called with the guest already paused,
    /// and its first 0 moves on to `save_final`.
    fn save_precopy(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError>;

    /// While the guest is paused: appends the next at most `max` bytes of the final state to
    /// `out`, at the device's own pace, and returns how many; 0 at the end of the stream, and
    /// then it is not called again. `out` is empty on entry and the count must be
    /// `out.len()`. The time from the pause to this device's end is its
    /// [`crate::DeviceReport::final_save_ms`], part of the downtime: all devices save in
    /// parallel, and the slowest counts.
    fn save_final(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError>;

    /// Source: what the device still holds to save and how fast it reads it out, or `None`
    /// (the default) if it cannot tell. Called on the coordinator's thread at the end of
    /// every precopy round, at the same time as the device's save job may be in
    /// `save_precopy`: it must be cheap (an ioctl, a counter) and must not change the state
    /// stream. The figures are an estimate: the engine compares the expected downtime they
    /// give with the downtime limit, and the report with the downtime that followed.
    fn pending(&self) -> Option<SavePending> {
        None
    }

    /// A switchover past its hard bound ([`crate::MigrationConfig::downtime_hard_limit`]) is
    /// being abandoned while the device's save job may be blocked in
    /// [`Device::save_final`]: make that call return soon (an error or 0; whatever it
    /// returns is discarded). Called on the coordinator's thread, concurrently with the
    /// save job (as a VMM would move a VFIO device back to RUNNING while a read of its
    /// migration fd blocks); [`Device::abort_save`] follows once the job has ended, then
    /// the guest resumes. The default does nothing: a device whose final read can block
    /// for long keeps the guest paused until the read returns.
    fn interrupt_save(&self) {}

    /// The migration failed or was cancelled: the device runs on as before (whatever a
    /// final save froze is thawed), with its state intact. Called before the guest resumes,
    /// also when the attempt failed before `begin_save` (then it has nothing to undo), after
    /// every migration thread has stopped. Not called after a successful migration, nor
    /// after a failure past the handover (the destination may run the guest). An error here
    /// is returned as [`crate::MigrationError::Device`] in place of the migration's own.
    fn abort_save(&self) -> Result<(), DeviceError>;

    /// Destination: loads the next piece of the stream. Pieces arrive strictly in saved
    /// order, precopy data first, each exactly one chunk the source's save returned (the
    /// stream's end is an empty piece, just before `load_complete`). Called while the guest
    /// still runs on the source, as precopy data arrives; each return grants the source
    /// credit for another chunk.
    fn load(&self, data: &[u8]) -> Result<(), DeviceError>;

    /// Destination, in a session with `switchover ack` ([`crate::MigrationConfig::switchover_ack`]):
    /// whether this twin has loaded what its source must send before a switchover (VFIO's
    /// initial precopy bytes: QEMU's `switchover-ack`, which the VFIO driver approves once
    /// its `INIT_DATA_SENT` marker is loaded). The destination tells the source once every
    /// twin says so. Called on the coordinator's thread after each chunk any device loads,
    /// concurrently with this device's loader: it must be cheap. The default, `true`:
    /// nothing is awaited.
    fn switchover_ready(&self) -> bool {
        true
    }

    /// Destination: the stream has ended; check it is whole and apply it. Called once, on
    /// the loader thread, after the last `load`; the small devices' blobs and the guest's
    /// state are loaded only after every device's `load_complete` has returned.
    fn load_complete(&self) -> Result<(), DeviceError>;
}

/// A small device whose state is one blob, saved while the guest is paused.
///
/// The blobs travel together on the main channel in one frame, so they should stay small;
/// use [`Device`] for state that is large or can be sent while the guest runs.
pub trait VmState: Send + Sync {
    /// How the destination builds this device's twin ([`DeviceFactory::create_vmstate`]).
    fn descriptor(&self) -> DeviceDescriptor;
    /// Source, guest paused: the device's whole state. Called on the state-save job thread
    /// (`lm-src-state`) right after [`crate::Guest::save_state`], in list order. There is
    /// no abort call: a failed migration resumes the guest and the device simply runs on,
    /// so saving must not change the device.
    fn save(&self) -> Result<Vec<u8>, DeviceError>;
    /// Destination, guest not yet running: applies a blob `save` made. Called on the
    /// coordinator in list order, after every streamed device has completed loading and
    /// before [`crate::Guest::restore_state`].
    fn load(&self, blob: &[u8]) -> Result<(), DeviceError>;
}

/// Builds, on the destination, the twin of a device a source described.
///
/// Called on [`crate::receive_vm`]'s thread for each device of a session offered, in list
/// order, after the guest is built. An `Err` (an unknown kind, a bad config) refuses the
/// whole session with the error's text, and the destination waits for the next one.
pub trait DeviceFactory: Sync {
    /// The twin of a streamed device ([`Device`]), ready to [`Device::load`].
    fn create_device(&self, desc: &DeviceDescriptor) -> Result<Box<dyn Device>, DeviceError>;
    /// The twin of a small device ([`VmState`]), ready to [`VmState::load`].
    fn create_vmstate(&self, desc: &DeviceDescriptor) -> Result<Box<dyn VmState>, DeviceError>;
}
