//! The machine's raw loopback TCP limit, measured in the same run as livemig so the two can
//! be compared as a ratio: plain socket copies of `bytes` from a cache-hot buffer, over 1, 2
//! and 4 parallel streams, with 64 KiB and 1 MiB writes, default and 4 MiB socket buffers.
//! The best of all of them is the limit livemig is compared with.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

/// One configuration of the raw copy.
#[derive(Debug, Clone, Copy)]
struct Variant {
    streams: usize,
    write_size: usize,
    big_buffers: bool,
}

/// The best bytes per second over every variant, and a description of the one that won.
pub fn measure(bytes: u64) -> anyhow::Result<(f64, String)> {
    let mut best = (0.0, String::new());
    for streams in [1, 2, 4] {
        for write_size in [64 << 10, 1 << 20] {
            for big_buffers in [false, true] {
                let v = Variant {
                    streams,
                    write_size,
                    big_buffers,
                };
                let r = copy(bytes, v)?;
                if r > best.0 {
                    best = (
                        r,
                        format!(
                            "{streams} stream(s), {} KiB writes, {} socket buffers",
                            write_size >> 10,
                            if big_buffers { "4 MiB" } else { "default" }
                        ),
                    );
                }
            }
        }
    }
    Ok(best)
}

/// The same copy from memory into memory: `bytes` sent from a buffer of that size (filled,
/// already faulted in) and received into another (faulted in too), so each byte is read
/// from RAM once and written to RAM once, as a migration must, with nothing else done.
/// Best bytes per second over 1, 2 and 4 streams, 1 MiB writes, default and 4 MiB socket
/// buffers.
pub fn measure_memory(bytes: u64) -> anyhow::Result<f64> {
    let bytes = bytes as usize;
    let src: Vec<u8> = (0..bytes).map(|i| (i >> 12) as u8 ^ 0x5a).collect();
    let mut dst = vec![1u8; bytes];
    let mut best = 0.0f64;
    for streams in [1usize, 2, 4] {
        for big_buffers in [false, true] {
            dst.fill(1);
            let r = copy_memory(&src, &mut dst, streams, big_buffers)?;
            anyhow::ensure!(dst == src, "raw memory copy delivered wrong bytes");
            best = best.max(r);
        }
    }
    Ok(best)
}

fn copy_memory(
    src: &[u8],
    dst: &mut [u8],
    streams: usize,
    big_buffers: bool,
) -> anyhow::Result<f64> {
    const WRITE: usize = 1 << 20;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let per = src.len().div_ceil(streams);
    let mut pairs = Vec::new();
    for _ in 0..streams {
        let tx = TcpStream::connect(addr)?;
        let (rx, _) = listener.accept()?;
        if big_buffers {
            set_buffers(tx.as_raw_fd());
            set_buffers(rx.as_raw_fd());
        }
        pairs.push((tx, rx));
    }
    let start = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let mut hs = Vec::new();
        for ((mut tx, mut rx), (from, to)) in pairs
            .into_iter()
            .zip(src.chunks(per).zip(dst.chunks_mut(per)))
        {
            hs.push(s.spawn(move || -> std::io::Result<()> {
                for c in from.chunks(WRITE) {
                    tx.write_all(c)?;
                }
                Ok(())
            }));
            hs.push(s.spawn(move || rx.read_exact(to)));
        }
        for h in hs {
            h.join()
                .map_err(|_| anyhow::anyhow!("raw copy thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(src.len() as f64 / start.elapsed().as_secs_f64())
}

fn set_buffers(fd: i32) {
    let size: i32 = 4 << 20;
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket this function owns, with a live i32 and its size.
        unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&size as *const i32).cast(), 4);
        }
    }
}

fn copy(bytes: u64, v: Variant) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let per_stream = bytes / v.streams as u64;
    let start = Instant::now();
    let moved = std::thread::scope(|s| -> anyhow::Result<u64> {
        let mut receivers = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..v.streams {
            let mut tx = TcpStream::connect(addr)?;
            let (mut rx, _) = listener.accept()?;
            if v.big_buffers {
                set_buffers(tx.as_raw_fd());
                set_buffers(rx.as_raw_fd());
            }
            receivers.push(s.spawn(move || -> std::io::Result<u64> {
                let mut buf = vec![0u8; v.write_size];
                let mut got = 0u64;
                loop {
                    match rx.read(&mut buf)? {
                        0 => return Ok(got),
                        n => got += n as u64,
                    }
                }
            }));
            senders.push(s.spawn(move || -> std::io::Result<u64> {
                let buf = vec![0x5au8; v.write_size];
                let mut sent = 0u64;
                while sent < per_stream {
                    tx.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                Ok(sent)
            }));
        }
        let mut sent = 0;
        for h in senders {
            sent += h.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        let mut got = 0;
        for h in receivers {
            got += h
                .join()
                .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        }
        anyhow::ensure!(
            got == sent,
            "raw TCP copy lost bytes: sent {sent}, got {got}"
        );
        Ok(got)
    })?;
    Ok(moved as f64 / start.elapsed().as_secs_f64())
}
