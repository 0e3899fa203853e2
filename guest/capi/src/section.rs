//! Sections (LSA CreateSharedMemory / RtkCreateSharedMemory): create-or-open, open, close,
//! grow, size, read and write, change notifications, and blocks inside a section (LSA
//! AllocateSharedMemory / FreeSharedMemory).

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use vshm::blocks::{AllocOptions, Block};
use vshm::{CreateOptions, Disposition, Section, Status};

use crate::namespace::{clear, vshm_namespace, Ns};
use crate::transport::CTransport;
use crate::{
    arg, boundary, name_arg, optional_name, out, timeout, vshm_status, write_optional, Fail,
};

/// Create-or-open created a new object (`*disposition`).
pub const VSHM_DISPOSITION_CREATED: u32 = 0;
/// Create-or-open opened an existing object of that name (`*disposition`).
pub const VSHM_DISPOSITION_OPENED: u32 = 1;

/// `vshm_section_open`: reads and writes.
pub const VSHM_ACCESS_READ_WRITE: u32 = 0;
/// `vshm_section_open`: reads only (writes through the handle are refused).
pub const VSHM_ACCESS_READ_ONLY: u32 = 1;

/// A handle on a section (opaque). Keeps its namespace alive. Freed by
/// `vshm_section_close`.
#[derive(Debug)]
pub struct vshm_section {
    // Declared before `_ns`, so dropped before it: it borrows the namespace `_ns` keeps.
    pub(crate) inner: Section<'static, CTransport>,
    pub(crate) _ns: Arc<Ns>,
}

/// A block inside a section.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct vshm_block {
    /// Offset of the block's data from the section's start (its address is the section's
    /// address plus this).
    pub offset: u64,
    /// Usable bytes (at least the size asked for).
    pub size: u64,
    /// The allocator's id: a block freed in another section is refused.
    pub heap: u64,
}

/// The namespace behind `ns`, borrowed for as long as any handle made from it lives.
///
/// # Safety
/// The caller stores the result only in a handle that also keeps a clone of `ns` and drops
/// the borrower first.
pub(crate) unsafe fn bind(ns: &Arc<Ns>) -> &'static Ns {
    // SAFETY: the Arc's allocation lives while any clone does; the handle keeps one and
    // drops its borrower before it (the caller's contract), so the borrow never dangles.
    unsafe { &*Arc::as_ptr(ns) }
}

pub(crate) fn disposition(d: Disposition) -> u32 {
    match d {
        Disposition::Created => VSHM_DISPOSITION_CREATED,
        Disposition::Opened => VSHM_DISPOSITION_OPENED,
    }
}

fn section_handle(s: Section<'static, CTransport>, ns: &Arc<Ns>) -> *mut vshm_section {
    Box::into_raw(Box::new(vshm_section {
        inner: s,
        _ns: Arc::clone(ns),
    }))
}

/// Create-or-open of a section (RtkCreateSharedMemory, LSA CreateSharedMemory): opens the
/// section called `name` if it exists, else asks the backend to create it, zero-filled,
/// reserving `max_size` bytes (contiguous, never moving) and exposing `initial_size` of
/// them (grow with `vshm_section_grow`). A NULL `name` creates an unnamed section that no
/// one can open by name. A `persistent` section lives until deleted, else until its last
/// handle closes. Stores the handle in `*section`, the address of its first byte in
/// `*address` and `VSHM_DISPOSITION_CREATED` or `VSHM_DISPOSITION_OPENED` in
/// `*disposition` (`address` and `disposition` may be NULL). An existing section keeps its
/// own sizes and persistence.
///
/// The memory is shared with other VMs: access it with volatile or atomic operations,
/// within `vshm_section_size` bytes, while the handle is open.
///
/// Ownership: `*section` belongs to the caller; free it with `vshm_section_close` (the
/// address is valid until then). Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS` (created or opened: see `*disposition`);
/// `VSHM_STATUS_INVALID_PARAMETER` (NULL `ns` or `section`, non-UTF-8 name, `max_size` 0,
/// `initial_size` > `max_size`); `VSHM_STATUS_OBJECT_NAME_INVALID` (empty, more than 260
/// characters, or a `\`); `VSHM_STATUS_INVALID_HANDLE` (the name belongs to an event or a
/// mutex; or this peer was disconnected); `VSHM_STATUS_INSUFFICIENT_RESOURCES` (the object
/// table or the heap is full, or the backend did not answer); `VSHM_STATUS_QUOTA_EXCEEDED`
/// and `VSHM_STATUS_ACCESS_DENIED` (vshmd's policy); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `name` is NULL or a NUL-terminated string;
/// `section`, `address` and `disposition` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_create(
    ns: *const vshm_namespace,
    name: *const c_char,
    max_size: u64,
    initial_size: u64,
    persistent: bool,
    section: *mut *mut vshm_section,
    address: *mut *mut c_void,
    disposition: *mut u32,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(section) };
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        let name = unsafe { optional_name(name, "name") }?;
        // SAFETY: per this function's contract.
        let section = unsafe { out(section, "section") }?;
        let options = CreateOptions {
            max_size,
            initial_size,
            persistent,
        };
        // SAFETY: the section goes into a handle that keeps `ns.ns` alive.
        let (s, d) = unsafe { bind(&ns.ns) }.create(name, &options)?;
        let base = s.as_ptr().cast::<c_void>();
        *section = section_handle(s, &ns.ns);
        // SAFETY: per this function's contract.
        unsafe {
            write_optional(address, base);
            write_optional(disposition, self::disposition(d));
        }
        Ok(Status::Success)
    })
}

