//! The Loading phase: with every streamed device loaded, the small devices' blobs are
//! applied in list order, then the guest's own state; guest memory is verified when asked,
//! and the source is told it may hand over (Loaded).

use super::coordinator::Phase;
use super::handover::AwaitingHandover;
use super::receiving::Received;
use super::session::Session;
use crate::error::{ChannelError, ChannelName, IncomingError};
use crate::framed;
use crate::guest::VerifyReport;
use crate::transport::Stream;
use livemig_wire::{FrameKind, Loaded, VmStates};
use std::time::{Duration, Instant};

/// How loading went.
pub(super) struct LoadTimes {
    /// Small devices' and the guest's state applied.
    pub restore: Duration,
    pub verify_time: Duration,
    /// The check of guest memory, when asked for.
    pub verify: Option<VerifyReport>,
}

/// Restores, verifies and sends Loaded; the Handover is then awaited.
pub(super) fn load(
    s: &Session<'_>,
    main: &mut Stream,
    received: Received,
) -> Result<Phase, IncomingError> {
    let restore = restore(s, &received)?;
    let t = Instant::now();
    let verify = verify(s)?;
    let times = LoadTimes {
        restore,
        verify_time: t.elapsed(),
        verify,
    };
    let loaded = Loaded {
        drain_us: received.drain.as_micros() as u64,
        restore_us: times.restore.as_micros() as u64,
        verify_us: times.verify_time.as_micros() as u64,
        pages_checked: times.verify.as_ref().map_or(0, |v| v.pages_checked),
        pages_mismatched: times.verify.as_ref().map_or(0, |v| v.pages_mismatched),
        devices: received.device_stats.clone(),
    };
    #[cfg(feature = "test-hooks")]
    if let Some(d) = s
        .config
        .test_hooks
        .late_first_loaded
        .as_ref()
        .and_then(|l| l.take())
    {
        std::thread::sleep(d);
    }
    framed::send(main, ChannelName::Main, FrameKind::Loaded, &loaded.encode())?;
    Ok(Phase::AwaitingHandover(AwaitingHandover::new(
        received,
        times,
        Instant::now() + s.accept.peer_timeout(),
    )))
}

/// Applies state in a defined order: every streamed device has loaded (in Receiving), then
/// the small devices in list order, then the guest's own state. Returns the time it took.
pub(super) fn restore(s: &Session<'_>, received: &Received) -> Result<Duration, IncomingError> {
    let t = Instant::now();
    let blobs = VmStates::decode(&received.vmstates, s.vmstates.len()).map_err(|source| {
        IncomingError::Channel(ChannelError::Wire {
            channel: ChannelName::Main,
            source,
        })
    })?;
    for (dev, blob) in s.vmstates.iter().zip(&blobs.blobs) {
        dev.load(blob)?;
    }
    s.guest.restore_state(&received.state)?;
    Ok(t.elapsed())
}

/// Checks guest memory, when the configuration asks for it: any wrong page fails.
pub(super) fn verify(s: &Session<'_>) -> Result<Option<VerifyReport>, IncomingError> {
    if !s.config.verify {
        return Ok(None);
    }
    let v = s.guest.verify()?;
    if v.pages_mismatched > 0 {
        return Err(IncomingError::Verify {
            checked: v.pages_checked,
            mismatched: v.pages_mismatched,
            example: v.examples.first().cloned().unwrap_or_default(),
        });
    }
    Ok(Some(v))
}
