//! Attaching to a namespace (over vshmd's host socket, a Linux guest's ivshmem PCI device,
//! or a caller's transport), detaching, listing, deleting by name.

use std::ffi::{c_char, c_void, CString};
use std::io::ErrorKind;
use std::path::Path;
use std::sync::Arc;

use vshm::format::layout::{kind, object_state};
use vshm::host::{HostError, HostTransport};
use vshm::{Namespace, Status};

use crate::transport::{vshm_transport_ops, CTransport, OpsTransport};
use crate::{arg, boundary, name_arg, optional_name, out, vshm_status, write_optional, Fail};

/// The namespace every C handle works on.
pub(crate) type Ns = Namespace<CTransport>;

/// An attached namespace (opaque): this process as a peer of one vshm region. Made by
/// `vshm_attach_host`, `vshm_attach_pci` or `vshm_attach_transport`; freed by
/// `vshm_detach`. Sections, events and mutexes opened through it keep it alive.
#[derive(Debug)]
pub struct vshm_namespace {
    pub(crate) ns: Arc<Ns>,
}

/// A section: memory in the region (`vshm_object_info.kind`).
pub const VSHM_KIND_SECTION: u32 = 1;
/// An event.
pub const VSHM_KIND_EVENT: u32 = 2;
/// A robust mutex.
pub const VSHM_KIND_MUTEX: u32 = 3;

/// `vshm_object_info.flags`: lives until deleted, not until its last handle closes.
pub const VSHM_OBJECT_PERSISTENT: u32 = 1;
/// `vshm_object_info.flags`: has a name.
pub const VSHM_OBJECT_NAMED: u32 = 2;
/// `vshm_object_info.flags`: an event that stays signalled until reset.
pub const VSHM_OBJECT_MANUAL_RESET: u32 = 4;

/// One object of the namespace, as `vshm_list` reports it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct vshm_object_info {
    /// Its name (NUL-terminated UTF-8), NULL if unnamed. Valid only during the callback.
    pub name: *const c_char,
    /// `VSHM_KIND_SECTION`, `VSHM_KIND_EVENT` or `VSHM_KIND_MUTEX`.
    pub kind: u32,
    /// `VSHM_OBJECT_*` flags.
    pub flags: u32,
    /// A section's current size in bytes (0 for events and mutexes).
    pub size: u64,
    /// A section's maximum size in bytes (0 for events and mutexes).
    pub max_size: u64,
    /// Deleted: its name is gone, it lives until its last handle closes.
    pub deleted: bool,
}

/// Called by `vshm_list` for each object, with the `ctx` given to it; return true to go on,
/// false to stop.
pub type vshm_list_fn =
    Option<unsafe extern "C" fn(ctx: *mut c_void, info: *const vshm_object_info) -> bool>;

fn host_status(e: &HostError) -> Status {
    let io = |e: &std::io::Error| match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused => Status::ObjectNameNotFound,
        ErrorKind::PermissionDenied => Status::AccessDenied,
        _ => Status::InsufficientResources,
    };
    match e {
        HostError::Connect { source, .. } => io(source),
        HostError::Io(source) | HostError::Map { source, .. } => io(source),
        HostError::Protocol { .. } | HostError::Region(_) => Status::InvalidHandle,
        HostError::Refused { .. } => Status::InsufficientResources,
    }
}

/// Attaches `t` and hands the handle to C.
///
/// # Safety
/// `out` is valid for writes.
unsafe fn attach(t: CTransport, out: &mut *mut vshm_namespace) -> Result<Status, Fail> {
    let ns = Namespace::attach(t)?;
    *out = Box::into_raw(Box::new(vshm_namespace { ns: Arc::new(ns) }));
    Ok(Status::Success)
}

/// Clears a handle output pointer if it is not NULL (so a failed call leaves NULL there).
///
/// # Safety
/// `p` is NULL or valid for writes.
pub(crate) unsafe fn clear<T>(p: *mut *mut T) {
    // SAFETY: NULL or valid for writes, as the caller promised.
    unsafe { write_optional(p, std::ptr::null_mut()) }
}

/// Attaches to the vshm region served by vshmd at the ivshmem socket `socket_path` (a host
/// process as a peer of its own), and stores the new namespace handle in `*ns`.
///
/// Ownership: `*ns` belongs to the caller; free it with `vshm_detach`. The library starts
/// two threads of its own for the connection (they end with the namespace).
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL or non-UTF-8 path,
/// NULL `ns`); `VSHM_STATUS_OBJECT_NAME_NOT_FOUND` (no socket there, or nobody listening);
/// `VSHM_STATUS_ACCESS_DENIED` (the socket's permissions); `VSHM_STATUS_INVALID_HANDLE`
/// (the server broke the protocol, or the region does not validate);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES` (vshmd refused the connection, e.g. every peer slot
/// is taken; or mapping failed); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `socket_path` is NULL or a NUL-terminated string; `ns` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_attach_host(
    socket_path: *const c_char,
    ns: *mut *mut vshm_namespace,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(ns) };
        // SAFETY: per this function's contract.
        let path = unsafe { name_arg(socket_path, "socket_path") }?;
        // SAFETY: per this function's contract.
        let ns = unsafe { out(ns, "ns") }?;
        let t = HostTransport::connect(Path::new(path))
            .map_err(|e| Fail::new(host_status(&e), e.to_string()))?;
        // SAFETY: `ns` is a valid output pointer.
        unsafe { attach(CTransport::Host(t), ns) }
    })
}

