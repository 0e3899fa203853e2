//! Transports: the built-in ones (vshmd's host socket, a Linux guest's ivshmem PCI device
//! through sysfs) and the callback table a driver or an RTOS fills with its own mapping and
//! interrupts ([`vshm_transport_ops`], mirroring the Rust `vshm::Transport` trait).

use std::any::Any;
use std::ffi::c_void;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::NonNull;
use std::time::Duration;

#[cfg(target_os = "linux")]
use vshm::driver::GuestTransport;
use vshm::format::shm::RawRegion;
use vshm::format::PeerId;
use vshm::host::HostTransport;
use vshm::{Transport, TransportError};

use crate::Fail;

/// A transport callback's result: the operation was done (for `wait_until`: the condition
/// became true).
pub const VSHM_TRANSPORT_OK: i32 = 0;
/// `wait_until` only: the timeout passed before the condition became true.
pub const VSHM_TRANSPORT_TIMED_OUT: i32 = 1;
/// The backend went away (the host's vshmd, the device): nobody arbitrates any more.
pub const VSHM_TRANSPORT_BACKEND_GONE: i32 = 2;
/// This transport has no such operation.
pub const VSHM_TRANSPORT_NOT_SUPPORTED: i32 = 3;
// Any negative value: an OS error, negated (-errno, or the platform's own code negated).

/// EINVAL: what a callback's undefined result is reported as.
const EINVAL: i32 = 22;

/// The condition `wait_until` waits for: returns true when it holds. Called with the
/// `ready_ctx` that `wait_until` was given.
pub type vshm_ready_fn = Option<unsafe extern "C" fn(ready_ctx: *mut c_void) -> bool>;

/// A transport supplied by the caller (a kernel driver, an RTOS, a hypervisor's own
/// device): how this peer maps the region, rings other peers' doorbells and waits for its
/// own. The Rust `vshm::Transport` trait as a table of C functions; every function gets
/// `ctx` first. docs/C-API.md tells how a Windows or RTOS driver fills it.
///
/// Required: `region`, `peer_id`, `ring`, `wait_until`. The others may be NULL (the
/// default behaviour is given with each).
///
/// Thread safety: once attached, the library calls the functions from whichever threads
/// call vshm functions on this namespace, possibly several at once: they must be
/// thread-safe if the namespace is used from several threads.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct vshm_transport_ops {
    /// The transport's own state, passed to every function.
    pub ctx: *mut c_void,
    /// Required. Stores the mapped region (the whole ivshmem shared memory): its first byte
    /// (aligned to 8 at least) in `*base` and its length in `*size`; returns
    /// `VSHM_TRANSPORT_OK` or an error. Called once, by `vshm_attach_transport`: the
    /// mapping must stay valid, readable and writable, until `release` is called.
    pub region: Option<
        unsafe extern "C" fn(ctx: *mut c_void, base: *mut *mut c_void, size: *mut u64) -> i32,
    >,
    /// Required. This peer's ivshmem peer id (IVPosition), 1..=65534. Called once, by
    /// `vshm_attach_transport`.
    pub peer_id: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u16>,
    /// Required. Rings peer `peer`'s doorbell on `vector` (peer 0 is the host backend);
    /// returns `VSHM_TRANSPORT_OK`, `VSHM_TRANSPORT_BACKEND_GONE` or -errno.
    pub ring: Option<unsafe extern "C" fn(ctx: *mut c_void, peer: u16, vector: u16) -> i32>,
    /// Required. Waits until `ready(ready_ctx)` returns true or `timeout_ns` nanoseconds
    /// pass: returns `VSHM_TRANSPORT_OK` (it became true), `VSHM_TRANSPORT_TIMED_OUT`, or
    /// an error (`VSHM_TRANSPORT_BACKEND_GONE`, -errno). Call `ready` first, and again after
    /// every ring on any of this peer's vectors (it may do work, e.g. ask to be rung again);
    /// calling it more often (polling) is allowed. Call it only on the thread that called
    /// `wait_until`, and not after returning. Several threads may wait at once: a ring must
    /// not be consumed by one of them without the others calling their `ready` again.
    pub wait_until: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            ready: vshm_ready_fn,
            ready_ctx: *mut c_void,
            timeout_ns: u64,
        ) -> i32,
    >,
    /// Optional. A non-zero token naming this user of the peer for the request-mailbox
    /// lock. All processes of a guest share one peer, so a guest transport returns its
    /// process id. NULL: 1 (the peer has one user).
    pub lock_token: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u32>,
    /// Optional. Whether the holder of `token` (a lock or thread token) is still alive.
    /// NULL: always true.
    pub token_alive: Option<unsafe extern "C" fn(ctx: *mut c_void, token: u32) -> bool>,
    /// Optional. A non-zero token naming the calling thread: a mutex is held by a thread.
    /// NULL: `lock_token` (a single-threaded RTOS).
    pub thread_token: Option<unsafe extern "C" fn(ctx: *mut c_void) -> u32>,
    /// Optional. Wakes this peer's own threads waiting in `wait_until` so they call their
    /// `ready` again (a change no ring announces). NULL: nothing (a polling transport
    /// re-checks anyway).
    pub notify_local: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
    /// Optional. Called once when the library is done with the transport (the namespace's
    /// last handle closed, or `vshm_attach_transport` failed): unmap, free `ctx`.
    pub release: Option<unsafe extern "C" fn(ctx: *mut c_void)>,
}

