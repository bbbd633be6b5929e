//! Postcopy on the destination: the guest runs before all its memory has arrived.
//!
//! At `PostcopyStart` (the Receiving phase's end in a postcopy session) the coordinator
//! restores the devices' and the guest's state, then [`PostcopyDest::arm`]: guest memory is
//! registered with userfaultfd, the listed pages (stale copies from precopy, or never sent)
//! are discarded, and the guest resumes. From then on:
//!
//! - the fault thread (`lm-dst-fault`, [`serve_faults`]) reads each fault: a listed page is
//!   asked for once (`PageRequest`, sent by the coordinator); any other missing page never
//!   held data and is filled with zeros at once;
//! - the data channels and the urgent channel install every page that comes
//!   ([`PostcopyDest::install_packet`]) with `UFFDIO_COPY`, which wakes the vCPUs waiting on
//!   it: a page is written once, the first copy wins (every copy is final: the source's
//!   guest is paused);
//! - when every listed page is in and every data channel said `PostcopyDone`, the
//!   coordinator tells the source (`PostcopyComplete`), which may then drop its copy.

use super::coordinator::Phase;
use super::loading::LoadTimes;
use super::receiver::ChannelReceiver;
use super::receiving::Received;
use super::session::{Session, Shared};
use super::{protocol, Event, Failure, Heard};
use crate::cancel::CancelToken;
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::guest::GuestMemory;
use crate::hostmem::PageBitmap;
use crate::postcopy::{Installed, PostcopyError, PostcopyMemory};
use crate::report::IncomingReport;
use crate::transport::Stream;
use crossbeam_channel::Sender;
use livemig_wire::{
    FrameKind, PageRequest, PostcopyComplete, PostcopyDone, PostcopyStart, RamPacket, Resumed,
    PAGE_SIZE,
};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What the coordinator, the fault thread and the receivers share in a postcopy session.
pub(crate) struct PostcopyDest<'m> {
    memory: &'m GuestMemory,
    armed: OnceLock<PostcopyMemory<'m>>,
    /// Listed pages not installed yet.
    pending: PageBitmap,
    remaining: AtomicU64,
    /// Pages listed at the switch.
    total: AtomicU64,
    /// The round number postcopy pages carry.
    round: AtomicU32,
    /// Pages the fault thread asked for.
    requested: AtomicU64,
    /// Listed pages a fault asked for (once each; asked again when a broken postcopy
    /// resumes, as the vCPUs waiting on them will not fault again).
    asked: PageBitmap,
    /// Set once armed or aborted; the receivers and the fault thread wait on it.
    gate: Mutex<Gate>,
    cv: Condvar,
}

#[derive(Default)]
struct Gate {
    armed: bool,
    aborted: bool,
}

impl<'m> PostcopyDest<'m> {
    pub fn new(memory: &'m GuestMemory) -> Self {
        PostcopyDest {
            memory,
            armed: OnceLock::new(),
            pending: PageBitmap::new(memory),
            remaining: AtomicU64::new(0),
            total: AtomicU64::new(0),
            round: AtomicU32::new(0),
            requested: AtomicU64::new(0),
            asked: PageBitmap::new(memory),
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
        }
    }

    /// Registers guest memory with userfaultfd and discards the listed pages; from now on
    /// an access to one of them waits for it.
    pub fn arm(&self, start: &PostcopyStart) -> Result<(), IncomingError> {
        let pm = PostcopyMemory::new(self.memory)?;
        pm.discard(start.addrs())?;
        for addr in start.addrs() {
            self.pending.insert(addr);
        }
        self.remaining.store(start.count(), Relaxed);
        self.total.store(start.count(), Relaxed);
        self.round.store(start.rounds, Relaxed);
        // Set once: a second PostcopyStart never gets here (the main reader refuses it).
        let _ = self.armed.set(pm);
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.armed = true;
        self.cv.notify_all();
        Ok(())
    }

    /// Wakes every thread waiting for the arming: the session ends without postcopy.
    pub fn abort(&self) {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        g.aborted = true;
        self.cv.notify_all();
    }

