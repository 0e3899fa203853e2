//! The second kind of transport: the vshm virtio device (docs/VHOST-USER.md), which a VM
//! reaches through vshmd's vhost-user socket. There is no shared header: every namespace
//! operation is a request on the device's request queue, and the device maps into a window
//! (its shared-memory region 0) exactly the sections this peer opened.
//!
//! The seam is [`DeviceTransport`] (map = the window, ring + wait = a request and its
//! response). Wrapped in [`Device`] it is a [`Transport`], so [`crate::Namespace`] and
//! everything on it works over it unchanged: the namespace sees [`Transport::device`] and
//! sends requests instead of touching a header.

use core::time::Duration;

use vshm_format::layout::{Request, Response};
use vshm_format::shm::RawRegion;
use vshm_format::{Generation, ObjectSlot, PeerId};

use crate::{Transport, TransportError};

/// What the library needs from a vshm device.
///
/// Implementations: `crate::host::vhost_user::VhostUserTransport` (a host process that is
/// its own vhost-user frontend, feature `vhost-user`); planned: the Linux guest driver's
/// character device.
pub trait DeviceTransport {
    /// The window: a section this peer holds is mapped at the window offset its OPEN or
    /// CREATE answered, for the pages of its current size; everything else reads as zero.
    fn window(&self) -> RawRegion<'_>;

    /// Posts `req` on the request queue and waits at most `timeout` for its response
    /// (`Ok(None)` when none came: the request may still be carried out; the transport is
    /// to give back what its late answer granted, a handle, a mutex, a signal taken, as
    /// `VhostUserTransport` does). `records` is
    /// the room for LIST's records (§5.3), empty for every other operation. Several
    /// threads may call at once: a WAIT stays pending while later requests are answered.
    fn call(
        &self,
        req: &Request,
        records: &mut [u8],
        timeout: Duration,
    ) -> Result<Option<Response>, TransportError>;

    /// Sleeps for about `d` (a retry's pause; the device has nothing to wait on then).
    fn sleep(&self, d: Duration);

    /// A non-zero token naming the calling thread: a mutex locked over the device is owned
    /// by it (`Transport::thread_token`). The default (one thread) is 1.
    fn thread_token(&self) -> u32 {
        1
    }

    /// How long vshmd keeps destroyed memory in quarantine, in ms (the device's config
    /// space, docs/VHOST-USER.md §4): how long a CREATE refused only because of it is
    /// retried. `None`: not known (the library waits vshmd's default).
    fn quarantine_ms(&self) -> Option<u32> {
        None
    }

    /// Whether the device is gone for good (vshmd hung up): its mappings are gone with it,
    /// so the library fails reads and writes rather than show the zero pages left behind.
    fn gone(&self) -> bool {
        false
    }

    /// What the device said lately about the object (`slot`, `generation`) this peer holds
    /// a handle on (its event queue, docs/VHOST-USER.md §6, and the OPEN/CREATE replies).
    /// `None` when the transport keeps no such news (no event queue) or no handle on the
    /// object is open; forgotten when the last one closes.
    fn news(&self, _slot: ObjectSlot, _generation: Generation) -> Option<ObjectNews> {
        None
    }
}

/// What a device transport heard about an object held ([`DeviceTransport::news`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectNews {
    /// The object's name was deleted (by anyone) after a handle on it was made.
    pub deleted: bool,
    /// The object's change count (`signal_seq`: an event's signals, a section's notifies)
    /// as the latest OPEN/CREATE reply or event told it: a lower bound of the count now,
    /// which lags behind it by the time the news takes to come.
    pub change_count: u64,
}

/// A [`DeviceTransport`] as a [`Transport`]: what [`crate::Namespace::attach`] takes.
#[derive(Debug)]
pub struct Device<D>(pub D);

impl<D: DeviceTransport> Transport for Device<D> {
    /// The window (there is no region to see).
    fn region(&self) -> RawRegion<'_> {
        self.0.window()
    }

    /// A device peer has no ivshmem peer id: vshmd gives the VM one of its own, which the
    /// VM never needs.
    fn peer_id(&self) -> PeerId {
        PeerId::HOST
    }

    /// Nothing to ring: a device peer's rings are its requests.
    fn ring(&self, _peer: PeerId, _vector: u16) -> Result<(), TransportError> {
        Err(TransportError::NotSupported)
    }

    /// Polls `ready` in 1 ms steps (nothing rings a device peer outside its requests).
    fn wait_until(
        &self,
        ready: &mut dyn FnMut() -> bool,
        timeout: Duration,
    ) -> Result<bool, TransportError> {
        let step = Duration::from_millis(1);
        let mut waited = Duration::ZERO;
        loop {
            if ready() {
                return Ok(true);
            }
            if waited >= timeout {
                return Ok(false);
            }
            self.0.sleep(step);
            waited += step;
        }
    }

    fn thread_token(&self) -> u32 {
        self.0.thread_token()
    }

    fn device(&self) -> Option<&dyn DeviceTransport> {
        Some(&self.0)
    }
}