/// Attaches, from inside a Linux guest, to the vshm region behind the ivshmem PCI device at
/// `bdf` ("0000:00:04.0"), or, with `bdf` NULL, the one ivshmem device holding a vshm
/// region. Uses the vshm kernel driver when it is loaded (`/dev/vshmN`: cacheable mapping,
/// waits sleep until an interrupt; `bdf` picks the node bound to that device); otherwise
/// maps the BARs through sysfs (needs root) and waits for rings by polling.
///
/// Ownership: `*ns` belongs to the caller; free it with `vshm_detach`.
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `ns`, non-UTF-8
/// `bdf`, `bdf` not an ivshmem device, several devices hold a region and `bdf` is NULL);
/// `VSHM_STATUS_OBJECT_NAME_NOT_FOUND` (no such device, or no ivshmem device at all);
/// `VSHM_STATUS_ACCESS_DENIED` (not root, or no access to `/dev/vshmN`);
/// `VSHM_STATUS_INVALID_HANDLE` (no valid region, no usable peer id, or a driver of another
/// ABI version); `VSHM_STATUS_INSUFFICIENT_RESOURCES` (sysfs or device I/O failed);
/// `VSHM_STATUS_NOT_SUPPORTED` (not built for Linux); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `bdf` is NULL or a NUL-terminated string; `ns` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_attach_pci(
    bdf: *const c_char,
    ns: *mut *mut vshm_namespace,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(ns) };
        // SAFETY: per this function's contract.
        let bdf = unsafe { optional_name(bdf, "bdf") }?;
        // SAFETY: per this function's contract.
        let ns = unsafe { out(ns, "ns") }?;
        attach_pci(bdf, ns)
    })
}

#[cfg(target_os = "linux")]
fn attach_pci(bdf: Option<&str>, ns: &mut *mut vshm_namespace) -> Result<Status, Fail> {
    use vshm::driver::{DriverError, GuestError, GuestTransport};
    use vshm::pci::PciError;
    let io_status = |source: &std::io::Error| match source.kind() {
        ErrorKind::NotFound => Status::ObjectNameNotFound,
        ErrorKind::PermissionDenied => Status::AccessDenied,
        _ => Status::InsufficientResources,
    };
    let t = GuestTransport::open(bdf).map_err(|e| {
        let status = match &e {
            GuestError::Pci(PciError::NoDevice(_))
            | GuestError::Driver(DriverError::NoDevice(_) | DriverError::NoSuchPci(_)) => {
                Status::ObjectNameNotFound
            }
            GuestError::Pci(PciError::NotIvshmem(..) | PciError::Ambiguous(_))
            | GuestError::Driver(DriverError::Ambiguous(_)) => Status::InvalidParameter,
            GuestError::Pci(
                PciError::NoRegion(_) | PciError::Region(..) | PciError::BadPosition(..),
            )
            | GuestError::Driver(
                DriverError::NoRegion(_)
                | DriverError::Region(..)
                | DriverError::BadPosition(..)
                | DriverError::Abi(..),
            ) => Status::InvalidHandle,
            GuestError::Pci(PciError::Io { source, .. })
            | GuestError::Driver(DriverError::Io { source, .. }) => io_status(source),
        };
        Fail::new(status, e.to_string())
    })?;
    // SAFETY: `ns` is a valid output pointer.
    unsafe { attach(CTransport::Pci(t), ns) }
}

#[cfg(not(target_os = "linux"))]
fn attach_pci(_bdf: Option<&str>, _ns: &mut *mut vshm_namespace) -> Result<Status, Fail> {
    Err(Fail::new(
        Status::NotSupported,
        "the PCI sysfs transport exists only on Linux",
    ))
}

