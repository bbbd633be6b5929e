//! A link between two network namespaces joined by a veth pair, capped on the source's side
//! by a token bucket (`tc qdisc ... tbf`), and a two-process migration across it (the source
//! in one namespace, the destination in the other), as `crates/cli/tests/faults_netns.rs`
//! builds its links. Needs root, `ip`, `tc` and network namespaces; [`NetLink::new`] says why
//! not when it cannot.

use crate::pair::{event_of, livemig_exe, parse, JsonChild, PairResult};
use anyhow::bail;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The full path of `tool`, from PATH or the sbin directories.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a command to its end; its stderr on failure.
fn run(cmd: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", cmd.display()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {}: {}",
            cmd.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces joined by a veth pair, the source's side (`a`, 10.78.0.1) capped; the
/// destination's (`b`) holds 10.78.0.2. Both go, the veth pair with them, when dropped.
pub(crate) struct NetLink {
    ip: PathBuf,
    a: String,
    b: String,
    addr_b: String,
}

impl NetLink {
    /// The link, its source's side capped at `rate` (tc's spelling: `1gbit`), or why it
    /// cannot be made here.
    pub(crate) fn new(rate: &str) -> Result<NetLink, String> {
        let ip = tool("ip").ok_or("no 'ip' command (iproute2)")?;
        let tc = tool("tc").ok_or("no 'tc' command (iproute2)")?;
        let pid = std::process::id();
        let link = NetLink {
            a: format!("lmb{pid}a"),
            b: format!("lmb{pid}b"),
            addr_b: "10.78.0.2".into(),
            ip: ip.clone(),
        };
        let (dev_a, dev_b) = (
            format!("lmb{}a", pid % 1_000_000),
            format!("lmb{}b", pid % 1_000_000),
        );
        // Namespaces first: from here on, dropping `link` removes whatever was made.
        run(&ip, &["netns", "add", &link.a])
            .map_err(|e| format!("cannot create network namespaces: {e}"))?;
        run(&ip, &["netns", "add", &link.b])?;
        run(
            &ip,
            &[
                "link", "add", &dev_a, "netns", &link.a, "type", "veth", "peer", "name", &dev_b,
                "netns", &link.b,
            ],
        )?;
        for (ns, dev, addr) in [
            (&link.a, &dev_a, "10.78.0.1"),
            (&link.b, &dev_b, "10.78.0.2"),
        ] {
            run(
                &ip,
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            run(&ip, &["-n", ns, "link", "set", dev, "up"])?;
            run(&ip, &["-n", ns, "link", "set", "lo", "up"])?;
        }
        let tc = tc.to_str().ok_or("tc's path is not UTF-8")?;
        run(
            &ip,
            &[
                "netns", "exec", &link.a, tc, "qdisc", "add", "dev", &dev_a, "root", "tbf", "rate",
                rate, "burst", "512kb", "latency", "50ms",
            ],
        )?;
        Ok(link)
    }

    /// `livemig ARGS` inside namespace `ns` (`ip netns exec` runs it in its own place: the
    /// pid is livemig's), its JSON lines read.
    fn spawn(&self, ns: &str, args: &[String]) -> anyhow::Result<JsonChild> {
        let mut cmd = Command::new(&self.ip);
        cmd.args(["netns", "exec", ns])
            .arg(livemig_exe()?)
            .args(args);
        JsonChild::start(cmd, &format!("livemig {} in {ns}", args.join(" ")))
    }

    /// A destination in `b` (with `dest_args`), then a source in `a` migrating to it (with
    /// `source_args`); both reports.
    pub(crate) fn run_pair(
        &self,
        dest_args: &[String],
        source_args: &[String],
    ) -> anyhow::Result<PairResult> {
        let mut dargs = vec![
            "incoming".to_string(),
            "--json".into(),
            format!("--listen=tcp:{}:0", self.addr_b),
        ];
        dargs.extend_from_slice(dest_args);
        let dest = self.spawn(&self.b, &dargs)?;
        let listening = dest.wait_event(&["listening"], Duration::from_secs(30))?;
        let addr = listening["addr"].as_str().unwrap_or_default().to_string();
        let mut sargs = vec![
            "migrate".to_string(),
            format!("--to={addr}"),
            "--json".into(),
        ];
        sargs.extend_from_slice(source_args);
        let source = self.spawn(&self.a, &sargs)?;
        let done = source.wait_event(
            &["completed", "failed", "attempt_failed"],
            Duration::from_secs(600),
        )?;
        if event_of(&done) != "completed" {
            bail!("{}", done["error"].as_str().unwrap_or("migration failed"));
        }
        source.finish()?;
        let received = dest.wait_event(&["received", "failed"], Duration::from_secs(60))?;
        if event_of(&received) == "failed" {
            bail!(
                "destination: {}",
                received["error"].as_str().unwrap_or("failed")
            );
        }
        dest.finish()?;
        Ok(PairResult {
            source: parse("completed", done)?,
            dest: parse("received", received)?,
            after_run: None,
        })
    }
}

impl Drop for NetLink {
    fn drop(&mut self) {
        // Those made only (`ip netns add` names them under /run/netns).
        let made = [&self.a, &self.b].map(|ns| (ns, Path::new("/run/netns").join(ns).exists()));
        for ns in made.iter().filter(|(_, m)| *m).map(|(ns, _)| ns) {
            if let Err(e) = run(&self.ip, &["netns", "del", ns]) {
                eprintln!("removing network namespace {ns}: {e}");
            }
        }
    }
}
