//! Local mode (guest memory handed over as memfds, nothing copied) against guest size, idle.

use super::super::migration::Spec;
use super::super::plan::Plan;
use super::super::results::Results;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    for &size in &plan.sizes {
        let spec = Spec {
            local: true,
            ..Spec::new(size)
        };
        let run = super::migrate(a, plan, &spec, super::By::DowntimeMs)?;
        let say = super::times(&run);
        let row = res.keep(a, &format!("local-{}M", size >> 20), run, say)?;
        res.local.push(row);
    }
    Ok(())
}
