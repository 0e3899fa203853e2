//! Events and robust mutexes: named objects sharing the namespace with sections.

use std::ffi::c_char;
use std::sync::Arc;

use vshm::{Event, EventOptions, Mutex, Status};

use crate::namespace::{clear, vshm_namespace, Ns};
use crate::section::{bind, disposition};
use crate::transport::CTransport;
use crate::{
    arg, boundary, name_arg, optional_name, out, timeout, vshm_status, write_optional, Fail,
};

/// A handle on an event (opaque). Keeps its namespace alive. Freed by `vshm_event_close`.
#[derive(Debug)]
pub struct vshm_event {
    // Declared before `_ns`, so dropped before it: it borrows the namespace `_ns` keeps.
    inner: Event<'static, CTransport>,
    _ns: Arc<Ns>,
}

/// A handle on a robust mutex (opaque). Keeps its namespace alive. Freed by
/// `vshm_mutex_close`.
#[derive(Debug)]
pub struct vshm_mutex {
    // Declared before `_ns`, so dropped before it: it borrows the namespace `_ns` keeps.
    inner: Mutex<'static, CTransport>,
    _ns: Arc<Ns>,
}

/// Create-or-open of an event called `name` (NULL: unnamed). A `manual_reset` event stays
/// signalled until reset (else each successful wait takes the signal); a `persistent` one
/// lives until deleted. Stores the handle in `*event` and `VSHM_DISPOSITION_CREATED` or
/// `VSHM_DISPOSITION_OPENED` in `*disposition` (may be NULL). An existing event keeps its
/// own flags.
///
/// Ownership: `*event` belongs to the caller; free it with `vshm_event_close`.
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `ns` or `event`,
/// non-UTF-8 name); `VSHM_STATUS_OBJECT_NAME_INVALID`; `VSHM_STATUS_INVALID_HANDLE` (the
/// name belongs to a section or a mutex; or this peer was disconnected);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_QUOTA_EXCEEDED`;
/// `VSHM_STATUS_ACCESS_DENIED`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `name` is NULL or a NUL-terminated string;
/// `event` and `disposition` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_event_create(
    ns: *const vshm_namespace,
    name: *const c_char,
    manual_reset: bool,
    persistent: bool,
    event: *mut *mut vshm_event,
    disposition: *mut u32,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(event) };
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        let name = unsafe { optional_name(name, "name") }?;
        // SAFETY: per this function's contract.
        let event = unsafe { out(event, "event") }?;
        let options = EventOptions {
            manual_reset,
            persistent,
        };
        // SAFETY: the event goes into a handle that keeps `ns.ns` alive.
        let (e, d) = unsafe { bind(&ns.ns) }.create_event(name, &options)?;
        *event = Box::into_raw(Box::new(vshm_event {
            inner: e,
            _ns: Arc::clone(&ns.ns),
        }));
        // SAFETY: per this function's contract.
        unsafe { write_optional(disposition, self::disposition(d)) };
        Ok(Status::Success)
    })
}

/// Opens the existing event called `name`; stores the handle in `*event`.
///
/// Ownership: `*event` belongs to the caller; free it with `vshm_event_close`.
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL argument,
/// non-UTF-8 name); `VSHM_STATUS_OBJECT_NAME_INVALID`; `VSHM_STATUS_OBJECT_NAME_NOT_FOUND`;
/// `VSHM_STATUS_INVALID_HANDLE` (the name belongs to a section or a mutex; or this peer was
/// disconnected); `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `name` is NULL or a NUL-terminated string;
/// `event` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_event_open(
    ns: *const vshm_namespace,
    name: *const c_char,
    event: *mut *mut vshm_event,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(event) };
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        let name = unsafe { name_arg(name, "name") }?;
        // SAFETY: per this function's contract.
        let event = unsafe { out(event, "event") }?;
        // SAFETY: the event goes into a handle that keeps `ns.ns` alive.
        let e = unsafe { bind(&ns.ns) }.open_event(name)?;
        *event = Box::into_raw(Box::new(vshm_event {
            inner: e,
            _ns: Arc::clone(&ns.ns),
        }));
        Ok(Status::Success)
    })
}

/// Signals the event and wakes its waiters (every waiter of a manual-reset event, one of
/// an auto-reset event).
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL);
/// `VSHM_STATUS_INVALID_HANDLE`; `VSHM_STATUS_INSUFFICIENT_RESOURCES` (the backend did not
/// answer the wake); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `event` is NULL or a live event handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_event_signal(event: *const vshm_event) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { arg(event, "event") }?.inner.signal()?;
        Ok(Status::Success)
    })
}

