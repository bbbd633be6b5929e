//! The `lm-tls` thread of one connection (the *pump*): rustls between the network socket
//! and the engine's plaintext end of a Unix socket pair, reading from one side only when
//! what it read before has gone out on the other.

use super::error::{describe, Peer};
use super::net::NetSocket;
use super::stream::Shared;
use super::sys::{poll_fds, retry, would_block};
use rustls::Connection;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes the pump reads from either side at once.
const PUMP_BUFFER: usize = 128 << 10;
/// How long a pump whose engine end has closed waits for a peer that does not read the last
/// bytes (and `close_notify`), with nothing moving, before it gives up.
const LINGER: Duration = Duration::from_secs(2);

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
pub(super) struct Pump {
    conn: Connection,
    /// Non-blocking.
    net: NetSocket,
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

impl Pump {
    pub(super) fn new(
        conn: Connection,
        net: NetSocket,
        plain: UnixStream,
        shared: Arc<Shared>,
        peer: Peer,
    ) -> Pump {
        Pump {
            conn,
            net,
            plain,
            net_in: Buf::new(PUMP_BUFFER),
            plain_in: Buf::new(PUMP_BUFFER),
            to_plain: Buf::new(PUMP_BUFFER),
            shared,
            peer,
            net_eof: false,
            tls_closed: false,
            inbound_done: false,
            engine_closed: false,
            close_sent: false,
            hup_at: None,
        }
    }

    pub(super) fn run(mut self) {
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
