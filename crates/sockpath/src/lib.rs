//! Unix socket paths, the same rules wherever livemig listens (`unix:` migration listeners
//! in the engine, QMP sockets): what may be replaced when binding (nothing, or a stale socket:
//! one nobody accepts on; never a file that is not a socket, nor a socket in use), and what
//! may be removed after (the path, only while it is still the socket this process bound,
//! compared by device and inode).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What a path that is not a socket is, for an error.
fn what(t: std::fs::FileType) -> &'static str {
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "a file of another kind"
    }
}

/// Makes `path` free to bind: nothing there, or a stale socket, which is removed. A path
/// that is not a socket (a symbolic link included: it is not followed) is refused
/// (`AlreadyExists`), and so is a socket something accepts connections on
/// (`AddrInUse`), whoever serves it, this process included. Checked, then removed: a
/// process that binds the path in between is replaced (the window is a few syscalls).
pub fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is {}, not a socket: refusing to remove it",
                path.display(),
                what(meta.file_type())
            ),
        ));
    }
    match probe(path) {
        Ok(Probe::Stale) => match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io::Error::new(
                e.kind(),
                format!("cannot remove the stale socket {}: {e}", path.display()),
            )),
            _ => Ok(()),
        },
        Ok(Probe::Live) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is a socket in use (something accepts connections on it): refusing to replace it",
                path.display()
            ),
        )),
        Ok(Probe::OtherType) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is a socket of another type (not a stream socket), maybe in use: refusing to replace it",
                path.display()
            ),
        )),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("cannot tell whether the socket {} is in use: {e}", path.display()),
        )),
    }
}

enum Probe {
    Stale,
    Live,
    OtherType,
}

/// Connects to `path` without blocking: refused is stale; connected, or a full backlog
/// (`EAGAIN`), is live.
fn probe(path: &Path) -> io::Result<Probe> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid value of this plain C struct.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long for a Unix socket",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that lives on this frame, `len` within it.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r == 0 {
        return Ok(Probe::Live);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Ok(Probe::Stale),
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(Probe::Live),
        Some(libc::EPROTOTYPE) => Ok(Probe::OtherType),
        _ => Err(e),
    }
}

/// A socket path this process bound, removed on drop only if the path is still that
/// socket (same device and inode): a path replaced since (by another process's socket or
/// by any file) is left alone.
#[derive(Debug)]
pub struct Bound {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl Bound {
    /// `path`, just bound by this process.
    pub fn new(path: PathBuf) -> Bound {
        let id = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Bound { path, id }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if self.id.is_some() && now == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
