//! A source data channel thread: takes batches of page addresses, finds zero pages, and
//! sends one RamPages frame per batch, the pages written to the socket straight from guest
//! memory (one vectored write, no copy of ours), then their CRCs in the frame's trailer.
//!
//! The guest keeps writing while its pages are on their way, so a page can go out torn;
//! its CRC, taken after the kernel's copy, then fails at the destination. That is harmless:
//! the write dirtied the page again and a later round sends it anew (see
//! `livemig_wire::ram`).

use super::Event;
use crate::cancel::CancelToken;
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::guest::GuestMemory;
use crate::hostmem;
use crate::transport::Stream;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use livemig_wire::{ram, ChunkHeader, FrameHeader, FrameKind, RoundEnd, PAGE_SIZE};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;

/// Work for one data channel, in the order it must go on the wire.
pub(crate) enum Job {
    Pages {
        round: u32,
        addrs: Vec<u64>,
    },
    RoundEnd(RoundEnd),
    /// A chunk of a device's state stream.
    Chunk {
        device: u16,
        idx: u32,
        last: bool,
        data: Vec<u8>,
        /// Where the buffer goes back to once sent, for the device's next chunk.
        recycle: Sender<Vec<u8>>,
    },
}

/// How many batches a channel asks for ahead, so one is ready while the other is sent.
const PIPELINE: usize = 2;

pub(crate) struct ChannelSender<'a> {
    pub index: u16,
    pub stream: Stream,
    pub memory: &'a GuestMemory,
    pub jobs: Receiver<Job>,
    /// Where this channel says it can take another job.
    pub ready: Sender<u16>,
    pub events: Sender<Event>,
    pub cancel: CancelToken,
    pub counters: &'a crate::stats::Counters,
    /// An idle channel pings this often.
    pub ping_every: std::time::Duration,
    pub pages_per_packet: usize,
    /// Each page carries its CRC32C (see `livemig_wire::ram`).
    pub page_checksums: bool,
    /// Test hook: wait this long before sending each device chunk.
    pub chunk_delay: Option<std::time::Duration>,
}

impl ChannelSender<'_> {
    /// Runs until the job queue closes; reports a failure as an event before returning.
    pub fn run(mut self) {
        if let Err(e) = self.serve() {
            let _ = self.events.send(Event::Failed(e));
            self.cancel.cancel();
        }
    }

    fn serve(&mut self) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(self.index);
        let mut normal = Vec::with_capacity(self.pages_per_packet);
        let mut crcs = Vec::with_capacity(self.pages_per_packet);
        let mut ptrs: Vec<*const u8> = Vec::with_capacity(self.pages_per_packet);
        let mut iov = Vec::with_capacity(self.pages_per_packet + 2);
        let mut zero = Vec::with_capacity(self.pages_per_packet);
        let mut prefix = Vec::new();
        let mut trailer = Vec::new();
        for _ in 0..PIPELINE {
            if self.ready.send(self.index).is_err() {
                return Ok(());
            }
        }
        loop {
            let job = match self.jobs.recv_timeout(self.ping_every) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    // Idle: show the destination this side is alive.
                    framed::send_ping(&mut self.stream, channel)?;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            match job {
                Job::Pages { round, addrs } => {
                    normal.clear();
                    zero.clear();
                    ptrs.clear();
                    for &addr in &addrs {
                        let p = hostmem::page_ptr(self.memory, addr).ok_or_else(|| {
                            ChannelError::Protocol {
                                channel,
                                detail: format!("guest page 0x{addr:x} is outside guest memory"),
                            }
                        })? as *const u8;
                        // SAFETY: page_ptr checked the page lies wholly inside guest memory,
                        // which stays mapped for the migration.
                        if unsafe { hostmem::page_is_zero(p) } {
                            zero.push(addr);
                        } else {
                            normal.push(addr);
                            ptrs.push(p);
                        }
                    }
                    let checked = self.page_checksums;
                    ram::encode_prefix(round, &normal, &zero, checked, &mut prefix);
                    let trailer_len = ram::trailer_len(normal.len() as u32, checked) as usize;
                    let len = prefix.len() + normal.len() * PAGE_SIZE + trailer_len;
                    let header = FrameHeader {
                        kind: FrameKind::RamPages,
                        len: len as u32,
                        crc: crc32c::crc32c(&prefix),
                    }
                    .encode();
                    let io = |source| ChannelError::Io {
                        channel,
                        op: "send pages",
                        source,
                    };
                    // SAFETY: every pointer is a page of guest memory checked above; the
                    // kernel copies the pages as they are (a page the guest writes meanwhile
                    // arrives torn, which the destination tolerates in precopy).
                    unsafe {
                        hostmem::write_pages(
                            self.stream.as_raw_fd(),
                            &header,
                            &prefix,
                            &ptrs,
                            &mut iov,
                        )
                    }
                    .map_err(io)?;
                    if checked {
                        // Taken after the kernel's copy, so from the cache. A page written
                        // in between fails its CRC at the destination: torn, as it would be.
                        crcs.clear();
                        // SAFETY: as above.
                        crcs.extend(ptrs.iter().map(|&p| unsafe { hostmem::page_crc(p) }));
                        ram::encode_trailer(&crcs, &mut trailer);
                        self.stream.write_all(&trailer).map_err(io)?;
                    }
                    let c = self.counters;
                    c.bytes
                        .fetch_add((livemig_wire::HEADER_LEN + len) as u64, Relaxed);
                    c.ram_bytes
                        .fetch_add((livemig_wire::HEADER_LEN + len) as u64, Relaxed);
                    c.normal_pages.fetch_add(normal.len() as u64, Relaxed);
                    c.zero_pages.fetch_add(zero.len() as u64, Relaxed);
                    if self.ready.send(self.index).is_err() {
                        return Ok(());
                    }
                }
                Job::Chunk {
                    device,
                    idx,
                    last,
                    data,
                    recycle,
                } => {
                    if let Some(d) = self.chunk_delay {
                        std::thread::sleep(d);
                    }
                    let header = ChunkHeader { device, idx, last }.encode();
                    framed::send_parts(
                        &mut self.stream,
                        channel,
                        FrameKind::DeviceChunk,
                        &[&header, &data],
                    )?;
                    let c = self.counters;
                    c.bytes.fetch_add(
                        (livemig_wire::HEADER_LEN + header.len() + data.len()) as u64,
                        Relaxed,
                    );
                    c.device_bytes.fetch_add(data.len() as u64, Relaxed);
                    let _ = recycle.try_send(data);
                    if self.ready.send(self.index).is_err() {
                        return Ok(());
                    }
                }
                Job::RoundEnd(end) => {
                    framed::send(
                        &mut self.stream,
                        channel,
                        FrameKind::RoundEnd,
                        &end.encode(),
                    )?;
                    if self.events.send(Event::RoundSent(end.round)).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

/// True when every byte of the page is zero. The inner fold over 64 bytes compiles to
/// vector ORs; the outer `all` stops at the first non-zero block.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 0x80;
        assert!(!is_zero(&p));
    }
}
