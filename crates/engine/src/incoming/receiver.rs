//! A destination data channel thread: receives RamPages frames and writes the pages into
//! guest memory, meeting the other channels at every RoundEnd.

use super::barrier::{Aborted, RoundBarrier};
use super::streams::Streams;
use super::{Event, Failure, Heard};
use crate::config::TestHooks;
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::guest::GuestMemory;
use crate::hostmem::{self, PageClaims, Populated, TornPages};
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{
    ram, ChunkHeader, FrameHeader, FrameKind, Limits, RamPrefix, RoundEnd, CHUNK_PREFIX, PAGE_SIZE,
};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Totals over all data channels.
#[derive(Default)]
pub(crate) struct Counters {
    pub bytes: AtomicU64,
    pub normal_pages: AtomicU64,
    pub zero_pages: AtomicU64,
}

pub(crate) struct ChannelReceiver<'a> {
    pub index: u16,
    pub stream: Stream,
    pub memory: &'a GuestMemory,
    pub barrier: &'a RoundBarrier,
    pub limits: Limits,
    pub events: Sender<Heard>,
    pub counters: &'a Counters,
    pub claims: &'a PageClaims,
    /// Pages that hold received data (zero pages elsewhere need no write).
    pub populated: &'a Populated,
    /// Pages that arrived torn and must come again intact.
    pub torn: &'a TornPages,
    pub streams: &'a Streams,
    pub hooks: TestHooks,
    /// Local mode: guest memory is the source's, mapped; no page may be written here.
    pub local: bool,
    /// A session that may switch to postcopy: after the last precopy round the channel
    /// carries postcopy pages until `PostcopyDone`.
    pub postcopy: Option<&'a dyn super::postcopy::PostcopyPages>,
    /// The urgent channel: postcopy pages only, no precopy round.
    pub urgent: bool,
    /// In a session resuming a broken postcopy: postcopy pages only, no precopy round.
    pub resumed: bool,
}

/// Scratch for one packet: its pages' host addresses, and their I/O vectors. Lives on the
/// receiving thread's stack only (raw pointers are not `Send`, and need not be).
#[derive(Default)]
struct PageScratch {
    pages: Vec<*mut u8>,
    zeros: Vec<*mut u8>,
    iov: Vec<libc::iovec>,
    /// The packet's trailer of page CRCs.
    trailer: Vec<u8>,
    /// Compressed packets: the zstd frame, the pages it holds, and the decompressor.
    packed: Vec<u8>,
    unpacked: Vec<u8>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
}

