//! The TLS handshake on a socket just connected or accepted, bounded by a deadline and a
//! cancel token, and what it says to a peer that is not TLS at all.
//!
//! A peer that speaks plain livemig where TLS was expected is recognised by its first
//! byte and answered in livemig frames, which this layer does not know: the [`PlainPeer`]
//! passed in does that (`framed` supplies it), on the socket made blocking again.

use super::config::TlsConfig;
use super::error::{describe, Peer, TlsError};
use super::net::NetSocket;
use super::stream::TlsStream;
use super::sys::{peek_byte, poll_one, retry, would_block};
use crate::cancel::CancelToken;
use crate::transport::{set_buffers, Endpoint, Stream, CANCEL_POLL};
use rustls::{ClientConnection, Connection, ServerConnection};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long a refused connection is drained before it is closed, so that the peer reads the
/// alert rather than a reset.
const REFUSED_LINGER: Duration = Duration::from_millis(200);

/// What to do with a peer that speaks plain (unencrypted) livemig instead of TLS: the
/// exchange of frames the TLS layer leaves to the framing layer above it.
pub(crate) trait PlainPeer {
    /// Whether `first`, the first byte the peer sent, starts a plain frame (TLS records
    /// start otherwise).
    fn is_plain(&self, first: u8) -> bool;
    /// The destination's side: reads the plain source's first frame (so that closing does
    /// not reset the connection under the answer) and answers that TLS is required.
    fn refuse(&self, net: &mut Stream);
    /// The source's side: reads the plain destination's answer to our TLS hello and says
    /// what it was.
    fn answer(&self, net: &mut Stream) -> String;
}

fn socket_error(e: io::Error) -> TlsError {
    TlsError::Handshake(format!("socket: {e}"))
}

/// The plain socket under `s`, non-blocking, for the handshake.
fn nonblocking_net(s: Stream) -> Result<NetSocket, TlsError> {
    let net = NetSocket::try_from(s).map_err(socket_error)?;
    net.set_nonblocking(true).map_err(socket_error)?;
    Ok(net)
}

/// Starts the `lm-tls` thread of a connection whose handshake is done.
fn start(net: NetSocket, conn: Connection, peer: Peer) -> Result<Stream, TlsError> {
    let start = || {
        let pair = UnixStream::pair()?;
        for s in [&pair.0, &pair.1] {
            set_buffers(s.as_raw_fd());
        }
        TlsStream::start(net, conn, peer, pair)
    };
    start().map(Stream::Tls).map_err(TlsError::Spawn)
}

impl TlsConfig {
    /// The source's side of the handshake on `net`, just connected to `to`, within
    /// `timeout` (or until `cancel`): the plaintext stream. A destination that answers in
    /// plain livemig is read by `plain`. (Callers use `TlsConfig::connect`, in `framed`.)
    pub(crate) fn connect_with(
        &self,
        net: Stream,
        to: &Endpoint,
        timeout: Duration,
        cancel: Option<&CancelToken>,
        plain: &dyn PlainPeer,
    ) -> Result<Stream, TlsError> {
        let name = self.server_name(to)?;
        let deadline = Instant::now() + timeout;
        let mut net = nonblocking_net(net)?;
        let conn = ClientConnection::new(self.client.clone(), name)
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let mut conn = Connection::Client(conn);
        let bounds = Bounds {
            deadline,
            timeout,
            cancel,
        };
        handshake(&mut conn, &mut net, &bounds, Peer::Destination, plain)?;
        start(net, conn, Peer::Destination)
    }

