//! Cancelling a migration: a flag every thread can check, and a channel that disconnects on
//! cancel so a thread blocked in `select!` wakes at once, without polling.

use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Cancels a migration. Clones share the same state: keep one to cancel from outside.
#[derive(Clone)]
pub struct CancelToken {
    inner: Arc<Inner>,
}

struct Inner {
    flag: AtomicBool,
    /// Dropped on cancel, which disconnects `rx`.
    tx: Mutex<Option<Sender<()>>>,
    rx: Receiver<()>,
}

impl CancelToken {
    /// A token not cancelled. A cancel is final: a token never becomes uncancelled, so use
    /// a new one for each attempt.
    pub fn new() -> Self {
        let (tx, rx) = crossbeam_channel::bounded(0);
        CancelToken {
            inner: Arc::new(Inner {
                flag: AtomicBool::new(false),
                tx: Mutex::new(Some(tx)),
                rx,
            }),
        }
    }

    /// Cancels: every check now says so and every waiter on [`Self::waiter`] wakes.
    pub fn cancel(&self) {
        self.inner.flag.store(true, Ordering::Release);
        self.inner
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }

    /// Whether [`Self::cancel`] has been called on this token or a clone.
    pub fn is_cancelled(&self) -> bool {
        self.inner.flag.load(Ordering::Acquire)
    }

    /// A receiver that never yields a message and disconnects on cancel: put it in a
    /// `select!` to wake on cancel.
    pub fn waiter(&self) -> &Receiver<()> {
        &self.inner.rx
    }

    /// Sleeps for `d`, waking at once on cancel. True if the whole time passed, false if the
    /// token was (or became) cancelled. Threads that pace themselves sleep through this, never
    /// through `thread::sleep`, so a cancel is prompt.
    pub fn sleep(&self, d: std::time::Duration) -> bool {
        if self.is_cancelled() {
            return false;
        }
        crossbeam_channel::select! {
            recv(self.inner.rx) -> _ => false,
            default(d) => !self.is_cancelled(),
        }
    }
}

impl Default for CancelToken {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for CancelToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CancelToken(cancelled: {})", self.is_cancelled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_wakes_a_select() {
        let t = CancelToken::new();
        let t2 = t.clone();
        let h = std::thread::spawn(move || {
            crossbeam_channel::select! {
                recv(t2.waiter()) -> r => r.is_err(),
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!t.is_cancelled());
        t.cancel();
        assert!(h.join().unwrap(), "the waiter disconnects on cancel");
        assert!(t.is_cancelled());
    }
}
