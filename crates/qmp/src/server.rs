//! The QMP server: a Unix socket, two threads per client, events to every client that has
//! negotiated capabilities.
//!
//! Threads: `lm-qmp-accept` polls the listening socket (so it can be stopped) and starts one
//! `lm-qmp-client` thread per connection, up to [`ServerConfig::max_clients`]. A client
//! thread reads, splits the stream into messages ([`crate::split`]), runs each command
//! through the [`Handler`] and queues the reply; the client's `lm-qmp-write` thread writes
//! what is queued ([`crate::conn`]). [`Events`] queues events for every negotiated client
//! and never waits for one: a client that does not read is disconnected, not waited for.
//! [`Server::shutdown`] (or drop) closes every client (what is queued is written within
//! a bounded time) and joins every thread: nothing outlives the server.
//!
//! Slots: a client that has not sent `qmp_capabilities` within
//! [`ServerConfig::negotiation_timeout`] is told so and closed. When every slot is taken, a
//! new client takes the slot of the client silent the longest if that one has sent nothing
//! for [`ServerConfig::idle_limit`] (it is told why and closed); otherwise the new client is
//! refused with an error saying why. Clients that only listen for events are not closed
//! while slots are free.

use crate::conn::{self, human, Conn};
use crate::message::{self, QmpError, Request};
use crate::split::Limits;
use crate::unix_path;
use serde_json::{json, Value};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the server runs commands with.
pub trait Handler: Send + Sync + 'static {
    /// The commands it knows, besides the protocol's own (`qmp_capabilities`,
    /// `query-commands`, `query-version`).
    fn commands(&self) -> Vec<&'static str>;
    /// Runs one command.
    fn execute(&self, req: &Request) -> Result<Value, QmpError>;
    /// Called after the reply to a successful `req` was queued (`quit` exits only then).
    fn after_reply(&self, _req: &Request) {}
}

/// The server's knobs. The defaults are documented in `docs/qmp.md`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Named in the greeting's `package`.
    pub package: String,
    /// Clients served at once (8); one more is told why and closed, unless an idle client
    /// gives it its slot.
    pub max_clients: usize,
    pub limits: Limits,
    /// A client whose socket takes nothing for this long while something waits for it
    /// does not read: it is disconnected (10 s).
    pub write_timeout: Duration,
    /// Bytes of replies and events waiting for one client at most (1 MiB); a client that
    /// lets more pile up is disconnected.
    pub max_queued_bytes: usize,
    /// Messages waiting for one client at most (1024), as `max_queued_bytes`.
    pub max_queued_messages: usize,
    /// A client must send `qmp_capabilities` within this time of connecting (10 s).
    pub negotiation_timeout: Duration,
    /// When every slot is taken, a client that has sent nothing for this long gives its
    /// slot to a new client (60 s).
    pub idle_limit: Duration,
    /// Where the server says why it closed or refused a client.
    pub log: fn(&str),
}

fn log_to_stderr(msg: &str) {
    eprintln!("livemig: {msg}");
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            package: format!("livemig-{}", env!("CARGO_PKG_VERSION")),
            max_clients: 8,
            limits: Limits::default(),
            write_timeout: Duration::from_secs(10),
            max_queued_bytes: 1 << 20,
            max_queued_messages: 1024,
            negotiation_timeout: Duration::from_secs(10),
            idle_limit: Duration::from_secs(60),
            log: log_to_stderr,
        }
    }
}

type Registry = Arc<Mutex<Vec<(Arc<Conn>, Option<JoinHandle<()>>)>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends events to every client that has negotiated capabilities, without waiting for any.
/// Cheap to clone; made before the server so a handler can hold one.
#[derive(Clone, Default)]
pub struct Events {
    clients: Registry,
}

impl Events {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `name` with `data` for every negotiated client. Never blocks on a client: one
    /// that has let too much pile up is disconnected instead.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let ev = message::event(name, data);
        let conns: Vec<Arc<Conn>> = lock(&self.clients).iter().map(|(c, _)| c.clone()).collect();
        for c in conns {
            if c.negotiated.load(Ordering::Acquire) {
                c.send(&ev);
            }
        }
    }
}

