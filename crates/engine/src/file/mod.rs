//! Migration to and from a file: a VM saved with parallel positioned writes, and restored
//! with parallel positioned reads (QEMU's `mapped-ram`; the format is
//! [`livemig_wire::file`], described in `docs/file-format.md`).
//!
//! [`save_vm`] writes every guest page at a fixed offset of the file, from several channel
//! threads at once. With the guest running (a live save) it goes round by round as a
//! precopy does: round 0 writes every page, each later round re-writes in place the pages
//! the guest dirtied meanwhile, until the rest would be written within the downtime limit;
//! then it pauses the guest for the last round, while every device saves its final state
//! and the guest's state is saved, all at once, as a migration's switchover. With the guest
//! already paused it is one pass. The guest resumes once everything is written (or stays
//! paused if it was), before the `fsync`; the file appears at its path only once whole and
//! synced (it is written as `PATH.partial` and renamed).
//!
//! [`restore_vm`] checks the file's prefix, header and layout before anything is built,
//! then builds the guest and its devices, reads the pages present in parallel (each checked
//! against its CRC32C) while each device's loader loads its stream in order, restores the
//! small devices and the guest's state, and resumes the guest.
//!
//! ```text
//! save:    open PATH.partial --> [live] Round(0: every page) --> Round(k: dirty pages) --+
//!                                    ^                                                   |
//!                                    +------------------- not small enough -------------+
//!          --> Paused: last round | device final saves | guest + small devices' state
//!          --> resume (if it ran) --> sections, fsync, header, fsync --> rename to PATH
//!          any error: dirty log stopped, devices thawed, guest resumed if paused here,
//!                     PATH.partial removed
//! restore: prefix, header, layout, sections checked --> guest and devices built
//!          --> pages read | devices loaded --> small devices, guest state --> resume
//! ```
//!
//! Threads are the engine's own (`crate::runtime`): `lm-save-ch{i}`, `lm-save-dev{i}`,
//! `lm-save-state`, `lm-rst-rd{i}`, `lm-rst-dev{i}`, and on demand `lm-rst-fault` and
//! `lm-rst-fill`; all are joined before either call
//! returns.

mod devices;
mod error;
pub(crate) mod io;
mod ondemand;
mod pages;
mod restore;
mod save;
mod tables;

pub use error::FileError;
pub use restore::{restore_vm, Restored};
pub use save::save_vm;

use crate::cancel::CancelToken;
use std::time::Duration;

/// How a save goes ([`save_vm`]).
#[derive(Debug, Clone)]
pub struct SaveConfig {
    /// Channel threads writing pages in parallel (1 to 64). Default 4.
    pub channels: u16,
    /// A live save pauses the guest once the pages left would be written within this
    /// time, at the rate the last round measured. Default 300 ms.
    pub downtime_limit: Duration,
    /// A live save pauses after this many rounds even if not converged. Default 30.
    pub max_rounds: u32,
    /// Bytes per device state chunk (1 to [`livemig_wire::MAX_CHUNK_SIZE`]). Default 1 MiB.
    pub chunk_size: u32,
    /// The guest is paused already (QMP `stop` first): one pass, no dirty log, and the
    /// guest stays paused after.
    pub paused: bool,
    /// A live save resumes the guest after the save (default); false leaves it paused, as
    /// QEMU leaves a VM after `migrate file:`.
    pub resume: bool,
    /// Write pages with direct I/O (`O_DIRECT`, QEMU's `direct-io`): through a second
    /// descriptor, bypassing the page cache; headers, sections and device state go through
    /// the ordinary one. A filesystem that refuses `O_DIRECT` fails the save
    /// ([`FileError::DirectIo`]) before any page is written.
    pub direct_io: bool,
    /// Cancels the save from another thread (the guest then runs on, no file is left).
    pub cancel: CancelToken,
}

impl Default for SaveConfig {
    fn default() -> Self {
        SaveConfig {
            channels: 4,
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            chunk_size: 1 << 20,
            paused: false,
            resume: true,
            direct_io: false,
            cancel: CancelToken::new(),
        }
    }
}

impl SaveConfig {
    fn validate(&self) -> Result<(), FileError> {
        if !(1..=livemig_wire::MAX_CHANNELS).contains(&self.channels) {
            return Err(FileError::Config(format!(
                "{} channels: 1 to {} are allowed",
                self.channels,
                livemig_wire::MAX_CHANNELS
            )));
        }
        if !(1..=livemig_wire::MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(FileError::Config(format!(
                "chunk size {}: 1 to {} bytes",
                self.chunk_size,
                livemig_wire::MAX_CHUNK_SIZE
            )));
        }
        if self.max_rounds == 0 {
            return Err(FileError::Config("max_rounds must be at least 1".into()));
        }
        Ok(())
    }
}

