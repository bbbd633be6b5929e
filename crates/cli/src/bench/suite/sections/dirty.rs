//! Downtime, rounds and total time against the guest's dirty rate.

use super::super::args::rate_label;
use super::super::migration::Spec;
use super::super::plan::Plan;
use super::super::results::Results;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    for &rate in &plan.dirty_rates {
        let spec = Spec {
            working_set: if rate == 0 { 0 } else { plan.working_set },
            dirty_rate: rate,
            warm_destination: true,
            ..Spec::new(plan.memory)
        };
        let run = super::migrate(a, plan, &spec, super::By::DowntimeMs)?;
        let say = format!(
            "downtime {:.1} ms, {} rounds",
            run.row.figures.downtime_ms, run.row.figures.rounds
        );
        let name = format!("dirty-{}", rate_label(rate));
        let row = res.keep(a, &name, run, say)?;
        res.dirty.push(row);
    }
    Ok(())
}
