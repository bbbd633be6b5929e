//! One QMP connection: its reader (the `lm-qmp-client` thread: requests in, replies queued)
//! and its writer (`lm-qmp-write`: drains the connection's queue to the socket).
//!
//! Nothing but the writer ever blocks on the client's socket. Replies and events are queued
//! in order, up to [`ServerConfig::max_queued_bytes`] and
//! [`ServerConfig::max_queued_messages`]. An event ([`Conn::send`]) never waits: a client
//! that lets more pile up does not read, and is disconnected with the reason logged. A reply
//! ([`Conn::reply`], on the client's own reader thread) waits for room instead, so a client
//! that sends many commands before reading is slowed, as QEMU suspends such a monitor. A
//! client whose socket takes nothing for [`ServerConfig::write_timeout`] is disconnected too.
//! So one client that stops reading never holds up the VM's thread (which emits events) or
//! another client.
//!
//! A connection ends in one of two ways: *closed* (the client left, or the server closes it:
//! shutdown, the negotiation timeout, an idle client giving up its slot) lets the writer
//! drain what is queued, a farewell error included, within the write timeout; *aborted*
//! (the client does not read, or its socket failed) drops what is queued and shuts the
//! socket down at once.

use crate::message::{self, parse_request, QmpError, Request};
use crate::server::{dispatch, Handler, ServerConfig};
use crate::split::Splitter;
use serde_json::Value;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What waits to be written to one client.
#[derive(Default)]
struct Queue {
    msgs: VecDeque<Vec<u8>>,
    bytes: usize,
    /// No more messages are taken; the writer ends once the queue is empty.
    closing: bool,
    /// Ended without draining: the socket is shut down.
    aborted: bool,
}

/// One connected client, shared by its reader, its writer, the accept thread and [`Events`].
///
/// [`Events`]: crate::Events
pub(crate) struct Conn {
    /// Numbers the connection in logs.
    pub id: u64,
    stream: UnixStream,
    queue: Mutex<Queue>,
    /// Something was queued, or the connection is closing.
    ready: Condvar,
    /// Something was written, or the connection ended: a reply may fit now.
    room: Condvar,
    pub negotiated: AtomicBool,
    /// Its threads have ended (or are about to): it can be joined.
    pub done: AtomicBool,
    connected: Instant,
    /// When a message last arrived, in ms since `connected`.
    heard_ms: AtomicU64,
    max_bytes: usize,
    max_msgs: usize,
    write_timeout: Duration,
    log: fn(&str),
}

/// `d` for a person: whole seconds as "10 s", else milliseconds.
pub(crate) fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 && d >= Duration::from_secs(1) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