/// Opens the existing section called `name` (RtkOpenSharedMemory): `access` is
/// `VSHM_ACCESS_READ_WRITE` or `VSHM_ACCESS_READ_ONLY` (then `vshm_section_write` is
/// refused; over the vshm device the memory is also mapped read-only). Stores the handle in
/// `*section` and the address of the section's first byte in `*address` (if not NULL).
/// Over a shared header it is no round trip to the backend.
///
/// Ownership: `*section` belongs to the caller; free it with `vshm_section_close`.
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `ns`, `name` or
/// `section`, non-UTF-8 name, unknown `access`); `VSHM_STATUS_OBJECT_NAME_INVALID`;
/// `VSHM_STATUS_OBJECT_NAME_NOT_FOUND`; `VSHM_STATUS_INVALID_HANDLE` (the name belongs to
/// an event or a mutex; or this peer was disconnected);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `name` is NULL or a NUL-terminated string;
/// `section` and `address` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_open(
    ns: *const vshm_namespace,
    name: *const c_char,
    access: u32,
    section: *mut *mut vshm_section,
    address: *mut *mut c_void,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(section) };
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        let name = unsafe { name_arg(name, "name") }?;
        // SAFETY: per this function's contract.
        let section = unsafe { out(section, "section") }?;
        // SAFETY: the section goes into a handle that keeps `ns.ns` alive.
        let bound = unsafe { bind(&ns.ns) };
        let s = match access {
            VSHM_ACCESS_READ_WRITE => bound.open(name)?,
            VSHM_ACCESS_READ_ONLY => bound.open_read_only(name)?,
            _ => return Err(Fail::invalid(format!("unknown access {access}"))),
        };
        let base = s.as_ptr().cast::<c_void>();
        *section = section_handle(s, &ns.ns);
        // SAFETY: per this function's contract.
        unsafe { write_optional(address, base) };
        Ok(Status::Success)
    })
}

/// Closes a section handle and frees it (RtkCloseHandle). The section is destroyed when
/// the last handle of a non-persistent (or deleted) section closes. The handle is freed
/// even when an error is returned.
///
/// Ownership: `section` is freed; do not use it or its address again. Thread safety: must
/// not race other calls on `section`.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL);
/// `VSHM_STATUS_INVALID_HANDLE` (this peer was disconnected: nothing left to close);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES` (the backend did not answer a request the close
/// needed); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_close(section: *mut vshm_section) -> vshm_status {
    boundary(|| {
        if section.is_null() {
            return Err(Fail::invalid("section is NULL"));
        }
        // SAFETY: a live handle made by Box::into_raw, handed back once.
        let vshm_section { inner, _ns } = *unsafe { Box::from_raw(section) };
        let closed = inner.close();
        drop(_ns);
        closed?;
        Ok(Status::Success)
    })
}

/// Grows the section's exposed size to `new_size` bytes (at most its max size); it never
/// moves. Every handle (anyone's) sees the new size.
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL, `new_size` above
/// the max size or below the current size); `VSHM_STATUS_INVALID_HANDLE` (the section was
/// destroyed, or this peer disconnected); `VSHM_STATUS_INSUFFICIENT_RESOURCES`;
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_grow(
    section: *const vshm_section,
    new_size: u64,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        s.inner.grow(new_size)?;
        Ok(Status::Success)
    })
}

/// Stores the section's current size in `*size` and its max size in `*max_size` (either
/// may be NULL), and the address of its first byte in `*address` (may be NULL).
///
/// Thread safety: any thread (another peer may grow the section at any time).
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `section`).
///
/// # Safety
/// `section` is NULL or a live section handle; the others are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_size(
    section: *const vshm_section,
    size: *mut u64,
    max_size: *mut u64,
    address: *mut *mut c_void,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        // SAFETY: per this function's contract.
        unsafe {
            write_optional(size, s.inner.size());
            write_optional(max_size, s.inner.max_size());
            write_optional(address, s.inner.as_ptr().cast::<c_void>());
        }
        Ok(Status::Success)
    })
}

