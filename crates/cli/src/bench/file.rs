//! `livemig bench --mode file`: a save to a file and a restore from it, beside what the same
//! filesystem does with a plain sequential write and read of the same bytes, measured in the
//! same run (issue 17's targets: save >= 0.8 x raw write, eager restore >= 0.8 x raw read,
//! file size about the data).
//!
//! Every figure is the median of three runs; the ratios are medians of each run's pair (a
//! raw pass and livemig's, one after the other). The raw write is a buffered `write` of the bytes
//! from memory in 2 MiB pieces, then `fsync`; the save is a live save of an idle synthetic
//! guest holding that much data (every page), `fsync` included. Reads are cold: the file's
//! pages are dropped from the page cache first (`posix_fadvise(DONTNEED)`, this file only),
//! and both read into fresh memory (first touch included on both sides). The on-demand
//! restore reports when the guest ran again. A sparse guest (a tenth of its pages holding
//! data) shows the file's allocated size against its data.

use super::BenchArgs;
use livemig_engine::file::{restore_vm, save_vm, RestoreConfig, SaveConfig};
use livemig_engine::{Factories, Vm};
use livemig_vmm::devices::DeviceModels;
use livemig_vmm::memory::Backing;
use livemig_vmm::synthetic::{SyntheticConfig, SyntheticGuest, Workload};
use livemig_vmm::Factory;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Drops `path`'s pages from the page cache, so the next read comes from the disk.
fn evict(path: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: an advisory call on our own descriptor; no memory is passed.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(())
}

/// Seconds to write `data` to `path` sequentially and sync it.
fn raw_write(path: &Path, data: &[u8]) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut f = std::fs::File::create(path)?;
    for piece in data.chunks(2 << 20) {
        f.write_all(piece)?;
    }
    f.sync_all()?;
    Ok(t.elapsed().as_secs_f64())
}

/// Seconds to read `path` (cold) sequentially into fresh memory.
fn raw_read(path: &Path, len: usize) -> anyhow::Result<f64> {
    use std::io::Read;
    evict(path)?;
    let t = Instant::now();
    let mut buf = vec![0u8; len];
    let mut f = std::fs::File::open(path)?;
    for piece in buf.chunks_mut(2 << 20) {
        f.read_exact(piece)?;
    }
    std::hint::black_box(&buf);
    Ok(t.elapsed().as_secs_f64())
}

fn guest(memory: u64, fill: f64) -> anyhow::Result<SyntheticGuest> {
    Ok(SyntheticGuest::start(&SyntheticConfig {
        memory_bytes: memory,
        fill,
        workload: Workload {
            working_set_pages: 0,
            rate: 0,
            threads: 1,
        },
        backing: Backing::Anonymous,
    })?)
}

/// Saves `g` to `path`; returns the save's seconds and report.
fn save(
    g: &SyntheticGuest,
    path: &Path,
    channels: u16,
) -> anyhow::Result<(f64, serde_json::Value)> {
    let vm = Vm {
        guest: g,
        devices: &[],
        vmstates: &[],
    };
    let config = SaveConfig {
        channels,
        ..SaveConfig::default()
    };
    let t = Instant::now();
    let r = save_vm(vm, path, &config, &|_| {})?;
    Ok((t.elapsed().as_secs_f64(), serde_json::to_value(&r)?))
}

/// Restores `path` (cold); returns its seconds and report.
fn restore(path: &Path, readers: u16, on_demand: bool) -> anyhow::Result<(f64, serde_json::Value)> {
    evict(path)?;
    let f = Factories {
        guest: &Factory,
        devices: &DeviceModels,
    };
    let config = RestoreConfig {
        readers,
        on_demand,
        ..RestoreConfig::default()
    };
    let t = Instant::now();
    let r = restore_vm(path, f, &config)?;
    let secs = t.elapsed().as_secs_f64();
    Ok((secs, serde_json::to_value(&r.report)?))
}

