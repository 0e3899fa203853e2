//! One VM's vshm virtio device (docs/VHOST-USER.md): the vhost-user backend side of its
//! request queue. A request is read from the VM's descriptor chain, answered by the
//! namespace on the VM's behalf ([`Arbitration`]), and — for an open — the section's pages
//! are mapped into the VM's window through the frontend (`SHMEM_MAP`) before the reply is
//! written; a close unmaps them (`SHMEM_UNMAP`) before the hold is released.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserMMap, VhostUserMMapFlags, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;
use vshm_format::layout::{kind, op, Request, Response, MAX_NAME_BYTES};
use vshm_format::mailbox;
use vshm_format::name::validate_name_bytes;
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed};
use vshm_format::{Generation, ObjectSlot, PeerId, Status};

use super::window::Window;
use super::{config_bytes, Arbitration, DeviceConfig, Notices};
use crate::arbiter::ProxyHold;

use vshm_format::virtio::{
    HandleFields, ListRecord, EVENT_BYTES, EVENT_QUEUE, LIST_RECORD_HEAD, LOCK_TRY, REQUEST_QUEUE,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, WAIT_SINCE,
};
pub use vshm_format::virtio::{
    MAP_WRITABLE, MAX_HANDLES, OPEN_READ_ONLY, OP_CLOSE, OP_LIST, OP_OPEN, OP_PEERS, OP_RESET,
    OP_SIGNAL, OP_WAIT, RESP_MAP_FLAGS_OFF, VSHM_F_EVENTQ, VSHM_F_READ_ONLY,
};
const QUEUE_SIZE: usize = 256;
/// `handle_event`'s id for the notices' bell (above the queues and the exit event).
pub const NOTICES_EVENT: u16 = 3;
/// The WAIT timer, non-blocking: the worker reads it only to clear it, and a wake-up that
/// reported it may find it already re-armed or cleared (a blocking read would then hang
/// the worker, with the device's lock held, for good).
fn nonblocking_timer() -> io::Result<TimerFd> {
    let t = TimerFd::new().map_err(io::Error::from)?;
    // SAFETY: fcntl on the timer's own descriptor; no memory is passed.
    let ok = unsafe {
        let flags = libc::fcntl(t.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(t.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(t)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How many LOCKs told TIMEOUT (or dropped) the device remembers, for a grant that may
/// still come for one (see `VshmDevice::unheard_locks`).
const UNHEARD_LOCKS: usize = 1024;

/// `handle_event`'s id for the WAIT timer.
pub const TIMER_EVENT: u16 = 4;

type Chain = DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap>>;

/// A WAIT the device answers later (docs/VHOST-USER.md §5.1): the request's chain stays
/// out of the used ring until then, and the request queue goes on.
struct PendingWait {
    chain: Chain,
    req_seq: u64,
    slot: u32,
    generation: u64,
    deadline: Option<Instant>,
    /// A LOCK: the thread's token (a grant nobody will hear of must be given back).
    lock: Option<u32>,
}

/// Which peer the VM is in the namespace, kept apart from the device (whose lock a request
/// holds for as long as it runs: a SHMEM_MAP the frontend never answers must not keep the
/// VM's departure from being handled).
#[derive(Debug, Default)]
pub struct Membership {
    id: Mutex<Option<PeerId>>,
    retired: AtomicBool,
}

impl Membership {
    /// The VM's peer id, if it has joined the namespace.
    pub fn id(&self) -> Option<PeerId> {
        *self
            .id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The VM disconnected: its device answers nothing more (a request still queued must
    /// not act under an id the namespace may give to the next VM). Its id, to reclaim.
    pub fn retire(&self) -> Option<PeerId> {
        self.retired.store(true, Ordering::SeqCst);
        self.id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn retired(&self) -> bool {
        self.retired.load(Ordering::SeqCst)
    }

    /// Records `id` unless the VM retired meanwhile (then the caller undoes the join).
    fn join(&self, id: PeerId) -> bool {
        let mut slot = self
            .id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.retired() {
            return false;
        }
        *slot = Some(id);
        true
    }
}

/// One open handle of the VM: where its section sits in the window.
#[derive(Debug, Clone, Copy)]
struct Mapped {
    slot: ObjectSlot,
    generation: Generation,
    /// The section's region offset (the memfd offset of its first byte).
    region_offset: u64,
    /// Bytes mapped from the window offset on (page multiple; 0 for events and mutexes).
    mapped: u64,
    writable: bool,
}

fn wait_response(status: Status, slot: u32, generation: u64, seq: u64) -> Response {
    let mut r = mailbox::status_response(status);
    r.slot = slot;
    r.generation = generation;
    // The object's change count when it completed (signals, notifies).
    r.size = seq;
    r
}

/// The device's state for one VM.
pub struct VshmDevice {
    arbitration: Arc<dyn Arbitration>,
    /// The peer id the namespace knows this VM by, once it asked for something (a VM that
    /// never sends a request takes no peer slot).
    vm: Arc<Membership>,
    memfd: Arc<File>,
    config: DeviceConfig,
    window: Window,
    /// Open handles by window offset (events and mutexes get a zero-length reservation
    /// key from a counter above the window, so every handle has a unique key).
    handles: BTreeMap<u64, Mapped>,
    next_key: u64,
    /// The channel to the frontend (SET_BACKEND_REQ_FD).
    frontend: Option<Backend>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
    acked: u64,
    /// What the namespace tells this VM between requests.
    notices: Arc<Notices>,
    /// WAITs not answered yet, by the id the namespace knows them by.
    waits: BTreeMap<u64, PendingWait>,
    /// LOCKs the VM was told timed out, or whose chains were dropped: (slot, generation,
    /// token) by id. A grant that still comes for one (it raced the cancel, or the loop
    /// answered the cancel late) is given back. The oldest are forgotten past
    /// [`UNHEARD_LOCKS`].
    unheard_locks: BTreeMap<u64, (u32, u64, u32)>,
    next_wait: u64,
    /// Rings at the earliest WAIT deadline.
    timer: TimerFd,
}

impl std::fmt::Debug for VshmDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VshmDevice")
            .field("vm", &self.vm.id())
            .field("config", &self.config)
            .field("handles", &self.handles.len())
            .field("frontend", &self.frontend.is_some())
            .finish_non_exhaustive()
    }
}

impl VshmDevice {
    /// A device for a VM that has just connected; it joins the namespace at its first
    /// request.
    pub fn new(
        arbitration: Arc<dyn Arbitration>,
        memfd: Arc<File>,
        config: DeviceConfig,
    ) -> io::Result<VshmDevice> {
        Ok(VshmDevice {
            arbitration,
            vm: Arc::new(Membership::default()),
            memfd,
            window: Window::new(config.window_size, config.page_size),
            config,
            handles: BTreeMap::new(),
            next_key: u64::MAX / 2,
            frontend: None,
            mem: None,
            event_idx: false,
            acked: 0,
            notices: Notices::new()?,
            waits: BTreeMap::new(),
            unheard_locks: BTreeMap::new(),
            next_wait: 0,
            timer: nonblocking_timer()?,
        })
    }

    /// The fds the device's thread must watch besides the queues, with their
    /// `handle_event` ids: the notices' bell and the WAIT timer.
    pub fn listeners(&self) -> [(RawFd, u16); 2] {
        [
            (self.notices.bell().as_raw_fd(), NOTICES_EVENT),
            (self.timer.as_raw_fd(), TIMER_EVENT),
        ]
    }

    /// Which peer the VM is (shared with whoever handles its departure).
    pub fn membership(&self) -> Arc<Membership> {
        Arc::clone(&self.vm)
    }

    /// The VM's peer id, joining the namespace at its first request; else the reply.
    fn member(&mut self) -> Result<PeerId, Status> {
        if self.vm.retired() {
            return Err(Status::InvalidHandle);
        }
        match self.vm.id() {
            Some(vm) => Ok(vm),
            None => match self.arbitration.connect(Arc::clone(&self.notices)) {
                Ok(vm) if !self.vm.join(vm) => {
                    // It left while joining: nothing may stay in its name.
                    self.arbitration.gone(vm);
                    Err(Status::InvalidHandle)
                }
                Ok(vm) => {
                    tracing::info!(vm = vm.raw(), "a vhost-user VM joined the namespace");
                    Ok(vm)
                }
                Err(status) => Err(status),
            },
        }
    }

    /// Answers one request (docs/VHOST-USER.md §5; WAIT and LIST, which need the chain,
    /// go through the queue: here WAIT never waits and LIST gets no room for records).
    pub fn answer(&mut self, req: &Request) -> Response {
        let vm = match self.member() {
            Ok(vm) => vm,
            Err(status) => {
                let mut r = mailbox::status_response(status);
                r.resp_seq = req.req_seq;
                return r;
            }
        };
        let mut resp = match req.op {
            OP_OPEN | op::CREATE if self.handles.len() >= MAX_HANDLES => {
                mailbox::status_response(Status::InsufficientResources)
            }
            // WAKE rings the waiters of a header a VM does not see; a LOCK's CANCEL is the
            // device's own business (its timeout, §5.1).
            op::CANCEL | op::WAKE => mailbox::status_response(Status::NotSupported),
            OP_OPEN => self.open(vm, req),
            OP_CLOSE => self.close(vm, req),
            OP_LIST => self.list(vm, 0).0,
            OP_PEERS => match self.arbitration.peers(vm) {
                Ok(p) => {
                    let mut r = mailbox::status_response(Status::Success);
                    p.write(&mut r);
                    r
                }
                Err(status) => mailbox::status_response(status),
            },
            op::CREATE => self.create(vm, req),
            // Everything else names an object by slot and generation: only one this VM
            // holds (it sees no table, and must not act on what it could only guess).
            _ if !self.holds(req.slot, req.generation) => {
                mailbox::status_response(Status::InvalidHandle)
            }
            op::GROW => self.grow(vm, req),
            OP_SIGNAL | OP_RESET => {
                let status = self.arbitration.signal(
                    vm,
                    ObjectSlot(req.slot),
                    Generation(req.generation),
                    req.op == OP_RESET,
                );
                let mut r = mailbox::status_response(status);
                r.slot = req.slot;
                r.generation = req.generation;
                r
            }
            // They need the chain (they may be answered later): `process_requests`.
            OP_WAIT | op::LOCK => mailbox::status_response(Status::InvalidParameter),
            _ => self.arbitration.request(vm, req),
        };
        resp.resp_seq = req.req_seq;
        resp
    }

    /// Whether this VM has a handle on (`slot`, `generation`).
    fn holds(&self, slot: u32, generation: u64) -> bool {
        self.handles
            .values()
            .any(|m| m.slot.raw() == slot && m.generation.raw() == generation)
    }

    fn open(&mut self, vm: PeerId, req: &Request) -> Response {
        let len = req.name_len as usize;
        if len == 0 || len > MAX_NAME_BYTES {
            return mailbox::status_response(Status::ObjectNameInvalid);
        }
        let name = match validate_name_bytes(&req.name[..len]) {
            Ok(n) => n,
            Err(e) => return mailbox::status_response(e.status()),
        };
        match self.arbitration.open(vm, name) {
            // A name of another kind than the one asked for (0: any) is not a handle on it.
            Ok(hold) if req.kind != 0 && hold.kind != req.kind => {
                let _ = self.arbitration.close(vm, hold.slot, hold.generation);
                mailbox::status_response(Status::InvalidHandle)
            }
            Ok(hold) => self.map(vm, hold, req.flags & OPEN_READ_ONLY == 0, Status::Success),
            Err(status) => mailbox::status_response(status),
        }
    }

    fn create(&mut self, vm: PeerId, req: &Request) -> Response {
        let writable = req.flags & OPEN_READ_ONLY == 0;
        let mut plain = *req;
        plain.flags &= !OPEN_READ_ONLY;
        match self.arbitration.create(vm, &plain) {
            Ok(hold) => {
                let status = if hold.created {
                    Status::Success
                } else {
                    Status::ObjectNameExists
                };
                self.map(vm, hold, writable, status)
            }
            Err(resp) => *resp,
        }
    }

    /// Maps a hold just taken into the window and builds the reply; on any failure the hold
    /// is released again and the status says why.
    fn map(&mut self, vm: PeerId, hold: ProxyHold, writable: bool, status: Status) -> Response {
        let undo = |this: &mut Self, why: Status| {
            let _ = this.arbitration.close(vm, hold.slot, hold.generation);
            mailbox::status_response(why)
        };
        let (key, mapped) = if hold.kind == kind::SECTION {
            let Some((at, _)) = self.window.reserve(hold.max_size.max(1)) else {
                return undo(self, Status::InsufficientResources);
            };
            let len = self.window.round(hold.size).unwrap_or(0);
            if len > 0 {
                if let Err(e) = self.shmem_map(hold.offset.raw(), at, len, writable) {
                    tracing::warn!(vm = vm.raw(), "SHMEM_MAP failed: {e}");
                    self.window.release(at);
                    return undo(self, Status::InsufficientResources);
                }
            }
            (at, len)
        } else {
            self.next_key += 1;
            (self.next_key, 0)
        };
        self.handles.insert(
            key,
            Mapped {
                slot: hold.slot,
                generation: hold.generation,
                region_offset: hold.offset.raw(),
                mapped,
                writable,
            },
        );
        let mut r = mailbox::status_response(status);
        r.slot = hold.slot.raw();
        r.generation = hold.generation.raw();
        // A section's window offset; for an event or a mutex a handle number above the
        // window. Either way what CLOSE names the handle by.
        r.offset = key;
        r.size = hold.size;
        r.max_size = hold.max_size;
        HandleFields {
            map_flags: if writable { MAP_WRITABLE } else { 0 },
            kind: hold.kind,
            object_flags: hold.flags,
            change_count: hold.change_count,
        }
        .write(&mut r);
        r
    }

    fn close(&mut self, vm: PeerId, req: &Request) -> Response {
        let key = req.size;
        match self.handles.get(&key) {
            Some(m) if m.slot.raw() == req.slot && m.generation.raw() == req.generation => {}
            _ => return mailbox::status_response(Status::InvalidHandle),
        }
        mailbox::status_response(match self.close_handle(vm, key) {
            Ok(()) => Status::Success,
            Err(s) => s,
        })
    }

    /// Closes the handle at window key `key`: its mapping goes, then its hold (a mutex it
    /// owns goes to the next locker as abandoned).
    fn close_handle(&mut self, vm: PeerId, key: u64) -> Result<(), Status> {
        let Some(m) = self.handles.remove(&key) else {
            return Err(Status::InvalidHandle);
        };
        // Unmapped before the hold goes: the memory may be someone else's the moment after.
        if m.mapped > 0 {
            if let Err(e) = self.shmem_unmap(key, m.mapped) {
                tracing::warn!(vm = vm.raw(), "SHMEM_UNMAP failed: {e}; the VM is cut off");
                // Never release a hold whose pages the VM may still reach.
                return Err(Status::InsufficientResources);
            }
        }
        if key < self.config.window_size {
            self.window.release(key);
        }
        if !self
            .handles
            .values()
            .any(|h| (h.slot, h.generation) == (m.slot, m.generation))
        {
            // Its last handle: what is still to be told about the object is no news to it.
            self.notices.forget(m.slot.raw(), m.generation.raw());
        }
        self.arbitration.close(vm, m.slot, m.generation)
    }

    /// A device reset (RESET_DEVICE: the guest's driver starts over and knows none of its
    /// handles): every handle is closed, so nothing the reset driver cannot name stays
    /// held, mapped or locked until the VM disconnects.
    fn close_all(&mut self) {
        let Some(vm) = self.vm.id() else {
            return;
        };
        let keys: Vec<u64> = self.handles.keys().copied().collect();
        let mut kept = 0usize;
        for key in keys {
            if self.close_handle(vm, key).is_err() {
                kept += 1;
            }
        }
        if kept > 0 {
            tracing::warn!(
                vm = vm.raw(),
                kept,
                "device reset: handles kept until disconnect"
            );
        }
    }

    fn grow(&mut self, vm: PeerId, req: &Request) -> Response {
        let resp = self.arbitration.request(vm, req);
        // The response names the section's size also when the section is already larger
        // (INVALID_PARAMETER: another peer grew it): a GROW to the size it knows is how a VM
        // catches up with others' growth.
        let names_size = match Status::from_code(resp.status) {
            Some(Status::Success) => true,
            Some(Status::InvalidParameter) => {
                resp.slot == req.slot && resp.generation == req.generation
            }
            _ => false,
        };
        if !names_size {
            return resp;
        }
        // Every handle of this VM on the section maps the new pages after the old ones.
        let want = self.window.round(resp.size).unwrap_or(0);
        let grown: Vec<(u64, Mapped)> = self
            .handles
            .iter()
            .filter(|(_, m)| m.slot.raw() == req.slot && m.generation.raw() == req.generation)
            .map(|(&k, &m)| (k, m))
            .collect();
        for (key, m) in grown {
            if want <= m.mapped {
                continue;
            }
            let (from, len) = (m.mapped, want - m.mapped);
            match self.shmem_map(m.region_offset + from, key + from, len, m.writable) {
                Ok(()) => {
                    if let Some(h) = self.handles.get_mut(&key) {
                        h.mapped = want;
                    }
                }
                Err(e) => {
                    tracing::warn!(vm = vm.raw(), "SHMEM_MAP of grown pages failed: {e}")
                }
            }
        }
        resp
    }

    /// LIST (§5.3): the reply and the records that fit in `room` bytes.
    fn list(&mut self, vm: PeerId, room: usize) -> (Response, Vec<u8>) {
        let names = match self.arbitration.list(vm) {
            Ok(n) => n,
            Err(status) => return (mailbox::status_response(status), Vec::new()),
        };
        // As large as what the records need, never as large as the guest's buffer says (a
        // chain may offer gigabytes).
        let fits: usize = names.iter().map(|n| LIST_RECORD_HEAD + n.name.len()).sum();
        let mut out = vec![0u8; room.min(fits)];
        let (mut used, mut count, mut needed) = (0usize, 0u64, 0u64);
        let mut full = false;
        for n in &names {
            let rec = ListRecord {
                kind: u8::try_from(n.kind).unwrap_or(u8::MAX),
                flags: n.flags,
                name: n.name.as_bytes(),
            };
            needed += rec.len() as u64;
            if full {
                continue;
            }
            match rec.write(&mut out[used..]) {
                Some(len) => {
                    used += len;
                    count += 1;
                }
                None => full = true,
            }
        }
        out.truncate(used);
        let mut r = mailbox::status_response(Status::Success);
        r.size = used as u64;
        r.limit = count;
        r.max_size = needed;
        (r, out)
    }

    /// WAIT or LOCK (§5.1): the reply now, or `None` when the chain is kept until the
    /// event fires, the section changes, the mutex is handed over or the timeout passes.
    fn start_wait(&mut self, req: &Request, chain: &Chain) -> Option<Response> {
        let vm = match self.member() {
            Ok(vm) => vm,
            Err(status) => return Some(mailbox::status_response(status)),
        };
        if !self.holds(req.slot, req.generation) {
            return Some(mailbox::status_response(Status::InvalidHandle));
        }
        // At most a queue's worth pending (a driver can offer the same head again and again:
        // without a bound vshmd's memory and every look's work would grow with it).
        if self.waits.len() >= QUEUE_SIZE {
            return Some(mailbox::status_response(Status::InsufficientResources));
        }
        self.next_wait += 1;
        let id = self.next_wait;
        let slot = ObjectSlot(req.slot);
        let generation = Generation(req.generation);
        let (now, timeout_ms) = if req.op == op::LOCK {
            // LOCK: `size` is the thread's token (as the mailbox's), `max_size` the timeout.
            let Ok(token) = u32::try_from(req.size) else {
                return Some(mailbox::status_response(Status::InvalidParameter));
            };
            let queue = req.flags & LOCK_TRY == 0;
            let now = self
                .arbitration
                .lock(vm, id, slot, generation, token, queue);
            (now, req.max_size)
        } else {
            let seen = (req.flags & WAIT_SINCE != 0).then_some(req.max_size);
            let now = self.arbitration.wait(vm, id, slot, generation, seen);
            (now, req.size)
        };
        if let Some((status, seq)) = now {
            return Some(wait_response(status, req.slot, req.generation, seq));
        }
        let deadline = (timeout_ms > 0)
            .then(|| Instant::now() + Duration::from_millis(timeout_ms.min(1 << 40)));
        self.waits.insert(
            id,
            PendingWait {
                chain: chain.clone(),
                req_seq: req.req_seq,
                slot: req.slot,
                generation: req.generation,
                deadline,
                lock: (req.op == op::LOCK)
                    .then(|| u32::try_from(req.size).ok())
                    .flatten(),
            },
        );
        self.arm_timer();
        None
    }

    /// Takes every pending WAIT back from the namespace and forgets its chain (the queue is
    /// starting over).
    fn drop_waits(&mut self) {
        if let Some(vm) = self.vm.id() {
            let ids: Vec<u64> = self.waits.keys().copied().collect();
            for id in ids {
                self.arbitration.cancel_wait(vm, id);
                self.forget_lock(id);
            }
            // A WAIT or LOCK a look completed in this same instant has its answer in the
            // notices already (the look pushed it before the cancel ran), and nobody will
            // hear it: a LOCK's grant is given back, and so is the signal a WAIT took from
            // an auto-reset event.
            for (id, status, _) in self.notices.take_done() {
                let wait = self.waits.get(&id).filter(|w| w.lock.is_none());
                if let (Status::Success, Some(w)) = (status, wait) {
                    let (slot, generation) = (ObjectSlot(w.slot), Generation(w.generation));
                    self.arbitration.give_back_signal(slot, generation);
                }
                self.give_back_unheard(vm, id, status);
            }
        }
        self.waits.clear();
        self.arm_timer();
    }

    /// Remembers pending request `id`, if it is a LOCK, as one the VM will not hear the
    /// grant of.
    fn forget_lock(&mut self, id: u64) {
        if let Some(w) = self.waits.get(&id) {
            if let Some(token) = w.lock {
                self.unheard_locks.insert(id, (w.slot, w.generation, token));
                while self.unheard_locks.len() > UNHEARD_LOCKS {
                    self.unheard_locks.pop_first();
                }
            }
        }
    }

    /// A completion for `id` that nobody is waiting for: if it granted a LOCK the VM was
    /// told it did not get, the mutex is given back (still abandoned if it was).
    fn give_back_unheard(&mut self, vm: PeerId, id: u64, status: Status) {
        let Some((slot, generation, token)) = self.unheard_locks.remove(&id) else {
            return;
        };
        if matches!(status, Status::Success | Status::Abandoned) {
            self.arbitration
                .give_back(vm, ObjectSlot(slot), Generation(generation), token, status);
        }
    }

    /// Sets the timer to the earliest WAIT deadline (or disarms it).
    fn arm_timer(&mut self) {
        let next = self.waits.values().filter_map(|w| w.deadline).min();
        let _ = match next {
            Some(at) => {
                let d = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_micros(100));
                self.timer.reset(d, None)
            }
            None => self.timer.clear(),
        };
    }

    /// Answers WAIT `id` with `resp` into the chain it came in.
    fn complete_wait(&mut self, vring: &VringRwLock, id: u64, mut resp: Response) {
        let Some(w) = self.waits.remove(&id) else {
            return;
        };
        resp.resp_seq = w.req_seq;
        let head = w.chain.head_index();
        let written = match w.chain.clone().writer(w.chain.memory()) {
            Ok(mut wr) if wr.available_bytes() >= bytes_of(&resp).len() => wr
                .write_all(bytes_of(&resp))
                .map(|()| bytes_of(&resp).len())
                .unwrap_or(0),
            _ => 0,
        };
        let _ = vring.add_used(head, u32::try_from(written).unwrap_or(0));
    }

    /// Answers the WAITs the namespace completed and those whose time is up.
    fn finish_waits(&mut self, vring: &VringRwLock, expired: bool) -> io::Result<()> {
        let mut answered = false;
        if expired {
            // Clears it if it fired; EAGAIN (it did not, or was re-armed) is no error: the
            // deadlines are what count.
            let _ = self.timer.wait();
            let now = Instant::now();
            let due: Vec<u64> = self
                .waits
                .iter()
                .filter(|(_, w)| w.deadline.is_some_and(|d| d <= now))
                .map(|(&id, _)| id)
                .collect();
            let vm = self.vm.id();
            for id in due {
                // Taken back, or already completed (then its answer is in the notices).
                let cancelled = vm.is_none_or(|vm| self.arbitration.cancel_wait(vm, id));
                if cancelled {
                    // Told TIMEOUT: a grant that still comes (the loop answered the cancel
                    // late) goes back.
                    self.forget_lock(id);
                    let (slot, generation) = self
                        .waits
                        .get(&id)
                        .map_or((0, 0), |w| (w.slot, w.generation));
                    self.complete_wait(
                        vring,
                        id,
                        wait_response(Status::Timeout, slot, generation, 0),
                    );
                    answered = true;
                }
            }
        }
        for (id, status, seq) in self.notices.take_done() {
            let Some((slot, generation)) = self.waits.get(&id).map(|w| (w.slot, w.generation))
            else {
                if let Some(vm) = self.vm.id() {
                    self.give_back_unheard(vm, id, status);
                }
                continue;
            };
            self.complete_wait(vring, id, wait_response(status, slot, generation, seq));
            answered = true;
        }
        self.arm_timer();
        if answered {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Fills the buffers the driver posted on the event queue with waiting events.
    fn fill_events(&mut self, vring: &VringRwLock) -> io::Result<()> {
        if self.acked & VSHM_F_EVENTQ == 0 {
            self.notices.drop_events();
            return Ok(());
        }
        let Some(atomic) = self.mem.clone() else {
            return Ok(());
        };
        let mut filled = false;
        loop {
            if self.event_idx {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
            }
            while self.notices.events_waiting() > 0 {
                let mem = atomic.memory();
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = chain else {
                    break;
                };
                let head = chain.head_index();
                let Some(event) = self.notices.pop_event() else {
                    // Cannot happen (one thread takes events); give the buffer back empty.
                    let _ = vring.add_used(head, 0);
                    break;
                };
                let bytes = event.to_bytes();
                let written = match chain.writer(&mem) {
                    Ok(mut w) if w.available_bytes() >= EVENT_BYTES => {
                        w.write_all(&bytes).map(|()| EVENT_BYTES).unwrap_or(0)
                    }
                    _ => 0,
                };
                if written == 0 {
                    // A buffer too small for an event: used empty, the event kept.
                    self.notices.unpop_event(event);
                }
                vring
                    .add_used(head, u32::try_from(written).unwrap_or(0))
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
                filled = true;
            }
            if !self.event_idx
                || self.notices.events_waiting() == 0
                || !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
            {
                break;
            }
        }
        if self.event_idx && self.notices.events_waiting() == 0 {
            let _ = vring.enable_notification();
        }
        if filled {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    fn shmem_map(&self, fd_offset: u64, at: u64, len: u64, writable: bool) -> io::Result<()> {
        let frontend = self.frontend.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "no backend request channel")
        })?;
        let msg = VhostUserMMap {
            shmid: 0,
            fd_offset,
            shm_offset: at,
            len,
            flags: if writable {
                VhostUserMMapFlags::WRITABLE.bits()
            } else {
                VhostUserMMapFlags::default().bits()
            },
            ..Default::default()
        };
        frontend.shmem_map(&msg, &*self.memfd).map(|_| ())
    }

    fn shmem_unmap(&self, at: u64, len: u64) -> io::Result<()> {
        let frontend = self.frontend.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "no backend request channel")
        })?;
        let msg = VhostUserMMap {
            shmid: 0,
            shm_offset: at,
            len,
            ..Default::default()
        };
        frontend.shmem_unmap(&msg).map(|_| ())
    }

    /// Serves every request waiting in the request queue.
    fn process_requests(&mut self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.clone() else {
            return Ok(());
        };
        loop {
            let mem = atomic.memory();
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else {
                break;
            };
            let head = chain.head_index();
            let mut req: Request = zeroed();
            let read = chain
                .clone()
                .reader(&mem)
                .ok()
                .and_then(|mut r| r.read_exact(bytes_of_mut(&mut req)).ok());
            let mut extra = Vec::new();
            let resp = match read {
                Some(()) if req.op == OP_WAIT || req.op == op::LOCK => {
                    match self.start_wait(&req, &chain) {
                        Some(mut r) => {
                            r.resp_seq = req.req_seq;
                            r
                        }
                        // Answered later: the queue goes on.
                        None => continue,
                    }
                }
                Some(()) if req.op == OP_LIST => {
                    let room = chain
                        .clone()
                        .writer(&mem)
                        .map(|w| w.available_bytes())
                        .unwrap_or(0)
                        .saturating_sub(core::mem::size_of::<Response>());
                    let (mut r, records) = match self.member() {
                        Ok(vm) => self.list(vm, room),
                        Err(status) => (mailbox::status_response(status), Vec::new()),
                    };
                    r.resp_seq = req.req_seq;
                    extra = records;
                    r
                }
                Some(()) => self.answer(&req),
                None => mailbox::status_response(Status::InvalidParameter),
            };
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= bytes_of(&resp).len() + extra.len() => w
                    .write_all(bytes_of(&resp))
                    .and_then(|()| w.write_all(&extra))
                    .map(|()| bytes_of(&resp).len() + extra.len())
                    .unwrap_or(0),
                _ => 0,
            };
            let used = u32::try_from(written).unwrap_or(0);
            vring
                .add_used(head, used)
                .map_err(|e| io::Error::other(format!("{e:?}")))?;
        }
        vring.signal_used_queue()
    }
}

impl VhostUserBackendMut for VshmDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VSHM_F_READ_ONLY
            | VSHM_F_EVENTQ
    }

    fn acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::SHMEM
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&mut self) {
        // vhost-user-backend forgets the acked features at a reset; so does the device.
        self.acked = 0;
        self.drop_waits();
        self.close_all();
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE (a guest reset or reboot, a driver reload): the chains kept for
        // WAITs name nothing any more; answering them into the next ring would write into
        // memory the guest has reused.
        if queue_index == u32::from(REQUEST_QUEUE) {
            self.drop_waits();
        }
        Ok(())
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let all = config_bytes(&self.config);
        let start = (offset as usize).min(all.len());
        let end = start.saturating_add(size as usize).min(all.len());
        all[start..end].to_vec()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        // vhost-user-backend has set its flags from what was negotiated: a frontend without
        // SHMEM gets its opens refused (the map fails), never a section it cannot be shown.
        self.frontend = Some(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // What ends a vring worker when the VM is gone (`super::serve_one`).
        new_event_consumer_and_notifier(EventFlag::empty()).ok()
    }

    fn get_shmem_config(&self) -> io::Result<VhostUserShMemConfig> {
        Ok(VhostUserShMemConfig::new(1, &[self.config.window_size]))
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let (Some(vring), Some(events)) = (
            vrings.get(usize::from(REQUEST_QUEUE)),
            vrings.get(usize::from(EVENT_QUEUE)),
        ) else {
            return Ok(());
        };
        match device_event {
            REQUEST_QUEUE => {}
            EVENT_QUEUE => return self.fill_events(events),
            NOTICES_EVENT | TIMER_EVENT => {
                if device_event == NOTICES_EVENT {
                    let _ = self.notices.bell().read();
                }
                self.finish_waits(vring, device_event == TIMER_EVENT)?;
                return self.fill_events(events);
            }
            _ => return Ok(()),
        }
        if self.event_idx {
            loop {
                vring
                    .disable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?;
                self.process_requests(vring)?;
                if !vring
                    .enable_notification()
                    .map_err(|e| io::Error::other(format!("{e:?}")))?
                {
                    break;
                }
            }
            Ok(())
        } else {
            self.process_requests(vring)
        }
    }
}
