//! The POSIX anchors, as real system calls through libc: shm_open/mmap (P1, P2), eventfd
//! (P3), a shared mapping of a memfd for the raw atomic ping-pong (P4).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::AtomicU64;

/// Size of every anchor object: one page.
pub const PAGE: usize = 4096;

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// shm_open(name, flags, 0600): an owned fd.
fn shm_open(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let c = c_name(name)?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let fd = check(unsafe { libc::shm_open(c.as_ptr(), flags, 0o600) })?;
    // SAFETY: shm_open just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// shm_unlink(name).
pub fn shm_unlink(name: &str) -> io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::shm_unlink(c.as_ptr()) }).map(|_| ())
}

/// A shared read-write mapping of `len` bytes of `fd`, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// mmap(NULL, len, RW, MAP_SHARED, fd, 0).
    pub fn new(fd: RawFd, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh mapping chosen by the kernel; it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    /// The `i`th 8-byte word as an atomic (i < len / 8, 8-byte aligned as mmap is).
    pub fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.len / 8, "word {i} outside the mapping");
        // SAFETY: in bounds (checked), page-aligned base so 8-byte aligned, and the mapping
        // lives as long as `self`; shared memory is only ever accessed atomically here.
        unsafe { &*(self.ptr.cast::<AtomicU64>().add(i)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned; nothing borrows it past `self`.
        unsafe {
            libc::munmap(self.ptr, self.len);
        }
    }
}

/// A POSIX shm object of one page that exists for the anchors of P1; unlinked on drop.
#[derive(Debug)]
pub struct ShmObject {
    name: String,
}

impl ShmObject {
    /// Creates `/vshm-bench-<pid>-<tag>` with one page.
    pub fn create(tag: &str) -> io::Result<ShmObject> {
        let name = format!("/vshm-bench-{}-{tag}", std::process::id());
        let _ = shm_unlink(&name);
        let fd = shm_open(&name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR)?;
        ftruncate(&fd, PAGE)?;
        Ok(ShmObject { name })
    }

    /// P1's anchor: shm_open + mmap + munmap + close of the existing object.
    pub fn open_map_close(&self) -> io::Result<()> {
        let fd = shm_open(&self.name, libc::O_RDWR)?;
        let m = Mapping::new(fd.as_raw_fd(), PAGE)?;
        drop(m);
        drop(fd);
        Ok(())
    }
}

impl Drop for ShmObject {
    fn drop(&mut self) {
        let _ = shm_unlink(&self.name);
    }
}

fn ftruncate(fd: &OwnedFd, len: usize) -> io::Result<()> {
    let len =
        libc::off_t::try_from(len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: ftruncate on an fd we own.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) }).map(|_| ())
}

/// P2's anchor: shm_open(O_CREAT) + ftruncate + mmap + munmap + close + shm_unlink of a
/// new object `name`.
pub fn create_map_unlink(name: &str) -> io::Result<()> {
    let fd = shm_open(name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR)?;
    ftruncate(&fd, PAGE)?;
    let m = Mapping::new(fd.as_raw_fd(), PAGE)?;
    drop(m);
    drop(fd);
    shm_unlink(name)
}

/// An fd a child process inherits (no CLOEXEC): its number can go on the command line.
#[derive(Debug)]
pub struct Inheritable(pub OwnedFd);

impl Inheritable {
    /// A blocking eventfd, counter 0.
    pub fn eventfd() -> io::Result<Inheritable> {
        // SAFETY: eventfd(2) takes no pointers.
        let fd = check(unsafe { libc::eventfd(0, 0) })?;
        // SAFETY: just returned, owned by nobody else.
        Ok(Inheritable(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A memfd of one page.
    pub fn memfd() -> io::Result<Inheritable> {
        let name = c_name("vshm-bench-atomics")?;
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let fd = check(unsafe { libc::memfd_create(name.as_ptr(), 0) })?;
        // SAFETY: just returned, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        ftruncate(&fd, PAGE)?;
        Ok(Inheritable(fd))
    }

    /// Its number, for a child's command line.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// eventfd write of 1.
pub fn efd_post(fd: RawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    if n == 8 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// eventfd read (blocks until the counter is non-zero, then takes it).
pub fn efd_take(fd: RawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64.
    let n = unsafe { libc::read(fd, (&raw mut v).cast(), 8) };
    if n == 8 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Single-thread memcpy bandwidth (P5's anchor): copies `src` into `dst` once; the
/// compiler cannot elide it (black_box).
pub fn copy(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(std::hint::black_box(src));
    std::hint::black_box(dst);
}
