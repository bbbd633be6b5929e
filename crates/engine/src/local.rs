//! Local mode: when source and destination share a host, guest RAM is not copied at all.
//!
//! The source's guest memory lives in memfds (`vmm`'s shared memory). Over a `unix:` main
//! channel the source hands their descriptors to the destination (`SCM_RIGHTS`, in a
//! `MemoryFiles` frame right after the hello); the destination maps the same files and
//! builds its guest on them. From then on both processes see one copy of guest RAM: the
//! source guest keeps running and writing into it, and only the device and vCPU state move
//! at switchover, so precopy has no pages to send and downtime does not depend on RAM size.
//!
//! A mapped file that shrank would turn the destination's accesses into `SIGBUS`, so a
//! destination takes only files sealed against shrinking ([`REQUIRED_SEALS`]) and at least
//! as long as the ranges it maps from them. Until `Handover` the destination only maps the
//! memory (it never writes it), so a failed attempt leaves the source guest untouched.

use crate::guest::GuestMemory;
use livemig_wire::{MemoryFiles, MemoryRange};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Seals a memory file must carry for a destination to map it: it can neither shrink (which
/// would fault the destination) nor grow, and the seals themselves are fixed.
pub const REQUIRED_SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Why local mode cannot go ahead, naming the range or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// Source: a region of guest memory is not backed by a file, so it cannot be handed
    /// over. Back the guest's memory with memfds (or migrate with RAM copied).
    #[error("local mode needs guest memory backed by files (start the guest with shared memory); range {index} at {guest_addr:#x} is anonymous")]
    Anonymous {
        /// The region's index.
        index: usize,
        /// Its first guest-physical address.
        guest_addr: u64,
    },
    /// Destination: the source handed over a number of files (or offsets) other than its
    /// number of memory ranges.
    #[error("{files} memory files for {ranges} memory ranges")]
    FileCount {
        /// Files received. (A layout whose offsets do not match the ranges is reported here
        /// too, and then `files` may equal `ranges`.)
        files: usize,
        /// Memory ranges the guest has.
        ranges: usize,
    },
    /// Destination: a file's size or seals could not be read.
    #[error("memory file {index}: cannot read its size or seals: {source}")]
    Stat {
        /// The file's index (that of its range).
        index: usize,
        /// The system's error.
        #[source]
        source: std::io::Error,
    },
    /// Destination: a file is too short for the range mapped from it.
    #[error(
        "memory file {index} holds {len} bytes, too few for {need} bytes from offset {offset}"
    )]
    TooShort {
        /// The file's index.
        index: usize,
        /// The file's length, bytes.
        len: u64,
        /// Where the range starts in the file.
        offset: u64,
        /// The range's size, bytes.
        need: u64,
    },
    /// Destination: a file lacks some of [`REQUIRED_SEALS`]; the source must seal its
    /// memfds (`F_ADD_SEALS`) before migrating in local mode.
    #[error("memory file {index} lacks the seals {missing} (it has {seals:#x}): a source that could resize it could fault this process")]
    Unsealed {
        /// The file's index.
        index: usize,
        /// The seals it has (`F_GET_SEALS`).
        seals: libc::c_int,
        /// The names of the seals it lacks.
        missing: String,
    },
    /// Destination: mapping the files as guest memory failed.
    #[error("cannot map the memory files: {0}")]
    Map(String),
}

/// The files backing every region of `memory`, in range order, with where each range lies
/// in its file: what a source hands over.
pub fn memory_files(
    memory: &GuestMemory,
) -> Result<(Vec<BorrowedFd<'_>>, MemoryFiles), LocalError> {
    let mut fds = Vec::new();
    let mut offsets = Vec::new();
    for (index, region) in memory.iter().enumerate() {
        let Some(fo) = region.file_offset() else {
            return Err(LocalError::Anonymous {
                index,
                guest_addr: region.start_addr().0,
            });
        };
        fds.push(fo.file().as_fd());
        offsets.push(fo.start());
    }
    Ok((fds, MemoryFiles { offsets }))
}

