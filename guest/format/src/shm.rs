//! Access to memory that another party can write.
//!
//! Nothing in this project forms a `&T` or `&[u8]` into the shared region: every read is a
//! volatile or atomic copy into a local, every write a volatile or atomic store, and every
//! access is bounds- and alignment-checked against the mapping. [`SharedMemory`] is the seam:
//! [`RawRegion`] implements it over a raw mapping (guests, host peers, kernel drivers), the
//! backend implements it over vm-memory.

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// An access that would leave the mapping or is misaligned for an atomic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `[offset, offset+len)` is not inside the mapping.
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// An atomic access at an offset not aligned to its size.
    Misaligned {
        /// Requested offset.
        offset: u64,
    },
}

impl core::fmt::Display for Fault {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Fault::OutOfBounds { offset, len } => {
                write!(
                    f,
                    "access of {len} bytes at {offset:#x} is outside the region"
                )
            }
            Fault::Misaligned { offset } => write!(f, "misaligned atomic access at {offset:#x}"),
        }
    }
}

/// Bounds- and alignment-checked volatile/atomic access to a shared region.
pub trait SharedMemory {
    /// Mapped size in bytes.
    fn size(&self) -> u64;
    /// Atomic load of a u32.
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault>;
    /// Atomic load of a u64.
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault>;
    /// Atomic store of a u32.
    fn store_u32(&self, offset: u64, value: u32, order: Ordering) -> Result<(), Fault>;
    /// Atomic store of a u64.
    fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<(), Fault>;
    /// Sequentially consistent compare-and-exchange of a u32.
    fn cas_u32(&self, offset: u64, current: u32, new: u32) -> Result<Result<u32, u32>, Fault>;
    /// Sequentially consistent compare-and-exchange of a u64.
    fn cas_u64(&self, offset: u64, current: u64, new: u64) -> Result<Result<u64, u64>, Fault>;
    /// Sequentially consistent fetch-and of a u64, returning the previous value.
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, Fault>;
    /// Sequentially consistent fetch-or of a u64, returning the previous value.
    fn fetch_or_u64(&self, offset: u64, bits: u64) -> Result<u64, Fault>;
    /// Volatile copy out of the region.
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault>;
    /// Volatile copy into the region.
    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), Fault>;
    /// Volatile fill with zeroes.
    fn zero(&self, offset: u64, len: u64) -> Result<(), Fault> {
        const ZEROES: [u8; 256] = [0; 256];
        let mut done = 0u64;
        while done < len {
            let chunk = usize::try_from(len - done).map_or(ZEROES.len(), |r| r.min(ZEROES.len()));
            let at = offset
                .checked_add(done)
                .ok_or(Fault::OutOfBounds { offset, len })?;
            self.write_bytes(at, &ZEROES[..chunk])?;
            done += chunk as u64;
        }
        Ok(())
    }
}

/// Checks `[offset, offset+len)` against `size` with checked arithmetic.
pub fn check_range(size: u64, offset: u64, len: u64) -> Result<(), Fault> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Fault::OutOfBounds { offset, len }),
    }
}

/// Plain old data: every bit pattern is a valid value and the bytes fully describe it (no
/// padding, no pointers, no interior mutability). zerocopy checks this when the traits are
/// derived (see [`crate::layout`]), so there is nothing unsafe to implement by hand: every
/// type that derives them is `Pod`.
pub trait Pod: FromBytes + IntoBytes + Immutable + KnownLayout + Copy + 'static {}

impl<T: FromBytes + IntoBytes + Immutable + KnownLayout + Copy + 'static> Pod for T {}

/// A zero-initialised value of a [`Pod`] type.
pub fn zeroed<T: Pod>() -> T {
    T::new_zeroed()
}

/// The bytes of a [`Pod`] value.
pub fn bytes_of<T: Pod>(value: &T) -> &[u8] {
    value.as_bytes()
}

/// The bytes of a [`Pod`] value, writable: any bytes written form a valid `T`.
pub fn bytes_of_mut<T: Pod>(value: &mut T) -> &mut [u8] {
    value.as_mut_bytes()
}

/// Copies a `T` out of the region (volatile, bounds-checked). The copy is *unvalidated*.
pub fn read_pod<T: Pod, M: SharedMemory + ?Sized>(mem: &M, offset: u64) -> Result<T, Fault> {
    let mut value = zeroed::<T>();
    mem.read_bytes(offset, bytes_of_mut(&mut value))?;
    Ok(value)
}

