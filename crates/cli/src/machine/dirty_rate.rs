//! QEMU's `calc-dirty-rate` and `query-dirty-rate`: how fast the guest writes its memory,
//! measured over a few seconds before migrating, so that an operator can tell whether
//! precopy will converge on a link (a guest dirtying faster than the link carries will not,
//! without auto-converge or postcopy). livemig measures with the guest's own dirty log
//! (QEMU's `dirty-bitmap` mode): every page written in the window counts once.

use livemig_engine::{CancelToken, DirtyBitmap, Guest};
use livemig_qmp::{Args, QmpError};
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// QEMU's bounds on `calc-time`, seconds.
const CALC_TIME: std::ops::RangeInclusive<u64> = 1..=60;

/// A measurement, and the last result.
#[derive(Default)]
pub struct DirtyRate {
    state: State,
}

#[derive(Default)]
enum State {
    #[default]
    Unstarted,
    Measuring {
        start: u64,
        secs: u64,
        cancel: CancelToken,
        thread: JoinHandle<Result<u64, String>>,
    },
    Measured {
        start: u64,
        secs: u64,
        mib_per_s: u64,
    },
    Failed {
        start: u64,
        secs: u64,
        error: String,
    },
}

impl DirtyRate {
    /// Whether a measurement runs (its dirty log is the guest's: no migration meanwhile).
    pub fn measuring(&mut self) -> bool {
        self.settle();
        matches!(self.state, State::Measuring { .. })
    }

    /// `calc-dirty-rate`: starts measuring `guest` for `calc-time` seconds.
    pub fn start(
        &mut self,
        guest: Arc<dyn Guest>,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let a = Args::new(
            args,
            &["calc-time", "calc-time-unit", "sample-pages", "mode"],
        )?;
        let secs = a
            .opt_u64("calc-time")?
            .ok_or_else(|| QmpError::generic("Parameter 'calc-time' is missing"))?;
        if !CALC_TIME.contains(&secs) || a.opt_str("calc-time-unit")?.is_some_and(|u| u != "second")
        {
            return Err(QmpError::generic(
                "Calculation time is out of range [1, 60] seconds",
            ));
        }
        if let Some(m) = a.opt_str("mode")?.filter(|m| *m != "dirty-bitmap") {
            return Err(QmpError::generic(format!(
                "mode '{m}' is not supported by livemig (it measures with the dirty log: 'dirty-bitmap')"
            )));
        }
        if self.measuring() {
            return Err(QmpError::generic(
                "Dirty rate measurement is already in progress",
            ));
        }
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cancel = CancelToken::new();
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("lm-vm-dirtyrate".into())
            .spawn(move || measure(&*guest, Duration::from_secs(secs), &stop))
            .map_err(|e| QmpError::generic(format!("cannot start the measurement: {e}")))?;
        self.state = State::Measuring {
            start,
            secs,
            cancel,
            thread,
        };
        Ok(json!({}))
    }

    /// `query-dirty-rate`.
    pub fn query(&mut self) -> Value {
        self.settle();
        match &self.state {
            State::Unstarted => json!({"status": "unstarted", "mode": "dirty-bitmap"}),
            State::Measuring { start, secs, .. } => json!({
                "status": "measuring", "start-time": start, "calc-time": secs,
                "calc-time-unit": "second", "mode": "dirty-bitmap",
            }),
            State::Measured {
                start,
                secs,
                mib_per_s,
            } => json!({
                "status": "measured", "dirty-rate": mib_per_s, "start-time": start,
                "calc-time": secs, "calc-time-unit": "second", "mode": "dirty-bitmap",
            }),
            State::Failed { start, secs, error } => json!({
                "status": "measured", "start-time": start, "calc-time": secs,
                "calc-time-unit": "second", "mode": "dirty-bitmap", "x-error": error,
            }),
        }
    }

    /// A measurement whose thread has ended becomes its result.
    fn settle(&mut self) {
        if !matches!(&self.state, State::Measuring { thread, .. } if thread.is_finished()) {
            return;
        }
        let State::Measuring {
            start,
            secs,
            thread,
            ..
        } = std::mem::take(&mut self.state)
        else {
            return;
        };
        self.state = match thread.join() {
            Ok(Ok(mib_per_s)) => State::Measured {
                start,
                secs,
                mib_per_s,
            },
            Ok(Err(error)) => State::Failed { start, secs, error },
            Err(_) => State::Failed {
                start,
                secs,
                error: "the measurement panicked".into(),
            },
        };
    }
}

impl Drop for DirtyRate {
    /// A measurement still running ends now (its thread joined, the dirty log stopped).
    fn drop(&mut self) {
        if let State::Measuring { cancel, thread, .. } = std::mem::take(&mut self.state) {
            cancel.cancel();
            let _ = thread.join();
        }
    }
}

/// Pages written in `window` (each once), in MiB per second; cut short by `cancel`.
fn measure(guest: &dyn Guest, window: Duration, cancel: &CancelToken) -> Result<u64, String> {
    guest
        .start_dirty_log()
        .map_err(|e| format!("cannot start the dirty log: {e}"))?;
    let t = std::time::Instant::now();
    let waited = cancel.sleep(window);
    let mut pages = DirtyBitmap::new(&guest.descriptor().ranges);
    let synced = guest.sync_dirty_log(&mut pages);
    let secs = t.elapsed().as_secs_f64();
    let _ = guest.stop_dirty_log();
    synced.map_err(|e| format!("cannot read the dirty log: {e}"))?;
    if !waited {
        return Err("cancelled".into());
    }
    let bytes = pages.count() * livemig_wire::PAGE_SIZE as u64;
    Ok((bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)) as u64)
}
