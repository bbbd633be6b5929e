//! One proxied connection: its sockets and state, the faults applied to it as a whole, and
//! the start of its threads.

use crate::pipe::{read_side, write_side, Item, Pending};
use crate::proxy::Shared;
use crate::rules::{Dir, Fault, Fired};
use crate::{lock, TICK};
use std::io;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{mpsc, Arc};

/// A connection's state ([`Conn::state`]): forwarding.
pub(crate) const OPEN: u8 = 0;
/// Hung: nothing is forwarded, nothing closed (can still be cut or reset).
pub(crate) const HUNG: u8 = 1;
/// Cut: both peers got a FIN.
pub(crate) const CUT: u8 = 2;
/// Reset: both peers got an RST.
pub(crate) const RESET: u8 = 3;

/// One proxied connection: its two sockets, shared by its four threads.
pub(crate) struct Conn {
    pub(crate) index: usize,
    pub(crate) client: TcpStream,
    pub(crate) upstream: TcpStream,
    pub(crate) state: AtomicU8,
    /// Per direction: held back because a rule fired in the other direction and its fault
    /// is on its way (so nothing the fault should stop slips through before it applies).
    pub(crate) held: [AtomicBool; 2],
    pub(crate) forwarded: Arc<[AtomicU64; 2]>,
}

impl Conn {
    /// (reads from, writes to) for a direction.
    pub(crate) fn ends(&self, dir: Dir) -> (&TcpStream, &TcpStream) {
        match dir {
            Dir::Up => (&self.client, &self.upstream),
            Dir::Down => (&self.upstream, &self.client),
        }
    }

    /// [`OPEN`], [`HUNG`], [`CUT`] or [`RESET`].
    pub(crate) fn state(&self) -> u8 {
        self.state.load(SeqCst)
    }

    /// Whether `dir` may deliver now (not hung, not held).
    pub(crate) fn halted(&self, dir: Dir) -> bool {
        self.state() == HUNG || self.held[dir.idx()].load(SeqCst)
    }

    /// Applies a connection-wide fault; false if the connection is already cut or reset
    /// (or hung, for a hang).
    pub(crate) fn apply(&self, fault: Fault, dir: Option<Dir>, at: u64, shared: &Shared) -> bool {
        let to = match fault {
            Fault::Reset => RESET,
            Fault::Cut => CUT,
            Fault::Hang => HUNG,
            Fault::Flip(_) => return false,
        };
        // A hung connection can still be reset or cut; nothing else changes a fault.
        let mut cur = self.state();
        loop {
            if cur >= CUT || (cur == HUNG && to == HUNG) {
                return false;
            }
            match self.state.compare_exchange(cur, to, SeqCst, SeqCst) {
                Ok(_) => break,
                Err(now) => cur = now,
            }
        }
        // Recorded first: a test that sees the fault's effect finds it in the record.
        lock(&shared.fired).push(Fired {
            conn: self.index,
            dir,
            at,
            fault,
        });
        shared.note(format!(
            "conn {}: {fault:?} at byte {at} {}",
            self.index,
            dir.map_or("(from the test)", Dir::name)
        ));
        match fault {
            Fault::Reset => {
                // The RST goes out now (a disconnect); SO_LINGER 0 makes the final close
                // abortive too, should the disconnect not apply.
                for sock in [&self.client, &self.upstream] {
                    set_linger_zero(sock);
                    disconnect(sock);
                }
            }
            Fault::Cut => {
                let _ = self.client.shutdown(Shutdown::Write);
                let _ = self.upstream.shutdown(Shutdown::Write);
            }
            _ => {}
        }
        true
    }
}

/// Aborts a TCP connection at once: `connect` with `AF_UNSPEC` sends an RST to the peer of
/// an established connection (Linux's `tcp_disconnect`), whoever else holds the socket.
fn disconnect(s: &TcpStream) {
    // SAFETY: an all-zero sockaddr is valid; only its family is read.
    let mut addr: libc::sockaddr = unsafe { std::mem::zeroed() };
    addr.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
    // SAFETY: connect on a socket we own, with a pointer to a live sockaddr and its size.
    unsafe {
        libc::connect(
            s.as_raw_fd(),
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        );
    }
}

/// Makes closing `s` abortive: the peer gets an RST, not a FIN.
pub(crate) fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live linger and its size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Sets up a proxied connection and starts its four threads (a reader and a writer per
/// direction), joining those of connections that ended.
pub(crate) fn start_conn(
    index: usize,
    client: TcpStream,
    upstream: TcpStream,
    shared: &Arc<Shared>,
) -> io::Result<()> {
    for s in [&client, &upstream] {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(TICK))?;
        s.set_write_timeout(Some(TICK))?;
    }
    let conn = Arc::new(Conn {
        index,
        client,
        upstream,
        state: AtomicU8::new(OPEN),
        held: [AtomicBool::new(false), AtomicBool::new(false)],
        forwarded: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
    });
    lock(&shared.forwarded).push((index, conn.forwarded.clone()));
    {
        let mut conns = lock(&shared.conns);
        conns.retain(|w| w.strong_count() > 0);
        conns.push(Arc::downgrade(&conn));
    }
    shared.note(format!("conn {index}: open"));
    let mut threads = lock(&shared.threads);
    // Threads of connections that ended are joined here, so the list stays short.
    let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(|t| t.is_finished());
    *threads = running;
    for t in done {
        let _ = t.join();
    }
    for dir in [Dir::Up, Dir::Down] {
        let rules: Vec<Pending> = shared
            .rules
            .iter()
            .filter(|r| r.dir == dir && r.conn.matches(index))
            .map(Pending::of)
            .collect();
        let (tx, rx) = mpsc::sync_channel::<Item>(shared.in_flight);
        let (c, s) = (conn.clone(), shared.clone());
        let d = if dir == Dir::Up { "up" } else { "dn" };
        threads.push(
            std::thread::Builder::new()
                .name(format!("fnet{index}-{d}rd"))
                .spawn(move || read_side(&c, dir, rules, &tx, &s))?,
        );
        let (c, s) = (conn.clone(), shared.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("fnet{index}-{d}wr"))
                .spawn(move || write_side(&c, dir, &rx, &s))?,
        );
    }
    Ok(())
}
