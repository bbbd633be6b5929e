//! A fault-injecting TCP proxy for livemig's tests.
//!
//! A [`Proxy`] listens on a port and forwards each connection it accepts to a target, as a
//! pair of pipes (client to target, "up"; target to client, "down"). The test chooses, per
//! connection (the Nth accepted, or every one) and per direction, what goes wrong and when:
//!
//! - **latency**: every chunk read is stamped and released `latency` later, so throughput
//!   is kept (chunks are in flight together, as on a long link) instead of one sleep per
//!   chunk in series;
//! - **reset** after K bytes (or after a byte pattern): the K bytes are delivered, then both
//!   peers get a real RST (`SO_LINGER` 0);
//! - **cut** after K bytes: a clean FIN to both peers in the middle of whatever was being
//!   sent (a truncated frame);
//! - **flip** the byte at offset K (XOR with a mask): corruption on the wire;
//! - **hang** after K bytes: nothing more is forwarded either way and nothing is closed, like
//!   a peer that stopped without closing its sockets.
//!
//! Faults can also be fired while a connection runs ([`Proxy::fault`]). The proxy counts
//! connections and bytes, and records every fault it fired ([`Proxy::fired`]), so a test can
//! check that its fault really happened. Every thread it starts is named `fnet-*` and is
//! joined when the proxy is dropped.
//!
//! With [`ProxyBuilder::netns`] the proxy listens and connects from inside a network
//! namespace (its accepting thread enters it; sockets stay in the namespace they were made
//! in), so it can sit between two namespaces joined by a veth pair.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked threads look at the proxy's and the connection's state.
const TICK: Duration = Duration::from_millis(20);
/// Bytes read at once.
const CHUNK: usize = 64 << 10;

/// A direction of a proxied connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dir {
    /// From the client that connected to the proxy to the target.
    Up,
    /// From the target back to the client.
    Down,
}

impl Dir {
    fn idx(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
    fn other(self) -> Dir {
        match self {
            Dir::Up => Dir::Down,
            Dir::Down => Dir::Up,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dir::Up => "up",
            Dir::Down => "down",
        }
    }
}

/// Which connections a rule applies to, by accept order (0 is the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Nth(usize),
    Every,
}

impl Which {
    fn matches(self, conn: usize) -> bool {
        match self {
            Which::Nth(n) => n == conn,
            Which::Every => true,
        }
    }
}

/// When a rule fires, counted in the bytes of its direction on its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// After exactly this many bytes have gone through (for [`Fault::Flip`]: at the byte
    /// with this offset).
    AfterBytes(u64),
    /// Right after the first occurrence of this byte string (for [`Fault::Flip`]: at the
    /// byte that follows it).
    AfterPattern(Vec<u8>),
}

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Both peers get an RST (the bytes before the trigger are delivered first).
    Reset,
    /// Both peers get a FIN: the stream ends wherever the trigger falls.
    Cut,
    /// The byte at the trigger is XORed with this mask; everything else passes.
    Flip(u8),
    /// Nothing more is forwarded, either way, and nothing is closed.
    Hang,
}

/// One fault to inject.
#[derive(Debug, Clone)]
pub struct Rule {
    pub conn: Which,
    pub dir: Dir,
    pub trigger: Trigger,
    pub fault: Fault,
}

impl Rule {
    pub fn new(conn: Which, dir: Dir, trigger: Trigger, fault: Fault) -> Rule {
        Rule {
            conn,
            dir,
            trigger,
            fault,
        }
    }
    /// RST both peers after `bytes` bytes in `dir`.
    pub fn reset_after(conn: Which, dir: Dir, bytes: u64) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(bytes), Fault::Reset)
    }
    /// FIN both peers after `bytes` bytes in `dir`.
    pub fn cut_after(conn: Which, dir: Dir, bytes: u64) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(bytes), Fault::Cut)
    }
    /// XOR the byte at `offset` in `dir` with `mask`.
    pub fn flip_at(conn: Which, dir: Dir, offset: u64, mask: u8) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(offset), Fault::Flip(mask))
    }
    /// Stop forwarding after `bytes` bytes in `dir`.
    pub fn hang_after(conn: Which, dir: Dir, bytes: u64) -> Rule {
        Rule::new(conn, dir, Trigger::AfterBytes(bytes), Fault::Hang)
    }
    /// `fault` right after `pattern` has gone through in `dir`.
    pub fn after_pattern(conn: Which, dir: Dir, pattern: &[u8], fault: Fault) -> Rule {
        Rule::new(conn, dir, Trigger::AfterPattern(pattern.to_vec()), fault)
    }
}

/// A fault the proxy fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired {
    /// The connection, by accept order.
    pub conn: usize,
    /// The direction whose rule fired; `None` for a fault fired by [`Proxy::fault`] or one
    /// that mirrors a peer's reset.
    pub dir: Option<Dir>,
    /// The offset in that direction (for `None`: bytes forwarded up so far).
    pub at: u64,
    pub fault: Fault,
}

