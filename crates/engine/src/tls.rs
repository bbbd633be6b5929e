//! TLS 1.3 with mutual authentication on every channel (rustls with the `ring` provider).
//!
//! Every connection, main and data, is wrapped right after the socket is connected or
//! accepted: the TLS handshake runs there, bounded by the connect or handshake timeout, and
//! both sides must present a certificate signed by the CA in the CA file. The source checks
//! the destination's certificate against the host it connects to (`tcp:HOST:PORT`) or the
//! name given with [`TlsConfig::with_server_name`] (required for `unix:` addresses).
//!
//! The engine shares each socket between threads (the source's return path reads the main
//! channel while the coordinator writes it), keeps clones to `shutdown()` it and wake blocked
//! threads, reads pages into guest memory with `readv` on the raw descriptor, and finds dead
//! peers with socket timeouts. None of that can go through a rustls connection object, and
//! this kernel has no kTLS to hand one to. So once the handshake is done, one thread per
//! connection (`lm-tls`, the *pump*) owns the rustls connection and the network socket and
//! bridges them to one end of a `UnixStream::pair()`; the engine gets the other end as
//! [`Stream::Tls`], plaintext, and everything it does to a socket works on it unchanged.
//!
//! The pump never buffers without bound: it reads from one side only when what it read
//! before has gone out on the other (at most 128 KiB each way, plus rustls' own records), so
//! a peer that stops reading stops the engine's writes as a plain socket would, and the
//! engine's send timeout fires. Ends travel both ways: the engine closing its end sends
//! `close_notify` after everything it wrote; the peer's `close_notify` (or its socket's end)
//! becomes an end of stream for the engine after everything it sent. A TLS failure (a bad
//! record, an alert such as the destination refusing this side's certificate) is kept, and
//! the engine's next read or write on the stream returns it instead of a bare end of stream.
//! The last clone of the stream to go shuts the pair down and joins the pump, so no `lm-tls`
//! thread outlives its stream.

use crate::cancel::CancelToken;
use crate::error::{ChannelError, ChannelName};
use crate::framed;
use crate::transport::{Endpoint, Stream, CANCEL_POLL};
use livemig_wire::{Limits, Reject, RejectCode};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore,
    ServerConfig, ServerConnection,
};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes the pump reads from either side at once.
const PUMP_BUFFER: usize = 128 << 10;
/// How long a pump whose engine end has closed waits for a peer that does not read the last
/// bytes (and `close_notify`), with nothing moving, before it gives up.
const LINGER: Duration = Duration::from_secs(2);
/// How long a refused connection is drained before it is closed, so that the peer reads the
/// alert rather than a reset.
const REFUSED_LINGER: Duration = Duration::from_millis(200);

/// Which TLS file a problem is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Certificate,
    Key,
    Ca,
}

impl fmt::Display for TlsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFile::Certificate => "certificate",
            TlsFile::Key => "private key",
            TlsFile::Ca => "CA certificate",
        })
    }
}

