//! `livemig bench --mode suite`: every benchmark in one run, written as Markdown tables and
//! JSON. Sections:
//!
//! 1. channels: RAM throughput for 1, 2, 4 and 8 channels beside the raw loopback TCP limit
//!    measured in the same run (at its start and at its end);
//! 2. size: total time and downtime against guest size, idle and dirtying, beside the time a
//!    raw copy of the same bytes takes, and the time per GiB (linearity);
//! 3. dirty: downtime, rounds and total time against the guest's dirty rate;
//! 4. devices: downtime against VFIO-like device count, parallel against serial (the rows of
//!    `bench --mode devices`);
//! 5. local: local mode (guest memory handed over as memfds, nothing copied) against guest
//!    size, idle;
//! 6. compress: what `--compress zstd` costs: one core's compression and decompression rate
//!    and ratio on pattern and text-like pages, and a migration with and without it;
//! 7. resources, for every migration above: each process's peak RSS (VmHWM), the
//!    destination's peak buffered device bytes, and CPU seconds per GiB moved on each side.
//!
//! The peak RSS and CPU figures come from the two processes themselves: `livemig migrate` and
//! `livemig incoming` print them in their final JSON lines (see [`crate::procstat`]).
//!
//! Layout: [`plan`] (what to run), [`sections`] (one file a section, each measuring its
//! migrations into typed rows: [`migration`], [`results`]), then [`markdown`] and [`json`]
//! (the rows as text; nothing is measured there). [`facts`]: how the run was made.

mod facts;
mod json;
mod markdown;
mod migration;
mod plan;
mod results;
mod sections;

use super::raw_tcp;
use super::run_facts;
use super::BenchArgs;
use crate::args::{parse_count, parse_size};
use anyhow::Context;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

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
}

/// The options of `bench --mode suite` (flattened into `bench`'s own).
#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Suite: the sections to run (default: all; the resources table covers those run).
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

pub fn run(mut a: BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = plan::Plan::new(&mut a);
    if let Some(dir) = &a.suite.out {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output directory {}", dir.display()))?;
    }
    let how = facts::HowRun::collect(a.guest);
    eprintln!("bench suite: {}", how.line());
    eprintln!(
        "bench suite: raw loopback TCP, {} MiB per copy",
        plan.raw_bytes >> 20
    );
    let raw_start = raw_tcp::measure(plan.raw_bytes)?;
    let raw_memory = raw_tcp::measure_memory(plan.raw_bytes)?;
    let mut res = results::Results::new(raw_start, raw_memory);
    sections::measure(&a, &plan, &mut res)?;
    eprintln!("bench suite: raw loopback TCP again");
    res.raw_end = raw_tcp::measure(plan.raw_bytes)?;
    let doc = markdown::Doc {
        a: &a,
        plan: &plan,
        how: &how,
        res: &res,
        run_line: how.line(),
        load_end: run_facts::load_average(),
        raw: res.raw(),
        raw_mem: res.raw_memory,
    };
    let md = markdown::render(&doc);
    let out = json::document(&doc);
    if let Some(dir) = &a.suite.out {
        super::out::write_out(dir, &md, &out, "bench suite")?;
    }
    if a.json {
        crate::emit(&out);
    } else {
        print!("{md}");
    }
    Ok(ExitCode::SUCCESS)
}
