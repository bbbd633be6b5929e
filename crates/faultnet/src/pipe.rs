//! One direction of a connection as two threads: the reader applies the rules and stamps
//! what it read with the time it may go out; the writer delivers it then, and applies
//! faults in stream order.

use crate::conn::{Conn, CUT, HUNG, OPEN, RESET};
use crate::proxy::Shared;
use crate::rules::{Dir, Fault, Fired, Rule, Trigger};
use crate::{lock, CHUNK, TICK};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::Instant;

/// A rule of one connection and direction that has not fired yet.
pub(crate) struct Pending {
    trigger: Trigger,
    fault: Fault,
    /// For a pattern: the stream's last bytes, to find a pattern split across reads.
    tail: Vec<u8>,
}

impl Pending {
    /// `rule`, not fired yet.
    pub(crate) fn of(rule: &Rule) -> Pending {
        Pending {
            trigger: rule.trigger.clone(),
            fault: rule.fault,
            tail: Vec::new(),
        }
    }
}

pub(crate) enum What {
    Data(Vec<u8>),
    /// The peer closed its side: half-close the other.
    Eof,
    /// The peer reset or failed: reset the other.
    Broken(io::ErrorKind),
    /// A rule fired here: apply the fault once the bytes before it are out.
    Fault(Fault, u64),
}

pub(crate) struct Item {
    due: Instant,
    what: What,
}

/// Reads one direction, applies its rules, and queues what to deliver, stamped with the
/// time it may go out.
pub(crate) fn read_side(
    conn: &Conn,
    dir: Dir,
    mut rules: Vec<Pending>,
    tx: &SyncSender<Item>,
    shared: &Shared,
) {
    let (from, _) = conn.ends(dir);
    let mut pos = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let send = |what: What| {
        tx.send(Item {
            due: Instant::now() + shared.latency,
            what,
        })
        .is_ok()
    };
    if let Some(fault) = take_fault_at_start(&mut rules) {
        conn.held[dir.other().idx()].store(true, SeqCst);
        send(What::Fault(fault, 0));
        return drain_after_fault(conn, from, shared);
    }
    loop {
        if shared.stopped() {
            return;
        }
        match conn.state() {
            OPEN => {}
            HUNG => {
                std::thread::sleep(TICK);
                continue;
            }
            CUT => return drain(from, shared),
            _ => return,
        }
        let n = match read_some(from, &mut buf) {
            Got::Data(n) => n,
            Got::Again => continue,
            Got::Eof => {
                send(What::Eof);
                return;
            }
            Got::Failed(kind) => {
                if conn.state() == OPEN {
                    send(What::Broken(kind));
                }
                return;
            }
        };
        let data = &mut buf[..n];
        let cut = apply_rules(&mut rules, data, pos, conn, dir, shared);
        match cut {
            None => {
                pos += n as u64;
                if !send(What::Data(data.to_vec())) {
                    return;
                }
            }
            Some((k, fault)) => {
                // The other direction stops at once: nothing that the bytes before the
                // fault cause may get back before the fault applies.
                conn.held[dir.other().idx()].store(true, SeqCst);
                if k > 0 && !send(What::Data(data[..k].to_vec())) {
                    return;
                }
                pos += k as u64;
                send(What::Fault(fault, pos));
                return drain_after_fault(conn, from, shared);
            }
        }
    }
}

/// A rule that fires at byte 0 (other than a flip) fires before anything is read: takes
/// the first such rule out and returns its fault.
fn take_fault_at_start(rules: &mut Vec<Pending>) -> Option<Fault> {
    let i = rules
        .iter()
        .position(|r| r.trigger == Trigger::AfterBytes(0) && !matches!(r.fault, Fault::Flip(_)))?;
    Some(rules.remove(i).fault)
}

/// What one read from a socket gave.
enum Got {
    /// This many bytes.
    Data(usize),
    /// The peer closed its side.
    Eof,
    /// Nothing yet (a timeout or an interruption): look at the state and read again.
    Again,
    /// The socket failed or was reset.
    Failed(io::ErrorKind),
}

/// Reads what is there (within the socket's read timeout).
fn read_some(mut from: &TcpStream, buf: &mut [u8]) -> Got {
    match from.read(buf) {
        Ok(0) => Got::Eof,
        Ok(n) => Got::Data(n),
        Err(e) if transient(e.kind()) => Got::Again,
        Err(e) => Got::Failed(e.kind()),
    }
}

/// An error that only says "not now": a timeout or an interruption.
fn transient(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// After this direction's rule fired, nothing more is forwarded from it: wait for the fault
/// to be applied (after the latency), then behave as the connection's state says.
fn drain_after_fault(conn: &Conn, from: &TcpStream, shared: &Shared) {
    loop {
        if shared.stopped() {
            return;
        }
        match conn.state() {
            CUT => return drain(from, shared),
            RESET => return,
            _ => std::thread::sleep(TICK),
        }
    }
}

/// After a cut: reads and drops what the peer still sends until it closes, so closing our
/// socket later sends no RST over unread data.
fn drain(from: &TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; CHUNK];
    while !shared.stopped() {
        match read_some(from, &mut buf) {
            Got::Data(_) | Got::Again => {}
            Got::Eof | Got::Failed(_) => return,
        }
    }
}