/// What went wrong with TLS: a file that cannot be used, or a connection refused at the TLS
/// layer (by either side).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} file {}: {source}", path.display())]
    Read {
        what: TlsFile,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the TLS {what} file {} is not valid PEM: {detail}", path.display())]
    Pem {
        what: TlsFile,
        path: PathBuf,
        detail: String,
    },
    #[error("the TLS {what} file {} holds no {what} (expected {expected})", path.display())]
    Empty {
        what: TlsFile,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("the TLS CA file {} cannot be used: {detail}", path.display())]
    Ca { path: PathBuf, detail: String },
    #[error("the TLS key {} cannot be used with the certificate {}: {detail}", key.display(), cert.display())]
    Key {
        cert: PathBuf,
        key: PathBuf,
        detail: String,
    },
    #[error("'{name}' is not a valid TLS server name: {detail}")]
    ServerName { name: String, detail: String },
    #[error("TLS to {to}: a unix: address has no host name to check the destination's certificate against; give the name in its certificate (--tls-server-name)")]
    NoServerName { to: String },
    /// The handshake failed: the text says why and whose fault it looks like.
    #[error("TLS: {0}")]
    Handshake(String),
    /// The peer speaks plain livemig, not TLS.
    #[error("TLS: {0}")]
    NotTls(String),
    #[error("TLS handshake cancelled")]
    Cancelled,
    #[error("TLS: cannot start the connection's lm-tls thread: {0}")]
    Spawn(#[source] io::Error),
}

/// Certificates and keys for TLS on every channel, both roles: the source presents its
/// certificate as a client and checks the destination's; the destination presents the same
/// kind of certificate as a server and refuses a client without one signed by the CA.
#[derive(Clone)]
pub struct TlsConfig {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: Option<ServerName<'static>>,
    files: String,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.files)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// TLS 1.3 only; AES-128-GCM first (the fastest with AES instructions), then the others.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

fn read_file(what: TlsFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load_certs(what: TlsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "a PEM block -----BEGIN CERTIFICATE-----",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(TlsFile::Key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: TlsFile::Key,
            path: path.to_path_buf(),
            expected: "a PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC)",
        },
        e => TlsError::Pem {
            what: TlsFile::Key,
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
    })
}

impl TlsConfig {
    /// Loads this side's certificate (PEM, the chain's leaf first), its private key (PEM:
    /// PKCS#8, PKCS#1 or SEC1) and the CA certificate(s) (PEM) every peer's certificate
    /// must be signed by. The certificate should allow both TLS client and server use (a
    /// host can be source and destination) and name the host peers reach it by.
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
        ca: impl AsRef<Path>,
    ) -> Result<TlsConfig, TlsError> {
        let (cert, key, ca) = (cert.as_ref(), key.as_ref(), ca.as_ref());
        let chain = load_certs(TlsFile::Certificate, cert)?;
        let private = load_key(key)?;
        let mut roots = RootCertStore::empty();
        for c in load_certs(TlsFile::Ca, ca)? {
            roots.add(c).map_err(|e| TlsError::Ca {
                path: ca.to_path_buf(),
                detail: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let provider = provider();
        let key_err = |e: rustls::Error| TlsError::Key {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            detail: match e {
                rustls::Error::InconsistentKeys(_) => {
                    "the key is not the certificate's (their public keys differ)".into()
                }
                e => e.to_string(),
            },
        };
        let tls13 = |e: rustls::Error| TlsError::Handshake(format!("TLS 1.3 unavailable: {e}"));
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Ca {
                path: ca.to_path_buf(),
                detail: e.to_string(),
            })?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls13)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(key_err)?;
        server.send_tls13_tickets = 0;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.ignore_client_order = true;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls13)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(key_err)?;
        client.resumption = Resumption::disabled();
        Ok(TlsConfig {
            client: Arc::new(client),
            server: Arc::new(server),
            server_name: None,
            files: format!(
                "cert {}, key {}, CA {}",
                cert.display(),
                key.display(),
                ca.display()
            ),
        })
    }

    /// Checks the destination's certificate against `name` instead of the host of the
    /// address connected to (required for `unix:` addresses).
    pub fn with_server_name(mut self, name: &str) -> Result<TlsConfig, TlsError> {
        let n = ServerName::try_from(name.to_string()).map_err(|e| TlsError::ServerName {
            name: name.to_string(),
            detail: e.to_string(),
        })?;
        self.server_name = Some(n);
        Ok(self)
    }

    /// TEST ONLY: the source side presents no certificate (to show the destination refuses
    /// it).
    pub fn without_client_certificate(mut self) -> TlsConfig {
        let mut client = (*self.client).clone();
        let roots_only = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3 is in the ring provider")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        client.client_auth_cert_resolver = roots_only.client_auth_cert_resolver;
        self.client = Arc::new(client);
        self
    }

    /// The name the destination's certificate is checked against for `to`.
    pub fn server_name(&self, to: &Endpoint) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        match to {
            Endpoint::Tcp(a) => {
                let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                ServerName::try_from(host.to_string()).map_err(|e| TlsError::ServerName {
                    name: host.to_string(),
                    detail: e.to_string(),
                })
            }
            Endpoint::Unix(_) => Err(TlsError::NoServerName { to: to.to_string() }),
        }
    }

    /// The source's side: runs the TLS handshake on `net`, just connected to `to`, within
    /// `timeout` (or until `cancel`), and returns the plaintext stream.
    pub fn connect(
        &self,
        mut net: Stream,
        to: &Endpoint,
        timeout: Duration,
        cancel: Option<&CancelToken>,
    ) -> Result<Stream, TlsError> {
        let name = self.server_name(to)?;
        let deadline = Instant::now() + timeout;
        net.set_nonblocking(true)
            .map_err(|e| TlsError::Handshake(format!("socket: {e}")))?;
        let conn = ClientConnection::new(self.client.clone(), name)
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let mut conn = Connection::Client(conn);
        handshake(
            &mut conn,
            &mut net,
            deadline,
            timeout,
            cancel,
            Peer::Destination,
        )?;
        TlsStream::start(net, conn, Peer::Destination)
            .map(Stream::Tls)
            .map_err(TlsError::Spawn)
    }

    /// The destination's side: runs the TLS handshake on `net`, just accepted, within
    /// `timeout` (or until `cancel`), and returns the plaintext stream. A peer that fails
    /// (no certificate, one from another CA, not TLS at all) is refused: it gets an alert,
    /// or a plain livemig `Reject` if it spoke plain livemig, and the error says why.
    pub fn accept(
        &self,
        mut net: Stream,
        timeout: Duration,
        cancel: Option<&CancelToken>,
    ) -> Result<Stream, TlsError> {
        let deadline = Instant::now() + timeout;
        net.set_nonblocking(true)
            .map_err(|e| TlsError::Handshake(format!("socket: {e}")))?;
        if first_byte(&net, deadline, timeout, cancel)? == b'L' {
            return Err(refuse_plain(net, deadline));
        }
        let conn = ServerConnection::new(self.server.clone())
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let mut conn = Connection::Server(conn);
        match handshake(&mut conn, &mut net, deadline, timeout, cancel, Peer::Source) {
            Ok(()) => TlsStream::start(net, conn, Peer::Source)
                .map(Stream::Tls)
                .map_err(TlsError::Spawn),
            Err(e) => {
                linger_close(&mut net);
                Err(e)
            }
        }
    }
}

