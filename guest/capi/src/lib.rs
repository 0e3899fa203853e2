//! The C ABI of the vshm guest library: `libvshm.so` / `libvshm.a` and the header
//! `include/vshm.h`, which cbindgen generates from these sources (their doc comments are the
//! header's comments). docs/C-API.md tells how to build, link and use it.
//!
//! # Rules every function follows
//! - Every function returns a [`vshm_status`]: an NTSTATUS (`VSHM_STATUS_*`). Success codes
//!   (`VSHM_STATUS_SUCCESS`, `VSHM_STATUS_ABANDONED`, …) have the top two bits clear
//!   (`vshm_nt_success()`); the rest are errors.
//! - A NULL pointer where one is required, and a name that is not NUL-terminated UTF-8, is
//!   `VSHM_STATUS_INVALID_PARAMETER`. Output parameters are written only on success (a
//!   handle output is set to NULL first whenever it is not NULL itself).
//! - No panic crosses the ABI: one is caught and returned as
//!   `VSHM_STATUS_INTERNAL_ERROR`.
//! - Why the last call on a thread failed, in words: `vshm_last_error()`.
//!
//! # Handles and lifetimes
//! Handles (`vshm_namespace`, `vshm_section`, `vshm_event`, `vshm_mutex`) are opaque heap
//! objects owned by the caller until passed to their close function (`vshm_detach`,
//! `vshm_section_close`, …), which frees them: a handle must not be used after, nor closed
//! twice. Each section, event or mutex handle keeps its namespace alive (it holds a
//! reference count on it), so handles may be closed in any order: `vshm_detach` drops the
//! caller's reference, and the peer leaves the region when the last handle is closed.
//!
//! # Threads
//! Every handle may be used from any thread, and several threads may call functions on the
//! same handle at once, except that closing a handle must not race any other call on it.
//! A mutex is held by a thread: the thread that locked it unlocks it.

#![warn(missing_docs)]
// The C names: vshm_status, vshm_section, …
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use vshm::Status;

mod namespace;
mod section;
mod sync;
mod transport;

pub use namespace::*;
pub use section::*;
pub use sync::*;
pub use transport::*;

/// An NTSTATUS: what every vshm function returns (`VSHM_STATUS_*`).
pub type vshm_status = u32;

/// STATUS_SUCCESS.
pub const VSHM_STATUS_SUCCESS: vshm_status = 0x0000_0000;
/// STATUS_ABANDONED (success): the mutex is now held by the caller, but its previous owner
/// died holding it, so what it protects may be inconsistent.
pub const VSHM_STATUS_ABANDONED: vshm_status = 0x0000_0080;
/// STATUS_TIMEOUT (success code): a wait ended because its timeout passed (or a try-lock
/// found the mutex taken).
pub const VSHM_STATUS_TIMEOUT: vshm_status = 0x0000_0102;
/// STATUS_PENDING (success code): a request was queued (not returned by this API today).
pub const VSHM_STATUS_PENDING: vshm_status = 0x0000_0103;
/// STATUS_OBJECT_NAME_EXISTS (informational): create-or-open opened an existing object.
pub const VSHM_STATUS_OBJECT_NAME_EXISTS: vshm_status = 0x4000_0000;
/// STATUS_INVALID_HANDLE: not a live handle (the peer was disconnected, the object was
/// destroyed behind this process's back, the region does not validate), or the name
/// belongs to another kind of object.
pub const VSHM_STATUS_INVALID_HANDLE: vshm_status = 0xC000_0008;
/// STATUS_INVALID_PARAMETER: a NULL pointer, a name that is not UTF-8, a size, offset,
/// alignment or flag out of range.
pub const VSHM_STATUS_INVALID_PARAMETER: vshm_status = 0xC000_000D;
/// STATUS_NO_MEMORY: a block does not fit in the section, even grown to its max size.
pub const VSHM_STATUS_NO_MEMORY: vshm_status = 0xC000_0017;
/// STATUS_ACCESS_DENIED: a write through a read-only handle; the OS refused access.
pub const VSHM_STATUS_ACCESS_DENIED: vshm_status = 0xC000_0022;
/// STATUS_OBJECT_NAME_INVALID: empty, longer than 260 characters, or contains `\`.
pub const VSHM_STATUS_OBJECT_NAME_INVALID: vshm_status = 0xC000_0033;
/// STATUS_OBJECT_NAME_NOT_FOUND: no object of that name (or no vshmd at that socket).
pub const VSHM_STATUS_OBJECT_NAME_NOT_FOUND: vshm_status = 0xC000_0034;
/// STATUS_QUOTA_EXCEEDED: this peer's quota (vshmd's policy) is used up.
pub const VSHM_STATUS_QUOTA_EXCEEDED: vshm_status = 0xC000_0044;
/// STATUS_MUTANT_NOT_OWNED: unlock of a mutex the calling thread does not hold.
pub const VSHM_STATUS_MUTANT_NOT_OWNED: vshm_status = 0xC000_0046;
/// STATUS_DELETE_PENDING: the object was deleted and lives only until its last handle
/// closes.
pub const VSHM_STATUS_DELETE_PENDING: vshm_status = 0xC000_0056;
/// STATUS_INSUFFICIENT_RESOURCES: the object table or the heap is full, the backend did
/// not answer in time, or the transport failed.
pub const VSHM_STATUS_INSUFFICIENT_RESOURCES: vshm_status = 0xC000_009A;
/// STATUS_NOT_SUPPORTED: an operation this transport or backend does not implement.
pub const VSHM_STATUS_NOT_SUPPORTED: vshm_status = 0xC000_00BB;
/// STATUS_POSSIBLE_DEADLOCK: lock of a mutex the calling thread already holds (mutexes
/// are not recursive).
pub const VSHM_STATUS_POSSIBLE_DEADLOCK: vshm_status = 0xC000_0194;
/// STATUS_INTERNAL_ERROR: the library panicked (a bug); the panic was caught at the ABI.
/// Not a status of the vshm protocol: only this library returns it.
pub const VSHM_STATUS_INTERNAL_ERROR: vshm_status = 0xC000_00E5;

