//! `livemig bench --mode suite`: every benchmark in one run, written as Markdown tables and
//! JSON. Sections:
//!
//! 1. channels: RAM throughput for 1, 2, 4 and 8 channels beside the raw loopback TCP limit
//!    measured in the same run (at its start and at its end);
//! 2. size: total time and downtime against guest size, idle and dirtying, beside the time a
//!    raw copy of the same bytes takes, and the time per GiB (linearity);
//! 3. dirty: downtime, rounds and total time against the guest's dirty rate;
//! 4. devices: downtime against VFIO-like device count, parallel against serial (the rows of
//!    `bench --mode devices`);
//! 5. local: local mode (guest memory handed over as memfds, nothing copied) against guest
//!    size, idle;
//! 6. compress: what `--compress zstd` costs: one core's compression and decompression rate
//!    and ratio on pattern and text-like pages, and a migration with and without it;
//! 7. resources, for every migration above: each process's peak RSS (VmHWM), the
//!    destination's peak buffered device bytes, and CPU seconds per GiB moved on each side.
//!
//! The peak RSS and CPU figures come from the two processes themselves: `livemig migrate` and
//! `livemig incoming` print them in their final JSON lines (see [`crate::procstat`]).

use crate::args::{parse_count, parse_size};
use super::{report_run, BenchArgs, Run};
use crate::guest::GuestChoice;
use crate::pair::run_pair;
use super::raw_tcp;
use super::run_facts;
use anyhow::Context;
use clap::Args;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

const MIB: u64 = 1 << 20;
const GIB: f64 = (1u64 << 30) as f64;
/// Data channels of the size and dirty-rate sections: livemig's default.
const CHANNELS: u16 = 4;

/// A section of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// RAM throughput against channel count, beside raw loopback TCP.
    Channels,
    /// Total time and downtime against guest size.
    Size,
    /// Downtime, rounds and total time against dirty rate.
    Dirty,
    /// Downtime against device count, parallel against serial.
    Devices,
    /// Local mode (memory handed over, not copied) against guest size.
    Local,
    /// The cost of zstd compression of pages.
    Compress,
}

/// The options of `bench --mode suite` (flattened into `bench`'s own).
#[derive(Debug, Args)]
pub struct SuiteArgs {
    /// Suite: the sections to run (default: all; the resources table covers those run).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub sections: Option<Vec<Section>>,
    /// Suite: guest sizes of the size section [default: 256M,1G,2G,4G; --quick: 32M,64M].
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    pub sizes: Option<Vec<u64>>,
    /// Suite: channel counts of the channels section [default: 1,2,4,8].
    #[arg(long, value_delimiter = ',')]
    pub channels_list: Option<Vec<u16>>,
    /// Suite: dirty rates of the dirty section, page writes per second; 0 is an idle guest,
    /// `max` as fast as the guest writes [default: 0,10k,50k,100k,200k,max; --quick:
    /// 0,50k,max].
    #[arg(long, value_delimiter = ',', value_parser = parse_rate)]
    pub dirty_rates: Option<Vec<u64>>,
    /// Suite: working set of the dirty section's guest (at most a quarter of its memory):
    /// large enough that what a round leaves dirty grows with the rate.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub dirty_working_set: u64,
    /// Suite: working set of the dirtying rows of the size section.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub size_working_set: u64,
    /// Suite: page writes per second of the dirtying rows of the size section.
    #[arg(long, default_value = "20k", value_parser = parse_count)]
    pub size_dirty_rate: u64,
    /// Suite: a smoke run with small guests and devices (guests of at most 64 MiB, devices
    /// of at most 16 MiB, raw TCP over 64 MiB); explicit lists still apply.
    #[arg(long)]
    pub quick: bool,
    /// Suite: also write DIR/bench.md (the Markdown printed) and DIR/bench.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// The dirty rate `max`: the guest writes as fast as it can.
const MAX_RATE: u64 = u64::MAX;

fn parse_rate(s: &str) -> Result<u64, String> {
    if s.trim().eq_ignore_ascii_case("max") {
        Ok(MAX_RATE)
    } else {
        parse_count(s)
    }
}

fn rate_label(r: u64) -> String {
    if r == MAX_RATE {
        "max".into()
    } else {
        r.to_string()
    }
}

// ---- How it was run ----

/// The facts a reader needs to repeat a run.
struct HowRun {
    command: String,
    guest: &'static str,
    guest_why: &'static str,
    cpu_model: String,
    cpus: usize,
    memory_gib: f64,
    kernel: String,
    date: String,
    commit: String,
    build: &'static str,
    load_start: String,
}

impl HowRun {
    fn collect(guest: GuestChoice) -> HowRun {
        let host = run_facts::Host::read();
        HowRun {
            command: run_facts::command_line(),
            guest: guest.name(),
            guest_why: match (guest, guest.resolve()) {
                (GuestChoice::Auto, GuestChoice::Kvm) => "auto: /dev/kvm is usable",
                (GuestChoice::Auto, _) => "auto: no usable /dev/kvm",
                _ => "chosen with --guest",
            },
            cpu_model: host.cpu_model,
            cpus: host.cpus,
            memory_gib: host.memory_gib,
            kernel: host.kernel,
            date: run_facts::utc_now(),
            commit: run_facts::commit(),
            build: run_facts::build(),
            load_start: run_facts::load_average(),
        }
    }

