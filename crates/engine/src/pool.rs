//! The migration-owned worker pool (DESIGN section 5).
//!
//! Devices do not make threads: they submit jobs to a [`WorkerPool`] that the migration owns.
//! The pool is built on [`std::thread::Scope`], so a job may borrow from the migration (its
//! devices, guest memory) for as long as the scope lives.
//!
//! - [`WorkerPool::submit`] starts the job at once on a new named thread `{prefix}-{name}`
//!   (QEMU's `thread_pool_submit_immediate`): one job never waits for another. Linux shows the
//!   first 15 bytes of a thread's name, so keep prefixes and names short.
//! - Every job gets a [`JobContext`]: [`JobContext::is_cancelled`], and
//!   [`JobContext::sleep`], which wakes early on cancel. Jobs that pace themselves sleep
//!   through it, never through `thread::sleep`, so a cancel is prompt.
//! - One cancel flag per pool, possibly the migration's own ([`WorkerPool::with_cancel_flag`]:
//!   the pool and the migration then share it, a cancel by either is seen by both).
//!   [`WorkerPool::cancel`] wakes sleeping jobs at once; a flag set from outside the pool is
//!   seen by a sleeping job within [`EXTERNAL_CANCEL_LATENCY`].
//! - The first error of any job (an `Err`, a panic, a thread that could not be spawned) is
//!   recorded and cancels the others. Panics are caught in the job's thread and become
//!   [`PoolError::Panicked`] naming the job; they never hang or abort the migration.
//! - Every completion is sent as a [`JobDone`] on [`WorkerPool::completions`], so a
//!   coordinator can `select!` on jobs and its other inputs.
//! - [`WorkerPool::join_all`] joins every job whatever happened and returns the first error.
//!   Dropping the pool without it cancels and joins: no thread outlives its pool.
//!
//! ```text
//! submit ─► running ─► Ok ────────────────────────────► JobDone(Ok)
//!                   ├─► Err / panic ─► record first ─► JobDone(Err) ─► cancel all
//!                   └─► returns JobCancelled ─────────► JobDone(Err(Cancelled))
//! join_all: first of Failed / Panicked / Spawn, else Cancelled if the flag is set, else Ok
//! ```

use std::error::Error as StdError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// What a job returns on failure: any error (`?` converts), or [`JobCancelled`] when the job
/// stopped because the pool was cancelled.
pub type PoolJobError = Box<dyn StdError + Send + Sync + 'static>;

/// The longest a sleeping job takes to notice a cancel flag set from outside the pool (a
/// plain `AtomicBool` cannot wake a sleeper; [`WorkerPool::cancel`] wakes at once).
pub const EXTERNAL_CANCEL_LATENCY: Duration = Duration::from_millis(5);

/// The error a job returns when it stops because the pool was cancelled; it is reported as
/// [`PoolError::Cancelled`], not as a failure.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("job cancelled")]
pub struct JobCancelled;

/// Transitional: the pool is being replaced by [`crate::runtime::Runtime`].
pub use crate::runtime::ThreadError as PoolError;

/// One job finished (sent on [`WorkerPool::completions`]).
#[derive(Debug, Clone)]
pub struct JobDone {
    pub name: String,
    pub result: Result<(), PoolError>,
}

/// State shared by the pool and its jobs.
struct Shared {
    cancel: Arc<AtomicBool>,
    /// Held only to pair with `wake`; sleeping jobs wait on it.
    wake_lock: Mutex<()>,
    wake: Condvar,
    first_error: Mutex<Option<PoolError>>,
    live: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a job panicked while holding it; the data is still valid.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        // Take the lock so a job between its flag check and its wait cannot miss the wakeup.
        let _g = lock(&self.wake_lock);
        self.wake.notify_all();
    }

    /// Records `err` if it is the first error (without cancelling).
    fn record(&self, err: &PoolError) {
        let mut first = lock(&self.first_error);
        if first.is_none() {
            *first = Some(err.clone());
        }
    }

    /// Records `err` if it is the first error, and cancels every job.
    fn fail(&self, err: PoolError) {
        self.record(&err);
        self.cancel();
    }
}