/// Attaches through a transport the caller supplies (a driver's or an RTOS's mapping and
/// interrupts, `struct vshm_transport_ops`). The table is copied; `ops->region` and
/// `ops->peer_id` are called once, before this returns.
///
/// Ownership: `*ns` belongs to the caller; free it with `vshm_detach`. If `ops` is not
/// NULL, `ops->release` (when set) is called exactly once: before this returns if it fails,
/// else when the namespace is finally dropped (the last of its handles closed). Until then
/// `ops->ctx` and the region must stay valid.
/// Thread safety: any thread; the table's functions are then called from the threads that
/// use the namespace (see `vshm_transport_ops`).
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `ops` or `ns`, a
/// required function missing, a NULL, unaligned or empty region);
/// `VSHM_STATUS_INSUFFICIENT_RESOURCES` (`region` failed, or a request to the backend did
/// not get through); `VSHM_STATUS_INVALID_HANDLE` (the region does not validate, or the
/// peer id is not attached to it); `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ops` is NULL or points to a table whose functions follow the contract of
/// `vshm_transport_ops`; `ns` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_attach_transport(
    ops: *const vshm_transport_ops,
    ns: *mut *mut vshm_namespace,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        unsafe { clear(ns) };
        // SAFETY: per this function's contract.
        let ops = *unsafe { arg(ops, "ops") }?;
        // SAFETY: the table follows its contract (this function's).
        let t = unsafe { OpsTransport::new(ops) }?;
        // SAFETY: per this function's contract.
        let ns = unsafe { out(ns, "ns") }?;
        // SAFETY: `ns` is a valid output pointer.
        unsafe { attach(CTransport::Ops(t), ns) }
    })
}

/// Frees a namespace handle. The peer leaves the region (its remaining holds are released)
/// once the sections, events and mutexes opened through it are closed too; until then
/// they keep working.
///
/// Ownership: `ns` is freed; do not use it again. Thread safety: must not race other calls
/// on `ns`.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `ns`);
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a handle from a `vshm_attach_*` function not yet detached.
#[no_mangle]
pub unsafe extern "C" fn vshm_detach(ns: *mut vshm_namespace) -> vshm_status {
    boundary(|| {
        if ns.is_null() {
            return Err(Fail::invalid("ns is NULL"));
        }
        // SAFETY: a live handle made by Box::into_raw, handed back once.
        drop(unsafe { Box::from_raw(ns) });
        Ok(Status::Success)
    })
}

/// Stores this peer's id (its ivshmem IVPosition) in `*peer_id`.
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL argument).
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `peer_id` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_peer_id(ns: *const vshm_namespace, peer_id: *mut u16) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        *unsafe { out(peer_id, "peer_id") }? = ns.ns.peer_id().raw();
        Ok(Status::Success)
    })
}

/// Deletes the object called `name`, whatever its kind (LSA DeleteSharedMemory): the name
/// disappears at once, the object lives until its last handle (anyone's) closes.
///
/// Thread safety: any thread.
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL argument, non-UTF-8
/// name); `VSHM_STATUS_OBJECT_NAME_INVALID`; `VSHM_STATUS_OBJECT_NAME_NOT_FOUND`;
/// `VSHM_STATUS_ACCESS_DENIED` (vshmd's policy); `VSHM_STATUS_INVALID_HANDLE` (this peer was
/// disconnected); `VSHM_STATUS_INSUFFICIENT_RESOURCES` (the backend did not answer);
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn vshm_delete(
    ns: *const vshm_namespace,
    name: *const c_char,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        // SAFETY: per this function's contract.
        let name = unsafe { name_arg(name, "name") }?;
        ns.ns.delete(name)?;
        Ok(Status::Success)
    })
}

/// Lists the namespace's objects (a snapshot as the entries are read; others may change it
/// meanwhile): calls `callback(ctx, info)` for each until it returns false, and stores the
/// number of objects reported in `*count` (if `count` is not NULL). A NULL `callback` only
/// counts.
///
/// Ownership: `info` and its name belong to the library and are valid only during the
/// callback. Thread safety: any thread; the callback runs on the calling thread and may
/// call vshm functions (but not close `ns`).
///
/// Returns `VSHM_STATUS_SUCCESS`; `VSHM_STATUS_INVALID_PARAMETER` (NULL `ns`);
/// `VSHM_STATUS_INTERNAL_ERROR`.
///
/// # Safety
/// `ns` is NULL or a live namespace handle; `callback` is NULL or a function that may be
/// called with `ctx`; `count` is NULL or valid for writes.
#[no_mangle]
pub unsafe extern "C" fn vshm_list(
    ns: *const vshm_namespace,
    callback: vshm_list_fn,
    ctx: *mut c_void,
    count: *mut usize,
) -> vshm_status {
    boundary(|| {
        // SAFETY: per this function's contract.
        let ns = unsafe { arg(ns, "ns") }?;
        let mut n = 0usize;
        for o in ns.ns.objects() {
            n += 1;
            let Some(f) = callback else { continue };
            let name = o.name().and_then(|s| CString::new(s).ok());
            let (size, max_size) = match o.kind {
                kind::SECTION => (o.size, o.max_size),
                _ => (0, 0),
            };
            let info = vshm_object_info {
                name: name.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                kind: o.kind,
                flags: o.flags,
                size,
                max_size,
                deleted: o.state != object_state::LIVE,
            };
            // SAFETY: the caller's function with its ctx; `info` and the name outlive it.
            if !unsafe { f(ctx, &info) } {
                break;
            }
        }
        // SAFETY: per this function's contract.
        unsafe { write_optional(count, n) };
        Ok(Status::Success)
    })
}
