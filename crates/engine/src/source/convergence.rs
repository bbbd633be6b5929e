//! When precopy ends: the switchover decision (converged, with polishing rounds) and
//! auto-converge's throttle. Pure functions of the rounds' reports.

use crate::report::RoundReport;

/// Rounds run past the point where the rest would fit the downtime limit, at most.
const MAX_POLISH_ROUNDS: u32 = 8;
/// Expected downtime below which another round is not worth its fixed cost, milliseconds.
const POLISH_FLOOR_MS: f64 = 1.0;

/// Whether to switch over after the round `r`: once the rest would move within the downtime
/// limit, and another round would not at least halve it. A round that halves what is left
/// costs a few milliseconds of precopy (the guest runs) and takes as much off the downtime
/// (the guest is paused), so the downtime approaches the switchover's fixed cost rather than
/// the working set's last pass (QEMU switches over as soon as the rest fits). `polish`
/// counts the rounds run past the limit; at most [`MAX_POLISH_ROUNDS`].
pub(super) fn switch_now(r: &RoundReport, limit_ms: f64, polish: &mut u32) -> bool {
    if r.expected_downtime_ms > limit_ms {
        return false;
    }
    let halves = r.dirty_after * 2 < r.pages;
    if !halves || r.expected_downtime_ms < POLISH_FLOOR_MS || *polish >= MAX_POLISH_ROUNDS {
        return true;
    }
    *polish += 1;
    false
}

/// Auto-converge's state: QEMU's rule, a round whose dirtying reached half of what it sent
/// counts as not shrinking; two such rounds in a row raise the throttle a step.
pub(super) struct AutoConverge {
    pub enabled: bool,
    /// The throttle now, percent.
    pub throttle: u8,
    /// Rounds in a row that did not shrink.
    high: u32,
}

impl AutoConverge {
    pub fn new(enabled: bool) -> Self {
        AutoConverge {
            enabled,
            throttle: 0,
            high: 0,
        }
    }

    /// The throttle the next round should run at, if it changes.
    pub fn after_round(&mut self, r: &RoundReport) -> Option<u8> {
        if !self.enabled {
            return None;
        }
        if r.dirty_after * 2 >= r.pages.max(1) {
            self.high += 1;
        } else {
            self.high = 0;
        }
        if self.high < 2 || self.throttle >= crate::config::THROTTLE_MAX {
            return None;
        }
        self.high = 0;
        Some(if self.throttle == 0 {
            crate::config::THROTTLE_INITIAL
        } else {
            self.throttle
                .saturating_add(crate::config::THROTTLE_STEP)
                .min(crate::config::THROTTLE_MAX)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{switch_now, MAX_POLISH_ROUNDS};
    use crate::report::RoundReport;

    fn round(pages: u64, dirty_after: u64, expected_downtime_ms: f64) -> RoundReport {
        RoundReport {
            pages,
            dirty_after,
            expected_downtime_ms,
            ..Default::default()
        }
    }

    #[test]
    fn over_the_limit_never_switches() {
        let mut polish = 0;
        assert!(!switch_now(&round(1000, 900, 500.0), 300.0, &mut polish));
        assert_eq!(polish, 0);
    }

    #[test]
    fn under_the_limit_a_round_that_halves_the_rest_is_run() {
        let mut polish = 0;
        // 64 MiB left of a 1.5 GiB first round: fits, but another round halves it.
        assert!(!switch_now(
            &round(393_216, 16_384, 32.0),
            300.0,
            &mut polish
        ));
        assert_eq!(polish, 1);
        // The rest stopped halving: switch.
        assert!(switch_now(&round(400, 300, 1.5), 300.0, &mut polish));
    }

    #[test]
    fn a_rest_below_the_floor_or_an_idle_guest_switches_at_once() {
        let mut polish = 0;
        assert!(switch_now(&round(393_216, 0, 0.0), 300.0, &mut polish));
        assert!(switch_now(&round(1000, 10, 0.5), 300.0, &mut polish));
        assert_eq!(polish, 0);
    }

    #[test]
    fn polishing_is_bounded() {
        let mut polish = 0;
        let r = round(1000, 100, 50.0);
        let extra = (0..100)
            .take_while(|_| !switch_now(&r, 300.0, &mut polish))
            .count();
        assert_eq!(extra as u32, MAX_POLISH_ROUNDS);
    }
}
