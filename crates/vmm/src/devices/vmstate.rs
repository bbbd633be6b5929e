//! A small non-iterable device ("serial"/"rtc"-like): a register file of a few hundred
//! bytes, saved as one blob while the guest is paused and checked on load.
//!
//! Blob (little-endian): `magic "VMSS" | version u16 = 1 | len u16 | regs[len] | crc32c u32`
//! (the crc covers everything before it). Config in the descriptor:
//! `version u8 = 1 | regs u16 | seed u64` (11 bytes).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use livemig_engine::{DeviceDescriptor, DeviceError, VmState};

use super::spec::{parse_number, parse_size, split_spec};

pub const KIND: &str = "vmstate-sim";
const BLOB_MAGIC: [u8; 4] = *b"VMSS";
const BLOB_VERSION: u16 = 1;
const BLOB_OVERHEAD: usize = 4 + 2 + 2 + 4;
const CONFIG_VERSION: u8 = 1;
const CONFIG_LEN: usize = 11;
/// Register files are between 1 byte and 4 KiB.
pub const MAX_REGS: u16 = 4096;

/// A register-file device's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmStateSimConfig {
    /// Bytes of registers, 1..=MAX_REGS.
    pub regs: u16,
    /// The registers' initial content on the source.
    pub seed: u64,
}

impl Default for VmStateSimConfig {
    fn default() -> Self {
        VmStateSimConfig { regs: 256, seed: 0 }
    }
}

impl VmStateSimConfig {
    /// Parses `regs=256,seed=3` (both optional).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut cfg = VmStateSimConfig::default();
        for (key, value) in split_spec(spec)? {
            match key {
                "regs" => {
                    let n = parse_size(key, value)?;
                    cfg.regs = u16::try_from(n)
                        .ok()
                        .filter(|&r| (1..=MAX_REGS).contains(&r))
                        .ok_or_else(|| format!("{key}={value}: must be 1..={MAX_REGS}"))?;
                }
                "seed" => cfg.seed = parse_number(key, value)?,
                other => {
                    return Err(format!(
                        "vmstate-sim: unknown key '{other}' (known: regs, seed)"
                    ))
                }
            }
        }
        Ok(cfg)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CONFIG_LEN);
        out.push(CONFIG_VERSION);
        out.extend_from_slice(&self.regs.to_le_bytes());
        out.extend_from_slice(&self.seed.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, String> {
        match b.first() {
            Some(&CONFIG_VERSION) => {}
            Some(v) => return Err(format!("unknown vmstate-sim config version {v}")),
            None => return Err("empty vmstate-sim config".to_string()),
        }
        if b.len() != CONFIG_LEN {
            return Err(format!(
                "vmstate-sim config is {} bytes, expected {CONFIG_LEN}",
                b.len()
            ));
        }
        let regs = u16::from_le_bytes([b[1], b[2]]);
        if !(1..=MAX_REGS).contains(&regs) {
            return Err(format!(
                "vmstate-sim config: {regs} registers, must be 1..={MAX_REGS}"
            ));
        }
        let mut seed = [0u8; 8];
        seed.copy_from_slice(&b[3..11]);
        Ok(VmStateSimConfig {
            regs,
            seed: u64::from_le_bytes(seed),
        })
    }
}

