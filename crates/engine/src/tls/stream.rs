//! [`TlsStream`]: the engine's end of a TLS connection, plaintext on a Unix socket, and
//! what its clones share with the connection's `lm-tls` thread.

use super::error::Peer;
use super::net::NetSocket;
use super::pump::Pump;
use rustls::Connection;
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the pump found wrong, kept for the engine's next read or write.
#[derive(Default)]
pub(super) struct Shared {
    error: Mutex<Option<(io::ErrorKind, String)>>,
}

impl Shared {
    pub(super) fn set(&self, e: &io::Error) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        g.get_or_insert((e.kind(), e.to_string()));
    }

    pub(super) fn get(&self) -> Option<io::Error> {
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
    net: NetSocket,
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
    /// Starts the `lm-tls` thread of a connection whose handshake is done: `conn` over the
    /// network socket `net`, bridged to `pair` (a fresh `UnixStream::pair()`, its buffers
    /// sized by the caller), whose first end the engine gets.
    pub(super) fn start(
        net: NetSocket,
        conn: Connection,
        peer: Peer,
        pair: (UnixStream, UnixStream),
    ) -> io::Result<TlsStream> {
        let (engine_end, pump_end) = pair;
        pump_end.set_nonblocking(true)?;
        net.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let pump = Pump::new(conn, net.try_clone()?, pump_end, shared.clone(), peer);
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

    /// Another handle on the same connection (the engine's end `dup`ed, the pump shared).
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

    /// The read timeout of the engine's end (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.plain.set_read_timeout(t)
    }

    /// The write timeout of the engine's end (`None`: block forever). Since the pump stops
    /// taking bytes when the network does, it bounds writes to a peer that stopped reading.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.plain.set_write_timeout(t)
    }

    /// The network socket under the TLS (for its TCP options).
    pub fn network(&self) -> &NetSocket {
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
