//! What a migration reports: per round, the downtime split into its parts, and totals.
//! Everything here serializes to the JSON that `livemig --json` prints.

use crate::guest::VerifyReport;
use serde::{Deserialize, Serialize};

/// One precopy round (or the switchover round) as the source saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundReport {
    pub round: u32,
    pub pages: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub ms: f64,
    pub bytes_per_s: f64,
    /// Pages dirtied while this round was sent.
    pub dirty_after: u64,
    /// Time to send `dirty_after` pages at this round's rate.
    pub expected_downtime_ms: f64,
    /// Auto-converge's throttle on the guest's vCPUs during this round (percent).
    pub throttle_percent: u8,
}

/// Where the guest's pause went, source and destination together.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DowntimeBreakdown {
    /// Stopping the guest's vCPUs (or dirtying threads).
    pub pause_ms: f64,
    /// Reading and clearing the dirty log one last time.
    pub last_dirty_pass_ms: f64,
    /// Saving the guest's non-memory state and the small devices' blobs (on its own worker,
    /// at the same time as the RAM's last pass and the device saves).
    pub state_save_ms: f64,
    /// Handing the RAM's last dirty pages to the data channels.
    pub ram_final_ms: f64,
    /// Until the slowest device's final state was read and handed to a channel (serial
    /// mode: every device's whole state sent in turn on the main channel).
    pub device_save_ms: f64,
    /// Sending the last pages and the state until the destination had them all.
    pub transfer_ms: f64,
    /// Restoring the state on the destination.
    pub dest_restore_ms: f64,
    /// Checking every page on the destination (only with verification on; a test
    /// instrument, not part of `downtime_ms`).
    pub dest_verify_ms: f64,
    /// Handover and the destination's resume, until the source heard of it.
    pub resume_ms: f64,
}

/// The source's account of a completed migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MigrationReport {
    pub session: String,
    pub channels: u16,
    pub total_ms: f64,
    pub setup_ms: f64,
    pub precopy_ms: f64,
    /// Guest paused on the source until it ran on the destination, without verification.
    pub downtime_ms: f64,
    pub downtime: DowntimeBreakdown,
    pub transferred_bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub bytes_per_s: f64,
    /// Every round, the switchover round last.
    pub rounds: Vec<RoundReport>,
    /// Switchover came from a round or time bound, not from convergence.
    pub forced_switchover: bool,
    /// Expected downtime at the moment of switchover.
    pub expected_downtime_ms: f64,
    pub pages_checked: u64,
    pub pages_mismatched: u64,
    /// Device state bytes sent.
    pub device_bytes: u64,
    /// "multifd" (data channels, with credit) or "main" (serial, on the main channel).
    pub device_transfer: String,
    /// Chunks of credit per device the destination granted.
    pub credit_window: u32,
    /// Bytes of device chunks the destination buffers at most.
    pub buffer_cap_bytes: u64,
    pub devices: Vec<DeviceReport>,
}

/// One streamed device in a migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceReport {
    pub name: String,
    /// Bytes of state loaded on the destination.
    pub bytes: u64,
    pub chunks: u32,
    /// Of which precopy data, sent while the guest ran.
    pub precopy_bytes: u64,
    /// From the pause until the device's last chunk was handed to a channel.
    pub final_save_ms: f64,
    /// The most bytes of its chunks the destination held in the reorder buffer at once.
    pub peak_buffered_bytes: u64,
}

/// The destination's account of a completed incoming migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IncomingReport {
    pub session: String,
    pub channels: u16,
    pub guest_kind: String,
    pub memory_bytes: u64,
    pub total_ms: f64,
    pub received_bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
    pub rounds: u32,
    pub drain_ms: f64,
    pub restore_ms: f64,
    pub verify_ms: f64,
    pub resume_ms: f64,
    pub verify: Option<VerifyReport>,
    pub credit_window: u32,
    pub buffer_cap_bytes: u64,
    /// Per streamed device, the most bytes its reorder buffer held at once.
    pub device_peak_buffered_bytes: Vec<u64>,
    /// Pages that arrived torn (written by the guest while sent) and came again intact.
    pub torn_pages: u64,
}

/// Events a running migration reports as it goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// All channels are connected.
    Connected {
        session: String,
        channels: u16,
        setup_ms: f64,
        total_pages: u64,
        devices: usize,
    },
    /// A round is starting.
    RoundStarted { round: u32, pages: u64 },
    /// A precopy round has been sent.
    RoundDone(RoundReport),
    /// The guest is paused for switchover.
    Switchover {
        remaining_pages: u64,
        expected_downtime_ms: f64,
        forced: bool,
    },
}

/// What an incoming migration reports as it goes: sessions accepted, connections refused and
/// why, rounds. Its `Display` is the line a person reads; a VMM matches on the variants (the
/// QMP machine moves to `active` on [`IncomingEvent::SessionAccepted`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingEvent {
    /// A session was accepted and its guest built; data channels join next.
    SessionAccepted {
        session: String,
        guest_kind: String,
        memory_bytes: u64,
        channels: u16,
        devices: usize,
    },
    /// A session this side cannot serve was refused; the wait goes on.
    SessionRefused { session: String, reason: String },
    /// A connection was refused before it opened a session or joined one.
    ConnectionRefused { reason: String },
    /// A data channel that was not the session's was refused.
    DataChannelRefused { reason: String },
    /// A data channel left during its handshake.
    DataChannelLeft { index: u16, error: String },
    /// The source started a round.
    RoundStarted { round: u32, pages: u64 },
    /// The guest was resumed here, but the source could not be told (its copy stays paused).
    ResumedUntold { error: String },
}

impl std::fmt::Display for IncomingEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IncomingEvent::SessionAccepted {
                session,
                guest_kind,
                memory_bytes,
                channels,
                devices,
            } => write!(
                f,
                "session {session}: {guest_kind} guest, {} MiB, {channels} data channels, {devices} devices",
                memory_bytes >> 20
            ),
            IncomingEvent::SessionRefused { session, reason } => {
                write!(f, "refused session {session}: {reason}")
            }
            IncomingEvent::ConnectionRefused { reason } => {
                write!(f, "refused a connection: {reason}")
            }
            IncomingEvent::DataChannelRefused { reason } => {
                write!(f, "refused a data channel: {reason}")
            }
            IncomingEvent::DataChannelLeft { index, error } => {
                write!(f, "data channel {index} left during its handshake: {error}")
            }
            IncomingEvent::RoundStarted { round, pages } => {
                write!(f, "round {round}: {pages} pages")
            }
            IncomingEvent::ResumedUntold { error } => write!(
                f,
                "the guest runs here, but the source could not be told so ({error}); its copy stays paused"
            ),
        }
    }
}

pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
