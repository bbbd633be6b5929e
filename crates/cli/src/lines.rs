//! The final JSON lines of `livemig migrate --json` (`completed`) and `livemig incoming
//! --json` (`received`, `after_run`), as types, for the processes that start them and read
//! them back (`demo`, `bench`): a field missing is an error, not a zero.

use crate::procstat::CpuUsage;
use livemig_engine::report::{IncomingReport, MigrationReport};
use livemig_engine::VerifyReport;
use serde::Deserialize;

/// The source's `completed` line.
#[derive(Debug, Clone, Deserialize)]
pub struct Completed {
    pub report: MigrationReport,
    /// The guest's kind (`kvm`, `synthetic`); absent on an onward hop's line.
    #[serde(default)]
    pub guest: Option<String>,
    /// The guest's counter when it paused for good.
    pub counter_at_pause: u64,
    /// The process's peak RSS; absent on an onward hop's line, null where unreadable.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
    /// The migration's CPU; absent on an onward hop's line.
    #[serde(default)]
    pub cpu: CpuUsage,
}

/// The destination's `received` line.
#[derive(Debug, Clone, Deserialize)]
pub struct Received {
    pub report: IncomingReport,
    pub peak_rss_bytes: Option<u64>,
    pub cpu: CpuUsage,
}

/// The destination's `after_run` line: its check after running the guest a while.
#[derive(Debug, Clone, Deserialize)]
pub struct AfterRun {
    pub verify: VerifyReport,
}
