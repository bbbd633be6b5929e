//! The VM's run state and the migration's status, with QEMU's names.

/// What the VM is doing (`query-status`'s `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// No guest yet: waiting for an incoming migration (`-incoming defer`).
    InMigrate,
    Running,
    /// Stopped by `stop`.
    Paused,
    /// Paused by the migration for switchover.
    FinishMigrate,
    /// Migrated away: the guest runs on the destination now.
    PostMigrate,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::InMigrate => "inmigrate",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::FinishMigrate => "finish-migrate",
            RunState::PostMigrate => "postmigrate",
        }
    }

    pub fn running(self) -> bool {
        self == RunState::Running
    }
}

/// A migration's status (`query-migrate`'s `status`, the `MIGRATION` event's `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigStatus {
    None,
    Setup,
    Active,
    /// Switched to postcopy: the guest runs on the destination, its last pages follow.
    PostcopyActive,
    /// Paused for the switchover, waiting for `migrate-continue` (`pause-before-switchover`).
    PreSwitchover,
    /// After `migrate-continue`: devices and state are being saved.
    Device,
    /// Postcopy broke (a lost link): both sides wait for a resume over a new connection.
    PostcopyPaused,
    /// A resume is being set up (`migrate-recover` given, or `migrate` with `resume`).
    PostcopyRecover,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

impl MigStatus {
    pub fn name(self) -> &'static str {
        match self {
            MigStatus::None => "none",
            MigStatus::Setup => "setup",
            MigStatus::Active => "active",
            MigStatus::PostcopyActive => "postcopy-active",
            MigStatus::PreSwitchover => "pre-switchover",
            MigStatus::Device => "device",
            MigStatus::PostcopyPaused => "postcopy-paused",
            MigStatus::PostcopyRecover => "postcopy-recover",
            MigStatus::Cancelling => "cancelling",
            MigStatus::Cancelled => "cancelled",
            MigStatus::Completed => "completed",
            MigStatus::Failed => "failed",
        }
    }

    /// Postcopy has started and not ended: active, paused or recovering.
    pub fn in_postcopy(self) -> bool {
        matches!(
            self,
            MigStatus::PostcopyActive | MigStatus::PostcopyPaused | MigStatus::PostcopyRecover
        )
    }

    /// A migration thread runs in this status.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            MigStatus::Setup
                | MigStatus::Active
                | MigStatus::PostcopyActive
                | MigStatus::PreSwitchover
                | MigStatus::Device
                | MigStatus::PostcopyPaused
                | MigStatus::PostcopyRecover
                | MigStatus::Cancelling
        )
    }
}
