//! Total time and downtime against guest size.
//!
//! Destinations that prepared their memory (`incoming --memory`, as QEMU allocates guest RAM
//! at start-up): the migration's own cost at every size, idle and dirtying (linearity). Then
//! every idle size to a cold destination, which allocates and faults in its memory during the
//! migration (how the 1.3 x target is put). Last, the target's guest to a prepared
//! destination without page CRCs.

use super::super::migration::Spec;
use super::super::plan::{Plan, GIB};
use super::super::results::{Kept, Results, SizeRow};
use crate::bench::BenchArgs;

/// The migrations of the section, each with whether its guest dirties memory.
fn specs(a: &BenchArgs, plan: &Plan) -> Vec<(bool, Spec)> {
    let mut specs: Vec<(bool, Spec)> = Vec::new();
    for dirty in [false, true] {
        for &size in &plan.sizes {
            specs.push((
                dirty,
                Spec {
                    working_set: if dirty {
                        a.suite.size_working_set.min(size / 4)
                    } else {
                        0
                    },
                    dirty_rate: if dirty { a.suite.size_dirty_rate } else { 0 },
                    warm_destination: true,
                    ..Spec::new(size)
                },
            ));
        }
    }
    for &size in &plan.sizes {
        specs.push((false, Spec::new(size)));
    }
    let target_size = if a.suite.quick { plan.memory } else { 1 << 30 };
    specs.push((
        false,
        Spec {
            warm_destination: true,
            page_checksums: false,
            ..Spec::new(target_size)
        },
    ));
    specs
}

pub(super) fn measure(a: &BenchArgs, plan: &Plan, res: &mut Results) -> anyhow::Result<()> {
    for (dirty, spec) in specs(a, plan) {
        let size = spec.memory;
        let run = super::migrate(a, plan, &spec, super::By::TotalMs)?;
        let say = super::times(&run);
        let name = format!(
            "size-{}M-{}{}{}",
            size >> 20,
            if dirty { "dirtying" } else { "idle" },
            if spec.warm_destination {
                "-prepared"
            } else {
                ""
            },
            if spec.page_checksums {
                ""
            } else {
                "-no-page-crcs"
            },
        );
        let kept = res.keep(a, &name, run, say)?;
        let total = kept.row.figures.total_ms;
        res.size.push(Kept {
            row: SizeRow {
                migration: kept.row,
                dirty,
                ms_per_gib: total / (size as f64 / GIB),
            },
            name: kept.name,
            usage: kept.usage,
            report_dir: kept.report_dir,
        });
    }
    Ok(())
}
