//! The shared region: a sealed memfd the backend owns, mapped through vm-memory.
//!
//! vm-memory gives bounds-checked volatile and atomic access, which is what memory that
//! guests can scribble on needs; [`Region`] adapts it to the format's [`SharedMemory`] seam.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, FileOffset, VolatileMemory};
use vshm_format::shm::{check_range, Fault, SharedMemory};

/// Why the region could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// memfd_create failed.
    #[error("cannot create the shared memory (memfd_create): {0}")]
    Create(io::Error),
    /// --hugepages without huge pages configured.
    #[error(
        "--hugepages: no free huge pages (HugePages_Free = {free} of {size} KiB); configure some, \
         e.g. `echo 64 > /proc/sys/vm/nr_hugepages`"
    )]
    NoHugePages {
        /// Free huge pages.
        free: u64,
        /// Huge page size in KiB.
        size: u64,
    },
    /// ftruncate failed (e.g. not enough huge pages for the size).
    #[error("cannot size the shared memory to {size} bytes: {source}")]
    Size {
        /// Requested size.
        size: u64,
        /// Cause.
        source: io::Error,
    },
    /// Sealing the memfd's size failed: peers could shrink it under everyone (SIGBUS).
    #[error(
        "cannot seal the shared memory's size (F_ADD_SEALS: {0}); vshmd refuses to hand out \
         a memfd a peer could shrink (a kernel with memfd sealing is needed, and for \
         --hugepages Linux 4.16 or later)"
    )]
    Seal(io::Error),
    /// mmap failed.
    #[error("cannot map the shared memory: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    /// The handed-over memfd is not the size this configuration asks for.
    #[error("the running vshmd's region is {have} bytes, this configuration asks for {want}")]
    Adopted {
        /// Its size.
        have: u64,
        /// The configured size.
        want: u64,
    },
    /// mlock failed.
    #[error("--lock: cannot mlock {size} bytes ({source}); raise RLIMIT_MEMLOCK (ulimit -l)")]
    Lock {
        /// Region size.
        size: u64,
        /// Cause.
        source: io::Error,
    },
}

/// Huge page facts from /proc/meminfo: (free pages, page size in KiB).
fn hugepage_info() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("HugePages_Free:"), field("Hugepagesize:"))
}

/// Forbids resizing `file` for good (shrink, grow, and further seal changes), and checks
/// the seals are in place.
fn seal_size(file: &File) -> io::Result<()> {
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an fd we own with integer arguments.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, want) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let have = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if have < 0 {
        return Err(io::Error::last_os_error());
    }
    if have & want != want {
        return Err(io::Error::other(format!(
            "seals {have:#x} lack {:#x}",
            want & !have
        )));
    }
    Ok(())
}

/// The backend's region.
#[derive(Debug)]
pub struct Region {
    file: File,
    map: MmapRegion,
    size: u64,
    page_size: u64,
}

impl Region {
    /// Creates a memfd of `size` bytes (power of two, checked by the caller's layout),
    /// seals its size so no peer can shrink it under us, maps it, and optionally locks it.
    pub fn create(size: u64, hugepages: bool, lock: bool) -> Result<Region, RegionError> {
        let mut page_size = 4096;
        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if hugepages {
            let (free, kib) = hugepage_info();
            if free == 0 || kib == 0 {
                return Err(RegionError::NoHugePages { free, size: kib });
            }
            page_size = kib * 1024;
            flags |= libc::MFD_HUGETLB;
        }
        // SAFETY: the name is a NUL-terminated literal; we check the result.
        let fd = unsafe { libc::memfd_create(c"vshm".as_ptr(), flags) };
        if fd < 0 {
            return Err(RegionError::Create(io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by memfd_create and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| RegionError::Size { size, source })?;
        // Peers get this fd: forbid resizing it (a shrink would SIGBUS everyone).
        seal_size(&file).map_err(RegionError::Seal)?;
        Region::map(file, size, page_size, lock)
    }

    /// Maps `file` (and locks it with `lock`).
    fn map(file: File, size: u64, page_size: u64, lock: bool) -> Result<Region, RegionError> {
        let len = usize::try_from(size).map_err(|_| RegionError::Size {
            size,
            source: io::Error::from_raw_os_error(libc::EFBIG),
        })?;
        let dup = file.try_clone().map_err(RegionError::Create)?;
        let map = MmapRegion::from_file(FileOffset::new(dup, 0), len).map_err(RegionError::Map)?;
        if lock {
            // SAFETY: locks the pages of our own live mapping; no memory is changed.
            let rc = unsafe { libc::mlock(map.as_ptr().cast(), len) };
            if rc != 0 {
                return Err(RegionError::Lock {
                    size,
                    source: io::Error::last_os_error(),
                });
            }
        }
        Ok(Region {
            file,
            map,
            size,
            page_size,
        })
    }

    /// Maps a region another vshmd process created and handed over (`vshmd --takeover`):
    /// `file` must be `size` bytes long and sealed against resizing, as [`Region::create`]
    /// leaves it.
    pub fn adopt(
        file: File,
        size: u64,
        hugepages: bool,
        lock: bool,
    ) -> Result<Region, RegionError> {
        let have = file
            .metadata()
            .map_err(|source| RegionError::Size { size, source })?
            .len();
        if have != size {
            return Err(RegionError::Adopted { have, want: size });
        }
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own with integer arguments.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & want != want {
            return Err(RegionError::Seal(io::Error::other(format!(
                "the handed-over memfd has seals {seals:#x}, not {want:#x}"
            ))));
        }
        let page_size = if hugepages {
            hugepage_info().1 * 1024
        } else {
            4096
        };
        Region::map(file, size, page_size, lock)
    }

    /// The memfd (handed to every peer).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Page size of the memfd (heap granularity).
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Returns `[offset, offset+len)` to the host: punches it out of the memfd so the pages
    /// are freed and read back as zeroes. Falls back to writing zeroes if punching fails.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on our own fd with a range checked to lie inside the file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        tracing::warn!(
            offset,
            len,
            "punching a hole failed ({err}); zeroing instead"
        );
        self.zero(offset, len).map_err(|_| err)
    }

