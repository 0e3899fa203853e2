//! Robust named mutexes across VMs and host processes (docs/FORMAT.md §6a). Uncontended
//! lock and unlock are one CAS on the entry's owner word, no host; contended lockers queue
//! at the host (first come, first served) and sleep until it hands the mutex over. When the
//! owner dies, vshmd releases the mutex and the next owner is told STATUS_ABANDONED.
//!
//! A mutex is held by a thread (the owner word carries the thread's token) and is not
//! recursive: locking it again from the owning thread is STATUS_POSSIBLE_DEADLOCK.
//!
//! Over the vshm device (docs/VHOST-USER.md §5.1) a VM sees no owner word: every lock is a
//! LOCK request that vshmd queues and answers when it hands the mutex over, every unlock an
//! UNLOCK; the queue, the FIFO order and the abandoned hand-over are the same ones.

use core::sync::atomic::{AtomicU32, Ordering};
use core::time::Duration;

use vshm_format::layout::{kind, mutex_word, op};
use vshm_format::sync::{self, Unlocked};
use vshm_format::{mailbox, Generation, ObjectSlot, PeerSlot, Status};

use crate::handle::{create_sync, ObjectHandle};
use crate::{Disposition, Error, HoldChange, Namespace, Transport};

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
    /// Over the device (no owner word to read): the token of the thread that locked it
    /// through this handle, 0 if none.
    device_owner: AtomicU32,
}

impl<T: Transport> Namespace<T> {
    /// Create-or-open of a mutex. A name that belongs to a section or an event is
    /// STATUS_INVALID_HANDLE; `None` creates an unnamed mutex.
    pub fn create_mutex(
        &self,
        name: Option<&str>,
        persistent: bool,
    ) -> Result<(Mutex<'_, T>, Disposition), Error> {
        let (handle, disposition) = create_sync(self, name, kind::MUTEX, persistent, false)?;
        Ok((Mutex::on(handle), disposition))
    }

    /// Opens an existing mutex by name, without a round trip to the backend.
    pub fn open_mutex(&self, name: &str) -> Result<Mutex<'_, T>, Error> {
        let held = self.open_object(name, kind::MUTEX)?;
        Ok(Mutex::on(ObjectHandle::new(self, &held)))
    }
}

impl<'ns, T: Transport> Mutex<'ns, T> {
    fn on(handle: ObjectHandle<'ns, T>) -> Mutex<'ns, T> {
        Mutex {
            handle,
            device_owner: AtomicU32::new(0),
        }
    }

    /// LOCK over the device (`timeout` zero: a try): the grant, or `None` at the timeout.
    fn device_lock(&self, timeout: Option<Duration>) -> Result<Option<Acquired>, Error> {
        let (h, ns) = (&self.handle, self.handle.ns);
        let Some(dev) = ns.device() else {
            return Err(Status::NotSupported.into());
        };
        let token = ns.transport().thread_token();
        let got = ns.device_lock(dev, h.slot, h.generation, token, timeout)?;
        Ok(got.map(|status| {
            self.device_owner.store(token, Ordering::SeqCst);
            if status == Status::Abandoned {
                Acquired::Abandoned
            } else {
                Acquired::Clean
            }
        }))
    }

    /// UNLOCK over the device. The record of the owner goes first: the device may hand
    /// the mutex to another thread of this VM before the reply comes back.
    fn device_unlock(&self) -> Result<(), Error> {
        let token = self.handle.ns.transport().thread_token();
        let _ = self
            .device_owner
            .compare_exchange(token, 0, Ordering::SeqCst, Ordering::SeqCst);
        match self.request(op::UNLOCK, token)? {
            Status::Success => Ok(()),
            s => Err(s.into()),
        }
    }

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
        let (_, token) = self.me();
        // Recorded so that this process's death releases it (docs/FORMAT.md §11b).
        ns.transport().hold_changed(HoldChange::Owned(
            self.handle.slot,
            self.handle.generation,
            token,
        ));
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
        if ns.device().is_some() {
            return self.device_lock(Some(Duration::ZERO));
        }
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
        if self.handle.ns.device().is_some() {
            return self
                .device_lock(timeout)?
                .ok_or_else(|| Status::Timeout.into());
        }
        self.lock_while(timeout, &mut || true)
    }