/// How a proxy is set up.
#[derive(Debug, Clone)]
pub struct ProxyBuilder {
    target: SocketAddr,
    listen: SocketAddr,
    latency: Duration,
    rules: Vec<Rule>,
    netns: Option<PathBuf>,
    in_flight_chunks: usize,
}

impl ProxyBuilder {
    /// Where to listen (default 127.0.0.1, a free port).
    pub fn listen(mut self, at: SocketAddr) -> Self {
        self.listen = at;
        self
    }
    /// One-way delay added to every chunk, both directions (a round trip gets twice it).
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }
    pub fn rule(mut self, r: Rule) -> Self {
        self.rules.push(r);
        self
    }
    /// Listen and connect from inside this network namespace (e.g. `/run/netns/NAME`).
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }
    /// Chunks (of at most 64 KiB) held per direction while they wait out the latency: the
    /// bound on the proxy's memory per connection (default 512, 32 MiB).
    pub fn in_flight_chunks(mut self, n: usize) -> Self {
        self.in_flight_chunks = n.max(1);
        self
    }

    /// Binds and starts accepting.
    pub fn start(self) -> io::Result<Proxy> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            accepted: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            forwarded: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            fired: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            latency: self.latency,
            rules: self.rules,
            target: self.target,
            in_flight: self.in_flight_chunks,
        });
        let (tx, rx) = mpsc::channel::<io::Result<SocketAddr>>();
        let sh = shared.clone();
        let (listen, netns) = (self.listen, self.netns);
        let acceptor = std::thread::Builder::new()
            .name("fnet-accept".into())
            .spawn(move || {
                let listener = netns
                    .as_ref()
                    .map_or(Ok(()), enter_netns)
                    .and_then(|()| TcpListener::bind(listen))
                    .and_then(|l| l.set_nonblocking(true).map(|()| l));
                match listener {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr());
                        accept_loop(&l, &sh);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
        let addr = match rx.recv() {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                let _ = acceptor.join();
                return Err(e);
            }
            Err(_) => {
                let _ = acceptor.join();
                return Err(io::Error::other("the proxy's accepting thread died"));
            }
        };
        Ok(Proxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }
}

/// A running proxy. Dropping it closes every connection and joins every thread.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `target`, to be set up and started.
    pub fn builder(target: SocketAddr) -> ProxyBuilder {
        ProxyBuilder {
            target,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            latency: Duration::ZERO,
            rules: Vec::new(),
            netns: None,
            in_flight_chunks: 512,
        }
    }

    /// A plain proxy to `target` with `rules`, on 127.0.0.1.
    pub fn start(target: SocketAddr, rules: Vec<Rule>) -> io::Result<Proxy> {
        rules
            .into_iter()
            .fold(Proxy::builder(target), ProxyBuilder::rule)
            .start()
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.accepted.load(SeqCst)
    }

    /// Waits until at least `n` connections have been accepted; false on timeout.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.connections() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Bytes forwarded so far on connection `conn` in `dir` (0 if there is no such
    /// connection or it is gone).
    pub fn bytes(&self, conn: usize, dir: Dir) -> u64 {
        lock(&self.shared.forwarded)
            .iter()
            .find(|(i, _)| *i == conn)
            .map_or(0, |(_, f)| f[dir.idx()].load(SeqCst))
    }

    /// Fires `fault` on connection `conn` now (a [`Fault::Flip`] is ignored). False if the
    /// connection does not exist or is already closed or faulted.
    pub fn fault(&self, conn: usize, fault: Fault) -> bool {
        if matches!(fault, Fault::Flip(_)) {
            return false;
        }
        match self.conn(conn) {
            Some(c) => {
                let at = c.forwarded[Dir::Up.idx()].load(SeqCst);
                c.apply(fault, None, at, &self.shared)
            }
            None => false,
        }
    }

    /// Every fault fired so far, in order.
    pub fn fired(&self) -> Vec<Fired> {
        lock(&self.shared.fired).clone()
    }

    /// What the proxy did, one line per thing (connections, faults, peers closing).
    pub fn log(&self) -> Vec<String> {
        lock(&self.shared.log).clone()
    }

    fn conn(&self, index: usize) -> Option<Arc<Conn>> {
        lock(&self.shared.conns)
            .iter()
            .filter_map(Weak::upgrade)
            .find(|c| c.index == index)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // The acceptor has ended: no thread is added any more.
        let threads = std::mem::take(&mut *lock(&self.shared.threads));
        for t in threads {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    stop: AtomicBool,
    accepted: AtomicUsize,
    conns: Mutex<Vec<Weak<Conn>>>,
    /// Bytes forwarded per connection and direction, kept after the connection ends.
    forwarded: Mutex<Vec<(usize, Arc<[AtomicU64; 2]>)>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    fired: Mutex<Vec<Fired>>,
    log: Mutex<Vec<String>>,
    latency: Duration,
    rules: Vec<Rule>,
    target: SocketAddr,
    in_flight: usize,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }
    fn note(&self, line: String) {
        lock(&self.log).push(line);
    }
}

