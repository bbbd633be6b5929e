//! Postcopy recovery: how a postcopy broken by a lost link is resumed over new connections.
//!
//! Once the source has sent `PostcopyStart` the guest runs on the destination on memory that
//! is still arriving: its pages are split between the hosts and neither side may give up
//! alone. When a channel breaks, both sides tear the session's threads down and go to
//! *postcopy-paused*: the source keeps its paused copy and every page; the destination keeps
//! guest memory registered with userfaultfd, so a vCPU touching a page not yet arrived waits
//! for it (the guest runs on where it has what it needs). A new session then resumes the
//! transfer (`SessionHello` with `resume`, the broken session's id): the destination
//! answers with the pages it still misses (`PostcopyResume`) and asks again for the pages
//! its vCPUs wait on; the source pushes the missing pages and answers requests, as before
//! the break. The exchange is in `docs/protocol.md`, the phases in `docs/state-machines.md`.
//!
//! How the new session comes about is the embedder's choice: [`SourceRecovery`] on the
//! source, [`IncomingRecovery`] on the destination. The CLI reconnects to the same address
//! by itself; the QMP machine waits for QEMU's commands (`migrate-recover URI` on the
//! destination, `migrate` with `resume: true` on the source), which send the new address
//! through a [`Mailbox`].

use crate::transport::{Endpoint, Listener};
use crossbeam_channel::{Receiver, Sender};
use std::fmt;
use std::time::Duration;

/// Where new addresses (source) or listeners (destination) for a recovery come from: the
/// embedder [`Mailbox::post`]s one when the operator asks to resume; clones share it.
pub struct Mailbox<T> {
    tx: Sender<T>,
    rx: Receiver<T>,
}

impl<T> Mailbox<T> {
    /// An empty mailbox.
    pub fn new() -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        Mailbox { tx, rx }
    }

    /// Hands `item` to the paused migration (it takes the oldest first).
    pub fn post(&self, item: T) {
        // The mailbox holds its own receiver: the send cannot fail.
        let _ = self.tx.send(item);
    }

    /// Drops whatever was posted and not taken (e.g. before a new migration).
    pub fn clear(&self) {
        while self.rx.try_recv().is_ok() {}
    }

    pub(crate) fn receiver(&self) -> &Receiver<T> {
        &self.rx
    }
}

impl<T> Default for Mailbox<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Mailbox<T> {
    fn clone(&self) -> Self {
        Mailbox {
            tx: self.tx.clone(),
            rx: self.rx.clone(),
        }
    }
}

impl<T> fmt::Debug for Mailbox<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mailbox({} waiting)", self.rx.len())
    }
}

/// How the source resumes a broken postcopy.
#[derive(Debug, Clone)]
pub enum SourceRecovery {
    /// None: a broken postcopy fails the migration at once
    /// ([`crate::MigrationError::PostcopyBroken`]); the source keeps its copy paused.
    Off,
    /// Reconnects to the same destination address by itself, again and again (each attempt
    /// as a set-up, within [`crate::MigrationConfig::connect_timeout`]), for up to `within`
    /// after the break. The CLI's default (60 s).
    Reconnect {
        /// How long after the break to keep trying.
        within: Duration,
    },
    /// Waits for the embedder to name the destination's new address (QMP's `migrate` with
    /// `resume: true`), for up to `within` (`None`: until cancelled, as QEMU waits). A resume
    /// that fails (nobody there, refused) pauses again and waits for the next one.
    OnRequest {
        /// Where the addresses come from.
        addresses: Mailbox<Endpoint>,
        /// How long after the break to wait for one that works.
        within: Option<Duration>,
    },
}

impl Default for SourceRecovery {
    /// Reconnect to the same address for up to 60 s.
    fn default() -> Self {
        SourceRecovery::Reconnect {
            within: DEFAULT_RECOVERY_WINDOW,
        }
    }
}

/// How the destination waits for the source to resume a broken postcopy. Meanwhile the
/// guest runs on here, its vCPUs waiting on any page not yet arrived.
#[derive(Debug, Clone)]
pub enum IncomingRecovery {
    /// None: a broken postcopy fails the session; the guest, half arrived, is dropped.
    Off,
    /// Waits on the listener the session came on for the source's resuming session, for up
    /// to `within` after the break (the CLI's default, 60 s).
    SameListener {
        /// How long after the break to wait.
        within: Duration,
    },
    /// Waits for the embedder to hand over a new listener (QMP's `migrate-recover URI`),
    /// then for the source's resuming session on it, for up to `within` after the break
    /// (`None`: until cancelled, as QEMU waits). A newer listener replaces the one waited on.
    OnRequest {
        /// Where the listeners come from.
        listeners: Mailbox<Listener>,
        /// How long after the break to wait.
        within: Option<Duration>,
    },
}

impl Default for IncomingRecovery {
    /// Wait on the same listener for up to 60 s.
    fn default() -> Self {
        IncomingRecovery::SameListener {
            within: DEFAULT_RECOVERY_WINDOW,
        }
    }
}

/// How long after a break each side keeps trying to resume by default.
pub const DEFAULT_RECOVERY_WINDOW: Duration = Duration::from_secs(60);
