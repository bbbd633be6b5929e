//! Device models for tests and benchmarks, behind the engine's [`livemig_engine::Device`]
//! and [`livemig_engine::VmState`] traits:
//! - [`vfio_sim`]: a VFIO-like device with a streamed, strictly ordered state;
//! - [`vmstate`]: a small register blob saved while paused.
//!
//! [`DeviceModels`] builds the destination's twins; [`DeviceSpec`] parses
//! `vfio-sim,size=256M,rate=500M` and `vmstate-sim,regs=256`.

pub mod factory;
mod spec;
pub mod vfio_config;
mod vfio_load;
pub mod vfio_sim;
mod vfio_stream;
pub mod vmstate;

pub use factory::DeviceModels;
pub use vfio_sim::{VfioSim, VfioSimConfig};
pub use vmstate::{VmStateSim, VmStateSimConfig};

/// A device as given on a command line: `KIND[,key=value...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    Vfio(VfioSimConfig),
    VmState(VmStateSimConfig),
}

impl DeviceSpec {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (kind, rest) = spec.split_once(',').unwrap_or((spec, ""));
        match kind.trim() {
            vfio_sim::KIND => VfioSimConfig::parse(rest).map(DeviceSpec::Vfio),
            vmstate::KIND => VmStateSimConfig::parse(rest).map(DeviceSpec::VmState),
            other => Err(format!(
                "unknown device kind '{other}' (known: {}, {})",
                vfio_sim::KIND,
                vmstate::KIND
            )),
        }
    }
}
