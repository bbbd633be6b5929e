//! The source's view of the destination's credit: per device, the chunk indices it may send
//! (`idx < up_to`). A device's save job waits here before sending a chunk outside its
//! window; the return-path thread raises `up_to` as Credit frames arrive.

use std::sync::{Condvar, Mutex};

pub(crate) struct CreditTable {
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    up_to: Vec<u32>,
    aborted: bool,
}

/// Waiting ended because the migration is being torn down.
#[derive(Debug)]
pub(crate) struct Aborted;

impl CreditTable {
    /// Every device starts with `window` chunks of credit.
    pub fn new(devices: usize, window: u32) -> Self {
        CreditTable {
            state: Mutex::new(State {
                up_to: vec![window; devices],
                aborted: false,
            }),
            cv: Condvar::new(),
        }
    }

    /// Blocks until chunk `idx` of `device` is inside the window.
    pub fn wait(&self, device: usize, idx: u32) -> Result<(), Aborted> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.aborted {
                return Err(Aborted);
            }
            if idx < s.up_to[device] {
                return Ok(());
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The device's current credit limit: chunks idx < up_to may be sent.
    #[cfg(feature = "test-hooks")]
    pub fn up_to(&self, device: usize) -> u32 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).up_to[device]
    }

    /// Raises a device's window (credit never shrinks). False for an unknown device.
    pub fn grant(&self, device: usize, up_to: u32) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = s.up_to.get_mut(device) else {
            return false;
        };
        if up_to > *slot {
            *slot = up_to;
            self.cv.notify_all();
        }
        true
    }

    /// Wakes every waiter with an error.
    pub fn abort(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.aborted = true;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_credit_and_aborts() {
        let t = CreditTable::new(2, 2);
        assert!(t.wait(0, 1).is_ok());
        std::thread::scope(|s| {
            let h = s.spawn(|| t.wait(1, 5));
            std::thread::sleep(std::time::Duration::from_millis(10));
            assert!(t.grant(1, 6));
            assert!(h.join().unwrap().is_ok());
            let h = s.spawn(|| t.wait(0, 9));
            std::thread::sleep(std::time::Duration::from_millis(10));
            t.abort();
            assert!(h.join().unwrap().is_err());
        });
        assert!(!t.grant(7, 1));
    }
}