    /// [`Mutex::lock`] that also gives up (as on a timeout) when `keep_waiting` returns
    /// false; it is asked every 100 ms while queued (e.g. "no signal arrived"). Over the
    /// device each 100 ms is one LOCK, so the place in the queue is not kept between them.
    pub fn lock_while(
        &self,
        timeout: Option<Duration>,
        keep_waiting: &mut dyn FnMut() -> bool,
    ) -> Result<Acquired, Error> {
        if self.handle.ns.device().is_some() {
            return self.device_lock_while(timeout, keep_waiting);
        }
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

    /// [`Mutex::lock_while`] over the device: LOCKs of at most 100 ms each.
    fn device_lock_while(
        &self,
        timeout: Option<Duration>,
        keep_waiting: &mut dyn FnMut() -> bool,
    ) -> Result<Acquired, Error> {
        let mut left = timeout;
        loop {
            let this = left.map_or(LOCAL_OWNER_CHECK, |l| l.min(LOCAL_OWNER_CHECK));
            if let Some(got) = self.device_lock(Some(this.max(Duration::from_millis(1))))? {
                return Ok(got);
            }
            if let Some(l) = left.as_mut() {
                *l = l.saturating_sub(this);
            }
            if left.is_some_and(|l| l.is_zero()) || !keep_waiting() {
                return Err(Status::Timeout.into());
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
            // Naming the owner we saw: if the mutex moved on meanwhile (another releaser
            // was first, and it went to someone else, or to us), the host does nothing.
            let h = &self.handle;
            let req = mailbox::unlock_on_behalf_request(h.slot, h.generation, token, owner_token);
            let resp = ns.call(&req)?;
            match Status::from_code(resp.status).ok_or(Error::BadResponse(resp.status, h.slot))? {
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
        if ns.device().is_some() {
            return self.device_unlock();
        }
        ns.attached()?;
        let (me, token) = self.me();
        let result = match sync::mutex_unlock(&ns.mem(), ns.layout(), self.handle.slot, me)? {
            Unlocked::Released(false) => Ok(()),
            Unlocked::Released(true) => self.handle.wake(),
            Unlocked::ViaHost => match self.request(op::UNLOCK, token)? {
                Status::Success => Ok(()),
                s => Err(s.into()),
            },
            Unlocked::NotOwner => Err(Status::MutantNotOwned.into()),
        };
        // After the unlock: a process that dies before this is still named by the owner
        // word, which the cleanup checks before it releases anything.
        if !self.held_by(me).unwrap_or(true) {
            ns.transport()
                .hold_changed(HoldChange::Disowned(self.handle.slot, token));
        }
        result
    }

    /// Whether the calling thread holds the mutex now. Over the device: whether it locked
    /// it through this handle and has not unlocked it since.
    pub fn is_held(&self) -> Result<bool, Error> {
        let ns = self.handle.ns;
        if ns.device().is_some() {
            let token = ns.transport().thread_token();
            return Ok(self.device_owner.load(Ordering::SeqCst) == token);
        }
        self.held_by(self.me().0)
    }

    /// The owner's peer slot and thread token now, `None` if free (a hint). Over the
    /// device: STATUS_NOT_SUPPORTED (a VM sees no owner word).
    pub fn owner(&self) -> Result<Option<(PeerSlot, u32)>, Error> {
        let ns = self.handle.ns;
        if ns.device().is_some() {
            return Err(Status::NotSupported.into());
        }
        let word = sync::sync_word(&ns.mem(), ns.layout(), self.handle.slot)?;
        Ok(mutex_word::slot(word).map(|s| (s, mutex_word::token(word))))
    }

    /// Another handle on the same mutex.
    pub fn duplicate(&self) -> Result<Mutex<'ns, T>, Error> {
        Ok(Mutex::on(self.handle.duplicate()?))
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
