//! Sockets: where a migration goes (`tcp:HOST:PORT` or `unix:PATH`), and the streams and
//! listeners for both kinds behind one type.

use crate::cancel::CancelToken;
use crate::tls::{NetSocket, TlsStream};
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// A migration address, parsed from `tcp:HOST:PORT` or `unix:PATH` ([`FromStr`]) and shown
/// the same way ([`fmt::Display`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp:HOST:PORT`
    Tcp(String),
    /// `unix:PATH`
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            if rest
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("'{s}': expected tcp:HOST:PORT"));
            }
            Ok(Endpoint::Tcp(rest.to_string()))
        } else if let Some(rest) = s.strip_prefix("unix:") {
            if rest.is_empty() {
                return Err(format!("'{s}': expected unix:PATH"));
            }
            Ok(Endpoint::Unix(PathBuf::from(rest)))
        } else {
            Err(format!("'{s}': an address starts with tcp: or unix:"))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connected socket of either kind, or a TLS connection over one (see [`crate::tls`]):
/// plaintext on a Unix socket bridged to the network by the connection's `lm-tls` thread.
#[derive(Debug)]
pub enum Stream {
    /// A plain TCP connection.
    Tcp(TcpStream),
    /// A plain Unix stream socket (the only kind that can pass file descriptors).
    Unix(UnixStream),
    /// TLS over either kind, seen as plaintext.
    Tls(TlsStream),
}

fn not_unix() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "file descriptors can only be handed over a unix: socket",
    )
}

/// Socket buffers big enough for a 512 KiB packet to be in flight while the next is built.
const SOCKET_BUFFER: i32 = 4 << 20;

impl Stream {
    /// Whether the peer has closed its end (or the connection failed), without reading
    /// anything: data waiting to be read is not a close.
    pub fn peer_closed(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd on this stack frame, without waiting.
        if unsafe { libc::poll(&mut pfd, 1, 0) } <= 0 {
            return false;
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLRDHUP) != 0 {
            return true;
        }
        let mut byte = 0u8;
        // SAFETY: peeks at most one byte into a live local, without waiting; nothing is
        // consumed from the socket.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
    }

    /// Sends `data` with file descriptors attached (a `unix:` stream only); returns the
    /// bytes of `data` sent.
    pub fn send_fds(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => crate::fdpass::send_with_fds(s, data, fds),
            _ => Err(not_unix()),
        }
    }

    /// Receives into `buf` with up to `max_fds` file descriptors (a `unix:` stream only).
    pub fn recv_fds(&self, buf: &mut [u8], max_fds: usize) -> io::Result<(usize, Vec<OwnedFd>)> {
        match self {
            Stream::Unix(s) => crate::fdpass::recv_with_fds(s, buf, max_fds),
            _ => Err(not_unix()),
        }
    }

    /// Connects, retrying refused connections until `timeout` (the destination may still be
    /// starting).
    pub fn connect(to: &Endpoint, timeout: Duration) -> io::Result<Stream> {
        Self::connect_cancellable(to, timeout, None)
    }

    /// [`Self::connect`], giving up between attempts once `cancel` is cancelled (an
    /// `Interrupted` error).
    pub fn connect_cancellable(
        to: &Endpoint,
        timeout: Duration,
        cancel: Option<&CancelToken>,
    ) -> io::Result<Stream> {
        let deadline = Instant::now() + timeout;
        loop {
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let attempt = match to {
                Endpoint::Tcp(a) => connect_tcp(a, timeout).map(Stream::Tcp),
                Endpoint::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            };
            match attempt {
                Ok(s) => {
                    s.tune();
                    return Ok(s);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn tune(&self) {
        if let Stream::Tcp(t) = self {
            let _ = t.set_nodelay(true);
        }
        set_buffers(self.as_raw_fd());
    }

    /// Arms dead-peer detection for a connection that no longer handshakes: writes blocked
    /// for `timeout` fail; and on TCP, keepalive probes after a third of it idle and a
    /// `TCP_USER_TIMEOUT` of `timeout`, so a peer host that vanished (power, partition) is
    /// found even on a connection with nothing to send. A peer process that is alive but
    /// stuck is found by the application's pings (`FrameKind::Ping`) and read timeouts.
    pub fn arm_peer_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(timeout))?;
        let tcp = match self {
            Stream::Tcp(s) => Some(s.as_raw_fd()),
            Stream::Unix(_) => None,
            // The engine's end bounds the engine's writes (the pump stops taking bytes when
            // the network does); the network socket gets the keepalive.
            Stream::Tls(t) => t.network().is_tcp().then(|| t.network().as_raw_fd()),
        };
        if let Some(fd) = tcp {
            let secs = |d: Duration| d.as_secs().clamp(1, i32::MAX as u64) as i32;
            let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
            for (level, opt, value) in [
                (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
                (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, secs(timeout / 3)),
                (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, secs(timeout / 9)),
                (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
                (libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, ms),
            ] {
                // SAFETY: setsockopt on a socket we own, with a pointer to a live i32 and
                // its size.
                let r = unsafe {
                    libc::setsockopt(
                        fd,
                        level,
                        opt,
                        (&value as *const i32).cast(),
                        std::mem::size_of::<i32>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }

    /// Another handle on the same connection (`dup`), e.g. for a second thread or to shut
    /// it down from elsewhere.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.try_clone()?),
        })
    }

    /// Shuts down both directions, waking any thread blocked on this socket.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tls(s) => {
                s.shutdown();
                Ok(())
            }
        };
    }

    /// How long a write may block before it fails (`None`: forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tls(s) => s.set_write_timeout(t),
        }
    }

    /// How long a read may block before it fails (`None`: forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tls(s) => s.set_read_timeout(t),
        }
    }

    /// Writes every byte of every slice.
    pub fn write_all_vectored(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        while !bufs.is_empty() {
            match self.write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The plain socket back from under TLS (for a peer that turned out to speak plain livemig).
impl From<NetSocket> for Stream {
    fn from(net: NetSocket) -> Stream {
        match net {
            NetSocket::Tcp(s) => Stream::Tcp(s),
            NetSocket::Unix(s) => Stream::Unix(s),
        }
    }
}

/// The plain socket to run TLS over; a stream that is TLS already is refused.
impl TryFrom<Stream> for NetSocket {
    type Error = io::Error;
    fn try_from(s: Stream) -> io::Result<NetSocket> {
        match s {
            Stream::Tcp(s) => Ok(NetSocket::Tcp(s)),
            Stream::Unix(s) => Ok(NetSocket::Unix(s)),
            Stream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the stream is TLS already",
            )),
        }
    }
}

