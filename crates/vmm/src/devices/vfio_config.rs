//! [`VfioSimConfig`]: a VFIO-like device's configuration, its spec-string syntax
//! (`size=256M,rate=500M,precopy=16M,seed=7`) and its descriptor encoding.
//!
//! Descriptor encoding (little-endian, 66 bytes):
//!
//! ```text
//! 0   version u8 = 1
//! 1   flags u8: bit 0 fail_save_at present, bit 1 panic_save_at, bit 2 fail_load_at
//! 2   size u64 | 10 rate u64 | 18 precopy u64 | 26 seed u64 | 34 gen_ms u64
//! 42  fail_save_at u64 | 50 panic_save_at u64 | 58 fail_load_at u64   (0 when absent)
//! ```

use super::spec::{parse_number, parse_size, split_spec};

pub const CONFIG_VERSION: u8 = 1;
pub const CONFIG_LEN: usize = 66;
/// A new precopy generation every second unless the spec says otherwise.
pub const DEFAULT_GEN_MS: u64 = 1000;

/// A VFIO-like device's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioSimConfig {
    /// Bytes of final state (the payload of the final section).
    pub size: u64,
    /// Read speed in bytes/s; 0 = unlimited.
    pub rate: u64,
    /// Bytes of precopy data per generation; 0 = no precopy data.
    pub precopy: u64,
    pub seed: u64,
    /// Wall-clock milliseconds per device generation while the guest runs; 0 = the
    /// generation never advances by itself.
    pub gen_ms: u64,
    /// Test hook: `save_final` fails when it reaches this byte of the final section (once).
    pub fail_save_at: Option<u64>,
    /// Test hook: `save_final` panics when it reaches this byte of the final section (once).
    pub panic_save_at: Option<u64>,
    /// Test hook: the destination's `load` fails at this byte of the final section (every
    /// time: a twin is built per attempt; [`super::VfioSim::disarm`] stops carrying it).
    pub fail_load_at: Option<u64>,
    /// Test hook, source only (not in the descriptor): the first final save stalls this
    /// many milliseconds before its first byte (once), as a device whose migration fd
    /// blocks; `interrupt_save` ends the stall.
    pub stall_final_ms: Option<u64>,
}

impl Default for VfioSimConfig {
    fn default() -> Self {
        VfioSimConfig {
            size: 0,
            rate: 0,
            precopy: 0,
            seed: 0,
            gen_ms: DEFAULT_GEN_MS,
            fail_save_at: None,
            panic_save_at: None,
            fail_load_at: None,
            stall_final_ms: None,
        }
    }
}

/// Why a descriptor's config blob was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("decode vfio-sim config: unknown version {0} (this build knows {CONFIG_VERSION})")]
    UnknownVersion(u8),
    #[error("decode vfio-sim config: {got} bytes, expected {CONFIG_LEN}")]
    WrongLength { got: usize },
    #[error("decode vfio-sim config: unknown flag bits 0x{0:02x}")]
    UnknownFlags(u8),
    #[error("decode vfio-sim config: absent field {0} is not zero")]
    AbsentNotZero(&'static str),
}

impl VfioSimConfig {
    /// A config with `size` bytes of state and defaults for the rest.
    pub fn with_size(size: u64) -> Self {
        VfioSimConfig {
            size,
            ..Default::default()
        }
    }