/// Who is at the other end, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    Source,
    Destination,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Source => "source",
            Peer::Destination => "destination",
        })
    }
}

/// A rustls error as a person should read it.
fn describe(e: &rustls::Error, peer: Peer) -> String {
    use rustls::Error as E;
    match e {
        E::AlertReceived(AlertDescription::CertificateRequired) => format!(
            "the {peer} requires a certificate and this side presented none (alert: certificate required)"
        ),
        E::AlertReceived(
            a @ (AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked
            | AlertDescription::AccessDenied),
        ) => format!("the {peer} refused this side's certificate (alert: {a:?})"),
        E::AlertReceived(a) => format!("the {peer} sent a fatal alert: {a:?}"),
        E::NoCertificatesPresented => format!("the {peer} presented no certificate"),
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "the {peer}'s certificate is not signed by the CA in this side's CA file (unknown issuer)"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the {peer}'s certificate is not valid for the name it was reached by ({e}); name the right one with --tls-server-name")
            }
            c => format!("the {peer}'s certificate is not valid: {c:?}"),
        },
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => {
            format!("the {peer} does not speak TLS 1.3 ({e})")
        }
        E::PeerIncompatible(p) => format!("the {peer} cannot do TLS 1.3 as configured here ({p:?})"),
        e => format!("with the {peer}: {e}"),
    }
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    let ms = timeout.map_or(-1, |t| {
        // Round up, so a short wait does not become a busy loop of zero-timeout polls.
        (t.as_micros().div_ceil(1000)).min(i32::MAX as u128) as i32
    });
    // SAFETY: polls the pollfds of a live slice, with its length.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn poll_one(fd: RawFd, events: i16, timeout: Duration) -> io::Result<i16> {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    poll_fds(&mut p, Some(timeout))?;
    Ok(p[0].revents)
}

