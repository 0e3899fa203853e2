//! The name area's space map (docs/FORMAT.md §5b), in the backend's private memory: which
//! granules of the host-written name area hold the name of a LIVE or UNLINKED object.
//!
//! It is the heap's allocator ([`crate::heap::Heap`]: first-fit extents with coalescing)
//! over area-relative offsets with an 8-byte granule: the same operations (allocate,
//! release, take an exact range when adopting) on a smaller unit, so there is one
//! allocator to trust. Only [`NameArea::adopt`] sees offsets that did not come from the
//! allocator itself (a journal, an entry published before a crash): it refuses a range
//! that is outside the area, misaligned or overlapping one already taken, and says which.

use vshm_format::layout::{MAX_NAME_BYTES, NAME_GRANULE};
use vshm_format::RegionOffset;

use crate::heap::Heap;

/// Why a name range cannot be adopted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameAreaError {
    /// The length is 0 or over [`MAX_NAME_BYTES`].
    #[error("a name of {len} bytes (names are 1..={MAX_NAME_BYTES} bytes)")]
    BadLength {
        /// The length found.
        len: usize,
    },
    /// The offset is not a multiple of the granule.
    #[error("name offset {off:#x} is not a multiple of {NAME_GRANULE}")]
    Misaligned {
        /// The offset found.
        off: u32,
    },
    /// The range does not lie inside the area.
    #[error("name [{off:#x}, +{len}) is outside the name area of {size} bytes")]
    OutOfBounds {
        /// The offset found.
        off: u32,
        /// The length found.
        len: usize,
        /// The area's size.
        size: u64,
    },
    /// Part of the range already holds another name.
    #[error("name [{off:#x}, +{len}) overlaps another name")]
    Overlaps {
        /// The offset found.
        off: u32,
        /// The length found.
        len: usize,
    },
    /// An object without a name claims a place in the area (readers refuse such an entry).
    #[error("an unnamed object with name offset {off:#x}")]
    UnnamedWithOffset {
        /// The offset found.
        off: u32,
    },
}

/// The free granules of the name area.
#[derive(Debug, Clone)]
pub struct NameArea {
    free: Heap,
    size: u64,
}

impl NameArea {
    /// An empty area of `size` bytes (a multiple of the granule, as `Layout` checks).
    pub fn new(size: u64) -> NameArea {
        NameArea {
            free: Heap::new(RegionOffset(0), size, NAME_GRANULE),
            size,
        }
    }

    /// Bytes a name of `len` bytes takes (its length rounded up to the granule).
    pub fn rounded(len: usize) -> u64 {
        (len as u64).div_ceil(NAME_GRANULE) * NAME_GRANULE
    }

    /// Takes room for a name of `len` bytes (1..=[`MAX_NAME_BYTES`]); its area offset, or
    /// `None` if no free run is long enough (nothing changes then).
    pub fn allocate(&mut self, len: usize) -> Option<u32> {
        if len == 0 || len > MAX_NAME_BYTES {
            return None;
        }
        let (off, _) = self.free.allocate(len as u64)?;
        match u32::try_from(off.raw()) {
            Ok(o) => Some(o),
            Err(_) => {
                // Cannot happen (the area is at most MAX_NAME_AREA < 4 GiB); undo anyway.
                self.free.release(off, Self::rounded(len));
                None
            }
        }
    }

    /// Returns the room of a name from [`NameArea::allocate`] or [`NameArea::adopt`].
    pub fn release(&mut self, off: u32, len: usize) {
        self.free
            .release(RegionOffset(u64::from(off)), Self::rounded(len));
    }

    /// Takes exactly the room of a name already in the area (offset `off`, `len` bytes), if
    /// it is inside the area, aligned, and free; else says why, changing nothing.
    pub fn adopt(&mut self, off: u32, len: usize) -> Result<(), NameAreaError> {
        if len == 0 || len > MAX_NAME_BYTES {
            return Err(NameAreaError::BadLength { len });
        }
        if u64::from(off) % NAME_GRANULE != 0 {
            return Err(NameAreaError::Misaligned { off });
        }
        let rounded = Self::rounded(len);
        let inside = u64::from(off)
            .checked_add(rounded)
            .is_some_and(|end| end <= self.size);
        if !inside {
            return Err(NameAreaError::OutOfBounds {
                off,
                len,
                size: self.size,
            });
        }
        if self.free.take_range(RegionOffset(u64::from(off)), rounded) {
            Ok(())
        } else {
            Err(NameAreaError::Overlaps { off, len })
        }
    }

    /// Bytes free.
    pub fn free_bytes(&self) -> u64 {
        self.free.free_bytes()
    }

    /// The area's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The longest free run.
    pub fn largest_free(&self) -> u64 {
        self.free.largest_free()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_take_whole_granules_and_their_room_comes_back_when_released() {
        let mut a = NameArea::new(64);
        assert_eq!(a.allocate(1), Some(0));
        assert_eq!(a.allocate(9), Some(8), "one granule for 1 byte");
        assert_eq!(a.free_bytes(), 64 - 8 - 16);
        assert_eq!(a.allocate(41), None, "40 bytes left");
        assert_eq!(a.free_bytes(), 40, "a refused allocation changes nothing");
        a.release(0, 1);
        a.release(8, 9);
        assert_eq!(a.free_bytes(), 64);
        assert_eq!(a.largest_free(), 64, "coalesced");
        assert_eq!(a.allocate(64), Some(0));
    }

    #[test]
    fn an_empty_or_overlong_name_gets_no_room() {
        let mut a = NameArea::new(4096);
        assert_eq!(a.allocate(0), None);
        assert_eq!(a.allocate(MAX_NAME_BYTES + 1), None);
        assert_eq!(a.allocate(MAX_NAME_BYTES), Some(0));
    }

    #[test]
    fn adopting_refuses_ranges_outside_misaligned_overlapping_or_overlong_and_says_which() {
        let mut a = NameArea::new(64);
        assert_eq!(a.adopt(8, 10), Ok(()));
        assert_eq!(
            a.adopt(16, 4),
            Err(NameAreaError::Overlaps { off: 16, len: 4 }),
            "[8, 24) is taken"
        );
        assert_eq!(a.adopt(4, 4), Err(NameAreaError::Misaligned { off: 4 }));
        assert_eq!(
            a.adopt(56, 9),
            Err(NameAreaError::OutOfBounds {
                off: 56,
                len: 9,
                size: 64
            })
        );
        assert_eq!(
            a.adopt(0xFFFF_FFF8, 8),
            Err(NameAreaError::OutOfBounds {
                off: 0xFFFF_FFF8,
                len: 8,
                size: 64
            })
        );
        assert_eq!(
            a.adopt(0, MAX_NAME_BYTES + 1),
            Err(NameAreaError::BadLength {
                len: MAX_NAME_BYTES + 1
            })
        );
        assert_eq!(a.free_bytes(), 64 - 16, "refusals change nothing");
        assert_eq!(a.adopt(24, 40), Ok(()));
        assert_eq!(a.allocate(8), Some(0));
        assert_eq!(a.allocate(8), None);
    }

    #[test]
    fn an_area_of_size_zero_holds_no_name() {
        let mut a = NameArea::new(0);
        assert_eq!(a.allocate(1), None);
        assert!(a.adopt(0, 1).is_err());
    }
}
