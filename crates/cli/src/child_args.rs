//! Options handed on to a child process (`demo` and `bench` start `livemig migrate` and
//! `livemig incoming`) as the command line that parses back to the same options.
//!
//! A flag's name and how it takes its value are said once, in the clap-derived struct: an
//! options struct derives `Serialize` beside `clap::Args` and implements [`ToArgs`], and
//! [`to_args`] walks clap's own definition of the struct's arguments (in their order), writing
//! each field serde gives under the argument's id (the field's name, as clap derives it) with
//! the argument's `--long` name: `--flag=value`, a `SetTrue` flag alone when true, a list as
//! the flag repeated, `None` left out. A field that must not be handed on, or not this way,
//! is `#[serde(skip)]` and written by hand. The tests parse the arguments back and compare,
//! so an option the child would not receive fails them.

use clap::builder::ArgAction;
use serde::{Serialize, Serializer};
use serde_json::Value;
use std::path::PathBuf;

/// Options that can be handed on to a child process.
pub trait ToArgs: Serialize + clap::Args {
    /// The same options as command-line arguments.
    fn to_args(&self) -> Vec<String> {
        to_args(self)
    }
}

/// `x` as command-line arguments: see the module's documentation.
pub fn to_args<T: Serialize + clap::Args>(x: &T) -> Vec<String> {
    let cmd = T::augment_args(clap::Command::new("child"));
    let fields = match serde_json::to_value(x) {
        Ok(Value::Object(fields)) => fields,
        other => panic!("options serialize as a map of fields, not {other:?}"),
    };
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        let (Some(value), Some(long)) = (fields.get(arg.get_id().as_str()), arg.get_long()) else {
            continue;
        };
        match value {
            Value::Null => {}
            Value::Bool(true) if matches!(arg.get_action(), ArgAction::SetTrue) => {
                out.push(format!("--{long}"))
            }
            Value::Bool(false) if matches!(arg.get_action(), ArgAction::SetTrue) => {}
            Value::Array(items) => {
                out.extend(items.iter().map(|v| format!("--{long}={}", text(v))))
            }
            v => out.push(format!("--{long}={}", text(v))),
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Serializes a value of a `clap::ValueEnum` as clap spells it on the command line.
pub fn value_enum<T: clap::ValueEnum, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    let name = v
        .to_possible_value()
        .map(|p| p.get_name().to_string())
        .unwrap_or_default();
    s.serialize_str(&name)
}

/// Serializes a path as it displays (lossy where it is not UTF-8).
pub fn path<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.serialize_str(&p.display().to_string()),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use crate::args::{GuestArgs, MigrationArgs};
    use crate::child_args::ToArgs;
    use crate::tls::TlsArgs;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Migration {
        #[command(flatten)]
        m: MigrationArgs,
    }

    #[derive(Parser, Debug)]
    struct Guest {
        #[command(flatten)]
        g: GuestArgs,
    }

    #[derive(Parser, Debug)]
    struct Tls {
        #[command(flatten)]
        t: TlsArgs,
    }

    fn line(args: &[&str]) -> Vec<String> {
        std::iter::once("livemig")
            .chain(args.iter().copied())
            .map(String::from)
            .collect()
    }

    /// Parses `args`, hands the options on, parses that back: the same options.
    fn round_trip<P: Parser + std::fmt::Debug, T: ToArgs + std::fmt::Debug>(
        args: &[&str],
        inner: fn(&P) -> &T,
    ) {
        let first = P::parse_from(line(args));
        let handed_on = inner(&first).to_args();
        let again = P::try_parse_from(line(&[]).into_iter().chain(handed_on.clone()))
            .unwrap_or_else(|e| panic!("{handed_on:?} does not parse: {e}"));
        assert_eq!(
            format!("{:?}", inner(&first)),
            format!("{:?}", inner(&again)),
            "{args:?} handed on as {handed_on:?}"
        );
    }

    #[test]
    fn migration_options_reach_the_child() {
        let m: fn(&Migration) -> &MigrationArgs = |p| &p.m;
        round_trip(&[], m);
        round_trip(
            &[
                "--channels=8",
                "--downtime-limit-ms=50",
                "--max-bandwidth=500M",
                "--max-rounds=3",
                "--max-precopy-secs=9",
                "--auto-converge=false",
                "--on-no-convergence=cancel",
                "--page-checksums=true",
                "--compress=zstd",
                "--compress-level=-3",
                "--pages-per-packet=64",
                "--device-state-transfer=main",
                "--chunk-size=2M",
                "--credit-window=7",
                "--buffer-cap=64M",
                "--peer-timeout-ms=1234",
                "--switchover-timeout-ms=2345",
                "--connect-timeout-ms=3456",
                "--local",
                "--tls-cert=/c.pem",
                "--tls-key=/k.pem",
                "--tls-ca=/ca.pem",
                "--tls-server-name=peer",
            ],
            m,
        );
        round_trip(&["--compress=none"], m);
    }

    #[test]
    fn guest_options_reach_the_child() {
        let g: fn(&Guest) -> &GuestArgs = |p| &p.g;
        round_trip(&["--guest=synthetic"], g);
        round_trip(
            &[
                "--guest=kvm",
                "--memory=256M",
                "--fill=0.5",
                "--working-set=16M",
                "--dirty-rate=10k",
                "--vcpus=3",
                "--warmup-ms=10",
                "--device=vfio-sim,size=16M,rate=100M",
                "--device=vmstate-sim",
                "--kernel=/boot/k.elf",
                "--append=fill=1M ws=0",
            ],
            g,
        );
    }

    #[test]
    fn tls_options_reach_the_child() {
        let t: fn(&Tls) -> &TlsArgs = |p| &p.t;
        round_trip(&[], t);
        round_trip(&["--tls-cert=/c", "--tls-key=/k", "--tls-ca=/a"], t);
    }
}