/// What a running job sees of its pool.
pub struct JobContext {
    name: String,
    shared: Arc<Shared>,
}

impl JobContext {
    /// The job's name as given to [`WorkerPool::submit`].
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.load(Ordering::SeqCst)
    }

    /// `Err(JobCancelled)` once the pool is cancelled: `ctx.check_cancelled()?` in a loop.
    pub fn check_cancelled(&self) -> Result<(), PoolJobError> {
        if self.is_cancelled() {
            Err(Box::new(JobCancelled))
        } else {
            Ok(())
        }
    }

    /// Sleeps for `d`, waking early on cancel. Returns false if the pool was cancelled
    /// (before or during the sleep), true if the whole time passed.
    pub fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut guard = lock(&self.shared.wake_lock);
        loop {
            if self.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            let slice = (deadline - now).min(EXTERNAL_CANCEL_LATENCY);
            guard = match self.shared.wake.wait_timeout(guard, slice) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// A pool of jobs, each on its own scoped thread, owned by one migration.
pub struct WorkerPool<'scope, 'env: 'scope> {
    scope: &'scope Scope<'scope, 'env>,
    prefix: String,
    shared: Arc<Shared>,
    handles: Mutex<Vec<(String, ScopedJoinHandle<'scope, ()>)>>,
    done_tx: Sender<JobDone>,
    done_rx: Receiver<JobDone>,
}

impl<'scope, 'env: 'scope> WorkerPool<'scope, 'env> {
    /// A pool with its own cancel flag.
    pub fn new(scope: &'scope Scope<'scope, 'env>, name_prefix: &str) -> Self {
        Self::with_cancel_flag(scope, name_prefix, Arc::new(AtomicBool::new(false)))
    }

    /// A pool whose cancel flag is `cancel`, shared with its owner: setting it cancels the
    /// jobs, and the pool sets it on its first error or on [`WorkerPool::cancel`].
    pub fn with_cancel_flag(
        scope: &'scope Scope<'scope, 'env>,
        name_prefix: &str,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        WorkerPool {
            scope,
            prefix: name_prefix.to_string(),
            shared: Arc::new(Shared {
                cancel,
                wake_lock: Mutex::new(()),
                wake: Condvar::new(),
                first_error: Mutex::new(None),
                live: AtomicUsize::new(0),
            }),
            handles: Mutex::new(Vec::new()),
            done_tx,
            done_rx,
        }
    }

    /// Starts `job` now on a new thread named `{prefix}-{name}`. Fails (and cancels the
    /// pool, recording the error) if the thread cannot be created; refuses with
    /// [`PoolError::Cancelled`] once the pool is cancelled.
    pub fn submit<F>(&self, name: &str, job: F) -> Result<(), PoolError>
    where
        F: FnOnce(&JobContext) -> Result<(), PoolJobError> + Send + 'scope,
    {
        if self.is_cancelled() {
            return Err(PoolError::Cancelled);
        }
        // Interior NULs would make the thread builder panic.
        let thread_name = format!("{}-{}", self.prefix, name).replace('\0', "?");
        let ctx = JobContext {
            name: name.to_string(),
            shared: Arc::clone(&self.shared),
        };
        let done_tx = self.done_tx.clone();
        self.shared.live.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name(thread_name)
            .spawn_scoped(self.scope, move || run_job(ctx, job, done_tx));
        match spawned {
            Ok(handle) => {
                lock(&self.handles).push((name.to_string(), handle));
                Ok(())
            }
            Err(e) => {
                self.shared.live.fetch_sub(1, Ordering::SeqCst);
                let err = PoolError::Spawn {
                    job: name.to_string(),
                    source: Arc::new(e),
                };
                // Recorded, reported, then the others cancelled: a coordinator sees the
                // failure before any completion it caused.
                self.shared.record(&err);
                // The receiver lives in `self`, so this send cannot fail; ignore it if it does.
                let _ = self.done_tx.send(JobDone {
                    name: name.to_string(),
                    result: Err(err.clone()),
                });
                self.shared.cancel();
                Err(err)
            }
        }
    }

    /// Cancels every job: sets the flag and wakes jobs sleeping in [`JobContext::sleep`].
    pub fn cancel(&self) {
        self.shared.cancel();
    }

    pub fn is_cancelled(&self) -> bool {
        self.shared.cancel.load(Ordering::SeqCst)
    }

    /// The pool's cancel flag (the one given to [`WorkerPool::with_cancel_flag`], if any).
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.shared.cancel)
    }

    /// The first error of any job so far, as text.
    pub fn first_error(&self) -> Option<String> {
        lock(&self.shared.first_error)
            .as_ref()
            .map(|e| e.to_string())
    }

    /// The first error of any job so far.
    pub fn first_error_detail(&self) -> Option<PoolError> {
        lock(&self.shared.first_error).clone()
    }

    /// Every job's completion, in the order they finish.
    pub fn completions(&self) -> Receiver<JobDone> {
        self.done_rx.clone()
    }

    /// Jobs started and not yet finished.
    pub fn live_jobs(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    /// Joins every job, whatever happened, and returns the first error; if there was none
    /// but the pool was cancelled, [`PoolError::Cancelled`].
    pub fn join_all(self) -> Result<(), PoolError> {
        self.join_handles();
        if let Some(err) = lock(&self.shared.first_error).clone() {
            return Err(err);
        }
        if self.is_cancelled() {
            return Err(PoolError::Cancelled);
        }
        Ok(())
    }

    fn join_handles(&self) {
        let handles = std::mem::take(&mut *lock(&self.handles));
        for (job, handle) in handles {
            // `run_job` catches the job's panics; an Err here means something after it
            // panicked (e.g. dropping the panic payload). Still an error, never a hang.
            if let Err(payload) = handle.join() {
                self.shared.fail(PoolError::Panicked {
                    job,
                    message: crate::error::panic_message(payload.as_ref()),
                });
            }
        }
    }
}

