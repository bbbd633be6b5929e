//! The cost of `--compress zstd`, for the suite: how fast one core compresses and
//! decompresses pages in packets of 128 (as the data channels do), and how much smaller they
//! get, for two kinds of memory: livemig's page pattern (what the test guests hold; it does
//! not compress) and text-like pages (a line repeated, which compresses very well). With the
//! migrations of the suite's compression rows this tells for which links compression pays.

use livemig_wire::PAGE_SIZE;
use serde::Serialize;
use std::time::Instant;

/// Pages per packet, as the data channels send them.
const PACKET: usize = 128 * PAGE_SIZE;

/// `bytes` of memory of `kind` ("pattern" or "text").
fn memory(kind: &str, bytes: usize) -> Vec<u8> {
    let mut out = vec![0u8; bytes];
    for (p, page) in out.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let page: &mut [u8; PAGE_SIZE] = page.try_into().expect("a page");
        if kind == "pattern" {
            livemig_vmm::pattern::fill(page, p as u64, 1);
        } else {
            let line = format!("page {p:08} of a guest whose memory holds text; ");
            for (i, b) in page.iter_mut().enumerate() {
                *b = line.as_bytes()[i % line.len()];
            }
        }
    }
    out
}

/// One row: how fast one core compresses and decompresses a kind of memory at a level.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CompressRate {
    /// "pattern" or "text".
    pub pages: &'static str,
    pub level: i32,
    pub bytes: usize,
    pub compressed_bytes: usize,
    pub ratio: f64,
    pub compress_bytes_per_s: f64,
    pub decompress_bytes_per_s: f64,
}

/// One row: compress and decompress `bytes` of `kind` memory at `level`, packet by packet,
/// on this thread.
pub(crate) fn measure(
    kind: &'static str,
    level: i32,
    bytes: usize,
) -> anyhow::Result<CompressRate> {
    let data = memory(kind, bytes);
    let mut z = zstd::bulk::Compressor::new(level)?;
    let mut d = zstd::bulk::Decompressor::new()?;
    let mut frames = Vec::new();
    let t = Instant::now();
    for packet in data.chunks(PACKET) {
        frames.push(z.compress(packet)?);
    }
    let compress_s = t.elapsed().as_secs_f64();
    let packed: usize = frames.iter().map(Vec::len).sum();
    let mut out = vec![0u8; PACKET];
    let t = Instant::now();
    for (frame, packet) in frames.iter().zip(data.chunks(PACKET)) {
        let n = d.decompress_to_buffer(&frame[..], &mut out[..])?;
        anyhow::ensure!(out[..n] == *packet, "zstd round trip changed the pages");
    }
    let decompress_s = t.elapsed().as_secs_f64();
    Ok(CompressRate {
        pages: kind,
        level,
        bytes,
        compressed_bytes: packed,
        ratio: bytes as f64 / packed.max(1) as f64,
        compress_bytes_per_s: bytes as f64 / compress_s,
        decompress_bytes_per_s: bytes as f64 / decompress_s,
    })
}
