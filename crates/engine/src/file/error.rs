//! Errors of saving to and restoring from a file: each names what failed, and where.

use crate::device::DeviceError;
use crate::guest::{GuestError, VerifyReport};
use crate::runtime::ThreadError;
use livemig_wire::file::FileFormatError;
use std::path::PathBuf;

/// Why a save or a restore failed. A save that fails leaves the guest as it was (resumed if
/// the save paused it) and no file at the path; a restore that fails has started nothing.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// A system call on the file failed.
    #[error("{path}: {op} failed: {source}")]
    Io {
        /// What was being done, e.g. "write pages of region 0" or "fsync".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// Direct I/O was asked for and the file cannot be opened with `O_DIRECT` (`EINVAL`:
    /// the filesystem does not support it, e.g. ramfs or some FUSE filesystems).
    #[error("{path}: direct I/O (O_DIRECT) refused: {source}; this filesystem does not allow it, save or restore without direct-io")]
    DirectIo {
        /// The file.
        path: PathBuf,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a save file this build can read (magic, version, CRC, truncation,
    /// layout): found before anything was built.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: FileFormatError,
    },
    /// The saved guest is larger than this side accepts.
    #[error("{path}: the saved guest has {memory_bytes} bytes of memory, more than this side accepts ({max} bytes)")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The guest's memory in the file.
        memory_bytes: u64,
        /// [`crate::file::RestoreConfig::max_guest_memory`].
        max: u64,
    },
    /// A page's data does not match the CRC32C saved with it.
    #[error("{path}: the page at guest address {addr:#x} is corrupted: CRC32C 0x{found:08x}, the file says 0x{expected:08x}")]
    PageCorrupted {
        /// The file.
        path: PathBuf,
        /// The page's guest address.
        addr: u64,
        /// The CRC in the file.
        expected: u32,
        /// The CRC of the data read.
        found: u32,
    },
    /// A device chunk's data does not match its CRC32C.
    #[error("{path}: chunk {chunk} of device {device} is corrupted")]
    ChunkCorrupted {
        /// The file.
        path: PathBuf,
        /// The device's name.
        device: String,
        /// The chunk's index in the device's stream.
        chunk: usize,
    },
    /// A guest operation failed (naming it).
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// A device operation failed (naming the device and the operation).
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A thread of the save or restore failed or panicked.
    #[error(transparent)]
    Job(#[from] ThreadError),
    /// On-demand restore: userfaultfd is unavailable or failed.
    #[error("on-demand restore: {0}")]
    OnDemand(#[source] crate::postcopy::PostcopyError),
    /// The configuration cannot work.
    #[error("invalid file migration configuration: {0}")]
    Config(String),
    /// Cancelled from outside.
    #[error("cancelled")]
    Cancelled,
    /// The restored guest's memory was checked and is wrong (a test instrument).
    #[error("the restored guest failed verification: {} of {} pages wrong {:?}", .0.pages_mismatched, .0.pages_checked, .0.examples)]
    Verify(VerifyReport),
}

impl FileError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        FileError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(path: &std::path::Path, source: FileFormatError) -> Self {
        FileError::Format {
            path: path.to_path_buf(),
            source,
        }
    }
}
