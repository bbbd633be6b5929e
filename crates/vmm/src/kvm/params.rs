//! The host's view of what the guest image keeps in guest memory: the parameter block (which
//! the image writes from its command line at boot) and each vCPU's slot.

use super::error::KvmError;
use super::layout::{param, slot, PARAMS_ADDR, SLOTS_ADDR, SLOT_SIZE};
use livemig_engine::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

fn read_u64(mem: &GuestMemory, addr: u64) -> Result<u64, KvmError> {
    mem.read_obj::<u64>(GuestAddress(addr))
        .map_err(|e| KvmError::Memory {
            op: "read guest word",
            detail: format!("0x{addr:x}: {e}"),
        })
}

fn write_u64(mem: &GuestMemory, addr: u64, v: u64) -> Result<(), KvmError> {
    mem.write_obj(v, GuestAddress(addr))
        .map_err(|e| KvmError::Memory {
            op: "write guest word",
            detail: format!("0x{addr:x}: {e}"),
        })
}

/// Changes the working set and rate of a running guest (the image reads them every page).
pub fn set_workload(mem: &GuestMemory, ws_pages: u64, ticks_per_page: u64) -> Result<(), KvmError> {
    write_u64(mem, PARAMS_ADDR + param::WS_PAGES, ws_pages)?;
    write_u64(mem, PARAMS_ADDR + param::TICKS_PER_PAGE, ticks_per_page)
}

/// What the parameter block says, as far as the host needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamView {
    pub magic: u64,
    pub vcpus: u64,
    pub first_data_page: u64,
    pub working_set_pages: u64,
    pub host_writes: u64,
    pub pages: u64,
    pub fill_pages: u64,
    /// 1: vCPU 0 set the block up; 2: every vCPU filled its share.
    pub ready: u64,
}

pub fn read_params(mem: &GuestMemory) -> Result<ParamView, KvmError> {
    let at = |o: u64| read_u64(mem, PARAMS_ADDR + o);
    Ok(ParamView {
        magic: at(param::MAGIC)?,
        vcpus: at(param::NVCPUS)?,
        first_data_page: at(param::FIRST_PAGE)?,
        working_set_pages: at(param::WS_PAGES)?,
        host_writes: at(param::HOST_WRITES)?,
        pages: at(param::PAGES)?,
        fill_pages: at(param::FILL_PAGES)?,
        ready: at(param::READY)?,
    })
}

/// One vCPU's slot: its counter and the page write it may be in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotView {
    /// Pages this vCPU has written, ever: only grows, carried across migrations.
    pub counter: u64,
    /// A page write is under way (steps 1 to 5 of the image's protocol).
    pub busy: bool,
    pub page: u64,
    pub gen: u32,
    /// `counter` when the write under way began.
    pub count_at: u64,
}

pub fn read_slot(mem: &GuestMemory, vcpu: u32) -> Result<SlotView, KvmError> {
    let base = SLOTS_ADDR + vcpu as u64 * SLOT_SIZE;
    let at = |o: u64| read_u64(mem, base + o);
    Ok(SlotView {
        counter: at(slot::COUNTER)?,
        busy: at(slot::BUSY)? != 0,
        page: at(slot::PAGE)?,
        gen: at(slot::GEN)? as u32,
        count_at: at(slot::COUNT_AT)?,
    })
}
