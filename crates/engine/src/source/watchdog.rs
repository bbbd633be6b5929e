//! The attempt's watchdog: the one place where the source's waits get their deadlines.
//!
//! A wait on the destination is bounded twice: by the peer timeout, which catches a peer that
//! is gone (silent, or not reading), and by a deadline, which catches a peer that is alive but
//! does not do what it must (answers pings but never acknowledges a round, never grants credit
//! while the guest is paused, never says it loaded the guest). A deadline is measured from the
//! start of the wait and nothing the peer sends moves it.
//!
//! One thread per attempt (`lm-src-watch` during set-up and during the session) waits for the
//! armed deadline, for a cancel from outside, and for the attempt's end. When a deadline passes
//! or the caller cancels, it cancels the attempt and shuts every socket down, so whatever the
//! coordinator, a channel thread or a device job is blocked on wakes at once, and the
//! migration fails naming what did not happen in time (the guest runs on here, unless it was
//! already handed over).

use crate::cancel::CancelToken;
use crossbeam_channel::{after, never, select, Receiver, Sender};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the source is waiting for while a deadline is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Awaited {
    /// The rest of set-up once the main channel is open: the session's answer and every data
    /// channel's.
    SetUp,
    /// The destination's acknowledgement that it applied precopy round N, once every data
    /// channel has sent the round's end.
    RoundAck(u32),
    /// The whole switchover, from the guest's pause to the destination's `Loaded`: the
    /// guest's last pages, every device's last state (within the destination's credit), the
    /// vCPU and VM state, and the destination loading them.
    Switchover,
    /// The destination's `Resumed`, once it has been told to run the guest.
    Resumed,
}

impl fmt::Display for Awaited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Awaited::SetUp => write!(f, "the session's set-up"),
            Awaited::RoundAck(r) => write!(f, "the destination's acknowledgement of round {r}"),
            Awaited::Switchover => write!(f, "the switchover (with the guest paused)"),
            Awaited::Resumed => write!(f, "the destination's confirmation that it runs the guest"),
        }
    }
}

/// A deadline that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// What did not happen in time.
    pub awaited: Awaited,
    /// The deadline it had, measured from the start of the wait.
    pub limit: Duration,
}

#[derive(Clone, Copy)]
struct Deadline {
    awaited: Awaited,
    limit: Duration,
    at: Instant,
}

/// Deadlines for one attempt; [`Watchdog::run`] is the body of its watching thread.
pub(crate) struct Watchdog {
    arm_tx: Sender<Option<Deadline>>,
    arm_rx: Receiver<Option<Deadline>>,
    expired: Mutex<Option<Expired>>,
}

impl Watchdog {
    pub fn new() -> Self {
        let (arm_tx, arm_rx) = crossbeam_channel::unbounded();
        Watchdog {
            arm_tx,
            arm_rx,
            expired: Mutex::new(None),
        }
    }

    /// Arms a deadline `limit` from now for `awaited`, replacing the one armed before.
    pub fn arm(&self, awaited: Awaited, limit: Duration) {
        let at = Instant::now() + limit;
        // The receiver lives in self: the send cannot fail.
        let _ = self.arm_tx.send(Some(Deadline { awaited, limit, at }));
    }

    /// Disarms the deadline armed last.
    pub fn disarm(&self) {
        let _ = self.arm_tx.send(None);
    }

    /// The deadline that passed, if one did (then the attempt has been cancelled).
    pub fn expired(&self) -> Option<Expired> {
        *self.expired.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches until `attempt` ends. A cancel of `outer` (the caller's) or a deadline passing
    /// cancels `attempt` and calls `cut`, which shuts the attempt's sockets down.
    pub fn run(&self, outer: &CancelToken, attempt: &CancelToken, cut: impl Fn()) {
        let mut armed: Option<Deadline> = None;
        loop {
            let timer = match armed {
                Some(d) => after(d.at.saturating_duration_since(Instant::now())),
                None => never(),
            };
            select! {
                recv(outer.waiter()) -> _ => break,
                recv(attempt.waiter()) -> _ => return,
                recv(self.arm_rx) -> d => {
                    armed = d.unwrap_or(None);
                    continue;
                }
                recv(timer) -> _ => {
                    let d = armed.expect("the timer runs only while armed");
                    *self.expired.lock().unwrap_or_else(|p| p.into_inner()) = Some(Expired {
                        awaited: d.awaited,
                        limit: d.limit,
                    });
                    break;
                }
            }
        }
        attempt.cancel();
        cut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_deadline_that_passes_cancels_the_attempt_and_cuts() {
        let w = Watchdog::new();
        let (outer, attempt) = (CancelToken::new(), CancelToken::new());
        let cut = AtomicBool::new(false);
        w.arm(Awaited::RoundAck(3), Duration::from_millis(30));
        let t = Instant::now();
        w.run(&outer, &attempt, || cut.store(true, Ordering::SeqCst));
        assert!(t.elapsed() >= Duration::from_millis(30));
        assert!(attempt.is_cancelled() && cut.load(Ordering::SeqCst));
        assert!(!outer.is_cancelled());
        let e = w.expired().unwrap();
        assert_eq!(e.awaited, Awaited::RoundAck(3));
        assert_eq!(e.limit, Duration::from_millis(30));
    }

    #[test]
    fn a_disarmed_deadline_never_fires_and_the_attempt_ending_stops_the_watch() {
        let w = Watchdog::new();
        let (outer, attempt) = (CancelToken::new(), CancelToken::new());
        let cut = AtomicBool::new(false);
        w.arm(Awaited::Switchover, Duration::from_millis(20));
        w.disarm();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(80));
                attempt.cancel();
            });
            w.run(&outer, &attempt, || cut.store(true, Ordering::SeqCst));
        });
        assert!(!cut.load(Ordering::SeqCst));
        assert_eq!(w.expired(), None);
    }

    #[test]
    fn a_cancel_from_outside_cuts_without_a_deadline() {
        let w = Watchdog::new();
        let (outer, attempt) = (CancelToken::new(), CancelToken::new());
        let cut = AtomicBool::new(false);
        outer.cancel();
        w.run(&outer, &attempt, || cut.store(true, Ordering::SeqCst));
        assert!(attempt.is_cancelled() && cut.load(Ordering::SeqCst));
        assert_eq!(w.expired(), None);
    }

    #[test]
    fn a_new_deadline_replaces_the_old_one() {
        let w = Watchdog::new();
        let (outer, attempt) = (CancelToken::new(), CancelToken::new());
        w.arm(Awaited::SetUp, Duration::from_secs(60));
        w.arm(Awaited::Resumed, Duration::from_millis(10));
        w.run(&outer, &attempt, || {});
        assert_eq!(w.expired().unwrap().awaited, Awaited::Resumed);
    }
}
