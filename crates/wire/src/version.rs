//! Protocol versions and optional features: what each side speaks, and what a session uses.
//!
//! ```text
//! source                                         destination
//!   | main: SessionHello, frame version 5:         |
//!   |   versions min..=max, features offered,      |  highest common version,
//!   |   features required, then the session        |  offered ∩ its own features;
//!   | -------------------------------------------> |  a required feature it lacks: Reject
//!   |       SessionAccept, frame version 5:        |
//!   |   version, features, then the accept         |
//!   | <------------------------------------------- |
//! ```
//!
//! A frame's header carries the version of its payload's *layout*: the oldest protocol
//! version that reads the frame as written. Version 5 changed only the hello and the accept
//! (they gained the negotiation's fields in front), so every other frame still says 4, and a
//! version-4 peer reads every frame a version-5 peer sends it once they have agreed on 4. A
//! version-4 peer cannot read a version-5 hello: it refuses it, in a frame of version 4; a
//! source that sees that answer retries once, on a new connection, with a version-4 hello
//! ([`SessionHello::encode`] alone). A version-4 hello (the session alone, header 4) tells
//! a destination that the source speaks version 4 only, and does what version 4 did
//! ([`Features::V4`]).

use crate::cursor::{Reader, Writer};
use crate::session::{RamTransfer, SessionAccept, SessionHello};
use crate::WireError;
use std::fmt;

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 5;
/// The oldest protocol version this build speaks (a release speaks the previous one too).
pub const OLDEST_VERSION: u16 = 4;
/// The version a frame whose layout has not changed since version 4 carries: every kind but
/// a version-5 SessionHello and SessionAccept.
pub const FRAME_VERSION: u16 = 4;

/// A range of protocol versions a side speaks, `min..=max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versions {
    /// The oldest.
    pub min: u16,
    /// The newest.
    pub max: u16,
}

impl Versions {
    /// What this build speaks: [`OLDEST_VERSION`] to [`PROTOCOL_VERSION`].
    pub const THIS: Versions = Versions {
        min: OLDEST_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// `min..=max`, or `None` when empty.
    pub fn new(min: u16, max: u16) -> Option<Versions> {
        (min <= max).then_some(Versions { min, max })
    }

    /// Whether `v` is in the range.
    pub fn contains(&self, v: u16) -> bool {
        (self.min..=self.max).contains(&v)
    }

    /// The highest version both ranges hold, if any.
    pub fn highest_common(&self, other: &Versions) -> Option<u16> {
        let (lo, hi) = (self.min.max(other.min), self.max.min(other.max));
        (lo <= hi).then_some(hi)
    }
}

impl fmt::Display for Versions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {} to {}", self.min, self.max)
        }
    }
}

/// Optional parts of the protocol, as bits. Unknown bits a peer offers are ignored (a newer
/// peer offers more than this build knows); an unknown bit a source *requires* is a feature
/// the destination lacks, and named as a bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features(pub u64);

impl Features {
    /// RamPages may be zstd-compressed (flags bit 1).
    pub const ZSTD: Features = Features(1 << 0);
    /// RamPages may carry a CRC32C per page, which the destination checks (and a torn page
    /// must arrive again intact).
    pub const PAGE_CHECKSUMS: Features = Features(1 << 1);
    /// Local mode: guest memory handed over as files (`MemoryFiles`), no page copied.
    pub const LOCAL: Features = Features(1 << 2);
    /// The session may switch to postcopy (the hello's postcopy byte 1; an urgent channel).
    pub const POSTCOPY: Features = Features(1 << 3);
    /// A session may resume a broken postcopy (the hello's postcopy byte 2,
    /// `PostcopyResume`).
    pub const POSTCOPY_RECOVERY: Features = Features(1 << 4);
    /// The guest may arrive paused: `Handover` may carry a byte saying so (a guest its
    /// operator stopped on the source stays stopped). New in version 5.
    pub const PAUSED_GUEST: Features = Features(1 << 5);
    /// A switchover may be abandoned (a `Reject` with code `SwitchoverAbandoned`, past the
    /// source's hard bound on the pause): the destination keeps the guest's memory and waits
    /// for the same session to go on in a new connection (a hello with the same id). New in
    /// version 5.
    pub const SWITCHOVER_RETRY: Features = Features(1 << 6);
    /// The destination says when every device twin has loaded what its source must send
    /// before a switchover (`SwitchoverAck`, QEMU's `switchover-ack`). New in version 5.
    pub const SWITCHOVER_ACK: Features = Features(1 << 7);
    /// No feature.
    pub const NONE: Features = Features(0);
    /// What a version-4 peer does: every feature above (version 4 had them all, without
    /// saying so).
    pub const V4: Features = Features(0b1_1111);
    /// Every feature this build knows.
    pub const ALL: Features = Features(0b1111_1111);

