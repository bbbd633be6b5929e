//! Exactness check of a paused KVM guest's whole memory.
//!
//! - System pages the image builds at boot (GDT, IDT, page tables) must be exactly what
//!   [`Layout::system_pages`] says; the image's own pages must hold what was loaded (their
//!   CRC32C, when known: on the guest that loaded them).
//! - Every other page below the data area must be zero, except the dynamic ones (parameter
//!   block, command line and boot information, stacks, generation table:
//!   [`Layout::dynamic_pages`]); table entries of non-data pages must be zero.
//! - Every data page must hold [`crate::pattern`] at its generation from the table, except a
//!   page a vCPU is writing at the moment it stopped (its slot is busy): that one must be a
//!   prefix of the new generation followed by the rest of the old one, consistent with where
//!   the image's write protocol (see `guest/image.S`) was.
//! - The generations add up: sum of the table = host writes + every vCPU's counter (+ 1 for a
//!   vCPU stopped between updating the table and its counter). A counter that was reset or
//!   replayed breaks this.

use super::error::KvmError;
use super::layout::{Layout, GEN_TABLE_ADDR, MAX_PDS, PARAMS_MAGIC, PD_ADDR, PML4_ADDR};
use super::params::{read_params, read_slot, SlotView};
use crate::pattern;
use livemig_engine::{GuestMemory, VerifyReport};
use livemig_wire::PAGE_SIZE;
use std::collections::{HashMap, HashSet};
use vm_memory::{Bytes, GuestAddress};

const EXAMPLES: usize = 5;
/// Bits 5 and 6 of a page-table entry.
const PTE_ACCESSED_DIRTY: u64 = 0x60;

fn note(r: &mut VerifyReport, what: String) {
    r.pages_mismatched += 1;
    if r.examples.len() < EXAMPLES {
        r.examples.push(what);
    }
}

fn read_page(mem: &GuestMemory, page: u64, buf: &mut [u8; PAGE_SIZE]) -> bool {
    mem.read_slice(buf, GuestAddress(page * PAGE_SIZE as u64))
        .is_ok()
}

/// Checks a page caught in the middle of a write from generation `gen - 1` to `gen`: words
/// `0..k` of generation `gen`, the rest of generation `gen - 1`, for some `k`.
fn check_torn(buf: &[u8; PAGE_SIZE], page: u64, gen: u32) -> bool {
    let mut new = [0u8; PAGE_SIZE];
    pattern::fill(&mut new, page, gen);
    let mut old = [0u8; PAGE_SIZE];
    if gen > 1 {
        pattern::fill(&mut old, page, gen - 1);
    }
    let k = buf
        .chunks_exact(8)
        .zip(new.chunks_exact(8))
        .take_while(|(a, b)| a == b)
        .count();
    buf[k * 8..] == old[k * 8..]
}

