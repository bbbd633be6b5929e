//! The destination's device streams: per device a reorder buffer, a credit window, and the
//! loader that hands chunks to the device strictly in order.
//!
//! ```text
//!            granted: idx < up_to = next + window
//!   loaded   |<------------------------------->|
//! ...[ next-1 ][ next ][ next+1 ] ... [ up_to-1 ]| not granted: a chunk here is a protocol
//!              ^ the loader waits for this one,  | error, nothing is read or allocated for it
//!                always inside the window
//! ```
//!
//! A chunk header is checked against its device's window *before* its data is read, and its
//! bytes are counted as buffered from then until the loader has loaded it. Every device's
//! window is at most `buffer_cap / (devices x chunk size)` chunks, so the bytes buffered over
//! all devices can never exceed the cap; and since the chunk the loader needs next is always
//! granted, the flow never deadlocks.

use crate::device::{Device, DeviceError};
use livemig_wire::{ChunkHeader, DeviceLoadStats};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

/// Why a chunk header was refused before its data was read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AdmitError {
    #[error("chunk for unknown device {device} (the session has {devices})")]
    UnknownDevice { device: u16, devices: usize },
    #[error("chunk {idx} of device {device} has {len} bytes, more than the session's chunk size of {chunk_size}")]
    TooLarge {
        device: u16,
        idx: u32,
        len: usize,
        chunk_size: usize,
    },
    #[error("chunk {idx} of device {device} out of order on the main channel (expected {expected}{})", if *.ended { ", and the stream has ended" } else { "" })]
    OutOfOrder {
        device: u16,
        idx: u32,
        expected: u32,
        ended: bool,
    },
    #[error("aborted")]
    Aborted,
    #[error("duplicate chunk {idx} of device {device}")]
    Duplicate { device: u16, idx: u32 },
    #[error("chunk {idx} of device {device} is outside its credit window [{next}, {up_to})")]
    OutsideWindow {
        device: u16,
        idx: u32,
        next: u32,
        up_to: u32,
    },
    #[error("chunk {idx} of device {device} comes after the stream's last chunk {last}")]
    AfterLast { device: u16, idx: u32, last: u32 },
    #[error("device {device} ends at chunk {idx} but chunk {beyond} was sent")]
    EndsBefore { device: u16, idx: u32, beyond: u32 },
}

/// All device streams of a session.
pub(crate) struct Streams {
    streams: Vec<StreamBuf>,
    chunk_size: usize,
    window: u32,
    /// Chunk buffers the loaders are done with, for the next chunks: fresh memory costs
    /// page faults, which on these hosts cost more than receiving the bytes.
    spare: Mutex<Vec<Vec<u8>>>,
}

struct StreamBuf {
    state: Mutex<BufState>,
    cv: Condvar,
}

#[derive(Default)]
struct BufState {
    /// The chunk the loader needs next.
    next: u32,
    /// Chunks with idx < up_to may be sent.
    up_to: u32,
    /// Received, waiting for the loader: (data, last).
    slots: BTreeMap<u32, (Vec<u8>, bool)>,
    /// Admitted, data being read from a socket.
    reserved: BTreeSet<u32>,
    /// The idx of the stream's last chunk, once seen.
    last: Option<u32>,
    /// One past the highest idx admitted so far.
    admitted_to: u32,
    buffered: u64,
    stats: DeviceLoadStats,
    aborted: bool,
}

/// The loader stopped because the migration is being torn down.
#[derive(Debug)]
pub(crate) enum LoadError {
    Device(DeviceError),
    Aborted,
}

impl Streams {
    pub fn new(devices: usize, chunk_size: usize, window: u32) -> Self {
        let streams = (0..devices)
            .map(|_| StreamBuf {
                state: Mutex::new(BufState {
                    up_to: window,
                    ..BufState::default()
                }),
                cv: Condvar::new(),
            })
            .collect();
        Streams {
            streams,
            chunk_size,
            window,
            spare: Mutex::new(Vec::new()),
        }
    }

