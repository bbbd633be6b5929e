//! How the suite was run: the run's facts ([`RunFacts`]) and the guest it used.

use crate::bench::run_facts::RunFacts;
use crate::guest::GuestChoice;
use serde_json::{json, Value};

/// The facts a reader needs to repeat a run.
pub(super) struct HowRun {
    facts: RunFacts,
    pub guest: &'static str,
    guest_why: &'static str,
}

impl HowRun {
    pub(super) fn collect(guest: GuestChoice) -> HowRun {
        HowRun {
            facts: RunFacts::collect(),
            guest: guest.name(),
            guest_why: match (guest, guest.resolve()) {
                (GuestChoice::Auto, GuestChoice::Kvm) => "auto: /dev/kvm is usable",
                (GuestChoice::Auto, _) => "auto: no usable /dev/kvm",
                _ => "chosen with --guest",
            },
        }
    }

    /// One line for the head of every table.
    pub(super) fn line(&self) -> String {
        self.facts
            .line(&format!("{} guest ({}); ", self.guest, self.guest_why))
    }

    pub(super) fn json(&self) -> Value {
        let mut v = self.facts.json();
        v["guest"] = json!(self.guest);
        v["guest_why"] = json!(self.guest_why);
        v
    }
}
