//! Options shared by several commands, and size/rate parsing ("1G", "64M", "500k").

use crate::child_args::{self, value_enum, ToArgs};
use crate::guest::GuestChoice;
use clap::Args;
use livemig_engine::config::NoConvergence;
use livemig_engine::{MigrationConfig, SourceRecovery};
use livemig_vmm::devices::DeviceSpec;
use livemig_vmm::memory::Backing;
use livemig_vmm::synthetic::{SyntheticConfig, Workload};
use livemig_wire::{DeviceTransfer, RamTransfer};
use serde::Serialize;
use std::time::Duration;

/// Parses a size with an optional binary suffix: 4096, 64K, 256M, 1G.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (try 4096, 64K, 256M or 1G)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("'{s}' is not a size"));
    }
    Ok((v * mult as f64) as u64)
}

/// Parses a count with an optional decimal suffix: 500, 50k, 2M.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_lowercase()) {
        Some('k') => (&s[..s.len() - 1], 1e3),
        Some('m') => (&s[..s.len() - 1], 1e6),
        Some('g') => (&s[..s.len() - 1], 1e9),
        _ => (s, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a number (try 500, 50k or 2M)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("'{s}' is not a number"));
    }
    Ok((v * mult) as u64)
}

/// How the source migrates. Handed on to a child process by [`ToArgs`].
#[derive(Debug, Clone, Args, Serialize)]
pub struct MigrationArgs {
    /// Data channels (1 to 64).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub channels: u16,
    /// Switch over once the rest would move within this many milliseconds: the RAM left and
    /// the devices' final state (at their read rates, over the measured channel rate).
    #[arg(long, default_value_t = 300)]
    pub downtime_limit_ms: u64,
    /// Cap on the data channels' rate, bytes per second (e.g. 500M); none by default.
    #[arg(long, value_parser = parse_size)]
    pub max_bandwidth: Option<u64>,
    /// The bandwidth the switchover can count on, bytes per second (QEMU's
    /// `avail-switchover-bandwidth`): the expected downtime takes it in place of the rates
    /// precopy measured; none by default (the measured rates).
    #[arg(long, value_parser = parse_size)]
    pub avail_switchover_bandwidth: Option<u64>,
    /// Switch over after this many precopy rounds even if not converged.
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Switch over after this many seconds of precopy even if not converged.
    #[arg(long, default_value_t = 120)]
    pub max_precopy_secs: u64,
    /// Throttle the guest's vCPUs progressively while rounds stop shrinking (20%, +10% a
    /// round, up to 99%), as QEMU's auto-converge.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_converge: bool,
    /// When the round or time bound is hit before convergence: `force` the switchover
    /// (reporting the expected downtime) or `cancel` the migration (the guest runs on here).
    #[arg(long, value_enum, default_value_t = OnNoConvergence::Force)]
    #[serde(serialize_with = "value_enum")]
    pub on_no_convergence: OnNoConvergence,
    /// Allow postcopy: the session can switch to running the guest on the destination
    /// before all its memory has arrived (pages it touches are fetched on demand over an
    /// urgent channel, the rest pushed in the background). Once switched, neither side may
    /// give up alone.
    #[arg(long)]
    pub postcopy: bool,
    /// With --postcopy: switch after this many precopy rounds unless precopy converged
    /// first (otherwise only on --on-no-convergence=postcopy).
    #[arg(long, requires = "postcopy", value_parser = clap::value_parser!(u32).range(1..))]
    pub postcopy_after_rounds: Option<u32>,
    /// With --postcopy: cap on the background push's rate in postcopy, bytes per second
    /// (requested pages are never paced); --max-bandwidth by default.
    #[arg(long, requires = "postcopy", value_parser = parse_size)]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Milliseconds a postcopy broken by a lost link waits to be resumed: the source
    /// reconnects to the same address again and again, the destination (whose guest runs on
    /// what it has) waits on its listener for the source's resume. Past it the source keeps
    /// its copy paused and fails, the destination drops its half. 0: no recovery.
    #[arg(long, default_value_t = 60_000)]
    pub postcopy_recover_timeout_ms: u64,
    /// Give every page sent its CRC32C, checked on arrival, so a page corrupted on the way is
    /// caught. Off by default: the transport is trusted (TCP's checksum, TLS's
    /// authentication), as QEMU does, which saves a pass over every page on each side.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub page_checksums: bool,
    /// Compress RAM pages: `zstd` for links slower than the CPU can compress (a packet goes
    /// compressed only when that makes it smaller), `none` to send them as they are.
    #[arg(long, value_enum, default_value_t = Compress::None)]
    #[serde(serialize_with = "value_enum")]
    pub compress: Compress,
    /// zstd level with `--compress zstd` (1 is fastest; negative levels are faster still).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    pub compress_level: i32,
    /// Pages per data packet (1 to 1024; 128 = 512 KiB).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub pages_per_packet: u32,
    /// How device state travels: `multifd` (chunks on the data channels, with credit) or
    /// `main` (each device in turn on the main channel at switchover, the old way).
    #[arg(long, value_enum, default_value_t = TransferMode::Multifd)]
    #[serde(serialize_with = "value_enum")]
    pub device_state_transfer: TransferMode,
    /// Bytes per device state chunk.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Chunks of credit per device to ask the destination for (0: its default, 2 x channels).
    #[arg(long, default_value_t = 0)]
    pub credit_window: u32,
    /// Bytes of device chunks to ask the destination to buffer at most (0: its default).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub buffer_cap: u64,
    /// Milliseconds a silent peer (no frame, not even a ping) or one that stops reading is
    /// given before it is taken for dead. A source then runs its guest on; a destination
    /// drops what it received, never resuming it.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(200..))]
    pub peer_timeout_ms: u64,
    /// Milliseconds the guest may stay paused for the switchover at most (source): from its
    /// pause until the destination has loaded everything. Past it the migration fails and the
    /// guest runs on here, whatever the destination does.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub switchover_timeout_ms: u64,
    /// A hard bound on the switchover's pause, milliseconds (source; 0: none). A switchover
    /// the destination has not loaded this long after the pause (a stalled device read, a
    /// slow link) is abandoned: the guest runs on here and precopy goes on, then the
    /// switchover is tried again (see --switchover-attempts).
    #[arg(long, default_value_t = 0)]
    pub downtime_hard_limit_ms: u64,
    /// Switchovers abandoned at most past --downtime-hard-limit-ms before
    /// --on-no-convergence decides (force: one more without the bound; cancel: fail).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub switchover_attempts: u32,
    /// Switch over only once the destination says every device has loaded its initial
    /// precopy data (QEMU's switchover-ack): precopy goes on meanwhile.
    #[arg(long)]
    pub switchover_ack: bool,
    /// Milliseconds to keep retrying a refused connection while the destination starts, and
    /// then the most the rest of set-up may take once the main channel is open (source).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout_ms: u64,
    /// Local mode, for a destination on this host: hand it the guest's memory (memfds, over
    /// the Unix socket of a `unix:` address) instead of copying it; only device and vCPU
    /// state move. The source guest's memory is then memfd-backed.
    #[arg(long)]
    pub local: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub tls: crate::tls::TlsArgs,
}

