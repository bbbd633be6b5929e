//! The bench's child processes (QEMU and livemig) and the folder their sockets and logs live
//! in. A [`Proc`] is killed and reaped when dropped, and killed by the kernel if the bench
//! itself dies first; a [`WorkDir`] is removed when dropped. So whatever fails half-way, no
//! VM is left running and no socket or log is left behind.

use anyhow::Context;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A temporary folder for one migration's sockets and logs, removed on drop.
pub(super) struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    pub(super) fn new(label: &str) -> anyhow::Result<WorkDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Short: Unix socket paths are limited to 107 bytes.
        let path = std::env::temp_dir().join(format!("lm-peer-{}-{n}-{label}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create the work folder {}", path.display()))?;
        Ok(WorkDir { path })
    }

    pub(super) fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A child process: stdin closed, stdout and stderr into a log file of its own (read back
/// for error messages), killed and reaped on drop.
pub(super) struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// The guest's debug port output, where the VMM writes one.
    debug_log: Option<PathBuf>,
}

impl Proc {
    /// Starts `program args`, its output going to `log`. `name` says which process it is
    /// in errors ("QEMU source", "livemig destination"); `debug_log` is a file the guest's
    /// debug output goes to, also quoted in errors.
    pub(super) fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
        debug_log: Option<PathBuf>,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create the log file {}", log.display()))?;
        let err = out
            .try_clone()
            .context("cannot duplicate a log file handle")?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Killed if the bench dies, so no VM outlives it even on SIGKILL.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start the {name} ({})", program.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
            debug_log,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it has.
    pub(super) fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines it printed (and its guest's debug port's), for error messages.
    pub(super) fn log_tail(&self) -> String {
        let mut s = match tail(&self.log) {
            Some(t) => format!("its output ended with:\n  {t}"),
            None => "(it printed nothing)".into(),
        };
        if let Some(t) = self.debug_log.as_deref().and_then(tail) {
            s.push_str(&format!(
                "\n  the guest's debug port (0xe9) ended with:\n  {t}"
            ));
        }
        s
    }

    /// The first line of its output containing `marker`, if it has printed one.
    pub(super) fn log_line(&self, marker: &str) -> Option<String> {
        let text = std::fs::read(&self.log).ok()?;
        String::from_utf8_lossy(&text)
            .lines()
            .find(|l| l.contains(marker))
            .map(str::to_string)
    }

    /// An error saying what went wrong with this process, how it ended if it has, and the
    /// tail of its output.
    pub(super) fn failure(&mut self, what: impl std::fmt::Display) -> anyhow::Error {
        let ended = match self.exited() {
            Some(s) => format!(" (it exited: {s})"),
            None => String::new(),
        };
        anyhow::anyhow!("{} {what}{ended}; {}", self.name, self.log_tail())
    }

    /// Waits up to `timeout` for it to exit on its own (after QMP `quit`), then kills it.
    pub(super) fn finish(mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None // dropped: killed and reaped
    }
}

/// The last lines of a file, or `None` if it is missing or blank.
fn tail(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
    (!tail.trim().is_empty()).then_some(tail)
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
