//! Helpers of the fault suite (`faults_*.rs`): livemig processes inside or outside a network
//! namespace, a QMP-driven VM, what a process's /proc says about its threads and files, and
//! the checks every fault test ends with.
#![allow(dead_code)]

use crate::common::Proc;
use livemig_qmp::Client;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The tests of one file run one at a time: they time faults against real processes, and
/// the machine has 2 cores.
pub fn serial(m: &'static Mutex<()>) -> MutexGuard<'static, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `livemig ARGS`, run inside network namespace `netns` if given, its JSON lines read as
/// `Proc` does.
pub fn spawn_in(netns: Option<&str>, args: &[&str]) -> Proc {
    let bin = env!("CARGO_BIN_EXE_livemig");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    };
    cmd.args(args);
    Proc::start(cmd)
}

/// A `log` line of a destination whose message contains `words`, within `timeout`.
pub fn wait_log(p: &mut Proc, words: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = p
            .wait_within(&["log"], left)
            .unwrap_or_else(|e| panic!("waiting for a log with '{words}': {e}; {:#?}", p.seen));
        if v["msg"].as_str().unwrap_or("").contains(words) {
            return v;
        }
    }
}

/// `tcp:127.0.0.1:4444` (or `127.0.0.1:4444`) as a socket address.
pub fn sockaddr(endpoint: &str) -> SocketAddr {
    endpoint
        .strip_prefix("tcp:")
        .unwrap_or(endpoint)
        .parse()
        .unwrap_or_else(|e| panic!("'{endpoint}': {e}"))
}

