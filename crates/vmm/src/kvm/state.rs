//! The KVM guest's non-memory state as a versioned blob: VM state (clock, PIC master/slave,
//! IOAPIC, PIT, the COM1 UART) and, per vCPU, every part KVM exposes. Pure encode/decode, no
//! ioctls.
//!
//! ```text
//! header: magic "LMKV" u32 | version u16 | reserved u16 | memory_bytes u64 | vcpus u32
//! part:   tag [u8; 4] | version u16 | reserved u16 | len u32 | len bytes
//! parts:  CLCK PICM PICS IOAP PIT2 SERL, then per vCPU: VCPU(index u32) REGS SREG XSAV XCRS
//!         DBGR LAPI MSRS(count u32, count x kvm_msr_entry) EVNT MPST
//! SERL:   dll dlh ier iir lcr lsr mcr msr scr (u8 each) | fifo len u32 (<= 64) | fifo bytes
//! ```
//!
//! Version 2 (the guest image booted through PVH, with its UART) is the only version this
//! build reads: a version-1 blob comes from a guest whose memory layout and devices differ, so
//! it is refused by name rather than loaded into the wrong machine.
//!
//! Each part carries its own version: a newer livemig that changes one part's layout bumps
//! that part's version and keeps decoding the older ones. The payload of a version-1 part is
//! the kernel's structure as the KVM ABI lays it out (little-endian x86-64), and its length
//! must be exactly that structure's size. An unknown version, a wrong length, a missing or
//! unexpected part is a clear error, never a panic.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use livemig_wire::{Reader, WireError, Writer};
use vm_superio::serial::SerialState;
use zerocopy::{FromBytes, Immutable, IntoBytes};

const MAGIC: u32 = u32::from_le_bytes(*b"LMKV");
/// The blob version this build writes and the only one it reads.
pub const VERSION: u16 = 2;
/// Most vCPUs a blob may describe.
pub const MAX_VCPUS: u32 = 64;
/// Most MSRs one vCPU part may carry.
pub const MAX_MSRS: u32 = 1024;

/// Most bytes in the UART's receive FIFO.
pub const MAX_SERIAL_FIFO: u32 = 64;

/// The VM-wide state.
#[derive(Default)]
pub struct VmState {
    pub clock: kvm_clock_data,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    /// COM1's registers and receive FIFO.
    pub serial: SerialState,
}

/// One vCPU's state.
#[derive(Default)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

/// The whole non-memory state of a KVM guest.
#[derive(Default)]
pub struct KvmState {
    pub memory_bytes: u64,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
}

impl std::fmt::Debug for KvmState {
    /// A summary: the parts are kernel structures, some kilobytes each.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmState")
            .field("memory_bytes", &self.memory_bytes)
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// Why a state blob cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a KVM guest state (magic 0x{0:08x})")]
    BadMagic(u32),
    #[error("KVM guest state version {found} is not {VERSION}, the only one this build reads (version 1 is the host-built guest of livemig before the PVH image)")]
    UnknownVersion { found: u16 },
    #[error("state part {part}: version {found} is unknown (this build reads up to {known})")]
    UnknownPartVersion {
        part: &'static str,
        found: u16,
        known: u16,
    },
    #[error("state part {part}: {found} bytes, version {version} has {expected}")]
    WrongSize {
        part: &'static str,
        version: u16,
        expected: u64,
        found: u64,
    },
    #[error("state part {expected} expected, found tag {found:?}")]
    UnexpectedPart {
        expected: &'static str,
        found: String,
    },
    #[error("state describes {0} vCPUs: must be 1..={MAX_VCPUS}")]
    BadVcpuCount(u32),
    #[error("state part VCPU: index {found} where {expected} was expected")]
    BadVcpuIndex { found: u32, expected: u32 },
    #[error("state part MSRS: {0} MSRs, at most {MAX_MSRS}")]
    TooManyMsrs(u32),
    #[error("state part SERL: {0} bytes in the UART's FIFO, at most {MAX_SERIAL_FIFO}")]
    SerialFifo(u32),
    #[error("state blob: {0}")]
    Wire(#[from] WireError),
}

/// A part stored as the KVM structure's bytes.
trait Raw: IntoBytes + FromBytes + Immutable + Sized {}
impl<T: IntoBytes + FromBytes + Immutable + Sized> Raw for T {}

/// Part tags, also the names used in errors.
const CLCK: &str = "CLCK";
const PICM: &str = "PICM";
const PICS: &str = "PICS";
const IOAP: &str = "IOAP";
const PIT2: &str = "PIT2";
const SERL: &str = "SERL";
const VCPU: &str = "VCPU";
const REGS: &str = "REGS";
const SREG: &str = "SREG";
const XSAV: &str = "XSAV";
const XCRS: &str = "XCRS";
const DBGR: &str = "DBGR";
const LAPI: &str = "LAPI";
const MSRS: &str = "MSRS";
const EVNT: &str = "EVNT";
const MPST: &str = "MPST";

/// The version this build writes of every part.
const PART_VERSION: u16 = 1;

fn tag(name: &str) -> [u8; 4] {
    let mut t = [0u8; 4];
    t.copy_from_slice(&name.as_bytes()[..4]);
    t
}

fn put_part(w: &mut Writer<'_>, name: &str, payload: &[u8]) {
    w.bytes(&tag(name))
        .u16(PART_VERSION)
        .u16(0)
        .u32(payload.len() as u32)
        .bytes(payload);
}

fn put_raw<T: Raw>(w: &mut Writer<'_>, name: &str, v: &T) {
    put_part(w, name, v.as_bytes());
}

/// Reads the next part, which must be `name`; returns its version and payload.
fn get_part<'a>(r: &mut Reader<'a>, name: &'static str) -> Result<(u16, &'a [u8]), StateError> {
    let t = r.array::<4>()?;
    if t != tag(name) {
        return Err(StateError::UnexpectedPart {
            expected: name,
            found: String::from_utf8_lossy(&t).into_owned(),
        });
    }
    let version = r.u16()?;
    r.u16()?;
    let len = r.u32()? as usize;
    // `bytes` checks the length against what is left before slicing.
    let payload = r.bytes(len)?;
    if version == 0 || version > PART_VERSION {
        return Err(StateError::UnknownPartVersion {
            part: name,
            found: version,
            known: PART_VERSION,
        });
    }
    Ok((version, payload))
}