/// Patterns become offsets once seen: each pattern rule whose pattern ends in `data` (which
/// starts at stream offset `pos`), or across its last read and `data`, now fires after
/// that offset.
fn resolve_patterns(rules: &mut [Pending], data: &[u8], pos: u64) {
    for r in rules.iter_mut() {
        if let Trigger::AfterPattern(p) = &r.trigger {
            if p.is_empty() {
                r.trigger = Trigger::AfterBytes(pos);
                continue;
            }
            let mut hay = std::mem::take(&mut r.tail);
            let before = hay.len();
            hay.extend_from_slice(data);
            if let Some(i) = hay.windows(p.len()).position(|w| w == p.as_slice()) {
                // Where the pattern ends, as a stream offset.
                let end = pos + (i + p.len()) as u64 - before as u64;
                r.trigger = Trigger::AfterBytes(end);
            } else {
                let keep = (p.len() - 1).min(hay.len());
                r.tail = hay[hay.len() - keep..].to_vec();
            }
        }
    }
}

/// Applies flips in place and finds the first rule that cuts the chunk: returns how many
/// bytes of `data` go through before it, and its fault.
fn apply_rules(
    rules: &mut Vec<Pending>,
    data: &mut [u8],
    pos: u64,
    conn: &Conn,
    dir: Dir,
    shared: &Shared,
) -> Option<(usize, Fault)> {
    let n = data.len() as u64;
    resolve_patterns(rules, data, pos);
    let mut cut: Option<(usize, Fault)> = None;
    rules.retain(|r| {
        let Trigger::AfterBytes(k) = r.trigger else {
            return true;
        };
        match r.fault {
            Fault::Flip(mask) => {
                if k >= pos && k < pos + n {
                    data[(k - pos) as usize] ^= mask;
                    lock(&shared.fired).push(Fired {
                        conn: conn.index,
                        dir: Some(dir),
                        at: k,
                        fault: r.fault,
                    });
                    shared.note(format!(
                        "conn {}: flipped byte {k} {} with {mask:#04x}",
                        conn.index,
                        dir.name()
                    ));
                    return false;
                }
                true
            }
            f => {
                if k >= pos && k <= pos + n {
                    let at = (k - pos) as usize;
                    if cut.is_none_or(|(c, _)| at < c) {
                        cut = Some((at, f));
                    }
                    return false;
                }
                // A trigger already behind us (cannot happen but for byte 0): fire now.
                if k < pos {
                    if cut.is_none_or(|(c, _)| c > 0) {
                        cut = Some((0, f));
                    }
                    return false;
                }
                true
            }
        }
    });
    cut
}

/// Delivers one direction's queued chunks once each is due, and applies faults in stream
/// order.
pub(crate) fn write_side(conn: &Conn, dir: Dir, rx: &Receiver<Item>, shared: &Shared) {
    let (_, to) = conn.ends(dir);
    loop {
        let item = match rx.recv_timeout(TICK) {
            Ok(i) => i,
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopped() || conn.state() >= CUT {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Wait until due; a hung connection holds everything.
        loop {
            if shared.stopped() || conn.state() >= CUT {
                return;
            }
            let now = Instant::now();
            if conn.halted(dir) {
                std::thread::sleep(TICK);
            } else if now < item.due {
                std::thread::sleep((item.due - now).min(TICK));
            } else {
                break;
            }
        }
        match item.what {
            What::Data(bytes) => {
                if let Err(e) = write_all(conn, dir, to, &bytes, shared) {
                    if conn.state() == OPEN {
                        shared.note(format!(
                            "conn {}: writing {} failed ({e}): both sides reset",
                            conn.index,
                            dir.name()
                        ));
                        let at = conn.forwarded[dir.idx()].load(SeqCst);
                        conn.apply(Fault::Reset, None, at, shared);
                    }
                    return;
                }
                conn.forwarded[dir.idx()].fetch_add(bytes.len() as u64, SeqCst);
            }
            What::Eof => {
                shared.note(format!("conn {}: {} closed", conn.index, dir.name()));
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            What::Broken(kind) => {
                shared.note(format!(
                    "conn {}: {} broke ({kind:?}): both sides reset",
                    conn.index,
                    dir.name()
                ));
                let at = conn.forwarded[dir.idx()].load(SeqCst);
                conn.apply(Fault::Reset, None, at, shared);
                return;
            }
            What::Fault(f, at) => {
                conn.apply(f, Some(dir), at, shared);
                if f != Fault::Hang {
                    return;
                }
            }
        }
    }
}

/// Writes every byte, giving up if the proxy stops or the connection is cut or reset.
fn write_all(
    conn: &Conn,
    dir: Dir,
    mut to: &TcpStream,
    mut bytes: &[u8],
    shared: &Shared,
) -> io::Result<()> {
    while !bytes.is_empty() {
        if shared.stopped() || conn.state() >= CUT {
            return Err(io::Error::other("stopped"));
        }
        if conn.halted(dir) {
            std::thread::sleep(TICK);
            continue;
        }
        match to.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if transient(e.kind()) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