/// Clears a signal nobody took (a manual-reset event stays signalled until this).
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL);
/// `VSHM_STATUS_INVALID_HANDLE`; `VSHM_STATUS_INSUFFICIENT_RESOURCES`;
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `event` is NULL or a live event handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_event_reset(event: *const vshm_event) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { arg(event, "event") }?.inner.reset()?;
        Ok(Status::Success)
    })
}

/// Waits until the event is signalled (an auto-reset event's signal is then taken), or
/// `timeout_ns` nanoseconds pass (`VSHM_WAIT_INFINITE`: no limit; 0: a poll).
///
/// Thread safety: any thread; several threads may wait on one handle.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_TIMEOUT`; `VSHM_STATUS_INVALID_PARAMETER`
/// (NULL); `VSHM_STATUS_INVALID_HANDLE`; `VSHM_STATUS_INSUFFICIENT_RESOURCES`;
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `event` is NULL or a live event handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_event_wait(event: *const vshm_event, timeout_ns: u64) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { arg(event, "event") }?
            .inner
            .wait(timeout(timeout_ns))?;
        Ok(Status::Success)
    })
}

/// Closes an event handle and frees it (even when an error is returned). The event is
/// destroyed when its last handle closes, unless persistent.
///
/// Ownership: `event` is freed. Thread safety: must not race other calls on `event`.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL);
/// `VSHM_STATUS_INVALID_HANDLE`; `VSHM_STATUS_INSUFFICIENT_RESOURCES`;
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `event` is NULL or a live event handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_event_close(event: *mut vshm_event) -> vshm_status {
    boundary(|| {
        if event.is_null() {
            return Err(Fail::invalid("event is NULL"));
        }
        // SAFETY: a live handle made by Box::into_raw, handed back once.
        let vshm_event { inner, _ns } = *unsafe { Box::from_raw(event) };
        let closed = inner.close();
        drop(_ns);
        closed?;
        Ok(Status::Success)
    })
}

/// Create-or-open of a robust mutex called `name` (NULL: unnamed); a `persistent` one lives
/// until deleted. Stores the handle in `*mutex` and `VSHM_DISPOSITION_CREATED` or
/// `VSHM_DISPOSITION_OPENED` in `*disposition` (may be NULL).
///
/// Ownership: `*mutex` belongs to the caller; free it with `vshm_mutex_close`.
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `ns` or `mutex`,
/// non-UTF-8 name); `VSHM_STATUS_OBJECT_NAME_INVALID`; `VSHM_STATUS_INVALID_HANDLE` (the
/// name belongs to a section or an event; or this peer was disconnected);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_QUOTA_EXCEEDED`;
/// `VSHM_STATUS_ACCESS_DENIED`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `name` is NULL or a NUL-terminated string;
/// `mutex` and `disposition` are NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_mutex_create(
    ns: *const vshm_namespace,
    name: *const c_char,
    persistent: bool,
    mutex: *mut *mut vshm_mutex,
    disposition: *mut u32,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(mutex) };
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        let name = unsafe { optional_name(name, "name") }?;
        // SAFETY: per this function's contract.
        let mutex = unsafe { out(mutex, "mutex") }?;
        // SAFETY: the mutex goes into a handle that keeps `ns.ns` alive.
        let (m, d) = unsafe { bind(&ns.ns) }.create_mutex(name, persistent)?;
        *mutex = Box::into_raw(Box::new(vshm_mutex {
            inner: m,
            _ns: Arc::clone(&ns.ns),
        }));
        // SAFETY: per this function's contract.
        unsafe { write_optional(disposition, self::disposition(d)) };
        Ok(Status::Success)
    })
}