/// Waits (within the deadline, or until cancel) for the peer's first byte and peeks at it.
fn first_byte(
    net: &Stream,
    deadline: Instant,
    timeout: Duration,
    cancel: Option<&CancelToken>,
) -> Result<u8, TlsError> {
    loop {
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(TlsError::Cancelled);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Handshake(format!(
                "the source said nothing within {timeout:?}"
            )));
        }
        poll_one(net.as_raw_fd(), libc::POLLIN, left.min(CANCEL_POLL))
            .map_err(|e| TlsError::Handshake(format!("socket: {e}")))?;
        let mut b = 0u8;
        // SAFETY: receives at most one byte into a live u8.
        let n = unsafe {
            libc::recv(
                net.as_raw_fd(),
                (&mut b as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            1 => return Ok(b),
            0 => {
                return Err(TlsError::Handshake(
                    "the source closed the connection before saying anything".into(),
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    return Err(TlsError::Handshake(format!("socket: {e}")));
                }
            }
        }
    }
}

fn blocking_until(net: &Stream, deadline: Instant) -> io::Result<()> {
    net.set_nonblocking(false)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    net.set_read_timeout(Some(left))?;
    net.set_write_timeout(Some(left))
}

/// A plain livemig source at a TLS destination: reads its first frame (so closing does not
/// reset the connection under the answer) and answers in plain livemig that TLS is needed.
fn refuse_plain(mut net: Stream, deadline: Instant) -> TlsError {
    if blocking_until(&net, deadline).is_ok() {
        let mut buf = Vec::new();
        let _ = framed::recv(
            &mut net,
            ChannelName::Incoming,
            &Limits::default(),
            &mut buf,
        );
        framed::send_reject(
            &mut net,
            ChannelName::Incoming,
            &Reject::new(
                RejectCode::Unsupported,
                "this destination requires TLS (TLS 1.3 with client certificates): give the source --tls-cert, --tls-key and --tls-ca",
            ),
        );
    }
    TlsError::NotTls(
        "a source spoke plain livemig (no TLS); told it this destination requires TLS".into(),
    )
}

/// A TLS source at a plain destination: it answered our hello with a livemig frame (its
/// Reject of what it took for a bad frame); read it for the message.
fn plain_answer(mut net: Stream, deadline: Instant) -> TlsError {
    let what = match blocking_until(&net, deadline) {
        Err(e) => e.to_string(),
        Ok(()) => {
            let mut buf = Vec::new();
            match framed::recv(&mut net, ChannelName::Main, &Limits::default(), &mut buf) {
                Err(ChannelError::Rejected { reject, .. }) => {
                    format!("it refused: {}", reject.reason)
                }
                Ok(h) => format!("it sent a {} frame", h.kind.name()),
                Err(e) => e.to_string(),
            }
        }
    };
    TlsError::NotTls(format!(
        "the destination does not speak TLS: it answered in plain livemig ({what}); start it with --tls-cert, --tls-key and --tls-ca"
    ))
}

/// Shuts our side and drains the peer's for a moment, so the peer reads our alert before
/// the connection closes rather than a reset.
fn linger_close(net: &mut Stream) {
    net.shutdown_write();
    let deadline = Instant::now() + REFUSED_LINGER;
    let mut scratch = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || poll_one(net.as_raw_fd(), libc::POLLIN, left).is_err() {
            return;
        }
        match net.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if would_block(&e) || retry(&e) => {}
            Err(_) => return,
        }
    }
}

/// Runs the handshake on a non-blocking socket until it is done, fails, the deadline
/// passes or `cancel` is cancelled.
fn handshake(
    conn: &mut Connection,
    net: &mut Stream,
    deadline: Instant,
    timeout: Duration,
    cancel: Option<&CancelToken>,
    peer: Peer,
) -> Result<(), TlsError> {
    let mut heard = false;
    let hint = match peer {
        Peer::Destination => " (does it listen with TLS?)",
        Peer::Source => "",
    };
    loop {
        while conn.wants_write() {
            match conn.write_tls(net) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(TlsError::Handshake(format!(
                        "sending to the {peer} during the handshake failed: {e}{hint}"
                    )))
                }
            }
        }
        if !conn.is_handshaking() && !conn.wants_write() {
            return Ok(());
        }
        if cancel.is_some_and(CancelToken::is_cancelled) {
            return Err(TlsError::Cancelled);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Handshake(format!(
                "the {peer} did not complete the handshake within {timeout:?}{hint}"
            )));
        }
        let events = libc::POLLIN | if conn.wants_write() { libc::POLLOUT } else { 0 };
        let revents = poll_one(net.as_raw_fd(), events, left.min(CANCEL_POLL))
            .map_err(|e| TlsError::Handshake(format!("socket: {e}")))?;
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) == 0 {
            continue;
        }
        if !heard && peer == Peer::Destination && peek_byte(net) == Some(b'L') {
            return Err(plain_answer(
                net.try_clone()
                    .map_err(|e| TlsError::Handshake(format!("socket: {e}")))?,
                deadline,
            ));
        }
        match conn.read_tls(net) {
            Ok(0) => {
                return Err(TlsError::Handshake(format!(
                    "the {peer} closed the connection during the handshake{}",
                    if heard { "" } else { hint }
                )))
            }
            Ok(_) => heard = true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                return Err(TlsError::Handshake(format!(
                    "receiving from the {peer} during the handshake failed: {e}{}",
                    if heard { "" } else { hint }
                )))
            }
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert describing the failure, best effort.
            let _ = conn.write_tls(net);
            return Err(TlsError::Handshake(describe(&e, peer)));
        }
    }
}

