//! The options of `bench --mode suite` (flattened into `bench`'s own), and its dirty rates.

use crate::args::{parse_count, parse_size};
use clap::Args;
use std::path::PathBuf;

/// A section of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// RAM throughput against channel count, beside raw loopback TCP.
    Channels,
    /// Total time and downtime against guest size.
    Size,
    /// Downtime, rounds and total time against dirty rate.
    Dirty,
    /// Downtime against device count, parallel against serial.
    Devices,
    /// Local mode (memory handed over, not copied) against guest size.
    Local,
    /// The cost of zstd compression of pages.
    Compress,
    /// Postcopy (fault latency, time, downtime) beside precopy with auto-converge, a 1 GiB
    /// guest writing 256 MiB as fast as it can, over loopback and over a 1 Gbit/s netns
    /// link. Opt-in (not in the default list: about 90 s).
    Postcopy,
    /// A save to a file and a restore from it (eager and on demand) beside the raw write
    /// and read rates of the same filesystem, and a sparse guest's file size. Opt-in (it
    /// writes the guest's size to the temp directory several times).
    File,
}

/// The options of `bench --mode suite` (flattened into `bench`'s own).
#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Suite: the sections to run (default: all but postcopy; the resources table covers those
    /// run).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sections: Option<Vec<Section>>,
    /// Suite: guest sizes of the size section [default: 256M,1G,2G,4G; --quick: 32M,64M].
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<u64>>,
    /// Suite: channel counts of the channels section [default: 1,2,4,8].
    #[arg(long, value_delimiter = ',')]
    pub channels_list: Option<Vec<u16>>,
    /// Suite: dirty rates of the dirty section, page writes per second; 0 is an idle guest,
    /// `max` as fast as the guest writes [default: 0,10k,50k,100k,200k,max; --quick:
    /// 0,50k,max].
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    pub dirty_rates: Option<Vec<u64>>,
    /// Suite: working set of the dirty section's guest (at most a quarter of its memory):
    /// large enough that what a round leaves dirty grows with the rate.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub dirty_working_set: u64,
    /// Suite: working set of the dirtying rows of the size section.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub size_working_set: u64,
    /// Suite: page writes per second of the dirtying rows of the size section.
    #[arg(long, default_value = "20k", value_parser = parse_count)]
    pub size_dirty_rate: u64,
    /// Suite: a smoke run with small guests and devices (guests of at most 64 MiB, devices
    /// of at most 16 MiB, raw TCP over 64 MiB); explicit lists still apply.
    #[arg(long)]
    pub quick: bool,
    /// Suite: also write DIR/bench.md (the Markdown printed) and DIR/bench.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// The dirty rate `max`: the guest writes as fast as it can.
pub(crate) const MAX_RATE: u64 = u64::MAX;

fn parse_rate(s: &str) -> Result<u64, String> {
    if s.trim().eq_ignore_ascii_case("max") {
        Ok(MAX_RATE)
    } else {
        parse_count(s)
    }
}

pub(crate) fn rate_label(r: u64) -> String {
    if r == MAX_RATE {
        "max".into()
    } else {
        r.to_string()
    }
}
