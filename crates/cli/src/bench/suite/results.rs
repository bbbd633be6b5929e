//! Everything the suite measured: the raw limits and the typed rows of every section, each
//! migration kept with its name and [`Usage`].

use super::migration::{MigrationRow, Usage};
use super::sections::PostcopyRow;
use crate::bench::compress::CompressRate;
use crate::bench::devices::DeviceRow;
use crate::bench::run::{report_run, Run};
use crate::bench::BenchArgs;
use serde::Serialize;
use std::path::PathBuf;

/// A measured migration's row, with its name, what it used and where its pictures went.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Kept<R> {
    #[serde(flatten)]
    pub row: R,
    pub name: String,
    pub usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_dir: Option<PathBuf>,
}

/// A row of the size section: a migration, idle or dirtying, and its time per GiB.
#[derive(Debug, Clone, Serialize)]
pub(super) struct SizeRow {
    #[serde(flatten)]
    pub migration: MigrationRow,
    pub dirty: bool,
    pub ms_per_gib: f64,
}

/// Everything measured, and the rows of every section.
pub(super) struct Results {
    pub raw_start: (f64, String),
    pub raw_end: (f64, String),
    /// The raw copy memory to memory (see `raw_tcp::measure_memory`).
    pub raw_memory: f64,
    pub channels: Vec<Kept<MigrationRow>>,
    pub size: Vec<Kept<SizeRow>>,
    pub dirty: Vec<Kept<MigrationRow>>,
    pub devices: Vec<Kept<DeviceRow>>,
    pub local: Vec<Kept<MigrationRow>>,
    /// The compression rates (no migration), then the migrations with and without it.
    pub compress_rates: Vec<CompressRate>,
    pub compress: Vec<Kept<MigrationRow>>,
    /// Postcopy, plain and with its push capped, and precopy with auto-converge.
    pub postcopy: Vec<Kept<PostcopyRow>>,
    /// Why the postcopy section's 1 Gbit/s netns rows were not measured, if they were not.
    pub postcopy_netns_skipped: Option<String>,
    /// Every migration: its name and usage.
    pub resources: Vec<(String, Usage)>,
    /// Through a file, beside the filesystem's raw rates.
    pub file: Option<crate::bench::file::FileBench>,
}

impl Results {
    pub(super) fn new(raw_start: (f64, String), raw_memory: f64) -> Results {
        Results {
            raw_end: raw_start.clone(),
            raw_start,
            raw_memory,
            channels: Vec::new(),
            size: Vec::new(),
            dirty: Vec::new(),
            devices: Vec::new(),
            local: Vec::new(),
            compress_rates: Vec::new(),
            compress: Vec::new(),
            postcopy: Vec::new(),
            postcopy_netns_skipped: None,
            resources: Vec::new(),
            file: None,
        }
    }

    /// The raw limit: the better of the measurements at the start and at the end.
    pub(super) fn raw(&self) -> f64 {
        self.raw_start.0.max(self.raw_end.0)
    }

    pub(super) fn raw_how(&self) -> &str {
        if self.raw_end.0 > self.raw_start.0 {
            &self.raw_end.1
        } else {
            &self.raw_start.1
        }
    }

    /// Finishes a run: its pictures with `--report`, its usage, a line on stderr.
    pub(super) fn keep<R>(
        &mut self,
        a: &BenchArgs,
        name: &str,
        mut run: Run<R>,
        say: String,
    ) -> anyhow::Result<Kept<R>> {
        report_run(a, name, &mut run)?;
        let usage = Usage::of(&run);
        self.resources.push((name.to_string(), usage.clone()));
        eprintln!("bench suite: {name}: {say}");
        Ok(Kept {
            row: run.row,
            name: name.to_string(),
            usage,
            report_dir: run.report_dir,
        })
    }
}

/// A size row against the raw limits of the run.
#[derive(Debug, Clone, Serialize)]
pub(super) struct SizeRatios {
    pub raw_copy_ms: f64,
    pub total_over_raw: f64,
    pub raw_memory_copy_ms: f64,
    pub total_over_raw_memory: f64,
}

impl SizeRatios {
    pub(super) fn of(r: &SizeRow, raw: f64, raw_mem: f64) -> SizeRatios {
        let size = r.migration.memory_bytes as f64;
        let raw_ms = 1e3 * size / raw;
        let raw_mem_ms = 1e3 * size / raw_mem;
        let total = r.migration.figures.total_ms;
        SizeRatios {
            raw_copy_ms: raw_ms,
            total_over_raw: total / raw_ms,
            raw_memory_copy_ms: raw_mem_ms,
            total_over_raw_memory: total / raw_mem_ms,
        }
    }
}

/// How far ms per GiB spreads across sizes for one kind of size row (linearity).
pub(super) struct Spread {
    pub dirty: bool,
    pub prepared: bool,
    pub lo: f64,
    pub hi: f64,
}

/// The spread of ms per GiB for idle and dirtying rows to a prepared destination and idle
/// rows to a cold one (page CRCs on), where there are two sizes or more.
pub(super) fn size_spreads(rows: &[Kept<SizeRow>]) -> Vec<Spread> {
    let mut out = Vec::new();
    for (dirty, prepared) in [(false, true), (true, true), (false, false)] {
        let per: Vec<f64> = rows
            .iter()
            .map(|r| &r.row)
            .filter(|r| r.dirty == dirty && r.migration.warm_destination == prepared)
            .filter(|r| r.migration.page_checksums)
            .map(|r| r.ms_per_gib)
            .collect();
        let (lo, hi) = per
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        if per.len() > 1 && lo > 0.0 {
            out.push(Spread {
                dirty,
                prepared,
                lo,
                hi,
            });
        }
    }
    out
}