fn wrong_size(part: &'static str, version: u16, expected: usize, found: usize) -> StateError {
    StateError::WrongSize {
        part,
        version,
        expected: expected as u64,
        found: found as u64,
    }
}

fn get_raw<T: Raw>(r: &mut Reader<'_>, name: &'static str) -> Result<T, StateError> {
    let (version, payload) = get_part(r, name)?;
    // Version 1 is the only one so far: the structure's bytes.
    T::read_from_bytes(payload)
        .map_err(|_| wrong_size(name, version, std::mem::size_of::<T>(), payload.len()))
}

impl KvmState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192 * (1 + self.vcpus.len()));
        let mut w = Writer::new(&mut out);
        w.u32(MAGIC)
            .u16(VERSION)
            .u16(0)
            .u64(self.memory_bytes)
            .u32(self.vcpus.len() as u32);
        let vm = &self.vm;
        put_raw(&mut w, CLCK, &vm.clock);
        put_raw(&mut w, PICM, &vm.pic_master);
        put_raw(&mut w, PICS, &vm.pic_slave);
        put_raw(&mut w, IOAP, &vm.ioapic);
        put_raw(&mut w, PIT2, &vm.pit);
        put_part(&mut w, SERL, &serial_bytes(&vm.serial));
        for (i, v) in self.vcpus.iter().enumerate() {
            put_part(&mut w, VCPU, &(i as u32).to_le_bytes());
            put_raw(&mut w, REGS, &v.regs);
            put_raw(&mut w, SREG, &v.sregs);
            put_raw(&mut w, XSAV, &v.xsave);
            put_raw(&mut w, XCRS, &v.xcrs);
            put_raw(&mut w, DBGR, &v.debugregs);
            put_raw(&mut w, LAPI, &v.lapic);
            let mut msrs = Vec::with_capacity(4 + 16 * v.msrs.len());
            msrs.extend_from_slice(&(v.msrs.len() as u32).to_le_bytes());
            for e in &v.msrs {
                msrs.extend_from_slice(e.as_bytes());
            }
            put_part(&mut w, MSRS, &msrs);
            put_raw(&mut w, EVNT, &v.events);
            put_raw(&mut w, MPST, &v.mp_state);
        }
        out
    }

    pub fn decode(buf: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader::new(buf, "KVM guest state");
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(StateError::BadMagic(magic));
        }
        let found = r.u16()?;
        if found != VERSION {
            return Err(StateError::UnknownVersion { found });
        }
        r.u16()?;
        let memory_bytes = r.u64()?;
        let n = r.u32()?;
        if n == 0 || n > MAX_VCPUS {
            return Err(StateError::BadVcpuCount(n));
        }
        let vm = VmState {
            clock: get_raw(&mut r, CLCK)?,
            pic_master: get_raw(&mut r, PICM)?,
            pic_slave: get_raw(&mut r, PICS)?,
            ioapic: get_raw(&mut r, IOAP)?,
            pit: get_raw(&mut r, PIT2)?,
            serial: get_serial(&mut r)?,
        };
        let mut vcpus = Vec::with_capacity(n as usize);
        for i in 0..n {
            let index: u32 = get_raw(&mut r, VCPU)?;
            if index != i {
                return Err(StateError::BadVcpuIndex {
                    found: index,
                    expected: i,
                });
            }
            vcpus.push(VcpuState {
                regs: get_raw(&mut r, REGS)?,
                sregs: get_raw(&mut r, SREG)?,
                xsave: get_raw(&mut r, XSAV)?,
                xcrs: get_raw(&mut r, XCRS)?,
                debugregs: get_raw(&mut r, DBGR)?,
                lapic: get_raw(&mut r, LAPI)?,
                msrs: get_msrs(&mut r)?,
                events: get_raw(&mut r, EVNT)?,
                mp_state: get_raw(&mut r, MPST)?,
            });
        }
        r.finish()?;
        Ok(KvmState {
            memory_bytes,
            vm,
            vcpus,
        })
    }
}