    /// One line for the head of every table.
    fn line(&self) -> String {
        format!(
            "Run: `{}` ({}, commit {}) on {}, {} logical CPUs, {:.0} GiB RAM, Linux {}, {}; \
             {} guest ({}); load average at the start {}.",
            self.command,
            self.build,
            self.commit,
            self.cpu_model,
            self.cpus,
            self.memory_gib,
            self.kernel,
            self.date,
            self.guest,
            self.guest_why,
            self.load_start
        )
    }

    fn json(&self) -> Value {
        json!({
            "command": self.command,
            "build": self.build,
            "commit": self.commit,
            "guest": self.guest,
            "guest_why": self.guest_why,
            "cpu_model": self.cpu_model,
            "logical_cpus": self.cpus,
            "memory_gib": self.memory_gib,
            "kernel": self.kernel,
            "date": self.date,
            "load_average_start": self.load_start,
        })
    }
}

// ---- Running migrations ----

/// What the suite measures with, once the defaults and `--quick` are applied.
struct Plan {
    sections: Vec<Section>,
    /// Guest memory of the channels and dirty sections.
    memory: u64,
    channels: Vec<u16>,
    sizes: Vec<u64>,
    dirty_rates: Vec<u64>,
    /// Working set of the dirty section.
    working_set: u64,
    device_counts: Vec<usize>,
    raw_bytes: u64,
    warmup_ms: u64,
}

impl Plan {
    fn new(a: &mut BenchArgs) -> Plan {
        let s = &a.suite;
        let quick = s.quick;
        let memory = if quick {
            a.memory.min(64 * MIB)
        } else {
            a.memory
        };
        if quick {
            a.device_size = a.device_size.min(16 * MIB);
            a.device_guest_memory = a.device_guest_memory.min(64 * MIB);
        }
        let s = &a.suite;
        Plan {
            sections: s.sections.clone().unwrap_or_else(|| {
                vec![
                    Section::Channels,
                    Section::Size,
                    Section::Dirty,
                    Section::Devices,
                    Section::Local,
                    Section::Compress,
                ]
            }),
            memory,
            channels: s.channels_list.clone().unwrap_or_else(|| vec![1, 2, 4, 8]),
            sizes: s.sizes.clone().unwrap_or_else(|| {
                if quick {
                    vec![32 * MIB, 64 * MIB]
                } else {
                    vec![256 * MIB, 1 << 30, 2 << 30, 4 << 30]
                }
            }),
            dirty_rates: s.dirty_rates.clone().unwrap_or_else(|| {
                if quick {
                    vec![0, 50_000, MAX_RATE]
                } else {
                    vec![0, 10_000, 50_000, 100_000, 200_000, MAX_RATE]
                }
            }),
            working_set: s.dirty_working_set.min(memory / 4),
            device_counts: a
                .device_counts
                .clone()
                .unwrap_or_else(|| vec![0, 1, 2, 4, 8]),
            raw_bytes: if quick { 64 * MIB } else { 1 << 30 },
            warmup_ms: if quick { 50 } else { 200 },
        }
    }

