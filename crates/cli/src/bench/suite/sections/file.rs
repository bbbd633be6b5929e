//! Through a file: a save and a restore beside the raw write and read rates of the same
//! filesystem (`crate::bench::file`), a guest of `--memory` (the suite's 64 MiB with
//! `--quick`).

use super::super::plan::Plan;
use super::super::results::Results;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    let mut o = crate::bench::file::options(a, plan.memory, super::super::plan::CHANNELS);
    if plan.memory < a.memory {
        // `--quick`: the on-demand guest shrinks with the rest.
        o.on_demand_memory = o.on_demand_memory.min(plan.memory);
    }
    let f = crate::bench::file::measure(&o)?;
    eprintln!(
        "bench suite: file: save {:.2} x raw write, eager restore {:.2} x raw read, on demand running after {:.1} ms",
        f.save_vs_raw_write, f.restore_vs_raw_read, f.on_demand_resumed_ms
    );
    res.file = Some(f);
    Ok(())
}
