//! `livemig`: the command line.
//!
//! - `demo`: a destination and a source as two processes on loopback, a 1 GiB guest, a live
//!   progress bar, and a summary that says whether every page arrived exact.
//! - `bench`: RAM throughput and downtime for 1, 2, 4 and 8 channels beside raw loopback TCP;
//!   `bench --peer qemu`: livemig beside QEMU on the same guest image and work.
//! - `migrate` / `incoming`: the two sides, for scripts and tests (`--json` prints one JSON
//!   object per line).
//! - `run --qmp` / `incoming --qmp`: a VM driven over QMP (`machine`), and `status`, which
//!   watches its migration.

mod args;
mod bench;
mod child_args;
mod demo;
mod devices;
mod file;
mod guest;
mod guest_image;
mod incoming;
mod lines;
mod machine;
mod migrate;
mod pair;
mod procstat;
mod progress;
mod run;
mod status;
mod tls;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "livemig",
    version,
    about = "Live migration of virtual machines over parallel channels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Migrate a dirtying 1 GiB guest between two local processes and check every page.
    Demo(demo::DemoArgs),
    /// Measure throughput and downtime against channel count, beside raw loopback TCP.
    Bench(bench::BenchArgs),
    /// Run a guest and migrate it to a destination (the source side).
    Migrate(migrate::MigrateArgs),
    /// Wait for one incoming migration, resume the guest it brings (the destination side).
    Incoming(incoming::IncomingArgs),
    /// Start a guest and watch it run, or serve QMP for it (`--qmp`).
    Run(run::RunArgs),
    /// Show a VM's migration over its QMP socket, with a live progress bar while it runs.
    Status(status::StatusArgs),
    /// Write livemig's guest image (a PVH kernel, bootable by QEMU) to a file.
    GuestImage(guest_image::GuestImageArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Migrate(a) => migrate::run(a),
        Command::Incoming(a) => incoming::run(a),
        Command::Run(a) => run::run(a),
        Command::Status(a) => status::run(a),
        Command::GuestImage(a) => guest_image::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("livemig: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, each cause once: livemig's own errors already show their
/// source in their message, so a cause already said is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg
}

/// The test hooks this process was started with (`LIVEMIG_TEST_HOOKS`; none in a release
/// build, where setting it is an error).
fn test_hooks() -> anyhow::Result<livemig_engine::config::test_hooks::Hooks> {
    livemig_engine::config::test_hooks::Hooks::from_env().map_err(anyhow::Error::msg)
}

/// Prints one JSON object as a line on stdout.
fn emit(v: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let e = anyhow::Error::new(livemig_engine::ChannelError::Io {
            channel: livemig_engine::ChannelName::Main,
            op: "send",
            source: io,
        });
        let chain = super::error_chain(&e);
        assert_eq!(chain.matches("reset by peer").count(), 1, "{chain}");
        let e = anyhow::anyhow!("inner cause").context("outer");
        assert_eq!(super::error_chain(&e), "outer: inner cause");
    }
}
