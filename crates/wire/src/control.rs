//! Small fixed messages: round markers on data channels, and the main channel's switchover
//! exchange (Complete, Loaded, Handover, Resumed).
//!
//! ```text
//! source                                destination
//!   | data*: RoundEnd{round, last=1}       |
//!   | main:  GuestState{blob}, Complete     |
//!   | ------------------------------------> |  drain channels, restore, check
//!   |        Loaded{timings} | Reject      |
//!   | <------------------------------------ |
//!   |        Handover                       |  source will never run the guest again
//!   | ------------------------------------> |  resume
//!   |        Resumed{resume_us}             |
//!   | <------------------------------------ |
//! ```

use crate::cursor::{Reader, Writer};
use crate::device::{DeviceLoadStats, MAX_DEVICES};
use crate::WireError;

/// Sent on every data channel after the channel's last page of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    /// The round that ended on this channel (0 is the first precopy round).
    pub round: u32,
    /// The switchover round: the channel carries nothing after it.
    pub last: bool,
}

impl RoundEnd {
    /// The payload of a `RoundEnd` frame: round u32, last u8 (0 or 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).u32(self.round).u8(self.last as u8);
        out
    }

    /// Reads a `RoundEnd` payload; a `last` byte other than 0 or 1 is an error.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "RoundEnd");
        let round = r.u32()?;
        let last = match r.u8()? {
            0 => false,
            1 => true,
            v => {
                return Err(WireError::OutOfRange {
                    field: "RoundEnd.last",
                    value: v as u64,
                    reason: "must be 0 or 1",
                })
            }
        };
        r.finish()?;
        Ok(RoundEnd { round, last })
    }
}

/// Main channel: a precopy round begins (informational, for the destination's log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundStart {
    /// The round that begins.
    pub round: u32,
    /// Pages the source will send in it.
    pub pages: u64,
}

impl RoundStart {
    /// The payload of a `RoundStart` frame: round u32, pages u64.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).u32(self.round).u64(self.pages);
        out
    }

    /// Reads a `RoundStart` payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "RoundStart");
        let v = RoundStart {
            round: r.u32()?,
            pages: r.u64()?,
        };
        r.finish()?;
        Ok(v)
    }
}

/// Return path: every data channel has applied all pages of `round`. The source measures a
/// round's rate up to this point, so pages still in socket buffers never count as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundAck {
    /// The round whose pages are all applied.
    pub round: u32,
}

impl RoundAck {
    /// The payload of a `RoundAck` frame: round u32.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).u32(self.round);
        out
    }

    /// Reads a `RoundAck` payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "RoundAck");
        let v = RoundAck { round: r.u32()? };
        r.finish()?;
        Ok(v)
    }
}

/// Main channel: the source has sent every page and the guest state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// Rounds sent, the switchover round included.
    pub rounds: u32,
}

impl Complete {
    /// The payload of a `Complete` frame: rounds u32.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).u32(self.rounds);
        out
    }

    /// Reads a `Complete` payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "Complete");
        let v = Complete { rounds: r.u32()? };
        r.finish()?;
        Ok(v)
    }
}

/// Return path: everything is loaded and checked; the destination waits for Handover.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Loaded {
    /// From Complete until every data channel had drained its last round.
    pub drain_us: u64,
    /// Restoring the guest's non-memory state.
    pub restore_us: u64,
    /// Checking every page (only when the destination was asked to verify).
    pub verify_us: u64,
    /// Pages the check looked at (0 without a check): a guest whose memory follows a known
    /// pattern tells whether each page holds what it must.
    pub pages_checked: u64,
    /// Of which did not hold what they must: the migration did not copy them exactly.
    pub pages_mismatched: u64,
    /// Per streamed device, in session order.
    pub devices: Vec<DeviceLoadStats>,
}