/// Compression of RAM pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compress {
    None,
    Zstd,
}

/// What a migration that does not converge in time does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnNoConvergence {
    Force,
    Cancel,
    /// Switch to postcopy (needs --postcopy).
    Postcopy,
}

/// How device state travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransferMode {
    Multifd,
    Main,
}

impl MigrationArgs {
    pub fn config(&self) -> anyhow::Result<MigrationConfig> {
        Ok(MigrationConfig {
            channels: self.channels,
            downtime_limit: Duration::from_millis(self.downtime_limit_ms),
            max_bandwidth: self.max_bandwidth,
            avail_switchover_bandwidth: self.avail_switchover_bandwidth,
            max_postcopy_bandwidth: self.max_postcopy_bandwidth,
            max_rounds: self.max_rounds,
            max_precopy_time: Duration::from_secs(self.max_precopy_secs),
            pages_per_packet: self.pages_per_packet,
            page_checksums: self.page_checksums,
            compress: (self.compress == Compress::Zstd).then_some(self.compress_level),
            auto_converge: self.auto_converge,
            on_no_convergence: match self.on_no_convergence {
                OnNoConvergence::Force => NoConvergence::Force,
                OnNoConvergence::Cancel => NoConvergence::Cancel,
                OnNoConvergence::Postcopy => NoConvergence::Postcopy,
            },
            postcopy: livemig_engine::config::PostcopyPolicy {
                allowed: self.postcopy,
                after_rounds: self.postcopy_after_rounds,
            },
            postcopy_recovery: match self.postcopy_recover_timeout_ms {
                0 => SourceRecovery::Off,
                ms => SourceRecovery::Reconnect {
                    within: Duration::from_millis(ms),
                },
            },
            device_transfer: match self.device_state_transfer {
                TransferMode::Multifd => DeviceTransfer::Multifd,
                TransferMode::Main => DeviceTransfer::Main,
            },
            chunk_size: self.chunk_size.min(u32::MAX as u64) as u32,
            credit_window: self.credit_window,
            buffer_cap: self.buffer_cap,
            peer_timeout: Duration::from_millis(self.peer_timeout_ms),
            switchover_timeout: Duration::from_millis(self.switchover_timeout_ms),
            downtime_hard_limit: (self.downtime_hard_limit_ms > 0)
                .then(|| Duration::from_millis(self.downtime_hard_limit_ms)),
            switchover_attempts: self.switchover_attempts,
            switchover_ack: self.switchover_ack,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            ram: if self.local {
                RamTransfer::Local
            } else {
                RamTransfer::Copy
            },
            tls: self.tls.config()?,
            test_hooks: crate::test_hooks()?.source,
            ..MigrationConfig::default()
        })
    }
}