/// A wait's timeout meaning "no limit" (every `timeout_ns` parameter).
pub const VSHM_WAIT_INFINITE: u64 = u64::MAX;

/// Every `VSHM_STATUS_*` constant and its name (the tests check it covers every protocol
/// status with the right value).
const STATUS_CONSTANTS: [(&str, vshm_status); 18] = [
    ("VSHM_STATUS_SUCCESS", VSHM_STATUS_SUCCESS),
    ("VSHM_STATUS_ABANDONED", VSHM_STATUS_ABANDONED),
    ("VSHM_STATUS_TIMEOUT", VSHM_STATUS_TIMEOUT),
    ("VSHM_STATUS_PENDING", VSHM_STATUS_PENDING),
    (
        "VSHM_STATUS_OBJECT_NAME_EXISTS",
        VSHM_STATUS_OBJECT_NAME_EXISTS,
    ),
    ("VSHM_STATUS_INVALID_HANDLE", VSHM_STATUS_INVALID_HANDLE),
    (
        "VSHM_STATUS_INVALID_PARAMETER",
        VSHM_STATUS_INVALID_PARAMETER,
    ),
    ("VSHM_STATUS_NO_MEMORY", VSHM_STATUS_NO_MEMORY),
    ("VSHM_STATUS_ACCESS_DENIED", VSHM_STATUS_ACCESS_DENIED),
    (
        "VSHM_STATUS_OBJECT_NAME_INVALID",
        VSHM_STATUS_OBJECT_NAME_INVALID,
    ),
    (
        "VSHM_STATUS_OBJECT_NAME_NOT_FOUND",
        VSHM_STATUS_OBJECT_NAME_NOT_FOUND,
    ),
    ("VSHM_STATUS_QUOTA_EXCEEDED", VSHM_STATUS_QUOTA_EXCEEDED),
    ("VSHM_STATUS_MUTANT_NOT_OWNED", VSHM_STATUS_MUTANT_NOT_OWNED),
    ("VSHM_STATUS_DELETE_PENDING", VSHM_STATUS_DELETE_PENDING),
    (
        "VSHM_STATUS_INSUFFICIENT_RESOURCES",
        VSHM_STATUS_INSUFFICIENT_RESOURCES,
    ),
    ("VSHM_STATUS_NOT_SUPPORTED", VSHM_STATUS_NOT_SUPPORTED),
    (
        "VSHM_STATUS_POSSIBLE_DEADLOCK",
        VSHM_STATUS_POSSIBLE_DEADLOCK,
    ),
    ("VSHM_STATUS_INTERNAL_ERROR", VSHM_STATUS_INTERNAL_ERROR),
];

/// Why a call failed: the status it returns and the message `vshm_last_error` gives.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) status: vshm_status,
    pub(crate) message: String,
}

impl Fail {
    pub(crate) fn new(status: Status, message: impl Into<String>) -> Fail {
        Fail {
            status: status.code(),
            message: message.into(),
        }
    }

