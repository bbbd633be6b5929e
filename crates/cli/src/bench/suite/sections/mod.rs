//! The suite's sections, each measuring its migrations into [`Results`]: rows only, no
//! Markdown (that is `markdown`'s).

mod channels;
mod compress;
mod devices;
mod dirty;
mod local;
mod size;

use super::plan::Plan;
use super::results::Results;
use super::Section;
use crate::bench::BenchArgs;

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
    Ok(())
}
