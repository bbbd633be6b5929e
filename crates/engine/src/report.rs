//! What a migration reports: per round, the downtime split into its parts, and totals.
//! Everything here serializes to the JSON that `livemig --json` prints.
//!
//! Times are in milliseconds (`f64`, from [`std::time::Instant`]s on the side that measured
//! them), sizes in bytes, pages are 4 KiB. The source's [`MigrationReport`] includes what
//! the destination measured (sent back in its `Loaded`); the destination's
//! [`IncomingReport`] is its own view.

use crate::guest::VerifyReport;
use serde::{Deserialize, Serialize};

/// One precopy round (or the switchover round) as the source saw it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundReport {
    /// The round's number, from 0 (round 0 sends every page).
    pub round: u32,
    /// Pages the round had to send: those dirty when it started.
    pub pages: u64,
    /// Of those, pages sent with their contents.
    pub normal_pages: u64,
    /// Of those, pages sent as zero.
    pub zero_pages: u64,
    /// Bytes of RamPages frames the round sent, headers included.
    pub bytes: u64,
    /// From the round's start until every channel had sent its end marker and the
    /// destination had acknowledged it (for the switchover round: until its last pages were
    /// handed out and every save was in).
    pub ms: f64,
    /// `bytes` over `ms`: the end-to-end rate the next round's expected downtime is based on.
    pub bytes_per_s: f64,
    /// Pages dirtied while this round was sent (0 for the switchover round).
    pub dirty_after: u64,
    /// Of `pages`, those not sent because the guest wrote them again before their turn (seen
    /// by a dirty-log pass in the middle of the round): they go in the next round instead,
    /// so a page the guest keeps writing is not sent twice in a row.
    #[serde(default)]
    pub skipped_pages: u64,
    /// The rest fit the downtime limit, but the destination had not yet said its devices'
    /// twins were ready (`switchover-ack`): precopy went on.
    #[serde(default)]
    pub switchover_ack_awaited: bool,
    /// The downtime expected if the guest were paused after this round, milliseconds: what
    /// the switchover decision compares with the downtime limit. The largest of
    /// [`Self::ram_expected_ms`], [`Self::device_read_ms`] and the RAM's rest and the
    /// devices' final bytes together at [`Self::channel_bytes_per_s`] (see
    /// `docs/state-machines.md`).
    pub expected_downtime_ms: f64,
    /// Auto-converge's throttle on the guest's vCPUs during this round (percent).
    pub throttle_percent: u8,
    /// Time to send `dirty_after` pages at this round's rate, milliseconds: the RAM's part
    /// of the expected downtime.
    #[serde(default)]
    pub ram_expected_ms: f64,
    /// Bytes the devices said their final save would read now ([`crate::SavePending`]),
    /// summed over the devices that report (in serial mode, their precopy data too).
    #[serde(default)]
    pub device_final_bytes: u64,
    /// Time the devices need to read those bytes out at their own rates, milliseconds: the
    /// slowest device's (they read in parallel; in serial mode, the sum).
    #[serde(default)]
    pub device_read_ms: f64,
    /// The rate of the channels the devices' bytes are expected to go at, bytes per second:
    /// every byte the data channels sent (RAM and device precopy data) over a round's time,
    /// the best of the latest 8 rounds that moved at least 4 MiB.
    #[serde(default)]
    pub channel_bytes_per_s: f64,
    /// The downtime limit in force when this round ended, milliseconds (it may be changed
    /// while the migration runs).
    #[serde(default)]
    pub downtime_limit_ms: f64,
}

