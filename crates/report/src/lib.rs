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
//!   and the series and parts exactly as plotted.
//!
//! The SVG is written by hand (the private `svg` module, about 250 lines) rather than with
//! `plotters`: the pictures are two fixed layouts, the honest downtime picture (sequential
//! parts stacked, concurrent ones beside them on the same axis) is not a stock chart type, and
//! hand-written SVG needs no crate beyond `serde_json` and no system library at all (no
//! fontconfig or freetype: text is SVG `<text>`, laid out with a width estimate and drawn by
//! the viewer). The output is deterministic, so the tests check the drawing itself: one
//! point per round, values inside the plot area, one bar segment per non-zero part.
//!
//! Odd input never panics: a missing field, `null`, a negative or non-number value reads as
//! 0, a 0 ms round has dirty rate 0, and a report without rounds or downtime draws a picture
//! that says so.
//!
//! ```
//! let report = serde_json::json!({
//!     "setup_ms": 2.0, "precopy_ms": 466.0, "total_ms": 676.0, "downtime_ms": 133.0,
//!     "downtime": {"pause_ms": 0.01, "transfer_ms": 132.0, "resume_ms": 0.3},
//!     "rounds": [
//!         {"round": 0, "ms": 466.0, "bytes_per_s": 1.15e9, "dirty_after": 16384},
//!         {"round": 1, "ms": 130.6, "bytes_per_s": 5.1e8, "dirty_after": 0}
//!     ]
//! });
//! let dir = std::env::temp_dir().join(format!("livemig-report-doc-{}", std::process::id()));
//! let files = livemig_report::write_report(&dir, &report, None).unwrap();
//! assert_eq!(files.len(), 3);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

mod data;
mod downtime;
mod svg;
mod timeline;

pub use data::{Downtime, Part, RoundPoint, Timeline, PAGE_SIZE};
pub use downtime::downtime_svg;
pub use timeline::timeline_svg;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Writing the pictures failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot create the report directory {dir}")]
    CreateDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialize the report's numbers")]
    Serialize(#[from] serde_json::Error),
}

/// The file names [`write_report`] writes, in the order it returns them.
pub const FILES: [&str; 3] = ["timeline.svg", "downtime.svg", "report.json"];

/// The raw numbers behind the pictures: both reports as given and what was plotted.
pub fn report_json(source_report: &Value, dest_report: Option<&Value>) -> Value {
    let timeline = Timeline::from_report(source_report);
    let downtime = Downtime::from_report(source_report);
    json!({
        "source": source_report,
        "dest": dest_report,
        "timeline": timeline,
        "downtime": downtime,
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
/// (`IncomingReport`). Returns the paths written.
pub fn write_report(
    dir: &Path,
    source_report: &Value,
    dest_report: Option<&Value>,
) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(|source| ReportError::CreateDir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let contents = [
        timeline_svg(&Timeline::from_report(source_report)),
        downtime_svg(&Downtime::from_report(source_report)),
        serde_json::to_string_pretty(&report_json(source_report, dest_report))? + "\n",
    ];
    let mut written = Vec::with_capacity(FILES.len());
    for (name, text) in FILES.iter().zip(contents) {
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
        let src = json!({"rounds": [{"round": 0, "ms": 10.0}, {"round": 1, "ms": 1.0}]});
        let dest = json!({"rounds": 2});
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
    fn an_unwritable_directory_is_an_error_naming_it() {
        let file = std::env::temp_dir().join(format!("livemig-report-file-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap();
        let err = write_report(&file.join("sub"), &json!({}), None).unwrap_err();
        assert!(matches!(err, ReportError::CreateDir { .. }), "{err}");
        assert!(err.to_string().contains("livemig-report-file"));
        std::fs::remove_file(&file).unwrap();
    }
}
