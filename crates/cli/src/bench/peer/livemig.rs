//! livemig as the bench's own side: `livemig run --qmp` (source) and `livemig incoming --qmp`
//! (destination), the same binary as the bench.

use super::proc::WorkDir;
use super::vm::Launch;
use super::work::{Boot, GuestWork};
use std::path::Path;

/// The source: boots the image (or, without one, livemig's built-in guest doing the same
/// work) and serves QMP.
pub(super) fn source(exe: &Path, dir: &WorkDir, boot: &Boot, guest: &GuestWork) -> Launch {
    let mut args = vec![
        "run".to_string(),
        "--qmp".into(),
        dir.join("src.qmp").display().to_string(),
        format!("--memory={}", guest.memory),
    ];
    match boot {
        Boot::Image(image) => {
            // The image needs KVM: fail rather than fall back to the synthetic guest.
            args.push("--guest=kvm".into());
            args.push(format!("--kernel={}", image.display()));
            args.push(format!("--append={}", guest.append()));
        }
        Boot::Builtin => {
            args.push(format!(
                "--fill={}",
                guest.fill as f64 / guest.memory as f64
            ));
            args.push(format!("--working-set={}", guest.working_set));
            args.push(format!("--dirty-rate={}", guest.rate));
        }
    }
    launch(exe, dir, "livemig source", "src", args)
}

/// The destination: learns the guest's size from the source ("cold"), or allocates and
/// pre-faults it at start-up with `--memory` ("prepared").
pub(super) fn destination(exe: &Path, dir: &WorkDir, memory: u64, prepared: bool) -> Launch {
    let mut args = vec![
        "incoming".to_string(),
        "--qmp".into(),
        dir.join("dst.qmp").display().to_string(),
    ];
    if prepared {
        args.push(format!("--memory={memory}"));
    }
    launch(exe, dir, "livemig destination", "dst", args)
}

fn launch(exe: &Path, dir: &WorkDir, name: &str, role: &str, args: Vec<String>) -> Launch {
    Launch {
        name: name.into(),
        program: exe.to_path_buf(),
        args,
        qmp: dir.join(&format!("{role}.qmp")),
        serial: None,
        log: dir.join(&format!("{role}.log")),
        debug_log: None,
        paused: false,
    }
}
