//! # livemig-report
//!
//! Pictures of a migration report, for `livemig demo --report DIR` and `livemig bench
//! --report DIR`: [`write_report`] writes into `DIR`
//!
//! - `timeline.svg`: throughput, remaining bytes and dirty rate per round, three panels over
//!   one time axis (time since the migration started), with setup, the precopy rounds and the
//!   guest's pause as bands behind them;
//! - `downtime.svg`: the downtime as one stacked bar of the parts that follow each other
//!   (pause, last dirty pass, sending until the destination has everything, restore, handover
//!   and resume), and under it, on the same axis, the device saves, state save and the RAM's
//!   last pages, which run at the same time inside the send and are therefore not stacked;
//! - `report.json`: the raw numbers: the source's and the destination's reports as they came,
//!   and the series and parts exactly as plotted;
//! - `faults.svg`, after a postcopy migration whose destination report has fault waits: their
//!   histogram with the median and 99th percentile marked, and the time blocked per faulting
//!   thread. The timeline then shows the postcopy phase as a band.
//!
//! The SVG is written by hand (the private `svg` module, about 250 lines) rather than with
//! `plotters`: the pictures are two fixed layouts, the honest downtime picture (sequential
//! parts stacked, concurrent ones beside them on the same axis) is not a stock chart type, and
//! hand-written SVG needs no crate beyond `serde_json` and no system library at all (no
//! fontconfig or freetype: text is SVG `<text>`, laid out with a width estimate and drawn by
//! the viewer). The output is deterministic, so the tests check the drawing itself: one
//! point per round, values inside the plot area, one bar segment per non-zero part.
//!
//! The reports are the engine's types ([`MigrationReport`], [`IncomingReport`]), given as
//! such to [`write_report_typed`] or as their JSON to [`write_report`], which reads the JSON
//! into the types first: JSON that is not such a report (a missing field, a string where a
//! number goes) is a [`ReportError::Parse`] naming the field, not a picture of zeros. Odd
//! numbers never panic: a negative or non-finite value draws as 0, a 0 ms round has dirty
//! rate 0, and a report without rounds or downtime draws a picture that says so.
//!
//! ```
//! use livemig_engine::report::{DowntimeBreakdown, MigrationReport, RoundReport};
//! let report = MigrationReport {
//!     setup_ms: 2.0, precopy_ms: 466.0, total_ms: 676.0, downtime_ms: 133.0,
//!     downtime: DowntimeBreakdown {
//!         pause_ms: 0.01, transfer_ms: 132.0, resume_ms: 0.3, ..Default::default()
//!     },
//!     rounds: vec![
//!         RoundReport { round: 0, ms: 466.0, bytes_per_s: 1.15e9, dirty_after: 16384,
//!             ..Default::default() },
//!         RoundReport { round: 1, ms: 130.6, bytes_per_s: 5.1e8, ..Default::default() },
//!     ],
//!     ..Default::default()
//! };
//! let dir = std::env::temp_dir().join(format!("livemig-report-doc-{}", std::process::id()));
//! let files = livemig_report::write_report_typed(&dir, &report, None).unwrap();
//! assert_eq!(files.len(), 3);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

#![warn(missing_docs)]

mod data;
mod downtime;
mod faults;
mod svg;
mod timeline;

pub use data::{Downtime, Part, RoundPoint, Timeline, PAGE_SIZE};
pub use downtime::downtime_svg;
pub use faults::faults_svg;
pub use livemig_engine::report::{IncomingReport, MigrationReport};
pub use timeline::timeline_svg;

use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Writing the pictures failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A report given as JSON is not the report it should be (`side` is "source" for a
    /// [`MigrationReport`], "destination" for an [`IncomingReport`]); `source` names the
    /// field.
    #[error("the {side}'s report is not a livemig {side} report")]
    Parse {
        /// Whose report: "source" or "destination".
        side: &'static str,
        /// What in the JSON did not fit the type.
        source: serde_json::Error,
    },
    /// The directory for the pictures could not be created.
    #[error("cannot create the report directory {dir}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// Why not.
        source: std::io::Error,
    },
    /// A picture or `report.json` could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why not.
        source: std::io::Error,
    },
    /// The numbers for `report.json` could not be turned into JSON.
    #[error("cannot serialize the report's numbers")]
    Serialize(#[from] serde_json::Error),
}

