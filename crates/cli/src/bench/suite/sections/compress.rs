//! What `--compress zstd` costs: one core's compression and decompression rate and ratio on
//! pattern and text-like pages, and a migration with and without it.

use super::super::migration::Spec;
use super::super::plan::Plan;
use super::super::results::Results;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    let bytes = if a.suite.quick { 8 << 20 } else { 64 << 20 };
    for kind in ["pattern", "text"] {
        for level in [1, 3] {
            let row = crate::bench::compress::measure(kind, level, bytes)?;
            eprintln!(
                "bench suite: zstd {level} on {kind} pages: {:.0} MB/s, ratio {:.2}",
                row.compress_bytes_per_s / 1e6,
                row.ratio
            );
            res.compress_rates.push(row);
        }
    }
    for compress in [None, Some(1)] {
        let spec = Spec {
            warm_destination: true,
            compress,
            ..Spec::new(plan.memory)
        };
        let run = super::migrate(a, plan, &spec, super::By::TotalMs)?;
        let say = super::rate(&run);
        let name = match compress {
            None => "compress-none".to_string(),
            Some(l) => format!("compress-zstd-{l}"),
        };
        let row = res.keep(a, &name, run, say)?;
        res.compress.push(row);
    }
    Ok(())
}
