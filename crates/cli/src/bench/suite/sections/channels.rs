//! RAM throughput against channel count: every count with page CRCs (the default), then 4
//! channels without.

use super::super::migration::Spec;
use super::super::plan::{Plan, CHANNELS};
use super::super::results::Results;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    let runs = plan
        .channels
        .iter()
        .map(|&ch| (ch, true))
        .chain([(CHANNELS, false)]);
    for (ch, page_checksums) in runs {
        let spec = Spec {
            channels: ch,
            warm_destination: true,
            page_checksums,
            ..Spec::new(plan.memory)
        };
        let run = super::migrate(a, plan, &spec, super::By::TotalMs)?;
        let say = super::rate(&run);
        let name = if page_checksums {
            format!("channels-{ch}")
        } else {
            format!("channels-{ch}-no-page-crcs")
        };
        let row = res.keep(a, &name, run, say)?;
        res.channels.push(row);
    }
    Ok(())
}
