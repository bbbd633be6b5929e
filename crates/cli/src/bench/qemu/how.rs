//! How a run was made: the facts at the head of the table (command, commit, build, CPU,
//! kernel, date, load), read by `run_facts` as `bench --mode suite` reads them.

use super::super::run_facts;
use serde_json::{json, Value};

/// The facts a reader needs to repeat a run.
pub(super) struct HowRun {
    command: String,
    build: &'static str,
    commit: String,
    cpu_model: String,
    cpus: usize,
    memory_gib: f64,
    kernel: String,
    date: String,
    load_start: String,
}

impl HowRun {
    pub(super) fn collect() -> HowRun {
        let host = run_facts::Host::read();
        HowRun {
            command: run_facts::command_line(),
            build: run_facts::build(),
            commit: run_facts::commit(),
            cpu_model: host.cpu_model,
            cpus: host.cpus,
            memory_gib: host.memory_gib,
            kernel: host.kernel,
            date: run_facts::utc_now(),
            load_start: run_facts::load_average(),
        }
    }

    /// One paragraph for the head of the table.
    pub(super) fn line(&self) -> String {
        format!(
            "Run: `{}` ({}, commit {}) on {}, {} logical CPUs, {:.0} GiB RAM, Linux {}, {}; \
             load average at the start {}.",
            self.command,
            self.build,
            self.commit,
            self.cpu_model,
            self.cpus,
            self.memory_gib,
            self.kernel,
            self.date,
            self.load_start,
        )
    }

    pub(super) fn json(&self) -> Value {
        json!({
            "command": self.command,
            "build": self.build,
            "commit": self.commit,
            "cpu_model": self.cpu_model,
            "logical_cpus": self.cpus,
            "memory_gib": self.memory_gib,
            "kernel": self.kernel,
            "date": self.date,
            "load_average_start": self.load_start,
        })
    }
}