/// Checks every page and the counters of a paused guest with `vcpus` vCPUs; `loaded` are the
/// CRC32Cs of the pages the loader wrote (the image), by page number.
pub fn verify(
    mem: &GuestMemory,
    l: &Layout,
    vcpus: u32,
    loaded: &[(u64, u32)],
) -> Result<VerifyReport, KvmError> {
    let mut report = VerifyReport::default();
    let params = read_params(mem)?;
    if params.magic != PARAMS_MAGIC || params.first_data_page != l.first_data_page {
        note(
            &mut report,
            format!("parameter block is not this layout's: {params:?}"),
        );
        return Ok(report);
    }
    let slots: Vec<SlotView> = (0..vcpus)
        .map(|v| read_slot(mem, v))
        .collect::<Result<_, _>>()?;
    let gens = read_generations(mem, l)?;

    check_system(mem, l, &gens, loaded, &mut report);

    // The page each busy vCPU is writing.
    let busy: HashMap<u64, SlotView> = slots
        .iter()
        .filter(|s| s.busy)
        .map(|s| (s.page, *s))
        .collect();
    let first = l.first_data_page;
    let parts: Vec<VerifyReport> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..2u64)
            .map(|part| {
                let (gens, busy) = (&gens, &busy);
                let pages = (first + part..l.pages()).step_by(2);
                sc.spawn(move || check_data_pages(mem, pages, gens, busy))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    for r in parts {
        report.pages_checked += r.pages_checked;
        report.pages_mismatched += r.pages_mismatched;
        report.examples.extend(r.examples);
    }
    check_counters(
        &gens[first as usize..],
        params.host_writes,
        &slots,
        &gens,
        &mut report,
    );
    report.examples.truncate(EXAMPLES);
    Ok(report)
}

/// The generation table: each page's generation, by page number.
fn read_generations(mem: &GuestMemory, l: &Layout) -> Result<Vec<u32>, KvmError> {
    let mut gens_raw = vec![0u8; 4 * l.pages() as usize];
    mem.read_slice(&mut gens_raw, GuestAddress(GEN_TABLE_ADDR))
        .map_err(|e| KvmError::Memory {
            op: "read generation table",
            detail: e.to_string(),
        })?;
    Ok(gens_raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Checks the data pages `pages` against their generations in `gens`; `busy` are the pages
/// vCPUs were writing when they stopped.
fn check_data_pages(
    mem: &GuestMemory,
    pages: impl Iterator<Item = u64>,
    gens: &[u32],
    busy: &HashMap<u64, SlotView>,
) -> VerifyReport {
    let mut r = VerifyReport::default();
    let mut buf = [0u8; PAGE_SIZE];
    for p in pages {
        r.pages_checked += 1;
        let gen = gens[p as usize];
        if !read_page(mem, p, &mut buf) {
            note(&mut r, format!("page {p}: unreadable"));
            continue;
        }
        match busy.get(&p) {
            Some(s) if gen.wrapping_add(1) == s.gen => {
                if !check_torn(&buf, p, s.gen) {
                    note(
                        &mut r,
                        format!(
                            "page {p} (being written, gen {} -> {}): neither old nor new",
                            gen, s.gen
                        ),
                    );
                }
            }
            Some(s) if gen != s.gen => note(
                &mut r,
                format!(
                    "page {p}: table says gen {gen}, the vCPU writing it says {}",
                    s.gen
                ),
            ),
            _ => {
                if let Err(m) = pattern::check(&buf, p, gen) {
                    note(
                        &mut r,
                        format!("page {p} (0x{:x}): {m:?}", p * PAGE_SIZE as u64),
                    );
                }
            }
        }
    }
    r
}

/// The system area: built pages exact, dynamic pages skipped, everything else zero.
fn check_system(
    mem: &GuestMemory,
    l: &Layout,
    gens: &[u32],
    loaded: &[(u64, u32)],
    report: &mut VerifyReport,
) {
    let mut expected: HashMap<u64, Vec<u8>> = HashMap::new();
    for (addr, bytes) in l.system_pages() {
        for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            expected.insert(addr / PAGE_SIZE as u64 + i as u64, page.to_vec());
        }
    }
    let digests: HashMap<u64, u32> = loaded.iter().copied().collect();
    let dynamic: HashSet<u64> = l.dynamic_pages().collect();
    let tables_first = PML4_ADDR / PAGE_SIZE as u64;
    let tables_end = PD_ADDR / PAGE_SIZE as u64 + MAX_PDS;
    let zero = [0u8; PAGE_SIZE];
    let mut buf = [0u8; PAGE_SIZE];
    for p in 0..l.first_data_page {
        report.pages_checked += 1;
        if let Some(&crc) = digests.get(&p) {
            if !read_page(mem, p, &mut buf) || crc32c::crc32c(&buf) != crc {
                note(
                    report,
                    format!(
                        "image page {p} (0x{:x}) differs from what was loaded",
                        p * PAGE_SIZE as u64
                    ),
                );
            }
            continue;
        }
        if dynamic.contains(&p) {
            continue;
        }
        let want = expected.get(&p).map(|v| v.as_slice()).unwrap_or(&zero);
        let same = read_page(mem, p, &mut buf)
            && if (tables_first..tables_end).contains(&p) {
                // The CPU sets the accessed and dirty bits of the entries it uses.
                let entry = |c: &[u8]| {
                    u64::from_le_bytes(c.try_into().unwrap_or_default()) & !PTE_ACCESSED_DIRTY
                };
                buf.chunks_exact(8)
                    .zip(want.chunks_exact(8))
                    .all(|(a, b)| entry(a) == entry(b))
            } else {
                buf[..] == want[..]
            };
        if !same {
            note(
                report,
                format!(
                    "system page {p} (0x{:x}) differs from what the host built",
                    p * PAGE_SIZE as u64
                ),
            );
        }
    }
    if let Some(p) = gens[..l.first_data_page as usize]
        .iter()
        .position(|&g| g != 0)
    {
        note(
            report,
            format!("generation table has an entry for system page {p}"),
        );
    }
}

/// Sum of generations = host writes + counters (+ vCPUs between the table and the counter).
fn check_counters(
    data_gens: &[u32],
    host_writes: u64,
    slots: &[SlotView],
    gens: &[u32],
    report: &mut VerifyReport,
) {
    let total: u64 = data_gens.iter().map(|&g| g as u64).sum();
    let mut expected = host_writes;
    for (v, s) in slots.iter().enumerate() {
        expected += s.counter;
        if !s.busy {
            continue;
        }
        let table = gens.get(s.page as usize).copied().unwrap_or(0);
        let committed = table == s.gen;
        let ok = if committed {
            s.counter == s.count_at || s.counter == s.count_at + 1
        } else {
            s.counter == s.count_at
        };
        if !ok {
            note(
                report,
                format!(
                    "vCPU {v}: counter {} inconsistent with its write under way ({s:?})",
                    s.counter
                ),
            );
        }
        if committed && s.counter == s.count_at {
            expected += 1;
        }
    }
    if total != expected {
        note(
            report,
            format!("pages hold {total} writes but host writes + vCPU counters say {expected}: a counter was reset or repeated"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_pages_are_recognised() {
        let mut new = [0u8; PAGE_SIZE];
        pattern::fill(&mut new, 300, 5);
        let mut old = [0u8; PAGE_SIZE];
        pattern::fill(&mut old, 300, 4);
        for k in [0, 1, 2, 100, 511, 512] {
            let mut b = old;
            b[..k * 8].copy_from_slice(&new[..k * 8]);
            assert!(check_torn(&b, 300, 5), "k = {k}");
        }
        // From the zero page to generation 1.
        let mut b = [0u8; PAGE_SIZE];
        pattern::fill(&mut new, 300, 1);
        b[..80].copy_from_slice(&new[..80]);
        assert!(check_torn(&b, 300, 1));
        // A hole in the new prefix, or an older generation, is not a torn write.
        let mut b = old;
        pattern::fill(&mut new, 300, 5);
        b[..800].copy_from_slice(&new[..800]);
        b[400] ^= 1;
        assert!(!check_torn(&b, 300, 5));
        pattern::fill(&mut b, 300, 3);
        assert!(!check_torn(&b, 300, 5));
    }

    #[test]
    fn counters_account_for_the_write_under_way() {
        let gens = vec![0, 2, 1];
        let idle = SlotView {
            counter: 2,
            busy: false,
            page: 0,
            gen: 0,
            count_at: 0,
        };
        let mut r = VerifyReport::default();
        check_counters(&gens, 1, &[idle], &gens, &mut r);
        assert_eq!(r.pages_mismatched, 0, "{:?}", r.examples);
        // Stopped after the table, before the counter.
        let between = SlotView {
            counter: 1,
            busy: true,
            page: 1,
            gen: 2,
            count_at: 1,
        };
        check_counters(&gens, 1, &[between], &gens, &mut r);
        assert_eq!(r.pages_mismatched, 0, "{:?}", r.examples);
        // A counter that went back.
        check_counters(&gens, 1, &[SlotView { counter: 1, ..idle }], &gens, &mut r);
        assert_eq!(r.pages_mismatched, 1);
    }
}