fn peek_byte(net: &Stream) -> Option<u8> {
    let mut b = 0u8;
    // SAFETY: receives at most one byte into a live u8.
    let n = unsafe {
        libc::recv(
            net.as_raw_fd(),
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    (n == 1).then_some(b)
}

/// What the pump found wrong, kept for the engine's next read or write.
#[derive(Default)]
struct Shared {
    error: Mutex<Option<(io::ErrorKind, String)>>,
}

impl Shared {
    fn set(&self, e: &io::Error) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert((e.kind(), e.to_string()));
    }

    fn get(&self) -> Option<io::Error> {
        let g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|(k, m)| io::Error::new(*k, m.clone()))
    }
}

/// What all clones of one TLS stream share; the last to go shuts the pair and joins the
/// pump.
struct Link {
    /// The engine's end of the pair, kept to shut it down.
    engine_end: UnixStream,
    /// The network socket, kept for its keepalive options.
    net: Stream,
    shared: Arc<Shared>,
    pump: Option<JoinHandle<()>>,
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = self.engine_end.shutdown(Shutdown::Both);
        if let Some(h) = self.pump.take() {
            let _ = h.join();
        }
    }
}

/// The engine's end of a TLS connection: a Unix socket carrying plaintext, bridged to the
/// network by the connection's `lm-tls` thread.
pub struct TlsStream {
    plain: UnixStream,
    link: Arc<Link>,
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsStream")
            .field("plain", &self.plain)
            .field("net", &self.link.net)
            .finish()
    }
}

