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
use livemig_wire::{ram, ChunkHeader, FrameHeader, FrameKind, RamFlags, RoundEnd, PAGE_SIZE};
use std::io::IoSlice;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use vm_memory::{Bytes, GuestAddress};

/// Work for one data channel, in the order it must go on the wire.
pub(crate) enum Job {
    Pages {
        round: u32,
        addrs: Vec<u64>,
    },
    RoundEnd(RoundEnd),
    /// Postcopy: no more pages on this channel.
    PostcopyDone,
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

/// A channel's zstd compressor, and how many packets to send without trying it: memory that
/// does not compress costs a core 2-3 s per GiB to find out (zstd level 1 runs at about
/// 400 MB/s on it here, against 3.5 GB/s on text), so after a packet that did not shrink by
/// an eighth the channel sends the next ones straight from guest memory, one packet, then 2,
/// 4, ... up to 64 packets between tries; a packet that shrank resets that.
struct Compression {
    z: zstd::bulk::Compressor<'static>,
    /// Packets still to send without trying.
    skip: u32,
    /// Packets to skip after the next failed try.
    backoff: u32,
}

impl Compression {
    const MAX_BACKOFF: u32 = 64;

    /// Whether to try compressing this packet.
    fn try_this_packet(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            false
        } else {
            true
        }
    }

    /// Records a try: `packed` bytes out of `raw`.
    fn outcome(&mut self, packed: usize, raw: usize) {
        if packed <= raw - raw / 8 {
            self.backoff = 1;
        } else {
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
        }
    }
}

/// A channel's buffers, reused from packet to packet.
struct Scratch {
    normal: Vec<u64>,
    zero: Vec<u64>,
    ptrs: Vec<*const u8>,
    crcs: Vec<u32>,
    iov: Vec<libc::iovec>,
    prefix: Vec<u8>,
    trailer: Vec<u8>,
    /// Compression only: the pages copied out of guest memory, and their zstd frame.
    batch: Vec<u8>,
    packed: Vec<u8>,
}

impl Scratch {
    fn new(pages: usize) -> Scratch {
        Scratch {
            normal: Vec::with_capacity(pages),
            zero: Vec::with_capacity(pages),
            ptrs: Vec::with_capacity(pages),
            crcs: Vec::with_capacity(pages),
            iov: Vec::with_capacity(pages + 2),
            prefix: Vec::new(),
            trailer: Vec::new(),
            batch: Vec::new(),
            packed: Vec::new(),
        }
    }
}

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
    /// Compress pages with zstd at this level.
    pub compress: Option<i32>,
    /// Test hook: wait this long before sending each device chunk.
    #[cfg(feature = "test-hooks")]
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
        let mut scratch = Scratch::new(self.pages_per_packet);
        let mut compressor = self.compressor()?;
        let mut postcopy_from: Option<u64> = None;
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
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            match job {
                Job::Pages { round, addrs } => {
                    self.send_batch(round, &addrs, &mut scratch, compressor.as_mut())?
                }
                Job::Chunk {
                    device,
                    idx,
                    last,
                    data,
                    recycle,
                } => {
                    let header = ChunkHeader { device, idx, last };
                    self.send_chunk(header, &data)?;
                    let _ = recycle.try_send(data);
                }
                Job::RoundEnd(end) => {
                    framed::send(
                        &mut self.stream,
                        channel,
                        FrameKind::RoundEnd,
                        &end.encode(),
                    )?;
                    postcopy_from = end.last.then_some(self.counters.normal_pages.load(Relaxed));
                    if self.events.send(Event::RoundSent(end.round)).is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Job::PostcopyDone => {
                    // The pages every channel sent since precopy ended: a figure for the
                    // destination's report, not a count it checks.
                    let pages = postcopy_from
                        .map_or(0, |from| self.counters.normal_pages.load(Relaxed) - from);
                    let done = livemig_wire::PostcopyDone { pages };
                    framed::send(
                        &mut self.stream,
                        channel,
                        FrameKind::PostcopyDone,
                        &done.encode(),
                    )?;
                    continue;
                }
            }
            // Ready for the next job once this one is on the wire.
            if self.ready.send(self.index).is_err() {
                return Ok(());
            }
        }
    }

    /// zstd's compressor, when pages are compressed.
    fn compressor(&self) -> Result<Option<Compression>, ChannelError> {
        let Some(level) = self.compress else {
            return Ok(None);
        };
        let z = zstd::bulk::Compressor::new(level).map_err(|source| ChannelError::Io {
            channel: ChannelName::Data(self.index),
            op: "set up zstd",
            source,
        })?;
        Ok(Some(Compression {
            z,
            skip: 0,
            backoff: 1,
        }))
    }

    /// One batch of pages: sorted into zero and normal pages, sent (compressed when it pays).
    fn send_batch(
        &mut self,
        round: u32,
        addrs: &[u64],
        s: &mut Scratch,
        compressor: Option<&mut Compression>,
    ) -> Result<(), ChannelError> {
        self.classify(addrs, s)?;
        let len = match compressor {
            Some(c) if !s.normal.is_empty() => {
                if c.try_this_packet() {
                    self.send_compressed(round, s, c)?
                } else {
                    self.send_from_memory(round, s)?
                }
            }
            _ => self.send_from_memory(round, s)?,
        };
        let c = self.counters;
        c.bytes
            .fetch_add((livemig_wire::HEADER_LEN + len) as u64, Relaxed);
        c.ram_bytes
            .fetch_add((livemig_wire::HEADER_LEN + len) as u64, Relaxed);
        c.normal_pages.fetch_add(s.normal.len() as u64, Relaxed);
        c.zero_pages.fetch_add(s.zero.len() as u64, Relaxed);
        Ok(())
    }

    /// One device chunk.
    fn send_chunk(&mut self, header: ChunkHeader, data: &[u8]) -> Result<(), ChannelError> {
        #[cfg(feature = "test-hooks")]
        if let Some(d) = self.chunk_delay {
            std::thread::sleep(d);
        }
        let header = header.encode();
        framed::send_parts(
            &mut self.stream,
            ChannelName::Data(self.index),
            FrameKind::DeviceChunk,
            &[&header, data],
        )?;
        let c = self.counters;
        c.bytes.fetch_add(
            (livemig_wire::HEADER_LEN + header.len() + data.len()) as u64,
            Relaxed,
        );
        c.device_bytes.fetch_add(data.len() as u64, Relaxed);
        Ok(())
    }
}

