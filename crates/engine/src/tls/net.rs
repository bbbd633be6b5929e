//! [`NetSocket`]: the plain socket a TLS connection runs over.
//!
//! A type of its own rather than a `transport::Stream`, so that what lies under TLS is a
//! socket and never another TLS stream, and so that the TLS stream, which `Stream::Tls`
//! holds, does not in turn hold a `Stream`.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// The network socket under a TLS connection: TCP or Unix.
#[derive(Debug)]
pub enum NetSocket {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
}

impl NetSocket {
    /// Another handle on the same socket (`dup`).
    pub fn try_clone(&self) -> io::Result<NetSocket> {
        Ok(match self {
            NetSocket::Tcp(s) => NetSocket::Tcp(s.try_clone()?),
            NetSocket::Unix(s) => NetSocket::Unix(s.try_clone()?),
        })
    }

    /// Whether it is a TCP socket (keepalive and `TCP_USER_TIMEOUT` apply).
    pub fn is_tcp(&self) -> bool {
        matches!(self, NetSocket::Tcp(_))
    }

    /// Shuts down both directions, waking any thread blocked on this socket.
    pub(crate) fn shutdown(&self) {
        let _ = self.shutdown_how(Shutdown::Both);
    }

    /// Shuts down the sending direction (the peer reads an end of stream).
    pub(crate) fn shutdown_write(&self) {
        let _ = self.shutdown_how(Shutdown::Write);
    }

    fn shutdown_how(&self, how: Shutdown) -> io::Result<()> {
        match self {
            NetSocket::Tcp(s) => s.shutdown(how),
            NetSocket::Unix(s) => s.shutdown(how),
        }
    }

    pub(crate) fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            NetSocket::Tcp(s) => s.set_nonblocking(on),
            NetSocket::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// The socket's pending error (SO_ERROR), if any.
    pub(crate) fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            NetSocket::Tcp(s) => s.take_error(),
            NetSocket::Unix(s) => s.take_error(),
        }
    }

    pub(crate) fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            NetSocket::Tcp(s) => s.set_read_timeout(t),
            NetSocket::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub(crate) fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            NetSocket::Tcp(s) => s.set_write_timeout(t),
            NetSocket::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl AsRawFd for NetSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            NetSocket::Tcp(s) => s.as_raw_fd(),
            NetSocket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for NetSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NetSocket::Tcp(s) => s.read(buf),
            NetSocket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for NetSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NetSocket::Tcp(s) => s.write(buf),
            NetSocket::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            NetSocket::Tcp(s) => s.write_vectored(bufs),
            NetSocket::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
