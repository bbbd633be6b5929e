//! Handing file descriptors over a Unix stream socket (`SCM_RIGHTS`), for local mode: the
//! source gives the destination the memfds that back guest memory instead of copying pages.
//!
//! The descriptors ride on the first byte of the data sent with them. The receiver asks for
//! at most a bounded number; a peer sending more (or a message whose control data was cut)
//! is an error, and every descriptor that did arrive is closed, never leaked.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one message may carry (one per guest memory range).
pub const MAX_FDS: usize = livemig_wire::MAX_REGIONS;

fn cmsg_space(fds: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    unsafe { libc::CMSG_SPACE((fds * size_of::<RawFd>()) as u32) as usize }
}

/// Sends `data` with `fds` attached; returns the bytes of `data` sent (the caller writes the
/// rest as usual: the descriptors are already across).
pub fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    if fds.is_empty() || fds.len() > MAX_FDS || data.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("between 1 and {MAX_FDS} descriptors, with at least one byte of data"),
        ));
    }
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; cmsg_space(fds.len()).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message; the pointers set below stay valid
    // for the sendmsg call (iov, control and the descriptors outlive it).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(fds.len()) as _;
    // SAFETY: msg_control points at a buffer of CMSG_SPACE(n) bytes, enough for one header
    // and n descriptors, so the first header and its data lie inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * size_of::<RawFd>()) as u32) as _;
        let out = libc::CMSG_DATA(c).cast::<RawFd>();
        for (i, fd) in fds.iter().enumerate() {
            out.add(i).write_unaligned(fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: msg is fully initialised above and describes live buffers.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives into `buf` (at most its length) with up to `max_fds` descriptors attached.
/// Returns the bytes read and the descriptors that came with them (none if they carried
/// none). More descriptors than `max_fds`, or any other control message, is an error.
pub fn recv_with_fds(
    sock: &UnixStream,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut control = vec![0u64; cmsg_space(max_fds.max(1)).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in send_with_fds; the buffers outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(max_fds.max(1)) as _;
    let n = loop {
        // SAFETY: msg describes live, writable buffers of the stated sizes; MSG_CMSG_CLOEXEC
        // marks every received descriptor close-on-exec.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Take ownership of every descriptor that arrived first, so any error below closes them.
    let mut fds = Vec::new();
    let mut foreign = false;
    // SAFETY: the kernel filled msg_control with msg_controllen bytes of well-formed control
    // messages; CMSG_FIRSTHDR/NXTHDR walk only within them, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / sizeof(int) descriptors now owned by this process.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            } else {
                foreign = true;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "file descriptors were cut off: the peer sent more than {max_fds}, or this \
                 process is at its limit of open files"
            ),
        ));
    }
    if fds.len() > max_fds {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the peer sent more than {max_fds} file descriptors"),
        ));
    }
    if foreign {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the peer sent a control message other than file descriptors",
        ));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    fn temp_file(content: &[u8]) -> std::fs::File {
        let mut f = tempfile_in_memory();
        f.write_all(content).unwrap();
        f.rewind().unwrap();
        f
    }

    fn tempfile_in_memory() -> std::fs::File {
        // SAFETY: memfd_create with a valid C string; the returned descriptor is owned here.
        let fd = unsafe { libc::memfd_create(c"fdpass-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor nothing else owns.
        unsafe { std::fs::File::from_raw_fd(fd) }
    }

    #[test]
    fn descriptors_cross_with_their_data() {
        let (a, b) = UnixStream::pair().unwrap();
        let (f1, f2) = (temp_file(b"one"), temp_file(b"two"));
        let n = send_with_fds(&a, b"hello", &[f1.as_fd(), f2.as_fd()]).unwrap();
        assert_eq!(n, 5);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&b, &mut buf, 4).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        let mut s = String::new();
        std::fs::File::from(fds.into_iter().nth(1).unwrap())
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "two");
    }

    #[test]
    fn too_many_descriptors_is_an_error_and_none_leak() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<_> = (0..3).map(|_| temp_file(b"x")).collect();
        let borrowed: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        send_with_fds(&a, b"x", &borrowed).unwrap();
        let mut buf = [0u8; 1];
        let e = recv_with_fds(&b, &mut buf, 1).unwrap_err();
        assert!(e.to_string().contains("more than 1"), "{e}");
    }

    #[test]
    fn plain_data_brings_no_descriptors() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"abc").unwrap();
        let mut buf = [0u8; 3];
        let (n, fds) = recv_with_fds(&b, &mut buf, 4).unwrap();
        assert_eq!((n, fds.len()), (3, 0));
    }
}
