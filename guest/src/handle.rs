//! What events, mutexes and section notifications share: a handle on an object (a hold
//! closed on drop), waiting for a condition on an object's sync words with the wake-up rule
//! of docs/FORMAT.md §6a, and waking the waiters after a change.

use core::time::Duration;

use vshm_format::layout::kind;
use vshm_format::{mailbox, sync, Generation, ObjectSlot, Status};

use crate::over_device::Held;
use crate::{Error, Namespace, Transport};

/// How long one wait lasts before the caller's loop looks again (an infinite wait is a
/// loop of these).
const FOREVER_SLICE: Duration = Duration::from_secs(3600);

/// Looks a waiter takes at its condition before it asks to be rung and sleeps (a few µs: each
/// is a few shared-memory loads and a spin hint): a peer that answers within them is seen
/// without a ring, a sleep and a wake-up, which cost more (BENCHMARKS.md P3).
const SPIN_LOOKS: u32 = 512;

/// A hold on one object (slot, generation), released when dropped.
#[derive(Debug)]
pub(crate) struct ObjectHandle<'ns, T: Transport> {
    pub(crate) ns: &'ns Namespace<T>,
    pub(crate) slot: ObjectSlot,
    pub(crate) generation: Generation,
    pub(crate) flags: u32,
    /// What CLOSE names it by over the device (0 over a header).
    handle: u64,
    open: bool,
}

impl<'ns, T: Transport> ObjectHandle<'ns, T> {
    /// Wraps a hold the namespace just took.
    pub(crate) fn new(ns: &'ns Namespace<T>, held: &Held) -> ObjectHandle<'ns, T> {
        ObjectHandle {
            ns,
            slot: held.slot,
            generation: held.generation,
            flags: held.flags,
            handle: held.handle,
            open: true,
        }
    }

    /// One more hold on the same object (over the device: STATUS_NOT_SUPPORTED, a VM opens
    /// by name).
    pub(crate) fn duplicate(&self) -> Result<ObjectHandle<'ns, T>, Error> {
        if self.ns.device().is_some() {
            return Err(Status::NotSupported.into());
        }
        let info = self.ns.hold(self.slot, self.generation, true)?;
        Ok(ObjectHandle::new(self.ns, &Held::from_entry(&info)))
    }

    /// Releases the hold now, reporting a failure (drop ignores it).
    pub(crate) fn close(mut self) -> Result<(), Error> {
        self.release_now()
    }

    /// Releases the hold now; the handle is inert afterwards (for owners with a `Drop`).
    pub(crate) fn release_now(&mut self) -> Result<(), Error> {
        if !self.open {
            return Ok(());
        }
        self.open = false;
        self.ns.release(self.slot, self.generation, self.handle)
    }

    /// Whether the hold is still there.
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// Wakes the waiters of this object (after a change that found some).
    pub(crate) fn wake(&self) -> Result<(), Error> {
        self.ns.wake_object(self.slot, self.generation)
    }

    /// Waits until `cond` holds or `timeout` passes (`None`: no limit). Before each check it
    /// asks to be rung on the next change of the object, so no change is missed (§6a).
    /// `Ok(false)` on timeout; an error from `cond` ends the wait with that error.
    pub(crate) fn wait_for(
        &self,
        timeout: Option<Duration>,
        cond: &mut dyn FnMut() -> Result<bool, Error>,
    ) -> Result<bool, Error> {
        spin_then_wait_on(self.ns, self.slot, timeout, cond)
    }
}

/// [`ObjectHandle::wait_for`] for any object slot this peer holds: looks at `cond` for a
/// moment first ([`SPIN_LOOKS`], unless `timeout` is zero), then waits with the wake-up rule.
pub(crate) fn spin_then_wait_on<T: Transport>(
    ns: &Namespace<T>,
    slot: ObjectSlot,
    timeout: Option<Duration>,
    cond: &mut dyn FnMut() -> Result<bool, Error>,
) -> Result<bool, Error> {
    if timeout != Some(Duration::ZERO) {
        ns.attached()?;
        for _ in 0..SPIN_LOOKS {
            if cond()? {
                return Ok(true);
            }
            core::hint::spin_loop();
        }
    }
    wait_on(ns, slot, timeout, cond)
}

/// Waits for `cond` on object `slot` with the wake-up rule (FORMAT.md §6a): asks to be rung
/// before every look, sleeps between rings.
pub(crate) fn wait_on<T: Transport>(
    ns: &Namespace<T>,
    slot: ObjectSlot,
    timeout: Option<Duration>,
    cond: &mut dyn FnMut() -> Result<bool, Error>,
) -> Result<bool, Error> {
    loop {
        let mut outcome: Result<bool, Error> = Ok(false);
        let done = ns.transport().wait_until(
            &mut || {
                outcome = ns.attached().and_then(|()| {
                    let (mem, layout) = (&ns.mem(), ns.layout());
                    sync::register_waiter(mem, layout, slot, ns.peer_slot)?;
                    cond()
                });
                !matches!(outcome, Ok(false))
            },
            timeout.unwrap_or(FOREVER_SLICE),
        )?;
        if done {
            return outcome;
        }
        if timeout.is_some() {
            return Ok(false);
        }
    }
}

impl<T: Transport> Drop for ObjectHandle<'_, T> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.ns.release(self.slot, self.generation, self.handle);
        }
    }
}

/// Create-or-open of an event or mutex (no memory).
pub(crate) fn create_sync<'ns, T: Transport>(
    ns: &'ns Namespace<T>,
    name: Option<&str>,
    object_kind: u32,
    persistent: bool,
    manual_reset: bool,
) -> Result<(ObjectHandle<'ns, T>, crate::Disposition), Error> {
    debug_assert!(matches!(object_kind, kind::EVENT | kind::MUTEX));
    let req = mailbox::create_sync_request(name, object_kind, persistent, manual_reset);
    let (held, disposition) = ns.create_object(name, object_kind, &req)?;
    Ok((ObjectHandle::new(ns, &held), disposition))
}
