//! What the suite measures with, once the defaults and `--quick` are applied.

use super::args::{Section, MAX_RATE};
use crate::bench::BenchArgs;

pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: f64 = (1u64 << 30) as f64;
/// Data channels of the size and dirty-rate sections: livemig's default.
pub(super) const CHANNELS: u16 = 4;

/// What the suite measures with, once the defaults and `--quick` are applied.
pub(super) struct Plan {
    pub(super) sections: Vec<Section>,
    /// Guest memory of the channels and dirty sections.
    pub(super) memory: u64,
    pub(super) channels: Vec<u16>,
    pub(super) sizes: Vec<u64>,
    pub(super) dirty_rates: Vec<u64>,
    /// Working set of the dirty section.
    pub(super) working_set: u64,
    pub(super) device_counts: Vec<usize>,
    pub(super) raw_bytes: u64,
    pub(super) warmup_ms: u64,
}

impl Plan {
    pub(super) fn new(a: &mut BenchArgs) -> Plan {
        let s = &a.suite;
        let quick = s.quick;
        let memory = if quick {
            a.memory.min(64 * MIB)
        } else {
            a.memory
        };
        if quick {
            a.device_size = a.device_size.min(16 * MIB);
            a.device_guest_memory = a.device_guest_memory.min(64 * MIB);
        }
        let s = &a.suite;
        Plan {
            sections: s.sections.clone().unwrap_or_else(|| {
                vec![
                    Section::Channels,
                    Section::Size,
                    Section::Dirty,
                    Section::Devices,
                    Section::Local,
                    Section::Compress,
                ]
            }),
            memory,
            channels: s.channels_list.clone().unwrap_or_else(|| vec![1, 2, 4, 8]),
            sizes: s.sizes.clone().unwrap_or_else(|| {
                if quick {
                    vec![32 * MIB, 64 * MIB]
                } else {
                    vec![256 * MIB, 1 << 30, 2 << 30, 4 << 30]
                }
            }),
            dirty_rates: s.dirty_rates.clone().unwrap_or_else(|| {
                if quick {
                    vec![0, 50_000, MAX_RATE]
                } else {
                    vec![0, 10_000, 50_000, 100_000, 200_000, MAX_RATE]
                }
            }),
            working_set: s.dirty_working_set.min(memory / 4),
            device_counts: a
                .device_counts
                .clone()
                .unwrap_or_else(|| vec![0, 1, 2, 4, 8]),
            raw_bytes: if quick { 64 * MIB } else { 1 << 30 },
            warmup_ms: if quick { 50 } else { 200 },
        }
    }

    pub(super) fn has(&self, s: Section) -> bool {
        self.sections.contains(&s)
    }
}
