//! The few system calls the handshake and the pump make themselves: poll, and a peek at
//! the peer's next byte.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

pub(super) fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
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

pub(super) fn poll_one(fd: RawFd, events: i16, timeout: Duration) -> io::Result<i16> {
    let mut p = [libc::pollfd {
        fd,
        events,
        revents: 0,
    }];
    poll_fds(&mut p, Some(timeout))?;
    Ok(p[0].revents)
}

/// The peer's next byte, if one is there now, left on the socket.
pub(super) fn peek_byte(fd: RawFd) -> Option<u8> {
    let mut b = 0u8;
    // SAFETY: receives at most one byte into a live u8.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut b as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    (n == 1).then_some(b)
}

pub(super) fn retry(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Interrupted
}

pub(super) fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}
