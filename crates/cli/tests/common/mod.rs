//! Helpers for end-to-end tests: run `livemig` processes and read their JSON lines.
#![allow(dead_code)]

pub mod raw;
pub mod synthetic;

#[allow(unused_imports)]
pub use synthetic::{strs, synthetic_source, synthetic_source_args, synthetic_source_hooked};

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// A running `livemig` process whose stdout JSON lines arrive on a channel. Killed on drop.
pub struct Proc {
    pub child: Child,
    pub lines: Receiver<Value>,
    pub seen: Vec<Value>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_hooked(args, "")
    }

    /// [`Proc::spawn`] with the engine's test hooks (fault injection) set for the process:
    /// `hooks` as `LIVEMIG_TEST_HOOKS` spells them, e.g. `chunk-order=reverse`.
    pub fn spawn_hooked(args: &[&str], hooks: &str) -> Proc {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_livemig"));
        cmd.args(args);
        if !hooks.is_empty() {
            cmd.env(livemig_engine::config::test_hooks::TEST_HOOKS_ENV, hooks);
        }
        Proc::start(cmd)
    }

    /// Starts `cmd` (a livemig command line, maybe wrapped, e.g. in `ip netns exec`) with
    /// its stdout read as JSON lines onto `lines`.
    pub fn start(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start livemig");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str::<Value>(&line)
                    .unwrap_or_else(|_| panic!("livemig printed a line that is not JSON: {line}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// A destination listening on a free loopback port; returns it and its address.
    pub fn incoming(extra: &[&str]) -> (Proc, String) {
        Proc::incoming_hooked(extra, "")
    }

    /// [`Proc::incoming`] with test hooks (see [`Proc::spawn_hooked`]).
    pub fn incoming_hooked(extra: &[&str], hooks: &str) -> (Proc, String) {
        let mut args = vec!["incoming", "--listen=tcp:127.0.0.1:0", "--json"];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn_hooked(&args, hooks);
        let l = p.expect_event("listening");
        let addr = l["addr"].as_str().unwrap().to_string();
        (p, addr)
    }

    /// The next line with this event, failing on timeout or if the process ends first.
    pub fn expect_event(&mut self, event: &str) -> Value {
        self.wait_for(&[event]).unwrap_or_else(|e| {
            panic!("waiting for '{event}': {e}; lines so far: {:#?}", self.seen)
        })
    }

    pub fn wait_for(&mut self, events: &[&str]) -> Result<Value, String> {
        self.wait_within(events, TIMEOUT)
    }

    /// The next line with one of `events`, within `timeout`.
    pub fn wait_within(&mut self, events: &[&str], timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if events.contains(&v["event"].as_str().unwrap_or("")) {
                        return Ok(v);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("no {events:?} within {timeout:?}"))
                }
                Err(RecvTimeoutError::Disconnected) => return Err("process ended".into()),
            }
        }
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for livemig")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The KVM micro-VM of the end-to-end tests: 256 MiB, filled, a 16 MiB working set written
/// as fast as it can, after 200 ms of warm-up.
pub const KVM_GUEST: &[&str] = &[
    "--guest=kvm",
    "--memory=256M",
    "--fill=1",
    "--working-set=16M",
    "--dirty-rate=0",
    "--warmup-ms=200",
];

pub fn u64_at(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("{path:?} missing in {v:#}"))
}

/// The destination's `received` report: `pages` pages checked, none wrong, and the guest's
/// counter exactly where the source paused it (`paused_at`); then, after it ran there
/// (`--run-after-ms`), nothing wrong and the counter gone on.
pub fn expect_exact_arrival(dest: &mut Proc, pages: u64, paused_at: u64) {
    let recv = dest.expect_event("received");
    let v = &recv["report"]["verify"];
    assert_eq!(u64_at(v, &["pages_checked"]), pages);
    assert_eq!(u64_at(v, &["pages_mismatched"]), 0, "{v:#}");
    assert_eq!(
        u64_at(v, &["counter"]),
        paused_at,
        "the counter arrives exactly where it paused"
    );
    let after = dest.expect_event("after_run");
    assert_eq!(
        u64_at(&after["verify"], &["pages_mismatched"]),
        0,
        "{after:#}"
    );
    assert!(
        u64_at(&after["verify"], &["counter"]) > paused_at,
        "the guest runs on at the destination"
    );
}