    /// Waits until armed; `None` once aborted.
    fn wait_armed(&self) -> Option<&PostcopyMemory<'m>> {
        let mut g = self.gate.lock().unwrap_or_else(|p| p.into_inner());
        while !g.armed && !g.aborted {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.aborted && !g.armed {
            return None;
        }
        self.armed.get()
    }

    /// Pages listed at the switch.
    fn pending_total(&self) -> u64 {
        self.total.load(Relaxed)
    }

    /// Listed pages not installed yet.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Relaxed)
    }

    /// Postcopy recovery: the listed pages still missing, as the resuming session's
    /// `PostcopyResume` lists them (over the hello's `ranges`).
    pub fn missing(&self, ranges: &[livemig_wire::MemoryRange]) -> PostcopyStart {
        let mut start = PostcopyStart::new(self.round.load(Relaxed), ranges);
        for addr in self.pending.addrs() {
            start.insert(addr);
        }
        start
    }

    /// Postcopy recovery: the pages vCPUs asked for that have not come.
    pub fn awaited(&self) -> Vec<u64> {
        self.asked
            .addrs()
            .filter(|&a| self.pending.contains(a))
            .collect()
    }

    fn installed(&self, addr: u64, how: Installed) {
        if how == Installed::New && self.pending.remove(addr) {
            self.remaining.fetch_sub(1, Relaxed);
        }
    }
}

/// What a receiver needs of postcopy (an object, so a receiver borrows it for its own
/// lifetime whatever the memory's).
pub(crate) trait PostcopyPages: Sync {
    /// Installs every page of a postcopy packet (after waiting for the arming).
    fn install_packet(
        &self,
        channel: ChannelName,
        payload: &[u8],
        r: &ChannelReceiver<'_>,
    ) -> Result<(), ChannelError>;
    /// Whether the switch to postcopy happened.
    fn is_armed(&self) -> bool;
}

impl PostcopyPages for PostcopyDest<'_> {
    fn is_armed(&self) -> bool {
        self.armed.get().is_some()
    }

    fn install_packet(
        &self,
        channel: ChannelName,
        payload: &[u8],
        r: &ChannelReceiver<'_>,
    ) -> Result<(), ChannelError> {
        let Some(pm) = self.wait_armed() else {
            return Err(ChannelError::Closed { channel });
        };
        let pkt = RamPacket::decode(payload, &r.limits)
            .map_err(|source| ChannelError::Wire { channel, source })?;
        if pkt.round != self.round.load(Relaxed) || pkt.compressed_data().is_some() {
            return Err(ChannelError::Protocol {
                channel,
                detail: format!(
                    "a postcopy packet of round {} (postcopy is round {}, uncompressed)",
                    pkt.round,
                    self.round.load(Relaxed)
                ),
            });
        }
        let failed = |e: PostcopyError| ChannelError::Protocol {
            channel,
            detail: e.to_string(),
        };
        for (addr, data, intact) in pkt.checked_pages() {
            let page: &[u8; PAGE_SIZE] = data.try_into().map_err(|_| ChannelError::Protocol {
                channel,
                detail: "a postcopy page that is not 4 KiB".into(),
            })?;
            if !intact {
                // Every copy is final in postcopy: a torn one was corrupted on the way.
                return Err(ChannelError::Protocol {
                    channel,
                    detail: format!("postcopy page 0x{addr:x} failed its CRC32C check"),
                });
            }
            self.installed(addr, pm.install(addr, page).map_err(failed)?);
            r.counters.normal_pages.fetch_add(1, Relaxed);
        }
        for addr in pkt.zero_addrs() {
            self.installed(addr, pm.install_zero(addr).map_err(failed)?);
            r.counters.zero_pages.fetch_add(1, Relaxed);
        }
        Ok(())
    }
}

