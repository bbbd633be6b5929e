//! One measured two-process migration: its row, typed, and the two sides' final lines;
//! pictures of it with `--report`, and the median of several.

use super::args::BenchArgs;
use crate::lines::{Completed, Received};
use std::path::PathBuf;

/// One measured run: the row for the table and the two sides' final lines.
pub(crate) struct Run<R> {
    pub row: R,
    pub source: Completed,
    pub dest: Received,
    /// Where its pictures went, with `--report`.
    pub report_dir: Option<PathBuf>,
}

impl<R> Run<R> {
    pub(crate) fn new(row: R, pair: crate::pair::PairResult) -> Run<R> {
        Run {
            row,
            source: pair.source,
            dest: pair.dest,
            report_dir: None,
        }
    }
}

/// With `--report`, writes `run`'s pictures into `DIR/name` and notes the folder in it.
pub(crate) fn report_run<R>(a: &BenchArgs, name: &str, run: &mut Run<R>) -> anyhow::Result<()> {
    let Some(dir) = &a.report else {
        return Ok(());
    };
    let dir = dir.join(name);
    crate::demo::write_pictures(&dir, &run.source.report, &run.dest.report)?;
    if !a.json {
        eprintln!("bench: pictures of this run in {}", dir.display());
    }
    run.report_dir = Some(dir);
    Ok(())
}

/// Runs `f` `repeat` times and keeps the run with the median `key`.
pub(crate) fn median<T>(
    repeat: usize,
    mut f: impl FnMut() -> anyhow::Result<T>,
    key: impl Fn(&T) -> f64,
) -> anyhow::Result<T> {
    let mut runs = Vec::new();
    for _ in 0..repeat.max(1) {
        runs.push(f()?);
    }
    runs.sort_by(|x, y| key(x).total_cmp(&key(y)));
    Ok(runs.swap_remove(runs.len() / 2))
}

/// A row as printed with `--json`: its figures and, with `--report`, where its pictures are.
#[derive(serde::Serialize)]
pub(crate) struct Measured<R> {
    #[serde(flatten)]
    pub row: R,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report_dir: Option<PathBuf>,
}

impl<R> From<Run<R>> for Measured<R> {
    fn from(run: Run<R>) -> Measured<R> {
        Measured {
            row: run.row,
            report_dir: run.report_dir,
        }
    }
}

/// The figures every RAM row shows, from the source's report.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Figures {
    pub total_ms: f64,
    pub setup_ms: f64,
    pub downtime_ms: f64,
    pub transferred_bytes: u64,
    pub bytes_per_s: f64,
    pub first_round_bytes_per_s: f64,
    pub rounds: usize,
}

impl Figures {
    pub(crate) fn of(rep: &livemig_engine::report::MigrationReport) -> Figures {
        Figures {
            total_ms: rep.total_ms,
            setup_ms: rep.setup_ms,
            downtime_ms: rep.downtime_ms,
            transferred_bytes: rep.transferred_bytes,
            bytes_per_s: rep.bytes_per_s,
            first_round_bytes_per_s: rep.rounds.first().map_or(0.0, |r| r.bytes_per_s),
            rounds: rep.rounds.len(),
        }
    }
}

/// The source's arguments for a filled guest of `memory` bytes dirtying `working_set` bytes
/// (0: idle) at `dirty_rate` pages a second, warmed up `warmup_ms`, over `channels`.
pub(crate) fn filled_guest_args(
    a: &BenchArgs,
    memory: u64,
    working_set: u64,
    dirty_rate: u64,
    warmup_ms: u64,
    channels: u16,
) -> Vec<String> {
    vec![
        format!("--memory={memory}"),
        format!("--guest={}", a.guest.name()),
        "--fill=1".into(),
        format!("--working-set={working_set}"),
        format!("--dirty-rate={dirty_rate}"),
        format!("--warmup-ms={warmup_ms}"),
        format!("--channels={channels}"),
    ]
}
