//! Named events (the namespace's second kind of object): signal, reset, wait; auto-reset
//! (a wait consumes the signal) or manual-reset (stays signalled until reset). The state is
//! the entry's `sync` word (docs/FORMAT.md §6a); a signal nobody waits for costs no round
//! trip, one that finds waiters asks the host to ring exactly those.

use core::time::Duration;

use vshm_format::layout::{kind, object_flags};
use vshm_format::{sync, Generation, ObjectSlot, Status};

use crate::handle::{create_sync, ObjectHandle};
use crate::{Disposition, Error, Namespace, Transport};

/// Parameters of [`Namespace::create_event`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventOptions {
    /// Stays signalled until [`Event::reset`] (else each successful wait resets it).
    pub manual_reset: bool,
    /// Lives until deleted rather than until the last handle closes.
    pub persistent: bool,
}

/// A handle on an event. Dropping it closes the handle.
#[derive(Debug)]
pub struct Event<'ns, T: Transport> {
    handle: ObjectHandle<'ns, T>,
}

impl<T: Transport> Namespace<T> {
    /// Create-or-open of an event. A name that belongs to a section or a mutex is
    /// STATUS_INVALID_HANDLE; `None` creates an unnamed event.
    pub fn create_event(
        &self,
        name: Option<&str>,
        options: &EventOptions,
    ) -> Result<(Event<'_, T>, Disposition), Error> {
        let (handle, disposition) = create_sync(
            self,
            name,
            kind::EVENT,
            options.persistent,
            options.manual_reset,
        )?;
        Ok((Event { handle }, disposition))
    }

    /// Opens an existing event by name, without a round trip to the backend.
    pub fn open_event(&self, name: &str) -> Result<Event<'_, T>, Error> {
        let held = self.open_object(name, kind::EVENT)?;
        Ok(Event {
            handle: ObjectHandle::new(self, &held),
        })
    }
}

impl<'ns, T: Transport> Event<'ns, T> {
    /// Object table slot.
    pub fn slot(&self) -> ObjectSlot {
        self.handle.slot
    }

    /// Generation (with the slot, the event's identity).
    pub fn generation(&self) -> Generation {
        self.handle.generation
    }

    /// Whether a signal stays until [`Event::reset`].
    pub fn manual_reset(&self) -> bool {
        self.handle.flags & object_flags::MANUAL_RESET != 0
    }

    /// Signals the event and wakes its waiters: every waiter of a manual-reset event, one
    /// waiter of an auto-reset event (the others sleep again).
    pub fn signal(&self) -> Result<(), Error> {
        let ns = self.handle.ns;
        if let Some(dev) = ns.device() {
            return ns.device_signal(dev, self.handle.slot, self.handle.generation, false);
        }
        ns.attached()?;
        if sync::event_set(&ns.mem(), ns.layout(), self.handle.slot)? {
            self.handle.wake()?;
        }
        Ok(())
    }

    /// Clears a signal nobody took (a manual-reset event stays signalled until this).
    pub fn reset(&self) -> Result<(), Error> {
        let ns = self.handle.ns;
        if let Some(dev) = ns.device() {
            return ns.device_signal(dev, self.handle.slot, self.handle.generation, true);
        }
        ns.attached()?;
        sync::event_reset(&ns.mem(), ns.layout(), self.handle.slot)?;
        Ok(())
    }

    /// Waits until the event is signalled (and, if auto-reset, takes the signal), or
    /// `timeout` passes (`None`: no limit) → `Error::Status(Status::Timeout)`.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<(), Error> {
        let ns = self.handle.ns;
        if let Some(dev) = ns.device() {
            let (slot, generation) = (self.handle.slot, self.handle.generation);
            return match ns.device_wait(dev, slot, generation, None, timeout)? {
                Some(_) => Ok(()),
                None => Err(Status::Timeout.into()),
            };
        }
        let (slot, manual) = (self.handle.slot, self.manual_reset());
        let taken = self.handle.wait_for(timeout, &mut || {
            Ok(sync::event_try_take(&ns.mem(), ns.layout(), slot, manual)?)
        })?;
        if taken {
            Ok(())
        } else {
            Err(Status::Timeout.into())
        }
    }

    /// Whether the event is signalled now (a hint: it may change at once). Over the
    /// device: STATUS_NOT_SUPPORTED (a VM sees no sync word; wait with a short timeout).
    pub fn is_signaled(&self) -> Result<bool, Error> {
        let ns = self.handle.ns;
        if ns.device().is_some() {
            return Err(Status::NotSupported.into());
        }
        Ok(sync::sync_word(&ns.mem(), ns.layout(), self.handle.slot)? != 0)
    }

    /// Signals counted on this event so far (by anyone, this handle's included).
    ///
    /// Over the device (a VM sees no sync word) it is the latest count the device told:
    /// the open's reply, then each SIGNALLED event ([`crate::DeviceTransport::news`]). A
    /// lower bound that lags: a signal is counted here a moment after it was made (at once
    /// when it came with a WAKE, by vshmd's next tick, 200 ms, when not), and only signals
    /// made while this peer held the event. STATUS_NOT_SUPPORTED if the device transport
    /// keeps no news (no event queue).
    pub fn signal_count(&self) -> Result<u64, Error> {
        let ns = self.handle.ns;
        if let Some(dev) = ns.device() {
            return dev
                .news(self.handle.slot, self.handle.generation)
                .map(|n| n.change_count)
                .ok_or(Status::NotSupported.into());
        }
        Ok(sync::signal_seq(&ns.mem(), ns.layout(), self.handle.slot)?)
    }

    /// Another handle on the same event.
    pub fn duplicate(&self) -> Result<Event<'ns, T>, Error> {
        Ok(Event {
            handle: self.handle.duplicate()?,
        })
    }

    /// Closes the handle now (dropping does the same, ignoring failures).
    pub fn close(self) -> Result<(), Error> {
        self.handle.close()
    }
}
