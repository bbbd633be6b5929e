//! Downtime against VFIO-like device count, parallel against serial: the rows of `bench
//! --mode devices`, and one without devices.

use super::super::plan::Plan;
use super::super::results::Results;
use crate::bench::run::median;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    let raw0 = res.raw_start.0;
    for &n in &plan.device_counts {
        // Without devices, parallel and serial are the same migration: one row.
        let modes: &[bool] = if n == 0 { &[true] } else { &[true, false] };
        for &parallel in modes {
            let mut run = median(
                a.repeat,
                || crate::bench::devices::row(a, n, parallel, raw0),
                |r| r.row.downtime_ms,
            )?;
            let say = format!("downtime {:.1} ms", run.row.downtime_ms);
            let mode = match (n, parallel) {
                (0, _) => "none",
                (_, true) => "parallel",
                _ => "serial",
            };
            if n == 0 {
                // No device to read or send: the ideal is the RAM remainder over the raw
                // link alone.
                let last = run
                    .source
                    .report
                    .rounds
                    .last()
                    .map_or(0.0, |r| r.bytes as f64);
                run.row.ideal_downtime_ms = 1e3 * last / raw0;
                run.row.mode = "none";
            }
            let row = res.keep(a, &format!("devices-{n}-{mode}"), run, say)?;
            res.devices.push(row);
        }
    }
    Ok(())
}