/// The transport behind a C namespace handle.
#[derive(Debug)]
pub(crate) enum CTransport {
    Host(HostTransport),
    #[cfg(target_os = "linux")]
    Pci(GuestTransport),
    Ops(OpsTransport),
}

impl CTransport {
    /// The transport chosen at attach.
    fn chosen(&self) -> &dyn Transport {
        match self {
            CTransport::Host(t) => t,
            #[cfg(target_os = "linux")]
            CTransport::Pci(t) => t,
            CTransport::Ops(t) => t,
        }
    }
}

vshm::forward_transport!(CTransport, self => self.chosen());

/// A [`vshm_transport_ops`] table as a Rust transport; calls `release` when dropped.
#[derive(Debug)]
pub(crate) struct OpsTransport {
    ops: vshm_transport_ops,
    base: NonNull<u8>,
    size: u64,
    peer: PeerId,
}

// SAFETY: the table's functions are called from any thread, possibly at once: the contract
// of `vshm_transport_ops` (and `vshm_attach_transport`) makes the caller promise they are
// thread-safe, and the region is shared memory only ever accessed atomically or volatilely
// (RawRegion).
unsafe impl Send for OpsTransport {}
// SAFETY: as above.
unsafe impl Sync for OpsTransport {}

/// Decodes a callback's result.
fn result(rc: i32) -> Result<(), TransportError> {
    match rc {
        VSHM_TRANSPORT_OK => Ok(()),
        VSHM_TRANSPORT_BACKEND_GONE => Err(TransportError::BackendGone),
        VSHM_TRANSPORT_NOT_SUPPORTED => Err(TransportError::NotSupported),
        rc if rc < 0 => Err(TransportError::Os(rc.checked_neg().unwrap_or(EINVAL))),
        _ => Err(TransportError::Os(EINVAL)),
    }
}

impl OpsTransport {
    /// Takes the table (from now on `release` is called exactly once, when this is
    /// dropped), checks it and asks it for the region and the peer id.
    ///
    /// # Safety
    /// The functions in `ops` follow the contract of [`vshm_transport_ops`].
    pub(crate) unsafe fn new(ops: vshm_transport_ops) -> Result<OpsTransport, Fail> {
        // Owns the table at once, so that every failure below releases it.
        let mut t = OpsTransport {
            ops,
            base: NonNull::dangling(),
            size: 0,
            peer: PeerId(0),
        };
        let (Some(region), Some(peer_id), Some(_), Some(_)) =
            (ops.region, ops.peer_id, ops.ring, ops.wait_until)
        else {
            return Err(Fail::invalid(
                "vshm_transport_ops: region, peer_id, ring and wait_until are required",
            ));
        };
        let mut base: *mut c_void = std::ptr::null_mut();
        let mut size = 0u64;
        // SAFETY: a required function of the table, called with its ctx and two valid
        // output pointers, as its contract says.
        let rc = unsafe { region(ops.ctx, &mut base, &mut size) };
        result(rc).map_err(|e| {
            Fail::new(
                vshm::Status::InsufficientResources,
                format!("vshm_transport_ops.region failed: {e}"),
            )
        })?;
        let base = NonNull::new(base.cast::<u8>())
            .filter(|b| b.as_ptr().align_offset(8) == 0 && size > 0)
            .ok_or_else(|| {
                Fail::invalid("vshm_transport_ops.region: base NULL or not 8-aligned, or size 0")
            })?;
        (t.base, t.size) = (base, size);
        // SAFETY: a required function of the table, called with its ctx.
        t.peer = PeerId(unsafe { peer_id(ops.ctx) });
        Ok(t)
    }
}

