//! The QMP suite in `tests/qmp/`, run with Python's `qemu.qmp` library from PyPI: livemig
//! driven by an independent client, as a QEMU user drives QEMU.
//!
//! The Python comes from `LIVEMIG_QMP_PYTHON` (`.ci/run` makes a virtualenv and sets it);
//! without it, from a virtualenv this test makes under `target/qmp-venv` (once). Where
//! neither can be had (no python3, no PyPI), the test says SKIPPED and adds a line to
//! `LIVEMIG_SKIP_LOG`, which `.ci/run` prints.

use std::path::{Path, PathBuf};
use std::process::Command;

const QEMU_QMP: &str = "qemu.qmp==0.0.6";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn has_qemu_qmp(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import qemu.qmp"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A Python that can `import qemu.qmp`, or why there is none.
fn python() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("LIVEMIG_QMP_PYTHON") {
        let p = PathBuf::from(p);
        return if has_qemu_qmp(&p) {
            Ok(p)
        } else {
            Err(format!(
                "LIVEMIG_QMP_PYTHON={} cannot import qemu.qmp",
                p.display()
            ))
        };
    }
    let venv = workspace().join("target/qmp-venv");
    let py = venv.join("bin/python");
    if has_qemu_qmp(&py) {
        return Ok(py);
    }
    let run = |cmd: &mut Command| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(&py).args(["-m", "pip", "install", "-q", QEMU_QMP]))?;
    Ok(py)
}

fn skip(why: &str) {
    let line = format!("qmp_python: SKIPPED ({why})\n");
    eprint!("{line}");
    if let Some(path) = std::env::var_os("LIVEMIG_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}

#[test]
fn qemu_qmp_client_suite() {
    let py = match python() {
        Ok(p) => p,
        Err(why) => return skip(&format!("no Python with qemu.qmp: {why}")),
    };
    let out = Command::new(&py)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(workspace().join("tests/qmp"))
        .env("LIVEMIG_BIN", env!("CARGO_BIN_EXE_livemig"))
        .env("PYTHONWARNINGS", "ignore::ResourceWarning")
        .output()
        .expect("run the Python suite");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    assert!(out.status.success(), "the qemu.qmp suite failed");
    assert!(
        stderr.contains("Ran ") && !stderr.contains("Ran 0 tests"),
        "the suite ran no tests"
    );
}
