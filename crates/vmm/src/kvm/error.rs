//! The KVM guest's errors, each naming the operation that failed.

use super::image::ImageError;
use super::layout::LayoutError;
use super::state::StateError;
use vmm_sys_util::errno;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("opening /dev/kvm: {0}")]
    Open(#[source] errno::Error),
    #[error("/dev/kvm lacks {0}")]
    MissingCap(&'static str),
    #[error("creating the VM: {0}")]
    CreateVm(#[source] errno::Error),
    #[error("VM setup, {op}: {source}")]
    VmSetup {
        op: &'static str,
        #[source]
        source: errno::Error,
    },
    #[error("registering memory slot {slot}: {source}")]
    MemorySlot {
        slot: u32,
        #[source]
        source: errno::Error,
    },
    #[error("vCPU {index}, {op}: {source}")]
    Vcpu {
        index: u32,
        op: &'static str,
        #[source]
        source: errno::Error,
    },
    #[error("vCPU {index}: {op} handled {done} of {wanted} MSRs (first not handled: 0x{first_failed:x})")]
    Msrs {
        index: u32,
        op: &'static str,
        done: usize,
        wanted: usize,
        first_failed: u32,
    },
    #[error("vCPU {index} stopped: {reason}")]
    VcpuStopped { index: u32, reason: String },
    #[error("starting vCPU thread {index}: {source}")]
    Thread {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(#[source] errno::Error),
    #[error("VM state, {op}: {source}")]
    VmState {
        op: &'static str,
        #[source]
        source: errno::Error,
    },
    #[error("dirty log of slot {slot}, {op}: {source}")]
    DirtyLog {
        slot: u32,
        op: &'static str,
        #[source]
        source: errno::Error,
    },
    #[error("guest memory, {op}: {detail}")]
    Memory { op: &'static str, detail: String },
    #[error("guest layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("state blob: {0}")]
    State(#[from] StateError),
    #[error("state is for {found}, this guest has {expected}")]
    StateMismatch { found: String, expected: String },
    #[error("guest image: {0}")]
    Image(#[from] ImageError),
    #[error("the guest {what}; its console said: {console}")]
    Boot { what: String, console: String },
    #[error("guest console: {0}")]
    Console(String),
}
