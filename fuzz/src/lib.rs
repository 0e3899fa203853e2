//! Helpers shared by the fuzz targets: plain memory standing in for a region, and the
//! few layouts the targets validate against.

use std::ptr::NonNull;

use vshm_format::layout::Layout;
use vshm_format::shm::{bytes_of_mut, zeroed, Pod, RawRegion};

/// Zeroed, 8-aligned memory of a fixed size, seen as a region through [`RawRegion`].
#[derive(Debug)]
pub struct Buf(Vec<u64>);

impl Buf {
    /// `bytes` (rounded up to 8) of zeroes.
    pub fn new(bytes: usize) -> Buf {
        Buf(vec![0u64; bytes.div_ceil(8)])
    }

    /// The memory as a region. Borrowing `self` mutably keeps the Vec alive and unaliased.
    pub fn region(&mut self) -> RawRegion<'_> {
        let len = self.0.len() as u64 * 8;
        let base = NonNull::new(self.0.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: the Vec outlives the region (borrowed mutably for its lifetime), is
        // 8-aligned and `len` bytes long.
        unsafe { RawRegion::new(base, len) }
    }
}

/// Layouts to validate against, picked by a selector byte: the test arbiter's small
/// region, vshmd's default, and a large-page one with a tight header.
pub fn layout(selector: u8) -> Layout {
    let (size, peers, objects, vectors, align) = match selector % 3 {
        0 => (1 << 20, 4, 8, 1, 4096),
        1 => (64 << 20, 32, 1024, 2, 4096),
        _ => (1 << 30, 62, 65_536, 64, 2 << 20),
    };
    Layout::compute(size, peers, objects, vectors, align).expect("fixed layout is valid")
}

/// The first `N` bytes of `data`, zero-padded.
pub fn prefix<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    out
}

/// A plain-data structure from the first bytes of `data` (zero-padded if short).
pub fn pod_from<T: Pod>(data: &[u8]) -> T {
    let mut v = zeroed::<T>();
    let b = bytes_of_mut(&mut v);
    let n = data.len().min(b.len());
    b[..n].copy_from_slice(&data[..n]);
    v
}
