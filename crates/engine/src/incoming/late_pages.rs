//! The `break-round-order` test hook's path on a data channel (see
//! `TestHooks::break_round_order`): the end-of-round sync is skipped, and data channel 0's
//! pages are held back and applied late, newest first, so older copies of a page land after
//! newer ones. Compiled only with the engine's `test-hooks` feature: a release build's
//! receive loop carries none of it.

use super::receiver::{check_round, outside, ChannelReceiver};
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::hostmem;
use livemig_wire::{FrameHeader, RamPacket, PAGE_SIZE};
use std::sync::atomic::Ordering::Relaxed;
use vm_memory::{Bytes, GuestAddress};

/// Data channel 0's packets, held back until the last round ends.
#[derive(Default)]
pub(super) struct LatePages {
    held: Vec<Vec<u8>>,
}

impl LatePages {
    /// Receives a RamPages frame whose header has been read: channel 0 holds it back, the
    /// others apply it at once.
    pub fn receive(
        &mut self,
        r: &mut ChannelReceiver<'_>,
        h: &FrameHeader,
        round: u32,
        buf: &mut Vec<u8>,
    ) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(r.index);
        framed::recv_payload(&mut r.stream, channel, h, buf)?;
        let pkt = RamPacket::decode(buf, &r.limits)
            .map_err(|source| ChannelError::Wire { channel, source })?;
        check_round(channel, pkt.round, round)?;
        if r.index == 0 {
            self.held.push(buf.clone());
            Ok(())
        } else {
            apply(r, &pkt, true)
        }
    }

    /// Applies the held packets, newest first.
    pub fn apply_all(&self, r: &ChannelReceiver<'_>) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(r.index);
        for payload in self.held.iter().rev() {
            // Stale on purpose: their torn state says nothing of the page now.
            let pkt = RamPacket::decode(payload, &r.limits)
                .map_err(|source| ChannelError::Wire { channel, source })?;
            apply(r, &pkt, false)?;
        }
        Ok(())
    }
}

/// Writes a packet's pages; `track_torn` records torn arrivals.
fn apply(
    r: &ChannelReceiver<'_>,
    pkt: &RamPacket<'_>,
    track_torn: bool,
) -> Result<(), ChannelError> {
    let channel = ChannelName::Data(r.index);
    if pkt.compressed_data().is_some() {
        return Err(ChannelError::Protocol {
            channel,
            detail: "the break-round-order test hook takes no compressed packets".into(),
        });
    }
    let outside = |addr| outside(channel, addr);
    for (addr, data, intact) in pkt.checked_pages() {
        r.memory
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| outside(addr))?;
        r.populated.mark(addr);
        if track_torn {
            r.torn.arrived(addr, intact);
        }
    }
    let page = [0u8; PAGE_SIZE];
    for addr in pkt.zero_addrs() {
        hostmem::page_ptr(r.memory, addr).ok_or_else(|| outside(addr))?;
        // A page that never held data reads as zero already (see `Populated`).
        if r.populated.holds_data(addr) {
            r.memory
                .write_slice(&page, GuestAddress(addr))
                .map_err(|_| outside(addr))?;
        }
    }
    r.counters
        .normal_pages
        .fetch_add(pkt.normal_count() as u64, Relaxed);
    r.counters
        .zero_pages
        .fetch_add(pkt.zero_count() as u64, Relaxed);
    Ok(())
}