/// Where the guest's pause went, source and destination together, in milliseconds. The
/// parts overlap (the state save, the RAM's last pass and the device saves run at the same
/// time), so they need not add up to [`MigrationReport::downtime_ms`].
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
    /// The session's id, as a UUID (the destination's report and log name the same).
    pub session: String,
    /// Data channels used.
    pub channels: u16,
    /// From the call until the destination confirmed it runs the guest.
    pub total_ms: f64,
    /// Opening the main and data channels, handshakes (and TLS) included.
    pub setup_ms: f64,
    /// From the first round until the guest was paused.
    pub precopy_ms: f64,
    /// Guest paused on the source until it ran on the destination, without verification.
    pub downtime_ms: f64,
    /// The downtime split into its parts.
    pub downtime: DowntimeBreakdown,
    /// Bytes sent on the data channels, frame headers included (see
    /// [`crate::StatsSnapshot::bytes`]).
    pub transferred_bytes: u64,
    /// RAM pages sent with their contents, over all rounds.
    pub normal_pages: u64,
    /// RAM pages sent as zero, over all rounds.
    pub zero_pages: u64,
    /// `transferred_bytes` over the time after set-up.
    pub bytes_per_s: f64,
    /// Every round, the switchover round last.
    pub rounds: Vec<RoundReport>,
    /// Switchover came from a round or time bound, not from convergence.
    pub forced_switchover: bool,
    /// Expected downtime at the moment of switchover.
    pub expected_downtime_ms: f64,
    /// Pages the destination verified (0 without [`crate::IncomingConfig::verify`]).
    pub pages_checked: u64,
    /// Pages the destination found wrong (always 0 in a report: any fails the migration).
    pub pages_mismatched: u64,
    /// Device state bytes sent.
    pub device_bytes: u64,
    /// "multifd" (data channels, with credit) or "main" (serial, on the main channel).
    pub device_transfer: String,
    /// Chunks of credit per device the destination granted.
    pub credit_window: u32,
    /// Bytes of device chunks the destination buffers at most.
    pub buffer_cap_bytes: u64,
    /// Every streamed device, in the VM's order.
    pub devices: Vec<DeviceReport>,
    /// The postcopy phase, when the migration switched to it.
    #[serde(default)]
    pub postcopy: Option<PostcopyReport>,
    /// Switchovers abandoned past [`crate::MigrationConfig::downtime_hard_limit`], in order;
    /// the migration went on after each (empty without the bound).
    #[serde(default)]
    pub abandoned_switchovers: Vec<AbandonedSwitchover>,
}

/// A switchover abandoned past the hard bound on the pause
/// ([`crate::MigrationConfig::downtime_hard_limit`]): the guest ran on at the source, and the
/// migration went on in a new connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AbandonedSwitchover {
    /// The switchover's round (the report's numbering).
    pub round: u32,
    /// The downtime expected when the guest paused, milliseconds.
    pub expected_downtime_ms: f64,
    /// From the pause until the switchover was cut, milliseconds (the bound, or a little
    /// more).
    pub cut_ms: f64,
    /// From the pause until the guest ran here again, milliseconds: the pause the guest
    /// saw.
    pub paused_ms: f64,
    /// What the switchover still waited for when it was cut, for a person.
    pub waiting_for: String,
}

/// What the postcopy phase of a migration moved and cost.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PostcopyReport {
    /// Pages the destination did not hold at the switch, all sent after it.
    pub pages: u64,
    /// Pages the destination asked for (the source's count of requested pages).
    pub requested: u64,
    /// Pages the destination's faults asked for (its own count).
    pub dest_requested: u64,
    /// Total time the destination's vCPUs waited on missing pages, milliseconds.
    pub blocked_ms: f64,
    /// From the switch until the destination had every page, milliseconds.
    pub ms: f64,
    /// Times a broken postcopy was resumed over a new connection.
    #[serde(default)]
    pub recoveries: u32,
}

/// How long faulting vCPUs waited in postcopy, from the fault read to its page installed
/// (requested pages, pages the push brought first, and pages that never held data, which
/// are zero-filled at once). Percentiles are upper bounds of buckets an eighth of a power of
/// two wide (at most 12.5 % high), never above `max`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultLatencyReport {
    /// Faults answered.
    pub faults: u64,
    /// Median wait, microseconds.
    pub p50_us: u64,
    /// 99th percentile wait, microseconds.
    pub p99_us: u64,
    /// Longest wait, microseconds.
    pub max_us: u64,
    /// Every wait added up, microseconds (QEMU's postcopy blocktime).
    pub total_us: u64,
    /// The histogram: every non-empty bucket, shortest waits first.
    #[serde(default)]
    pub histogram: Vec<LatencyBucket>,
    /// Each faulting thread's waits (QEMU's per-vCPU blocktime), in the order they first
    /// faulted.
    #[serde(default)]
    pub threads: Vec<ThreadBlocktime>,
}

/// A bucket of the fault latency histogram.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyBucket {
    /// The bucket's exclusive upper bound, microseconds (the one before it is its lower).
    pub below_us: u64,
    /// Faults whose wait fell in it.
    pub faults: u64,
}