    /// The destination's side of the handshake on `net`, just accepted, within `timeout`
    /// (or until `cancel`): the plaintext stream. A peer that fails (no certificate, one from
    /// another CA, not TLS at all) is refused: it gets an alert, or `plain`'s answer if it
    /// spoke plain livemig, and the error says why. (Callers use `TlsConfig::accept`.)
    pub(crate) fn accept_with(
        &self,
        net: Stream,
        timeout: Duration,
        cancel: Option<&CancelToken>,
        plain: &dyn PlainPeer,
    ) -> Result<Stream, TlsError> {
        let deadline = Instant::now() + timeout;
        let mut net = nonblocking_net(net)?;
        let bounds = Bounds {
            deadline,
            timeout,
            cancel,
        };
        if plain.is_plain(first_byte(&net, &bounds)?) {
            return Err(refuse_plain(net, deadline, plain));
        }
        let conn = ServerConnection::new(self.server.clone())
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        let mut conn = Connection::Server(conn);
        match handshake(&mut conn, &mut net, &bounds, Peer::Source, plain) {
            Ok(()) => start(net, conn, Peer::Source),
            Err(e) => {
                linger_close(&mut net);
                Err(e)
            }
        }
    }
}

/// How long a handshake may take: until `deadline` (`timeout` after it began, for
/// messages), or until `cancel` is cancelled.
struct Bounds<'a> {
    deadline: Instant,
    timeout: Duration,
    cancel: Option<&'a CancelToken>,
}

/// Waits (within the deadline, or until cancel) for the peer's first byte and peeks at it.
fn first_byte(net: &NetSocket, bounds: &Bounds<'_>) -> Result<u8, TlsError> {
    let Bounds {
        deadline,
        timeout,
        cancel,
    } = *bounds;
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

fn blocking_until(net: &NetSocket, deadline: Instant) -> io::Result<()> {
    net.set_nonblocking(false)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    net.set_read_timeout(Some(left))?;
    net.set_write_timeout(Some(left))
}

/// A plain livemig source at a TLS destination: `plain` reads its first frame and answers
/// in plain livemig that TLS is needed.
fn refuse_plain(net: NetSocket, deadline: Instant, plain: &dyn PlainPeer) -> TlsError {
    if blocking_until(&net, deadline).is_ok() {
        plain.refuse(&mut Stream::from(net));
    }
    TlsError::NotTls(
        "a source spoke plain livemig (no TLS); told it this destination requires TLS".into(),
    )
}

/// A TLS source at a plain destination: it answered our hello with a livemig frame (its
/// Reject of what it took for a bad frame); `plain` reads it for the message.
fn plain_answer(net: NetSocket, deadline: Instant, plain: &dyn PlainPeer) -> TlsError {
    let what = match blocking_until(&net, deadline) {
        Err(e) => e.to_string(),
        Ok(()) => plain.answer(&mut Stream::from(net)),
    };
    TlsError::NotTls(format!(
        "the destination does not speak TLS: it answered in plain livemig ({what}); start it with --tls-cert, --tls-key and --tls-ca"
    ))
}

/// Shuts our side and drains the peer's for a moment, so the peer reads our alert before
/// the connection closes rather than a reset.
fn linger_close(net: &mut NetSocket) {
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

/// Sends what rustls has for the peer until the socket would block.
fn send_handshake(
    conn: &mut Connection,
    net: &mut NetSocket,
    peer: Peer,
    hint: &str,
) -> Result<(), TlsError> {
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
    Ok(())
}

/// Runs the handshake on a non-blocking socket until it is done, fails, the deadline
/// passes or `cancel` is cancelled.
fn handshake(
    conn: &mut Connection,
    net: &mut NetSocket,
    bounds: &Bounds<'_>,
    peer: Peer,
    plain: &dyn PlainPeer,
) -> Result<(), TlsError> {
    let Bounds {
        deadline,
        timeout,
        cancel,
    } = *bounds;
    let mut heard = false;
    let hint = match peer {
        Peer::Destination => " (does it listen with TLS?)",
        Peer::Source => "",
    };
    loop {
        send_handshake(conn, net, peer, hint)?;
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
        if !heard
            && peer == Peer::Destination
            && peek_byte(net.as_raw_fd()).is_some_and(|b| plain.is_plain(b))
        {
            let net = net.try_clone().map_err(socket_error)?;
            return Err(plain_answer(net, deadline, plain));
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