fn serial_bytes(s: &SerialState) -> Vec<u8> {
    let mut b = vec![
        s.baud_divisor_low,
        s.baud_divisor_high,
        s.interrupt_enable,
        s.interrupt_identification,
        s.line_control,
        s.line_status,
        s.modem_control,
        s.modem_status,
        s.scratch,
    ];
    b.extend_from_slice(&(s.in_buffer.len() as u32).to_le_bytes());
    b.extend_from_slice(&s.in_buffer);
    b
}

fn get_serial(r: &mut Reader<'_>) -> Result<SerialState, StateError> {
    let (version, payload) = get_part(r, SERL)?;
    let mut p = Reader::new(payload, "SERL part");
    let regs = p.array::<9>()?;
    let len = p.u32()?;
    if len > MAX_SERIAL_FIFO {
        return Err(StateError::SerialFifo(len));
    }
    if payload.len() != 13 + len as usize {
        return Err(wrong_size(SERL, version, 13 + len as usize, payload.len()));
    }
    Ok(SerialState {
        baud_divisor_low: regs[0],
        baud_divisor_high: regs[1],
        interrupt_enable: regs[2],
        interrupt_identification: regs[3],
        line_control: regs[4],
        line_status: regs[5],
        modem_control: regs[6],
        modem_status: regs[7],
        scratch: regs[8],
        in_buffer: p.rest().to_vec(),
    })
}

