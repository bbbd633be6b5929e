//! The VM: /dev/kvm, its capabilities, the VM fd with the in-kernel irqchip and PIT, guest
//! memory registered with dirty logging, and the VM-wide state KVM holds (clock, irqchip,
//! PIT).

use super::error::KvmError;
use super::state::VmState;
use kvm_bindings::{
    kvm_enable_cap, kvm_irqchip, kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId,
    Msrs, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use livemig_engine::GuestMemory;
use std::sync::{Mutex, OnceLock};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// KVM_CAP_DEBUGREGS (not in kvm-ioctls' `Cap`).
const CAP_DEBUGREGS: u64 = 50;

/// One registered memory slot: slot number, guest address, size in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    pub slot: u32,
    pub guest_addr: u64,
    pub size: u64,
}

/// A VM with its memory registered.
pub struct Vm {
    pub fd: VmFd,
    pub slots: Vec<Slot>,
    /// CPUID given to every vCPU.
    pub cpuid: CpuId,
    /// The MSRs saved and restored for every vCPU.
    pub msr_indices: Vec<u32>,
}

/// Checks that `kvm` offers every capability this guest needs.
pub fn check_caps(kvm: &Kvm) -> Result<(), KvmError> {
    let caps = [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::Xcrs, "KVM_CAP_XCRS"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ];
    for (cap, name) in caps {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    if kvm.check_extension_raw(CAP_DEBUGREGS) <= 0 {
        return Err(KvmError::MissingCap("KVM_CAP_DEBUGREGS"));
    }
    if kvm.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as u64) & 1 == 0 {
        return Err(KvmError::MissingCap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"));
    }
    Ok(())
}

fn setup(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> KvmError {
    move |source| KvmError::VmSetup { op, source }
}

/// A VM without memory or vCPUs yet: everything that does not depend on the guest.
struct Shell {
    fd: VmFd,
    cpuid: CpuId,
    msr_indices: Vec<u32>,
}

/// A shell built ahead by [`prepare`], taken by the next [`Vm::create`].
static PREPARED: Mutex<Option<Shell>> = Mutex::new(None);

/// Builds a VM shell now (the VM fd, irqchip, PIT, CPUID and the MSR list), so that a guest
/// arriving later costs only its memory slots and vCPUs: a destination calls this before it
/// listens, as QEMU's destination has its VM before `migrate-incoming`. Creating the PIT and
/// probing the MSRs take about 5 ms here, on the set-up's critical path otherwise. Errors are
/// left for `Vm::create` to report.
pub fn prepare() {
    if let Ok(shell) = Shell::new() {
        *PREPARED.lock().unwrap_or_else(|p| p.into_inner()) = Some(shell);
    }
}

/// Drops the shell [`prepare`] built, if no VM took it.
pub fn forget() {
    PREPARED.lock().unwrap_or_else(|p| p.into_inner()).take();
}

impl Shell {
    fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        check_caps(&kvm)?;
        let fd = kvm.create_vm().map_err(KvmError::CreateVm)?;
        fd.enable_cap(&kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE as u64, 0, 0, 0],
            ..Default::default()
        })
        .map_err(setup("enable manual dirty log protect"))?;
        // The TSS and identity map of Intel's real-mode emulation, out of guest memory's way.
        fd.set_tss_address(0xfffb_d000)
            .map_err(setup("set TSS address"))?;
        fd.set_identity_map_address(0xfffb_c000)
            .map_err(setup("set identity map address"))?;
        fd.create_irq_chip().map_err(setup("create irqchip"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(setup("create PIT"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("get supported CPUID"))?;
        let msr_indices = msr_indices(&kvm)?;
        Ok(Shell {
            fd,
            cpuid,
            msr_indices,
        })
    }
}

impl Vm {
    /// A VM with an irqchip, a PIT, and `memory` registered with dirty logging in
    /// manual-protect mode; on the shell [`prepare`] built, if there is one.
    pub fn create(memory: &GuestMemory) -> Result<Self, KvmError> {
        let prepared = PREPARED.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Shell {
            fd,
            cpuid,
            msr_indices,
        } = match prepared {
            Some(shell) => shell,
            None => Shell::new()?,
        };
        let mut slots = Vec::new();
        for (i, region) in memory.iter().enumerate() {
            let slot = Slot {
                slot: i as u32,
                guest_addr: region.start_addr().0,
                size: region.len(),
            };
            let host =
                memory
                    .get_host_address(region.start_addr())
                    .map_err(|e| KvmError::Memory {
                        op: "host address of a region",
                        detail: e.to_string(),
                    })?;
            let r = kvm_userspace_memory_region {
                slot: slot.slot,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: slot.guest_addr,
                memory_size: slot.size,
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory` of exactly `size` bytes; the
            // guest memory outlives the VM fd (both are owned by the guest, which drops the
            // VM first; see `KvmGuest`'s field order).
            unsafe { fd.set_user_memory_region(r) }.map_err(|source| KvmError::MemorySlot {
                slot: slot.slot,
                source,
            })?;
            slots.push(slot);
        }
        Ok(Vm {
            fd,
            slots,
            cpuid,
            msr_indices,
        })
    }

    /// Saves the clock, the three irqchips and the PIT.
    pub fn save(&self) -> Result<VmState, KvmError> {
        let op = |op: &'static str| move |source| KvmError::VmState { op, source };
        let chip = |id: u32, name: &'static str| {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map_err(op(name)).map(|_| c)
        };
        Ok(VmState {
            clock: self.fd.get_clock().map_err(op("get clock"))?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "get PIC master")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "get PIC slave")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "get IOAPIC")?,
            pit: self.fd.get_pit2().map_err(op("get PIT"))?,
            // The UART is not KVM's: the guest fills it in.
            serial: Default::default(),
        })
    }

    pub fn restore(&self, s: &VmState) -> Result<(), KvmError> {
        let op = |op: &'static str| move |source| KvmError::VmState { op, source };
        self.fd.set_pit2(&s.pit).map_err(op("set PIT"))?;
        self.fd
            .set_irqchip(&s.pic_master)
            .map_err(op("set PIC master"))?;
        self.fd
            .set_irqchip(&s.pic_slave)
            .map_err(op("set PIC slave"))?;
        self.fd.set_irqchip(&s.ioapic).map_err(op("set IOAPIC"))?;
        // Only the flags KVM_SET_CLOCK accepts; the kernel fills in the rest on get.
        let mut clock = s.clock;
        clock.flags &= kvm_bindings::KVM_CLOCK_REALTIME;
        self.fd.set_clock(&clock).map_err(op("set clock"))?;
        Ok(())
    }
}

/// The MSRs KVM lists that a vCPU can actually read here, probed once per process on a
/// scratch VM (some listed MSRs fail on some hosts, and `KVM_GET_MSRS` stops at the first).
fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, KvmError> {
    static CACHE: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(v) = CACHE.get() {
        return Ok(v.clone());
    }
    let list = kvm
        .get_msr_index_list()
        .map_err(setup("get MSR index list"))?;
    let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
    let vcpu = vm.create_vcpu(0).map_err(setup("create a probe vCPU"))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if vcpu.get_msrs(&mut one) == Ok(1) {
            ok.push(index);
        }
    }
    Ok(CACHE.get_or_init(|| ok).clone())
}