/// Maps the files a source handed over as guest memory for `ranges`, after checking each
/// is long enough and sealed.
pub fn map_memory_files(
    ranges: &[MemoryRange],
    files: Vec<OwnedFd>,
    layout: &MemoryFiles,
) -> Result<GuestMemory, LocalError> {
    if files.len() != ranges.len() || layout.offsets.len() != ranges.len() {
        return Err(LocalError::FileCount {
            files: files.len(),
            ranges: ranges.len(),
        });
    }
    let mut spec = Vec::with_capacity(ranges.len());
    for (index, ((fd, range), &offset)) in files
        .into_iter()
        .zip(ranges)
        .zip(&layout.offsets)
        .enumerate()
    {
        let file = File::from(fd);
        let len = file
            .metadata()
            .map_err(|source| LocalError::Stat { index, source })?
            .len();
        let need = offset.saturating_add(range.size);
        if len < need {
            return Err(LocalError::TooShort {
                index,
                len,
                offset,
                need: range.size,
            });
        }
        // SAFETY: F_GET_SEALS on a descriptor this function owns; it reads flags only.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(LocalError::Stat {
                index,
                source: std::io::Error::last_os_error(),
            });
        }
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            let missing = [
                (libc::F_SEAL_SHRINK, "F_SEAL_SHRINK"),
                (libc::F_SEAL_GROW, "F_SEAL_GROW"),
                (libc::F_SEAL_SEAL, "F_SEAL_SEAL"),
            ]
            .iter()
            .filter(|(bit, _)| seals & bit == 0)
            .map(|&(_, name)| name)
            .collect::<Vec<_>>()
            .join(", ");
            return Err(LocalError::Unsealed {
                index,
                seals,
                missing,
            });
        }
        spec.push((
            GuestAddress(range.guest_addr),
            range.size as usize,
            Some(FileOffset::new(file, offset)),
        ));
    }
    GuestMemory::from_ranges_with_files(spec).map_err(|e| LocalError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use vm_memory::{Bytes, GuestAddress};

    fn memfd(len: u64, seals: libc::c_int) -> File {
        // SAFETY: memfd_create with a valid C string; the descriptor is owned by the File.
        let f = unsafe {
            let fd = libc::memfd_create(
                c"local-test".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            );
            assert!(fd >= 0);
            File::from_raw_fd(fd)
        };
        f.set_len(len).unwrap();
        if seals != 0 {
            // SAFETY: F_ADD_SEALS on a descriptor owned here.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
            assert_eq!(r, 0);
        }
        f
    }

    fn range(size: u64) -> Vec<MemoryRange> {
        vec![MemoryRange {
            guest_addr: 0,
            size,
        }]
    }

    #[test]
    fn both_mappings_see_one_memory() {
        let f = memfd(1 << 20, REQUIRED_SEALS);
        let dup = f.try_clone().unwrap();
        let src = GuestMemory::from_ranges_with_files([(
            GuestAddress(0),
            1 << 20,
            Some(FileOffset::new(f, 0)),
        )])
        .unwrap();
        let (fds, layout) = memory_files(&src).unwrap();
        assert_eq!((fds.len(), layout.offsets.clone()), (1, vec![0]));
        let dst = map_memory_files(&range(1 << 20), vec![OwnedFd::from(dup)], &layout).unwrap();
        src.write_obj(0xfeed_u32, GuestAddress(8192)).unwrap();
        assert_eq!(dst.read_obj::<u32>(GuestAddress(8192)).unwrap(), 0xfeed);
    }

    #[test]
    fn anonymous_memory_cannot_be_handed_over() {
        let anon = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e = memory_files(&anon).unwrap_err();
        assert!(e.to_string().contains("anonymous"), "{e}");
    }

    #[test]
    fn short_unsealed_or_miscounted_files_are_refused() {
        let layout = MemoryFiles { offsets: vec![0] };
        let short = memfd(4096, REQUIRED_SEALS);
        let e = map_memory_files(&range(1 << 20), vec![short.into()], &layout).unwrap_err();
        assert!(matches!(e, LocalError::TooShort { .. }), "{e}");
        let open = memfd(1 << 20, 0);
        let e = map_memory_files(&range(1 << 20), vec![open.into()], &layout).unwrap_err();
        assert!(
            e.to_string().contains("lacks the seals F_SEAL_SHRINK"),
            "{e}"
        );
        let e = map_memory_files(&range(1 << 20), Vec::new(), &layout).unwrap_err();
        assert!(
            matches!(
                e,
                LocalError::FileCount {
                    files: 0,
                    ranges: 1
                }
            ),
            "{e}"
        );
        let past_end = MemoryFiles {
            offsets: vec![4096],
        };
        let f = memfd(1 << 20, REQUIRED_SEALS);
        let e = map_memory_files(&range(1 << 20), vec![f.into()], &past_end).unwrap_err();
        assert!(matches!(e, LocalError::TooShort { .. }), "{e}");
    }
}
