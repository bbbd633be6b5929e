//! The destination side of a [`super::vfio_sim::VfioSim`] stream: every byte is checked
//! against the pattern at its offset as it arrives and each section's crc32c at its end; the
//! first wrong byte breaks the loader for good, like real hardware. Only a position, a
//! running crc and the section header are kept, never the state.

use super::vfio_config::VfioSimConfig;
use super::vfio_stream::{
    section_total, Pattern, SectionHeader, SectionKind, HEADER_LEN, TRAILER_LEN,
};

/// Destination-side state: where in the stream the next byte goes.
enum LoadPhase {
    Header {
        buf: [u8; HEADER_LEN],
        have: usize,
    },
    Payload {
        hdr: SectionHeader,
        /// Built once per section (its 4 KiB table is boxed).
        pattern: Pattern,
        done: u64,
        crc: u32,
    },
    Trailer {
        hdr: SectionHeader,
        buf: [u8; 4],
        have: usize,
        crc: u32,
    },
    Done,
    /// Broken for good: the first error, repeated.
    Failed(String),
}

/// Checks one device's stream, in order.
pub struct StreamLoader {
    cfg: VfioSimConfig,
    phase: LoadPhase,
    /// Stream offset of the current section's first byte.
    section_start: u64,
    last_gen: Option<u64>,
    /// A whole section (the first precopy section: VFIO's initial bytes) has loaded.
    initial_loaded: bool,
}

impl StreamLoader {
    pub fn new(cfg: &VfioSimConfig) -> Self {
        StreamLoader {
            cfg: cfg.clone(),
            phase: LoadPhase::Header {
                buf: [0; HEADER_LEN],
                have: 0,
            },
            section_start: 0,
            last_gen: None,
            initial_loaded: false,
        }
    }

    /// True once the final section has arrived whole, in order, digest matching.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, LoadPhase::Done)
    }

    /// True once the device's initial data has loaded: a whole section (or, without
    /// precopy data, at once).
    pub fn initial_loaded(&self) -> bool {
        self.cfg.precopy == 0 || self.initial_loaded
    }

    /// Takes the next bytes of the stream. The first error breaks the loader for good.
    pub fn load(&mut self, data: &[u8]) -> Result<(), String> {
        if let LoadPhase::Failed(e) = &self.phase {
            return Err(e.clone());
        }
        self.load_into(data).inspect_err(|detail| {
            self.phase = LoadPhase::Failed(detail.clone());
        })
    }

    /// The stream has ended: Ok(generation of the final state) if it was whole.
    pub fn complete(&self) -> Result<u64, String> {
        Err(match &self.phase {
            LoadPhase::Done => return Ok(self.last_gen.unwrap_or(0)),
            LoadPhase::Failed(e) => format!("loading failed earlier: {e}"),
            LoadPhase::Header { have, .. } => format!(
                "the final state never arrived whole (stream ends at byte {} in a header)",
                self.section_start + *have as u64
            ),
            LoadPhase::Payload { hdr, done, .. } => format!(
                "the {} is incomplete: {} of {} payload bytes arrived",
                hdr.kind.describe(),
                done,
                hdr.len
            ),
            LoadPhase::Trailer { hdr, .. } => {
                format!("the {} is missing its digest", hdr.kind.describe())
            }
        })
    }
    /// Consumes `data` at the stream position in `l`; the error names the offset.
    fn load_into(&mut self, mut data: &[u8]) -> Result<(), String> {
        while !data.is_empty() {
            let start = self.section_start;
            match &mut self.phase {
                LoadPhase::Header { buf, have } => {
                    data = fill(buf, have, data);
                    if *have == HEADER_LEN {
                        let hdr = SectionHeader::decode(buf).map_err(|why| {
                            format!(
                                "section header at stream byte {start} is wrong ({why}): {CORRUPT}"
                            )
                        })?;
                        self.begin_payload(hdr, start)?;
                    }
                }
                LoadPhase::Payload {
                    hdr,
                    pattern,
                    done,
                    crc,
                } => {
                    let t = usize::try_from(hdr.len - *done)
                        .unwrap_or(usize::MAX)
                        .min(data.len());
                    let piece = &data[..t];
                    check_piece(self.cfg.fail_load_at, start, hdr, pattern, *done, piece)?;
                    *crc = crc32c::crc32c_append(*crc, piece);
                    *done += t as u64;
                    data = &data[t..];
                    if *done == hdr.len {
                        let (hdr, crc) = (*hdr, *crc);
                        self.phase = LoadPhase::Trailer {
                            hdr,
                            buf: [0; 4],
                            have: 0,
                            crc,
                        };
                    }
                }
                LoadPhase::Trailer {
                    hdr,
                    buf,
                    have,
                    crc,
                } => {
                    let t = (TRAILER_LEN - *have).min(data.len());
                    let at = HEADER_LEN as u64 + hdr.len + *have as u64;
                    check_fail_load(self.cfg.fail_load_at, hdr, at, t)?;
                    data = fill(buf, have, data);
                    if *have == TRAILER_LEN {
                        let (hdr, got, crc) = (*hdr, u32::from_le_bytes(*buf), *crc);
                        self.end_section(hdr, got, crc)?;
                    }
                }
                LoadPhase::Done => {
                    return Err(format!(
                        "{} bytes after the end of the final state",
                        data.len()
                    ));
                }
                LoadPhase::Failed(e) => return Err(e.clone()),
            }
        }
        Ok(())
    }

    /// A whole header arrived: checked, and its payload is next.
    fn begin_payload(&mut self, hdr: SectionHeader, start: u64) -> Result<(), String> {
        self.check_header(&hdr, start)?;
        check_fail_load(self.cfg.fail_load_at, &hdr, 0, HEADER_LEN)?;
        let crc = crc32c::crc32c(&hdr.encode());
        self.last_gen = Some(hdr.generation);
        let pattern = Pattern::new(self.cfg.seed, hdr.kind, hdr.generation);
        self.phase = LoadPhase::Payload {
            hdr,
            pattern,
            done: 0,
            crc,
        };
        Ok(())
    }

    /// A whole trailer arrived: the section's digest `got` must be the `crc` computed; a
    /// precopy section is followed by another section, the final one ends the stream.
    fn end_section(&mut self, hdr: SectionHeader, got: u32, crc: u32) -> Result<(), String> {
        let start = self.section_start;
        if got != crc {
            return Err(format!(
                "digest of the {} does not match (computed 0x{crc:08x}, trailer \
                 0x{got:08x} at stream byte {}): {CORRUPT}",
                hdr.kind.describe(),
                start + HEADER_LEN as u64 + hdr.len
            ));
        }
        self.section_start += section_total(hdr.len);
        self.initial_loaded = true;
        self.phase = match hdr.kind {
            SectionKind::Precopy => LoadPhase::Header {
                buf: [0; HEADER_LEN],
                have: 0,
            },
            SectionKind::Final => LoadPhase::Done,
        };
        Ok(())
    }

    /// A header must match this device's config and never go back a generation.
    fn check_header(&self, hdr: &SectionHeader, start: u64) -> Result<(), String> {
        let want_len = match hdr.kind {
            SectionKind::Precopy => self.cfg.precopy,
            SectionKind::Final => self.cfg.size,
        };
        if hdr.len != want_len {
            return Err(format!(
                "{} section at stream byte {start} is {} bytes long, this device's is {want_len}",
                hdr.kind.describe(),
                hdr.len
            ));
        }
        if let Some(last) = self.last_gen.filter(|&g| hdr.generation < g) {
            return Err(format!(
                "{} section at stream byte {start} has generation {}, older than {last}",
                hdr.kind.describe(),
                hdr.generation
            ));
        }
        Ok(())
    }
}