impl PostcopyDest<'_> {
    /// The faults' figures: pages asked for, and the vCPUs' total wait, microseconds.
    fn fault_figures(&self) -> (u64, u64) {
        let blocked = self
            .armed
            .get()
            .map_or(0, |pm| pm.latency().snapshot().total.as_micros() as u64);
        (self.requested.load(Relaxed), blocked)
    }

    /// The faults' waits so far.
    fn latency(&self) -> Option<crate::report::FaultLatencyReport> {
        let l = self.armed.get()?.latency().snapshot();
        let us = |d: Duration| d.as_micros() as u64;
        Some(crate::report::FaultLatencyReport {
            faults: l.count,
            p50_us: us(l.p50),
            p99_us: us(l.p99),
            max_us: us(l.max),
            total_us: us(l.total),
            histogram: l
                .histogram()
                .into_iter()
                .map(|(below_us, faults)| crate::report::LatencyBucket { below_us, faults })
                .collect(),
            threads: l
                .threads
                .iter()
                .map(|t| crate::report::ThreadBlocktime {
                    thread: thread_name(t.tid),
                    faults: t.faults,
                    blocked_us: us(t.total),
                })
                .collect(),
        })
    }

    /// Every page is in: nothing can fault any more.
    fn release(&self) -> Result<(), IncomingError> {
        if let Some(pm) = self.armed.get() {
            pm.unregister()?;
        }
        Ok(())
    }
}

/// The name of this process's thread `tid` (`/proc/self/task/<tid>/comm`), or `tid N` once
/// it has ended (or 0: unknown).
fn thread_name(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_else(|_| format!("tid {tid}"))
}

/// The fault thread: each fault on a listed page becomes one request (the coordinator sends
/// it); a fault on any other page (one that never held data) is answered with zeros.
pub(super) fn serve_faults(dest: &PostcopyDest<'_>, events: Sender<Heard>, cancel: &CancelToken) {
    let Some(pm) = dest.wait_armed() else {
        return;
    };
    while !cancel.is_cancelled() && dest.remaining() > 0 {
        let fault = match pm.next_fault(Duration::from_millis(20)) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                let _ = events.send(Err(Failure::Postcopy(e)));
                return;
            }
        };
        if dest.pending.contains(fault.addr) {
            // A vCPU kicked out of its wait faults again on the same page: asked once.
            if dest.asked.insert(fault.addr) {
                dest.requested.fetch_add(1, Relaxed);
                if events.send(Ok(Event::PageWanted(fault.addr))).is_err() {
                    return;
                }
            }
        } else if let Err(e) = pm.install_zero(fault.addr) {
            let _ = events.send(Err(Failure::Postcopy(e)));
            return;
        }
    }
}

/// Postcopy under way, the guest running here.
pub(super) struct Running {
    received: Received,
    restore: Duration,
    channels_done: usize,
    started: Instant,
    resume: Duration,
    /// The guest checked once every page was in (with `verify`), and the time it took.
    verify: Option<crate::guest::VerifyReport>,
    verify_time: Duration,
}

/// Restores the state, arms userfaultfd, resumes the guest and tells the source.
pub(super) fn start(
    s: &Session<'_>,
    shared: &Shared<'_, '_>,
    main: &mut Stream,
    mut received: Received,
) -> Result<Phase, IncomingError> {
    let (Some(dest), Some(start)) = (&shared.postcopy, received.postcopy.take()) else {
        return Err(protocol(
            "PostcopyStart in a session that may not switch to postcopy",
        ));
    };
    let started = Instant::now();
    let restore = super::loading::restore(s, &received)?;
    if s.config.test_hooks.postcopy_arm_fails() {
        return Err(IncomingError::Setup(
            "userfaultfd refused (the postcopy-arm-fails test hook)".into(),
        ));
    }
    dest.arm(&start)?;
    let t = Instant::now();
    s.guest.resume()?;
    let resume = t.elapsed();
    let resumed = Resumed {
        resume_us: resume.as_micros() as u64,
    };
    framed::send(
        main,
        ChannelName::Main,
        FrameKind::Resumed,
        &resumed.encode(),
    )?;
    (s.log)(&crate::report::IncomingEvent::PostcopyStarted {
        pages: start.count(),
    });
    Ok(Phase::Postcopy(Running {
        received,
        restore,
        channels_done: 0,
        started,
        resume,
        verify: None,
        verify_time: Duration::ZERO,
    }))
}

