//! Device state on the wire: the device list of a session, stream chunks, credit, and the
//! blobs of non-iterable devices.
//!
//! ```text
//! DeviceChunk payload (data channel, or the main channel in serial mode):
//! +--------+-------+-------+------------------------+
//! | device | flags |  idx  | data (<= chunk size)   |
//! |  u16   |  u16  |  u32  |                        |
//! +--------+-------+-------+------------------------+
//! flags: bit 0 LAST (the stream ends with this chunk; its data may be empty)
//!
//! Credit payload (main channel, destination to source):
//! +--------+--------+
//! | device | up_to  |   the source may send chunks idx < up_to of this device
//! |  u16   |  u32   |
//! +--------+--------+
//! ```

use crate::cursor::{Reader, Writer};
use crate::WireError;

/// The most streamed devices, and the most non-iterable devices, in one session.
pub const MAX_DEVICES: usize = 64;
/// The largest device configuration blob.
pub const MAX_DEVICE_CONFIG: usize = 4096;
/// The largest chunk size a session may choose.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Bytes of a DeviceChunk payload before its data.
pub const CHUNK_PREFIX: usize = 8;
const MAX_NAME: usize = 64;

/// A device as the source describes it in the session hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireDevice {
    /// What the destination must build to receive it, e.g. "vfio-sim" (at most 64 bytes).
    pub kind: String,
    /// A name unique within the VM, for messages (at most 64 bytes).
    pub name: String,
    /// The device's configuration as its kind defines it, for the destination to build
    /// the same device (at most [`MAX_DEVICE_CONFIG`] bytes).
    pub config: Vec<u8>,
}

/// How device state travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTransfer {
    /// Chunks on the data channels, with credit (livemig's design).
    Multifd = 0,
    /// Each device's whole state in turn on the main channel, at switchover (the baseline).
    Main = 1,
}

/// The device part of a session hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSetup {
    /// How the streamed devices' state travels (a byte: 0 multifd, 1 main).
    pub transfer: DeviceTransfer,
    /// Bytes per chunk, 1..=MAX_CHUNK_SIZE.
    pub chunk_size: u32,
    /// Chunks of credit per device the source asks for (0: the destination's default).
    pub window: u32,
    /// Bytes the source asks the destination to buffer at most across devices (0: default).
    pub buffer_cap: u64,
    /// Streamed devices; a device's index in this list is its id on the wire.
    pub devices: Vec<WireDevice>,
    /// Non-iterable devices, applied on the destination in this order.
    pub vmstates: Vec<WireDevice>,
}

impl Default for DeviceSetup {
    fn default() -> Self {
        DeviceSetup {
            transfer: DeviceTransfer::Multifd,
            chunk_size: 1 << 20,
            window: 0,
            buffer_cap: 0,
            devices: Vec::new(),
            vmstates: Vec::new(),
        }
    }
}

impl DeviceSetup {
    pub(crate) fn write(&self, w: &mut Writer<'_>) {
        w.u8(self.transfer as u8)
            .u32(self.chunk_size)
            .u32(self.window)
            .u64(self.buffer_cap);
        for list in [&self.devices, &self.vmstates] {
            w.u16(list.len() as u16);
            for d in list {
                w.string(&d.kind)
                    .string(&d.name)
                    .u16(d.config.len() as u16)
                    .bytes(&d.config);
            }
        }
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let transfer = match r.u8()? {
            0 => DeviceTransfer::Multifd,
            1 => DeviceTransfer::Main,
            v => {
                return Err(WireError::OutOfRange {
                    field: "device transfer",
                    value: v as u64,
                    reason: "must be 0 (multifd) or 1 (main)",
                })
            }
        };
        let chunk_size = r.u32()?;
        if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
            return Err(WireError::OutOfRange {
                field: "chunk size",
                value: chunk_size as u64,
                reason: "must be 1 byte to 16 MiB",
            });
        }
        let window = r.u32()?;
        let buffer_cap = r.u64()?;
        let mut lists = [Vec::new(), Vec::new()];
        for list in lists.iter_mut() {
            let n = r.u16()? as usize;
            if n > MAX_DEVICES {
                return Err(WireError::OutOfRange {
                    field: "devices",
                    value: n as u64,
                    reason: "at most 64",
                });
            }
            for _ in 0..n {
                let kind = r.string("device kind", MAX_NAME)?;
                let name = r.string("device name", MAX_NAME)?;
                let len = r.u16()? as usize;
                if len > MAX_DEVICE_CONFIG {
                    return Err(WireError::OutOfRange {
                        field: "device config",
                        value: len as u64,
                        reason: "at most 4096 bytes",
                    });
                }
                let config = r.bytes(len)?.to_vec();
                list.push(WireDevice { kind, name, config });
            }
        }
        let [devices, vmstates] = lists;
        Ok(DeviceSetup {
            transfer,
            chunk_size,
            window,
            buffer_cap,
            devices,
            vmstates,
        })
    }
}

/// The header of a DeviceChunk payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The device's index in the hello's streamed devices.
    pub device: u16,
    /// The chunk's place in its device's stream, from 0: the destination loads chunks in
    /// this order whatever channel brought them.
    pub idx: u32,
    /// The device's stream ends with this chunk (flags bit 0).
    pub last: bool,
}

const FLAG_LAST: u16 = 1;

