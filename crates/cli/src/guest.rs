//! The guest a source runs: the KVM micro-VM when /dev/kvm is usable, the synthetic guest
//! otherwise (or as chosen with `--guest`).

use crate::args::GuestArgs;
use clap::ValueEnum;
use livemig_engine::Guest;
use livemig_vmm::kvm::image::MAX_IMAGE_FILE;
use livemig_vmm::kvm::{self, GuestImage, KvmConfig, KvmGuest};
use livemig_vmm::memory::Backing;
use livemig_vmm::synthetic::SyntheticGuest;
use std::path::Path;
use std::sync::Arc;

/// Reads and checks a guest image file.
fn read_image(path: &Path) -> anyhow::Result<GuestImage> {
    let len = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("--kernel {}: {e}", path.display()))?
        .len();
    if len > MAX_IMAGE_FILE as u64 {
        anyhow::bail!(
            "--kernel {}: {len} bytes, more than the {MAX_IMAGE_FILE} livemig reads",
            path.display()
        );
    }
    let bytes =
        std::fs::read(path).map_err(|e| anyhow::anyhow!("--kernel {}: {e}", path.display()))?;
    GuestImage::parse(bytes).map_err(|e| anyhow::anyhow!("--kernel {}: {e}", path.display()))
}

/// Which guest to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GuestChoice {
    /// KVM if /dev/kvm is usable, else synthetic.
    Auto,
    /// The KVM micro-VM running livemig's own payload.
    Kvm,
    /// Host threads dirtying `vm-memory` (no /dev/kvm needed).
    Synthetic,
}

impl GuestChoice {
    /// The concrete kind for this machine.
    pub fn resolve(self) -> GuestChoice {
        match self {
            GuestChoice::Auto if kvm::kvm_usable() => GuestChoice::Kvm,
            GuestChoice::Auto => GuestChoice::Synthetic,
            other => other,
        }
    }

    pub fn name(self) -> &'static str {
        match self.resolve() {
            GuestChoice::Kvm => "kvm",
            _ => "synthetic",
        }
    }
}

/// A running source guest of either kind.
pub enum SourceGuest {
    Kvm(KvmGuest),
    Synthetic(SyntheticGuest),
}

impl SourceGuest {
    /// Starts the guest `a` describes, its memory where `backing` says (memfds for local
    /// mode).
    pub fn start(a: &GuestArgs, backing: Backing) -> anyhow::Result<SourceGuest> {
        Self::start_echoing(a, backing, None)
    }

    /// [`SourceGuest::start`], echoing a KVM guest's console lines to stderr after `echo`.
    pub fn start_echoing(
        a: &GuestArgs,
        backing: Backing,
        echo: Option<String>,
    ) -> anyhow::Result<SourceGuest> {
        Ok(match a.guest.resolve() {
            GuestChoice::Kvm => {
                if !kvm::kvm_usable() {
                    anyhow::bail!("--guest kvm: /dev/kvm is missing or lacks what livemig needs");
                }
                let image = match &a.kernel {
                    Some(path) => Some(Arc::new(read_image(path)?)),
                    None => None,
                };
                SourceGuest::Kvm(KvmGuest::start(&KvmConfig {
                    memory_bytes: a.memory,
                    vcpus: a.vcpus,
                    fill: a.fill,
                    working_set_pages: a.working_set / livemig_wire::PAGE_SIZE as u64,
                    rate: a.dirty_rate,
                    backing,
                    image,
                    cmdline: a.append.clone(),
                    echo_console: echo,
                    ..KvmConfig::default()
                })?)
            }
            _ => {
                if a.kernel.is_some() || a.append.is_some() {
                    anyhow::bail!(
                        "--kernel and --append boot a KVM guest; the synthetic guest has no kernel"
                    );
                }
                SourceGuest::Synthetic(SyntheticGuest::start(&a.synthetic(backing))?)
            }
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SourceGuest::Kvm(_) => "kvm",
            SourceGuest::Synthetic(_) => "synthetic",
        }
    }

    pub fn guest(&self) -> &dyn Guest {
        match self {
            SourceGuest::Kvm(g) => g,
            SourceGuest::Synthetic(g) => g,
        }
    }

    /// The guest as a shared trait object, for a VM that outlives this call.
    pub fn into_shared(self) -> std::sync::Arc<dyn Guest> {
        match self {
            SourceGuest::Kvm(g) => std::sync::Arc::new(g),
            SourceGuest::Synthetic(g) => std::sync::Arc::new(g),
        }
    }

    /// The write counter when the guest was last paused: after a migration, where it
    /// stopped here (in local mode the memory it lives in is the destination's by then).
    pub fn counter_at_pause(&self) -> u64 {
        match self {
            SourceGuest::Kvm(g) => g.counter_at_pause(),
            SourceGuest::Synthetic(g) => g.counter(),
        }
    }

    /// The workload's write counter: it only grows.
    pub fn counter(&self) -> u64 {
        match self {
            SourceGuest::Kvm(g) => g.counter(),
            SourceGuest::Synthetic(g) => g.counter(),
        }
    }
}