impl Running {
    /// One event: a page wanted is asked of the source, a data channel's end counted. True
    /// once every data channel has ended (then [`Running::finish`]).
    pub fn step(
        &mut self,
        ev: Event,
        s: &Session<'_>,
        main: &mut Stream,
    ) -> Result<bool, IncomingError> {
        match ev {
            Event::PageWanted(addr) => request(main, &[addr])?,
            Event::PostcopyChannelDone => self.channels_done += 1,
            Event::Credit(..) | Event::RoundApplied(_) => {}
            _ => return Err(protocol("an unexpected message in postcopy")),
        }
        Ok(self.channels_done >= s.hello.channels as usize)
    }

    /// A session resuming the broken postcopy begins: none of its channels has ended.
    pub fn resuming(&mut self) {
        self.channels_done = 0;
    }

    /// Every data channel ended: every listed page must be in. Guest memory leaves
    /// userfaultfd, the guest is checked (with `verify`) and the source told it may drop
    /// its copy. A failure to tell it leaves this to be done again by a resuming session.
    pub fn finish(
        &mut self,
        s: &Session<'_>,
        dest: &PostcopyDest<'_>,
        main: &mut Stream,
    ) -> Result<(), IncomingError> {
        if dest.remaining() > 0 {
            return Err(protocol(&format!(
                "every data channel ended postcopy with {} listed pages missing",
                dest.remaining()
            )));
        }
        dest.release()?;
        // Checked with every page in, the guest paused meanwhile (a test instrument).
        let t = Instant::now();
        if s.config.verify && self.verify.is_none() {
            s.guest.pause()?;
            let v = super::loading::verify(s);
            s.guest.resume()?;
            self.verify = v?;
        }
        self.verify_time += t.elapsed();
        let (requested, blocked_us) = dest.fault_figures();
        let pages = dest.pending_total();
        let done = PostcopyComplete {
            pages,
            requested: requested.min(pages),
            blocked_us,
        };
        framed::send(
            main,
            ChannelName::Main,
            FrameKind::PostcopyComplete,
            &done.encode(),
        )?;
        Ok(())
    }

    /// The report, once the source was told.
    pub fn report(
        self,
        s: &Session<'_>,
        shared: &Shared<'_, '_>,
        dest: &PostcopyDest<'_>,
    ) -> IncomingReport {
        let postcopy_ms = crate::report::ms(self.started.elapsed());
        let times = LoadTimes {
            restore: self.restore,
            verify_time: self.verify_time,
            verify: self.verify,
        };
        let mut r = super::handover::report(s, shared, self.received, times, self.resume);
        r.postcopy_ms = postcopy_ms;
        r.postcopy_faults = dest.latency();
        r
    }
}

/// Asks the source for `addrs` (at most [`livemig_wire::MAX_PAGE_REQUEST`] a frame).
pub(super) fn request(main: &mut Stream, addrs: &[u64]) -> Result<(), ChannelError> {
    for batch in addrs.chunks(livemig_wire::MAX_PAGE_REQUEST) {
        let req = PageRequest {
            addrs: batch.to_vec(),
        };
        framed::send(
            main,
            ChannelName::Main,
            FrameKind::PageRequest,
            &req.encode(),
        )?;
    }
    Ok(())
}

/// A receiver in postcopy: installs pages until the source's `PostcopyDone`.
pub(super) fn receive(
    r: &mut ChannelReceiver<'_>,
    dest: &dyn PostcopyPages,
) -> Result<(), ChannelError> {
    let channel = ChannelName::Data(r.index);
    let mut buf = Vec::new();
    loop {
        let h = framed::recv_header(&mut r.stream, channel, &r.limits)?;
        r.counters
            .bytes
            .fetch_add(livemig_wire::HEADER_LEN as u64 + h.len as u64, Relaxed);
        match h.kind {
            FrameKind::RamPages => {
                framed::recv_payload(&mut r.stream, channel, &h, &mut buf)?;
                dest.install_packet(channel, &buf, r)?;
            }
            FrameKind::PostcopyDone => {
                framed::recv_payload(&mut r.stream, channel, &h, &mut buf)?;
                PostcopyDone::decode(&buf)
                    .map_err(|source| ChannelError::Wire { channel, source })?;
                return Ok(());
            }
            other => {
                return Err(ChannelError::Protocol {
                    channel,
                    detail: format!("unexpected {} frame in postcopy", other.name()),
                })
            }
        }
    }
}
