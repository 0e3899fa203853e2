//! Robust named mutexes across VMs and host processes (docs/FORMAT.md §6a). Uncontended
//! lock and unlock are one CAS on the entry's owner word, no host; contended lockers queue
//! at the host (first come, first served) and sleep until it hands the mutex over. When the
//! owner dies, vshmd releases the mutex and the next owner is told STATUS_ABANDONED.
//!
//! A mutex is held by a thread (the owner word carries the thread's token) and is not
//! recursive: locking it again from the owning thread is STATUS_POSSIBLE_DEADLOCK.

use core::time::Duration;

use vshm_format::layout::{kind, mutex_word, op};
use vshm_format::sync::{self, Unlocked};
use vshm_format::{mailbox, Generation, ObjectSlot, PeerSlot, Status};

use crate::handle::{create_sync, ObjectHandle};
use crate::{Disposition, Error, Namespace, Transport};

/// While queued, how often a locker looks whether the owner is a dead process of its own
/// peer (a guest's processes share one peer, so vshmd cannot see that death).
const LOCAL_OWNER_CHECK: Duration = Duration::from_millis(100);

/// How a lock was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// STATUS_SUCCESS.
    Clean,
    /// STATUS_ABANDONED: held now, but the previous owner died holding it, so what it
    /// protects may be half-updated.
    Abandoned,
}

impl Acquired {
    /// The NTSTATUS of this outcome.
    pub fn status(self) -> Status {
        match self {
            Acquired::Clean => Status::Success,
            Acquired::Abandoned => Status::Abandoned,
        }
    }
}

/// A handle on a mutex. Dropping it closes the handle and, if the calling thread holds the
/// mutex, releases it first.
#[derive(Debug)]
pub struct Mutex<'ns, T: Transport> {
    handle: ObjectHandle<'ns, T>,
}

impl<T: Transport> Namespace<T> {
    /// Create-or-open of a mutex. A name that belongs to a section or an event is
    /// STATUS_INVALID_HANDLE; `None` creates an unnamed mutex.
    pub fn create_mutex(
        &self,
        name: Option<&str>,
        persistent: bool,
    ) -> Result<(Mutex<'_, T>, Disposition), Error> {
        self.mutexes_supported()?;
        let (handle, disposition) = create_sync(self, name, kind::MUTEX, persistent, false)?;
        Ok((Mutex { handle }, disposition))
    }

    /// Opens an existing mutex by name, without a round trip to the backend.
    pub fn open_mutex(&self, name: &str) -> Result<Mutex<'_, T>, Error> {
        self.mutexes_supported()?;
        let held = self.open_object(name, kind::MUTEX)?;
        Ok(Mutex {
            handle: ObjectHandle::new(self, &held),
        })
    }

    /// Over the vshm device mutexes are not there yet (docs/VHOST-USER.md §5.1: LOCK is
    /// answered STATUS_NOT_SUPPORTED).
    fn mutexes_supported(&self) -> Result<(), Error> {
        match self.device() {
            Some(_) => Err(Status::NotSupported.into()),
            None => Ok(()),
        }
    }
}

impl<'ns, T: Transport> Mutex<'ns, T> {
    /// Object table slot.
    pub fn slot(&self) -> ObjectSlot {
        self.handle.slot
    }

    /// Generation (with the slot, the mutex's identity).
    pub fn generation(&self) -> Generation {
        self.handle.generation
    }

    /// The calling thread's owner word.
    fn me(&self) -> (u64, u32) {
        let ns = self.handle.ns;
        let token = ns.transport().thread_token();
        (mutex_word::owner(ns.peer_slot, token), token)
    }

    fn held_by(&self, owner: u64) -> Result<bool, Error> {
        let ns = self.handle.ns;
        Ok(sync::mutex_held_by(
            &ns.mem(),
            ns.layout(),
            self.handle.slot,
            owner,
        )?)
    }

    /// Just became the owner: was the last owner dead?
    fn acquired(&self) -> Result<Acquired, Error> {
        let ns = self.handle.ns;
        Ok(
            if sync::mutex_take_abandoned(&ns.mem(), ns.layout(), self.handle.slot)? {
                Acquired::Abandoned
            } else {
                Acquired::Clean
            },
        )
    }

    /// Posts LOCK, UNLOCK or CANCEL and returns the host's status.
    fn request(&self, op: u32, token: u32) -> Result<Status, Error> {
        let (h, ns) = (&self.handle, self.handle.ns);
        let resp = ns.call(&mailbox::mutex_request(op, h.slot, h.generation, token))?;
        Status::from_code(resp.status).ok_or(Error::BadResponse(resp.status, h.slot))
    }

    /// Takes the mutex if it is free, without waiting and without the host. `Ok(None)`
    /// if another thread holds it (or lockers are queued for it).
    pub fn try_lock(&self) -> Result<Option<Acquired>, Error> {
        let ns = self.handle.ns;
        ns.attached()?;
        let (me, _) = self.me();
        if self.held_by(me)? {
            return Err(Status::PossibleDeadlock.into());
        }
        if sync::mutex_try_lock(&ns.mem(), ns.layout(), self.handle.slot, me)? {
            return self.acquired().map(Some);
        }
        Ok(None)
    }

    /// Takes the mutex, waiting up to `timeout` (`None`: no limit) → on timeout
    /// `Error::Status(Status::Timeout)`. Waiters are served in arrival order.
    pub fn lock(&self, timeout: Option<Duration>) -> Result<Acquired, Error> {
        self.lock_while(timeout, &mut || true)
    }

