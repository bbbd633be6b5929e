//! `livemig guest-image --out PATH`: writes livemig's own guest image (the PVH kernel the KVM
//! guest boots) to a file, for QEMU (`-kernel PATH -append "..."`) or `livemig run --kernel`.
//! docs/guest-image.md describes its command line and console.

use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct GuestImageArgs {
    /// Where to write the image (an ELF64 kernel with the PVH entry note).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: GuestImageArgs) -> anyhow::Result<ExitCode> {
    let image = livemig_vmm::kvm::DEFAULT_IMAGE;
    std::fs::write(&a.out, image)
        .map_err(|e| anyhow::anyhow!("writing the guest image to {}: {e}", a.out.display()))?;
    eprintln!(
        "livemig: guest image written to {} ({} bytes); boot it with: qemu-system-x86_64 \
         -accel kvm -cpu host,-arch-capabilities -m 1536 -nodefaults -nographic -kernel {} \
         -append \"fill=256M ws=16M rate=10000\" -serial stdio",
        a.out.display(),
        image.len(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