/// Enters the network namespace at `path` (this thread only).
fn enter_netns(path: &PathBuf) -> io::Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: setns on a file descriptor we own; it changes only this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !shared.stopped() {
        // SAFETY: poll on one pollfd that lives on this stack frame.
        unsafe { libc::poll(&mut pfd, 1, TICK.as_millis() as libc::c_int) };
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                shared.note(format!("accept failed: {e}"));
                std::thread::sleep(TICK);
                continue;
            }
        };
        let index = shared.accepted.fetch_add(1, SeqCst);
        match TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) {
            Ok(upstream) => {
                if let Err(e) = start_conn(index, client, upstream, shared) {
                    shared.note(format!("conn {index}: cannot start: {e}"));
                }
            }
            Err(e) => {
                shared.note(format!(
                    "conn {index}: connecting to {} failed: {e}; client reset",
                    shared.target
                ));
                set_linger_zero(&client);
            }
        }
    }
}

const OPEN: u8 = 0;
const HUNG: u8 = 1;
const CUT: u8 = 2;
const RESET: u8 = 3;

/// One proxied connection: its two sockets, shared by its four threads.
struct Conn {
    index: usize,
    client: TcpStream,
    upstream: TcpStream,
    state: AtomicU8,
    /// Per direction: held back because a rule fired in the other direction and its fault
    /// is on its way (so nothing the fault should stop slips through before it applies).
    held: [AtomicBool; 2],
    forwarded: Arc<[AtomicU64; 2]>,
}

impl Conn {
    /// (reads from, writes to) for a direction.
    fn ends(&self, dir: Dir) -> (&TcpStream, &TcpStream) {
        match dir {
            Dir::Up => (&self.client, &self.upstream),
            Dir::Down => (&self.upstream, &self.client),
        }
    }

    fn state(&self) -> u8 {
        self.state.load(SeqCst)
    }

    /// Whether `dir` may deliver now (not hung, not held).
    fn halted(&self, dir: Dir) -> bool {
        self.state() == HUNG || self.held[dir.idx()].load(SeqCst)
    }

    /// Applies a connection-wide fault; false if the connection is already cut or reset
    /// (or hung, for a hang).
    fn apply(&self, fault: Fault, dir: Option<Dir>, at: u64, shared: &Shared) -> bool {
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

fn set_linger_zero(s: &TcpStream) {
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

fn start_conn(
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
            .map(|r| Pending {
                trigger: r.trigger.clone(),
                fault: r.fault,
                tail: Vec::new(),
            })
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

/// A rule of one connection and direction that has not fired yet.
struct Pending {
    trigger: Trigger,
    fault: Fault,
    /// For a pattern: the stream's last bytes, to find a pattern split across reads.
    tail: Vec<u8>,
}

enum What {
    Data(Vec<u8>),
    /// The peer closed its side: half-close the other.
    Eof,
    /// The peer reset or failed: reset the other.
    Broken(io::ErrorKind),
    /// A rule fired here: apply the fault once the bytes before it are out.
    Fault(Fault, u64),
}

struct Item {
    due: Instant,
    what: What,
}

/// Reads one direction, applies its rules, and queues what to deliver, stamped with the
/// time it may go out.
fn read_side(
    conn: &Conn,
    dir: Dir,
    mut rules: Vec<Pending>,
    tx: &SyncSender<Item>,
    shared: &Shared,
) {
    let (from, _) = conn.ends(dir);
    let mut from = from;
    let mut pos = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let send = |what: What| {
        tx.send(Item {
            due: Instant::now() + shared.latency,
            what,
        })
        .is_ok()
    };
    // A rule that fires at byte 0 fires before anything is read.
    if let Some(i) = rules
        .iter()
        .position(|r| r.trigger == Trigger::AfterBytes(0) && !matches!(r.fault, Fault::Flip(_)))
    {
        let r = rules.remove(i);
        conn.held[dir.other().idx()].store(true, SeqCst);
        send(What::Fault(r.fault, 0));
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
        let n = match from.read(&mut buf) {
            Ok(0) => {
                send(What::Eof);
                return;
            }
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
            Err(e) => {
                if conn.state() == OPEN {
                    send(What::Broken(e.kind()));
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
fn drain(mut from: &TcpStream, shared: &Shared) {
    let mut buf = vec![0u8; CHUNK];
    while !shared.stopped() {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
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
    // Patterns become offsets once seen.
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
fn write_side(conn: &Conn, dir: Dir, rx: &Receiver<Item>, shared: &Shared) {
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
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Names of this process's threads that start with `prefix` (from /proc/self/task).
pub fn threads_named(prefix: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .map(|c| c.trim_end().to_string())
        .filter(|c| c.starts_with(prefix))
        .collect()
}

#[cfg(test)]
mod tests;