impl Drop for OpsTransport {
    fn drop(&mut self) {
        if let Some(release) = self.ops.release {
            // SAFETY: called once (this is the table's one owner), with its ctx.
            unsafe { release(self.ops.ctx) };
        }
    }
}

/// What `wait_until`'s `ready_ctx` points to: the library's condition, and a panic it
/// raised (kept to be raised again once the C function returned).
struct Ready<'a> {
    ready: &'a mut dyn FnMut() -> bool,
    panic: Option<Box<dyn Any + Send>>,
}

/// The `ready` function handed to `wait_until`.
unsafe extern "C" fn ready_trampoline(ready_ctx: *mut c_void) -> bool {
    // SAFETY: `ready_ctx` is the `Ready` that `OpsTransport::wait_until` passed, alive and
    // not otherwise borrowed while the C function it called runs (the contract forbids
    // calls after it returned or from another thread).
    let r = unsafe { &mut *ready_ctx.cast::<Ready<'_>>() };
    if r.panic.is_some() {
        return true;
    }
    match catch_unwind(AssertUnwindSafe(|| (r.ready)())) {
        Ok(ready) => ready,
        Err(panic) => {
            // Stop the wait; the panic goes on once back in Rust.
            r.panic = Some(panic);
            true
        }
    }
}

impl Transport for OpsTransport {
    fn region(&self) -> RawRegion<'_> {
        // SAFETY: the table's contract: `base` is valid for reads and writes of `size`
        // bytes, aligned to 8 (checked), until `release`, which only our drop calls.
        unsafe { RawRegion::new(self.base, self.size) }
    }

    fn peer_id(&self) -> PeerId {
        self.peer
    }

    fn ring(&self, peer: PeerId, vector: u16) -> Result<(), TransportError> {
        let ring = self.ops.ring.ok_or(TransportError::NotSupported)?;
        // SAFETY: a function of the table (checked present at attach), with its ctx.
        result(unsafe { ring(self.ops.ctx, peer.raw(), vector) })
    }

    fn wait_until(
        &self,
        ready: &mut dyn FnMut() -> bool,
        timeout: Duration,
    ) -> Result<bool, TransportError> {
        let wait = self.ops.wait_until.ok_or(TransportError::NotSupported)?;
        let mut r = Ready { ready, panic: None };
        let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: a function of the table with its ctx; `r` outlives the call and the
        // trampoline is its matching `ready`.
        let rc = unsafe {
            wait(
                self.ops.ctx,
                Some(ready_trampoline),
                (&mut r as *mut Ready<'_>).cast(),
                ns,
            )
        };
        if let Some(panic) = r.panic.take() {
            resume_unwind(panic);
        }
        match rc {
            VSHM_TRANSPORT_TIMED_OUT => Ok(false),
            rc => result(rc).map(|()| true),
        }
    }

    fn lock_token(&self) -> u32 {
        match self.ops.lock_token {
            // SAFETY: a function of the table, with its ctx.
            Some(f) => unsafe { f(self.ops.ctx) },
            None => 1,
        }
    }

    fn token_alive(&self, token: u32) -> bool {
        match self.ops.token_alive {
            // SAFETY: a function of the table, with its ctx.
            Some(f) => unsafe { f(self.ops.ctx, token) },
            None => true,
        }
    }

    fn thread_token(&self) -> u32 {
        match self.ops.thread_token {
            // SAFETY: a function of the table, with its ctx.
            Some(f) => unsafe { f(self.ops.ctx) },
            None => self.lock_token(),
        }
    }

    fn notify_local(&self) {
        if let Some(f) = self.ops.notify_local {
            // SAFETY: a function of the table, with its ctx.
            unsafe { f(self.ops.ctx) }
        }
    }
}
