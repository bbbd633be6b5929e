//! Builds, on the destination, the twin of any device model a source described.

use livemig_engine::{Device, DeviceDescriptor, DeviceError, DeviceFactory, VmState};

use super::{vfio_sim, vmstate, VfioSim, VmStateSim};

/// The device models this build can receive: "vfio-sim" (streamed) and "vmstate-sim"
/// (one blob).
#[derive(Debug, Default, Clone, Copy)]
pub struct DeviceModels;

impl DeviceFactory for DeviceModels {
    fn create_device(&self, desc: &DeviceDescriptor) -> Result<Box<dyn Device>, DeviceError> {
        match desc.kind.as_str() {
            vfio_sim::KIND => Ok(Box::new(VfioSim::from_descriptor(desc)?)),
            vmstate::KIND => Err(DeviceError::new(
                &desc.name,
                "create",
                format!(
                    "'{}' is a one-blob (vmstate) device, not a streamed one",
                    desc.kind
                ),
            )),
            other => Err(unknown(&desc.name, other)),
        }
    }

    fn create_vmstate(&self, desc: &DeviceDescriptor) -> Result<Box<dyn VmState>, DeviceError> {
        match desc.kind.as_str() {
            vmstate::KIND => Ok(Box::new(VmStateSim::from_descriptor(desc)?)),
            vfio_sim::KIND => Err(DeviceError::new(
                &desc.name,
                "create",
                format!(
                    "'{}' is a streamed device, not a one-blob (vmstate) one",
                    desc.kind
                ),
            )),
            other => Err(unknown(&desc.name, other)),
        }
    }
}

fn unknown(name: &str, kind: &str) -> DeviceError {
    DeviceError::new(
        name,
        "create",
        format!(
            "device kind '{kind}' is not supported by this destination (known: {}, {})",
            vfio_sim::KIND,
            vmstate::KIND
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::{DeviceSpec, VfioSimConfig, VmStateSimConfig};

    #[test]
    fn builds_known_kinds_and_names_unknown_ones() {
        let vfio = VfioSim::new("vfio0", VfioSimConfig::with_size(4096));
        let rtc = VmStateSim::new("rtc0", VmStateSimConfig::default());
        let f = DeviceModels;
        assert!(f.create_device(&Device::descriptor(&vfio)).is_ok());
        assert!(f.create_vmstate(&VmState::descriptor(&rtc)).is_ok());
        assert!(f.create_device(&VmState::descriptor(&rtc)).is_err());
        assert!(f.create_vmstate(&Device::descriptor(&vfio)).is_err());
        let desc = DeviceDescriptor {
            kind: "gpu".to_string(),
            name: "gpu0".to_string(),
            config: Vec::new(),
        };
        let err = f.create_device(&desc).err().expect("unknown kind");
        assert!(err.to_string().contains("'gpu'"), "{err}");
        assert!(f.create_vmstate(&desc).is_err());
    }

    #[test]
    fn device_specs() {
        assert!(matches!(
            DeviceSpec::parse("vfio-sim,size=256M,rate=500M"),
            Ok(DeviceSpec::Vfio(c)) if c.size == 256 << 20
        ));
        assert!(matches!(
            DeviceSpec::parse("vmstate-sim"),
            Ok(DeviceSpec::VmState(_))
        ));
        assert!(DeviceSpec::parse("nic,size=1").is_err_and(|e| e.contains("'nic'")));
    }
}
