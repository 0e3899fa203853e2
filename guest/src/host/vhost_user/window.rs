//! The window (the device's shared-memory region 0) in this process: one address range
//! reserved at connect, anonymous zero pages wherever vshmd has not mapped a section, and
//! the region's memfd pages where it has (SHMEM_MAP), until it unmaps them (SHMEM_UNMAP) or
//! the connection ends.

use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use vshm_format::shm::RawRegion;

/// The reserved range, unmapped on drop.
#[derive(Debug)]
pub(super) struct Window {
    base: NonNull<u8>,
    len: usize,
    /// The OS page size: every mapping starts and ends on one.
    page: u64,
}

// SAFETY: the window is a plain address range owned by this value; the memory behind it
// is only ever reached through RawRegion (atomic or volatile accesses) and replaced by
// mmap(MAP_FIXED), which the kernel makes atomic for the pages concerned.
unsafe impl Send for Window {}
// SAFETY: as above.
unsafe impl Sync for Window {}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// The OS page size.
pub(super) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// The size of the file behind `fd`.
fn file_size(fd: RawFd) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes a `stat` into the buffer it is given, which is large enough.
    if unsafe { libc::fstat(fd, st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it filled the buffer.
    let st = unsafe { st.assume_init() };
    u64::try_from(st.st_size).map_err(|_| einval())
}

/// What the pages of a range become.
enum Backing {
    /// Private anonymous zero pages, readable and writable (writes reach nobody).
    Zero,
    /// `fd`'s pages from `offset`, shared, writable or not.
    File {
        fd: RawFd,
        offset: libc::off_t,
        writable: bool,
    },
}

impl Window {
    /// Reserves `len` bytes: one anonymous private mapping, readable and writable, with no
    /// memory committed (pages are only allocated where something writes outside a
    /// section, and those writes reach nobody).
    pub(super) fn reserve(len: u64) -> io::Result<Window> {
        let page = page_size();
        if len == 0 || len % page != 0 {
            return Err(einval());
        }
        let size = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: a fresh anonymous mapping; the kernel picks the address (nothing of ours
        // is replaced) and the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Window {
            base,
            len: size,
            page,
        })
    }

    /// The window's bytes, borrowing the window. Every byte is readable and writable: a
    /// section vshmd mapped read-only is a private copy-on-write mapping of its pages, so a
    /// store there stays in this process (and a read-only handle refuses it anyway).
    pub(super) fn region(&self) -> RawRegion<'_> {
        // SAFETY: `base` is page-aligned (mmap) and the range is `len` bytes, mapped
        // readable and writable for as long as `self` lives (only Drop unmaps it;
        // map/unmap/clear replace pages inside it with readable, writable ones, never leave
        // a hole, and refuse file pages past the file's end), and the region borrows `self`.
        unsafe { RawRegion::new(self.base, self.len as u64) }
    }

    /// The address of `[offset, offset+len)`, if it is a non-empty page-aligned range
    /// inside the window (checked arithmetic: nothing the device sends can overflow it).
    fn subrange(&self, offset: u64, len: u64) -> io::Result<(*mut libc::c_void, usize)> {
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64);
        if !inside || len == 0 || offset % self.page != 0 || len % self.page != 0 {
            return Err(einval());
        }
        let start = usize::try_from(offset).map_err(|_| einval())?;
        let len = usize::try_from(len).map_err(|_| einval())?;
        Ok((self.base.as_ptr().wrapping_add(start).cast(), len))
    }

    /// Replaces the pages of `[offset, offset+len)` (checked by `subrange`) with `backing`.
    fn replace(&self, offset: u64, len: u64, backing: Backing) -> io::Result<()> {
        let (addr, len) = self.subrange(offset, len)?;
        let (prot, flags, fd, off) = match backing {
            Backing::Zero => (
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            ),
            Backing::File {
                fd,
                offset,
                writable,
            } => (
                // Read-only pages are mapped private and writable, not PROT_READ: the
                // window is a RawRegion valid for writes, so a stray write (through the
                // raw window, never through a read-only handle, which refuses it) must not
                // fault. It copies the page into this process and reaches nobody; until
                // then the page is the file's and shows every peer's writes.
                libc::PROT_READ | libc::PROT_WRITE,
                if writable {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                },
                fd,
                offset,
            ),
        };
        // SAFETY: `addr..addr+len` lies inside our own reservation (checked by `subrange`),
        // so MAP_FIXED replaces only pages this window owns, and the range stays mapped
        // (the reservation has no hole) for every RawRegion over it. On failure the kernel
        // leaves the old pages in place.
        let p = unsafe { libc::mmap(addr, len, prot, flags | libc::MAP_FIXED, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SHMEM_MAP: `fd`'s pages from `fd_offset` at window offset `offset`, `len` bytes,
    /// shared, writable or read-only. Refused (nothing changes) unless the range lies in
    /// the window on page boundaries.
    pub(super) fn map(
        &self,
        offset: u64,
        len: u64,
        fd: RawFd,
        fd_offset: u64,
        writable: bool,
    ) -> io::Result<()> {
        if fd_offset % self.page != 0 {
            return Err(einval());
        }
        // Pages past the file's end would fault (SIGBUS) when touched: refuse them.
        let end = fd_offset.checked_add(len).ok_or_else(einval)?;
        if end > file_size(fd)? {
            return Err(einval());
        }
        let fd_offset = libc::off_t::try_from(fd_offset).map_err(|_| einval())?;
        self.replace(
            offset,
            len,
            Backing::File {
                fd,
                offset: fd_offset,
                writable,
            },
        )
    }

    /// SHMEM_UNMAP: `[offset, offset+len)` reads zero again, and writes there reach nobody.
    pub(super) fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        self.replace(offset, len, Backing::Zero)
    }

    /// The connection ended: nothing vshmd mapped stays reachable (it can no longer unmap
    /// it, and reuses the memory after its quarantine; docs/VHOST-USER.md §5.2).
    pub(super) fn clear(&self) -> io::Result<()> {
        self.unmap(0, self.len as u64)
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation `reserve` made; every RawRegion over it
        // borrowed `self`, so none is left, and nothing else maps into it any more (the
        // backend channel thread that did is joined before the window is dropped).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use vshm_format::shm::SharedMemory;

    use super::{page_size, Window};

    fn file_of(pages: u64, byte: u8) -> std::fs::File {
        let mut f = super::super::ring::memfd(c"vshm-window-test").expect("memfd");
        let len = usize::try_from(pages * page_size()).expect("len");
        f.write_all(&vec![byte; len]).expect("fill");
        f
    }

    #[test]
    fn the_window_reads_zero_shows_a_mapped_file_and_zero_again_after_unmap() {
        let page = page_size();
        let w = Window::reserve(8 * page).expect("reserve");
        let file = file_of(4, 7);
        let r = w.region();
        let mut b = [1u8; 4];
        r.read_bytes(2 * page, &mut b).expect("read");
        assert_eq!(b, [0; 4], "nothing mapped reads zero");
        w.map(2 * page, 2 * page, file.as_raw_fd(), page, true)
            .expect("map");
        r.read_bytes(2 * page, &mut b).expect("read");
        assert_eq!(b, [7; 4]);
        r.write_bytes(3 * page, &[9; 4]).expect("write");
        let mut f = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut f, 2 * page).expect("file");
        assert_eq!(f, [9; 4], "writes reach the file");
        w.unmap(2 * page, 2 * page).expect("unmap");
        r.read_bytes(3 * page, &mut b).expect("read");
        assert_eq!(b, [0; 4], "zero again");
        w.map(0, page, file.as_raw_fd(), 0, false).expect("map ro");
        r.read_bytes(0, &mut b).expect("read");
        assert_eq!(b, [7; 4]);
        w.clear().expect("clear");
        r.read_bytes(0, &mut b).expect("read");
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn a_mapping_outside_the_window_or_off_page_boundaries_is_refused() {
        let page = page_size();
        let w = Window::reserve(4 * page).expect("reserve");
        let file = file_of(8, 1);
        let fd = file.as_raw_fd();
        assert!(
            w.map(3 * page, 2 * page, fd, 0, true).is_err(),
            "past the end"
        );
        assert!(
            w.map(u64::MAX - page + 1, page, fd, 0, true).is_err(),
            "overflow"
        );
        assert!(w.map(100, page, fd, 0, true).is_err(), "unaligned offset");
        assert!(w.map(0, 100, fd, 0, true).is_err(), "unaligned length");
        assert!(
            w.map(0, page, fd, 100, true).is_err(),
            "unaligned file offset"
        );
        assert!(w.map(0, 0, fd, 0, true).is_err(), "empty");
        assert!(
            w.map(0, page, fd, u64::MAX - page + 1, true).is_err(),
            "huge file offset"
        );
        assert!(w.unmap(4 * page, page).is_err(), "unmap past the end");
        assert!(Window::reserve(0).is_err() && Window::reserve(100).is_err());
    }
}