/// One faulting thread's time blocked in postcopy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadBlocktime {
    /// The thread's name when the report was made (`kvm-vcpu0`, ...), or `tid N` if it had
    /// ended.
    pub thread: String,
    /// Its faults answered.
    pub faults: u64,
    /// Its waits added up, microseconds.
    pub blocked_us: u64,
}

/// One streamed device in a migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DeviceReport {
    /// The device's name ([`crate::DeviceDescriptor::name`]).
    pub name: String,
    /// Bytes of state loaded on the destination.
    pub bytes: u64,
    /// Chunks loaded on the destination, the empty end-of-stream chunk included.
    pub chunks: u32,
    /// Of which precopy data, sent while the guest ran.
    pub precopy_bytes: u64,
    /// From the pause until the device's last chunk was handed to a channel (0 in serial
    /// mode, where [`DowntimeBreakdown::device_save_ms`] covers every device).
    pub final_save_ms: f64,
    /// The most bytes of its chunks the destination held in the reorder buffer at once.
    pub peak_buffered_bytes: u64,
}

/// The destination's account of a completed incoming migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IncomingReport {
    /// The session's id, as a UUID (the source's report names the same).
    pub session: String,
    /// The guest arrived paused, as it was on the source (stopped by its operator): it was
    /// not resumed here.
    #[serde(default)]
    pub paused: bool,
    /// Data channels used.
    pub channels: u16,
    /// The guest's kind, as the source described it.
    pub guest_kind: String,
    /// The guest's RAM, bytes.
    pub memory_bytes: u64,
    /// From the session's acceptance until the guest was resumed here.
    pub total_ms: f64,
    /// Bytes received on the data channels.
    pub received_bytes: u64,
    /// RAM pages received with their contents.
    pub normal_pages: u64,
    /// RAM pages received as zero.
    pub zero_pages: u64,
    /// Rounds received, the switchover round included.
    pub rounds: u32,
    /// From the source's `Complete` until the last pages, state and device loads were in.
    pub drain_ms: f64,
    /// Applying the small devices' blobs and the guest's state.
    pub restore_ms: f64,
    /// Checking every page ([`crate::IncomingConfig::verify`]; about 0 without it).
    pub verify_ms: f64,
    /// [`crate::Guest::resume`] here.
    pub resume_ms: f64,
    /// The page check's result, when asked for.
    pub verify: Option<VerifyReport>,
    /// Chunks of credit per device granted to the source.
    pub credit_window: u32,
    /// Bytes of device chunks this side buffered at most, as granted.
    pub buffer_cap_bytes: u64,
    /// Per streamed device, the most bytes its reorder buffer held at once.
    pub device_peak_buffered_bytes: Vec<u64>,
    /// Pages that arrived torn (written by the guest while sent) and came again intact.
    pub torn_pages: u64,
    /// From the switch to postcopy until every page was in, milliseconds (0: no postcopy).
    #[serde(default)]
    pub postcopy_ms: f64,
    /// Postcopy's faults: how long the vCPUs waited for missing pages.
    #[serde(default)]
    pub postcopy_faults: Option<FaultLatencyReport>,
}

/// Events a running migration reports as it goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// All channels are connected and precopy begins.
    Connected {
        /// The session's id, as a UUID.
        session: String,
        /// Data channels.
        channels: u16,
        /// Set-up's time, milliseconds.
        setup_ms: f64,
        /// Pages round 0 will send (every page; 0 in local mode).
        total_pages: u64,
        /// Streamed devices.
        devices: usize,
    },
    /// A round is starting.
    RoundStarted {
        /// The round's number (the switchover round is the last).
        round: u32,
        /// Pages it will send.
        pages: u64,
    },
    /// A precopy round has been sent.
    RoundDone(RoundReport),
    /// The guest is paused for switchover.
    Switchover {
        /// Pages dirty at the pause's start, before the last dirty pass.
        remaining_pages: u64,
        /// The last round's predicted downtime, milliseconds.
        expected_downtime_ms: f64,
        /// A round or time bound forced the switchover (it did not converge).
        forced: bool,
        /// The pause is the switch to postcopy (the guest will run on the destination
        /// before `remaining_pages` have arrived), not a switchover.
        #[serde(default)]
        postcopy: bool,
    },
    /// The guest is paused for the switchover and the migration waits for the embedder to
    /// let it go on ([`crate::MigrationConfig::pause_before_switchover`]).
    PreSwitchover,
    /// The switchover goes on after [`Progress::PreSwitchover`]: devices and state are
    /// being saved (QEMU's `device` status).
    SavingDevices,
    /// Postcopy broke (a lost link): this side keeps its paused copy and every page, and
    /// waits to resume over a new connection ([`crate::recovery`]).
    PostcopyPaused {
        /// What broke.
        error: String,
    },
    /// A new session resumed the broken postcopy.
    PostcopyResumed {
        /// Pages the destination still missed.
        missing_pages: u64,
    },
    /// A switchover ran past the hard bound on the pause and was abandoned: the guest runs
    /// here again, and the migration goes on (or, out of attempts, ends as
    /// [`crate::MigrationConfig::on_no_convergence`] says).
    SwitchoverAbandoned(AbandonedSwitchover),
}

