//! Downtime against VFIO-like device count, parallel against serial: the rows of `bench
//! --mode devices`, and one without devices.

use super::super::plan::Plan;
use super::super::results::Results;
use crate::bench::run::median;
use crate::bench::BenchArgs;

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    let limit = a.device_downtime_limit_ms;
    for &n in &plan.device_counts {
        // Without devices, parallel and serial are the same migration: one row.
        let modes: &[bool] = if n == 0 { &[true] } else { &[true, false] };
        for &parallel in modes {
            measure_row(a, res, n, parallel, limit)?;
        }
    }
    // A limit the devices fit, beside the forced rows: the largest count, parallel.
    if let Some(&n) = plan.device_counts.iter().max().filter(|&&n| n > 0) {
        for &l in &a.device_extra_limits_ms {
            measure_row(a, res, n, true, l)?;
        }
    }
    Ok(())
}

/// One row: `n` devices, parallel or serial, at a downtime limit of `limit` ms.
fn measure_row(
    a: &BenchArgs,
    res: &mut Results,
    n: usize,
    parallel: bool,
    limit: u64,
) -> anyhow::Result<()> {
    let raw0 = res.raw_start.0;
    let mut run = median(
        a.repeat,
        || crate::bench::devices::row(a, n, parallel, raw0, limit),
        |r| r.row.downtime_ms,
    )?;
    if n == 0 {
        // No device to read or send: the ideal is the RAM remainder over the raw link
        // alone.
        let last = run
            .source
            .report
            .rounds
            .last()
            .map_or(0.0, |r| r.bytes as f64);
        run.row.ideal_downtime_ms = 1e3 * last / raw0;
        run.row.mode = "none";
    }
    let say = crate::bench::devices::say(&run.row);
    let name = match n {
        0 => "devices-0-none".to_string(),
        _ => crate::bench::devices::row_name(n, parallel, limit, a.device_downtime_limit_ms),
    };
    let row = res.keep(a, &name, run, say)?;
    res.devices.push(row);
    Ok(())
}
