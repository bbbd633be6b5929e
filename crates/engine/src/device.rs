//! The contract between the engine and a device.
//!
//! A device's migration state is a byte stream that must be loaded strictly in the order it
//! was saved (the Linux VFIO migration interface: `read()` the state from the device's
//! migration fd, `write()` it back on the destination in the same order). The engine cuts the
//! stream into chunks, sends them on any data channel, and on the destination hands them back
//! to [`Device::load`] in order.
//!
//! Every method is required: a device cannot "support" migration by doing nothing (unlike
//! cloud-hypervisor's all-defaults `Migratable`), and the trait says exactly what the engine
//! calls when:
//!
//! ```text
//! source:       begin_save ─► save_precopy* (guest running) ─► save_final* (guest paused) ─► 0
//!                    └──────── on failure or cancel, at any point: abort_save (device runs on)
//! destination:  load* (precopy bytes, then final bytes, in saved order) ─► load_complete
//! ```
//!
//! Small devices whose whole state is one blob saved while paused implement [`VmState`]
//! instead; their blobs travel on the main channel and are applied in a defined order (the
//! order of the device list) after every streamed device has completed loading.

use std::fmt;

/// An error of a device operation, naming the device and the operation.
#[derive(Debug, Clone, thiserror::Error)]
#[error("device {device}: {op} failed: {detail}")]
pub struct DeviceError {
    pub device: String,
    pub op: &'static str,
    pub detail: String,
}

impl DeviceError {
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
    /// e.g. "vfio-sim".
    pub kind: String,
    /// A name unique within the VM, for messages.
    pub name: String,
    pub config: Vec<u8>,
}

/// A device with a streamed, strictly ordered migration state (VFIO-like).
///
/// Methods take `&self`: the engine calls the save methods from a worker thread of the
/// migration's pool and the load methods from the device's loader thread, never two at once
/// for the same device.
pub trait Device: Send + Sync {
    /// How the destination builds this device's twin.
    fn descriptor(&self) -> DeviceDescriptor;

    /// A migration begins: start the state stream from its beginning. Called on the source
    /// before any other save method, again for every new attempt after a failed one.
    fn begin_save(&self) -> Result<(), DeviceError>;

    /// While the guest runs: appends at most `max` bytes of precopy data to `out` and returns
    /// how many; 0 when the device has nothing to send now.
    fn save_precopy(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError>;

    /// While the guest is paused: appends the next at most `max` bytes of the final state to
    /// `out`, at the device's own pace, and returns how many; 0 at the end of the stream.
    fn save_final(&self, out: &mut Vec<u8>, max: usize) -> Result<usize, DeviceError>;

    /// The migration failed or was cancelled: the device runs on as before (whatever a
    /// final save froze is thawed), with its state intact. Called before the guest resumes,
    /// also when the attempt failed before `begin_save` (then it has nothing to undo).
    fn abort_save(&self) -> Result<(), DeviceError>;

    /// Destination: loads the next piece of the stream. Pieces arrive strictly in saved
    /// order, precopy data first.
    fn load(&self, data: &[u8]) -> Result<(), DeviceError>;

    /// Destination: the stream has ended; check it is whole and apply it.
    fn load_complete(&self) -> Result<(), DeviceError>;
}

/// A small device whose state is one blob, saved while the guest is paused.
pub trait VmState: Send + Sync {
    fn descriptor(&self) -> DeviceDescriptor;
    fn save(&self) -> Result<Vec<u8>, DeviceError>;
    fn load(&self, blob: &[u8]) -> Result<(), DeviceError>;
}

/// Builds, on the destination, the twin of a device a source described.
pub trait DeviceFactory: Sync {
    fn create_device(&self, desc: &DeviceDescriptor) -> Result<Box<dyn Device>, DeviceError>;
    fn create_vmstate(&self, desc: &DeviceDescriptor) -> Result<Box<dyn VmState>, DeviceError>;
}