    /// VSHM_STATUS_INVALID_PARAMETER, saying which.
    pub(crate) fn invalid(what: impl Into<String>) -> Fail {
        Fail::new(Status::InvalidParameter, what)
    }
}

impl From<vshm::Error> for Fail {
    fn from(e: vshm::Error) -> Fail {
        Fail::new(e.status(), e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // A message with a NUL in it (it never has one) loses the rest.
    let text = message.split('\0').next().unwrap_or_default();
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs the body of an exported function: its status, or the failure's (recorded for
/// `vshm_last_error`), or VSHM_STATUS_INTERNAL_ERROR for a panic, which never unwinds into
/// C.
pub(crate) fn boundary(body: impl FnOnce() -> Result<Status, Fail>) -> vshm_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => {
            if !status.is_success() {
                set_last_error(status.name());
            }
            status.code()
        }
        Ok(Err(fail)) => {
            set_last_error(&fail.message);
            fail.status
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            set_last_error(&format!("internal error (panic in libvshm): {what}"));
            VSHM_STATUS_INTERNAL_ERROR
        }
    }
}

/// A name argument: NUL-terminated UTF-8, not NULL.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that outlives `'a`.
pub(crate) unsafe fn name_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if p.is_null() {
        return Err(Fail::invalid(format!("{what} is NULL")));
    }
    // SAFETY: not NULL, and NUL-terminated and alive for 'a by the caller's contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| Fail::invalid(format!("{what} is not valid UTF-8")))
}

/// An optional name argument: NULL is `None`.
///
/// # Safety
/// As [`name_arg`].
pub(crate) unsafe fn optional_name<'a>(
    p: *const c_char,
    what: &str,
) -> Result<Option<&'a str>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: as the caller promised.
    unsafe { name_arg(p, what) }.map(Some)
}

/// A handle or input pointer argument, not NULL.
///
/// # Safety
/// `p` is NULL or valid for reads as a `T` for `'a`.
pub(crate) unsafe fn arg<'a, T>(p: *const T, what: &str) -> Result<&'a T, Fail> {
    // SAFETY: NULL or valid, as the caller promised.
    unsafe { p.as_ref() }.ok_or_else(|| Fail::invalid(format!("{what} is NULL")))
}

/// An output pointer argument, not NULL.
///
/// # Safety
/// `p` is NULL or valid for writes of a `T` for `'a`.
pub(crate) unsafe fn out<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Fail> {
    // SAFETY: NULL or valid, as the caller promised.
    unsafe { p.as_mut() }.ok_or_else(|| Fail::invalid(format!("{what} is NULL")))
}

/// Writes `value` through an optional output pointer.
///
/// # Safety
/// `p` is NULL or valid for writes of a `T`.
pub(crate) unsafe fn write_optional<T>(p: *mut T, value: T) {
    if !p.is_null() {
        // SAFETY: not NULL, and valid for writes by the caller's contract.
        unsafe { p.write(value) };
    }
}

/// A `timeout_ns` argument: `VSHM_WAIT_INFINITE` is no limit.
pub(crate) fn timeout(ns: u64) -> Option<std::time::Duration> {
    (ns != VSHM_WAIT_INFINITE).then(|| std::time::Duration::from_nanos(ns))
}

/// Why the last call made on the calling thread failed (returned a status other than
/// `VSHM_STATUS_SUCCESS`), in words: e.g. "cannot connect to vshmd socket /run/vshm.sock:
/// No such file or directory (os error 2)". An empty string if no call failed yet.
///
/// Ownership: the string belongs to the library and stays valid until the next call of a
/// vshm function on the same thread; copy it to keep it. Thread safety: each thread has
/// its own. Never NULL.
#[no_mangle]
pub extern "C" fn vshm_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The conventional name of a status ("STATUS_OBJECT_NAME_NOT_FOUND"), or NULL for a code
/// this library does not define.
///
/// Ownership: a static string; never free it. Thread safety: any thread.
#[no_mangle]
pub extern "C" fn vshm_status_name(status: vshm_status) -> *const c_char {
    static NAMES: OnceLock<Vec<(vshm_status, CString)>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        STATUS_CONSTANTS
            .iter()
            .filter_map(|&(name, code)| {
                let plain = name.strip_prefix("VSHM_")?;
                Some((code, CString::new(plain).ok()?))
            })
            .collect()
    });
    names
        .iter()
        .find(|(code, _)| *code == status)
        .map_or(std::ptr::null(), |(_, name)| name.as_ptr())
}

/// NT_SUCCESS(): whether `status` is a success or informational code (not an error).
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn vshm_nt_success(status: vshm_status) -> bool {
    status >> 30 < 2
}

#[cfg(test)]
mod tests;