    fn has(&self, s: Section) -> bool {
        self.sections.contains(&s)
    }
}

/// One two-process migration of a filled guest.
struct Spec {
    memory: u64,
    channels: u16,
    /// 0: an idle guest.
    working_set: u64,
    /// Page writes per second; [`MAX_RATE`]: as fast as the guest can.
    dirty_rate: u64,
    /// The destination allocates and pre-faults guest memory before the source connects.
    warm_destination: bool,
    /// Pages carry their CRC32C (livemig's default).
    page_checksums: bool,
    /// Local mode: memory handed over a Unix socket, not copied.
    local: bool,
    /// zstd level of `--compress zstd`, if compressed.
    compress: Option<i32>,
}

impl Spec {
    /// A migration of a filled guest with livemig's defaults: 4 channels, page CRCs, copied.
    fn new(memory: u64) -> Spec {
        Spec {
            memory,
            channels: CHANNELS,
            working_set: 0,
            dirty_rate: 0,
            warm_destination: false,
            page_checksums: true,
            local: false,
            compress: None,
        }
    }
}

fn migrate_once(a: &BenchArgs, plan: &Plan, s: &Spec) -> anyhow::Result<Run> {
    let idle = s.working_set == 0 || s.dirty_rate == 0;
    let src = vec![
        format!("--memory={}", s.memory),
        format!("--guest={}", a.guest.name()),
        "--fill=1".into(),
        format!("--working-set={}", if idle { 0 } else { s.working_set }),
        format!(
            "--dirty-rate={}",
            if s.dirty_rate == MAX_RATE {
                0
            } else {
                s.dirty_rate
            }
        ),
        format!("--warmup-ms={}", plan.warmup_ms),
        format!("--channels={}", s.channels),
        format!("--page-checksums={}", s.page_checksums),
    ];
    let mut src = src;
    let mut dest = Vec::new();
    if s.warm_destination {
        dest.push(format!("--memory={}", s.memory));
    }
    if let Some(level) = s.compress {
        src.push("--compress=zstd".into());
        src.push(format!("--compress-level={level}"));
    }
    if s.local {
        src.push("--local".into());
        dest.push(crate::pair::unix_listen_arg("bench"));
    }
    let r = run_pair(&dest, &src, |_| {})?;
    let rep = &r.source["report"];
    let f = |k: &str| rep.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let rounds = rep["rounds"].as_array().cloned().unwrap_or_default();
    let row = json!({
        "memory_bytes": s.memory,
        "channels": s.channels,
        "working_set_bytes": if idle { 0 } else { s.working_set },
        // Pages per second; null: as fast as the guest writes.
        "dirty_rate": match (idle, s.dirty_rate) {
            (true, _) => json!(0),
            (false, MAX_RATE) => Value::Null,
            (false, r) => json!(r),
        },
        "dirty_rate_label": if idle { "0".into() } else { rate_label(s.dirty_rate) },
        "warm_destination": s.warm_destination,
        "page_checksums": s.page_checksums,
        "local": s.local,
        "compress_level": s.compress,
        "total_ms": f("total_ms"),
        "setup_ms": f("setup_ms"),
        "precopy_ms": f("precopy_ms"),
        "downtime_ms": f("downtime_ms"),
        "transferred_bytes": rep["transferred_bytes"],
        "ram_pages_sent": f("normal_pages") + f("zero_pages"),
        "bytes_per_s": f("bytes_per_s"),
        "first_round_bytes_per_s": rounds.first().and_then(|r| r["bytes_per_s"].as_f64()).unwrap_or(0.0),
        "rounds": rounds.len(),
        // Distinct pages the guest dirtied while the first round was sent.
        "first_round_dirty_after_pages": rounds.first().map_or(json!(0), |r| r["dirty_after"].clone()),
        "forced_switchover": rep["forced_switchover"],
    });
    Ok(Run {
        row,
        source: r.source,
        dest: r.dest,
    })
}

/// Runs `f` `repeat` times and keeps the run with the median `key`.
fn median(
    repeat: usize,
    key: &str,
    mut f: impl FnMut() -> anyhow::Result<Run>,
) -> anyhow::Result<Run> {
    let mut runs = Vec::new();
    for _ in 0..repeat.max(1) {
        runs.push(f()?);
    }
    runs.sort_by(|x, y| {
        x.row[key]
            .as_f64()
            .partial_cmp(&y.row[key].as_f64())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    Ok(runs.swap_remove(runs.len() / 2))
}

/// Section 5's figures for one run, from the final JSON lines of its two processes.
fn usage(run: &Run) -> Value {
    let (src, dst) = (&run.source, &run.dest);
    let moved = src["report"]["transferred_bytes"].as_u64().unwrap_or(0);
    let gib = moved as f64 / GIB;
    let per_gib = |s: f64| if gib > 0.0 { s / gib } else { 0.0 };
    let cpu = |v: &Value, k: &str| v["cpu"][k].as_f64().unwrap_or(0.0);
    let dst_rss = dst["peak_rss_bytes"].as_u64().unwrap_or(0);
    let guest_mem = dst["report"]["memory_bytes"].as_u64().unwrap_or(0);
    let buffered: Vec<u64> = dst["report"]["device_peak_buffered_bytes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    json!({
        "moved_bytes": moved,
        "source_peak_rss_bytes": src["peak_rss_bytes"],
        "dest_peak_rss_bytes": dst_rss,
        "dest_guest_memory_bytes": guest_mem,
        "dest_rss_over_guest_bytes": dst_rss as i64 - guest_mem as i64,
        "dest_peak_buffered_bytes": buffered.iter().sum::<u64>(),
        "dest_peak_buffered_max_device_bytes": buffered.iter().copied().max().unwrap_or(0),
        "source_cpu_s": cpu(src, "migration_s"),
        "dest_cpu_s": cpu(dst, "migration_s"),
        "source_guest_cpu_s": cpu(src, "guest_s"),
        "source_process_cpu_s": cpu(src, "process_s"),
        "dest_process_cpu_s": cpu(dst, "process_s"),
        "source_cpu_s_per_gib": per_gib(cpu(src, "migration_s")),
        "dest_cpu_s_per_gib": per_gib(cpu(dst, "migration_s")),
    })
}

/// Everything measured, and the rows of every section.
struct Results {
    raw_start: (f64, String),
    raw_end: (f64, String),
    /// The raw copy memory to memory (see `raw_tcp::measure_memory`).
    raw_memory: f64,
    channels: Vec<Value>,
    size: Vec<Value>,
    dirty: Vec<Value>,
    devices: Vec<Value>,
    local: Vec<Value>,
    /// The compression rates (no migration), then the migrations with and without it.
    compress_rates: Vec<Value>,
    compress: Vec<Value>,
    /// Every migration: its name and [`usage`].
    resources: Vec<(String, Value)>,
}

impl Results {
    /// The raw limit: the better of the measurements at the start and at the end.
    fn raw(&self) -> f64 {
        self.raw_start.0.max(self.raw_end.0)
    }

    fn raw_how(&self) -> &str {
        if self.raw_end.0 > self.raw_start.0 {
            &self.raw_end.1
        } else {
            &self.raw_start.1
        }
    }
}

/// Finishes a run: its pictures with `--report`, its usage, a line on stderr.
fn keep(
    a: &BenchArgs,
    res: &mut Results,
    name: &str,
    mut run: Run,
    say: String,
) -> anyhow::Result<Value> {
    report_run(a, name, &mut run)?;
    let u = usage(&run);
    run.row["name"] = json!(name);
    run.row["usage"] = u.clone();
    res.resources.push((name.to_string(), u));
    eprintln!("bench suite: {name}: {say}");
    Ok(run.row)
}

pub fn run(mut a: BenchArgs) -> anyhow::Result<ExitCode> {
    let plan = Plan::new(&mut a);
    if let Some(dir) = &a.suite.out {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output directory {}", dir.display()))?;
    }
    let how = HowRun::collect(a.guest);
    eprintln!("bench suite: {}", how.line());
    eprintln!(
        "bench suite: raw loopback TCP, {} MiB per copy",
        plan.raw_bytes >> 20
    );
    let raw_start = raw_tcp::measure(plan.raw_bytes)?;
    let raw_memory = raw_tcp::measure_memory(plan.raw_bytes)?;
    let mut res = Results {
        raw_end: raw_start.clone(),
        raw_start,
        raw_memory,
        channels: Vec::new(),
        size: Vec::new(),
        dirty: Vec::new(),
        devices: Vec::new(),
        local: Vec::new(),
        compress_rates: Vec::new(),
        compress: Vec::new(),
        resources: Vec::new(),
    };
    let raw0 = res.raw_start.0;

    if plan.has(Section::Channels) {
        // Every count with page CRCs (the default), then 4 channels without.
        let runs = plan
            .channels
            .iter()
            .map(|&ch| (ch, true))
            .chain([(CHANNELS, false)]);
        for (ch, page_checksums) in runs {
            let spec = Spec {
                channels: ch,
                warm_destination: true,
                page_checksums,
                ..Spec::new(plan.memory)
            };
            let run = median(a.repeat, "total_ms", || migrate_once(&a, &plan, &spec))?;
            let say = format!(
                "{:.0} MB/s",
                run.row["bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6
            );
            let name = if page_checksums {
                format!("channels-{ch}")
            } else {
                format!("channels-{ch}-no-page-crcs")
            };
            let row = keep(&a, &mut res, &name, run, say)?;
            res.channels.push(row);
        }
    }
    if plan.has(Section::Size) {
        // Destinations that prepared their memory (`incoming --memory`, as QEMU allocates
        // guest RAM at start-up): the migration's own cost at every size, idle and dirtying
        // (linearity). Then every idle size to a cold destination, which allocates and
        // faults in its memory during the migration (how the 1.3 x target is put).
        // Last, the target's guest to a prepared destination without page CRCs.
        let mut specs: Vec<(bool, Spec)> = Vec::new();
        for dirty in [false, true] {
            for &size in &plan.sizes {
                specs.push((
                    dirty,
                    Spec {
                        working_set: if dirty {
                            a.suite.size_working_set.min(size / 4)
                        } else {
                            0
                        },
                        dirty_rate: if dirty { a.suite.size_dirty_rate } else { 0 },
                        warm_destination: true,
                        ..Spec::new(size)
                    },
                ));
            }
        }
        for &size in &plan.sizes {
            specs.push((false, Spec::new(size)));
        }
        let target_size = if a.suite.quick { plan.memory } else { 1 << 30 };
        specs.push((
            false,
            Spec {
                warm_destination: true,
                page_checksums: false,
                ..Spec::new(target_size)
            },
        ));
        for (dirty, spec) in specs {
            let size = spec.memory;
            {
                let run = median(a.repeat, "total_ms", || migrate_once(&a, &plan, &spec))?;
                let say = format!(
                    "total {:.0} ms, downtime {:.1} ms",
                    run.row["total_ms"].as_f64().unwrap_or(0.0),
                    run.row["downtime_ms"].as_f64().unwrap_or(0.0)
                );
                let name = format!(
                    "size-{}M-{}{}{}",
                    size >> 20,
                    if dirty { "dirtying" } else { "idle" },
                    if spec.warm_destination {
                        "-prepared"
                    } else {
                        ""
                    },
                    if spec.page_checksums {
                        ""
                    } else {
                        "-no-page-crcs"
                    },
                );
                let mut row = keep(&a, &mut res, &name, run, say)?;
                let total = row["total_ms"].as_f64().unwrap_or(0.0);
                row["dirty"] = json!(dirty);
                row["ms_per_gib"] = json!(total / (size as f64 / GIB));
                res.size.push(row);
            }
        }
    }
    if plan.has(Section::Dirty) {
        for &rate in &plan.dirty_rates {
            let spec = Spec {
                working_set: if rate == 0 { 0 } else { plan.working_set },
                dirty_rate: rate,
                warm_destination: true,
                ..Spec::new(plan.memory)
            };
            let run = median(a.repeat, "downtime_ms", || migrate_once(&a, &plan, &spec))?;
            let say = format!(
                "downtime {:.1} ms, {} rounds",
                run.row["downtime_ms"].as_f64().unwrap_or(0.0),
                run.row["rounds"]
            );
            let name = format!("dirty-{}", rate_label(rate));
            let row = keep(&a, &mut res, &name, run, say)?;
            res.dirty.push(row);
        }
    }
    if plan.has(Section::Local) {
        for &size in &plan.sizes {
            let spec = Spec {
                local: true,
                ..Spec::new(size)
            };
            let run = median(a.repeat, "downtime_ms", || migrate_once(&a, &plan, &spec))?;
            let say = format!(
                "total {:.0} ms, downtime {:.1} ms",
                run.row["total_ms"].as_f64().unwrap_or(0.0),
                run.row["downtime_ms"].as_f64().unwrap_or(0.0)
            );
            let row = keep(&a, &mut res, &format!("local-{}M", size >> 20), run, say)?;
            res.local.push(row);
        }
    }
    if plan.has(Section::Compress) {
        let bytes = if a.suite.quick { 8 << 20 } else { 64 << 20 };
        for kind in ["pattern", "text"] {
            for level in [1, 3] {
                let row = super::compress::measure(kind, level, bytes)?;
                eprintln!(
                    "bench suite: zstd {level} on {kind} pages: {:.0} MB/s, ratio {:.2}",
                    row["compress_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
                    row["ratio"].as_f64().unwrap_or(0.0)
                );
                res.compress_rates.push(row);
            }
        }
        for compress in [None, Some(1)] {
            let spec = Spec {
                warm_destination: true,
                compress,
                ..Spec::new(plan.memory)
            };
            let run = median(a.repeat, "total_ms", || migrate_once(&a, &plan, &spec))?;
            let say = format!(
                "{:.0} MB/s",
                run.row["bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6
            );
            let name = match compress {
                None => "compress-none".to_string(),
                Some(l) => format!("compress-zstd-{l}"),
            };
            let row = keep(&a, &mut res, &name, run, say)?;
            res.compress.push(row);
        }
    }
    if plan.has(Section::Devices) {
        for &n in &plan.device_counts {
            // Without devices, parallel and serial are the same migration: one row.
            let modes: &[bool] = if n == 0 { &[true] } else { &[true, false] };
            for &parallel in modes {
                let run = median(a.repeat, "downtime_ms", || {
                    super::devices::row(&a, n, parallel, raw0)
                })?;
                let say = format!(
                    "downtime {:.1} ms",
                    run.row["downtime_ms"].as_f64().unwrap_or(0.0)
                );
                let mode = match (n, parallel) {
                    (0, _) => "none",
                    (_, true) => "parallel",
                    _ => "serial",
                };
                let mut run = run;
                if n == 0 {
                    // No device to read or send: the ideal is the RAM remainder over the raw
                    // link alone.
                    let last = run.source["report"]["rounds"]
                        .as_array()
                        .and_then(|r| r.last())
                        .and_then(|r| r["bytes"].as_f64())
                        .unwrap_or(0.0);
                    run.row["ideal_downtime_ms"] = json!(1e3 * last / raw0);
                    run.row["mode"] = json!("none");
                }
                let row = keep(&a, &mut res, &format!("devices-{n}-{mode}"), run, say)?;
                res.devices.push(row);
            }
        }
    }
    eprintln!("bench suite: raw loopback TCP again");
    res.raw_end = raw_tcp::measure(plan.raw_bytes)?;
    finish(&a, &plan, &how, &res)
}

// ---- Tables ----

fn mib(b: f64) -> f64 {
    b / MIB as f64
}

fn size_label(b: u64) -> String {
    if b >= 1 << 30 && b & ((1 << 30) - 1) == 0 {
        format!("{} GiB", b >> 30)
    } else {
        format!("{} MiB", b >> 20)
    }
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(0.0)
}

fn finish(a: &BenchArgs, plan: &Plan, how: &HowRun, res: &Results) -> anyhow::Result<ExitCode> {
    let raw = res.raw();
    let run_line = how.line();
    let load_end = run_facts::load_average();
    let mut md = String::new();
    let _ = writeln!(md, "# livemig benchmark suite\n");
    let _ = writeln!(md, "{run_line}\n");
    let _ = writeln!(
        md,
        "Raw loopback TCP: {:.0} MB/s at the start, {:.0} MB/s at the end; the limit used is \
         the better, {:.0} MB/s ({}; each a plain socket copy of {} MiB from a cache-hot buffer, \
         best of 1, 2 or 4 streams, 64 KiB or 1 MiB writes, default or 4 MiB socket buffers). \
         Raw memory copy: {:.0} MB/s (the same copy from a {} MiB buffer into another, both \
         faulted in beforehand: every byte read from RAM and written to RAM once, as a migration \
         must; best of 1, 2 or 4 streams). Load average at the end: {load_end}. Figures on a busy \
         machine move by tens of percent from run to run; compare the ratios within one run.\n",
        res.raw_start.0 / 1e6,
        res.raw_end.0 / 1e6,
        raw / 1e6,
        res.raw_how(),
        plan.raw_bytes >> 20,
        res.raw_memory / 1e6,
        plan.raw_bytes >> 20,
    );
    let raw_mem = res.raw_memory;

    if !res.channels.is_empty() {
        let _ = writeln!(
            md,
            "## RAM throughput against channel count\n\n{run_line}\n"
        );
        let _ = writeln!(
            md,
            "How: a filled, idle {} {} guest migrated between two processes over loopback TCP; \
             the destination started with --memory (guest memory pre-faulted before the source \
             connects). First round = the first round's bytes over its time; overall = all bytes \
             over the time from the first page to the end (setup excluded). Raw loopback TCP \
             (same run): {:.0} MB/s; raw memory copy: {:.0} MB/s. The last row runs without page \
             CRCs (`--page-checksums=false`).\n",
            size_label(plan.memory),
            how.guest,
            raw / 1e6,
            raw_mem / 1e6
        );
        md.push_str("| channels | total ms | downtime ms | rounds | first round MB/s | overall MB/s | first round / raw | overall / raw | overall / raw memory |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &res.channels {
            let label = if r["page_checksums"].as_bool() == Some(false) {
                format!("{}, no page CRCs", r["channels"])
            } else {
                r["channels"].to_string()
            };
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} |",
                label,
                num(r, "total_ms"),
                num(r, "downtime_ms"),
                r["rounds"],
                num(r, "first_round_bytes_per_s") / 1e6,
                num(r, "bytes_per_s") / 1e6,
                num(r, "first_round_bytes_per_s") / raw,
                num(r, "bytes_per_s") / raw,
                num(r, "bytes_per_s") / raw_mem,
            );
        }
        md.push('\n');
        if let Some(r) = res.channels.iter().find(|r| {
            r["channels"].as_u64() == Some(4) && r["page_checksums"].as_bool() != Some(false)
        }) {
            let ratio = num(r, "bytes_per_s") / raw;
            let _ = writeln!(
                md,
                "Target (issue 6): 4 channels at 0.85 or more of raw loopback TCP: {ratio:.2} here ({}); \
                 {:.2} of the raw memory copy.\n",
                if ratio >= 0.85 { "met" } else { "not met" },
                num(r, "bytes_per_s") / raw_mem
            );
        }
    }

    let mut size_json = json!({"rows": []});
    if !res.size.is_empty() {
        let _ = writeln!(
            md,
            "## Total time and downtime against guest size\n\n{run_line}\n"
        );
        let _ = writeln!(
            md,
            "How: filled {} guests, idle and dirtying {} MiB at {} pages/s, {CHANNELS} channels. \
             Prepared: the destination allocated and faulted in guest memory before the source \
             connected (`incoming --memory`, as QEMU's destination allocates guest RAM at \
             start-up). Cold: it allocates and pre-faults guest memory while the pages arrive, \
             so total time includes allocation and first touch (on this machine the first touch \
             of memory the hypervisor took back costs 1.5-1.9 s per GiB, and less for memory \
             freed a moment ago: cold rows depend on what ran before). Total time includes \
             connection set-up. The last row: the target's idle guest, prepared, without page \
             CRCs. Raw copy = guest bytes / raw loopback TCP ({:.0} MB/s); raw \
             memory copy = guest bytes / the raw memory-to-memory copy ({:.0} MB/s); ms per GiB = \
             total / guest size.\n",
            how.guest,
            a.suite.size_working_set >> 20,
            a.suite.size_dirty_rate,
            raw / 1e6,
            raw_mem / 1e6
        );
        md.push_str("| guest size | guest | destination | page CRCs | total ms | setup ms | downtime ms | rounds | raw copy ms | total / raw | raw memory copy ms | total / raw memory | ms per GiB |\n");
        md.push_str("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        let mut rows = Vec::new();
        for r in &res.size {
            let size = r["memory_bytes"].as_u64().unwrap_or(0);
            let raw_ms = 1e3 * size as f64 / raw;
            let raw_mem_ms = 1e3 * size as f64 / raw_mem;
            let mut r = r.clone();
            r["raw_copy_ms"] = json!(raw_ms);
            r["total_over_raw"] = json!(num(&r, "total_ms") / raw_ms);
            r["raw_memory_copy_ms"] = json!(raw_mem_ms);
            r["total_over_raw_memory"] = json!(num(&r, "total_ms") / raw_mem_ms);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.0} | {:.0} | {:.1} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
                size_label(size),
                if r["dirty"].as_bool().unwrap_or(false) {
                    "dirtying"
                } else {
                    "idle"
                },
                if r["warm_destination"].as_bool().unwrap_or(false) {
                    "prepared"
                } else {
                    "cold"
                },
                if r["page_checksums"].as_bool().unwrap_or(true) {
                    "yes"
                } else {
                    "no"
                },
                num(&r, "total_ms"),
                num(&r, "setup_ms"),
                num(&r, "downtime_ms"),
                r["rounds"],
                raw_ms,
                num(&r, "total_over_raw"),
                raw_mem_ms,
                num(&r, "total_over_raw_memory"),
                num(&r, "ms_per_gib"),
            );
            rows.push(r);
        }
        md.push('\n');
        let mut notes = Vec::new();
        for (dirty, warm) in [(false, true), (true, true), (false, false)] {
            let per: Vec<f64> = rows
                .iter()
                .filter(|r| r["dirty"].as_bool() == Some(dirty))
                .filter(|r| r["warm_destination"].as_bool() == Some(warm))
                .filter(|r| r["page_checksums"].as_bool() != Some(false))
                .map(|r| num(r, "ms_per_gib"))
                .collect();
            let (lo, hi) = per
                .iter()
                .fold((f64::MAX, 0.0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
            if per.len() > 1 && lo > 0.0 {
                notes.push((dirty, warm, hi / lo));
                let _ = writeln!(
                    md,
                    "Linearity, {}, {} destination: ms per GiB from {lo:.0} to {hi:.0} across sizes (largest / smallest = {:.2}).\n",
                    if dirty { "dirtying" } else { "idle" },
                    if warm { "prepared" } else { "cold" },
                    hi / lo
                );
            }
        }
        let idle_1g = |warm: bool, crcs: bool| {
            rows.iter().find(|r| {
                r["memory_bytes"].as_u64() == Some(1 << 30)
                    && r["dirty"].as_bool() == Some(false)
                    && r["warm_destination"].as_bool() == Some(warm)
                    && r["page_checksums"].as_bool() == Some(crcs)
            })
        };
        if let Some(t) = idle_1g(false, true) {
            let ratio = num(t, "total_over_raw");
            let _ =
                writeln!(
                md,
                "Target (issue 6): total / raw ≤ 1.3 for a filled idle 1 GiB guest, set-up and \
                 pre-faulting included: {ratio:.2} here with a cold destination ({}){}.\n",
                if ratio <= 1.3 { "met" } else { "not met" },
                [(true, true, "prepared"), (true, false, "prepared, no page CRCs")]
                    .iter()
                    .filter_map(|&(w, c, what)| idle_1g(w, c).map(|r| format!(
                        "; {:.2} ({what}; {:.2} of the raw memory copy)",
                        num(r, "total_over_raw"),
                        num(r, "total_over_raw_memory")
                    )))
                    .collect::<String>()
            );
        }
        size_json = json!({
            "rows": rows,
            "working_set_bytes": a.suite.size_working_set,
            "dirty_rate": a.suite.size_dirty_rate,
            "channels": CHANNELS,
            "ms_per_gib_spread": notes.iter().map(|(d, w, s)| json!({"dirty": d, "prepared_destination": w, "largest_over_smallest": s})).collect::<Vec<_>>(),
        });
    }

    if !res.dirty.is_empty() {
        let _ = writeln!(md, "## Downtime against dirty rate\n\n{run_line}\n");
        let _ = writeln!(
            md,
            "How: a filled {} {} guest writing pages of a {} MiB working set at each rate (0: \
             idle; max: as fast as one vCPU writes), {CHANNELS} channels, destination started \
             with --memory; livemig's defaults otherwise (switchover once the rest would move \
             within 300 ms, at most 30 rounds). Dirty MB/s = the rate asked for x 4 KiB; dirtied \
             in round 1 = the distinct pages written while the first round was sent (at most \
             the working set).\n",
            size_label(plan.memory),
            how.guest,
            plan.working_set >> 20
        );
        md.push_str("| dirty rate pages/s | dirty MB/s | dirtied in round 1 MiB | total ms | downtime ms | rounds | switchover | overall MB/s |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|---|---:|\n");
        for r in &res.dirty {
            let dirty_mbs = r["dirty_rate"]
                .as_f64()
                .map_or("-".into(), |p| format!("{:.0}", p * 4096.0 / 1e6));
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.1} | {} | {} | {:.0} |",
                r["dirty_rate_label"].as_str().unwrap_or(""),
                dirty_mbs,
                num(r, "first_round_dirty_after_pages") * 4096.0 / MIB as f64,
                num(r, "total_ms"),
                num(r, "downtime_ms"),
                r["rounds"],
                if r["forced_switchover"].as_bool().unwrap_or(false) {
                    "forced"
                } else {
                    "converged"
                },
                num(r, "bytes_per_s") / 1e6,
            );
        }
        md.push('\n');
    }

    if !res.local.is_empty() {
        let _ = writeln!(md, "## Local mode against guest size\n\n{run_line}\n");
        let _ = writeln!(
            md,
            "How: a filled, idle {} guest in memfd-backed memory migrated to a destination on the \
             same host over a Unix socket with `--local`: the destination maps the memory files \
             the source hands over (SCM_RIGHTS) and no page is copied; {CHANNELS} data channels \
             carry only device state (none here). Copied, cold = the idle row of the same size \
             in the size table, if run.\n",
            how.guest
        );
        md.push_str("| guest size | total ms | setup ms | downtime ms | RAM pages sent | copied, cold: total ms | copied, cold: downtime ms |\n");
        md.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
        for r in &res.local {
            let size = r["memory_bytes"].as_u64().unwrap_or(0);
            let copied = res.size.iter().find(|c| {
                c["memory_bytes"].as_u64() == Some(size)
                    && c["dirty"].as_bool() == Some(false)
                    && c["warm_destination"].as_bool() == Some(false)
            });
            let cell = |k: &str, prec: usize| {
                copied.map_or("-".to_string(), |c| format!("{:.prec$}", num(c, k)))
            };
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.2} | {} | {} | {} |",
                size_label(size),
                num(r, "total_ms"),
                num(r, "setup_ms"),
                num(r, "downtime_ms"),
                num(r, "ram_pages_sent"),
                cell("total_ms", 0),
                cell("downtime_ms", 1),
            );
        }
        md.push('\n');
        if let Some(r) = res
            .local
            .iter()
            .find(|r| r["memory_bytes"].as_u64() == Some(4 << 30))
        {
            let d = num(r, "downtime_ms");
            let _ = writeln!(
                md,
                "Target (issue 6): local mode, idle 4 GiB guest, downtime under 20 ms: {d:.2} ms here ({}).\n",
                if d < 20.0 { "met" } else { "not met" }
            );
        }
    }

