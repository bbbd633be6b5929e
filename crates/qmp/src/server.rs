//! The QMP server: a Unix socket, one thread per client, events to every client that has
//! negotiated capabilities.
//!
//! Threads: `lm-qmp-accept` polls the listening socket (so it can be stopped) and starts one
//! `lm-qmp-client` thread per connection, up to [`ServerConfig::max_clients`]. A client
//! thread reads, splits the stream into messages ([`crate::split`]), runs each command
//! through the [`Handler`] and writes the reply. [`Events`] writes events to every
//! negotiated client; a client's writer is behind a mutex, so a reply and an event never
//! interleave. [`Server::shutdown`] (or drop) shuts every client socket down and joins every
//! thread: nothing outlives the server.

use crate::message::{self, parse_request, QmpError, Request};
use crate::split::{Limits, Splitter};
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server runs commands with.
pub trait Handler: Send + Sync + 'static {
    /// The commands it knows, besides the protocol's own (`qmp_capabilities`,
    /// `query-commands`, `query-version`).
    fn commands(&self) -> Vec<&'static str>;
    /// Runs one command.
    fn execute(&self, req: &Request) -> Result<Value, QmpError>;
    /// Called after the reply to a successful `req` was written (`quit` exits only then).
    fn after_reply(&self, _req: &Request) {}
}

/// The server's knobs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Named in the greeting's `package`.
    pub package: String,
    /// Clients served at once; one more is told so and closed.
    pub max_clients: usize,
    pub limits: Limits,
    /// A client that does not read its replies or events for this long is dropped.
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            package: format!("livemig-{}", env!("CARGO_PKG_VERSION")),
            max_clients: 8,
            limits: Limits::default(),
            write_timeout: Duration::from_secs(5),
        }
    }
}

/// One connected client.
struct Conn {
    writer: Mutex<UnixStream>,
    negotiated: AtomicBool,
    done: AtomicBool,
}

impl Conn {
    fn writer(&self) -> MutexGuard<'_, UnixStream> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one message; a client that cannot take it is shut down.
    fn send(&self, v: &Value) -> io::Result<()> {
        let mut w = self.writer();
        let r = w.write_all(&message::to_line(v));
        if r.is_err() {
            let _ = w.shutdown(Shutdown::Both);
        }
        r
    }
}

type Registry = Arc<Mutex<Vec<(Arc<Conn>, Option<JoinHandle<()>>)>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends events to every client that has negotiated capabilities. Cheap to clone; made
/// before the server so a handler can hold one.
#[derive(Clone, Default)]
pub struct Events {
    clients: Registry,
}

impl Events {
    pub fn new() -> Self {
        Self::default()
    }

    /// Emits `name` with `data` to every negotiated client.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let ev = message::event(name, data);
        let conns: Vec<Arc<Conn>> = lock(&self.clients).iter().map(|(c, _)| c.clone()).collect();
        for c in conns {
            if c.negotiated.load(Ordering::Acquire) && !c.done.load(Ordering::Acquire) {
                let _ = c.send(&ev);
            }
        }
    }
}

/// A running QMP server.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    clients: Registry,
    acceptor: Option<JoinHandle<()>>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on QMP socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the QMP thread: {0}")]
    Spawn(#[source] io::Error),
}

/// How often the accept thread looks whether it should stop.
const STOP_POLL_MS: i32 = 50;

impl Server {
    /// Listens on `path` (a stale socket there is replaced) and serves clients with
    /// `handler`, sending events given to `events`.
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
        if path.exists() {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
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
            path: path.to_path_buf(),
            stop,
            clients,
            acceptor: Some(acceptor),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, disconnects every client and joins every server thread.
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
            let _ = c.writer().shutdown(Shutdown::Both);
        }
        for (_, h) in all {
            if let Some(h) = h {
                let _ = h.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
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
        reap(&clients);
        let _ = stream.set_write_timeout(Some(config.write_timeout));
        if lock(&clients).len() >= config.max_clients {
            let mut s = stream;
            let e = QmpError::generic(format!(
                "too many QMP clients: {} are connected already",
                config.max_clients
            ));
            let _ = s.write_all(&message::to_line(&message::reply_err(&e, None)));
            continue;
        }
        let Ok(writer) = stream.try_clone() else {
            continue;
        };
        let conn = Arc::new(Conn {
            writer: Mutex::new(writer),
            negotiated: AtomicBool::new(false),
            done: AtomicBool::new(false),
        });
        // Registered before it starts, so shutdown always finds it.
        let mut list = lock(&clients);
        let (h, c, cfg) = (handler.clone(), conn.clone(), config.clone());
        match std::thread::Builder::new()
            .name("lm-qmp-client".into())
            .spawn(move || serve(stream, &c, &*h, &cfg))
        {
            Ok(handle) => list.push((conn, Some(handle))),
            Err(_) => {
                let _ = conn.writer().shutdown(Shutdown::Both);
            }
        }
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

fn serve(mut stream: UnixStream, conn: &Conn, handler: &dyn Handler, config: &ServerConfig) {
    let package = config.package.as_str();
    if conn.send(&message::greeting(package)).is_ok() {
        let mut splitter = Splitter::new(config.limits);
        let mut buf = vec![0u8; 16 << 10];
        let mut pieces = Vec::new();
        'read: loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            splitter.push(&buf[..n], &mut pieces);
            for piece in pieces.drain(..) {
                let (reply, ran) = match piece {
                    Err(e) => (
                        message::reply_err(&QmpError::generic(e.to_string()), None),
                        None,
                    ),
                    Ok(bytes) => match parse_request(&bytes) {
                        Err(bad) => (message::reply_err(&bad.error, bad.id.as_ref()), None),
                        Ok(req) => {
                            let r = dispatch(&req, conn, handler, package);
                            let ok = r.is_ok();
                            let reply = match r {
                                Ok(v) => message::reply_ok(v, req.id.as_ref()),
                                Err(e) => message::reply_err(&e, req.id.as_ref()),
                            };
                            (reply, ok.then_some(req))
                        }
                    },
                };
                if conn.send(&reply).is_err() {
                    break 'read;
                }
                if let Some(req) = ran {
                    handler.after_reply(&req);
                }
            }
        }
    }
    conn.done.store(true, Ordering::Release);
}

fn dispatch(
    req: &Request,
    conn: &Conn,
    handler: &dyn Handler,
    package: &str,
) -> Result<Value, QmpError> {
    let negotiated = conn.negotiated.load(Ordering::Acquire);
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
            conn.negotiated.store(true, Ordering::Release);
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