/// A register-file device.
pub struct VmStateSim {
    name: String,
    cfg: VmStateSimConfig,
    regs: Mutex<Vec<u8>>,
    loaded: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl VmStateSim {
    /// A source device whose registers start from its seed.
    pub fn new(name: impl Into<String>, cfg: VmStateSimConfig) -> Self {
        let mut x = cfg.seed ^ 0x9e37_79b9_7f4a_7c15;
        let regs = (0..cfg.regs)
            .map(|_| {
                // xorshift64: any deterministic, varied content will do.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        Self::with_regs(name.into(), cfg, regs)
    }

    /// The destination's twin: registers zeroed (a reset device) until its blob is loaded.
    pub fn from_descriptor(desc: &DeviceDescriptor) -> Result<Self, DeviceError> {
        if desc.kind != KIND {
            let why = format!("kind '{}' is not {KIND}", desc.kind);
            return Err(DeviceError::new(&desc.name, "create", why));
        }
        let cfg = VmStateSimConfig::decode(&desc.config)
            .map_err(|e| DeviceError::new(&desc.name, "create", e))?;
        Ok(Self::with_regs(
            desc.name.clone(),
            cfg,
            vec![0; usize::from(cfg.regs)],
        ))
    }

    fn with_regs(name: String, cfg: VmStateSimConfig, regs: Vec<u8>) -> Self {
        VmStateSim {
            name,
            cfg,
            regs: Mutex::new(regs),
            loaded: AtomicBool::new(false),
        }
    }

    /// The guest writes a register. Out of range is an error.
    pub fn write_reg(&self, idx: usize, value: u8) -> Result<(), DeviceError> {
        let mut regs = lock(&self.regs);
        let len = regs.len();
        let reg = regs.get_mut(idx).ok_or_else(|| {
            DeviceError::new(&self.name, "write_reg", format!("register {idx} of {len}"))
        })?;
        *reg = value;
        Ok(())
    }

    pub fn registers(&self) -> Vec<u8> {
        lock(&self.regs).clone()
    }

    /// True once a blob has been loaded.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
    }
}

impl VmState for VmStateSim {
    fn descriptor(&self) -> DeviceDescriptor {
        DeviceDescriptor {
            kind: KIND.to_string(),
            name: self.name.clone(),
            config: self.cfg.encode(),
        }
    }

    fn save(&self) -> Result<Vec<u8>, DeviceError> {
        let regs = lock(&self.regs);
        let len = u16::try_from(regs.len())
            .map_err(|_| DeviceError::new(&self.name, "save", "register file too large"))?;
        let mut blob = Vec::with_capacity(regs.len() + BLOB_OVERHEAD);
        blob.extend_from_slice(&BLOB_MAGIC);
        blob.extend_from_slice(&BLOB_VERSION.to_le_bytes());
        blob.extend_from_slice(&len.to_le_bytes());
        blob.extend_from_slice(&regs);
        let crc = crc32c::crc32c(&blob);
        blob.extend_from_slice(&crc.to_le_bytes());
        Ok(blob)
    }

    fn load(&self, blob: &[u8]) -> Result<(), DeviceError> {
        let bad = |why: String| DeviceError::new(&self.name, "load", why);
        let want = usize::from(self.cfg.regs) + BLOB_OVERHEAD;
        if blob.len() != want {
            return Err(bad(format!(
                "blob is {} bytes, expected {want}",
                blob.len()
            )));
        }
        if blob[0..4] != BLOB_MAGIC {
            return Err(bad("bad magic".to_string()));
        }
        let version = u16::from_le_bytes([blob[4], blob[5]]);
        if version != BLOB_VERSION {
            return Err(bad(format!("unknown blob version {version}")));
        }
        let len = u16::from_le_bytes([blob[6], blob[7]]);
        if len != self.cfg.regs {
            return Err(bad(format!(
                "{len} registers, this device has {}",
                self.cfg.regs
            )));
        }
        let (body, trailer) = blob.split_at(want - 4);
        let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
        let computed = crc32c::crc32c(body);
        if crc != computed {
            return Err(bad(format!(
                "checksum mismatch (computed 0x{computed:08x}, blob says 0x{crc:08x})"
            )));
        }
        lock(&self.regs).copy_from_slice(&body[8..]);
        self.loaded.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (VmStateSim, VmStateSim) {
        let src = VmStateSim::new(
            "rtc0",
            VmStateSimConfig::parse("regs=300,seed=4").expect("spec"),
        );
        let dest = VmStateSim::from_descriptor(&src.descriptor()).expect("twin");
        (src, dest)
    }

    #[test]
    fn blob_round_trip() {
        let (src, dest) = pair();
        src.write_reg(299, 0xab).expect("write");
        assert!(src.write_reg(300, 1).is_err());
        assert_ne!(src.registers(), dest.registers());
        dest.load(&src.save().expect("save")).expect("load");
        assert_eq!(src.registers(), dest.registers());
        assert!(dest.loaded());
    }

    #[test]
    fn bad_blobs_are_rejected_and_change_nothing() {
        let (src, dest) = pair();
        let blob = src.save().expect("save");
        let before = dest.registers();
        let mut flipped = blob.clone();
        flipped[100] ^= 1;
        let err = dest.load(&flipped).expect_err("checksum");
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(dest
            .load(&blob[..blob.len() - 1])
            .is_err_and(|e| e.detail.contains("bytes")));
        let mut v2 = blob.clone();
        v2[4] = 2;
        assert!(dest.load(&v2).is_err_and(|e| e.detail.contains("version")));
        assert!(dest.load(&[]).is_err());
        assert_eq!(dest.registers(), before);
        assert!(!dest.loaded());
    }

    #[test]
    fn spec_and_config_errors() {
        assert!(VmStateSimConfig::parse("regs=0").is_err_and(|e| e.contains("regs=0")));
        assert!(VmStateSimConfig::parse("regs=5000").is_err());
        assert!(VmStateSimConfig::parse("colour=1").is_err_and(|e| e.contains("colour")));
        let enc = VmStateSimConfig::default().encode();
        assert_eq!(
            VmStateSimConfig::decode(&enc),
            Ok(VmStateSimConfig::default())
        );
        let mut bad = enc.clone();
        bad[0] = 7;
        assert!(VmStateSimConfig::decode(&bad).is_err_and(|e| e.contains("version 7")));
        assert!(VmStateSimConfig::decode(&enc[..10]).is_err());
    }
}