/// A raw mapping of a shared region: base pointer and length, borrowed from whatever owns
/// the mapping (`'a`), so safe code cannot keep using it after an unmap.
///
/// This is the one place in the guest side that touches the region through pointers.
#[derive(Debug, Clone, Copy)]
pub struct RawRegion<'a> {
    base: NonNull<u8>,
    len: u64,
    _mapping: PhantomData<&'a ()>,
}

// SAFETY: RawRegion is an address range; every access through it is atomic or volatile,
// and the region is shared memory designed for concurrent access from many parties.
unsafe impl Send for RawRegion<'_> {}
// SAFETY: as above.
unsafe impl Sync for RawRegion<'_> {}

impl<'a> RawRegion<'a> {
    /// Wraps a mapping.
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `len` bytes, aligned to at least 8, for
    /// all of `'a` (the caller picks `'a` no longer than the mapping lives). Other parties may
    /// write the memory at any time; this type never creates references into it.
    pub unsafe fn new(base: NonNull<u8>, len: u64) -> RawRegion<'a> {
        RawRegion {
            base,
            len,
            _mapping: PhantomData,
        }
    }

    /// The base address, for callers that hand out raw pointers to section data.
    pub fn base(&self) -> NonNull<u8> {
        self.base
    }

    fn ptr(&self, offset: u64, len: u64, align: u64) -> Result<*mut u8, Fault> {
        check_range(self.len, offset, len)?;
        if offset % align != 0 {
            return Err(Fault::Misaligned { offset });
        }
        let offset = usize::try_from(offset).map_err(|_| Fault::OutOfBounds { offset, len })?;
        // SAFETY: offset + len ≤ self.len, so the result stays inside the mapping that
        // `new`'s caller guaranteed valid.
        Ok(unsafe { self.base.as_ptr().add(offset) })
    }

    fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, Fault> {
        let p = self.ptr(offset, 4, 4)?;
        // SAFETY: p is in bounds, 4-aligned and valid for the mapping's lifetime (see `new`);
        // all concurrent access to shared words is atomic or volatile by protocol.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, Fault> {
        let p = self.ptr(offset, 8, 8)?;
        // SAFETY: as in atomic_u32, with 8-byte alignment checked.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }
}