    if !res.compress_rates.is_empty() {
        let _ = writeln!(md, "## The cost of zstd compression\n\n{run_line}\n");
        let _ = writeln!(
            md,
            "How: one core compresses and then decompresses {} MiB of pages in packets of 128 \
             pages, as a data channel does with `--compress zstd`: livemig's page pattern (what \
             the test guests hold) and text-like pages (a line repeated). Then the suite's idle \
             {} guest migrated to a prepared destination, 4 channels, without and with \
             `--compress zstd` (level 1); its pages are the pattern, which does not shrink, \
             so each channel tries, backs off (tries again after 1, 2, 4, ... up to 64 \
             packets) and sends the rest as they are: the second row is the price of trying. Compression pays where the link is slower than the cores can compress \
             and the pages shrink.\n",
            res.compress_rates
                .first()
                .map_or(0, |r| r["bytes"].as_u64().unwrap_or(0) >> 20),
            size_label(plan.memory)
        );
        md.push_str("| pages | zstd level | compress MB/s (1 core) | decompress MB/s | ratio |\n");
        md.push_str("|---|---:|---:|---:|---:|\n");
        for r in &res.compress_rates {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.0} | {:.2} |",
                r["pages"].as_str().unwrap_or(""),
                r["level"],
                num(r, "compress_bytes_per_s") / 1e6,
                num(r, "decompress_bytes_per_s") / 1e6,
                num(r, "ratio"),
            );
        }
        md.push('\n');
        if !res.compress.is_empty() {
            md.push_str(
                "| migration | total ms | MB/s | bytes sent | src CPU s/GiB | dst CPU s/GiB |\n",
            );
            md.push_str("|---|---:|---:|---:|---:|---:|\n");
            for r in &res.compress {
                let u = &r["usage"];
                let _ = writeln!(
                    md,
                    "| {} | {:.0} | {:.0} | {} | {:.2} | {:.2} |",
                    match r["compress_level"].as_i64() {
                        Some(l) => format!("--compress zstd, level {l}"),
                        None => "uncompressed".into(),
                    },
                    num(r, "total_ms"),
                    num(r, "bytes_per_s") / 1e6,
                    r["transferred_bytes"],
                    num(u, "source_cpu_s_per_gib"),
                    num(u, "dest_cpu_s_per_gib"),
                );
            }
            md.push('\n');
        }
    }

    if !res.devices.is_empty() {
        let _ = writeln!(md, "## Downtime against device count\n\n{run_line}\n");
        let dev_how = format!(
            "a {} {} guest dirtying {} MiB at {} pages/s, {} data channels, devices of {} MiB \
             read at {} MB/s (vfio-sim), 1 MiB chunks, default credit (2 x channels); parallel = \
             chunks on the data channels with credit, serial = each device in turn on the main \
             channel; the same rows as `livemig bench --mode devices`. Ideal = max(one device's \
             read time, all device bytes / raw TCP) + the last RAM round / raw TCP (without \
             devices: the last RAM round / raw TCP).",
            size_label(a.device_guest_memory),
            how.guest,
            a.working_set.min(a.device_guest_memory / 4) >> 20,
            a.dirty_rate,
            a.device_channels,
            a.device_size >> 20,
            a.device_rate / 1_000_000,
        );
        md.push_str(&super::devices::table(&res.devices, raw, &dev_how));
        md.push('\n');
    }

    if !res.resources.is_empty() {
        let _ = writeln!(
            md,
            "## Resources of every migration\n\n{run_line}\n\nHow: peak RSS = VmHWM of each \
             process, read by the process itself as it prints its final JSON line (the \
             destination's includes the guest memory it received; \"over guest\" is what is \
             left). Peak buffered = the sum of each device's largest reorder buffer on the \
             destination (a bound on what was buffered at once). CPU = user + system time of \
             the process from the start of the migration (source: after its guest started, was \
             filled and warmed up; destination: from when it waits for the source, after any \
             --memory pre-fault) less the guest's own threads (vCPUs, dirtying threads), per \
             GiB sent (RAM and device state).\n"
        );
        md.push_str("| migration | GiB moved | src peak RSS MiB | dst peak RSS MiB | dst over guest MiB | dst peak buffered MiB | src CPU s | dst CPU s | src CPU s/GiB | dst CPU s/GiB | guest CPU s (src) |\n");
        md.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for (name, u) in &res.resources {
            let _ = writeln!(
                md,
                "| {name} | {:.2} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                num(u, "moved_bytes") / GIB,
                mib(num(u, "source_peak_rss_bytes")),
                mib(num(u, "dest_peak_rss_bytes")),
                mib(num(u, "dest_rss_over_guest_bytes")),
                mib(num(u, "dest_peak_buffered_bytes")),
                num(u, "source_cpu_s"),
                num(u, "dest_cpu_s"),
                num(u, "source_cpu_s_per_gib"),
                num(u, "dest_cpu_s_per_gib"),
                num(u, "source_guest_cpu_s"),
            );
        }
        md.push('\n');
    }

    let channels_rows: Vec<Value> = res
        .channels
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["first_round_ratio_to_raw"] = json!(num(&r, "first_round_bytes_per_s") / raw);
            r["ratio_to_raw"] = json!(num(&r, "bytes_per_s") / raw);
            r
        })
        .collect();
    let mut how_json = how.json();
    how_json["load_average_end"] = json!(load_end);
    how_json["quick"] = json!(a.suite.quick);
    how_json["repeat"] = json!(a.repeat.max(1));
    let out = json!({
        "how": how_json,
        "raw_memory_bytes_per_s": raw_mem,
        "local": {"channels": CHANNELS, "rows": res.local},
        "compress": {"rates": res.compress_rates, "rows": res.compress},
        "raw_tcp": {
            "bytes_per_s": raw,
            "start_bytes_per_s": res.raw_start.0,
            "end_bytes_per_s": res.raw_end.0,
            "best": res.raw_how(),
            "copy_bytes": plan.raw_bytes,
        },
        "channels": {"memory_bytes": plan.memory, "rows": channels_rows},
        "size": size_json,
        "dirty": {
            "memory_bytes": plan.memory,
            "working_set_bytes": plan.working_set,
            "channels": CHANNELS,
            "rows": res.dirty,
        },
        "devices": {
            "guest_memory_bytes": a.device_guest_memory,
            "device_size_bytes": a.device_size,
            "device_rate": a.device_rate,
            "channels": a.device_channels,
            "rows": res.devices,
        },
        "resources": res.resources.iter().map(|(n, u)| {
            let mut u = u.clone();
            u["name"] = json!(n);
            u
        }).collect::<Vec<_>>(),
    });
    if let Some(dir) = &a.suite.out {
        let md_path = dir.join("bench.md");
        let json_path = dir.join("bench.json");
        std::fs::write(&md_path, &md)
            .with_context(|| format!("cannot write {}", md_path.display()))?;
        std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("cannot write {}", json_path.display()))?;
        eprintln!(
            "bench suite: wrote {} and {}",
            md_path.display(),
            json_path.display()
        );
    }
    if a.json {
        crate::emit(&out);
    } else {
        print!("{md}");
    }
    Ok(ExitCode::SUCCESS)
}