    const NAMES: [(Features, &'static str); 8] = [
        (Features::ZSTD, "zstd compression"),
        (Features::PAGE_CHECKSUMS, "page checksums"),
        (Features::LOCAL, "local mode"),
        (Features::POSTCOPY, "postcopy"),
        (Features::POSTCOPY_RECOVERY, "postcopy recovery"),
        (Features::PAUSED_GUEST, "paused guest"),
        (Features::SWITCHOVER_RETRY, "switchover retry"),
        (Features::SWITCHOVER_ACK, "switchover ack"),
    ];

    /// Whether every bit of `other` is set here.
    pub fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits set in either.
    pub fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }

    /// The bits set in both.
    pub fn intersection(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    /// The bits set here and not in `other`.
    pub fn without(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }

    /// Whether no bit is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The feature a name from [`fmt::Display`] stands for (`zstd`, `page-checksums`,
    /// `local`, `postcopy`, `postcopy-recovery` too).
    pub fn from_name(name: &str) -> Option<Features> {
        let short = [
            ("zstd", Features::ZSTD),
            ("page-checksums", Features::PAGE_CHECKSUMS),
            ("local", Features::LOCAL),
            ("postcopy", Features::POSTCOPY),
            ("postcopy-recovery", Features::POSTCOPY_RECOVERY),
            ("paused-guest", Features::PAUSED_GUEST),
            ("switchover-retry", Features::SWITCHOVER_RETRY),
            ("switchover-ack", Features::SWITCHOVER_ACK),
        ];
        short
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
            .or_else(|| {
                Self::NAMES
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|(f, _)| *f)
            })
    }
}

impl fmt::Display for Features {
    /// The features' names, comma-separated; a bit this build does not know as `bit N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for bit in (0..64)
            .map(|b| Features(1 << b))
            .filter(|b| self.contains(*b))
        {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            match Self::NAMES.iter().find(|(x, _)| *x == bit) {
                Some((_, name)) => f.write_str(name)?,
                None => write!(f, "feature bit {}", bit.0.trailing_zeros())?,
            }
        }
        Ok(())
    }
}

/// What a source offers in its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    /// The versions it speaks.
    pub versions: Versions,
    /// The features it can use.
    pub features: Features,
    /// The features this migration needs: the destination refuses the session if it lacks
    /// one. A subset of `features`.
    pub required: Features,
}

impl Offer {
    /// What a version-4 hello stands for: version 4 only, every feature of version 4, and
    /// the ones its fields use required.
    pub fn v4(hello: &SessionHello) -> Offer {
        Offer {
            versions: Versions { min: 4, max: 4 },
            features: Features::V4,
            required: hello_needs(hello),
        }
    }

    /// Checks a destination's answer against this offer: a version in the offered range,
    /// no feature that was not offered, every required one.
    pub fn check(&self, agreed: &Agreed) -> Result<(), WireError> {
        if !self.versions.contains(agreed.version) {
            return Err(WireError::OutOfRange {
                field: "agreed protocol version",
                value: agreed.version as u64,
                reason: "not one the source offered",
            });
        }
        let extra = agreed.features.without(self.features);
        if !extra.is_empty() {
            return Err(WireError::OutOfRange {
                field: "agreed features",
                value: extra.0,
                reason: "features the source did not offer",
            });
        }
        let missing = self.required.without(agreed.features);
        if !missing.is_empty() {
            return Err(WireError::OutOfRange {
                field: "agreed features",
                value: missing.0,
                reason: "required features left out",
            });
        }
        Ok(())
    }
}

/// The features a hello's own fields use: local mode, postcopy, its recovery.
pub fn hello_needs(hello: &SessionHello) -> Features {
    let mut f = Features::NONE;
    if hello.ram == RamTransfer::Local {
        f = f.union(Features::LOCAL);
    }
    if hello.postcopy {
        f = f.union(Features::POSTCOPY);
    }
    if hello.resume {
        f = f.union(Features::POSTCOPY_RECOVERY);
    }
    f
}

/// What the destination chose: the version the session speaks and the features it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The highest version both sides speak.
    pub version: u16,
    /// The features both sides have (of those the source offered).
    pub features: Features,
}

impl Agreed {
    /// What a version-4 session uses.
    pub const V4: Agreed = Agreed {
        version: 4,
        features: Features::V4,
    };
}

