//! The migration runtime: every thread of one migration attempt, on either side.
//!
//! Both sides run a migration the same way. A `Runtime` is made inside a
//! [`std::thread::scope`] for one attempt and owns:
//!
//! - every named thread of the attempt: the channel threads and pumps started with
//!   `Runtime::spawn`, and the jobs (device saves and loads, the state save) started with
//!   `Runtime::submit`. Threads are named `{prefix}-{name}` (`lm-src-ch0`, `lm-dst-load1`);
//!   Linux shows the first 15 bytes, so names are short. A job starts at once on a thread of
//!   its own (QEMU's `thread_pool_submit_immediate`): one job never waits for another.
//!   Devices never make threads; the migration does, here.
//! - one cancellation, the attempt's [`CancelToken`]: a failed job, a panicking thread or a
//!   thread that could not start cancels it, so every part of the attempt sees one signal.
//! - the first failure (an `Err` of a job, a panic, a failed spawn), recorded before the
//!   attempt is cancelled. Every ending is also sent as a [`ThreadDone`] on
//!   `Runtime::completions`, so a coordinator can `select!` on it beside its other inputs
//!   and hears of a panic at once, not at the join.
//! - the shutdown handles of the attempt's sockets (`Runtime::add_socket`).
//!
//! `Runtime::teardown` is the one way an attempt ends: it cancels (when the attempt
//! failed), shuts every socket down (which wakes any thread blocked on one), joins every
//! thread whatever happened, and returns the first failure. A runtime dropped without it
//! does the same, so no thread outlives its migration.
//!
//! ```text
//! spawn/submit ─► running ─► Ok / returns ───────────► ThreadDone(Ok)
//!                         ├─► Err / panic ─► record ─► ThreadDone(Err) ─► cancel the attempt
//!                         └─► JobCancelled ──────────► ThreadDone(Err(Cancelled))
//! teardown: cancel if failed ─► shut sockets ─► join all ─► first Failed / Panicked / Spawn
//! ```
//!
//! `Runtime` itself is internal. An embedder meets this module through [`ThreadError`]
//! (inside [`crate::MigrationError::Job`] and [`crate::IncomingError::Job`]) and through
//! [`thread_count`] and [`thread_count_named`], which let a test or a health check see that
//! no `lm-*` thread outlives its migration.

use std::error::Error as StdError;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{Scope, ScopedJoinHandle};

use crossbeam_channel::{Receiver, Sender};

use crate::cancel::CancelToken;
use crate::transport::Stream;

/// What a job returns on failure: any error (`?` converts), or [`JobCancelled`] when the job
/// stopped because the attempt was cancelled.
pub type JobError = Box<dyn StdError + Send + Sync + 'static>;

/// The error a job returns when it stops because the attempt was cancelled; it is reported
/// as [`ThreadError::Cancelled`], not as a failure.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("job cancelled")]
pub struct JobCancelled;

/// How a thread of a migration failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ThreadError {
    /// A job returned an error.
    #[error("job {job} failed: {source}")]
    Failed {
        /// The job's name (its thread's, without the prefix).
        job: String,
        /// What the job returned.
        #[source]
        source: Arc<dyn StdError + Send + Sync + 'static>,
    },
    /// A thread panicked; the panic was caught in the thread.
    #[error("thread {job} panicked: {message}")]
    Panicked {
        /// The thread's name, without the prefix.
        job: String,
        /// The panic's message.
        message: String,
    },
    /// The thread could not be created.
    #[error("could not start thread {job}: {source}")]
    Spawn {
        /// The thread's name, without the prefix.
        job: String,
        /// Why the system refused.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The job stopped because the attempt was cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl ThreadError {
    /// A failure that must fail the migration, as opposed to a job that stopped on cancel.
    fn is_failure(&self) -> bool {
        !matches!(self, ThreadError::Cancelled)
    }
}

/// One thread of the migration ended (sent on `Runtime::completions`).
#[derive(Debug, Clone)]
pub struct ThreadDone {
    /// The thread's name, without the prefix.
    pub name: String,
    /// How it ended.
    pub result: Result<(), ThreadError>,
}

/// State shared by the runtime and its threads.
struct Shared {
    cancel: CancelToken,
    first_failure: Mutex<Option<ThreadError>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while holding it; the data is still valid.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Records `err` if it is the first failure, then cancels the attempt.
    fn fail(&self, err: &ThreadError) {
        lock(&self.first_failure).get_or_insert_with(|| err.clone());
        self.cancel.cancel();
    }
}

