//! The heap's space map: first-fit extents with coalescing, in the backend's private memory.

use std::collections::BTreeMap;

use vshm_format::RegionOffset;

/// Free extents of the heap (offset → length), all multiples of the alignment.
#[derive(Debug, Clone)]
pub struct Heap {
    free: BTreeMap<RegionOffset, u64>,
    alignment: u64,
    size: u64,
    free_bytes: u64,
}

impl Heap {
    /// A heap covering `[offset, offset+size)`, allocating in multiples of `alignment`
    /// (a power of two; `offset` is aligned to it).
    pub fn new(offset: RegionOffset, size: u64, alignment: u64) -> Heap {
        let usable = size & !(alignment - 1);
        let mut free = BTreeMap::new();
        if usable > 0 {
            free.insert(offset, usable);
        }
        Heap {
            free,
            alignment,
            size: usable,
            free_bytes: usable,
        }
    }

    /// A heap over the same range whose free extents are `free` (another process's space
    /// map, checked by the caller to lie in the heap without overlaps).
    pub fn with_free(
        offset: RegionOffset,
        size: u64,
        alignment: u64,
        free: impl IntoIterator<Item = (RegionOffset, u64)>,
    ) -> Heap {
        let mut heap = Heap::new(offset, size, alignment);
        heap.free = free.into_iter().filter(|&(_, l)| l > 0).collect();
        heap.free_bytes = heap.free.values().sum();
        heap
    }

    /// Rounds a request up to the allocation granularity (`None` on overflow).
    pub fn round(&self, len: u64) -> Option<u64> {
        len.checked_add(self.alignment - 1)
            .map(|v| v & !(self.alignment - 1))
    }

    /// Reserves `len` bytes (rounded up); returns the offset and the rounded length.
    pub fn allocate(&mut self, len: u64) -> Option<(RegionOffset, u64)> {
        let len = self.round(len)?;
        if len == 0 {
            return None;
        }
        let (&off, &ext) = self.free.iter().find(|(_, &ext)| ext >= len)?;
        self.free.remove(&off);
        if ext > len {
            self.free.insert(RegionOffset(off.0 + len), ext - len);
        }
        self.free_bytes -= len;
        Some((off, len))
    }

    /// Reserves exactly `[offset, offset + len)` if it lies inside one free extent (`len`
    /// a multiple of the alignment); false, changing nothing, otherwise. For an extent the
    /// space map must learn of after the fact (an object published just before a crash,
    /// `crate::fdstore`).
    pub fn take_range(&mut self, offset: RegionOffset, len: u64) -> bool {
        if len == 0 || len % self.alignment != 0 || offset.0 % self.alignment != 0 {
            return false;
        }
        let Some((&start, &ext)) = self.free.range(..=offset).next_back() else {
            return false;
        };
        let (Some(end), Some(ext_end)) = (offset.0.checked_add(len), start.0.checked_add(ext))
        else {
            return false;
        };
        if end > ext_end {
            return false;
        }
        self.free.remove(&start);
        if offset.0 > start.0 {
            self.free.insert(start, offset.0 - start.0);
        }
        if ext_end > end {
            self.free.insert(RegionOffset(end), ext_end - end);
        }
        self.free_bytes -= len;
        true
    }

    /// Returns an extent from [`Heap::allocate`] (same offset and rounded length).
    pub fn release(&mut self, offset: RegionOffset, len: u64) {
        let mut start = offset;
        let mut end = RegionOffset(offset.0 + len);
        if let Some((&prev, &plen)) = self.free.range(..offset).next_back() {
            if prev.0 + plen == offset.0 {
                self.free.remove(&prev);
                start = prev;
            }
        }
        if let Some(next_len) = self.free.remove(&end) {
            end.0 += next_len;
        }
        self.free.insert(start, end.0 - start.0);
        self.free_bytes += len;
    }

    /// Bytes free.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Usable heap bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Largest free extent.
    pub fn largest_free(&self) -> u64 {
        self.free.values().copied().max().unwrap_or(0)
    }

    /// The free extents, (offset, length), in address order.
    pub fn extents(&self) -> impl Iterator<Item = (RegionOffset, u64)> + '_ {
        self.free.iter().map(|(&o, &l)| (o, l))
    }

    /// Number of free extents (1 = unfragmented).
    pub fn free_extents(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocations_are_aligned_and_released_space_coalesces() {
        let mut h = Heap::new(RegionOffset(0x10000), 0x10000, 0x1000);
        let (a, la) = h.allocate(1).expect("fits");
        let (b, lb) = h.allocate(0x1001).expect("fits");
        let (c, lc) = h.allocate(0x1000).expect("fits");
        assert_eq!((a, la), (RegionOffset(0x10000), 0x1000));
        assert_eq!((b, lb), (RegionOffset(0x11000), 0x2000));
        assert_eq!((c, lc), (RegionOffset(0x13000), 0x1000));
        h.release(b, lb);
        assert_eq!(h.free_extents(), 2);
        h.release(a, la);
        h.release(c, lc);
        assert_eq!(h.free_extents(), 1);
        assert_eq!(h.free_bytes(), 0x10000);
        assert_eq!(h.largest_free(), 0x10000);
    }

    #[test]
    fn a_request_larger_than_any_extent_fails_without_changing_the_map() {
        let mut h = Heap::new(RegionOffset(0), 0x4000, 0x1000);
        assert!(h.allocate(0x5000).is_none());
        assert!(h.allocate(u64::MAX).is_none());
        assert!(h.allocate(0).is_none());
        assert_eq!(h.free_bytes(), 0x4000);
    }

    proptest! {
        #[test]
        fn random_allocate_release_never_overlaps_and_ends_fully_free(
            ops in proptest::collection::vec((1u64..0x5000, any::<bool>()), 1..200)
        ) {
            let mut h = Heap::new(RegionOffset(0x1000), 0x40000, 0x1000);
            let mut live: Vec<(RegionOffset, u64)> = Vec::new();
            for (len, free_one) in ops {
                if free_one && !live.is_empty() {
                    let (o, l) = live.remove(0);
                    h.release(o, l);
                } else if let Some((o, l)) = h.allocate(len) {
                    for &(o2, l2) in &live {
                        prop_assert!(o.0 + l <= o2.0 || o2.0 + l2 <= o.0, "overlap");
                    }
                    prop_assert!(o.0 >= 0x1000 && o.0 + l <= 0x41000);
                    live.push((o, l));
                }
                let used: u64 = live.iter().map(|x| x.1).sum();
                prop_assert_eq!(h.free_bytes() + used, 0x40000);
            }
            for (o, l) in live.drain(..) {
                h.release(o, l);
            }
            prop_assert_eq!(h.free_extents(), 1);
            prop_assert_eq!(h.free_bytes(), 0x40000);
        }
    }

    #[test]
    fn a_range_is_taken_only_from_inside_one_free_extent() {
        let mut h = Heap::new(RegionOffset(4096), 16 * 4096, 4096);
        assert!(h.take_range(RegionOffset(8192), 8192));
        assert_eq!(h.free_bytes(), 14 * 4096);
        assert!(
            !h.take_range(RegionOffset(4096), 8192),
            "overlaps the taken range"
        );
        assert!(
            !h.take_range(RegionOffset(4096 * 16), 8192),
            "runs past the heap"
        );
        assert!(!h.take_range(RegionOffset(4097), 4096), "misaligned");
        assert!(h.take_range(RegionOffset(4096), 4096));
        assert_eq!(
            h.extents().collect::<Vec<_>>(),
            vec![(RegionOffset(16384), 13 * 4096)]
        );
    }
}