impl Drop for WorkerPool<'_, '_> {
    /// A pool dropped without [`WorkerPool::join_all`] (an early return) cancels its jobs
    /// and joins them.
    fn drop(&mut self) {
        let pending = !lock(&self.handles).is_empty();
        if pending {
            self.shared.cancel();
            self.join_handles();
        }
    }
}

fn run_job<F>(ctx: JobContext, job: F, done_tx: Sender<JobDone>)
where
    F: FnOnce(&JobContext) -> Result<(), PoolJobError>,
{
    let outcome = catch_unwind(AssertUnwindSafe(|| job(&ctx)));
    let result = match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is::<JobCancelled>() => Err(PoolError::Cancelled),
        Ok(Err(e)) => Err(PoolError::Failed {
            job: ctx.name.clone(),
            source: Arc::from(e),
        }),
        Err(payload) => Err(PoolError::Panicked {
            job: ctx.name.clone(),
            message: crate::error::panic_message(payload.as_ref()),
        }),
    };
    let failed = matches!(
        result,
        Err(PoolError::Failed { .. } | PoolError::Panicked { .. })
    );
    if let (true, Err(err)) = (failed, &result) {
        ctx.shared.record(err);
    }
    ctx.shared.live.fetch_sub(1, Ordering::SeqCst);
    // Reported before the others are cancelled, so a coordinator sees the failure first.
    // The pool keeps a receiver until it is joined; nothing to do if nobody listens.
    let _ = done_tx.send(JobDone {
        name: ctx.name.clone(),
        result,
    });
    if failed {
        ctx.shared.cancel();
    }
}

/// Teardown of a migration: cancels the pool if the migration `failed`, then joins every job
/// and every other thread of the migration. Returns the first panic or job failure, if any
/// (a cancel is not one).
pub fn join_everything(
    pool: WorkerPool<'_, '_>,
    threads: Vec<ScopedJoinHandle<'_, ()>>,
    failed: bool,
) -> Option<String> {
    let mut trouble = None;
    if failed {
        pool.cancel();
    }
    match pool.join_all() {
        Ok(()) | Err(PoolError::Cancelled) => {}
        Err(e) => trouble = Some(e.to_string()),
    }
    for h in threads {
        if let Err(p) = h.join() {
            trouble = Some(crate::error::panic_message(p.as_ref()));
        }
    }
    trouble
}

pub use crate::runtime::{thread_count, thread_count_named};
