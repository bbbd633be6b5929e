//! `livemig bench`: what a migration costs, measured with real two-process migrations.
//!
//! - [`ram`] (the default): RAM throughput and downtime for several channel counts, idle and
//!   dirtying, beside raw loopback TCP ([`raw_tcp`]);
//! - [`devices`] (`--mode devices`): downtime against VFIO-like device count, parallel against
//!   serial device state;
//! - [`tls`] (`--tls`): every RAM row over plain TCP and over TLS;
//! - [`suite`] (`--mode suite`): every benchmark in one run, as Markdown and JSON;
//! - [`file`] (`--mode file`): save and restore through a file beside the raw write and read
//!   rates of the same filesystem;
//! - [`peer`] (`--peer qemu`): livemig beside QEMU on the same guest and work.
//!
//! Shared: the options ([`args`]), one measured run and its typed row ([`run`]), and the
//! facts at the head of a table ([`run_facts`]). The modes depend on these, never on each
//! other, except the suite, which runs the device rows and the compression rates
//! ([`compress`]) among its sections.

mod args;
mod compress;
mod devices;
mod file;
mod netlink;
mod out;
mod peer;
mod ram;
mod raw_tcp;
mod run;
mod run_facts;
mod suite;
mod tls;

pub use args::BenchArgs;
use args::Mode;
use std::process::ExitCode;

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    if a.peer.peer.is_some() {
        return peer::run(&a);
    }
    if a.tls {
        return tls::run(&a);
    }
    if let Some(dir) = &a.report {
        crate::demo::prepare_report_dir(dir)?;
    }
    match a.mode {
        Mode::Devices => devices::run(&a),
        Mode::Suite => suite::run(a),
        Mode::Ram => ram::run(&a),
        Mode::File => file::run(&a),
    }
}