impl ChunkHeader {
    /// The first [`CHUNK_PREFIX`] bytes of a DeviceChunk payload: device u16, flags u16,
    /// idx u32.
    pub fn encode(&self) -> [u8; CHUNK_PREFIX] {
        let mut v = Vec::with_capacity(CHUNK_PREFIX);
        Writer::new(&mut v)
            .u16(self.device)
            .u16(if self.last { FLAG_LAST } else { 0 })
            .u32(self.idx);
        let mut out = [0u8; CHUNK_PREFIX];
        out.copy_from_slice(&v);
        out
    }

    /// Reads a DeviceChunk payload's prefix; flags other than bit 0 are an error.
    pub fn decode(raw: &[u8; CHUNK_PREFIX]) -> Result<Self, WireError> {
        let mut r = Reader::new(raw, "DeviceChunk");
        let device = r.u16()?;
        let flags = r.u16()?;
        if flags & !FLAG_LAST != 0 {
            return Err(WireError::OutOfRange {
                field: "DeviceChunk flags",
                value: flags as u64,
                reason: "only bit 0 (last) is defined",
            });
        }
        let idx = r.u32()?;
        Ok(ChunkHeader {
            device,
            idx,
            last: flags & FLAG_LAST != 0,
        })
    }
}

/// Return path: credit for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    /// The device's index in the hello's streamed devices.
    pub device: u16,
    /// The source may send chunks with idx < up_to.
    pub up_to: u32,
}

impl Credit {
    /// The payload of a `Credit` frame: device u16, up_to u32.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).u16(self.device).u32(self.up_to);
        out
    }

    /// Reads a `Credit` payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "Credit");
        let v = Credit {
            device: r.u16()?,
            up_to: r.u32()?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// Main channel at switchover: the blob of every non-iterable device, in list order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStates {
    /// One state blob per non-iterable device of the hello, in its order.
    pub blobs: Vec<Vec<u8>>,
}

impl VmStates {
    /// The payload of a `VmStates` frame: count u16, then each blob as length u32 and
    /// bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.u16(self.blobs.len() as u16);
        for b in &self.blobs {
            w.u32(b.len() as u32).bytes(b);
        }
        out
    }
    /// Decodes `expected` blobs; each blob's length is bounded by the bytes actually present.
    pub fn decode(buf: &[u8], expected: usize) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "VmStates");
        let n = r.u16()? as usize;
        if n != expected {
            return Err(WireError::OutOfRange {
                field: "non-iterable device states",
                value: n as u64,
                reason: "not the number of devices in the session",
            });
        }
        let mut blobs = Vec::with_capacity(n);
        for _ in 0..n {
            let len = r.u32()? as usize;
            blobs.push(r.bytes(len)?.to_vec());
        }
        r.finish()?;
        Ok(VmStates { blobs })
    }
}

/// The destination's figures for one streamed device, returned in Loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceLoadStats {
    /// Bytes of state the destination loaded into the device.
    pub bytes: u64,
    /// Chunks it came in.
    pub chunks: u32,
    /// The most bytes of this device's chunks held in its reorder buffer at once.
    pub peak_buffered: u64,
    /// When the loader finished, in microseconds after the session began.
    pub done_us: u64,
}

impl DeviceLoadStats {
    pub(crate) fn write(&self, w: &mut Writer<'_>) {
        w.u64(self.bytes)
            .u32(self.chunks)
            .u64(self.peak_buffered)
            .u64(self.done_us);
    }
    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        Ok(DeviceLoadStats {
            bytes: r.u64()?,
            chunks: r.u32()?,
            peak_buffered: r.u64()?,
            done_us: r.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_header_round_trip_and_bad_flags() {
        let h = ChunkHeader {
            device: 3,
            idx: 77,
            last: true,
        };
        assert_eq!(ChunkHeader::decode(&h.encode()).unwrap(), h);
        let mut raw = h.encode();
        raw[2] = 0x80;
        assert!(ChunkHeader::decode(&raw).is_err());
    }

    #[test]
    fn credit_and_vmstates_round_trip() {
        let c = Credit {
            device: 1,
            up_to: 9,
        };
        assert_eq!(Credit::decode(&c.encode()).unwrap(), c);
        let v = VmStates {
            blobs: vec![vec![1, 2, 3], vec![]],
        };
        assert_eq!(VmStates::decode(&v.encode(), 2).unwrap(), v);
        assert!(VmStates::decode(&v.encode(), 3).is_err());
        let mut lying = v.encode();
        lying[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            VmStates::decode(&lying, 2).is_err(),
            "a length past the end is refused"
        );
    }

    #[test]
    fn device_setup_round_trip_and_limits() {
        let s = DeviceSetup {
            transfer: DeviceTransfer::Main,
            chunk_size: 1 << 20,
            window: 8,
            buffer_cap: 64 << 20,
            devices: vec![WireDevice {
                kind: "vfio-sim".into(),
                name: "vfio0".into(),
                config: vec![1; 20],
            }],
            vmstates: vec![WireDevice {
                kind: "vmstate-sim".into(),
                name: "rtc".into(),
                config: vec![],
            }],
        };
        let mut b = Vec::new();
        s.write(&mut Writer::new(&mut b));
        assert_eq!(DeviceSetup::read(&mut Reader::new(&b, "t")).unwrap(), s);
        let mut bad = b.clone();
        bad[1..5].copy_from_slice(&0u32.to_le_bytes());
        assert!(DeviceSetup::read(&mut Reader::new(&bad, "t")).is_err());
        let mut bad = b;
        bad[0] = 7;
        assert!(DeviceSetup::read(&mut Reader::new(&bad, "t")).is_err());
    }
}