fn get_msrs(r: &mut Reader<'_>) -> Result<Vec<kvm_msr_entry>, StateError> {
    let (version, payload) = get_part(r, MSRS)?;
    let mut p = Reader::new(payload, "MSRS part");
    let count = p.u32()?;
    if count > MAX_MSRS {
        return Err(StateError::TooManyMsrs(count));
    }
    let entry = std::mem::size_of::<kvm_msr_entry>();
    let expected = 4 + count as usize * entry;
    if payload.len() != expected {
        return Err(wrong_size(MSRS, version, expected, payload.len()));
    }
    p.rest()
        .chunks_exact(entry)
        .map(|c| {
            kvm_msr_entry::read_from_bytes(c).map_err(|_| wrong_size(MSRS, version, entry, c.len()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> KvmState {
        let mut vm = VmState::default();
        vm.clock.clock = 123_456;
        vm.pic_master.chip_id = 0;
        vm.pic_slave.chip_id = 1;
        vm.ioapic.chip_id = 2;
        vm.pit.flags = 1;
        vm.serial = SerialState {
            line_control: 3,
            scratch: 0x5a,
            in_buffer: b"verify\n".to_vec(),
            ..SerialState::default()
        };
        let vcpu = |i: u64| {
            let mut v = VcpuState::default();
            v.regs.rip = 0x2_0000 + i;
            v.regs.rdi = i;
            v.sregs.cr3 = 0x8000;
            v.xsave.region[0] = 0x37f;
            v.xcrs.nr_xcrs = 1;
            v.debugregs.dr7 = 0x400;
            v.lapic.regs[0x20] = 7;
            v.msrs = vec![
                kvm_msr_entry {
                    index: 0x10,
                    data: 99 + i,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0xc000_0080,
                    data: 0x500,
                    ..Default::default()
                },
            ];
            v.events.nmi.pending = 1;
            v.mp_state.mp_state = 0;
            v
        };
        KvmState {
            memory_bytes: 64 << 20,
            vm,
            vcpus: vec![vcpu(0), vcpu(1)],
        }
    }

    #[test]
    fn round_trip_of_every_part() {
        let s = sample();
        let blob = s.encode();
        let d = KvmState::decode(&blob).unwrap();
        assert_eq!(d.encode(), blob);
        assert_eq!(d.memory_bytes, 64 << 20);
        assert_eq!(d.vm.clock.clock, 123_456);
        assert_eq!(d.vm.ioapic.chip_id, 2);
        assert_eq!(d.vm.pit.flags, 1);
        assert_eq!(d.vm.serial, s.vm.serial);
        assert_eq!(d.vcpus.len(), 2);
        let v = &d.vcpus[1];
        assert_eq!(v.regs, s.vcpus[1].regs);
        assert_eq!(v.sregs, s.vcpus[1].sregs);
        assert_eq!(v.xsave.region[0], 0x37f);
        assert_eq!(v.xcrs.nr_xcrs, 1);
        assert_eq!(v.debugregs.dr7, 0x400);
        assert_eq!(v.lapic.regs[0x20], 7);
        assert_eq!(v.msrs, s.vcpus[1].msrs);
        assert_eq!(v.events.nmi.pending, 1);
        assert_eq!(v.mp_state, s.vcpus[1].mp_state);
    }

    /// Offset of the first part named `name` in `blob`.
    fn part_at(blob: &[u8], name: &str) -> usize {
        blob.windows(4).position(|w| w == name.as_bytes()).unwrap()
    }

    #[test]
    fn rejects_unknown_versions() {
        let mut b = sample().encode();
        b[4] = 9;
        let e = KvmState::decode(&b).unwrap_err();
        assert_eq!(e, StateError::UnknownVersion { found: 9 });
        assert!(e.to_string().contains("version 9"), "{e}");
        // Version 1 (the host-built guest before the PVH image) is refused by name.
        let mut b = sample().encode();
        b[4] = 1;
        let e = KvmState::decode(&b).unwrap_err();
        assert_eq!(e, StateError::UnknownVersion { found: 1 });
        assert!(e.to_string().contains("version 1 is not 2"), "{e}");
        for name in [CLCK, PIT2, SERL, REGS, XSAV, MSRS, MPST] {
            let mut b = sample().encode();
            let at = part_at(&b, name);
            b[at + 4] = 2;
            let e = KvmState::decode(&b).unwrap_err();
            assert_eq!(
                e,
                StateError::UnknownPartVersion {
                    part: name,
                    found: 2,
                    known: 1
                }
            );
            assert!(e.to_string().contains(name), "{e}");
        }
    }

    #[test]
    fn rejects_wrong_sizes() {
        // A REGS part one byte short, with its length field matching: a wrong size.
        let s = sample();
        let mut b = s.encode();
        let at = part_at(&b, REGS);
        let len = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap());
        b[at + 8..at + 12].copy_from_slice(&(len - 1).to_le_bytes());
        b.remove(at + 12);
        let e = KvmState::decode(&b).unwrap_err();
        assert!(
            matches!(e, StateError::WrongSize { part: "REGS", found, expected, .. } if found + 1 == expected),
            "{e:?}"
        );
        // An MSR count that does not match the part's length.
        let mut b = s.encode();
        let at = part_at(&b, MSRS);
        b[at + 12] = 3;
        assert!(matches!(
            KvmState::decode(&b),
            Err(StateError::WrongSize { part: "MSRS", .. })
        ));
        // Truncated anywhere: a clean error.
        let b = s.encode();
        for cut in [0, 3, 10, 25, b.len() / 2, b.len() - 1] {
            assert!(KvmState::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        // Trailing bytes.
        let mut b = s.encode();
        b.push(0);
        assert!(matches!(KvmState::decode(&b), Err(StateError::Wire(_))));
    }

    #[test]
    fn rejects_garbage_and_bad_counts() {
        assert!(matches!(
            KvmState::decode(b"LMSY\x01\x00\x00\x00"),
            Err(StateError::BadMagic(_))
        ));
        let mut b = sample().encode();
        b[16..20].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            KvmState::decode(&b).unwrap_err(),
            StateError::BadVcpuCount(1000)
        );
        let mut b = sample().encode();
        let at = part_at(&b, PICS);
        b[at..at + 4].copy_from_slice(b"XXXX");
        assert!(matches!(
            KvmState::decode(&b),
            Err(StateError::UnexpectedPart {
                expected: "PICS",
                ..
            })
        ));
        let mut b = sample().encode();
        let at = part_at(&b, MSRS);
        b[at + 12..at + 16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            KvmState::decode(&b).unwrap_err(),
            StateError::TooManyMsrs(u32::MAX)
        );
        // A UART FIFO longer than the UART's.
        let mut b = sample().encode();
        let at = part_at(&b, SERL);
        b[at + 12 + 9..at + 12 + 13].copy_from_slice(&65u32.to_le_bytes());
        assert_eq!(
            KvmState::decode(&b).unwrap_err(),
            StateError::SerialFifo(65)
        );
    }
}