impl SharedMemory for RawRegion<'_> {
    fn size(&self) -> u64 {
        self.len
    }
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault> {
        Ok(self.atomic_u32(offset)?.load(order))
    }
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault> {
        Ok(self.atomic_u64(offset)?.load(order))
    }
    fn store_u32(&self, offset: u64, value: u32, order: Ordering) -> Result<(), Fault> {
        self.atomic_u32(offset)?.store(value, order);
        Ok(())
    }
    fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<(), Fault> {
        self.atomic_u64(offset)?.store(value, order);
        Ok(())
    }
    fn cas_u32(&self, offset: u64, current: u32, new: u32) -> Result<Result<u32, u32>, Fault> {
        Ok(self.atomic_u32(offset)?.compare_exchange(
            current,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ))
    }
    fn cas_u64(&self, offset: u64, current: u64, new: u64) -> Result<Result<u64, u64>, Fault> {
        Ok(self.atomic_u64(offset)?.compare_exchange(
            current,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ))
    }
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, Fault> {
        Ok(self.atomic_u64(offset)?.fetch_and(mask, Ordering::SeqCst))
    }
    fn fetch_or_u64(&self, offset: u64, bits: u64) -> Result<u64, Fault> {
        Ok(self.atomic_u64(offset)?.fetch_or(bits, Ordering::SeqCst))
    }
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let src = self.ptr(offset, buf.len() as u64, 1)?;
        // Byte loads up to an 8-byte boundary, then word loads, then bytes: volatile all
        // the way (no memcpy the compiler could merge or elide), but not byte by byte.
        let head = src.align_offset(8).min(buf.len());
        let words = (buf.len() - head) / 8;
        for (i, b) in buf[..head].iter_mut().enumerate() {
            // SAFETY: src + i < src + buf.len(), inside the range `ptr` checked.
            *b = unsafe { src.add(i).read_volatile() };
        }
        for w in 0..words {
            let at = head + w * 8;
            // SAFETY: [at, at + 8) lies inside the checked range and src + at is 8-aligned
            // (head brought it to the boundary).
            let word = unsafe { src.add(at).cast::<u64>().read_volatile() };
            buf[at..at + 8].copy_from_slice(&word.to_ne_bytes());
        }
        let tail = head + words * 8;
        for (i, b) in buf.iter_mut().enumerate().skip(tail) {
            // SAFETY: as for the head bytes.
            *b = unsafe { src.add(i).read_volatile() };
        }
        Ok(())
    }
    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        let dst = self.ptr(offset, data.len() as u64, 1)?;
        let head = dst.align_offset(8).min(data.len());
        let words = (data.len() - head) / 8;
        for (i, b) in data[..head].iter().enumerate() {
            // SAFETY: dst + i is inside the checked range.
            unsafe { dst.add(i).write_volatile(*b) };
        }
        for w in 0..words {
            let at = head + w * 8;
            let mut word = [0u8; 8];
            word.copy_from_slice(&data[at..at + 8]);
            // SAFETY: [at, at + 8) lies inside the checked range and dst + at is 8-aligned.
            unsafe {
                dst.add(at)
                    .cast::<u64>()
                    .write_volatile(u64::from_ne_bytes(word))
            };
        }
        for (i, b) in data.iter().enumerate().skip(head + words * 8) {
            // SAFETY: dst + i is inside the checked range.
            unsafe { dst.add(i).write_volatile(*b) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(8))]
    struct Buf([u8; 64]);

    #[test]
    fn copies_at_every_alignment_and_length_move_exactly_the_bytes_asked_for() {
        let mut buf = Buf([0; 64]);
        let base = NonNull::new(buf.0.as_mut_ptr()).expect("non-null");
        // SAFETY: buf outlives region and is 8-aligned, 64 bytes long.
        let region = unsafe { RawRegion::new(base, 64) };
        let pattern: Vec<u8> = (1..=40).collect();
        for start in 0..8u64 {
            for len in 0..=24usize {
                region.zero(0, 64).expect("zero");
                region
                    .write_bytes(start + 8, &pattern[..len])
                    .expect("write");
                let mut all = [0u8; 64];
                region.read_bytes(0, &mut all).expect("read");
                let at = usize::try_from(start).expect("small") + 8;
                assert!(all[..at].iter().all(|&b| b == 0), "nothing before");
                assert_eq!(&all[at..at + len], &pattern[..len]);
                assert!(all[at + len..].iter().all(|&b| b == 0), "nothing after");
                let mut back = vec![0u8; len];
                region.read_bytes(start + 8, &mut back).expect("read");
                assert_eq!(back, &pattern[..len]);
            }
        }
    }

    #[test]
    fn accesses_outside_the_mapping_or_misaligned_fault_instead_of_touching_memory() {
        let mut buf = Buf([0; 64]);
        let base = NonNull::new(buf.0.as_mut_ptr()).expect("non-null");
        // SAFETY: buf outlives region and is 8-aligned, 64 bytes long.
        let region = unsafe { RawRegion::new(base, 64) };
        assert_eq!(
            region.load_u64(60, Ordering::SeqCst),
            Err(Fault::OutOfBounds { offset: 60, len: 8 })
        );
        assert_eq!(
            region.load_u64(4, Ordering::SeqCst),
            Err(Fault::Misaligned { offset: 4 })
        );
        assert_eq!(
            region.read_bytes(u64::MAX, &mut [0; 2]),
            Err(Fault::OutOfBounds {
                offset: u64::MAX,
                len: 2
            })
        );
        region
            .store_u64(8, 0x1122, Ordering::SeqCst)
            .expect("in bounds");
        assert_eq!(region.fetch_or_u64(8, 1), Ok(0x1122));
        assert_eq!(region.cas_u64(8, 0x1123, 5), Ok(Ok(0x1123)));
        assert_eq!(region.cas_u64(8, 0, 6), Ok(Err(5)));
        region.write_bytes(16, b"hello").expect("in bounds");
        let mut out = [0u8; 5];
        region.read_bytes(16, &mut out).expect("in bounds");
        assert_eq!(&out, b"hello");
        region.zero(16, 5).expect("in bounds");
        region.read_bytes(16, &mut out).expect("in bounds");
        assert_eq!(out, [0; 5]);
    }
}
