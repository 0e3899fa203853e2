//! One VM's vshm virtio device (docs/VHOST-USER.md): the vhost-user backend side of its
//! request queue. A request is read from the VM's descriptor chain, answered by the
//! namespace on the VM's behalf ([`Arbitration`]), and — for an open — the section's pages
//! are mapped into the VM's window through the frontend (`SHMEM_MAP`) before the reply is
//! written; a close unmaps them (`SHMEM_UNMAP`) before the hold is released.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{
    VhostUserMMap, VhostUserMMapFlags, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Backend, VhostUserFrontendReqHandler};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vshm_format::layout::{kind, op, Request, Response, MAX_NAME_BYTES};
use vshm_format::mailbox;
use vshm_format::name::validate_name_bytes;
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed};
use vshm_format::{Generation, ObjectSlot, PeerId, Status};

use super::window::Window;
use super::{config_bytes, Arbitration, DeviceConfig};
use crate::arbiter::ProxyHold;

pub use vshm_format::virtio::{
    MAP_WRITABLE, MAX_HANDLES, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN, RESP_MAP_FLAGS_OFF,
    VSHM_F_EVENTQ, VSHM_F_READ_ONLY,
};
use vshm_format::virtio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
const REQUEST_QUEUE: u16 = 0;
const QUEUE_SIZE: usize = 256;

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
    ) -> VshmDevice {
        VshmDevice {
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
        }
    }

    /// Which peer the VM is (shared with whoever handles its departure).
    pub fn membership(&self) -> Arc<Membership> {
        Arc::clone(&self.vm)
    }

    /// Answers one request (docs/VHOST-USER.md §5).
    pub fn answer(&mut self, req: &Request) -> Response {
        let gone = |req: &Request| {
            let mut r = mailbox::status_response(Status::InvalidHandle);
            r.resp_seq = req.req_seq;
            r
        };
        if self.vm.retired() {
            return gone(req);
        }
        let vm = match self.vm.id() {
            Some(vm) => vm,
            None => match self.arbitration.connect() {
                Ok(vm) if !self.vm.join(vm) => {
                    // It left while joining: nothing may stay in its name.
                    self.arbitration.gone(vm);
                    return gone(req);
                }
                Ok(vm) => {
                    tracing::info!(vm = vm.raw(), "a vhost-user VM joined the namespace");
                    vm
                }
                Err(status) => {
                    let mut r = mailbox::status_response(status);
                    r.resp_seq = req.req_seq;
                    return r;
                }
            },
        };
        let mut resp = match req.op {
            OP_OPEN | op::CREATE if self.handles.len() >= MAX_HANDLES => {
                mailbox::status_response(Status::InsufficientResources)
            }
            // Waits and handoffs need the event queue, which is not there yet: a VM that
            // queued for a mutex would be made its owner without being told.
            op::LOCK | op::UNLOCK | op::CANCEL | op::WAKE => {
                mailbox::status_response(Status::NotSupported)
            }
            OP_OPEN => self.open(vm, req),
            OP_CLOSE => self.close(vm, req),
            op::CREATE => self.create(vm, req),
            // Everything else names an object by slot and generation: only one this VM
            // holds (it sees no table, and must not act on what it could only guess).
            _ if !self.holds(req.slot, req.generation) => {
                mailbox::status_response(Status::InvalidHandle)
            }
            op::GROW => self.grow(vm, req),
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
        let flags = if writable { MAP_WRITABLE } else { 0 };
        bytes_of_mut(&mut r)[RESP_MAP_FLAGS_OFF..RESP_MAP_FLAGS_OFF + 4]
            .copy_from_slice(&flags.to_le_bytes());
        r
    }

    fn close(&mut self, vm: PeerId, req: &Request) -> Response {
        let key = req.size;
        match self.handles.get(&key) {
            Some(m) if m.slot.raw() == req.slot && m.generation.raw() == req.generation => {}
            _ => return mailbox::status_response(Status::InvalidHandle),
        }
        let Some(m) = self.handles.remove(&key) else {
            return mailbox::status_response(Status::InvalidHandle);
        };
        // Unmapped before the hold goes: the memory may be someone else's the moment after.
        if m.mapped > 0 {
            if let Err(e) = self.shmem_unmap(key, m.mapped) {
                tracing::warn!(vm = vm.raw(), "SHMEM_UNMAP failed: {e}; the VM is cut off");
                // Never release a hold whose pages the VM may still reach.
                return mailbox::status_response(Status::InsufficientResources);
            }
        }
        if key < self.config.window_size {
            self.window.release(key);
        }
        match self.arbitration.close(vm, m.slot, m.generation) {
            Ok(()) => mailbox::status_response(Status::Success),
            Err(s) => mailbox::status_response(s),
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
            let resp = match read {
                Some(()) => self.answer(&req),
                None => mailbox::status_response(Status::InvalidParameter),
            };
            let written = match chain.writer(&mem) {
                Ok(mut w) if w.available_bytes() >= bytes_of(&resp).len() => w
                    .write_all(bytes_of(&resp))
                    .map(|()| bytes_of(&resp).len())
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
        if evset != EventSet::IN || device_event != REQUEST_QUEUE {
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(REQUEST_QUEUE)) else {
            return Ok(());
        };
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