/// One round of a save.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SaveRound {
    /// 0 for the first; the last is the one with the guest paused.
    pub round: u32,
    /// Pages looked at.
    pub pages: u64,
    /// Of those, pages written with data.
    pub data_pages: u64,
    /// Of those, zero pages (holes).
    pub zero_pages: u64,
    /// The round's time, milliseconds.
    pub ms: f64,
    /// Pages the guest dirtied during the round (to write in the next).
    pub dirty_after: u64,
}

/// How a save went.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SaveReport {
    /// Every round, the paused one last.
    pub rounds: Vec<SaveRound>,
    /// Whether the guest was running when the save began.
    pub live: bool,
    /// The guest's memory in bytes.
    pub memory_bytes: u64,
    /// Pages the file holds (the rest are holes).
    pub pages_in_file: u64,
    /// Bytes of device state saved, all devices.
    pub device_bytes: u64,
    /// The file's length (its allocated size can be less: holes).
    pub file_len: u64,
    /// The guest paused here from the pause to its resume, milliseconds (0: not paused by
    /// the save).
    pub downtime_ms: f64,
    /// The sync of the file to stable storage, milliseconds.
    pub fsync_ms: f64,
    /// From the call to the file's rename, milliseconds.
    pub total_ms: f64,
    /// Pages were written with direct I/O.
    #[serde(default)]
    pub direct_io: bool,
}

/// How a restore goes ([`restore_vm`]).
#[derive(Debug, Clone)]
pub struct RestoreConfig {
    /// Threads reading pages in parallel (1 to 64). Default 4.
    pub readers: u16,
    /// The largest guest memory a file may ask this side to build; a file asking for more
    /// is refused before anything is built. Default: this host's RAM.
    pub max_guest_memory: u64,
    /// The largest guest state (and small devices' state) blob read. Default 64 MiB.
    pub max_state_bytes: u64,
    /// Check every page of the restored guest before resuming it (a test instrument).
    pub verify: bool,
    /// Resume the guest once restored (default); false leaves it paused.
    pub resume: bool,
    /// Follow the saved run state: a guest that was stopped when saved stays paused (as
    /// QEMU restores it), whatever `resume` says. Off by default (the CLI runs what it
    /// restores); QMP turns it on.
    pub as_saved: bool,
    /// On demand: resume the guest as soon as the devices and its state are loaded, before
    /// any page is read; a page is read when first touched (userfaultfd), while a
    /// background thread reads the rest. The call returns once every page is in. Needs
    /// userfaultfd ([`FileError::OnDemand`] where it is not available).
    pub on_demand: bool,
    /// Read pages with direct I/O (`O_DIRECT`, QEMU's `direct-io`), as [`SaveConfig`]'s.
    pub direct_io: bool,
    /// Cancels the restore from another thread (the guest is then dropped).
    pub cancel: CancelToken,
}

impl Default for RestoreConfig {
    fn default() -> Self {
        RestoreConfig {
            readers: 4,
            max_guest_memory: crate::config::host_memory_bytes().unwrap_or(16 << 30),
            max_state_bytes: livemig_wire::Limits::default().max_state_bytes,
            verify: false,
            resume: true,
            as_saved: false,
            on_demand: false,
            direct_io: false,
            cancel: CancelToken::new(),
        }
    }
}

/// How a restore went.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RestoreReport {
    /// The guest's kind.
    pub guest_kind: String,
    /// The guest's memory in bytes.
    pub memory_bytes: u64,
    /// Pages read from the file (the rest were holes, left untouched).
    pub pages_read: u64,
    /// Bytes of device state loaded, all devices.
    pub device_bytes: u64,
    /// Rounds the save took.
    pub saved_rounds: u32,
    /// The guest was stopped when saved.
    pub saved_paused: bool,
    /// The check of every page, if asked for.
    pub verify: Option<crate::guest::VerifyReport>,
    /// Whether the restore was on demand.
    pub on_demand: bool,
    /// Pages were read with direct I/O.
    #[serde(default)]
    pub direct_io: bool,
    /// On demand: page faults served (pages the guest touched before the fill had them).
    pub faults: u64,
    /// From the call until the guest was resumed, milliseconds (None: left paused).
    pub resumed_ms: Option<f64>,
    /// From the call until every page was in (and checked, if asked), milliseconds.
    pub total_ms: f64,
}