/// Socket buffers of [`SOCKET_BUFFER`] bytes each way.
pub(crate) fn set_buffers(fd: RawFd) {
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket the caller owns, with a pointer to a live i32 and
        // its size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

fn connect_tcp(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("{addr} resolves to nothing"),
    );
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How often a cancellable accept looks at its cancel token.
pub const CANCEL_POLL: Duration = Duration::from_millis(50);

/// A listening socket of either kind.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// The socket and its path, removed when dropped if the path is still this socket.
    Unix(UnixListener, unix_path::Bound),
}

impl Listener {
    /// Binds `at`. For a Unix socket path, only nothing or a stale socket (one nobody
    /// accepts on: a connection is refused) may be there; the stale socket is replaced. A
    /// path that is not a socket, or a socket in use (this process's own included), is
    /// refused with an error naming the path and what it is, and left as it is.
    pub fn bind(at: &Endpoint) -> io::Result<Listener> {
        match at {
            Endpoint::Tcp(a) => Ok(Listener::Tcp(TcpListener::bind(a.as_str())?)),
            Endpoint::Unix(p) => {
                unix_path::clear_stale(p)?;
                let l = UnixListener::bind(p)?;
                let bound = unix_path::Bound::new(p.clone());
                Ok(Listener::Unix(l, bound))
            }
        }
    }

    /// The address actually bound (with the real port when bound to port 0).
    pub fn local_endpoint(&self) -> io::Result<Endpoint> {
        Ok(match self {
            Listener::Tcp(l) => Endpoint::Tcp(l.local_addr()?.to_string()),
            Listener::Unix(_, p) => Endpoint::Unix(p.path().to_path_buf()),
        })
    }

    /// Waits for a connection until `deadline` (forever when `None`).
    pub fn accept_until(&self, deadline: Option<Instant>) -> io::Result<Stream> {
        self.accept_cancellable(deadline, None)
    }

    /// Waits for a connection until `deadline` or until `cancel` is cancelled (checked every
    /// [`CANCEL_POLL`]); a cancel is an `Interrupted` error.
    pub fn accept_cancellable(
        &self,
        deadline: Option<Instant>,
        cancel: Option<&CancelToken>,
    ) -> io::Result<Stream> {
        loop {
            if cancel.is_some_and(CancelToken::is_cancelled) {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            let slice = cancel.map_or(-1, |_| CANCEL_POLL.as_millis() as i32);
            let wait_ms = match deadline {
                None => slice,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "no connection before the deadline",
                        ));
                    }
                    // Rounded up: a wait under a millisecond must not become a busy poll(0).
                    let left = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                    if slice < 0 {
                        left
                    } else {
                        left.min(slice)
                    }
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one valid pollfd that lives on this stack frame.
            let r = unsafe { libc::poll(&mut pfd, 1, wait_ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r == 0 {
                continue;
            }
            let accepted = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match accepted {
                Ok(s) => {
                    s.tune();
                    return Ok(s);
                }
                // The peer gave up between poll and accept: wait for the next one.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

/// Unix socket paths: what may be replaced when binding, and what may be removed after (the
/// same rules as QMP's sockets).
pub use livemig_sockpath as unix_path;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".into())
        );
        assert_eq!(
            "unix:/tmp/x.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/tmp/x.sock".into())
        );
        assert!("tcp:nohost".parse::<Endpoint>().is_err());
        assert!("tcp:h:notaport".parse::<Endpoint>().is_err());
        assert!("udp:1.2.3.4:5".parse::<Endpoint>().is_err());
    }

    #[test]
    fn a_unix_path_is_replaced_only_when_a_stale_socket_and_removed_only_while_ours() {
        let dir = std::env::temp_dir().join(format!("lm-unix-path-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let at = |name: &str| Endpoint::Unix(dir.join(name));
        // A regular file: refused, named, kept.
        let file = dir.join("file");
        std::fs::write(&file, b"keep").unwrap();
        let e = Listener::bind(&at("file")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            e.to_string().contains("is a regular file, not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        // A live socket (ours, even): refused; a stale one: replaced.
        let live = Listener::bind(&at("s")).unwrap();
        let e = Listener::bind(&at("s")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        drop(UnixListener::bind(dir.join("stale")).unwrap());
        let replaced = Listener::bind(&at("stale")).unwrap();
        drop(replaced);
        assert!(
            !dir.join("stale").exists(),
            "our own socket file is removed"
        );
        // A path replaced behind the listener's back is left alone.
        std::fs::rename(&file, dir.join("s")).unwrap();
        drop(live);
        assert_eq!(std::fs::read(dir.join("s")).unwrap(), b"keep");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