/// A running QMP server.
pub struct Server {
    path: unix_path::Bound,
    stop: Arc<AtomicBool>,
    clients: Registry,
    acceptor: Option<JoinHandle<()>>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on QMP socket {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the QMP thread: {0}")]
    Spawn(#[source] io::Error),
}

/// How often the accept thread looks whether it should stop.
const STOP_POLL_MS: i32 = 50;

/// How long shutdown lets clients take what is queued for them before cutting them off.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

impl Server {
    /// Listens on `path` and serves clients with `handler`, sending events given to
    /// `events`. Only a stale socket at `path` (nobody accepts on it) is replaced: a path
    /// that is not a socket, or a socket in use (by this process too), is refused.
    pub fn start(
        path: &Path,
        handler: Arc<dyn Handler>,
        events: &Events,
        config: ServerConfig,
    ) -> Result<Server, ServerError> {
        let bind_err = |source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        };
        unix_path::clear_stale(path).map_err(bind_err)?;
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let bound = unix_path::Bound::new(path.to_path_buf());
        let stop = Arc::new(AtomicBool::new(false));
        let clients = events.clients.clone();
        let acceptor = {
            let (stop, clients) = (stop.clone(), clients.clone());
            std::thread::Builder::new()
                .name("lm-qmp-accept".into())
                .spawn(move || accept_loop(listener, handler, config, stop, clients))
                .map_err(ServerError::Spawn)?
        };
        Ok(Server {
            path: bound,
            stop,
            clients,
            acceptor: Some(acceptor),
        })
    }

    pub fn path(&self) -> &Path {
        self.path.path()
    }

    /// Stops accepting, closes every client (each gets what was queued for it, within
    /// [`SHUTDOWN_DRAIN`]) and joins every server thread. The socket file goes if it is
    /// still this server's.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let all: Vec<_> = lock(&self.clients).drain(..).collect();
        for (c, _) in &all {
            c.close(None);
        }
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        while Instant::now() < deadline && all.iter().any(|(c, _)| !c.done.load(Ordering::Acquire))
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        for (c, _) in &all {
            c.abort(None);
        }
        for (_, h) in all {
            if let Some(h) = h {
                let _ = h.join();
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn accept_loop(
    listener: UnixListener,
    handler: Arc<dyn Handler>,
    config: ServerConfig,
    stop: Arc<AtomicBool>,
    clients: Registry,
) {
    let mut next_id = 0u64;
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd that lives on this stack frame.
        let r = unsafe { libc::poll(&mut pfd, 1, STOP_POLL_MS) };
        if r <= 0 {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        next_id += 1;
        reap(&clients);
        let _ = stream.set_write_timeout(Some(config.write_timeout));
        if let Err(why) = make_room(&clients, &config) {
            (config.log)(&format!("QMP client {next_id} refused: {}", why.desc));
            let mut s = stream;
            let _ = s.write_all(&message::to_line(&message::reply_err(&why, None)));
            continue;
        }
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        let conn = Arc::new(Conn::new(next_id, stream, &config));
        // Registered before it starts, so shutdown always finds it.
        let mut list = lock(&clients);
        let (h, c, cfg) = (handler.clone(), conn.clone(), config.clone());
        match std::thread::Builder::new()
            .name("lm-qmp-client".into())
            .spawn(move || conn::serve(reader, &c, &*h, &cfg))
        {
            Ok(handle) => list.push((conn, Some(handle))),
            Err(_) => conn.abort(Some("cannot start its thread")),
        }
    }
}

/// Makes a slot for one more client: there is one free, or the client silent the longest
/// has been silent for the idle limit and is closed. Otherwise, why the new client is
/// refused.
fn make_room(clients: &Registry, config: &ServerConfig) -> Result<(), QmpError> {
    let list = lock(clients);
    let open: Vec<&Arc<Conn>> = list.iter().map(|(c, _)| c).filter(|c| c.open()).collect();
    if open.len() < config.max_clients {
        return Ok(());
    }
    let idlest = open.iter().max_by_key(|c| c.idle());
    let limit = human(config.idle_limit);
    match idlest {
        Some(c) if c.idle() >= config.idle_limit => {
            let idle = human(Duration::from_secs(c.idle().as_secs()));
            (config.log)(&format!(
                "QMP client {} closed: it sent nothing for {idle} and a new client needs its slot ({} clients at most)",
                c.id, config.max_clients
            ));
            c.close(Some(&QmpError::generic(format!(
                "closing this QMP connection: it sent nothing for {idle} (the idle limit is {limit}) and a new client needs its slot ({} clients at most)",
                config.max_clients
            ))));
            Ok(())
        }
        _ => Err(QmpError::generic(format!(
            "too many QMP clients: {} are connected already (the most served at once), and none has been idle for {limit}; try again later",
            config.max_clients
        ))),
    }
}

/// Joins the threads of clients that have left.
fn reap(clients: &Registry) {
    let finished: Vec<_> = {
        let mut list = lock(clients);
        let (done, live) = list
            .drain(..)
            .partition(|(c, _)| c.done.load(Ordering::Acquire));
        *list = live;
        done
    };
    for (_, h) in finished {
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

/// Runs one request: the protocol's own commands here, the rest through `handler`.
pub(crate) fn dispatch(
    req: &Request,
    negotiated_flag: &AtomicBool,
    handler: &dyn Handler,
    package: &str,
) -> Result<Value, QmpError> {
    let negotiated = negotiated_flag.load(Ordering::Acquire);
    match req.execute.as_str() {
        "qmp_capabilities" if negotiated => Err(QmpError {
            class: crate::ErrorClass::CommandNotFound,
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        }),
        "qmp_capabilities" => {
            let args = crate::Args::new(&req.arguments, &["enable"])?;
            if let Some(caps) = args.opt_array("enable")? {
                if let Some(c) = caps.first() {
                    return Err(QmpError::generic(format!(
                        "Capability '{}' not available",
                        c.as_str().unwrap_or("?")
                    )));
                }
            }
            negotiated_flag.store(true, Ordering::Release);
            Ok(json!({}))
        }
        _ if !negotiated => Err(QmpError {
            class: crate::ErrorClass::CommandNotFound,
            desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
        }),
        "query-version" => {
            crate::Args::new(&req.arguments, &[])?;
            Ok(message::greeting(package)["QMP"]["version"].clone())
        }
        "query-commands" => {
            crate::Args::new(&req.arguments, &[])?;
            let mut names = vec!["qmp_capabilities", "query-commands", "query-version"];
            names.extend(handler.commands());
            Ok(Value::Array(
                names.into_iter().map(|n| json!({ "name": n })).collect(),
            ))
        }
        other if handler.commands().contains(&other) => handler.execute(req),
        other => Err(QmpError::not_found(other)),
    }
}