/// Every thread, socket and the cancellation of one migration attempt.
pub(crate) struct Runtime<'scope, 'env: 'scope> {
    scope: &'scope Scope<'scope, 'env>,
    prefix: &'static str,
    shared: Arc<Shared>,
    threads: Mutex<Vec<(String, ScopedJoinHandle<'scope, ()>)>>,
    sockets: Mutex<Vec<Stream>>,
    done_tx: Sender<ThreadDone>,
    done_rx: Receiver<ThreadDone>,
}

impl<'scope, 'env: 'scope> Runtime<'scope, 'env> {
    /// A runtime in `scope` whose threads are named `{prefix}-{name}` and whose cancellation
    /// is `cancel` (the attempt's own token).
    pub fn new(
        scope: &'scope Scope<'scope, 'env>,
        prefix: &'static str,
        cancel: CancelToken,
    ) -> Self {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        Runtime {
            scope,
            prefix,
            shared: Arc::new(Shared {
                cancel,
                first_failure: Mutex::new(None),
            }),
            threads: Mutex::new(Vec::new()),
            sockets: Mutex::new(Vec::new()),
            done_tx,
            done_rx,
        }
    }

    /// The attempt's cancellation.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.shared.cancel
    }

    /// Cancels the attempt.
    pub fn cancel(&self) {
        self.shared.cancel.cancel();
    }

    /// Keeps a clone of `stream` to shut down at teardown (or when the attempt is cut).
    pub fn add_socket(&self, stream: &Stream) -> std::io::Result<()> {
        self.keep_socket(stream.try_clone()?);
        Ok(())
    }

    /// Keeps `clone` (a clone made beforehand) to shut down at teardown.
    pub fn keep_socket(&self, clone: Stream) {
        lock(&self.sockets).push(clone);
    }

    /// Clones of every socket added so far, for a watcher that must be able to cut them.
    pub fn socket_clones(&self) -> Vec<Stream> {
        lock(&self.sockets)
            .iter()
            .filter_map(|s| s.try_clone().ok())
            .collect()
    }

    /// Starts `body` on a thread named `{prefix}-{name}`: a channel thread or a pump, which
    /// reports how it went through its own events. A panic is caught and fails the attempt.
    pub fn spawn<F>(&self, name: &str, body: F)
    where
        F: FnOnce() + Send + 'scope,
    {
        self.submit(name, move || {
            body();
            Ok(())
        });
    }

    /// [`Runtime::spawn`] for a thread on postcopy's request path (the fault thread, the
    /// urgent channel, the return path): it runs at a raised priority, so on a host whose
    /// cores are busy with the bulk push a vCPU's page is not left waiting for a time slice.
    pub fn spawn_favoured<F>(&self, name: &str, body: F)
    where
        F: FnOnce() + Send + 'scope,
    {
        self.spawn(name, move || {
            favour_current_thread();
            body()
        })
    }

    /// Starts `job` now on a thread named `{prefix}-{name}`. An `Err` (other than
    /// [`JobCancelled`]) or a panic fails the attempt; so does a thread that cannot be
    /// created. A job submitted once the attempt is cancelled is not started.
    pub fn submit<F>(&self, name: &str, job: F)
    where
        F: FnOnce() -> Result<(), JobError> + Send + 'scope,
    {
        if self.shared.cancel.is_cancelled() {
            return;
        }
        // Interior NULs would make the thread builder panic.
        let thread_name = format!("{}-{}", self.prefix, name).replace('\0', "?");
        let shared = Arc::clone(&self.shared);
        let done_tx = self.done_tx.clone();
        let job_name = name.to_string();
        let started = std::thread::Builder::new()
            .name(thread_name)
            .spawn_scoped(self.scope, move || {
                run_job(&job_name, job, &shared, &done_tx)
            });
        match started {
            Ok(handle) => lock(&self.threads).push((name.to_string(), handle)),
            Err(e) => {
                let err = ThreadError::Spawn {
                    job: name.to_string(),
                    source: Arc::new(e),
                };
                // Reported before the others are cancelled, so a coordinator sees the
                // failure before any ending it caused. The receiver lives in `self`.
                let _ = self.done_tx.send(ThreadDone {
                    name: name.to_string(),
                    result: Err(err.clone()),
                });
                self.shared.fail(&err);
            }
        }
    }

    /// The first failure of any thread so far.
    pub fn failure(&self) -> Option<ThreadError> {
        lock(&self.shared.first_failure).clone()
    }

    /// Every thread's ending, in the order they end.
    pub fn completions(&self) -> Receiver<ThreadDone> {
        self.done_rx.clone()
    }

    /// Ends the attempt: cancels it if it `failed`, shuts every socket down, joins every
    /// thread whatever happened, and returns the first failure of any of them.
    pub fn teardown(self, failed: bool) -> Option<ThreadError> {
        if failed {
            self.cancel();
        }
        self.shut_and_join();
        self.failure()
    }

    fn shut_and_join(&self) {
        for s in lock(&self.sockets).iter() {
            s.shutdown();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for (job, handle) in threads {
            // `run_job` catches the body's panics; an Err here means something after it
            // panicked (e.g. dropping the panic payload). Still a failure, never a hang.
            if let Err(payload) = handle.join() {
                self.shared.fail(&ThreadError::Panicked {
                    job,
                    message: crate::error::panic_message(payload.as_ref()),
                });
            }
        }
    }
}

