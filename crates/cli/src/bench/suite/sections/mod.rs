//! The suite's sections, each measuring its migrations into [`Results`]: rows only, no
//! Markdown (that is `markdown`'s).

mod channels;
mod compress;
mod devices;
mod dirty;
mod file;
mod local;
mod postcopy;
mod size;

use super::args::Section;
use super::migration::{migrate_once, MigrationRow, Spec};
use super::plan::Plan;
use super::results::Results;
use crate::bench::run::{median, Run};
use crate::bench::BenchArgs;
pub(super) use postcopy::{
    sizes as postcopy_sizes, PostcopyRow, NETNS_LINK as POSTCOPY_NETNS_LINK,
    NETNS_SPECS as POSTCOPY_NETNS_SPECS,
};

/// Runs every section the plan holds, in the suite's order.
pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    if plan.has(Section::Channels) {
        channels::measure(a, plan, res)?;
    }
    if plan.has(Section::Size) {
        size::measure(a, plan, res)?;
    }
    if plan.has(Section::Dirty) {
        dirty::measure(a, plan, res)?;
    }
    if plan.has(Section::Local) {
        local::measure(a, plan, res)?;
    }
    if plan.has(Section::Compress) {
        compress::measure(a, plan, res)?;
    }
    if plan.has(Section::Devices) {
        devices::measure(a, plan, res)?;
    }
    if plan.has(Section::Postcopy) {
        postcopy::measure(a, plan, res)?;
    }
    if plan.has(Section::File) {
        file::measure(a, plan, res)?;
    }
    Ok(())
}

/// The figure whose median run a section keeps.
#[derive(Clone, Copy)]
enum By {
    TotalMs,
    DowntimeMs,
}

/// `spec` migrated `--repeat` times; the run with the median figure `by`.
fn migrate(a: &BenchArgs, plan: &Plan, spec: &Spec, by: By) -> anyhow::Result<Run<MigrationRow>> {
    median(
        a.repeat,
        || migrate_once(a, plan, spec),
        |r| match by {
            By::TotalMs => r.row.figures.total_ms,
            By::DowntimeMs => r.row.figures.downtime_ms,
        },
    )
}

/// "total .. ms, downtime .. ms", for the line on stderr.
fn times(run: &Run<MigrationRow>) -> String {
    let f = &run.row.figures;
    format!(
        "total {:.0} ms, downtime {:.1} ms",
        f.total_ms, f.downtime_ms
    )
}

/// "... MB/s", for the line on stderr.
fn rate(run: &Run<MigrationRow>) -> String {
    format!("{:.0} MB/s", run.row.figures.bytes_per_s / 1e6)
}
