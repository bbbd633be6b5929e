//! A VMM process the bench drives, QEMU or livemig alike: the process, its QMP connection and,
//! when the guest's serial console can be reached, that console.

use super::proc::Proc;
use super::serial::Serial;
use livemig_qmp::Client;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a VMM may take to serve QMP (QEMU's `-mem-prealloc` faults the whole guest in
/// before it greets) and to answer a command.
const QMP_TIMEOUT: Duration = Duration::from_secs(120);

/// How to start one VMM process.
pub(super) struct Launch {
    /// Which process, in messages: "QEMU source", "livemig destination".
    pub(super) name: String,
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) qmp: PathBuf,
    /// The guest's serial console as a Unix socket, where the VMM has one.
    pub(super) serial: Option<PathBuf>,
    /// Its output.
    pub(super) log: PathBuf,
    /// Where the guest's debug port output goes, if anywhere.
    pub(super) debug_log: Option<PathBuf>,
    /// Started with the guest paused (QEMU's `-S`): the bench connects to the console, then
    /// sends `cont`, so it cannot miss the guest's first lines.
    pub(super) paused: bool,
}

/// A running VMM.
pub(super) struct Vm {
    pub(super) proc: Proc,
    qmp: Client,
    pub(super) serial: Option<Serial>,
}

impl Vm {
    /// Starts the process and connects to its QMP socket and console; a paused guest is
    /// then let run.
    pub(super) fn start(l: Launch) -> anyhow::Result<Vm> {
        let mut proc = Proc::spawn(&l.name, &l.program, &l.args, l.log, l.debug_log)?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        let qmp = loop {
            if proc.exited().is_some() {
                return Err(proc.failure("ended before serving QMP"));
            }
            if l.qmp.exists() {
                match Client::connect(&l.qmp, QMP_TIMEOUT) {
                    Ok(c) => break c,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(proc.failure(format_args!(
                            "did not serve QMP on {}: {e}",
                            l.qmp.display()
                        )))
                    }
                    Err(_) => {}
                }
            } else if Instant::now() >= deadline {
                return Err(proc.failure(format_args!(
                    "made no QMP socket at {} within {QMP_TIMEOUT:?}",
                    l.qmp.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let serial = match &l.serial {
            Some(path) => Some(
                Serial::connect(path, Duration::from_secs(10))
                    .map_err(|e| proc.failure(format_args!("console: {e:#}")))?,
            ),
            None => None,
        };
        let mut vm = Vm { proc, qmp, serial };
        if l.paused {
            vm.execute("cont", serde_json::json!({}))?;
        }
        Ok(vm)
    }

    pub(super) fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Runs a QMP command; an error names the process and the command, and includes the
    /// process's last output if it has died.
    pub(super) fn execute(&mut self, command: &str, args: Value) -> anyhow::Result<Value> {
        match self.qmp.execute(command, args) {
            Ok(v) => Ok(v),
            Err(e) => Err(self
                .proc
                .failure(format_args!("refused or failed QMP '{command}': {e}"))),
        }
    }

    /// Sends `quit` and waits a little for the process to exit; killed otherwise (and on
    /// any error before this, when dropped).
    pub(super) fn quit(mut self) {
        let _ = self.qmp.execute("quit", serde_json::json!({}));
        self.proc.finish(Duration::from_secs(5));
    }
}
