//! Dirty tracking: KVM's dirty bitmap in manual-protect mode (`KVM_GET_DIRTY_LOG` reads it,
//! `KVM_CLEAR_DIRTY_LOG` clears exactly the pages read and write-protects them again), merged
//! with `vm-memory`'s bitmap of the pages the VMM itself wrote. KVM's dirty ring is not used:
//! it is advertised on the nested hosts livemig runs on but does not work there.

use super::error::KvmError;
use super::vm::Slot;
use kvm_bindings::{kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, KVMIO};
use kvm_ioctls::VmFd;
use livemig_engine::{DirtyBitmap, GuestMemory};
use livemig_wire::PAGE_SIZE;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Clears (and re-protects) the pages set in `bitmap` in `slot`. `bitmap` covers the whole
/// slot from its first page.
fn clear(vm: &VmFd, slot: &Slot, bitmap: &mut [u64]) -> Result<(), KvmError> {
    let pages = slot.size / PAGE_SIZE as u64;
    if bitmap.len() as u64 * 64 < pages {
        return Err(KvmError::DirtyLog {
            slot: slot.slot,
            op: "clear (bitmap too short)",
            source: errno::Error::new(libc::EINVAL),
        });
    }
    let arg = kvm_clear_dirty_log {
        slot: slot.slot,
        // The whole slot: first_page 0, and a page count that reaches the slot's end.
        num_pages: pages as u32,
        first_page: 0,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            dirty_bitmap: bitmap.as_mut_ptr().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd; the kernel reads `num_pages` bits from `dirty_bitmap`, which
    // holds at least that many (checked above) and lives across the call.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if ret != 0 {
        return Err(KvmError::DirtyLog {
            slot: slot.slot,
            op: "KVM_CLEAR_DIRTY_LOG",
            source: errno::Error::last(),
        });
    }
    Ok(())
}

/// Reads and clears KVM's log of `slot`; returns the pages the guest wrote since the last call.
fn take_kvm(vm: &VmFd, slot: &Slot) -> Result<Vec<u64>, KvmError> {
    let mut bitmap = vm
        .get_dirty_log(slot.slot, slot.size as usize)
        .map_err(|source| KvmError::DirtyLog {
            slot: slot.slot,
            op: "KVM_GET_DIRTY_LOG",
            source,
        })?;
    if bitmap.iter().any(|&w| w != 0) {
        clear(vm, slot, &mut bitmap)?;
    }
    Ok(bitmap)
}

/// Discards everything logged so far, by KVM and by `vm-memory`.
pub fn reset(vm: &VmFd, slots: &[Slot], memory: &GuestMemory) -> Result<(), KvmError> {
    for slot in slots {
        take_kvm(vm, slot)?;
    }
    for r in memory.iter() {
        r.get_mmap().bitmap().reset();
    }
    Ok(())
}

/// Adds to `out` every page written since the last call, by the guest or the VMM, and clears
/// both logs. Range `i` of `out` is slot `i`, region `i` of `memory`.
pub fn sync(
    vm: &VmFd,
    slots: &[Slot],
    memory: &GuestMemory,
    out: &mut DirtyBitmap,
) -> Result<(), KvmError> {
    for slot in slots {
        let words = take_kvm(vm, slot)?;
        out.or_range_words(slot.slot as usize, &words);
    }
    for (i, r) in memory.iter().enumerate() {
        out.or_range_words(i, &r.get_mmap().bitmap().get_and_reset());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_ioctl_number_matches_the_kernel() {
        // _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log): 24-byte argument.
        assert_eq!(std::mem::size_of::<kvm_clear_dirty_log>(), 24);
        assert_eq!(KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
    }
}
