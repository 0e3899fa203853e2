//! A VM's shared-memory window (docs/VHOST-USER.md §4): which ranges of it hold which open
//! section. First fit over page-granular ranges; each open reserves its section's max size
//! so that a GROW maps the new pages right after the old ones.

use std::collections::BTreeMap;

/// Ranges of one VM's window in use, by window offset.
#[derive(Debug)]
pub struct Window {
    size: u64,
    page: u64,
    /// Offset → length (page multiples).
    used: BTreeMap<u64, u64>,
}

impl Window {
    /// A window of `size` bytes handed out in multiples of `page` (a power of two).
    pub fn new(size: u64, page: u64) -> Window {
        Window {
            size: size & !(page - 1),
            page,
            used: BTreeMap::new(),
        }
    }

    /// `len` rounded up to the page (`None` on overflow or 0).
    pub fn round(&self, len: u64) -> Option<u64> {
        let r = len.checked_add(self.page - 1)? & !(self.page - 1);
        (r > 0).then_some(r)
    }

    /// Reserves `len` bytes (rounded up to the page) at the lowest offset that fits.
    pub fn reserve(&mut self, len: u64) -> Option<(u64, u64)> {
        let len = self.round(len)?;
        let mut at = 0u64;
        for (&o, &l) in &self.used {
            if o.checked_sub(at)? >= len {
                break;
            }
            at = o + l;
        }
        let end = at.checked_add(len)?;
        if end > self.size {
            return None;
        }
        self.used.insert(at, len);
        Some((at, len))
    }

    /// Frees the range reserved at `offset`; its length, if there was one.
    pub fn release(&mut self, offset: u64) -> Option<u64> {
        self.used.remove(&offset)
    }

    /// Bytes reserved.
    pub fn used(&self) -> u64 {
        self.used.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::Window;

    #[test]
    fn ranges_are_page_rounded_first_fit_and_never_overlap_or_leave_the_window() {
        let mut w = Window::new(64 << 10, 4096);
        assert_eq!(w.reserve(1), Some((0, 4096)));
        assert_eq!(w.reserve(8192), Some((4096, 8192)));
        assert_eq!(w.reserve(4097), Some((12288, 8192)));
        assert_eq!(w.release(4096), Some(8192));
        // The hole is reused by what fits in it, the rest goes after.
        assert_eq!(w.reserve(4096), Some((4096, 4096)));
        assert_eq!(w.reserve(8192), Some((20480, 8192)));
        assert_eq!(w.reserve(64 << 10), None, "larger than what is left");
        assert_eq!(w.reserve(0), None);
        assert_eq!(w.reserve(u64::MAX), None);
        assert_eq!(w.release(12345), None);
        assert_eq!(w.used(), 4096 * 2 + 8192 * 2);
    }
}