/// Copies `len` bytes at offset `offset` of the section into `buf`, bounds-checked
/// against its current size.
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL, or the range is
/// not inside the section); `VSHM_STATUS_INVALID_HANDLE` (the section was destroyed behind
/// this process's back, or this peer disconnected); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle; `buf` is NULL or valid for writes of `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_read(
    section: *const vshm_section,
    offset: u64,
    buf: *mut c_void,
    len: usize,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        if buf.is_null() {
            return Err(Fail::invalid("buf is NULL"));
        }
        // SAFETY: not NULL, and valid for writes of `len` bytes by the contract.
        let buf = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) };
        s.inner.read_at(offset, buf)?;
        Ok(Status::Success)
    })
}

/// Copies `len` bytes from `data` to offset `offset` of the section, bounds-checked
/// against its current size.
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL, or the range is
/// not inside the section); `VSHM_STATUS_ACCESS_DENIED` (a read-only handle);
/// `VSHM_STATUS_INVALID_HANDLE` (the section was destroyed behind this process's back, or
/// this peer disconnected); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle; `data` is NULL or valid for reads of `len`
/// bytes.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_write(
    section: *const vshm_section,
    offset: u64,
    data: *const c_void,
    len: usize,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        if data.is_null() {
            return Err(Fail::invalid("data is NULL"));
        }
        // SAFETY: not NULL, and valid for reads of `len` bytes by the contract.
        let data = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
        s.inner.write_at(offset, data)?;
        Ok(Status::Success)
    })
}

/// Tells the section's readers that it changed ("I wrote a frame"): counts the change and,
/// if anyone waits in `vshm_section_wait_change`, asks the host to ring them.
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL);
/// `VSHM_STATUS_INVALID_HANDLE`; `VSHM_STATUS_INSUFFICIENT_RESOURCES` (the backend did not
/// answer the wake); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_notify(section: *const vshm_section) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        s.inner.notify()?;
        Ok(Status::Success)
    })
}

/// Waits until the section changed (anyone's `vshm_section_notify`) since this handle last
/// looked (its open, or its last successful wait), or `timeout_ns` nanoseconds pass
/// (`VSHM_WAIT_INFINITE`: no limit). Changes made while nobody waited are coalesced: stores
/// the number of changes counted so far in `*count` (may be NULL).
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_TIMEOUT`; `VSHM_STATUS_INVALID_PARAMETER`
/// (NULL `section`); `VSHM_STATUS_INVALID_HANDLE`; `VSHM_STATUS_INSUFFICIENT_RESOURCES`;
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle; `count` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_section_wait_change(
    section: *const vshm_section,
    timeout_ns: u64,
    count: *mut u64,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        let n = s.inner.wait_change(timeout(timeout_ns))?;
        // SAFETY: per this function's contract.
        unsafe { write_optional(count, n) };
        Ok(Status::Success)
    })
}

/// Allocates a block of at least `size` bytes aligned to `align` (a power of two, from the
/// section's start) inside the section (LSA AllocateSharedMemory), growing the section as
/// needed up to its max size; stores it in `*block`. The section becomes an allocator on
/// its first allocation (it must still be all zero then). An `owned` block is freed by the
/// others once this peer is gone; the others are persistent data.
///
/// Thread safety: any thread; every peer holding the section may allocate at once.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL, size 0, `align`
/// not a power of two, the section holds other data rather than an allocator); `VSHM_STATUS_NO_MEMORY` (does not fit even at the max size);
/// `VSHM_STATUS_ACCESS_DENIED` (a read-only handle); `VSHM_STATUS_INVALID_HANDLE` (the
/// section's allocator is corrupt, or the handle is dead);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES` (the allocator stayed locked, or the backend did
/// not answer a grow); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle; `block` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_block_allocate(
    section: *const vshm_section,
    size: u64,
    align: u64,
    owned: bool,
    block: *mut vshm_block,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        // SAFETY: per this function's contract.
        let block = unsafe { out(block, "block") }?;
        let b = s.inner.allocate_with(size, align, AllocOptions { owned })?;
        *block = vshm_block {
            offset: b.offset,
            size: b.size,
            heap: b.heap,
        };
        Ok(Status::Success)
    })
}

/// Frees a block allocated in this section (LSA FreeSharedMemory). A block of another
/// section, a forged offset, a wrong size or a double free is refused and changes nothing.
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL, or not a block
/// allocated here); `VSHM_STATUS_INVALID_HANDLE` (another section's block, a corrupt
/// allocator, a dead handle); `VSHM_STATUS_ACCESS_DENIED` (a read-only handle);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `section` is NULL or a live section handle; `block` is NULL or valid for reads.
#[no_mangle]
pub unsafe extern "C" fn vshm_block_free(
    section: *const vshm_section,
    block: *const vshm_block,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let s = unsafe { arg(section, "section") }?;
        // SAFETY: per this function's contract.
        let b = unsafe { arg(block, "block") }?;
        s.inner.free(Block {
            offset: b.offset,
            size: b.size,
            heap: b.heap,
        })?;
        Ok(Status::Success)
    })
}
