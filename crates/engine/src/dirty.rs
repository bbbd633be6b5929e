//! A dirty-page bitmap over all memory ranges of a guest, one bit per 4 KiB page.

use livemig_wire::{MemoryRange, PAGE_SIZE};

/// One bit per page, per memory range.
#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    ranges: Vec<MemoryRange>,
    words: Vec<Vec<u64>>,
}

impl DirtyBitmap {
    /// A bitmap with every page clean, one bit per whole 4 KiB page of each of `ranges` (the
    /// guest's, from [`crate::Guest::descriptor`]).
    pub fn new(ranges: &[MemoryRange]) -> Self {
        let words = ranges
            .iter()
            .map(|r| vec![0u64; pages_of(r).div_ceil(64)])
            .collect();
        DirtyBitmap {
            ranges: ranges.to_vec(),
            words,
        }
    }

    /// The memory ranges the bitmap covers, in the order given to [`Self::new`].
    pub fn ranges(&self) -> &[MemoryRange] {
        &self.ranges
    }

    /// Marks every page dirty.
    pub fn set_all(&mut self) {
        for (r, w) in self.ranges.iter().zip(self.words.iter_mut()) {
            let pages = pages_of(r);
            w.iter_mut().for_each(|x| *x = u64::MAX);
            if !pages.is_multiple_of(64) {
                if let Some(last) = w.last_mut() {
                    *last = (1u64 << (pages % 64)) - 1;
                }
            }
        }
    }

    /// Marks every page clean.
    pub fn clear(&mut self) {
        self.words.iter_mut().flatten().for_each(|x| *x = 0);
    }

    /// ORs a bitmap of range `index` (bit i = page i of the range) into this one. Bits beyond
    /// the range are ignored.
    pub fn or_range_words(&mut self, index: usize, words: &[u64]) {
        let Some(dst) = self.words.get_mut(index) else {
            return;
        };
        let pages = pages_of(&self.ranges[index]);
        for (d, s) in dst.iter_mut().zip(words) {
            *d |= s;
        }
        if !pages.is_multiple_of(64) {
            if let Some(last) = dst.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
    }

    /// Marks the page holding guest address `addr`. Addresses outside every range are ignored.
    pub fn set_addr(&mut self, addr: u64) {
        for (i, r) in self.ranges.iter().enumerate() {
            if addr >= r.guest_addr && addr - r.guest_addr < r.size {
                let page = ((addr - r.guest_addr) / PAGE_SIZE as u64) as usize;
                self.words[i][page / 64] |= 1 << (page % 64);
            }
        }
    }

    /// Whether the page holding guest address `addr` is marked (false outside every range).
    pub fn contains(&self, addr: u64) -> bool {
        self.ranges.iter().zip(&self.words).any(|(r, w)| {
            addr >= r.guest_addr && addr - r.guest_addr < r.size && {
                let page = ((addr - r.guest_addr) / PAGE_SIZE as u64) as usize;
                w[page / 64] & (1 << (page % 64)) != 0
            }
        })
    }

    /// ORs another bitmap over the same ranges into this one.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (i, w) in other.words.iter().enumerate() {
            self.or_range_words(i, w);
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .flatten()
            .map(|w| w.count_ones() as u64)
            .sum()
    }

    /// Guest addresses of the dirty pages, in ascending order.
    pub fn addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .zip(self.words.iter())
            .flat_map(|(r, words)| {
                words.iter().enumerate().flat_map(move |(wi, &w)| {
                    SetBits(w).map(move |b| r.guest_addr + ((wi * 64 + b) * PAGE_SIZE) as u64)
                })
            })
    }
}

fn pages_of(r: &MemoryRange) -> usize {
    (r.size / PAGE_SIZE as u64) as usize
}

/// Iterates the set bits of a word, lowest first.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges() -> Vec<MemoryRange> {
        vec![
            MemoryRange {
                guest_addr: 0,
                size: 70 * 4096,
            },
            MemoryRange {
                guest_addr: 1 << 32,
                size: 3 * 4096,
            },
        ]
    }

    #[test]
    fn set_all_counts_every_page_once() {
        let mut b = DirtyBitmap::new(&ranges());
        b.set_all();
        assert_eq!(b.count(), 73);
        let a: Vec<u64> = b.addrs().collect();
        assert_eq!(a.len(), 73);
        assert_eq!(a[69], 69 * 4096);
        assert_eq!(a[70], 1 << 32);
    }

    #[test]
    fn or_ignores_bits_past_the_range() {
        let mut b = DirtyBitmap::new(&ranges());
        b.or_range_words(1, &[u64::MAX]);
        assert_eq!(b.count(), 3);
        b.set_addr(5 * 4096 + 17);
        assert_eq!(b.addrs().next(), Some(5 * 4096));
        b.set_addr(1 << 40);
        assert_eq!(b.count(), 4);
        b.clear();
        assert_eq!(b.count(), 0);
    }
}
