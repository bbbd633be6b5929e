//! The proxy: its builder, the accepting thread, and what a test asks of a running proxy.

use crate::conn::{set_linger_zero, start_conn, Conn};
use crate::rules::{Dir, Fault, Fired, Rule};
use crate::{lock, TICK};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// Adds a fault to inject; of two that stop a direction at the same byte, the one added
    /// first fires.
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

/// What the proxy's threads share: its rules and settings, its connections, and what it
/// counted and did.
pub(crate) struct Shared {
    pub(crate) stop: AtomicBool,
    pub(crate) accepted: AtomicUsize,
    pub(crate) conns: Mutex<Vec<Weak<Conn>>>,
    /// Bytes forwarded per connection and direction, kept after the connection ends.
    pub(crate) forwarded: Mutex<Vec<(usize, Arc<[AtomicU64; 2]>)>>,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) fired: Mutex<Vec<Fired>>,
    pub(crate) log: Mutex<Vec<String>>,
    pub(crate) latency: Duration,
    pub(crate) rules: Vec<Rule>,
    pub(crate) target: SocketAddr,
    pub(crate) in_flight: usize,
}

impl Shared {
    /// The proxy is being dropped: every thread ends.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(SeqCst)
    }
    /// Adds a line to the proxy's log.
    pub(crate) fn note(&self, line: String) {
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

/// Accepts connections until the proxy stops, connecting each to the target and starting
/// its threads; a client whose target cannot be reached is reset.
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