/// The file names [`write_report`] writes, in the order it returns them.
pub const FILES: [&str; 3] = ["timeline.svg", "downtime.svg", "report.json"];

/// The fourth file, after a postcopy migration with fault waits on the destination.
pub const FAULTS_FILE: &str = "faults.svg";

/// Reads a source report (`MigrationReport` as JSON) and, if there is one, the destination's
/// (`IncomingReport`) into their types.
fn parse(
    source_report: &Value,
    dest_report: Option<&Value>,
) -> Result<(MigrationReport, Option<IncomingReport>), ReportError> {
    let source =
        MigrationReport::deserialize(source_report).map_err(|source| ReportError::Parse {
            side: "source",
            source,
        })?;
    let dest = dest_report
        .map(IncomingReport::deserialize)
        .transpose()
        .map_err(|source| ReportError::Parse {
            side: "destination",
            source,
        })?;
    Ok((source, dest))
}

/// The raw numbers behind the pictures: both reports as given and what was plotted. An
/// error if a report is not what it should be ([`ReportError::Parse`]).
pub fn report_json(
    source_report: &Value,
    dest_report: Option<&Value>,
) -> Result<Value, ReportError> {
    let (source, _) = parse(source_report, dest_report)?;
    Ok(numbers(&source, source_report, dest_report))
}

/// `report.json`: the reports as JSON (`source_json`, `dest_json`) and what was plotted
/// from `source`.
fn numbers(source: &MigrationReport, source_json: &Value, dest_json: Option<&Value>) -> Value {
    json!({
        "source": source_json,
        "dest": dest_json,
        "timeline": Timeline::from_report(source),
        "downtime": Downtime::from_report(source),
        "units": {
            "time": "ms (timeline: since the migration started; downtime: since the guest paused)",
            "throughput_bytes_per_s": "bytes per second",
            "remaining_bytes": "bytes (pages dirtied during the round x 4096)",
            "dirty_pages_per_s": "4 KiB pages per second",
        },
    })
}

/// Writes `timeline.svg`, `downtime.svg` and `report.json` into `dir` (created if needed)
/// from a source report (`MigrationReport` as JSON) and, if there is one, the destination's
/// (`IncomingReport`). `report.json` keeps both as given. Returns the paths written.
///
/// JSON that is not such a report is a [`ReportError::Parse`], and nothing is written.
pub fn write_report(
    dir: &Path,
    source_report: &Value,
    dest_report: Option<&Value>,
) -> Result<Vec<PathBuf>, ReportError> {
    let (source, dest) = parse(source_report, dest_report)?;
    write_files(dir, &source, dest.as_ref(), source_report, dest_report)
}

/// [`write_report`] for reports at hand as types.
pub fn write_report_typed(
    dir: &Path,
    source: &MigrationReport,
    dest: Option<&IncomingReport>,
) -> Result<Vec<PathBuf>, ReportError> {
    let dest_json = dest.map(serde_json::to_value).transpose()?;
    write_files(
        dir,
        source,
        dest,
        &serde_json::to_value(source)?,
        dest_json.as_ref(),
    )
}