/// Opens the existing mutex called `name`; stores the handle in `*mutex`.
///
/// Ownership: `*mutex` belongs to the caller; free it with `vshm_mutex_close`.
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL argument,
/// non-UTF-8 name); `VSHM_STATUS_OBJECT_NAME_INVALID`; `VSHM_STATUS_OBJECT_NAME_NOT_FOUND`;
/// `VSHM_STATUS_INVALID_HANDLE` (the name belongs to a section or an event; or this peer
/// was disconnected); `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `name` is NULL or a NUL-terminated string;
/// `mutex` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_mutex_open(
    ns: *const vshm_namespace,
    name: *const c_char,
    mutex: *mut *mut vshm_mutex,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(mutex) };
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        let name = unsafe { name_arg(name, "name") }?;
        // SAFETY: per this function's contract.
        let mutex = unsafe { out(mutex, "mutex") }?;
        // SAFETY: the mutex goes into a handle that keeps `ns.ns` alive.
        let m = unsafe { bind(&ns.ns) }.open_mutex(name)?;
        *mutex = Box::into_raw(Box::new(vshm_mutex {
            inner: m,
            _ns: Arc::clone(&ns.ns),
        }));
        Ok(Status::Success)
    })
}

/// Takes the mutex for the calling thread, waiting up to `timeout_ns` nanoseconds
/// (`VSHM_WAIT_INFINITE`: no limit). Waiters are served in arrival order, across VMs.
///
/// Thread safety: any thread; the mutex is then held by the calling thread, which must be
/// the one to unlock it. Not recursive.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_ABANDONED` (a success: held now, but the
/// previous owner died holding it, so what it protects may be half-updated);
/// `VSHM_STATUS_TIMEOUT`; `VSHM_STATUS_POSSIBLE_DEADLOCK` (the calling thread holds it
/// already); `VSHM_STATUS_INVALID_PARAMETER` (NULL); `VSHM_STATUS_INVALID_HANDLE`;
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `mutex` is NULL or a live mutex handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_mutex_lock(mutex: *const vshm_mutex, timeout_ns: u64) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg(mutex, "mutex") }?;
        Ok(m.inner.lock(timeout(timeout_ns))?.status())
    })
}

/// Takes the mutex if it is free, without waiting and without the host.
///
/// Thread safety: as `vshm_mutex_lock`.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_ABANDONED` (held now; the previous owner
/// died holding it); `VSHM_STATUS_TIMEOUT` (another thread holds it, or lockers are queued);
/// `VSHM_STATUS_POSSIBLE_DEADLOCK` (the calling thread holds it already);
/// `VSHM_STATUS_INVALID_PARAMETER` (NULL); `VSHM_STATUS_INVALID_HANDLE`;
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `mutex` is NULL or a live mutex handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_mutex_try_lock(mutex: *const vshm_mutex) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let m = unsafe { arg(mutex, "mutex") }?;
        Ok(m.inner.try_lock()?.map_or(Status::Timeout, |a| a.status()))
    })
}

/// Releases the mutex held by the calling thread; the first queued locker (if any) becomes
/// the owner.
///
/// Thread safety: the thread that locked it.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_MUTANT_NOT_OWNED` (the calling thread does
/// not hold it); `VSHM_STATUS_INVALID_PARAMETER` (NULL); `VSHM_STATUS_INVALID_HANDLE`;
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES`; `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `mutex` is NULL or a live mutex handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_mutex_unlock(mutex: *const vshm_mutex) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { arg(mutex, "mutex") }?.inner.unlock()?;
        Ok(Status::Success)
    })
}

/// Closes a mutex handle and frees it (even when an error is returned), first releasing
/// the mutex if the calling thread holds it. The mutex is destroyed when its last handle
/// closes, unless persistent.
///
/// Ownership: `mutex` is freed. Thread safety: must not race other calls on `mutex`.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL);
/// `VSHM_STATUS_INVALID_HANDLE`; `VSHM_STATUS_INSUFFICIENT_RESOURCES`;
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `mutex` is NULL or a live mutex handle.
#[no_mangle]
pub unsafe extern "C" fn vshm_mutex_close(mutex: *mut vshm_mutex) -> vshm_status {
    boundary(|| {
        if mutex.is_null() {
            return Err(Fail::invalid("mutex is NULL"));
        }
        // SAFETY: a live handle made by Box::into_raw, handed back once.
        let vshm_mutex { inner, _ns } = *unsafe { Box::from_raw(mutex) };
        let closed = inner.close();
        drop(_ns);
        closed?;
        Ok(Status::Success)
    })
}

/// The handles are shared between C threads: what they wrap must be Send and Sync.
#[allow(dead_code)]
fn assert_thread_safe() {
    fn check<T: Send + Sync>() {}
    check::<crate::vshm_namespace>();
    check::<crate::vshm_section>();
    check::<vshm_event>();
    check::<vshm_mutex>();
}
