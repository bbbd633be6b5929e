//! The options of `bench --peer` (flattened into `bench`'s own).

use super::work::{GuestWork, Load, RowSpec};
use crate::args::{parse_count, parse_size};
use clap::Args;
use std::path::PathBuf;

/// A VMM to compare livemig with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// QEMU (`qemu-system-x86_64`, or the program `LIVEMIG_QEMU` names) with KVM.
    Qemu,
}

/// The options of `bench --peer` (flattened into `bench`'s own).
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// Compare livemig with another VMM on the same guest image and work, interleaved, both
    /// driven over QMP (`--repeat` defaults to 3 then). Writes DIR/bench.md and
    /// DIR/bench.json with `--out DIR`.
    #[arg(long, value_enum)]
    pub peer: Option<Peer>,
    /// Peer: the rows to run, e.g. `cold-idle-2ch,prepared-dirtying-4ch,sparse`
    /// [default: cold and prepared x idle and dirtying x 2 and 4 channels, then sparse].
    #[arg(long, value_delimiter = ',', value_parser = RowSpec::parse)]
    pub(super) rows: Option<Vec<RowSpec>>,
    /// Peer: guest memory of every row but the sparse one.
    #[arg(long, default_value = "1536M", value_parser = parse_size)]
    pub(super) peer_memory: u64,
    /// Peer: memory the guest fills with data before migrating (the rest stays zero).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub(super) peer_fill: u64,
    /// Peer: guest memory of the sparse row (filled as much as the others).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub(super) sparse_memory: u64,
    /// Peer: working set of the dirtying rows.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub(super) peer_working_set: u64,
    /// Peer: page writes per second of the dirtying rows (65536 = 256 MiB/s).
    #[arg(long, default_value = "65536", value_parser = parse_count)]
    pub(super) peer_dirty_rate: u64,
    /// Peer: wait this long before each migration. On this host, memory a process frees is
    /// handed back to the hypervisor within seconds (virtio-balloon free page reporting), and
    /// the next first touch of it costs several times more than touching memory freed just
    /// now; waiting the same time before every run gives both tools the same host state.
    #[arg(long, default_value_t = 4000)]
    pub(super) settle_ms: u64,
    /// Peer: the guest image both tools boot [default: the one `livemig guest-image` writes].
    #[arg(long, value_name = "PATH")]
    pub(super) image: Option<PathBuf>,
}

impl PeerArgs {
    pub(super) fn guest(&self, spec: &RowSpec) -> GuestWork {
        GuestWork {
            memory: if spec.sparse {
                self.sparse_memory
            } else {
                self.peer_memory
            },
            fill: self.peer_fill,
            working_set: match spec.load {
                Load::Idle => 0,
                Load::Dirtying => self.peer_working_set,
            },
            rate: match spec.load {
                Load::Idle => 0,
                Load::Dirtying => self.peer_dirty_rate,
            },
        }
    }
}