fn broken(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

impl TlsStream {
    fn start(net: Stream, conn: Connection, peer: Peer) -> io::Result<TlsStream> {
        let (engine_end, pump_end) = UnixStream::pair()?;
        for s in [&engine_end, &pump_end] {
            crate::transport::set_buffers(s.as_raw_fd());
        }
        pump_end.set_nonblocking(true)?;
        net.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let pump = Pump {
            conn,
            net: net.try_clone()?,
            plain: pump_end,
            net_in: Buf::new(PUMP_BUFFER),
            plain_in: Buf::new(PUMP_BUFFER),
            to_plain: Buf::new(PUMP_BUFFER),
            shared: shared.clone(),
            peer,
            net_eof: false,
            tls_closed: false,
            inbound_done: false,
            engine_closed: false,
            close_sent: false,
            hup_at: None,
        };
        let handle = std::thread::Builder::new()
            .name("lm-tls".into())
            .spawn(move || pump.run())?;
        Ok(TlsStream {
            plain: engine_end.try_clone()?,
            link: Arc::new(Link {
                engine_end,
                net,
                shared,
                pump: Some(handle),
            }),
        })
    }

    pub fn try_clone(&self) -> io::Result<TlsStream> {
        Ok(TlsStream {
            plain: self.plain.try_clone()?,
            link: self.link.clone(),
        })
    }

    /// Shuts the engine's end: the pump sends what is left, then `close_notify`.
    pub fn shutdown(&self) {
        let _ = self.plain.shutdown(Shutdown::Both);
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.plain.set_read_timeout(t)
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.plain.set_write_timeout(t)
    }

    /// The network socket under the TLS (for its TCP options).
    pub fn network(&self) -> &Stream {
        &self.link.net
    }

    /// The error the pump met, if any, instead of `e` (a bare end or broken pipe).
    fn cause(&self, e: io::Error) -> io::Error {
        if broken(&e) {
            self.link.shared.get().unwrap_or(e)
        } else {
            e
        }
    }
}

impl AsRawFd for TlsStream {
    fn as_raw_fd(&self) -> RawFd {
        self.plain.as_raw_fd()
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.plain.read(buf) {
            Ok(0) if !buf.is_empty() => match self.link.shared.get() {
                Some(e) => Err(e),
                None => Ok(0),
            },
            Err(e) => Err(self.cause(e)),
            r => r,
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.plain.write(buf).map_err(|e| self.cause(e))
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.plain.write_vectored(bufs).map_err(|e| self.cause(e))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A byte buffer filled at the end and drained at the front.
struct Buf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Buf {
    fn new(cap: usize) -> Buf {
        Buf {
            data: vec![0; cap].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
    fn filled(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }
    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.clear();
        }
    }
    fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }
    /// Room at the end, after moving what is left to the front.
    fn space(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }
}

/// The `lm-tls` thread of one connection: rustls between the network socket and the
/// engine's plaintext end.
struct Pump {
    conn: Connection,
    /// Non-blocking.
    net: Stream,
    /// The pump's end of the pair, non-blocking.
    plain: UnixStream,
    /// Ciphertext read from the network, not yet given to rustls.
    net_in: Buf,
    /// Plaintext read from the engine, not yet given to rustls.
    plain_in: Buf,
    /// Plaintext from rustls, not yet written to the engine.
    to_plain: Buf,
    shared: Arc<Shared>,
    peer: Peer,
    /// The network socket reached its end (rustls was told).
    net_eof: bool,
    /// The peer's stream ended (close_notify or end of socket): nothing more will come.
    tls_closed: bool,
    /// The engine has had everything (and its end of stream), or cannot take more.
    inbound_done: bool,
    /// The engine closed its end: it sends nothing more.
    engine_closed: bool,
    close_sent: bool,
    /// When the engine's end was seen shut: the linger runs from here.
    hup_at: Option<Instant>,
}

fn retry(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Pump {
    fn run(mut self) {
        match self.pump() {
            Ok(()) => self.net.shutdown_write(),
            Err(e) => {
                self.shared.set(&e);
                let _ = self.plain.shutdown(Shutdown::Both);
                self.net.shutdown();
            }
        }
    }

    fn tls_error(&mut self, e: rustls::Error) -> io::Error {
        // The alert describing the failure, best effort.
        let _ = self.conn.write_tls(&mut self.net);
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("TLS: {}", describe(&e, self.peer)),
        )
    }

    fn process(&mut self) -> io::Result<()> {
        match self.conn.process_new_packets() {
            Ok(_) => Ok(()),
            Err(e) => Err(self.tls_error(e)),
        }
    }

    fn pump(&mut self) -> io::Result<()> {
        self.conn.set_buffer_limit(Some(PUMP_BUFFER));
        self.process()?;
        loop {
            let mut moved = false;
            while self.inbound()? | self.outbound()? {
                moved = true;
            }
            if self.engine_closed && self.close_sent && !self.conn.wants_write() {
                return Ok(());
            }
            if moved && self.hup_at.is_some() {
                // Still flushing to a peer that reads: the linger counts from the last move.
                self.hup_at = Some(Instant::now());
            }
            let linger = self.hup_at.map(|t| LINGER.saturating_sub(t.elapsed()));
            if linger == Some(Duration::ZERO) {
                // A peer that has not read for the whole linger cannot hold the stream's
                // end for longer.
                return Ok(());
            }
            let mut net_ev = 0;
            if !self.inbound_done
                && !self.tls_closed
                && !self.net_eof
                && self.to_plain.is_empty()
                && self.net_in.is_empty()
            {
                net_ev |= libc::POLLIN;
            }
            if self.conn.wants_write() {
                net_ev |= libc::POLLOUT;
            }
            let mut plain_ev = 0;
            if !self.inbound_done && !self.to_plain.is_empty() {
                plain_ev |= libc::POLLOUT;
            }
            if !self.engine_closed && self.plain_in.is_empty() && !self.conn.wants_write() {
                plain_ev |= libc::POLLIN;
            }
            if self.hup_at.is_none() {
                plain_ev |= libc::POLLRDHUP;
            }
            let fd = |ev: i16, fd: RawFd| if ev == 0 { -1 } else { fd };
            let mut fds = [
                libc::pollfd {
                    fd: fd(net_ev, self.net.as_raw_fd()),
                    events: net_ev,
                    revents: 0,
                },
                libc::pollfd {
                    fd: fd(plain_ev, self.plain.as_raw_fd()),
                    events: plain_ev,
                    revents: 0,
                },
            ];
            poll_fds(&mut fds, linger)?;
            if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP) != 0 && self.hup_at.is_none() {
                self.hup_at = Some(Instant::now());
            }
            if fds[0].revents & libc::POLLERR != 0 {
                if let Ok(Some(e)) = self.net.take_error() {
                    return Err(e);
                }
            }
        }
    }

    /// Network to engine. True if anything moved.
    fn inbound(&mut self) -> io::Result<bool> {
        if self.inbound_done {
            return Ok(false);
        }
        let mut moved = false;
        loop {
            let need_net = self.gather()?;
            // Out to the engine: nothing more is read while it cannot take what we have.
            while !self.to_plain.is_empty() {
                match self.plain.write(self.to_plain.filled()) {
                    Ok(n) => {
                        self.to_plain.consume(n);
                        moved = true;
                    }
                    Err(e) if would_block(&e) => return Ok(moved),
                    Err(e) if retry(&e) => {}
                    Err(_) => {
                        // The engine's end is shut: nothing more can be delivered.
                        self.inbound_done = true;
                        self.to_plain.clear();
                        return Ok(true);
                    }
                }
            }
            if self.tls_closed {
                let _ = self.plain.shutdown(Shutdown::Write);
                self.inbound_done = true;
                return Ok(true);
            }
            if !need_net {
                continue;
            }
            match self.net.read(self.net_in.space()) {
                Ok(0) => {
                    self.net_eof = true;
                    self.conn.read_tls(&mut io::empty())?;
                    self.process()?;
                    moved = true;
                }
                Ok(n) => {
                    self.net_in.end += n;
                    moved = true;
                }
                Err(e) if would_block(&e) => return Ok(moved),
                Err(e) if retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Fills `to_plain` with what rustls decrypts, feeding it what was read from the
    /// network. True when rustls needs more from the network.
    fn gather(&mut self) -> io::Result<bool> {
        loop {
            let space = self.to_plain.space();
            if space.is_empty() {
                return Ok(false);
            }
            match self.conn.reader().read(space) {
                Ok(0) => {
                    // close_notify, after everything the peer sent.
                    self.tls_closed = true;
                    return Ok(false);
                }
                Ok(n) => self.to_plain.end += n,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    // The peer's socket ended without close_notify (its process died, say):
                    // an end of stream for the engine, as on a plain socket.
                    self.tls_closed = true;
                    return Ok(false);
                }
                Err(e) if would_block(&e) => {
                    if self.net_in.is_empty() {
                        return Ok(!self.net_eof);
                    }
                    let mut rd = self.net_in.filled();
                    let n = self.conn.read_tls(&mut rd)?;
                    self.net_in.consume(n);
                    self.process()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Engine to network. True if anything moved.
    fn outbound(&mut self) -> io::Result<bool> {
        let mut moved = false;
        loop {
            while self.conn.wants_write() {
                match self.conn.write_tls(&mut self.net) {
                    Ok(_) => moved = true,
                    Err(e) if would_block(&e) => return Ok(moved),
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            if !self.plain_in.is_empty() {
                let n = self.conn.writer().write(self.plain_in.filled())?;
                if n == 0 {
                    return Ok(moved);
                }
                self.plain_in.consume(n);
                moved = true;
                continue;
            }
            if self.engine_closed {
                if !self.close_sent {
                    self.conn.send_close_notify();
                    self.close_sent = true;
                    moved = true;
                    continue;
                }
                return Ok(moved);
            }
            let got = {
                let space = self.plain_in.space();
                self.plain.read(space)
            };
            match got {
                Ok(0) => {
                    self.engine_closed = true;
                    self.hup_at.get_or_insert_with(Instant::now);
                    moved = true;
                }
                Ok(n) => {
                    self.plain_in.end += n;
                    moved = true;
                }
                Err(e) if would_block(&e) => return Ok(moved),
                Err(e) if retry(&e) => {}
                Err(_) => {
                    self.engine_closed = true;
                    self.hup_at.get_or_insert_with(Instant::now);
                    moved = true;
                }
            }
        }
    }
}
