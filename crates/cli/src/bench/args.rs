//! The options of `livemig bench`, the suite's and the peer bench's flattened in.

use crate::args::parse_size;
use crate::guest::GuestChoice;
use clap::Args;
use std::path::PathBuf;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// RAM throughput and downtime against channel count.
    Ram,
    /// Downtime against VFIO-like device count, parallel against serial device state.
    Devices,
    /// Every benchmark in one run (channels, guest size, dirty rate, devices, resources),
    /// as Markdown tables and JSON: see `--out` and the `Suite:` options.
    Suite,
    /// Saving to and restoring from a file beside the raw write and read rates of the same
    /// filesystem, measured in the same run (`--memory` of data, in the temp directory).
    File,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Ram)]
    pub mode: Mode,
    /// Devices and suite modes: device counts to measure [default: 1,2,4,8; suite: 0,1,2,4,8].
    #[arg(long, value_delimiter = ',')]
    pub device_counts: Option<Vec<usize>>,
    /// Devices mode: each device's state size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub device_size: u64,
    /// Devices mode: each device's read rate, bytes per second.
    #[arg(long, default_value = "500M", value_parser = parse_size)]
    pub device_rate: u64,
    /// Devices mode: data channels.
    #[arg(long, default_value_t = 4)]
    pub device_channels: u16,
    /// Devices mode: guest memory.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub device_guest_memory: u64,
    /// Devices and suite modes: the downtime limit of every device row, milliseconds (the
    /// switchover counts the devices' read time, so devices that cannot fit it are forced
    /// over at the round bound, their expected downtime reported).
    #[arg(long, default_value_t = 300)]
    pub device_downtime_limit_ms: u64,
    /// Devices and suite modes: more rows, parallel, for the largest device count, at these
    /// downtime limits (ms): a limit the devices fit, against the forced row.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000u64])]
    pub device_extra_limits_ms: Vec<u64>,
    /// Guest memory size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub memory: u64,
    /// File mode (and the suite's file section): both the raw passes and livemig's with
    /// direct I/O (`O_DIRECT`).
    #[arg(long)]
    pub file_direct_io: bool,
    /// File mode (and the suite's file section): the on-demand restore's guest memory (a
    /// twentieth of it holding data).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub file_on_demand_memory: u64,
    /// Channel counts to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1u16, 2, 4, 8])]
    pub channels: Vec<u16>,
    /// Working set the dirtying guest writes.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub working_set: u64,
    /// Page writes per second of the dirtying guest (0: as fast as it can).
    #[arg(long, default_value = "50k", value_parser = crate::args::parse_count)]
    pub dirty_rate: u64,
    /// Which guest: the KVM micro-VM when /dev/kvm is usable (auto), or the synthetic one.
    #[arg(long, value_enum, default_value_t = GuestChoice::Auto)]
    pub guest: GuestChoice,
    /// Repeat each row this many times and keep the median [with --peer: 3].
    #[arg(
        long,
        default_value_t = 1,
        default_value_if("peer", clap::builder::ArgPredicate::IsPresent, "3")
    )]
    pub repeat: usize,
    /// Measure the cost of TLS: every row twice in the same run, over plain TCP and over
    /// TLS 1.3 with mutual authentication (throwaway certificates made for the run).
    #[arg(long)]
    pub tls: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write the pictures of every measured run (with --repeat, the median one) into a
    /// subfolder of DIR each: `idle-4ch/`, `dirtying-4ch/`, ... (ram mode) or
    /// `devices-2-parallel/`, ... (devices mode), each with timeline.svg, downtime.svg and
    /// report.json, as `livemig demo --report` writes them.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    #[command(flatten)]
    pub suite: super::suite::SuiteArgs,
    #[command(flatten)]
    pub peer: super::peer::PeerArgs,
}
