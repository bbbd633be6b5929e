//! Builds livemig's guest image (`guest/image.S`, linked by `guest/image.ld`) into an ELF64
//! kernel in `OUT_DIR`, which `src/kvm/image.rs` embeds. Needs GNU `as` and `ld` (binutils).

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot run {:?} ({e}); install binutils",
            cmd.get_program()
        )
    });
    assert!(status.success(), "{what} failed: {status}");
}

fn main() {
    let (src, script) = ("guest/image.S", "guest/image.ld");
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("image.o");
    let elf = out.join("image.elf");
    run(
        Command::new("as").arg("--64").arg("-o").arg(&obj).arg(src),
        "assembling the guest image",
    );
    run(
        Command::new("ld")
            .args(["-T", script, "-nostdlib", "--build-id=none"])
            .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
            .arg("-o")
            .arg(&elf)
            .arg(&obj),
        "linking the guest image",
    );
}
