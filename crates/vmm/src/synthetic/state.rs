//! The synthetic guest's non-memory state as a versioned blob: the workload's settings, the
//! write counter, and every page's generation.
//!
//! ```text
//! magic "LMSY" u32 | version u16 | reserved u16 | pages u64 | counter u64
//! | working_set_pages u64 | rate u64 | threads u32 | gens: pages x u32
//! ```

use livemig_wire::{Reader, WireError, Writer};

const MAGIC: u32 = u32::from_le_bytes(*b"LMSY");
/// The state version this build writes; it reads this one and every older one.
pub const VERSION: u16 = 1;

/// What the dirtying workload does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Pages, from page 0, that the workload writes.
    pub working_set_pages: u64,
    /// Page writes per second over all threads; 0 for as fast as possible.
    pub rate: u64,
    /// Dirtying threads (the synthetic guest's "vCPUs").
    pub threads: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticState {
    pub counter: u64,
    pub workload: Workload,
    pub gens: Vec<u32>,
}

/// Why a state blob cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a synthetic guest state (magic 0x{0:08x})")]
    BadMagic(u32),
    #[error("synthetic guest state version {found} is unknown (this build reads up to {VERSION})")]
    UnknownVersion { found: u16 },
    #[error("state is for {found} pages, this guest has {expected}")]
    WrongPageCount { found: u64, expected: u64 },
    #[error("state blob: {0}")]
    Wire(#[from] WireError),
    #[error("workload has {0} threads: must be 1..=64")]
    BadThreads(u32),
}

impl SyntheticState {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44 + 4 * self.gens.len());
        let mut w = Writer::new(&mut out);
        w.u32(MAGIC)
            .u16(VERSION)
            .u16(0)
            .u64(self.gens.len() as u64)
            .u64(self.counter)
            .u64(self.workload.working_set_pages)
            .u64(self.workload.rate)
            .u32(self.workload.threads);
        for &g in &self.gens {
            w.u32(g);
        }
        out
    }

    /// Decodes a blob for a guest of `pages` pages.
    pub fn decode(buf: &[u8], pages: u64) -> Result<Self, StateError> {
        let mut r = Reader::new(buf, "synthetic guest state");
        let magic = r.u32()?;
        if magic != MAGIC {
            return Err(StateError::BadMagic(magic));
        }
        let found = r.u16()?;
        if found == 0 || found > VERSION {
            return Err(StateError::UnknownVersion { found });
        }
        r.u16()?;
        let n = r.u64()?;
        if n != pages {
            return Err(StateError::WrongPageCount {
                found: n,
                expected: pages,
            });
        }
        let counter = r.u64()?;
        let workload = Workload {
            working_set_pages: r.u64()?,
            rate: r.u64()?,
            threads: r.u32()?,
        };
        if workload.threads == 0 || workload.threads > 64 {
            return Err(StateError::BadThreads(workload.threads));
        }
        // The page count matches our own guest, so this allocation is bounded by our memory.
        if r.remaining() as u64 != 4 * pages {
            return Err(WireError::BadLength {
                what: "generation table",
                expected: 4 * pages,
                found: r.remaining() as u64,
            }
            .into());
        }
        let gens = r
            .rest()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(SyntheticState {
            counter,
            workload,
            gens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> SyntheticState {
        SyntheticState {
            counter: 9,
            workload: Workload {
                working_set_pages: 3,
                rate: 100,
                threads: 1,
            },
            gens: vec![1, 0, 8],
        }
    }

    #[test]
    fn round_trip() {
        let s = state();
        assert_eq!(SyntheticState::decode(&s.encode(), 3).unwrap(), s);
    }

    #[test]
    fn rejects_unknown_version_wrong_size_and_garbage() {
        let mut b = state().encode();
        b[4] = 7;
        let e = SyntheticState::decode(&b, 3).unwrap_err();
        assert_eq!(e, StateError::UnknownVersion { found: 7 });
        assert!(e.to_string().contains("version 7"));
        assert!(matches!(
            SyntheticState::decode(&state().encode(), 4),
            Err(StateError::WrongPageCount { .. })
        ));
        let mut b = state().encode();
        b.pop();
        assert!(SyntheticState::decode(&b, 3).is_err());
        assert!(matches!(
            SyntheticState::decode(b"nope", 3),
            Err(StateError::Wire(_)) | Err(StateError::BadMagic(_))
        ));
    }
}