impl Conn {
    pub fn new(id: u64, stream: UnixStream, config: &ServerConfig) -> Conn {
        Conn {
            id,
            stream,
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            room: Condvar::new(),
            negotiated: AtomicBool::new(false),
            done: AtomicBool::new(false),
            connected: Instant::now(),
            heard_ms: AtomicU64::new(0),
            max_bytes: config.max_queued_bytes,
            max_msgs: config.max_queued_messages,
            write_timeout: config.write_timeout,
            log: config.log,
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full(&self, q: &Queue, len: usize) -> bool {
        q.msgs.len() >= self.max_msgs || q.bytes + len > self.max_bytes
    }

    /// Queues a reply, on the client's own reader thread: while the queue is full it waits
    /// for the writer (which gives up on a client whose socket takes nothing for the write
    /// timeout), so a client that sends many commands before reading is slowed, not
    /// dropped. False if the connection has ended.
    pub fn reply(&self, v: &Value) -> bool {
        let line = message::to_line(v);
        let mut q = self.queue();
        while !q.closing && !q.msgs.is_empty() && self.full(&q, line.len()) {
            q = self.room.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        if q.closing {
            return false;
        }
        q.bytes += line.len();
        q.msgs.push_back(line);
        self.ready.notify_one();
        true
    }

    /// Queues an event (or anything sent from a thread that must not wait for this
    /// client) without waiting. False if the connection has ended, or if the client has let
    /// too much pile up: it does not read, and is disconnected.
    pub fn send(&self, v: &Value) -> bool {
        let line = message::to_line(v);
        let mut q = self.queue();
        if q.closing {
            return false;
        }
        if self.full(&q, line.len()) {
            let why = format!(
                "it does not read its replies and events ({} messages, {} bytes waiting; at most {} messages, {} bytes)",
                q.msgs.len(),
                q.bytes,
                self.max_msgs,
                self.max_bytes
            );
            self.abort_locked(q, Some(&why));
            return false;
        }
        q.bytes += line.len();
        q.msgs.push_back(line);
        self.ready.notify_one();
        true
    }

    /// Whether the connection still takes messages.
    pub fn open(&self) -> bool {
        !self.queue().closing
    }

    /// Ends the connection after what is queued (and `farewell`, if given) is written: the
    /// reader stops (its socket's read side is shut down), the writer drains the queue.
    pub fn close(&self, farewell: Option<&QmpError>) {
        let mut q = self.queue();
        if q.closing {
            return;
        }
        if let Some(e) = farewell {
            let line = message::to_line(&message::reply_err(e, None));
            q.bytes += line.len();
            q.msgs.push_back(line);
        }
        q.closing = true;
        self.ready.notify_one();
        self.room.notify_all();
        drop(q);
        let _ = self.stream.shutdown(Shutdown::Read);
    }

    /// Ends the connection now: what is queued is dropped and the socket shut down. `why`,
    /// if given, is logged.
    pub fn abort(&self, why: Option<&str>) {
        let q = self.queue();
        self.abort_locked(q, why);
    }

    fn abort_locked(&self, mut q: MutexGuard<'_, Queue>, why: Option<&str>) {
        let first = !q.aborted;
        q.aborted = true;
        q.msgs.clear();
        q.bytes = 0;
        q.closing = true;
        self.ready.notify_one();
        self.room.notify_all();
        drop(q);
        let _ = self.stream.shutdown(Shutdown::Both);
        if let (true, Some(why)) = (first, why) {
            (self.log)(&format!("QMP client {} disconnected: {why}", self.id));
        }
    }

    fn heard(&self) {
        let ms = self.connected.elapsed().as_millis() as u64;
        self.heard_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the client has sent nothing (since it connected, if it never has).
    pub fn idle(&self) -> Duration {
        let heard = Duration::from_millis(self.heard_ms.load(Ordering::Relaxed));
        self.connected.elapsed().saturating_sub(heard)
    }

    /// The writer: drains the queue to the socket until the connection is closed and
    /// drained, or aborted.
    fn write_loop(&self) {
        let _ = self.stream.set_write_timeout(Some(self.write_timeout));
        loop {
            let line = {
                let mut q = self.queue();
                while q.msgs.is_empty() && !q.closing {
                    q = self.ready.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                match q.msgs.pop_front() {
                    Some(l) => {
                        q.bytes -= l.len();
                        self.room.notify_all();
                        l
                    }
                    None => break,
                }
            };
            if let Err(e) = (&self.stream).write_all(&line) {
                let stuck = matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                );
                let why = stuck.then(|| {
                    format!(
                        "it does not read its replies and events (its socket took nothing for {})",
                        human(self.write_timeout)
                    )
                });
                self.abort(why.as_deref());
                return;
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Serves one client on its reader thread, with its writer on a thread of its own (joined
/// before this returns).
pub(crate) fn serve(
    mut reader: UnixStream,
    conn: &Conn,
    handler: &dyn Handler,
    config: &ServerConfig,
) {
    std::thread::scope(|s| {
        let writer = std::thread::Builder::new()
            .name("lm-qmp-write".into())
            .spawn_scoped(s, || conn.write_loop());
        if writer.is_err() {
            conn.abort(Some("cannot start its writer thread"));
            return;
        }
        read_loop(&mut reader, conn, handler, config);
        conn.close(None);
    });
    conn.done.store(true, Ordering::Release);
}

fn read_loop(stream: &mut UnixStream, conn: &Conn, handler: &dyn Handler, config: &ServerConfig) {
    let package = config.package.as_str();
    if !conn.reply(&message::greeting(package)) {
        return;
    }
    let negotiate_by = Instant::now() + config.negotiation_timeout;
    let mut splitter = Splitter::new(config.limits);
    let mut buf = vec![0u8; 16 << 10];
    let mut pieces = Vec::new();
    let mut timed = false;
    loop {
        let negotiated = conn.negotiated.load(Ordering::Acquire);
        if !negotiated {
            let left = negotiate_by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let why = format!(
                    "capabilities were not negotiated ('qmp_capabilities') within {} of connecting: closing the connection",
                    human(config.negotiation_timeout)
                );
                (config.log)(&format!("QMP client {} closed: {why}", conn.id));
                conn.close(Some(&QmpError::generic(why)));
                return;
            }
            let _ = stream.set_read_timeout(Some(left));
            timed = true;
        } else if timed {
            let _ = stream.set_read_timeout(None);
            timed = false;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        conn.heard();
        splitter.push(&buf[..n], &mut pieces);
        for piece in pieces.drain(..) {
            let (reply, ran) = answer(piece, conn, handler, package);
            if !conn.reply(&reply) {
                return;
            }
            if let Some(req) = ran {
                handler.after_reply(&req);
            }
        }
    }
}

/// The reply to one message, and the request if it ran successfully.
fn answer(
    piece: Result<Vec<u8>, crate::split::SplitError>,
    conn: &Conn,
    handler: &dyn Handler,
    package: &str,
) -> (Value, Option<Request>) {
    match piece {
        Err(e) => (
            message::reply_err(&QmpError::generic(e.to_string()), None),
            None,
        ),
        Ok(bytes) => match parse_request(&bytes) {
            Err(bad) => (message::reply_err(&bad.error, bad.id.as_ref()), None),
            Ok(req) => {
                let r = dispatch(&req, &conn.negotiated, handler, package);
                let ok = r.is_ok();
                let reply = match r {
                    Ok(v) => message::reply_ok(v, req.id.as_ref()),
                    Err(e) => message::reply_err(&e, req.id.as_ref()),
                };
                (reply, ok.then_some(req))
            }
        },
    }
}
