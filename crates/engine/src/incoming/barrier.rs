//! The end-of-round meeting point of the destination's data channels.
//!
//! Every data channel thread waits here after its RoundEnd marker; none applies a page of
//! round k+1 until all have applied every page of round k. That is what keeps an older copy
//! of a page from overwriting a newer one. Unlike `std::sync::Barrier` it can be aborted, so a
//! failed channel never leaves the others waiting forever.

use std::sync::{Condvar, Mutex};

pub(crate) struct RoundBarrier {
    parties: usize,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    arrived: usize,
    generation: u64,
    aborted: bool,
    /// What the first arrival of this generation said (whether the round is the last).
    last_round: Option<bool>,
}

/// Why a wait ended without the round completing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Aborted {
    /// Another part of the migration failed.
    Aborted,
    /// The parties disagree whether this round is the last.
    Disagree,
}

impl RoundBarrier {
    pub fn new(parties: usize) -> Self {
        RoundBarrier {
            parties,
            state: Mutex::new(State {
                arrived: 0,
                generation: 0,
                aborted: false,
                last_round: None,
            }),
            cv: Condvar::new(),
        }
    }

    /// Waits until all parties have arrived, or the barrier is aborted. Returns true for
    /// exactly one party per round: the last to arrive, which runs `last` before anyone
    /// leaves, so work done there happens while every party is inside the barrier.
    /// `last_round` is the party's view of whether this round is the migration's last: all
    /// must agree, or the barrier is aborted.
    pub fn wait(&self, last_round: bool, last: impl FnOnce()) -> Result<bool, Aborted> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.aborted {
            return Err(Aborted::Aborted);
        }
        if *s.last_round.get_or_insert(last_round) != last_round {
            s.aborted = true;
            self.cv.notify_all();
            return Err(Aborted::Disagree);
        }
        s.arrived += 1;
        if s.arrived == self.parties {
            last();
            s.last_round = None;
            s.arrived = 0;
            s.generation += 1;
            self.cv.notify_all();
            return Ok(true);
        }
        let gen = s.generation;
        while s.generation == gen && !s.aborted {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        if s.generation != gen {
            Ok(false)
        } else {
            Err(Aborted::Aborted)
        }
    }

    /// Wakes every waiter with an error, now and for every later wait.
    pub fn abort(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.aborted = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn nobody_passes_before_everyone_arrives() {
        let b = RoundBarrier::new(3);
        let passed = AtomicUsize::new(0);
        let leaders = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for round in 0..50 {
                        assert!(passed.load(Ordering::SeqCst) >= round * 3);
                        if b.wait(false, || {}).unwrap() {
                            leaders.fetch_add(1, Ordering::SeqCst);
                        }
                        passed.fetch_add(1, Ordering::SeqCst);
                        b.wait(false, || {}).unwrap();
                    }
                });
            }
        });
        assert_eq!(passed.load(Ordering::SeqCst), 150);
        assert_eq!(leaders.load(Ordering::SeqCst), 50, "one leader per round");
    }

    #[test]
    fn disagreeing_on_the_last_round_aborts() {
        let b = RoundBarrier::new(2);
        std::thread::scope(|s| {
            let h = s.spawn(|| b.wait(true, || {}));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(b.wait(false, || {}), Err(Aborted::Disagree));
            assert_eq!(h.join().unwrap(), Err(Aborted::Aborted));
        });
    }

    #[test]
    fn abort_releases_waiters() {
        let b = RoundBarrier::new(2);
        std::thread::scope(|s| {
            let h = s.spawn(|| b.wait(false, || {}));
            std::thread::sleep(std::time::Duration::from_millis(20));
            b.abort();
            assert!(h.join().unwrap().is_err());
        });
        assert!(b.wait(false, || {}).is_err());
    }
}
