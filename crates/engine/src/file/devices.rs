//! Device state to and from the file. Saving, each device has a job of its own: precopy
//! data while the guest runs, its final state once the guest is paused, each chunk
//! appended at the file's tail (devices share the tail through one atomic cursor) and
//! listed in the device's chunk index. Restoring, each device's loader reads its chunks in
//! index order, checks each CRC32C and loads it: the stream arrives in saved order, as
//! from the wire.

use super::error::FileError;
use super::io::{read_vec, write_buf};
use crate::cancel::CancelToken;
use crate::device::Device;
use livemig_wire::file::{ChunkRef, MAX_DEVICE_CHUNKS};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often a device with no precopy data now is asked again (as in a migration).
const PRECOPY_POLL: Duration = Duration::from_millis(20);

/// Where device jobs write, and when they switch to the final state.
pub(crate) struct DeviceSink<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    /// The next free byte of the tail.
    pub tail: &'a AtomicU64,
    pub chunk_size: usize,
    /// Cancelled when the guest has paused: the final state may be read.
    pub paused: &'a CancelToken,
    /// The save's cancellation.
    pub cancel: &'a CancelToken,
}

impl DeviceSink<'_> {
    /// Saves `device`'s whole stream: precopy data until the guest pauses (`live`), or
    /// until it has no more (guest already paused), then the final state.
    pub fn save(&self, device: &dyn Device, live: bool) -> Result<Vec<ChunkRef>, FileError> {
        device.begin_save()?;
        let mut chunks = Vec::new();
        let mut buf = Vec::with_capacity(self.chunk_size);
        loop {
            if self.cancel.is_cancelled() {
                return Err(FileError::Cancelled);
            }
            if live && self.paused.is_cancelled() {
                break;
            }
            buf.clear();
            if device.save_precopy(&mut buf, self.chunk_size)? > 0 {
                self.append(device, &buf, &mut chunks)?;
            } else if live {
                self.paused.sleep(PRECOPY_POLL);
            } else {
                break;
            }
        }
        loop {
            if self.cancel.is_cancelled() {
                return Err(FileError::Cancelled);
            }
            buf.clear();
            if device.save_final(&mut buf, self.chunk_size)? == 0 {
                return Ok(chunks);
            }
            self.append(device, &buf, &mut chunks)?;
        }
    }

    fn append(
        &self,
        device: &dyn Device,
        buf: &[u8],
        chunks: &mut Vec<ChunkRef>,
    ) -> Result<(), FileError> {
        if chunks.len() >= MAX_DEVICE_CHUNKS as usize || buf.len() > self.chunk_size {
            return Err(FileError::Config(format!(
                "device {}: a chunk of {} bytes or more than {MAX_DEVICE_CHUNKS} chunks \
                 (raise the chunk size)",
                device.descriptor().name,
                buf.len()
            )));
        }
        let offset = self.tail.fetch_add(buf.len() as u64, Ordering::Relaxed);
        write_buf(self.file, buf, offset)
            .map_err(|e| FileError::io("write device state", self.path, e))?;
        chunks.push(ChunkRef {
            offset,
            len: buf.len() as u32,
            crc: crc32c::crc32c(buf),
        });
        Ok(())
    }
}

/// Loads `device`'s stream from `chunks` (checked against the file's length already), in
/// order, each chunk checked against its CRC32C; then the empty last piece and
/// `load_complete`, as a migration's loader does.
pub(crate) fn load_device(
    file: &File,
    path: &Path,
    name: &str,
    device: &dyn Device,
    chunks: &[ChunkRef],
    cancel: &CancelToken,
) -> Result<u64, FileError> {
    let mut bytes = 0;
    for (i, c) in chunks.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(FileError::Cancelled);
        }
        let data = read_vec(file, c.len as u64, c.offset)
            .map_err(|e| FileError::io("read device state", path, e))?;
        if crc32c::crc32c(&data) != c.crc {
            return Err(FileError::ChunkCorrupted {
                path: path.to_path_buf(),
                device: name.to_string(),
                chunk: i,
            });
        }
        device.load(&data)?;
        bytes += data.len() as u64;
    }
    device.load(&[])?;
    device.load_complete()?;
    Ok(bytes)
}