    /// [`Mutex::lock`] that also gives up (as on a timeout) when `keep_waiting` returns
    /// false; it is asked every 100 ms while queued (e.g. "no signal arrived").
    pub fn lock_while(
        &self,
        timeout: Option<Duration>,
        keep_waiting: &mut dyn FnMut() -> bool,
    ) -> Result<Acquired, Error> {
        if let Some(got) = self.try_lock()? {
            return Ok(got);
        }
        let (me, token) = self.me();
        match self.request(op::LOCK, token)? {
            Status::Success => return self.acquired(),
            Status::Pending => {}
            s => return Err(s.into()),
        }
        match self.wait_handed(me, token, timeout, keep_waiting) {
            Ok(true) => self.acquired(),
            // Timed out or told to stop: leave the queue, then look once more (the host
            // may have handed it over just before it saw the cancel).
            Ok(false) => {
                self.request(op::CANCEL, token)?;
                if self.held_by(me)? {
                    return self.acquired();
                }
                Err(Status::Timeout.into())
            }
            // Never leave an entry behind in the queue, nor a mutex that nobody will
            // unlock: cancel, and give back what the host may have handed over meanwhile.
            Err(e) => {
                let _ = self.request(op::CANCEL, token);
                if self.held_by(me).unwrap_or(false) {
                    let _ = self.unlock();
                }
                Err(e)
            }
        }
    }

    /// Queued: waits until the host hands the mutex to `me` (`Ok(true)`), the timeout
    /// passes or `keep_waiting` says stop (`Ok(false)`), releasing a dead owner of this
    /// same peer on the way.
    fn wait_handed(
        &self,
        me: u64,
        token: u32,
        timeout: Option<Duration>,
        keep_waiting: &mut dyn FnMut() -> bool,
    ) -> Result<bool, Error> {
        let ns = self.handle.ns;
        let slot = self.handle.slot;
        let mut left = timeout;
        loop {
            let this = left.map_or(LOCAL_OWNER_CHECK, |l| l.min(LOCAL_OWNER_CHECK));
            let handed = self.handle.wait_for(Some(this), &mut || {
                Ok(sync::mutex_held_by(&ns.mem(), ns.layout(), slot, me)?)
            })?;
            if handed {
                return Ok(true);
            }
            self.release_dead_local_owner(token)?;
            if !keep_waiting() {
                return Ok(false);
            }
            if let Some(l) = left.as_mut() {
                *l = l.saturating_sub(this);
                if l.is_zero() {
                    return Ok(false);
                }
            }
        }
    }

    /// If the owner is a process of this same peer that has died (possible only in a
    /// guest, whose processes share the peer), asks the host to release it as abandoned.
    fn release_dead_local_owner(&self, token: u32) -> Result<(), Error> {
        let ns = self.handle.ns;
        let word = sync::sync_word(&ns.mem(), ns.layout(), self.handle.slot)?;
        let owner_token = mutex_word::token(word);
        let ours: Option<PeerSlot> = mutex_word::slot(word);
        if ours == Some(ns.peer_slot)
            && owner_token != token
            && !ns.transport().token_alive(owner_token)
        {
            match self.request(op::UNLOCK, token)? {
                Status::Success | Status::MutantNotOwned => {}
                s => return Err(s.into()),
            }
        }
        Ok(())
    }

    /// Releases the mutex; the first queued locker (if any) becomes the owner.
    /// STATUS_MUTANT_NOT_OWNED if the calling thread does not hold it.
    pub fn unlock(&self) -> Result<(), Error> {
        let ns = self.handle.ns;
        ns.attached()?;
        let (me, token) = self.me();
        match sync::mutex_unlock(&ns.mem(), ns.layout(), self.handle.slot, me)? {
            Unlocked::Released(false) => Ok(()),
            Unlocked::Released(true) => self.handle.wake(),
            Unlocked::ViaHost => match self.request(op::UNLOCK, token)? {
                Status::Success => Ok(()),
                s => Err(s.into()),
            },
            Unlocked::NotOwner => Err(Status::MutantNotOwned.into()),
        }
    }

    /// Whether the calling thread holds the mutex now.
    pub fn is_held(&self) -> Result<bool, Error> {
        self.held_by(self.me().0)
    }

    /// The owner's peer slot and thread token now, `None` if free (a hint).
    pub fn owner(&self) -> Result<Option<(PeerSlot, u32)>, Error> {
        let ns = self.handle.ns;
        let word = sync::sync_word(&ns.mem(), ns.layout(), self.handle.slot)?;
        Ok(mutex_word::slot(word).map(|s| (s, mutex_word::token(word))))
    }

    /// Another handle on the same mutex.
    pub fn duplicate(&self) -> Result<Mutex<'ns, T>, Error> {
        Ok(Mutex {
            handle: self.handle.duplicate()?,
        })
    }

    /// Closes the handle now (releasing the mutex first if this thread holds it).
    pub fn close(mut self) -> Result<(), Error> {
        if self.is_held()? {
            self.unlock()?;
        }
        self.handle.release_now()
    }
}

impl<T: Transport> Drop for Mutex<'_, T> {
    fn drop(&mut self) {
        if self.handle.is_open() && self.is_held().unwrap_or(false) {
            let _ = self.unlock();
        }
    }
}