    /// A buffer of `len` bytes for an admitted chunk, reused when one is spare.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        // Same-size reuse writes nothing: the data is read over whatever the buffer held.
        b.resize(len, 0);
        b
    }

    /// Keeps a loaded chunk's buffer for reuse; at most one window's worth per device, so
    /// spare buffers never hold more than the buffer cap.
    fn give_back(&self, b: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < self.streams.len() * self.window as usize {
            spare.push(b);
        }
    }

    /// Checks a chunk header before its `len` bytes of data are read, and reserves its slot.
    /// With `wait`, a chunk beyond the window waits for credit instead of being refused
    /// (the serial mode, where the main channel's own backpressure stands in for credit).
    pub fn admit(&self, h: &ChunkHeader, len: usize, wait: bool) -> Result<(), AdmitError> {
        let (device, idx) = (h.device, h.idx);
        let Some(stream) = self.streams.get(device as usize) else {
            return Err(AdmitError::UnknownDevice {
                device,
                devices: self.streams.len(),
            });
        };
        if len > self.chunk_size {
            return Err(AdmitError::TooLarge {
                device,
                idx,
                len,
                chunk_size: self.chunk_size,
            });
        }
        let mut s = stream.state.lock().unwrap_or_else(|p| p.into_inner());
        if wait {
            // Serial mode: chunks come in order on one channel, so the only chunk that can be
            // next is the one after those already admitted; anything else could wait for a
            // credit that never comes.
            let expected = s.admitted_to;
            if s.last.is_some() || idx != expected {
                return Err(AdmitError::OutOfOrder {
                    device,
                    idx,
                    expected,
                    ended: s.last.is_some(),
                });
            }
            while idx >= s.up_to && !s.aborted {
                s = stream.cv.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.aborted {
                return Err(AdmitError::Aborted);
            }
        }
        if idx < s.next || s.slots.contains_key(&idx) || s.reserved.contains(&idx) {
            return Err(AdmitError::Duplicate { device, idx });
        }
        if idx >= s.up_to {
            return Err(AdmitError::OutsideWindow {
                device,
                idx,
                next: s.next,
                up_to: s.up_to,
            });
        }
        if let Some(last) = s.last {
            if idx > last {
                return Err(AdmitError::AfterLast { device, idx, last });
            }
        }
        if h.last {
            if let Some(beyond) = s
                .slots
                .keys()
                .chain(s.reserved.iter())
                .find(|&&i| i > h.idx)
            {
                return Err(AdmitError::EndsBefore {
                    device,
                    idx,
                    beyond: *beyond,
                });
            }
            s.last = Some(h.idx);
        }
        s.reserved.insert(h.idx);
        s.admitted_to = s.admitted_to.max(h.idx.saturating_add(1));
        s.buffered += len as u64;
        s.stats.peak_buffered = s.stats.peak_buffered.max(s.buffered);
        Ok(())
    }

    /// Puts an admitted chunk's data in its slot and wakes the loader.
    pub fn insert(&self, h: &ChunkHeader, data: Vec<u8>) {
        let stream = &self.streams[h.device as usize];
        let mut s = stream.state.lock().unwrap_or_else(|p| p.into_inner());
        s.reserved.remove(&h.idx);
        s.slots.insert(h.idx, (data, h.last));
        stream.cv.notify_all();
    }

    /// Wakes every loader and every waiting admit with an error.
    pub fn abort(&self) {
        for stream in &self.streams {
            stream
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .aborted = true;
            stream.cv.notify_all();
        }
    }

    /// Device `index`'s loader: feeds its chunks to `device` in idx order as soon as the next
    /// one is there, and calls `credit(up_to)` after each so the source may send more. Ends
    /// after the last chunk, with the device's load completed.
    pub fn run_loader(
        &self,
        index: usize,
        device: &dyn Device,
        session_start: Instant,
        credit: impl Fn(u32),
    ) -> Result<DeviceLoadStats, LoadError> {
        let stream = &self.streams[index];
        loop {
            let (data, last) = {
                let mut s = stream.state.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if s.aborted {
                        return Err(LoadError::Aborted);
                    }
                    let next = s.next;
                    if let Some(chunk) = s.slots.remove(&next) {
                        break chunk;
                    }
                    s = stream.cv.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            device.load(&data).map_err(LoadError::Device)?;
            let len = data.len();
            self.give_back(data);
            let up_to = {
                let mut s = stream.state.lock().unwrap_or_else(|p| p.into_inner());
                s.buffered -= len as u64;
                s.stats.bytes += len as u64;
                s.stats.chunks += 1;
                s.next = s.next.saturating_add(1);
                s.up_to = s.next.saturating_add(self.window);
                stream.cv.notify_all();
                s.up_to
            };
            if last {
                device.load_complete().map_err(LoadError::Device)?;
                let mut s = stream.state.lock().unwrap_or_else(|p| p.into_inner());
                s.stats.done_us = session_start.elapsed().as_micros() as u64;
                return Ok(s.stats);
            }
            credit(up_to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Accepts bytes only in order: each chunk holds its own idx repeated.
    struct InOrder {
        next: AtomicU64,
        complete: AtomicU64,
    }

    impl Device for InOrder {
        fn descriptor(&self) -> crate::device::DeviceDescriptor {
            unreachable!()
        }
        fn begin_save(&self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn save_precopy(&self, _: &mut Vec<u8>, _: usize) -> Result<usize, DeviceError> {
            unreachable!()
        }
        fn save_final(&self, _: &mut Vec<u8>, _: usize) -> Result<usize, DeviceError> {
            unreachable!()
        }
        fn abort_save(&self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn load(&self, data: &[u8]) -> Result<(), DeviceError> {
            let want = self.next.fetch_add(1, Ordering::SeqCst) as u8;
            if data.iter().all(|&b| b == want) {
                Ok(())
            } else {
                Err(DeviceError::new("t", "load", "out of order"))
            }
        }
        fn load_complete(&self) -> Result<(), DeviceError> {
            self.complete.store(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn h(idx: u32, last: bool) -> ChunkHeader {
        ChunkHeader {
            device: 0,
            idx,
            last,
        }
    }

    #[test]
    fn refuses_outside_window_duplicates_and_unknown_devices() {
        let s = Streams::new(1, 16, 2);
        assert!(s
            .admit(&h(2, false), 16, false)
            .unwrap_err()
            .to_string()
            .contains("outside its credit window"));
        s.admit(&h(1, false), 16, false).unwrap();
        assert!(s
            .admit(&h(1, false), 16, false)
            .unwrap_err()
            .to_string()
            .contains("duplicate"));
        assert!(s
            .admit(&h(0, false), 17, false)
            .unwrap_err()
            .to_string()
            .contains("chunk size"));
        let mut other = h(0, false);
        other.device = 5;
        assert!(s
            .admit(&other, 1, false)
            .unwrap_err()
            .to_string()
            .contains("unknown device 5"));
    }

    #[test]
    fn loads_in_order_whatever_the_arrival_order() {
        let s = Streams::new(1, 4, 3);
        let dev = InOrder {
            next: AtomicU64::new(0),
            complete: AtomicU64::new(0),
        };
        let (credit_tx, credit_rx) = crossbeam_channel::unbounded();
        std::thread::scope(|sc| {
            let loader = sc.spawn(|| {
                s.run_loader(0, &dev, Instant::now(), |u| {
                    let _ = credit_tx.send(u);
                })
            });
            // Each window back to front: 2,1,0 then, once credit allows, 5,4,3 (the last).
            for base in [0u32, 3] {
                if base > 0 {
                    while credit_rx.recv().unwrap() < base + 3 {}
                }
                for idx in (base..base + 3).rev() {
                    let hd = h(idx, idx == 5);
                    s.admit(&hd, 4, false).unwrap();
                    s.insert(&hd, vec![idx as u8; 4]);
                }
            }
            let stats = loader.join().unwrap().unwrap();
            assert_eq!(stats.chunks, 6);
            assert!(
                stats.peak_buffered <= 3 * 4,
                "never more than the window buffered"
            );
        });
        assert_eq!(dev.complete.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn serial_admission_waits_for_credit_in_order_only() {
        let s = Streams::new(1, 4, 1);
        s.admit(&h(0, false), 4, true).unwrap();
        assert!(s
            .admit(&h(2, false), 4, true)
            .unwrap_err()
            .to_string()
            .contains("out of order"));
        s.insert(&h(0, false), vec![0; 4]);
        s.abort();
        assert!(
            s.admit(&h(1, false), 4, true).is_err(),
            "an abort ends the wait for credit"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// Against a simple model: a source that sends, within its credit, chunks in any
        /// order. The device sees every chunk in order, nothing outside the window or twice is
        /// admitted, and the buffer never holds more than a window of chunks.
        #[test]
        fn any_order_within_credit_loads_in_order(
            window in 1u32..6,
            chunks in 1u32..40,
            picks in proptest::collection::vec(0usize..1000, 0..400),
        ) {
            let chunk = 8usize;
            let s = Streams::new(1, chunk, window);
            let dev = InOrder { next: AtomicU64::new(0), complete: AtomicU64::new(0) };
            let (credit_tx, credit_rx) = crossbeam_channel::unbounded();
            let stats = std::thread::scope(|sc| {
                let loader = sc.spawn(|| s.run_loader(0, &dev, Instant::now(), |u| {
                    let _ = credit_tx.send(u);
                }));
                // A failing assertion below must not leave the loader waiting forever.
                struct AbortOnPanic<'a>(&'a Streams);
                impl Drop for AbortOnPanic<'_> {
                    fn drop(&mut self) {
                        if std::thread::panicking() {
                            self.0.abort();
                        }
                    }
                }
                let _guard = AbortOnPanic(&s);
                let mut up_to = window;
                let mut unsent: Vec<u32> = Vec::new();
                let mut next_new = 0u32;
                let mut picks = picks.iter().copied().cycle();
                let mut sent = 0;
                while sent < chunks {
                    while next_new < up_to.min(chunks) {
                        unsent.push(next_new);
                        next_new += 1;
                    }
                    if unsent.is_empty() {
                        // Everything granted is sent: wait for credit, as the source does.
                        up_to = up_to.max(credit_rx.recv().expect("credit"));
                        continue;
                    }
                    // Beyond any window this stream can ever have: refused, nothing admitted.
                    let beyond = h(chunks + window + 1, false);
                    assert!(s.admit(&beyond, chunk, false).is_err());
                    let at = picks.next().unwrap_or(0) % unsent.len();
                    let idx = unsent.swap_remove(at);
                    let hd = h(idx, idx + 1 == chunks);
                    s.admit(&hd, chunk, false).unwrap();
                    assert!(s.admit(&hd, chunk, false).is_err(), "a duplicate is refused");
                    s.insert(&hd, vec![idx as u8; chunk]);
                    sent += 1;
                    while let Ok(u) = credit_rx.try_recv() {
                        up_to = up_to.max(u);
                    }
                }
                loader.join().unwrap().unwrap()
            });
            proptest::prop_assert_eq!(stats.chunks, chunks);
            proptest::prop_assert!(stats.peak_buffered <= (window as usize * chunk) as u64);
            proptest::prop_assert_eq!(dev.complete.load(Ordering::SeqCst), 1);
        }
    }
}