/// What the file benchmark measured (medians of [`RUNS`]).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct FileBench {
    pub bytes: u64,
    pub channels: u16,
    pub runs: usize,
    pub dir: std::path::PathBuf,
    pub raw_write_bytes_per_s: f64,
    pub save_bytes_per_s: f64,
    /// Save rate over the raw write rate, the median of each run's pair (target: at least
    /// 0.8): each run's raw write and save follow each other, so a busy disk weighs on both.
    pub save_vs_raw_write: f64,
    pub raw_read_bytes_per_s: f64,
    pub restore_bytes_per_s: f64,
    /// Eager restore rate over the raw read rate, the median of each run's pair (target: at
    /// least 0.8).
    pub restore_vs_raw_read: f64,
    /// On demand: from the call until the guest ran again.
    pub on_demand_resumed_ms: f64,
    /// On demand: until every page was in.
    pub on_demand_total_ms: f64,
    /// A guest with a tenth of its pages holding data: its data, the file's length and the
    /// file's allocated bytes.
    pub sparse_data_bytes: u64,
    pub sparse_file_len: u64,
    pub sparse_allocated_bytes: u64,
}

/// Measures `bytes` of data through a file with `channels` threads (see the module docs).
pub(crate) fn measure(bytes: u64, channels: u16) -> anyhow::Result<FileBench> {
    let dir = std::env::temp_dir();
    let (raw, saved) = (
        dir.join("livemig-bench-raw"),
        dir.join("livemig-bench.lmsave"),
    );
    let mut data = vec![0u8; bytes as usize];
    for (p, page) in data.chunks_exact_mut(4096).enumerate() {
        livemig_vmm::pattern::fill(page.try_into().expect("a page"), p as u64, 1);
    }
    let g = guest(bytes, 1.0)?;
    let mut rows: Vec<[f64; 6]> = Vec::new();
    for run in 0..RUNS {
        let w = raw_write(&raw, &data)?;
        let (s, _) = save(&g, &saved, channels)?;
        let r = raw_read(&raw, bytes as usize)?;
        let (e, _) = restore(&saved, channels, false)?;
        let (od, report) = restore(&saved, channels, true)?;
        let resumed = report["resumed_ms"].as_f64().unwrap_or(f64::NAN);
        let mb = |secs: f64| bytes as f64 / secs / 1e6;
        eprintln!(
            "bench file: run {run}: raw write {:.0} MB/s, save {:.0} MB/s, raw read {:.0} MB/s, \
             eager restore {:.0} MB/s, on demand running after {resumed:.1} ms",
            mb(w),
            mb(s),
            mb(r),
            mb(e)
        );
        rows.push([w, s, r, e, resumed, od * 1e3]);
    }
    drop((data, g));
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let rate = |secs: f64| bytes as f64 / secs;
    let sparse = guest(bytes, 0.1)?;
    let (_, sparse_report) = save(&sparse, &saved, channels)?;
    let allocated = std::fs::metadata(&saved)?.blocks() * 512;
    for p in [&raw, &saved] {
        let _ = std::fs::remove_file(p);
    }
    Ok(FileBench {
        bytes,
        channels,
        runs: RUNS,
        dir,
        raw_write_bytes_per_s: rate(col(0)),
        save_bytes_per_s: rate(col(1)),
        save_vs_raw_write: median(rows.iter().map(|r| r[0] / r[1]).collect()),
        raw_read_bytes_per_s: rate(col(2)),
        restore_bytes_per_s: rate(col(3)),
        restore_vs_raw_read: median(rows.iter().map(|r| r[2] / r[3]).collect()),
        on_demand_resumed_ms: col(4),
        on_demand_total_ms: col(5),
        sparse_data_bytes: sparse_report["pages_in_file"].as_u64().unwrap_or(0) * 4096,
        sparse_file_len: sparse_report["file_len"].as_u64().unwrap_or(0),
        sparse_allocated_bytes: allocated,
    })
}

pub fn run(a: &BenchArgs) -> anyhow::Result<ExitCode> {
    let out = measure(a.memory, a.channels.first().copied().unwrap_or(4))?;
    match a.json {
        true => crate::emit(&serde_json::to_value(&out)?),
        false => println!("{}", serde_json::to_string_pretty(&out)?),
    }
    Ok(ExitCode::SUCCESS)
}