    /// Parses `size=256M,rate=500M,precopy=16M,seed=7,gen_ms=100` (plus the test hooks
    /// `fail_save_at=`, `panic_save_at=`, `fail_load_at=`). `size` is required; sizes and
    /// rates take binary K/M/G/T suffixes (a rate may end in `/s`).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut cfg = VfioSimConfig::default();
        let mut have_size = false;
        for (key, value) in split_spec(spec)? {
            match key {
                "size" => {
                    cfg.size = parse_size(key, value)?;
                    have_size = true;
                }
                "rate" => cfg.rate = parse_size(key, value.strip_suffix("/s").unwrap_or(value))?,
                "precopy" => cfg.precopy = parse_size(key, value)?,
                "seed" => cfg.seed = parse_number(key, value)?,
                "gen_ms" => cfg.gen_ms = parse_number(key, value)?,
                "fail_save_at" => cfg.fail_save_at = Some(parse_size(key, value)?),
                "panic_save_at" => cfg.panic_save_at = Some(parse_size(key, value)?),
                "fail_load_at" => cfg.fail_load_at = Some(parse_size(key, value)?),
                "stall_final_ms" => cfg.stall_final_ms = Some(parse_number(key, value)?),
                other => {
                    return Err(format!(
                        "vfio-sim: unknown key '{other}' (known: size, rate, precopy, seed, \
                         gen_ms, fail_save_at, panic_save_at, fail_load_at, stall_final_ms)"
                    ))
                }
            }
        }
        if !have_size {
            return Err("vfio-sim: missing size= (e.g. size=256M)".to_string());
        }
        Ok(cfg)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CONFIG_LEN);
        let hooks = [self.fail_save_at, self.panic_save_at, self.fail_load_at];
        let flags = hooks
            .iter()
            .enumerate()
            .fold(0u8, |f, (i, h)| if h.is_some() { f | (1 << i) } else { f });
        out.push(CONFIG_VERSION);
        out.push(flags);
        for v in [self.size, self.rate, self.precopy, self.seed, self.gen_ms] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for h in hooks {
            out.extend_from_slice(&h.unwrap_or(0).to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self, ConfigError> {
        if let Some(&v) = b.first() {
            if v != CONFIG_VERSION {
                return Err(ConfigError::UnknownVersion(v));
            }
        }
        if b.len() != CONFIG_LEN {
            return Err(ConfigError::WrongLength { got: b.len() });
        }
        let flags = b[1];
        if flags & !0b111 != 0 {
            return Err(ConfigError::UnknownFlags(flags));
        }
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let names = ["fail_save_at", "panic_save_at", "fail_load_at"];
        let mut hooks = [None; 3];
        for (i, hook) in hooks.iter_mut().enumerate() {
            let v = u64_at(42 + 8 * i);
            if flags & (1 << i) != 0 {
                *hook = Some(v);
            } else if v != 0 {
                return Err(ConfigError::AbsentNotZero(names[i]));
            }
        }
        Ok(VfioSimConfig {
            size: u64_at(2),
            rate: u64_at(10),
            precopy: u64_at(18),
            seed: u64_at(26),
            gen_ms: u64_at(34),
            fail_save_at: hooks[0],
            panic_save_at: hooks[1],
            fail_load_at: hooks[2],
            stall_final_ms: None,
        })
    }

    /// The same device without its test hooks.
    pub fn without_hooks(&self) -> Self {
        VfioSimConfig {
            fail_save_at: None,
            panic_save_at: None,
            fail_load_at: None,
            stall_final_ms: None,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_spec() {
        let cfg = VfioSimConfig::parse("size=256M,rate=500M/s,precopy=16M,seed=7,gen_ms=50")
            .expect("parse");
        assert_eq!(cfg.size, 256 << 20);
        assert_eq!(cfg.rate, 500 << 20);
        assert_eq!(cfg.precopy, 16 << 20);
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.gen_ms, 50);
        let cfg = VfioSimConfig::parse("size=1G,fail_load_at=1M,").expect("parse");
        assert_eq!(cfg.size, 1 << 30);
        assert_eq!(cfg.fail_load_at, Some(1 << 20));
        assert_eq!(cfg.rate, 0);
    }

    #[test]
    fn spec_errors_name_the_key_and_value() {
        let err = |s: &str| VfioSimConfig::parse(s).expect_err(s);
        assert!(err("size=12Q").contains("size") && err("size=12Q").contains("12Q"));
        assert!(err("size=1M,colour=red").contains("colour"));
        assert!(err("rate=5M").contains("missing size"));
        assert!(err("size=1M,size=2M").contains("twice"));
        assert!(err("size").contains("key=value"));
        assert!(err("size=99999999999T").contains("too large"));
        assert!(err("size=1M,seed=x").contains("seed"));
        assert!(err("size=").contains("size"));
    }

    #[test]
    fn config_codec_round_trip_and_rejections() {
        let cfg = VfioSimConfig {
            size: 3 << 30,
            rate: 1 << 29,
            precopy: 1 << 20,
            seed: u64::MAX,
            gen_ms: 10,
            fail_save_at: Some(0),
            panic_save_at: None,
            fail_load_at: Some(77),
            stall_final_ms: None,
        };
        let enc = cfg.encode();
        assert_eq!(enc.len(), CONFIG_LEN);
        assert_eq!(VfioSimConfig::decode(&enc), Ok(cfg));
        let mut bad = enc.clone();
        bad[0] = 2;
        assert_eq!(
            VfioSimConfig::decode(&bad),
            Err(ConfigError::UnknownVersion(2))
        );
        assert_eq!(
            VfioSimConfig::decode(&enc[..65]),
            Err(ConfigError::WrongLength { got: 65 })
        );
        assert!(VfioSimConfig::decode(&[]).is_err());
        let mut bad = enc.clone();
        bad[1] |= 0x80;
        assert!(matches!(
            VfioSimConfig::decode(&bad),
            Err(ConfigError::UnknownFlags(_))
        ));
        let mut bad = enc;
        bad[1] &= !0b100;
        assert_eq!(
            VfioSimConfig::decode(&bad),
            Err(ConfigError::AbsentNotZero("fail_load_at"))
        );
    }
}