/// What every wrong byte of a stream is, as the loader sees it.
const CORRUPT: &str = "chunks out of order or corrupt";

/// Copies from `data` into `buf` after its first `have` bytes, as much as fits; returns
/// the rest of `data`.
fn fill<'d, const N: usize>(buf: &mut [u8; N], have: &mut usize, data: &'d [u8]) -> &'d [u8] {
    let t = (N - *have).min(data.len());
    buf[*have..*have + t].copy_from_slice(&data[..t]);
    *have += t;
    &data[t..]
}

/// Checks a piece of a section's payload, `done` bytes into it (the section starting at
/// stream byte `start`): the configured load failure, and every byte against the pattern.
fn check_piece(
    fail_load_at: Option<u64>,
    start: u64,
    hdr: &SectionHeader,
    pattern: &Pattern,
    done: u64,
    piece: &[u8],
) -> Result<(), String> {
    let at = HEADER_LEN as u64 + done;
    check_fail_load(fail_load_at, hdr, at, piece.len())?;
    if let Some((i, want)) = pattern.first_mismatch(done, piece) {
        return Err(format!(
            "byte {} of the {} (stream byte {}) is wrong: {CORRUPT} \
             (expected 0x{want:02x}, got 0x{:02x})",
            at + i as u64,
            hdr.kind.describe(),
            start + at + i as u64,
            piece[i]
        ));
    }
    Ok(())
}

/// The `fail_load_at` test hook, for `len` bytes at `at` of a section.
fn check_fail_load(
    fail_load_at: Option<u64>,
    hdr: &SectionHeader,
    at: u64,
    len: usize,
) -> Result<(), String> {
    match fail_load_at {
        Some(x) if hdr.kind == SectionKind::Final && x < at + len as u64 && x >= at => Err(
            format!("injected load failure at byte {x} of the final state"),
        ),
        _ => Ok(()),
    }
}