/// Why a destination cannot agree with an offer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// The two ranges of versions do not meet.
    #[error(
        "no protocol version in common: the source speaks {offered}, this destination {spoken}"
    )]
    NoCommonVersion {
        /// The source's.
        offered: Versions,
        /// The destination's.
        spoken: Versions,
    },
    /// The source requires features the destination does not have.
    #[error("this destination lacks {missing}, which the source requires")]
    MissingFeatures {
        /// The missing ones.
        missing: Features,
    },
}

/// The destination's choice: the highest version both speak, and the features both have.
pub fn negotiate(
    offer: &Offer,
    versions: Versions,
    features: Features,
) -> Result<Agreed, NegotiationError> {
    let version =
        offer
            .versions
            .highest_common(&versions)
            .ok_or(NegotiationError::NoCommonVersion {
                offered: offer.versions,
                spoken: versions,
            })?;
    let missing = offer.required.without(features);
    if !missing.is_empty() {
        return Err(NegotiationError::MissingFeatures { missing });
    }
    Ok(Agreed {
        version,
        features: offer.features.intersection(features),
    })
}

/// A SessionHello's payload in the layout of `version` (the frame's header carries it):
/// version 4, the session alone ([`SessionHello::encode`]; the offer is implied); version 5,
/// min u16, max u16, features u64, required u64, then the session.
pub fn encode_hello(version: u16, offer: &Offer, hello: &SessionHello) -> Vec<u8> {
    if version < 5 {
        return hello.encode();
    }
    let mut out = Vec::new();
    Writer::new(&mut out)
        .u16(offer.versions.min)
        .u16(offer.versions.max)
        .u64(offer.features.0)
        .u64(offer.required.0);
    out.extend(hello.encode());
    out
}

/// Reads a SessionHello's payload in the layout of `version` (the frame header's). A
/// version-5 offer must hold a version of at least 5 (a source speaking only 4 sends a
/// version-4 hello), require only features it offers, and require those its fields use.
pub fn decode_hello(version: u16, buf: &[u8]) -> Result<(Offer, SessionHello), WireError> {
    if version < 5 {
        let hello = SessionHello::decode(buf)?;
        return Ok((Offer::v4(&hello), hello));
    }
    let mut r = Reader::new(buf, "SessionHello");
    let (min, max) = (r.u16()?, r.u16()?);
    let versions = Versions::new(min, max).ok_or(WireError::OutOfRange {
        field: "hello's oldest version",
        value: min as u64,
        reason: "above its newest",
    })?;
    if max < 5 {
        return Err(WireError::OutOfRange {
            field: "hello's newest version",
            value: max as u64,
            reason: "a version-5 hello speaks version 5 or later",
        });
    }
    let features = Features(r.u64()?);
    let required = Features(r.u64()?);
    let hello = SessionHello::decode(r.rest())?;
    if !features.contains(required) {
        return Err(WireError::OutOfRange {
            field: "required features",
            value: required.without(features).0,
            reason: "required but not offered",
        });
    }
    let needs = hello_needs(&hello).without(required);
    if !needs.is_empty() {
        return Err(WireError::OutOfRange {
            field: "required features",
            value: needs.0,
            reason:
                "the hello uses them (local mode, postcopy, its recovery) without requiring them",
        });
    }
    let offer = Offer {
        versions,
        features,
        required,
    };
    Ok((offer, hello))
}

/// A SessionAccept's payload in the layout of `layout`, the hello's: version 4, the accept
/// alone (`agreed` must then be [`Agreed::V4`]'s version); version 5, version u16, features
/// u64, then the accept.
pub fn encode_accept(layout: u16, agreed: &Agreed, accept: &SessionAccept) -> Vec<u8> {
    if layout < 5 {
        return accept.encode();
    }
    let mut out = Vec::new();
    Writer::new(&mut out)
        .u16(agreed.version)
        .u64(agreed.features.0);
    out.extend(accept.encode());
    out
}

/// Reads a SessionAccept's payload in the layout of `layout` (the frame header's).
pub fn decode_accept(layout: u16, buf: &[u8]) -> Result<(Agreed, SessionAccept), WireError> {
    if layout < 5 {
        return Ok((Agreed::V4, SessionAccept::decode(buf)?));
    }
    let mut r = Reader::new(buf, "SessionAccept");
    let version = r.u16()?;
    if version < layout {
        return Err(WireError::OutOfRange {
            field: "agreed protocol version",
            value: version as u64,
            reason: "older than the accept's own layout",
        });
    }
    let agreed = Agreed {
        version,
        features: Features(r.u64()?),
    };
    Ok((agreed, SessionAccept::decode(r.rest())?))
}

#[cfg(test)]
mod tests;