/// A free loopback port (bound, then let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory of this test process for sockets.
pub fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lm-faults-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Thread names (comm) of process `pid`.
pub fn threads_of(pid: u32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                .map(|c| c.trim_end().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Open file descriptors of process `pid`.
pub fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Resident memory of process `pid`, bytes.
pub fn rss_of(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Threads of a migration, on either side: the engine's (`lm-src*`, `lm-dst*`) and the QMP
/// VM's migration thread (`lm-vm-migrate`, `lm-vm-incoming`).
pub fn migration_threads(pid: u32) -> Vec<String> {
    threads_of(pid)
        .into_iter()
        .filter(|t| t.starts_with("lm-src") || t.starts_with("lm-dst") || t.starts_with("lm-vm-"))
        .collect()
}

/// A process's threads and files at rest, to compare with after a fault.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub threads: Vec<String>,
    pub fds: usize,
    pub rss: u64,
}

impl Footprint {
    pub fn of(pid: u32) -> Footprint {
        Footprint {
            threads: threads_of(pid),
            fds: fds_of(pid),
            rss: rss_of(pid),
        }
    }

    /// Waits (up to 3 s, for exiting threads and closing sockets) until `pid` has no
    /// migration thread and no more threads or descriptors than this footprint, and fails
    /// naming what is left.
    pub fn assert_back(&self, pid: u32, what: &str) -> Footprint {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let now = Footprint::of(pid);
            let left = migration_threads(pid);
            let ok =
                left.is_empty() && now.threads.len() <= self.threads.len() && now.fds <= self.fds;
            if ok {
                return now;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: after the fault, migration threads {left:?}; threads {} (before {}): \
                     {:?}; fds {} (before {})",
                    now.threads.len(),
                    self.threads.len(),
                    now.threads,
                    now.fds,
                    self.fds
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A VM driven over QMP: `livemig run --qmp` (a source) or `livemig incoming --qmp`.
pub struct QmpVm {
    pub proc: Proc,
    pub client: Client,
    pub sock: PathBuf,
}

impl QmpVm {
    /// `livemig run --qmp SOCK ARGS` (a synthetic guest unless ARGS say otherwise).
    pub fn source(name: &str, args: &[&str]) -> QmpVm {
        let sock = tmp_dir(name).join("src.qmp");
        let mut a = vec!["run", "--guest=synthetic", "--qmp", sock.to_str().unwrap()];
        a.extend_from_slice(args);
        Self::spawn(&a, sock.clone())
    }

    /// `livemig incoming --qmp SOCK ARGS`, waiting for `migrate-incoming`.
    pub fn destination(name: &str, args: &[&str]) -> QmpVm {
        let sock = tmp_dir(name).join("dst.qmp");
        let mut a = vec!["incoming", "--qmp", sock.to_str().unwrap()];
        a.extend_from_slice(args);
        Self::spawn(&a, sock.clone())
    }

    fn spawn(args: &[&str], sock: PathBuf) -> QmpVm {
        let _ = std::fs::remove_file(&sock);
        let proc = Proc::spawn(args);
        let client = connect_qmp(&sock);
        QmpVm { proc, client, sock }
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    pub fn exec(&mut self, cmd: &str, args: Value) -> Value {
        self.client
            .execute(cmd, args)
            .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
    }

    pub fn run_state(&mut self) -> String {
        self.exec("query-status", json!({}))["status"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn query_migrate(&mut self) -> Value {
        self.exec("query-migrate", json!({}))
    }

    pub fn migrate(&mut self, uri: &str) {
        self.exec("migrate", json!({ "uri": uri }));
    }

    /// Polls `query-migrate` until the migration has ended (or `timeout`); returns its
    /// last answer.
    pub fn wait_end(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.query_migrate();
            match q["status"].as_str().unwrap_or("none") {
                "setup" | "active" | "cancelling" => {}
                _ => return q,
            }
            if Instant::now() > deadline {
                panic!("the migration did not end within {timeout:?}: {q:#}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `query-status` until the run state is `state` (or `timeout`).
    pub fn wait_run_state(&mut self, state: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.run_state();
            if s == state {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "run state '{s}', not '{state}', after {timeout:?}: {:#}",
                    self.query_migrate()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// `x-livemig-verify`.
    pub fn verify(&mut self) -> Value {
        self.exec("x-livemig-verify", json!({}))
    }

    /// The guest runs here with every page exact: run state `running`, every one of
    /// `pages` checked and right, and its write counter moving.
    pub fn assert_runs_exact(&mut self, pages: u64, what: &str) {
        assert_eq!(
            self.run_state(),
            "running",
            "{what}: the guest is not running"
        );
        let v1 = self.verify();
        assert_eq!(v1["pages-checked"], pages, "{what}: {v1:#}");
        assert_eq!(v1["pages-mismatched"], 0, "{what}: {v1:#}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let v2 = self.verify();
            assert_eq!(v2["pages-mismatched"], 0, "{what}: {v2:#}");
            if v2["counter"].as_u64() > v1["counter"].as_u64() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the guest's counter is stuck at {}",
                v2["counter"]
            );
        }
    }

    /// `quit`, and waits for the process to end.
    pub fn quit(mut self) {
        let _ = self.client.execute("quit", json!({}));
        let _ = self.proc.wait_exit();
    }
}

impl Drop for QmpVm {
    /// The socket's directory goes (the process, if still running, is killed by `Proc`).
    fn drop(&mut self) {
        if let Some(d) = self.sock.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn connect_qmp(path: &Path) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Client::connect(path, Duration::from_secs(60)) {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("QMP on {}: {e}", path.display()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A `livemig incoming --json` destination that must have refused the migration: it
/// prints `failed` with an error containing every one of `words` (within `timeout`), never
/// `received`, and exits with failure.
pub fn assert_destination_failed(dest: &mut Proc, words: &[&str], timeout: Duration) -> String {
    let f = dest
        .wait_within(&["failed", "received"], timeout)
        .unwrap_or_else(|e| panic!("destination: {e}; lines: {:#?}", dest.seen));
    assert_eq!(
        f["event"], "failed",
        "the destination resumed a guest it should have dropped: {f:#}"
    );
    let err = f["error"].as_str().unwrap().to_string();
    for w in words {
        assert!(
            err.contains(w),
            "destination error '{err}' should mention '{w}'"
        );
    }
    assert!(
        !dest.wait_exit().success(),
        "the destination exits with failure"
    );
    assert!(
        !dest.seen.iter().any(|v| v["event"] == "received"),
        "{:#?}",
        dest.seen
    );
    err
}

/// Every one of `words` is in `text`.
pub fn assert_mentions(text: &str, words: &[&str], what: &str) {
    for w in words {
        assert!(text.contains(w), "{what} '{text}' should mention '{w}'");
    }
}

/// Says a test was skipped, on stderr and in the file named by `LIVEMIG_SKIP_LOG` (which
/// `.ci/run` counts).
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let line = format!("{test}: SKIPPED ({reason})\n");
    eprint!("{line}");
    if let Some(path) = std::env::var_os("LIVEMIG_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write of the whole line, so concurrent tests' lines never interleave.
            let _ = f.write_all(line.as_bytes());
        }
    }
}
