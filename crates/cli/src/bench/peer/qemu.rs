//! QEMU as the peer: finding it, checking it can use KVM, and its command lines.
//!
//! Both sides run the same machine: `qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities
//! -m SIZE -nodefaults -nographic -kernel IMAGE -append ARGS`, the console (COM1) and QMP on
//! Unix sockets, the guest's debug port 0xe9 into a file. On these hosts `-cpu host` alone
//! aborts writing MSR 0x10a, hence `-arch-capabilities`. The source starts paused (`-S`) so
//! the bench is on the console before the guest's first line; the destination waits with
//! `-incoming defer`, and a "prepared" one allocates and touches all guest memory at start-up
//! (`-mem-prealloc`). `-name ...,debug-threads=on` names the vCPU threads (`CPU 0/KVM`), so
//! the destination's CPU time can be told apart from its guest's; it changes nothing else.

use super::proc::WorkDir;
use super::vm::Launch;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A QEMU that can run the peer side here.
#[derive(Debug, Clone)]
pub(super) struct Qemu {
    pub(super) program: PathBuf,
    /// `QEMU emulator version ...`, first line of `--version`.
    pub(super) version: String,
}

/// The program: `LIVEMIG_QEMU` if set, else `qemu-system-x86_64` on the PATH.
fn program() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LIVEMIG_QEMU") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

impl Qemu {
    /// Finds QEMU and checks it starts with KVM here; `Err` says why it cannot be the peer.
    pub(super) fn find() -> Result<Qemu, String> {
        let program = program().ok_or("qemu-system-x86_64 is not installed (not on the PATH)")?;
        let out = Command::new(&program)
            .arg("--version")
            .output()
            .map_err(|e| format!("{} does not run: {e}", program.display()))?;
        let version = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("unknown version")
            .to_string();
        // An empty machine with KVM: starts in milliseconds, says whether KVM is on.
        let mut child = Command::new(&program)
            .args([
                "-accel",
                "kvm",
                "-M",
                "none",
                "-nodefaults",
                "-display",
                "none",
            ])
            .args(["-qmp", "stdio"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{} does not start: {e}", program.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(
                br#"{"execute":"qmp_capabilities"}{"execute":"query-kvm"}{"execute":"quit"}"#,
            );
        }
        let out = child
            .wait_with_output()
            .map_err(|e| format!("{}: {e}", program.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains(r#""enabled": true"#) {
            return Err(format!(
                "{} cannot use KVM here ({}): {}",
                program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Qemu { program, version })
    }

    /// The arguments both sides share; `role` (`src`, `dst`) names their files in `dir`.
    fn common(
        &self,
        dir: &WorkDir,
        role: &str,
        image: &Path,
        append: &str,
        memory: u64,
    ) -> Vec<String> {
        let s = |x: &str| x.to_string();
        let unix = |name: &str| {
            format!(
                "unix:{},server=on,wait=off",
                dir.join(&format!("{role}.{name}")).display()
            )
        };
        vec![
            s("-accel"),
            s("kvm"),
            s("-cpu"),
            s("host,-arch-capabilities"),
            s("-m"),
            format!("{}M", memory >> 20),
            s("-nodefaults"),
            s("-nographic"),
            s("-name"),
            s("livemig-peer,debug-threads=on"),
            s("-kernel"),
            image.display().to_string(),
            s("-append"),
            s(append),
            s("-serial"),
            unix("serial"),
            s("-qmp"),
            unix("qmp"),
            s("-debugcon"),
            format!("file:{}", dir.join(&format!("{role}.debugcon")).display()),
            s("-global"),
            s("isa-debugcon.iobase=0xe9"),
        ]
    }

    /// The source: boots `image` paused; the bench lets it run once on its console.
    pub(super) fn source(&self, dir: &WorkDir, image: &Path, append: &str, memory: u64) -> Launch {
        let mut args = self.common(dir, "src", image, append, memory);
        args.push("-S".into());
        self.launch("QEMU source", dir, "src", args)
    }

    /// The destination: `-incoming defer`, with `-mem-prealloc` when `prepared`.
    pub(super) fn destination(
        &self,
        dir: &WorkDir,
        image: &Path,
        append: &str,
        memory: u64,
        prepared: bool,
    ) -> Launch {
        let mut args = self.common(dir, "dst", image, append, memory);
        args.extend(["-incoming".into(), "defer".into()]);
        if prepared {
            args.push("-mem-prealloc".into());
        }
        self.launch("QEMU destination", dir, "dst", args)
    }

    fn launch(&self, name: &str, dir: &WorkDir, role: &str, args: Vec<String>) -> Launch {
        Launch {
            name: name.into(),
            program: self.program.clone(),
            args,
            qmp: dir.join(&format!("{role}.qmp")),
            serial: Some(dir.join(&format!("{role}.serial"))),
            log: dir.join(&format!("{role}.log")),
            debug_log: Some(dir.join(&format!("{role}.debugcon"))),
            paused: role == "src",
        }
    }
}
