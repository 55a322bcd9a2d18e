//! Tables of guest-physical ranges: what a migration iteration sends. A `RangeTable` is always
//! sorted by address, its ranges never overlap and never touch (adjacent ranges are coalesced), so
//! a table built from a dirty bitmap has one entry per run of dirty pages.

use crate::memory::PAGE_SIZE;

const PAGE_SHIFT: u32 = 12;
const _: () = assert!(1 << PAGE_SHIFT == PAGE_SIZE);

/// `len` bytes of guest-physical memory from `gpa` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub gpa: u64,
    pub len: u64,
}

impl Range {
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeTable {
    ranges: Vec<Range>,
}

impl RangeTable {
    pub fn new() -> Self {
        RangeTable { ranges: Vec::new() }
    }

    /// One range per run of set bits; bit `i` of word `w` is the page at
    /// `base_gpa + (64 * w + i) * 4096`.
    pub fn from_bitmap(bitmap: &[u64], base_gpa: u64) -> Self {
        let mut table = RangeTable::new();
        table.append_bitmap(bitmap, base_gpa);
        table
    }

    /// Adds the runs of set bits of `bitmap` (as in `from_bitmap`). Cheapest when `base_gpa` lies
    /// at or after the end of the table (one slot after another); otherwise it merges.
    pub fn append_bitmap(&mut self, bitmap: &[u64], base_gpa: u64) {
        if self.ranges.last().is_some_and(|last| last.end() > base_gpa) {
            let other = RangeTable::from_bitmap(bitmap, base_gpa);
            self.merge(&other);
            return;
        }
        // Page number (relative to base_gpa) where the open run started, if one is open.
        let mut run_start: Option<u64> = None;
        for (w, &word) in bitmap.iter().enumerate() {
            let word_page = (w as u64) << 6;
            if word == 0 {
                if let Some(start) = run_start.take() {
                    self.push_page_run(base_gpa, start, word_page);
                }
                continue;
            }
            if word == u64::MAX {
                run_start.get_or_insert(word_page);
                continue;
            }
            let mut bit = 0u32;
            while bit < 64 {
                let rest = word >> bit;
                match run_start {
                    Some(start) => {
                        // Bits above 63 - bit shifted in as zeros, so this stops inside the word
                        // unless the run reaches its top bit.
                        let ones = rest.trailing_ones();
                        if bit + ones >= 64 {
                            break; // the run continues into the next word
                        }
                        bit += ones;
                        self.push_page_run(base_gpa, start, word_page + bit as u64);
                        run_start = None;
                    }
                    None => {
                        if rest == 0 {
                            break;
                        }
                        bit += rest.trailing_zeros();
                        run_start = Some(word_page + bit as u64);
                    }
                }
            }
        }
        if let Some(start) = run_start {
            self.push_page_run(base_gpa, start, (bitmap.len() as u64) << 6);
        }
    }

    fn push_page_run(&mut self, base_gpa: u64, first: u64, end: u64) {
        self.push_after(
            base_gpa + (first << PAGE_SHIFT),
            (end - first) << PAGE_SHIFT,
        );
    }

    /// Appends a range that starts at or after the end of the last one.
    fn push_after(&mut self, gpa: u64, len: u64) {
        match self.ranges.last_mut() {
            Some(last) if last.end() == gpa => last.len += len,
            _ => self.ranges.push(Range { gpa, len }),
        }
    }

    /// Adds `len` bytes at `gpa` (anywhere; overlaps are merged).
    pub fn push(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        if self.ranges.last().is_none_or(|last| last.end() <= gpa) {
            self.push_after(gpa, len);
        } else {
            self.merge(&RangeTable {
                ranges: vec![Range { gpa, len }],
            });
        }
    }

    /// Union with `other`.
    pub fn merge(&mut self, other: &RangeTable) {
        let Some(first) = other.ranges.first() else {
            return;
        };
        if self
            .ranges
            .last()
            .is_none_or(|last| last.end() <= first.gpa)
        {
            for r in &other.ranges {
                self.push_after(r.gpa, r.len);
            }
            return;
        }
        let mut out: Vec<Range> = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        let (mut a, mut b) = (
            self.ranges.iter().peekable(),
            other.ranges.iter().peekable(),
        );
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => {
                    if x.gpa <= y.gpa {
                        a.next()
                    } else {
                        b.next()
                    }
                }
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            let r = *next.expect("peeked");
            match out.last_mut() {
                Some(last) if last.end() >= r.gpa => {
                    let end = last.end().max(r.end());
                    last.len = end - last.gpa;
                }
                _ => out.push(r),
            }
        }
        self.ranges = out;
    }

