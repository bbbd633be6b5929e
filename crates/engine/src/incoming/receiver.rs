//! A destination data channel thread: receives RamPages frames and writes the pages into
//! guest memory, meeting the other channels at every RoundEnd.

use super::barrier::RoundBarrier;
use super::Event;
use crate::config::TestHooks;
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::guest::GuestMemory;
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{FrameKind, Limits, RamPacket, RoundEnd, PAGE_SIZE};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use vm_memory::{Bytes, GuestAddress};

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
    pub events: Sender<Event>,
    pub counters: &'a Counters,
    pub hooks: TestHooks,
}

impl ChannelReceiver<'_> {
    pub fn run(mut self) {
        let ev = match self.serve() {
            Ok(rounds) => Event::ChannelDone(rounds),
            Err(e) => {
                self.barrier.abort();
                Event::ChannelFailed(e)
            }
        };
        let _ = self.events.send(ev);
    }

    /// Returns the number of rounds received once the last round has ended.
    fn serve(&mut self) -> Result<u32, ChannelError> {
        let channel = ChannelName::Data(self.index);
        let mut buf = Vec::new();
        let mut round = 0u32;
        // The test hook's late pages (see `TestHooks::break_round_order`).
        let mut late: Vec<Vec<u8>> = Vec::new();
        let delay_mine = self.hooks.break_round_order && self.index == 0;
        let wire = |source| ChannelError::Wire { channel, source };
        loop {
            let h = framed::recv(&mut self.stream, channel, &self.limits, &mut buf)?;
            self.counters
                .bytes
                .fetch_add(livemig_wire::HEADER_LEN as u64 + h.len as u64, Relaxed);
            match h.kind {
                FrameKind::RamPages => {
                    let pkt = RamPacket::decode(&buf, &self.limits).map_err(wire)?;
                    if pkt.round != round {
                        return Err(ChannelError::Protocol {
                            channel,
                            detail: format!(
                                "page of round {} arrived during round {round}",
                                pkt.round
                            ),
                        });
                    }
                    if delay_mine {
                        late.push(buf.clone());
                    } else {
                        self.apply(&pkt)?;
                    }
                }
                FrameKind::RoundEnd => {
                    let end = RoundEnd::decode(&buf).map_err(wire)?;
                    if end.round != round {
                        return Err(ChannelError::Protocol {
                            channel,
                            detail: format!(
                                "RoundEnd for round {} during round {round}",
                                end.round
                            ),
                        });
                    }
                    if end.last && delay_mine {
                        for payload in late.iter().rev() {
                            self.apply(&RamPacket::decode(payload, &self.limits).map_err(wire)?)?;
                        }
                    }
                    let leader = if self.hooks.break_round_order {
                        self.index == 0
                    } else {
                        self.barrier.wait().map_err(|_| ChannelError::Protocol {
                            channel,
                            detail: "aborted: another part of the migration failed".into(),
                        })?
                    };
                    if leader && !end.last {
                        let _ = self.events.send(Event::RoundApplied(round));
                    }
                    round += 1;
                    if end.last {
                        return Ok(round);
                    }
                }
                other => {
                    return Err(ChannelError::Protocol {
                        channel,
                        detail: format!("unexpected {} frame on a data channel", other.name()),
                    })
                }
            }
        }
    }

    fn apply(&self, pkt: &RamPacket<'_>) -> Result<(), ChannelError> {
        let channel = ChannelName::Data(self.index);
        let outside = |addr: u64| ChannelError::Protocol {
            channel,
            detail: format!("page 0x{addr:x} lies outside guest memory"),
        };
        for (addr, data) in pkt.pages() {
            self.memory
                .write_slice(data, GuestAddress(addr))
                .map_err(|_| outside(addr))?;
        }
        let mut page = [0u8; PAGE_SIZE];
        for addr in pkt.zero_addrs() {
            // Untouched destination memory is already zero: write only over an older copy.
            self.memory
                .read_slice(&mut page, GuestAddress(addr))
                .map_err(|_| outside(addr))?;
            if !crate::source::is_zero(&page) {
                page.fill(0);
                self.memory
                    .write_slice(&page, GuestAddress(addr))
                    .map_err(|_| outside(addr))?;
            }
        }
        self.counters
            .normal_pages
            .fetch_add(pkt.normal_count() as u64, Relaxed);
        self.counters
            .zero_pages
            .fetch_add(pkt.zero_count() as u64, Relaxed);
        Ok(())
    }
}
