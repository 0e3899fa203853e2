//! Access to memory that another party can write.
//!
//! Nothing in this project forms a `&T` or `&[u8]` into the shared region: every read is a
//! volatile or atomic copy into a local, every write a volatile or atomic store, and every
//! access is bounds- and alignment-checked against the mapping. [`SharedMemory`] is the seam:
//! [`RawRegion`] implements it over a raw mapping (guests, host peers, kernel drivers), the
//! backend implements it over vm-memory.

use core::marker::PhantomData;
use core::ptr::NonNull;
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

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
    /// A store, compare-and-swap or fetch-op through a read-only view
    /// ([`RawRegion::read_only`]).
    ReadOnly {
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
            Fault::ReadOnly { offset } => {
                write!(
                    f,
                    "write at {offset:#x} through a read-only view of the region"
                )
            }
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
/// This is the one place in the guest side (and in `vshmctl inspect`) that touches the region
/// through pointers: all bounds and alignment checking lives here. A view made with
/// [`RawRegion::read_only`] (inspect's `PROT_READ` file mapping) refuses every store, CAS and
/// fetch-op with [`Fault::ReadOnly`] and loads only in ways that are defined on read-only
/// memory, so one checker serves both kinds of mapping.
#[derive(Debug, Clone, Copy)]
pub struct RawRegion<'a> {
    base: NonNull<u8>,
    len: u64,
    writable: bool,
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
            writable: true,
            _mapping: PhantomData,
        }
    }

    /// Wraps a mapping that may be read-only (e.g. `PROT_READ`): every store,
    /// compare-and-swap, fetch-op and byte write fails with [`Fault::ReadOnly`] without
    /// touching memory, and atomic loads are made `Relaxed` (followed by a fence for the
    /// ordering asked for), the only atomic loads defined on read-only memory.
    ///
    /// # Safety
    /// `base` must be valid for reads of `len` bytes, aligned to at least 8, for all of `'a`.
    /// Other parties may write the memory at any time; this type never creates references
    /// to plain data in it.
    pub unsafe fn read_only(base: NonNull<u8>, len: u64) -> RawRegion<'a> {
        RawRegion {
            base,
            len,
            writable: false,
            _mapping: PhantomData,
        }
    }

    /// Whether stores are allowed (made with [`RawRegion::new`]).
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The base address, for callers that hand out raw pointers to section data. Writing
    /// through it is allowed only if [`RawRegion::is_writable`].
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

    /// The word at `offset`, for a store or read-modify-write: refused on a read-only view.
    fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, Fault> {
        if !self.writable {
            return Err(Fault::ReadOnly { offset });
        }
        let p = self.ptr(offset, 4, 4)?;
        // SAFETY: p is in bounds, 4-aligned and valid for reads and writes for the mapping's
        // lifetime (see `new`; read-only views returned above); all concurrent access to
        // shared words is atomic or volatile by protocol.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// As [`Self::atomic_u32`], for a u64.
    fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, Fault> {
        if !self.writable {
            return Err(Fault::ReadOnly { offset });
        }
        let p = self.ptr(offset, 8, 8)?;
        // SAFETY: as in atomic_u32, with 8-byte alignment checked.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }

    /// A Relaxed load of the u32 at `offset` that is defined even on read-only memory.
    fn relaxed_load_u32(&self, offset: u64) -> Result<u32, Fault> {
        let p = self.ptr(offset, 4, 4)?;
        // SAFETY: p is in bounds and 4-aligned in a mapping readable for `'a`. A shared
        // reference to an atomic asserts only that the memory is readable, and a Relaxed
        // atomic load of at most the target's word size is documented to work on read-only
        // memory (core::sync::atomic, "Atomic accesses to read-only memory").
        Ok(unsafe { &*p.cast::<AtomicU32>() }.load(Ordering::Relaxed))
    }

    /// A Relaxed load of the u64 at `offset` that is defined even on read-only memory.
    #[cfg(target_pointer_width = "64")]
    fn relaxed_load_u64(&self, offset: u64) -> Result<u64, Fault> {
        let p = self.ptr(offset, 8, 8)?;
        // SAFETY: as in relaxed_load_u32, with 8-byte alignment checked; 8 bytes is the
        // word size here.
        Ok(unsafe { &*p.cast::<AtomicU64>() }.load(Ordering::Relaxed))
    }

    /// Where an 8-byte Relaxed load is not guaranteed to work on read-only memory: two
    /// 4-byte loads (a value being written at the same time may be torn; read-only views
    /// are for inspection, where that is acceptable).
    #[cfg(not(target_pointer_width = "64"))]
    fn relaxed_load_u64(&self, offset: u64) -> Result<u64, Fault> {
        self.ptr(offset, 8, 8)?;
        let lo = self.relaxed_load_u32(offset)?;
        let hi = self.relaxed_load_u32(offset + 4)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }
}

/// Orders a Relaxed load as the caller asked (acquire or stronger via a fence after it).
fn order_after_load(order: Ordering) {
    match order {
        Ordering::Relaxed => {}
        Ordering::SeqCst => fence(Ordering::SeqCst),
        _ => fence(Ordering::Acquire),
    }
}

impl SharedMemory for RawRegion<'_> {
    fn size(&self) -> u64 {
        self.len
    }
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault> {
        if self.writable {
            return Ok(self.atomic_u32(offset)?.load(order));
        }
        let v = self.relaxed_load_u32(offset)?;
        order_after_load(order);
        Ok(v)
    }
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault> {
        if self.writable {
            return Ok(self.atomic_u64(offset)?.load(order));
        }
        let v = self.relaxed_load_u64(offset)?;
        order_after_load(order);
        Ok(v)
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
        if !self.writable {
            return Err(Fault::ReadOnly { offset });
        }
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

    #[test]
    fn a_read_only_view_reads_like_a_writable_one_and_refuses_every_write() {
        let mut buf = Buf([0; 64]);
        buf.0[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_ne_bytes());
        buf.0[16..20].copy_from_slice(&7u32.to_ne_bytes());
        let base = NonNull::new(buf.0.as_mut_ptr()).expect("non-null");
        // SAFETY: buf outlives view, is 8-aligned and 64 bytes long.
        let view = unsafe { RawRegion::read_only(base, 64) };
        assert!(!view.is_writable());
        assert_eq!(
            view.load_u64(8, Ordering::SeqCst),
            Ok(0x1122_3344_5566_7788)
        );
        assert_eq!(view.load_u32(16, Ordering::Acquire), Ok(7));
        let mut out = [0u8; 4];
        view.read_bytes(16, &mut out).expect("in bounds");
        assert_eq!(out, 7u32.to_ne_bytes());
        let refused = Err(Fault::ReadOnly { offset: 8 });
        assert_eq!(view.store_u64(8, 1, Ordering::SeqCst), refused);
        assert_eq!(view.store_u32(8, 1, Ordering::SeqCst), refused);
        assert_eq!(view.cas_u64(8, 0, 1).map(|_| ()), refused);
        assert_eq!(view.cas_u32(8, 0, 1).map(|_| ()), refused);
        assert_eq!(view.fetch_or_u64(8, 1).map(|_| ()), refused);
        assert_eq!(view.fetch_and_u64(8, 1).map(|_| ()), refused);
        assert_eq!(view.write_bytes(8, b"x"), refused);
        assert_eq!(view.zero(8, 1), refused);
        assert_eq!(
            view.load_u64(60, Ordering::Relaxed),
            Err(Fault::OutOfBounds { offset: 60, len: 8 })
        );
        assert_eq!(
            view.load_u32(2, Ordering::Relaxed),
            Err(Fault::Misaligned { offset: 2 })
        );
        assert_eq!(
            view.load_u64(8, Ordering::Relaxed),
            Ok(0x1122_3344_5566_7788)
        );
    }
}