impl ChannelSender<'_> {
    /// Sorts a batch into zero pages and normal pages (with their host addresses).
    fn classify(&self, addrs: &[u64], s: &mut Scratch) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(self.index);
        s.normal.clear();
        s.zero.clear();
        s.ptrs.clear();
        for &addr in addrs {
            let p = hostmem::page_ptr(self.memory, addr).ok_or_else(|| ChannelError::Protocol {
                channel,
                detail: format!("guest page 0x{addr:x} is outside guest memory"),
            })? as *const u8;
            // SAFETY: page_ptr checked the page lies wholly inside guest memory, which stays
            // mapped for the migration.
            if unsafe { hostmem::page_is_zero(p) } {
                s.zero.push(addr);
            } else {
                s.normal.push(addr);
                s.ptrs.push(p);
            }
        }
        Ok(())
    }

    /// Sends the batch straight from guest memory, then the CRCs; returns the payload's
    /// length.
    fn send_from_memory(&mut self, round: u32, s: &mut Scratch) -> Result<usize, ChannelError> {
        let channel = ChannelName::Data(self.index);
        let flags = RamFlags {
            checked: self.page_checksums,
            compressed: false,
        };
        ram::encode_prefix(round, &s.normal, &s.zero, flags, &mut s.prefix);
        let trailer_len = ram::trailer_len(s.normal.len() as u32, flags.checked) as usize;
        let len = s.prefix.len() + s.normal.len() * PAGE_SIZE + trailer_len;
        let header = FrameHeader {
            version: livemig_wire::FRAME_VERSION,
            kind: FrameKind::RamPages,
            len: len as u32,
            crc: crc32c::crc32c(&s.prefix),
        }
        .encode();
        let io = |source| ChannelError::Io {
            channel,
            op: "send pages",
            source,
        };
        // SAFETY: every pointer is a page of guest memory checked in `classify`; the kernel
        // copies the pages as they are (a page the guest writes meanwhile arrives torn,
        // which the destination tolerates in precopy).
        unsafe {
            hostmem::write_pages(
                self.stream.as_raw_fd(),
                &header,
                &s.prefix,
                &s.ptrs,
                &mut s.iov,
            )
        }
        .map_err(io)?;
        if flags.checked {
            // Taken after the kernel's copy, so from the cache. A page written in between
            // fails its CRC at the destination: torn, as it would be.
            s.crcs.clear();
            // SAFETY: as above.
            s.crcs
                .extend(s.ptrs.iter().map(|&p| unsafe { hostmem::page_crc(p) }));
            ram::encode_trailer(&s.crcs, &mut s.trailer);
            self.stream.write_all(&s.trailer).map_err(io)?;
        }
        Ok(len)
    }

    /// Copies the batch's pages out of guest memory, compresses them as one zstd frame and
    /// sends that, or the copy itself when it does not shrink; returns the payload's length.
    fn send_compressed(
        &mut self,
        round: u32,
        s: &mut Scratch,
        c: &mut Compression,
    ) -> Result<usize, ChannelError> {
        let z = &mut c.z;
        let channel = ChannelName::Data(self.index);
        let raw_len = s.normal.len() * PAGE_SIZE;
        s.batch.resize(raw_len, 0);
        for (page, &addr) in s.batch.chunks_exact_mut(PAGE_SIZE).zip(&s.normal) {
            // vm-memory's copy reads guest memory the guest may be writing: the copy is what
            // is compressed and checked, so a page torn here is torn consistently.
            self.memory
                .read_slice(page, GuestAddress(addr))
                .map_err(|e| ChannelError::Protocol {
                    channel,
                    detail: format!("guest page 0x{addr:x}: {e}"),
                })?;
        }
        s.packed.clear();
        s.packed.reserve(zstd::zstd_safe::compress_bound(raw_len));
        let io = |op| {
            move |source| ChannelError::Io {
                channel,
                op,
                source,
            }
        };
        let packed = z
            .compress_to_buffer(&s.batch[..], &mut s.packed)
            .map_err(io("compress pages"))?;
        let compressed = packed < raw_len;
        c.outcome(packed, raw_len);
        let flags = RamFlags {
            checked: self.page_checksums,
            compressed,
        };
        ram::encode_prefix(round, &s.normal, &s.zero, flags, &mut s.prefix);
        s.crcs.clear();
        if flags.checked {
            s.crcs
                .extend(s.batch.chunks_exact(PAGE_SIZE).map(crc32c::crc32c));
        }
        ram::encode_trailer(&s.crcs, &mut s.trailer);
        let data = if compressed {
            &s.packed[..]
        } else {
            &s.batch[..]
        };
        let len = s.prefix.len() + data.len() + s.trailer.len();
        let header = FrameHeader {
            version: livemig_wire::FRAME_VERSION,
            kind: FrameKind::RamPages,
            len: len as u32,
            crc: crc32c::crc32c(&s.prefix),
        }
        .encode();
        let mut parts = [
            IoSlice::new(&header),
            IoSlice::new(&s.prefix),
            IoSlice::new(data),
            IoSlice::new(&s.trailer),
        ];
        self.stream
            .write_all_vectored(&mut parts)
            .map_err(io("send pages"))?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::Compression;

    #[test]
    fn compression_backs_off_on_memory_that_does_not_shrink_and_comes_back() {
        let mut c = Compression {
            z: zstd::bulk::Compressor::new(1).unwrap(),
            skip: 0,
            backoff: 1,
        };
        let tried = |c: &mut Compression, packets: usize| {
            (0..packets).filter(|_| c.try_this_packet()).count()
        };
        // Failed tries skip 1, 2, 4, ... packets, up to 64.
        let mut gaps = Vec::new();
        for _ in 0..8 {
            assert!(c.try_this_packet());
            c.outcome(1000, 1000);
            let mut gap = 0;
            while !c.try_this_packet() {
                gap += 1;
            }
            c.skip = 0; // undo the probe just taken, to measure the next gap alone
            gaps.push(gap);
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 16, 32, 64, 64]);
        // A packet that shrank by an eighth or more resets it: every packet is tried again.
        c.outcome(100, 1000);
        assert_eq!(tried(&mut c, 10), 10);
        // Shrinking by less than an eighth is not worth the CPU.
        c.outcome(900, 1000);
        assert_eq!(tried(&mut c, 2), 1);
    }
}
