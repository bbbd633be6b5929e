//! The devices a source VM runs, built from `--device` specs.

use livemig_engine::{Device, VmState};
use livemig_vmm::devices::{DeviceSpec, VfioSim, VmStateSim};
use std::sync::Arc;

/// Streamed (VFIO-like) and non-iterable devices, named vfio0.., vmstate0.. in order.
#[derive(Default)]
pub struct SourceDevices {
    pub vfio: Vec<VfioSim>,
    pub vmstate: Vec<VmStateSim>,
}

impl SourceDevices {
    pub fn build(specs: &[String]) -> anyhow::Result<Self> {
        let mut d = SourceDevices::default();
        for s in specs {
            match DeviceSpec::parse(s).map_err(|e| anyhow::anyhow!("--device {s}: {e}"))? {
                DeviceSpec::Vfio(cfg) => d
                    .vfio
                    .push(VfioSim::new(format!("vfio{}", d.vfio.len()), cfg)),
                DeviceSpec::VmState(cfg) => d
                    .vmstate
                    .push(VmStateSim::new(format!("vmstate{}", d.vmstate.len()), cfg)),
            }
        }
        Ok(d)
    }

    pub fn streamed(&self) -> Vec<&dyn Device> {
        self.vfio.iter().map(|d| d as &dyn Device).collect()
    }

    pub fn vmstates(&self) -> Vec<&dyn VmState> {
        self.vmstate.iter().map(|d| d as &dyn VmState).collect()
    }

    /// The devices as shared trait objects, for a VM that outlives this call.
    #[allow(clippy::type_complexity)]
    pub fn into_shared(self) -> (Vec<Arc<dyn Device>>, Vec<Arc<dyn VmState>>) {
        (
            self.vfio
                .into_iter()
                .map(|d| Arc::new(d) as Arc<dyn Device>)
                .collect(),
            self.vmstate
                .into_iter()
                .map(|d| Arc::new(d) as Arc<dyn VmState>)
                .collect(),
        )
    }

    /// Checks every streamed device still holds its whole state (after a failed attempt).
    pub fn check_intact(&self) -> Result<(), String> {
        for d in &self.vfio {
            d.verify_intact().map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}
