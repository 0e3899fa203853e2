//! The file `inspect` reads, mapped `PROT_READ` and shared, and the read-only
//! [`RawRegion`] view through which every byte of it is read.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

use vshm_format::shm::RawRegion;

/// A read-only shared mapping of a whole file, unmapped on drop.
pub(super) struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    pub(super) fn read_only(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a new mapping at an address the kernel picks (so it replaces nothing of
        // ours), PROT_READ only, of a descriptor that is open for this call; the result is
        // checked for MAP_FAILED before use. The memory is only ever read through raw
        // pointers (atomic loads and volatile reads), never through references to plain
        // data, so other processes writing it is fine. A file that shrinks while mapped
        // would make reads beyond its end fault (SIGBUS); vshmd's memfd is sealed against
        // shrinking (F_SEAL_SHRINK).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<u8>())
            .map(|base| Mapping { base, len })
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))
    }
}

impl Mapping {
    /// The mapping as a [`SharedMemory`]: the format crate's bounds- and alignment-checked
    /// [`RawRegion`], made read-only, so every store, compare-and-swap and fetch-op is
    /// refused with [`vshm_format::shm::Fault::ReadOnly`] and no code path can write the
    /// region even by mistake. (Inspect used to carry its own checker for this; one checker
    /// is one place to get bounds right.)
    ///
    /// [`SharedMemory`]: vshm_format::shm::SharedMemory
    pub(super) fn region(&self) -> RawRegion<'_> {
        // SAFETY: base..base+len is a live PROT_READ mapping (page-aligned, so 8-aligned)
        // that lasts as long as the borrow of `self` the region carries; a read-only view
        // only reads it, through atomic Relaxed loads and volatile copies.
        unsafe { RawRegion::read_only(self.base, self.len as u64) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned in `read_only`; every RawRegion made by
        // `region` borrows the Mapping, so none outlives this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}