/// Handed on to a child process as its flags (test hooks go by the environment).
impl ToArgs for MigrationArgs {}

/// The guest the source runs. Handed on to a child process by [`ToArgs`].
#[derive(Debug, Clone, Args, Serialize)]
pub struct GuestArgs {
    /// Which guest: the KVM micro-VM when /dev/kvm is usable (auto), or the synthetic one.
    #[arg(long, value_enum, default_value_t = GuestChoice::Auto)]
    #[serde(serialize_with = "resolved")]
    pub guest: GuestChoice,
    /// Guest memory size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// Share of pages filled with data before migrating (0.0 to 1.0); the rest stay zero.
    #[arg(long, default_value_t = 1.0)]
    pub fill: f64,
    /// Memory the guest keeps dirtying, from its start (0 for an idle guest).
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub working_set: u64,
    /// Page writes per second (e.g. 50k); 0 for as fast as the guest can.
    #[arg(long, default_value = "50k", value_parser = parse_count)]
    pub dirty_rate: u64,
    /// Guest threads (vCPUs) dirtying memory.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// Let the guest run this long before migrating.
    #[arg(long, default_value_t = 300)]
    pub warmup_ms: u64,
    /// A device, e.g. `vfio-sim,size=256M,rate=500M[,precopy=16M]` or `vmstate-sim`.
    /// Repeat for more.
    #[arg(long = "device", value_parser = check_device)]
    pub devices: Vec<String>,
    /// KVM guest: boot this PVH kernel image instead of livemig's own (it must follow
    /// livemig's guest protocol: docs/guest-image.md; `livemig guest-image` writes livemig's).
    #[arg(long)]
    #[serde(serialize_with = "child_args::path")]
    pub kernel: Option<std::path::PathBuf>,
    /// KVM guest: the kernel command line, e.g. "fill=256M ws=16M rate=10000" (default:
    /// derived from --fill, --working-set and --dirty-rate; livemig adds `vcpus=` and
    /// `tsc_khz=` where it is silent about them).
    #[arg(long)]
    pub append: Option<String>,
}

/// Checks a device spec, keeping its text (so it can be handed on to a child process).
fn check_device(s: &str) -> Result<String, String> {
    DeviceSpec::parse(s).map(|_| s.to_string())
}

impl GuestArgs {
    pub fn synthetic(&self, backing: Backing) -> SyntheticConfig {
        SyntheticConfig {
            memory_bytes: self.memory,
            fill: self.fill,
            workload: Workload {
                working_set_pages: self.working_set / livemig_wire::PAGE_SIZE as u64,
                rate: self.dirty_rate,
                threads: self.vcpus,
            },
            backing,
        }
    }
}

impl ToArgs for GuestArgs {}

/// A child runs the guest this process would: `auto` is resolved here.
fn resolved<S: serde::Serializer>(g: &GuestChoice, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(g.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_counts() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1M").is_err());
        assert_eq!(parse_count("50k"), Ok(50_000));
        assert_eq!(parse_count("0"), Ok(0));
        assert!(parse_count("x").is_err());
    }
}