impl Drop for Runtime<'_, '_> {
    /// A runtime dropped without [`Runtime::teardown`] (an early return) cancels the attempt
    /// and joins every thread.
    fn drop(&mut self) {
        if !lock(&self.threads).is_empty() {
            self.cancel();
            self.shut_and_join();
        }
    }
}

fn run_job<F>(name: &str, job: F, shared: &Shared, done_tx: &Sender<ThreadDone>)
where
    F: FnOnce() -> Result<(), JobError>,
{
    let result = match catch_unwind(AssertUnwindSafe(job)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is::<JobCancelled>() => Err(ThreadError::Cancelled),
        Ok(Err(e)) => Err(ThreadError::Failed {
            job: name.to_string(),
            source: Arc::from(e),
        }),
        Err(payload) => Err(ThreadError::Panicked {
            job: name.to_string(),
            message: crate::error::panic_message(payload.as_ref()),
        }),
    };
    let failure = result.as_ref().err().filter(|e| e.is_failure()).cloned();
    if let Some(err) = &failure {
        lock(&shared.first_failure).get_or_insert_with(|| err.clone());
    }
    // Reported before the others are cancelled, so a coordinator sees the failure first.
    // The runtime keeps a receiver until it is dropped; nothing to do if nobody listens.
    let _ = done_tx.send(ThreadDone {
        name: name.to_string(),
        result,
    });
    if failure.is_some() {
        shared.cancel.cancel();
    }
}

/// Threads in this process, from `/proc/self/task` (0 if it cannot be read).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Threads in this process whose name (as Linux shows it, at most 15 bytes) starts with
/// `prefix`. Unlike [`thread_count`], not disturbed by unrelated threads (e.g. other tests).
pub fn thread_count_named(prefix: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .filter(|comm| comm.trim_end().starts_with(prefix))
        .count()
}

/// Nice value of the threads on postcopy's request path.
const FAVOURED_NICE: libc::c_int = -10;