    /// Bytes of the memfd actually backed by memory (st_blocks × 512).
    pub fn resident_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    fn index(&self, offset: u64, len: u64) -> Result<usize, Fault> {
        check_range(self.size, offset, len)?;
        usize::try_from(offset).map_err(|_| Fault::OutOfBounds { offset, len })
    }

    fn atomic<T: vm_memory::AtomicInteger>(&self, offset: u64) -> Result<&T, Fault> {
        let len = std::mem::size_of::<T>() as u64;
        let i = self.index(offset, len)?;
        if offset % len != 0 {
            return Err(Fault::Misaligned { offset });
        }
        self.map
            .get_atomic_ref::<T>(i)
            .map_err(|_| Fault::OutOfBounds { offset, len })
    }
}

impl SharedMemory for Region {
    fn size(&self) -> u64 {
        self.size
    }
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault> {
        Ok(self.atomic::<AtomicU32>(offset)?.load(order))
    }
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault> {
        Ok(self.atomic::<AtomicU64>(offset)?.load(order))
    }
    fn store_u32(&self, offset: u64, value: u32, order: Ordering) -> Result<(), Fault> {
        self.atomic::<AtomicU32>(offset)?.store(value, order);
        Ok(())
    }
    fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<(), Fault> {
        self.atomic::<AtomicU64>(offset)?.store(value, order);
        Ok(())
    }
    fn cas_u32(&self, offset: u64, current: u32, new: u32) -> Result<Result<u32, u32>, Fault> {
        Ok(self.atomic::<AtomicU32>(offset)?.compare_exchange(
            current,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ))
    }
    fn cas_u64(&self, offset: u64, current: u64, new: u64) -> Result<Result<u64, u64>, Fault> {
        Ok(self.atomic::<AtomicU64>(offset)?.compare_exchange(
            current,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ))
    }
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, Fault> {
        Ok(self
            .atomic::<AtomicU64>(offset)?
            .fetch_and(mask, Ordering::SeqCst))
    }
    fn fetch_or_u64(&self, offset: u64, bits: u64) -> Result<u64, Fault> {
        Ok(self
            .atomic::<AtomicU64>(offset)?
            .fetch_or(bits, Ordering::SeqCst))
    }
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let len = buf.len() as u64;
        let i = self.index(offset, len)?;
        self.map
            .as_volatile_slice()
            .read_slice(buf, i)
            .map_err(|_| Fault::OutOfBounds { offset, len })
    }
    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        let len = data.len() as u64;
        let i = self.index(offset, len)?;
        self.map
            .as_volatile_slice()
            .write_slice(data, i)
            .map_err(|_| Fault::OutOfBounds { offset, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memfd_that_cannot_be_sealed_is_an_error_not_a_warning() {
        // SAFETY: the name is a NUL-terminated literal; we check the result.
        let fd = unsafe { libc::memfd_create(c"unsealable".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just returned by memfd_create and nothing else owns it.
        let plain = unsafe { File::from_raw_fd(fd) };
        let err = seal_size(&plain).expect_err("a memfd without MFD_ALLOW_SEALING");
        let msg = RegionError::Seal(err).to_string();
        assert!(
            msg.contains("cannot seal") && msg.contains("refuses"),
            "{msg}"
        );
    }

    #[test]
    fn discarded_ranges_read_zero_and_give_their_pages_back() {
        let r = Region::create(1 << 20, false, false).expect("memfd");
        r.write_bytes(0x10000, &[0xAB; 0x8000]).expect("in bounds");
        let before = r.resident_bytes();
        assert!(before >= 0x8000, "written pages are resident ({before})");
        r.discard(0x10000, 0x8000).expect("punch");
        let mut buf = [0xFFu8; 0x100];
        r.read_bytes(0x10000, &mut buf).expect("in bounds");
        assert_eq!(buf, [0; 0x100]);
        assert!(r.resident_bytes() < before, "punched pages are freed");
        assert!(r.discard(1 << 20, 1).is_err());
    }

    #[test]
    fn the_memfd_cannot_be_shrunk_by_a_peer() {
        let r = Region::create(1 << 20, false, false).expect("memfd");
        let err = r.file().set_len(4096).expect_err("sealed");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn accesses_outside_the_region_fault() {
        let r = Region::create(1 << 20, false, false).expect("memfd");
        assert!(r.load_u64((1 << 20) - 4, Ordering::SeqCst).is_err());
        assert_eq!(
            r.load_u32(2, Ordering::SeqCst),
            Err(Fault::Misaligned { offset: 2 })
        );
        assert!(r.write_bytes(u64::MAX, &[1]).is_err());
    }
}