    /// Union with `other`, consuming it.
    pub fn extend(&mut self, other: RangeTable) {
        if self.ranges.is_empty() {
            self.ranges = other.ranges;
        } else {
            self.merge(&other);
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn clear(&mut self) {
        self.ranges.clear();
    }

    /// Consecutive tables of at most `max_bytes` each (rounded down to whole pages, at least one
    /// page), in address order; a range that straddles a boundary is split there.
    pub fn split(&self, max_bytes: u64) -> Vec<RangeTable> {
        let max = (max_bytes & !(PAGE_SIZE - 1)).max(PAGE_SIZE);
        let mut out = Vec::new();
        let mut cur = RangeTable::new();
        let mut room = max;
        for r in &self.ranges {
            let (mut gpa, mut len) = (r.gpa, r.len);
            while len > 0 {
                let take = len.min(room);
                cur.ranges.push(Range { gpa, len: take });
                gpa += take;
                len -= take;
                room -= take;
                if room == 0 {
                    out.push(std::mem::take(&mut cur));
                    room = max;
                }
            }
        }
        if !cur.ranges.is_empty() {
            out.push(cur);
        }
        out
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Range> {
        self.ranges.iter()
    }

    pub fn as_slice(&self) -> &[Range] {
        &self.ranges
    }
}

impl<'a> IntoIterator for &'a RangeTable {
    type Item = &'a Range;
    type IntoIter = std::slice::Iter<'a, Range>;
    fn into_iter(self) -> Self::IntoIter {
        self.ranges.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn pairs(t: &RangeTable) -> Vec<(u64, u64)> {
        t.iter().map(|r| (r.gpa, r.len)).collect()
    }

    /// Bit-by-bit reference for from_bitmap.
    fn naive(bitmap: &[u64], base: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for page in 0..bitmap.len() as u64 * 64 {
            if bitmap[(page / 64) as usize] >> (page % 64) & 1 == 1 {
                let gpa = base + page * P;
                match out.last_mut() {
                    Some((g, l)) if *g + *l == gpa => *l += P,
                    _ => out.push((gpa, P)),
                }
            }
        }
        out
    }

    #[test]
    fn empty_bitmap_and_zero_words() {
        assert!(RangeTable::from_bitmap(&[], 0).is_empty());
        let t = RangeTable::from_bitmap(&[0, 0, 0, 0], 0x1000_0000);
        assert!(t.is_empty());
        assert_eq!(t.total_bytes(), 0);
        assert!(t.split(1 << 20).is_empty());
    }

    #[test]
    fn edge_bits() {
        let t = RangeTable::from_bitmap(&[1], 0);
        assert_eq!(pairs(&t), vec![(0, P)]);
        let t = RangeTable::from_bitmap(&[1 << 63], 0x10_0000);
        assert_eq!(pairs(&t), vec![(0x10_0000 + 63 * P, P)]);
        let t = RangeTable::from_bitmap(&[1 | 1 << 63], 0);
        assert_eq!(pairs(&t), vec![(0, P), (63 * P, P)]);
        let t = RangeTable::from_bitmap(&[0, 1 << 63], 0);
        assert_eq!(pairs(&t), vec![(127 * P, P)]);
    }

    #[test]
    fn full_words_and_runs_across_words() {
        let t = RangeTable::from_bitmap(&[u64::MAX], 0);
        assert_eq!(pairs(&t), vec![(0, 64 * P)]);
        let t = RangeTable::from_bitmap(&[u64::MAX, u64::MAX, 0, u64::MAX], 0);
        assert_eq!(pairs(&t), vec![(0, 128 * P), (192 * P, 64 * P)]);
        // A run from the top bit of word 0 through the bottom bits of word 1 (adjacent words).
        let t = RangeTable::from_bitmap(&[1 << 63, 0b111], 0);
        assert_eq!(pairs(&t), vec![(63 * P, 4 * P)]);
        // Full word in the middle of a run.
        let t = RangeTable::from_bitmap(&[0xc000_0000_0000_0000, u64::MAX, 0x1], 0);
        assert_eq!(pairs(&t), vec![(62 * P, 67 * P)]);
        // Runs ending exactly at a word end then a new run at the next word's bit 1.
        let t = RangeTable::from_bitmap(&[0xff00_0000_0000_0000, 0b10], 0);
        assert_eq!(pairs(&t), vec![(56 * P, 8 * P), (65 * P, P)]);
        assert_eq!(t.total_bytes(), 9 * P);
    }

    #[test]
    fn matches_naive_on_patterns() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let words: Vec<u64> = (0..(round % 9))
                .map(|_| match next() % 6 {
                    0 => 0,
                    1 => u64::MAX,
                    2 => next() & next(),
                    3 => !(1u64 << (next() % 64)),
                    4 => 1u64 << (next() % 64),
                    _ => next(),
                })
                .collect();
            let t = RangeTable::from_bitmap(&words, 0x4000_0000);
            assert_eq!(pairs(&t), naive(&words, 0x4000_0000), "words {words:x?}");
            assert_eq!(
                t.total_bytes(),
                words.iter().map(|w| w.count_ones() as u64).sum::<u64>() * P
            );
        }
    }

    #[test]
    fn append_bitmap_of_two_slots() {
        let mut t = RangeTable::from_bitmap(&[1 << 63], 0);
        t.append_bitmap(&[1], 64 * P); // touches: coalesced across slots
        t.append_bitmap(&[1], 0x1_0000_0000);
        assert_eq!(pairs(&t), vec![(63 * P, 2 * P), (0x1_0000_0000, P)]);
        // Out of order: merged.
        t.append_bitmap(&[0b110], 0);
        assert_eq!(
            pairs(&t),
            vec![(P, 2 * P), (63 * P, 2 * P), (0x1_0000_0000, P)]
        );
    }

    #[test]
    fn merge_and_extend() {
        let mut a = RangeTable::new();
        a.push(0, P);
        a.push(4 * P, 2 * P);
        a.push(10 * P, P);
        let mut b = RangeTable::new();
        b.push(P, P); // adjacent to a's first
        b.push(5 * P, 3 * P); // overlaps a's second
        b.push(20 * P, P);
        let mut m = a.clone();
        m.merge(&b);
        assert_eq!(
            pairs(&m),
            vec![(0, 2 * P), (4 * P, 4 * P), (10 * P, P), (20 * P, P)]
        );
        let mut e = b.clone();
        e.extend(a.clone());
        assert_eq!(e, m);
        // Merging a table into itself changes nothing; merging after the end appends.
        let mut s = m.clone();
        s.merge(&m);
        assert_eq!(s, m);
        let mut tail = RangeTable::new();
        tail.push(21 * P, P);
        tail.push(30 * P, P);
        s.merge(&tail);
        assert_eq!(
            pairs(&s),
            vec![
                (0, 2 * P),
                (4 * P, 4 * P),
                (10 * P, P),
                (20 * P, 2 * P),
                (30 * P, P)
            ]
        );
        // push in the middle, containing existing ranges.
        s.push(3 * P, 9 * P);
        assert_eq!(
            pairs(&s),
            vec![(0, 2 * P), (3 * P, 9 * P), (20 * P, 2 * P), (30 * P, P)]
        );
        let mut empty = RangeTable::new();
        empty.extend(s.clone());
        assert_eq!(empty, s);
        empty.merge(&RangeTable::new());
        assert_eq!(empty, s);
    }

    #[test]
    fn split_into_chunks() {
        let mut t = RangeTable::new();
        t.push(0, 3 * P);
        t.push(10 * P, 10 * P);
        t.push(100 * P, P);
        let chunks = t.split(4 * P);
        let got: Vec<Vec<(u64, u64)>> = chunks.iter().map(pairs).collect();
        assert_eq!(
            got,
            vec![
                vec![(0, 3 * P), (10 * P, P)],
                vec![(11 * P, 4 * P)],
                vec![(15 * P, 4 * P)],
                vec![(19 * P, P), (100 * P, P)],
            ]
        );
        assert!(chunks.iter().all(|c| c.total_bytes() <= 4 * P));
        assert_eq!(
            chunks.iter().map(|c| c.total_bytes()).sum::<u64>(),
            t.total_bytes()
        );
        // Odd sizes round down to pages; tiny ones become one page.
        assert_eq!(t.split(4 * P + 100).len(), 4);
        assert_eq!(t.split(1).len(), 14);
        // One chunk when everything fits.
        assert_eq!(t.split(1 << 30), vec![t.clone()]);
    }
}