/// Raises the calling thread's priority to [`FAVOURED_NICE`]. Best effort: without
/// `CAP_SYS_NICE` (and a low enough `RLIMIT_NICE`) the thread keeps its priority.
fn favour_current_thread() {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on PRIO_PROCESS with this thread's own id changes only this
    // thread's nice value; it takes no pointers.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, FAVOURED_NICE) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    /// Waits up to 2 s for joined threads to leave /proc (a joined thread can linger there
    /// for a moment after its exit is reported).
    fn settle_named(prefix: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let n = thread_count_named(prefix);
            if n == 0 || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn jobs_run_concurrently() {
        let barrier = Barrier::new(2);
        let result = std::thread::scope(|s| {
            let rt = Runtime::new(s, "tconc", CancelToken::new());
            for name in ["a", "b"] {
                let barrier = &barrier;
                rt.submit(name, move || {
                    barrier.wait();
                    Ok(())
                });
            }
            rt.teardown(false)
        });
        assert!(result.is_none(), "{result:?}");
    }

    #[test]
    fn first_error_cancels_others_promptly() {
        let start = Instant::now();
        let (result, done) = std::thread::scope(|s| {
            let rt = Runtime::new(s, "terr", CancelToken::new());
            let rx = rt.completions();
            let cancel = rt.cancel_token().clone();
            rt.submit("sleeper", move || {
                if cancel.sleep(Duration::from_secs(30)) {
                    Ok(())
                } else {
                    Err(JobCancelled.into())
                }
            });
            let cancel = rt.cancel_token().clone();
            rt.submit("bad", move || {
                cancel.sleep(Duration::from_millis(20));
                Err("disk on fire".into())
            });
            let first = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a completion");
            assert_eq!(first.name, "bad");
            assert!(rt
                .failure()
                .is_some_and(|e| e.to_string().contains("disk on fire")));
            (rt.teardown(false), rx.try_iter().collect::<Vec<_>>())
        });
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "cancel was not prompt"
        );
        match result {
            Some(ThreadError::Failed { job, source }) => {
                assert_eq!(job, "bad");
                assert_eq!(source.to_string(), "disk on fire");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert_eq!(done.len(), 1);
        assert!(matches!(done[0].result, Err(ThreadError::Cancelled)));
    }

    #[test]
    fn panic_becomes_an_error_and_others_are_joined() {
        let finished = AtomicBool::new(false);
        let result = std::thread::scope(|s| {
            let rt = Runtime::new(s, "tpanic", CancelToken::new());
            let finished = &finished;
            let cancel = rt.cancel_token().clone();
            rt.spawn("waiter", move || {
                cancel.sleep(Duration::from_secs(30));
                finished.store(true, Ordering::SeqCst);
            });
            rt.spawn("boom", || panic!("boom at byte 7"));
            let panicked = rt
                .completions()
                .recv_timeout(Duration::from_secs(10))
                .expect("the panic is reported as it happens");
            assert_eq!(panicked.name, "boom");
            rt.teardown(false)
        });
        assert!(finished.load(Ordering::SeqCst));
        match result {
            Some(ThreadError::Panicked { job, message }) => {
                assert_eq!(job, "boom");
                assert!(message.contains("boom at byte 7"), "{message}");
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
    }

    #[test]
    fn an_outside_cancel_stops_jobs() {
        let token = CancelToken::new();
        let start = Instant::now();
        let result = std::thread::scope(|s| {
            let rt = Runtime::new(s, "text", token.clone());
            for name in ["a", "b", "c"] {
                let cancel = token.clone();
                rt.submit(name, move || {
                    while cancel.sleep(Duration::from_secs(30)) {}
                    Err(JobCancelled.into())
                });
            }
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(thread_count_named("text-"), 3);
            token.cancel();
            rt.teardown(false)
        });
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(result.is_none(), "a cancel is not a failure: {result:?}");
    }

    #[test]
    fn a_cancelled_runtime_starts_nothing_and_a_failure_cancels_the_attempt() {
        let token = CancelToken::new();
        let ran = AtomicBool::new(false);
        std::thread::scope(|s| {
            let rt = Runtime::new(s, "tref", token.clone());
            rt.submit("bad", || Err("no".into()));
            let done = rt.completions().recv().expect("done");
            assert!(matches!(done.result, Err(ThreadError::Failed { .. })));
            assert!(token.is_cancelled());
            let ran_ref = &ran;
            rt.spawn("late", move || ran_ref.store(true, Ordering::SeqCst));
            assert!(matches!(
                rt.teardown(false),
                Some(ThreadError::Failed { .. })
            ));
            assert!(!ran.load(Ordering::SeqCst));
        });
    }

    #[test]
    fn drop_cancels_and_joins() {
        let finished = AtomicBool::new(false);
        std::thread::scope(|s| {
            {
                let rt = Runtime::new(s, "tdrop", CancelToken::new());
                let finished = &finished;
                let cancel = rt.cancel_token().clone();
                rt.submit("long", move || {
                    cancel.sleep(Duration::from_secs(30));
                    finished.store(true, Ordering::SeqCst);
                    Ok(())
                });
            }
            // Still inside the scope: only the runtime's Drop can have joined the job.
            assert!(finished.load(Ordering::SeqCst));
        });
    }

    #[test]
    fn thread_count_returns_to_baseline_after_50_runtimes() {
        assert!(thread_count() >= 1);
        assert_eq!(settle_named("tcnt"), 0);
        let mut seen_alive = Vec::new();
        for round in 0..50 {
            std::thread::scope(|s| {
                let rt = Runtime::new(s, "tcnt", CancelToken::new());
                // Two rendezvous: after the first every job runs (and has named its thread),
                // after the second they may end. Nothing here may panic between the two.
                let started = Arc::new(Barrier::new(5));
                let release = Arc::new(Barrier::new(5));
                for j in 0..4 {
                    let (started, release) = (Arc::clone(&started), Arc::clone(&release));
                    rt.spawn(&format!("{round}-{j}"), move || {
                        started.wait();
                        release.wait();
                    });
                }
                started.wait();
                seen_alive.push(thread_count_named("tcnt"));
                release.wait();
                assert!(rt.teardown(false).is_none());
            });
        }
        // All four were alive at once, and visible by name.
        assert!(seen_alive.iter().all(|&n| n >= 4), "{seen_alive:?}");
        assert_eq!(settle_named("tcnt"), 0);
    }
}
