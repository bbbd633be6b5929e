//! Assembles the KVM guest payload (`guest/payload.S`) into a flat binary in `OUT_DIR`, which
//! `src/kvm/payload.rs` includes. Needs GNU `as` and `objcopy` (binutils).

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
    let src = "guest/payload.S";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let obj = out.join("payload.o");
    let bin = out.join("payload.bin");
    run(
        Command::new("as").arg("--64").arg("-o").arg(&obj).arg(src),
        "assembling the guest payload",
    );
    run(
        Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&obj)
            .arg(&bin),
        "extracting the guest payload",
    );
}
