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
//! 7. postcopy (opt-in: `--sections postcopy`, about 90 s): postcopy, plain and with its push
//!    capped, beside precopy with auto-converge, a 1 GiB guest writing 256 MiB as fast as it
//!    can, over loopback and over a 1 Gbit/s link between network namespaces (SKIPPED
//!    where those cannot be made);
//! 8. file (opt-in: `--sections file`): a save to a file and a restore from it, eager and on
//!    demand, beside the raw write and read rates of the same filesystem measured in the same
//!    run, and a sparse guest's file size against its data (`crate::bench::file`);
//! 9. resources, for every migration above: each process's peak RSS (VmHWM), the
//!    destination's peak buffered device bytes, and CPU seconds per GiB moved on each side.
//!
//! The peak RSS and CPU figures come from the two processes themselves: `livemig migrate` and
//! `livemig incoming` print them in their final JSON lines (see [`crate::procstat`]).
//!
//! Layout: [`plan`] (what to run), [`sections`] (one file a section, each measuring its
//! migrations into typed rows: [`migration`], [`results`]), then [`markdown`] and [`json`]
//! (the rows as text; nothing is measured there). [`facts`]: how the run was made; [`args`]:
//! the options.

mod args;
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
use anyhow::Context;
pub(crate) use args::SuiteArgs;
use std::process::ExitCode;

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