/// Draws `source` and writes the three files (and `faults.svg` when `dest` has postcopy
/// fault waits), with `source_json` and `dest_json` as the reports in `report.json`.
fn write_files(
    dir: &Path,
    source: &MigrationReport,
    dest: Option<&IncomingReport>,
    source_json: &Value,
    dest_json: Option<&Value>,
) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let contents = [
        timeline_svg(&Timeline::from_report(source)),
        downtime_svg(&Downtime::from_report(source)),
        serde_json::to_string_pretty(&numbers(source, source_json, dest_json))? + "\n",
    ];
    let faults = dest
        .and_then(|d| d.postcopy_faults.as_ref())
        .map(|f| (FAULTS_FILE, faults_svg(f)));
    let mut written = Vec::with_capacity(FILES.len() + 1);
    for (name, text) in FILES.iter().copied().zip(contents).chain(faults) {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| ReportError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_three_files_with_the_rounds() {
        let dir = std::env::temp_dir().join(format!("livemig-report-test-{}", std::process::id()));
        let src = serde_json::to_value(data::fixture(
            json!({"rounds": [{"round": 0, "ms": 10.0}, {"round": 1, "ms": 1.0}]}),
        ))
        .unwrap();
        let dest = serde_json::to_value(IncomingReport {
            rounds: 2,
            ..Default::default()
        })
        .unwrap();
        let files = write_report(&dir, &src, Some(&dest)).unwrap();
        assert_eq!(files.len(), 3);
        let j: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(j["timeline"]["rounds"].as_array().unwrap().len(), 2);
        assert_eq!(j["source"], src);
        assert_eq!(j["dest"], dest);
        for f in &files[..2] {
            assert!(std::fs::read_to_string(f).unwrap().starts_with("<svg"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_postcopy_migration_gets_its_band_and_the_fault_picture() {
        use livemig_engine::report::{FaultLatencyReport, LatencyBucket, PostcopyReport};
        let dir = std::env::temp_dir().join(format!("livemig-report-pc-{}", std::process::id()));
        let mut src = data::fixture(json!({"rounds": [{"round": 0, "ms": 900.0}]}));
        src.total_ms = 1500.0;
        src.postcopy = Some(PostcopyReport {
            pages: 100,
            ms: 450.0,
            ..Default::default()
        });
        let dest = IncomingReport {
            postcopy_faults: Some(FaultLatencyReport {
                faults: 3,
                histogram: vec![LatencyBucket {
                    below_us: 52,
                    faults: 3,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let files = write_report_typed(&dir, &src, Some(&dest)).unwrap();
        assert_eq!(files.len(), 4);
        assert!(files[3].ends_with(FAULTS_FILE));
        let timeline = std::fs::read_to_string(&files[0]).unwrap();
        assert_eq!(
            timeline.matches("band postcopy").count(),
            4,
            "strip and 3 panels"
        );
        assert!(
            !timeline.contains("band switchover"),
            "no round is sent paused"
        );
        let t = Timeline::from_report(&src);
        assert_eq!(t.postcopy, Some((1050.0, 1500.0)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_directory_is_an_error_naming_it() {
        let file = std::env::temp_dir().join(format!("livemig-report-file-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let report = serde_json::to_value(MigrationReport::default()).unwrap();
        let err = write_report(&file.join("sub"), &report, None).unwrap_err();
        assert!(matches!(err, ReportError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("livemig-report-file"));
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn json_that_is_not_a_report_is_an_error_naming_the_field() {
        let dir = std::env::temp_dir().join(format!("livemig-report-bad-{}", std::process::id()));
        for (v, field) in [
            (json!(null), "struct MigrationReport"),
            (json!({}), "missing field"),
            (json!({"rounds": "no"}), "invalid type"),
            (
                json!({"downtime_ms": "x", "downtime": [1, 2], "total_ms": -5}),
                "DowntimeBreakdown",
            ),
        ] {
            let err = write_report(&dir, &v, None).unwrap_err();
            let ReportError::Parse { side, source } = &err else {
                panic!("{v}: {err}");
            };
            assert_eq!(*side, "source");
            assert!(source.to_string().contains(field), "{v}: {source}");
            assert!(report_json(&v, None).is_err());
        }
        assert!(!dir.exists(), "nothing is written");
        let src = serde_json::to_value(MigrationReport::default()).unwrap();
        let err = write_report(&dir, &src, Some(&json!({"rounds": 2}))).unwrap_err();
        assert!(
            matches!(
                err,
                ReportError::Parse {
                    side: "destination",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!dir.exists(), "nothing is written");
    }

    #[test]
    fn typed_reports_draw_what_their_json_draws() {
        let base =
            std::env::temp_dir().join(format!("livemig-report-typed-{}", std::process::id()));
        let rep = data::fixture(json!({"downtime_ms": 3.0, "rounds": [{"ms": 4.0}, {"ms": 1.0}]}));
        let json = serde_json::to_value(&rep).unwrap();
        let typed = write_report_typed(&base.join("t"), &rep, None).unwrap();
        let raw = write_report(&base.join("j"), &json, None).unwrap();
        for (a, b) in typed.iter().zip(&raw) {
            assert_eq!(
                std::fs::read(a).unwrap(),
                std::fs::read(b).unwrap(),
                "{}",
                a.display()
            );
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