impl ChannelReceiver<'_> {
    pub fn run(mut self) {
        if !self.urgent && !self.resumed {
            match self.serve() {
                Ok(rounds) => {
                    let _ = self.events.send(Ok(Event::ChannelDone(rounds)));
                }
                Err(e) => {
                    // This channel's own error first: the coordinator reports the first
                    // failure it hears of, and aborting the barrier makes the others fail too.
                    let _ = self.events.send(Err(Failure::Channel(e)));
                    self.barrier.abort();
                    return;
                }
            }
        }
        let Some(dest) = self.postcopy else {
            return;
        };
        match super::postcopy::receive(&mut self, dest) {
            // The urgent channel carries what was asked for; the data channels' ends count.
            Ok(()) if !self.urgent => {
                let _ = self.events.send(Ok(Event::PostcopyChannelDone));
            }
            Ok(()) => {}
            // Without a switch to postcopy the session ends with these channels open: their
            // end then is no failure.
            Err(e) if dest.is_armed() => {
                let _ = self.events.send(Err(Failure::Channel(e)));
            }
            Err(_) => {}
        }
    }

    /// Returns the number of rounds received once the last round has ended.
    fn serve(&mut self) -> Result<u32, ChannelError> {
        let channel = ChannelName::Data(self.index);
        let mut buf = Vec::new();
        let mut scratch = PageScratch::default();
        let mut round = 0u32;
        // The test hook's late pages (see `TestHooks::break_round_order`).
        #[cfg(feature = "test-hooks")]
        let mut late = super::late_pages::LatePages::default();
        loop {
            let h = framed::recv_header(&mut self.stream, channel, &self.limits)?;
            self.counters
                .bytes
                .fetch_add(livemig_wire::HEADER_LEN as u64 + h.len as u64, Relaxed);
            match h.kind {
                // Refused before anything is read: the source's guest still runs on this memory.
                FrameKind::RamPages if self.local => return Err(local_pages(channel)),
                #[cfg(feature = "test-hooks")]
                FrameKind::RamPages if self.hooks.break_round_order() => {
                    late.receive(self, &h, round, &mut buf)?
                }
                FrameKind::RamPages => self.receive_pages(&h, round, &mut buf, &mut scratch)?,
                FrameKind::DeviceChunk => {
                    receive_chunk(&mut self.stream, channel, &h, self.streams, false)?
                }
                FrameKind::RoundEnd => {
                    let end = self.read_round_end(&h, round, &mut buf)?;
                    #[cfg(feature = "test-hooks")]
                    if end.last && self.hooks.break_round_order() {
                        late.apply_all(self)?;
                    }
                    let leader = self.end_round(end.last, round)?;
                    if leader && !end.last {
                        let _ = self.events.send(Ok(Event::RoundApplied(round)));
                    }
                    round += 1;
                    if end.last {
                        return Ok(round);
                    }
                }
                FrameKind::Reject => {
                    // A Reject is the source's reason, which the payload carries.
                    framed::recv_payload(&mut self.stream, channel, &h, &mut buf)?;
                    return Err(unexpected(channel, h.kind));
                }
                // Refused before its payload is read: a data channel carries nothing else.
                other => return Err(unexpected(channel, other)),
            }
        }
    }

    /// Reads a RoundEnd's payload: the end of the round under way.
    fn read_round_end(
        &mut self,
        h: &FrameHeader,
        round: u32,
        buf: &mut Vec<u8>,
    ) -> Result<RoundEnd, ChannelError> {
        let channel = ChannelName::Data(self.index);
        framed::recv_payload(&mut self.stream, channel, h, buf)?;
        let end = RoundEnd::decode(buf).map_err(|source| ChannelError::Wire { channel, source })?;
        if end.round != round {
            return Err(ChannelError::Protocol {
                channel,
                detail: format!("RoundEnd for round {} during round {round}", end.round),
            });
        }
        Ok(end)
    }

    /// Meets the other channels at the end of `round` (the last one clears the round's page
    /// claims); whether this channel is the round's leader, which reports it applied.
    fn end_round(&self, last: bool, round: u32) -> Result<bool, ChannelError> {
        if self.hooks.break_round_order() {
            // The hook skips the sync on purpose; channel 0 reports.
            return Ok(self.index == 0);
        }
        self.barrier
            .wait(last, || self.claims.clear())
            .map_err(|why| ChannelError::Protocol {
                channel: ChannelName::Data(self.index),
                detail: match why {
                    Aborted::Disagree => {
                        format!("the data channels disagree whether round {round} is the last")
                    }
                    Aborted::Aborted => "aborted: another part of the migration failed".into(),
                },
            })
    }

    /// Receives a RamPages payload with its page data read straight into guest memory (or
    /// decompressed there), then checks each page's CRC over what landed. Nothing is written
    /// before the page addresses are validated and claimed; a page that fails its CRC is
    /// recorded as torn and must arrive again intact before the end (see `TornPages`).
    fn receive_pages(
        &mut self,
        h: &FrameHeader,
        round: u32,
        offsets: &mut Vec<u8>,
        ptrs: &mut PageScratch,
    ) -> Result<(), ChannelError> {
        let prefix = self.read_prefix(h, round, offsets)?;
        self.claim_pages(&prefix, offsets, round, ptrs)?;
        if prefix.compressed {
            self.receive_compressed(&prefix, ptrs)?;
        } else {
            // SAFETY: every pointer is a whole page inside guest memory (page_ptr checked
            // it), which stays mapped for the session, and this thread claimed each page for
            // this round, so no other thread touches it until the round barrier.
            unsafe { hostmem::read_pages(self.stream.as_raw_fd(), &ptrs.pages, &mut ptrs.iov) }
                .map_err(|source| ChannelError::Io {
                    channel: ChannelName::Data(self.index),
                    op: "receive pages",
                    source,
                })?;
        }
        self.check_pages(&prefix, offsets, ptrs)?;
        for &p in &ptrs.zeros {
            // SAFETY: as above, a claimed page of guest memory, which held received data.
            unsafe { std::ptr::write_bytes(p, 0, PAGE_SIZE) };
        }
        let c = self.counters;
        c.normal_pages.fetch_add(prefix.normal as u64, Relaxed);
        c.zero_pages.fetch_add(prefix.zero as u64, Relaxed);
        Ok(())
    }

    /// Reads a RamPages packet's prefix and page offsets (into `offsets`), the frame's CRC
    /// checked over both.
    #[inline]
    fn read_prefix(
        &mut self,
        h: &FrameHeader,
        round: u32,
        offsets: &mut Vec<u8>,
    ) -> Result<RamPrefix, ChannelError> {
        let channel = ChannelName::Data(self.index);
        let wire = |source| ChannelError::Wire { channel, source };
        let mut fixed = [0u8; ram::PREFIX_FIXED];
        framed::read_exact(&mut self.stream, channel, &mut fixed, false)?;
        let prefix = RamPrefix::decode(&fixed, h.len, &self.limits).map_err(wire)?;
        check_round(channel, prefix.round, round)?;
        offsets.resize(prefix.offsets_len(), 0);
        framed::read_exact(&mut self.stream, channel, offsets, false)?;
        // The frame's CRC covers the prefix; each page has its own.
        let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed), offsets);
        if crc != h.crc {
            return Err(wire(livemig_wire::WireError::BadCrc {
                kind: "RamPages",
                expected: h.crc,
                found: crc,
            }));
        }
        Ok(prefix)
    }

    /// Validates and claims each page of the packet for this round, and gathers the host
    /// addresses to fill (`ptrs.pages`) and to clear (`ptrs.zeros`).
    #[inline]
    fn claim_pages(
        &self,
        prefix: &RamPrefix,
        offsets: &[u8],
        round: u32,
        ptrs: &mut PageScratch,
    ) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(self.index);
        ptrs.pages.clear();
        ptrs.zeros.clear();
        for (i, addr) in ram::decode_offsets(offsets).enumerate() {
            let addr = addr.map_err(|source| ChannelError::Wire { channel, source })?;
            let ptr = hostmem::page_ptr(self.memory, addr).ok_or_else(|| outside(channel, addr))?;
            if !self.claims.insert(addr) {
                return Err(ChannelError::Protocol {
                    channel,
                    detail: format!("page 0x{addr:x} sent twice in round {round}"),
                });
            }
            if i < prefix.normal as usize {
                self.populated.mark(addr);
                ptrs.pages.push(ptr);
            } else if self.populated.holds_data(addr) {
                // A page that became zero on the source: clear the older copy. A page that
                // never held data is left alone: untouched, it reads as zero and costs no
                // memory (QEMU's receivedmap does the same).
                ptrs.zeros.push(ptr);
            }
        }
        Ok(())
    }

    /// Checks each filled page against the packet's trailer of CRCs, when it has one; a
    /// torn page must come again intact before the end (see `TornPages`).
    #[inline]
    fn check_pages(
        &mut self,
        prefix: &RamPrefix,
        offsets: &[u8],
        ptrs: &mut PageScratch,
    ) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(self.index);
        let wire = |source| ChannelError::Wire { channel, source };
        if !prefix.checked {
            // The source trusts the transport: each page counts as intact.
            for addr in ram::decode_offsets(offsets).take(prefix.normal as usize) {
                self.torn.arrived(addr.map_err(wire)?, true);
            }
            return Ok(());
        }
        ptrs.trailer.resize(prefix.trailer_len(), 0);
        framed::read_exact(&mut self.stream, channel, &mut ptrs.trailer, false)?;
        for ((&p, expected), addr) in ptrs
            .pages
            .iter()
            .zip(ram::decode_page_crcs(&ptrs.trailer))
            .zip(ram::decode_offsets(offsets))
        {
            // SAFETY: as in receive_pages; the page was just filled by this thread (the same
            // three-stream CRC as the source's, on a page fresh in the cache).
            let crc = unsafe { hostmem::page_crc(p) };
            self.torn.arrived(addr.map_err(wire)?, crc == expected);
        }
        Ok(())
    }

    /// Reads a compressed packet's zstd frame, decompresses it into exactly `normal` pages
    /// (a frame holding more or less is a protocol error, and never overruns the buffer)
    /// and copies them into the claimed pages of `ptrs`.
    fn receive_compressed(
        &mut self,
        prefix: &RamPrefix,
        ptrs: &mut PageScratch,
    ) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(self.index);
        // Bounded: RamPrefix::decode holds it below the packet's uncompressed size.
        ptrs.packed.resize(prefix.data_len, 0);
        framed::read_exact(&mut self.stream, channel, &mut ptrs.packed, false)?;
        let want = prefix.normal as usize * PAGE_SIZE;
        ptrs.unpacked.resize(want, 0);
        let z = match &mut ptrs.zstd {
            Some(z) => z,
            None => ptrs
                .zstd
                .insert(
                    zstd::bulk::Decompressor::new().map_err(|source| ChannelError::Io {
                        channel,
                        op: "set up zstd",
                        source,
                    })?,
                ),
        };
        let bad = |detail: String| ChannelError::Protocol { channel, detail };
        let got = z
            .decompress_to_buffer(&ptrs.packed[..], &mut ptrs.unpacked[..])
            .map_err(|e| {
                bad(format!(
                    "compressed pages do not decompress into {want} bytes: {e}"
                ))
            })?;
        if got != want {
            return Err(bad(format!(
                "compressed pages decompress into {got} bytes, not the {want} of {} pages",
                prefix.normal
            )));
        }
        for (&p, page) in ptrs.pages.iter().zip(ptrs.unpacked.chunks_exact(PAGE_SIZE)) {
            // SAFETY: p is a whole page of guest memory this thread claimed for the round
            // (see receive_pages); page is 4096 bytes of our own buffer.
            unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), p, PAGE_SIZE) };
        }
        Ok(())
    }
}

