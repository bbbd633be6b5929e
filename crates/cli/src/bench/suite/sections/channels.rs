//! RAM throughput against channel count: every count with page CRCs (the default), then 4
//! channels without.

use super::super::migration::{migrate_once, Spec};
use super::super::plan::{Plan, CHANNELS};
use super::super::results::Results;
use crate::bench::run::median;
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
        let run = median(
            a.repeat,
            || migrate_once(a, plan, &spec),
            |r| r.row.figures.total_ms,
        )?;
        let say = format!("{:.0} MB/s", run.row.figures.bytes_per_s / 1e6);
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
