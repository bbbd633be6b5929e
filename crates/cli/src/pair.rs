//! Runs a destination and a source as two child processes of this one, and collects the
//! JSON lines they print. Used by `demo` and `bench`.

use crate::lines::{AfterRun, Completed, Received};
use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// A child process whose stdout lines arrive, parsed, on a channel.
pub struct JsonChild {
    pub child: Child,
    pub lines: Receiver<Value>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl JsonChild {
    pub fn spawn(args: &[String]) -> anyhow::Result<JsonChild> {
        let mut cmd = Command::new(livemig_exe()?);
        cmd.args(args);
        JsonChild::start(cmd, &format!("livemig {}", args.join(" ")))
    }

    /// Starts `cmd` (a livemig command line, maybe wrapped, e.g. in `ip netns exec`), its
    /// stdout read as JSON lines; `what` names it in errors.
    pub fn start(mut cmd: Command, what: &str) -> anyhow::Result<JsonChild> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("child has no stdout"))?;
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::Builder::new()
            .name("lm-child-reader".into())
            .spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            })?;
        Ok(JsonChild {
            child,
            lines: rx,
            reader: Some(reader),
        })
    }

    /// Waits for a line whose "event" is one of `events`; fails if the child ends first.
    pub fn wait_event(&self, events: &[&str], timeout: Duration) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if events.contains(&event_of(&v)) => return Ok(v),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => bail!("no {events:?} within {timeout:?}"),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the child process ended before reporting {events:?}")
                }
            }
        }
    }

    /// Waits for the process to exit.
    pub fn finish(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let status = self.child.wait()?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Ok(status)
    }
}

impl Drop for JsonChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// This executable, which the children run.
pub fn livemig_exe() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe().context("cannot find the livemig executable")
}

pub fn event_of(v: &Value) -> &str {
    v.get("event").and_then(Value::as_str).unwrap_or("")
}

/// The outcome of one two-process migration.
pub struct PairResult {
    /// The source's report (`completed` line).
    pub source: Completed,
    /// The destination's report (`received` line).
    pub dest: Received,
    /// The destination's check after running the guest (`after_run` line), if asked for.
    pub after_run: Option<AfterRun>,
}

/// One of the lines of [`crate::lines`], read as its type.
pub fn parse<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> anyhow::Result<T> {
    serde_json::from_value(v).with_context(|| format!("cannot read the {what} line"))
}

/// A Unix socket path of its own for a destination this process starts (local mode).
pub fn unix_listen_arg(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "livemig-{what}-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    format!("--listen=unix:{}", path.display())
}

/// Starts a destination, then a source migrating to it, passing every source line to
/// `on_line`; returns both reports.
pub fn run_pair(
    dest_args: &[String],
    source_args: &[String],
    mut on_line: impl FnMut(&Value),
) -> anyhow::Result<PairResult> {
    let mut dargs = vec!["incoming".to_string(), "--json".into()];
    // Loopback TCP unless the caller chose the address (a unix: one for local mode).
    if !dest_args.iter().any(|a| a.starts_with("--listen=")) {
        dargs.push("--listen=tcp:127.0.0.1:0".into());
    }
    dargs.extend_from_slice(dest_args);
    let dest = JsonChild::spawn(&dargs)?;
    let listening = dest.wait_event(&["listening"], Duration::from_secs(30))?;
    let addr = listening["addr"].as_str().unwrap_or_default().to_string();

    let mut sargs = vec![
        "migrate".to_string(),
        format!("--to={addr}"),
        "--json".into(),
    ];
    sargs.extend_from_slice(source_args);
    let source = JsonChild::spawn(&sargs)?;
    let mut outcome = None;
    for v in source.lines.iter() {
        on_line(&v);
        match event_of(&v) {
            "completed" => outcome = Some(Ok(v)),
            "failed" | "attempt_failed" => {
                outcome = Some(Err(anyhow!(
                    "{}",
                    v["error"].as_str().unwrap_or("migration failed")
                )));
                break;
            }
            _ => {}
        }
    }
    let source_report = match outcome {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(e),
        None => bail!("the source process ended without a report"),
    };
    source.finish()?;
    let received = dest.wait_event(&["received", "failed"], Duration::from_secs(60))?;
    if event_of(&received) == "failed" {
        bail!(
            "destination: {}",
            received["error"].as_str().unwrap_or("failed")
        );
    }
    let after_run = dest
        .wait_event(&["after_run"], Duration::from_secs(60))
        .ok();
    dest.finish()?;
    Ok(PairResult {
        source: parse("source's completed", source_report)?,
        dest: parse("destination's received", received)?,
        after_run: after_run.map(|v| parse("after_run", v)).transpose()?,
    })
}