fn unexpected(channel: ChannelName, kind: FrameKind) -> ChannelError {
    ChannelError::Protocol {
        channel,
        detail: format!("unexpected {} frame on a data channel", kind.name()),
    }
}

fn local_pages(channel: ChannelName) -> ChannelError {
    ChannelError::Protocol {
        channel,
        detail: "a RamPages frame in local mode, where the destination maps the \
                 source's memory and takes no pages"
            .into(),
    }
}

pub(super) fn check_round(
    channel: ChannelName,
    found: u32,
    round: u32,
) -> Result<(), ChannelError> {
    if found == round {
        Ok(())
    } else {
        Err(ChannelError::Protocol {
            channel,
            detail: format!("page of round {found} arrived during round {round}"),
        })
    }
}

pub(super) fn outside(channel: ChannelName, addr: u64) -> ChannelError {
    ChannelError::Protocol {
        channel,
        detail: format!("page 0x{addr:x} lies outside guest memory"),
    }
}

/// Receives a DeviceChunk whose frame header has been read: its chunk header is checked
/// against the device's window before a byte of data is read or allocated, then the data is
/// read, its CRC checked, and the chunk handed to the device's reorder buffer. `wait`: wait
/// for credit instead of refusing (serial mode on the main channel).
pub(crate) fn receive_chunk(
    stream: &mut Stream,
    channel: ChannelName,
    h: &FrameHeader,
    streams: &Streams,
    wait: bool,
) -> Result<(), ChannelError> {
    let wire = |source| ChannelError::Wire { channel, source };
    let mut raw = [0u8; CHUNK_PREFIX];
    if (h.len as usize) < CHUNK_PREFIX {
        return Err(ChannelError::Protocol {
            channel,
            detail: format!("DeviceChunk of {} bytes is shorter than its header", h.len),
        });
    }
    framed::read_exact(stream, channel, &mut raw, false)?;
    let hdr = ChunkHeader::decode(&raw).map_err(wire)?;
    let len = h.len as usize - CHUNK_PREFIX;
    streams
        .admit(&hdr, len, wait)
        .map_err(|e| ChannelError::Protocol {
            channel,
            detail: e.to_string(),
        })?;
    // Admitted: the length is within the session's chunk size.
    let mut data = streams.buffer(len);
    framed::read_exact(stream, channel, &mut data, false)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&raw), &data);
    if crc != h.crc {
        return Err(wire(livemig_wire::WireError::BadCrc {
            kind: "DeviceChunk",
            expected: h.crc,
            found: crc,
        }));
    }
    streams.insert(&hdr, data);
    Ok(())
}