/// What an incoming migration reports as it goes: sessions accepted, connections refused and
/// why, rounds. Its `Display` is the line a person reads; a VMM matches on the variants (the
/// QMP machine moves to `active` on [`IncomingEvent::SessionAccepted`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingEvent {
    /// A session was accepted and its guest built; data channels join next.
    SessionAccepted {
        /// The session's id, as a UUID.
        session: String,
        /// The guest's kind.
        guest_kind: String,
        /// The guest's RAM, bytes.
        memory_bytes: u64,
        /// Data channels the session will open.
        channels: u16,
        /// Devices, streamed and small together.
        devices: usize,
        /// The protocol version agreed (see `livemig_wire::version`).
        protocol: u16,
        /// The optional features agreed.
        features: livemig_wire::Features,
    },
    /// A session this side cannot serve was refused; the wait goes on.
    SessionRefused {
        /// The refused session's id.
        session: String,
        /// Why, as sent to the source.
        reason: String,
    },
    /// A connection was refused before it opened a session or joined one.
    ConnectionRefused {
        /// Why.
        reason: String,
    },
    /// A data channel that was not the session's was refused.
    DataChannelRefused {
        /// Why.
        reason: String,
    },
    /// A data channel left during its handshake.
    DataChannelLeft {
        /// Its index.
        index: u16,
        /// What happened to it.
        error: String,
    },
    /// The source started a round.
    RoundStarted {
        /// The round's number.
        round: u32,
        /// Pages it will send.
        pages: u64,
    },
    /// The guest was resumed here, but the source could not be told (its copy stays paused,
    /// and its migration ends in [`crate::MigrationError::HandoverUnknown`]). The guest runs
    /// here all the same, and [`crate::receive_vm`] returns it.
    ResumedUntold {
        /// Why the source could not be told.
        error: String,
    },
    /// The session switched to postcopy: the guest runs here while `pages` are still to
    /// come ([`crate::receive_vm`] returns once all are in).
    PostcopyStarted {
        /// Pages the source still sends.
        pages: u64,
    },
    /// Postcopy broke (a lost link): the guest runs on here, its vCPUs waiting on any page
    /// not yet arrived, until the source resumes over a new connection ([`crate::recovery`]).
    PostcopyPaused {
        /// What broke.
        error: String,
    },
    /// The source resumed the broken postcopy over a new session.
    PostcopyResumed {
        /// The resuming session's id (the broken one's).
        session: String,
        /// Pages still missing here.
        missing_pages: u64,
    },
    /// The source abandoned a switchover past its hard bound on the pause: the guest runs
    /// there again, this side keeps guest memory and waits for the same session to go on.
    SwitchoverAbandoned {
        /// The session's id.
        session: String,
        /// The source's reason.
        reason: String,
    },
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
                protocol,
                features,
            } => write!(
                f,
                "session {session}: {guest_kind} guest, {} MiB, {channels} data channels, {devices} devices, protocol version {protocol} ({features})",
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
            IncomingEvent::PostcopyStarted { pages } => write!(
                f,
                "postcopy: the guest runs here, {pages} pages still to come"
            ),
            IncomingEvent::PostcopyPaused { error } => write!(
                f,
                "postcopy paused ({error}): the guest runs here on what it has, waiting for the source to resume"
            ),
            IncomingEvent::PostcopyResumed {
                session,
                missing_pages,
            } => write!(
                f,
                "postcopy of session {session} resumed: {missing_pages} pages still to come"
            ),
            IncomingEvent::SwitchoverAbandoned { session, reason } => write!(
                f,
                "session {session}: the source abandoned the switchover ({reason}); waiting for it to go on"
            ),
        }
    }
}

pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