impl Loaded {
    /// The payload of a `Loaded` frame: the five u64 above in order, then a device count
    /// u16 and each device's [`DeviceLoadStats`].
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        w.u64(self.drain_us)
            .u64(self.restore_us)
            .u64(self.verify_us)
            .u64(self.pages_checked)
            .u64(self.pages_mismatched)
            .u16(self.devices.len() as u16);
        for d in &self.devices {
            d.write(&mut w);
        }
        out
    }

    /// Reads a `Loaded` payload; more than [`MAX_DEVICES`] devices is an error, found before
    /// any is read.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "Loaded");
        let v = Loaded {
            drain_us: r.u64()?,
            restore_us: r.u64()?,
            verify_us: r.u64()?,
            pages_checked: r.u64()?,
            pages_mismatched: r.u64()?,
            devices: Vec::new(),
        };
        let n = r.u16()? as usize;
        if n > MAX_DEVICES {
            return Err(WireError::OutOfRange {
                field: "Loaded devices",
                value: n as u64,
                reason: "at most 64",
            });
        }
        let mut v = v;
        for _ in 0..n {
            v.devices.push(DeviceLoadStats::read(&mut r)?);
        }
        r.finish()?;
        Ok(v)
    }
}

/// Main channel: the source gives the guest up. Version 4's payload is empty (the guest
/// resumes on the destination); with the `paused guest` feature one byte may follow: 1, the
/// guest was stopped by its operator on the source and stays paused on arrival (QEMU
/// migrates a stopped guest so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Handover {
    /// The guest stays paused on the destination.
    pub keep_paused: bool,
}

impl Handover {
    /// The payload: empty for a guest that resumes (as version 4's), `[1]` to keep it
    /// paused.
    pub fn encode(&self) -> Vec<u8> {
        if self.keep_paused {
            vec![1]
        } else {
            Vec::new()
        }
    }

    /// Reads a `Handover` payload: empty, 0 or 1.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        match buf {
            [] | [0] => Ok(Handover { keep_paused: false }),
            [1] => Ok(Handover { keep_paused: true }),
            [v] => Err(WireError::OutOfRange {
                field: "Handover.keep_paused",
                value: *v as u64,
                reason: "must be 0 or 1",
            }),
            _ => Err(WireError::OutOfRange {
                field: "Handover length",
                value: buf.len() as u64,
                reason: "at most one byte",
            }),
        }
    }
}

/// Return path: the guest runs on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    /// From Handover until the guest ran on the destination, microseconds.
    pub resume_us: u64,
}

impl Resumed {
    /// The payload of a `Resumed` frame: resume time u64 (microseconds).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        Writer::new(&mut out).u64(self.resume_us);
        out
    }

    /// Reads a `Resumed` payload.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "Resumed");
        let v = Resumed {
            resume_us: r.u64()?,
        };
        r.finish()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handover_is_empty_unless_the_guest_stays_paused() {
        assert_eq!(
            Handover::default().encode(),
            Vec::<u8>::new(),
            "version 4's"
        );
        let keep = Handover { keep_paused: true };
        assert_eq!(Handover::decode(&keep.encode()).unwrap(), keep);
        assert_eq!(Handover::decode(&[]).unwrap(), Handover::default());
        assert!(Handover::decode(&[2])
            .unwrap_err()
            .to_string()
            .contains("keep_paused"));
        assert!(Handover::decode(&[1, 1]).is_err());
    }

    #[test]
    fn round_trips() {
        let e = RoundEnd {
            round: 9,
            last: true,
        };
        assert_eq!(RoundEnd::decode(&e.encode()).unwrap(), e);
        let l = Loaded {
            drain_us: 1,
            restore_us: 2,
            verify_us: 3,
            pages_checked: 4,
            pages_mismatched: 5,
            devices: vec![DeviceLoadStats {
                bytes: 1,
                chunks: 2,
                peak_buffered: 3,
                done_us: 4,
            }],
        };
        assert_eq!(Loaded::decode(&l.encode()).unwrap(), l);
        let c = Complete { rounds: 4 };
        assert_eq!(Complete::decode(&c.encode()).unwrap(), c);
        let s = RoundStart {
            round: 2,
            pages: 77,
        };
        assert_eq!(RoundStart::decode(&s.encode()).unwrap(), s);
        let a = RoundAck { round: 3 };
        assert_eq!(RoundAck::decode(&a.encode()).unwrap(), a);
        let r = Resumed { resume_us: 8 };
        assert_eq!(Resumed::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn round_end_rejects_bad_flag() {
        let mut b = RoundEnd {
            round: 1,
            last: false,
        }
        .encode();
        b[4] = 2;
        assert!(RoundEnd::decode(&b).is_err());
    }
}
