//! The page pattern that makes every page checkable.
//!
//! A page written for the `gen`-th time holds a pattern derived from its page number and
//! `gen` alone; generation 0 means "never written" and is the zero page. Given the table of
//! generations the guest keeps, the content of every page is known exactly, so a stale copy
//! (an older generation) or a torn one is caught, and the mismatch can be described.

use livemig_wire::PAGE_SIZE;

const WORDS: usize = PAGE_SIZE / 8;
const TAG: u64 = 0x4c4d_5047_0000_0000; // "LMPG"

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn word(base: u64, i: usize) -> u64 {
    base ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Writes generation `gen` (at least 1) of page `page` into `buf`.
pub fn fill(buf: &mut [u8; PAGE_SIZE], page: u64, gen: u32) {
    let base = mix(page << 32 | gen as u64);
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        let v = match i {
            0 => TAG | gen as u64,
            1 => page,
            _ => word(base, i),
        };
        chunk.copy_from_slice(&v.to_le_bytes());
    }
}

/// What is wrong with a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The page holds another generation's pattern (stale or too new).
    WrongGeneration { found: u32, expected: u32 },
    /// The page holds another page's pattern.
    WrongPage { found: u64 },
    /// Zero where data was expected, or data where zero was expected.
    Zero { expected_zero: bool },
    /// Not a whole pattern (torn or corrupted).
    Corrupt,
}

/// Checks that `buf` is exactly generation `gen` of page `page`.
pub fn check(buf: &[u8; PAGE_SIZE], page: u64, gen: u32) -> Result<(), Mismatch> {
    let w = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let all_zero = buf.iter().all(|&b| b == 0);
    if gen == 0 {
        return if all_zero {
            Ok(())
        } else {
            Err(Mismatch::Zero {
                expected_zero: true,
            })
        };
    }
    if all_zero {
        return Err(Mismatch::Zero {
            expected_zero: false,
        });
    }
    if w(0) & !0xffff_ffff == TAG && w(1) == page && w(0) as u32 != gen {
        return Err(Mismatch::WrongGeneration {
            found: w(0) as u32,
            expected: gen,
        });
    }
    if w(0) & !0xffff_ffff == TAG && w(1) != page {
        return Err(Mismatch::WrongPage { found: w(1) });
    }
    let base = mix(page << 32 | gen as u64);
    if w(0) != TAG | gen as u64 || (2..WORDS).any(|i| w(i) != word(base, i)) {
        return Err(Mismatch::Corrupt);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check() {
        let mut b = [0u8; PAGE_SIZE];
        assert_eq!(check(&b, 5, 0), Ok(()));
        fill(&mut b, 5, 3);
        assert_eq!(check(&b, 5, 3), Ok(()));
        assert_eq!(
            check(&b, 5, 4),
            Err(Mismatch::WrongGeneration {
                found: 3,
                expected: 4
            })
        );
        assert_eq!(check(&b, 6, 3), Err(Mismatch::WrongPage { found: 5 }));
        assert_eq!(
            check(&b, 5, 0),
            Err(Mismatch::Zero {
                expected_zero: true
            })
        );
        b[100] ^= 1;
        assert_eq!(check(&b, 5, 3), Err(Mismatch::Corrupt));
    }
}
