//! Guest and device state blobs: the KVM vCPU/VM state, the synthetic guest's state, the
//! VFIO-like device's configuration.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemig_vmm::devices::VfioSimConfig;
use livemig_vmm::kvm::KvmState;
use livemig_vmm::synthetic::SyntheticState;

fuzz_target!(|data: &[u8]| {
    let _ = KvmState::decode(data);
    for pages in [1u64, 16, 1024] {
        let _ = SyntheticState::decode(data, pages);
    }
    let _ = VfioSimConfig::decode(data);
});
