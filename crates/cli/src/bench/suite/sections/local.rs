//! Local mode (guest memory handed over as memfds, nothing copied) against guest size, idle.

use super::super::migration::{migrate_once, Spec};
use super::super::plan::Plan;
use super::super::results::Results;
use crate::bench::run::median;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    for &size in &plan.sizes {
        let spec = Spec {
            local: true,
            ..Spec::new(size)
        };
        let run = median(
            a.repeat,
            || migrate_once(a, plan, &spec),
            |r| r.row.figures.downtime_ms,
        )?;
        let say = format!(
            "total {:.0} ms, downtime {:.1} ms",
            run.row.figures.total_ms, run.row.figures.downtime_ms
        );
        let row = res.keep(a, &format!("local-{}M", size >> 20), run, say)?;
        res.local.push(row);
    }
    Ok(())
}
