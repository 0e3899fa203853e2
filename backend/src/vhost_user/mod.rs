//! The vshm virtio device over vhost-user (docs/VHOST-USER.md, issue 11): a VM attached this
//! way sees no header, only the sections it opened, mapped into its shared-memory window by
//! the frontend when vshmd asks (`SHMEM_MAP`).
//!
//! The device ([`device::VshmDevice`]) runs on vhost-user-backend's threads; the namespace
//! it acts in runs elsewhere (the region's event loop, which alone owns the arbiter). The
//! seam between them is [`Arbitration`]: what the device may ask on a VM's behalf.
//! [`Local`] answers it from an arbiter behind a mutex (tests; a vshmd that runs the device
//! beside its loop hands the calls to the loop instead).

pub mod bridge;
pub mod device;
pub mod window;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vshm_format::layout::{Request, Response};
use vshm_format::virtio::VirtioVshmEvent;
use vshm_format::{Generation, ObjectSlot, PeerId, Status};

use crate::arbiter::{Arbiter, ProxyHold, ProxyListed, ProxyNews};
use crate::region::Region;

/// Default size of a VM's window (`--vhost-user PATH[,window=SIZE]`).
pub const DEFAULT_WINDOW: u64 = 256 << 20;

pub use vshm_format::virtio::DeviceConfig;

/// The 32 config-space bytes (little-endian, docs/VHOST-USER.md §4).
pub fn config_bytes(c: &DeviceConfig) -> [u8; vshm_format::virtio::CONFIG_BYTES] {
    c.to_bytes()
}

/// What the namespace tells one VM's device between its requests: events about what it
/// holds (coalesced per object and type while the device has no buffer for them: the
/// latest value wins) and WAITs completed. Filled by whoever runs the arbiter, drained by
/// the device's thread, which watches [`Notices::bell`].
#[derive(Debug)]
pub struct Notices {
    pending: Mutex<Pending>,
    bell: EventFd,
}

#[derive(Debug, Default)]
struct Pending {
    /// (slot, generation, type) → (arrival order, value).
    events: BTreeMap<(u32, u64, u32), (u64, u64)>,
    next: u64,
    done: Vec<(u64, Status, u64)>,
}

impl Notices {
    /// An empty set, its bell quiet.
    pub fn new() -> std::io::Result<Arc<Notices>> {
        Ok(Arc::new(Notices {
            pending: Mutex::new(Pending::default()),
            bell: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Readable when there is something new.
    pub fn bell(&self) -> &EventFd {
        &self.bell
    }

    /// Adds what a look found (an event already waiting for the same object and type only
    /// takes the new value) and rings if there was anything.
    pub fn push(&self, news: ProxyNews) {
        if news.events.is_empty() && news.done.is_empty() {
            return;
        }
        {
            let mut p = self.lock();
            for e in news.events {
                let order = p.next;
                p.next += 1;
                p.events
                    .entry((e.slot, e.generation, e.kind))
                    .and_modify(|v| v.1 = e.value)
                    .or_insert((order, e.value));
            }
            p.done.extend(news.done);
        }
        let _ = self.bell.write(1);
    }

    /// Takes the completed WAITs.
    pub fn take_done(&self) -> Vec<(u64, Status, u64)> {
        std::mem::take(&mut self.lock().done)
    }

    /// Takes the oldest waiting event.
    pub fn pop_event(&self) -> Option<VirtioVshmEvent> {
        let mut p = self.lock();
        let (&key, _) = p.events.iter().min_by_key(|(_, &(order, _))| order)?;
        let (_, value) = p.events.remove(&key)?;
        Some(VirtioVshmEvent {
            kind: key.2,
            slot: key.0,
            generation: key.1,
            value,
        })
    }

    /// Puts back an event taken but not delivered (it stays the oldest).
    pub fn unpop_event(&self, e: VirtioVshmEvent) {
        self.lock()
            .events
            .entry((e.slot, e.generation, e.kind))
            .or_insert((0, e.value));
    }

    /// Events waiting for a buffer.
    pub fn events_waiting(&self) -> usize {
        self.lock().events.len()
    }

    /// Forgets the waiting events about (`slot`, `generation`): the VM closed its last
    /// handle on it (without this, a VM that posts no event buffers would have vshmd keep
    /// an event for every object it ever held).
    pub fn forget(&self, slot: u32, generation: u64) {
        self.lock()
            .events
            .retain(|&(s, g, _), _| (s, g) != (slot, generation));
    }

    /// Forgets the waiting events (a driver that did not negotiate the event queue).
    pub fn drop_events(&self) {
        self.lock().events.clear();
    }
}

/// The VMs being served and what they are to hear, by peer id: whoever runs the arbiter
/// looks at each when something happened (`deliver`).
#[derive(Debug, Default, Clone)]
pub struct Listeners(Arc<Mutex<HashMap<PeerId, Arc<Notices>>>>);

impl Listeners {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Arc<Notices>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// VM `vm` hears through `notices` from now on.
    pub fn add(&self, vm: PeerId, notices: Arc<Notices>) {
        self.lock().insert(vm, notices);
    }

    /// VM `vm` is gone.
    pub fn remove(&self, vm: PeerId) {
        self.lock().remove(&vm);
    }

    /// If anything happened since the last look, looks at what every VM holds and tells
    /// each what is new for it.
    pub fn deliver(&self, arbiter: &mut Arbiter<Region>) {
        if !arbiter.take_proxy_due() {
            return;
        }
        let all: Vec<(PeerId, Arc<Notices>)> = self
            .lock()
            .iter()
            .map(|(&v, n)| (v, Arc::clone(n)))
            .collect();
        for (vm, notices) in all {
            notices.push(arbiter.proxy_poll(vm));
        }
    }
}

/// What a VM's device asks of the namespace (see the module).
pub trait Arbitration: std::fmt::Debug + Send + Sync {
    /// A new VM: its peer id in the namespace; it hears of changes through `notices`.
    fn connect(&self, notices: Arc<Notices>) -> Result<PeerId, Status>;
    /// Create-or-open (the request is a CREATE).
    fn create(&self, vm: PeerId, req: &Request) -> Result<ProxyHold, Box<Response>>;
    /// Open by name.
    fn open(&self, vm: PeerId, name: &str) -> Result<ProxyHold, Status>;
    /// Close one handle.
    fn close(&self, vm: PeerId, slot: ObjectSlot, generation: Generation) -> Result<(), Status>;
    /// Any other mailbox operation (DELETE, GROW, WAKE, LOCK, UNLOCK, CANCEL).
    fn request(&self, vm: PeerId, req: &Request) -> Response;
    /// SIGNAL (`reset` false) or RESET (`reset` true) an object the VM holds.
    fn signal(&self, vm: PeerId, slot: ObjectSlot, generation: Generation, reset: bool) -> Status;
    /// WAIT `id`: its answer now, or `None` (it comes through the VM's notices). `seen`:
    /// the section change count the VM saw last (a section that differs answers at once).
    fn wait(
        &self,
        vm: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        seen: Option<u64>,
    ) -> Option<(Status, u64)>;
    /// LOCK `id` by the VM's thread `token` (queued unless `queue` is false): its answer
    /// now, or `None` (it comes through the VM's notices when the mutex is handed over).
    #[allow(clippy::too_many_arguments)]
    fn lock(
        &self,
        vm: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        queue: bool,
    ) -> Option<(Status, u64)>;
    /// Gives back a LOCK's grant nobody heard of (`granted`: SUCCESS, or ABANDONED, which
    /// the next owner is told again).
    fn give_back(
        &self,
        vm: PeerId,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        granted: Status,
    );
    /// Gives back the signal an answered WAIT took from an auto-reset event when nobody
    /// heard the answer (nothing for other objects).
    fn give_back_signal(&self, slot: ObjectSlot, generation: Generation);
    /// WAIT or LOCK `id` timed out: `true` if it was taken back (a LOCK leaves the queue,
    /// and a mutex handed to it meanwhile is given back), `false` if it completed already.
    fn cancel_wait(&self, vm: PeerId, id: u64) -> bool;
    /// The names the VM may open.
    fn list(&self, vm: PeerId) -> Result<Vec<ProxyListed>, Status>;
    /// Who is attached (PEERS).
    fn peers(&self, vm: PeerId) -> Result<vshm_format::virtio::PeersReply, Status>;
    /// The VM is gone: reclaim what it held.
    fn gone(&self, vm: PeerId);
    /// The namespace's loop has stopped (vshmd is stopping or handed the region over): no
    /// more VMs are taken.
    fn stopped(&self) -> bool {
        false
    }
}

/// [`Arbitration`] by an arbiter behind a mutex, ids handed out from `first_id` up.
#[derive(Debug)]
pub struct Local {
    arbiter: Mutex<Arbiter<Region>>,
    next_id: Mutex<u16>,
    listeners: Listeners,
}

impl Local {
    /// Serves `arbiter`'s namespace; VMs get peer ids from `first_id` on.
    pub fn new(arbiter: Arbiter<Region>, first_id: u16) -> Local {
        Local {
            arbiter: Mutex::new(arbiter),
            next_id: Mutex::new(first_id),
            listeners: Listeners::default(),
        }
    }

    /// Runs `f` on the arbiter (tests look at the namespace through it), then tells the VMs
    /// what is new for them, as a region's loop does after each event.
    pub fn with<R>(&self, f: impl FnOnce(&mut Arbiter<Region>) -> R) -> R {
        let mut a = self
            .arbiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = f(&mut a);
        self.listeners.deliver(&mut a);
        r
    }

    /// A look at every VM even if nothing reached the arbiter (as the loop's timer does: a
    /// change made in shared memory without WAKE).
    pub fn tick(&self) {
        self.with(|a| a.proxy_due_soon());
    }
}

impl Arbitration for Local {
    fn connect(&self, notices: Arc<Notices>) -> Result<PeerId, Status> {
        let mut next = self
            .next_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = PeerId(*next);
        *next = next.checked_add(1).ok_or(Status::InsufficientResources)?;
        self.with(|a| a.proxy_connected(id))
            .map_err(|_| Status::InsufficientResources)?;
        self.listeners.add(id, notices);
        Ok(id)
    }
    fn create(&self, vm: PeerId, req: &Request) -> Result<ProxyHold, Box<Response>> {
        self.with(|a| match vshm_format::mailbox::decode(req, a.layout()) {
            Ok(cmd) => a.proxy_create(vm, cmd),
            Err(status) => Err(Box::new(vshm_format::mailbox::status_response(status))),
        })
    }
    fn open(&self, vm: PeerId, name: &str) -> Result<ProxyHold, Status> {
        self.with(|a| a.proxy_open(vm, name))
    }
    fn close(&self, vm: PeerId, slot: ObjectSlot, generation: Generation) -> Result<(), Status> {
        self.with(|a| a.proxy_close(vm, slot, generation))
    }
    fn request(&self, vm: PeerId, req: &Request) -> Response {
        self.with(|a| a.proxy_request(vm, req))
    }
    fn signal(&self, vm: PeerId, slot: ObjectSlot, generation: Generation, reset: bool) -> Status {
        self.with(|a| {
            if reset {
                a.proxy_reset(vm, slot, generation)
            } else {
                a.proxy_signal(vm, slot, generation)
            }
        })
    }
    fn wait(
        &self,
        vm: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        seen: Option<u64>,
    ) -> Option<(Status, u64)> {
        self.with(|a| a.proxy_wait(vm, id, slot, generation, seen))
    }
    fn lock(
        &self,
        vm: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        queue: bool,
    ) -> Option<(Status, u64)> {
        self.with(|a| a.proxy_lock(vm, id, slot, generation, token, queue))
    }
    fn give_back(
        &self,
        vm: PeerId,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        granted: Status,
    ) {
        self.with(|a| a.proxy_give_back(vm, slot, generation, token, granted));
    }
    fn give_back_signal(&self, slot: ObjectSlot, generation: Generation) {
        self.with(|a| a.proxy_give_back_signal(slot, generation));
    }
    fn cancel_wait(&self, vm: PeerId, id: u64) -> bool {
        self.with(|a| a.proxy_cancel_wait(vm, id))
    }
    fn list(&self, vm: PeerId) -> Result<Vec<ProxyListed>, Status> {
        self.with(|a| a.proxy_list(vm))
    }
    fn peers(&self, vm: PeerId) -> Result<vshm_format::virtio::PeersReply, Status> {
        self.with(|a| a.proxy_peers(vm))
    }
    fn gone(&self, vm: PeerId) {
        self.listeners.remove(vm);
        self.with(|a| {
            a.peer_gone(vm);
        });
    }
}

/// Why a VM could not be served.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The namespace has no room for another peer.
    #[error("no peer slot for another VM: {0}")]
    NoSlot(Status),
    /// vhost-user-backend failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// Binding the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: std::path::PathBuf,
        /// Cause.
        source: vhost::vhost_user::Error,
    },
}

/// The listening socket of a vhost-user device.
pub fn listen(path: &Path) -> Result<Listener, VhostUserError> {
    Listener::new(path, true).map_err(|source| VhostUserError::Listen {
        path: path.to_owned(),
        source,
    })
}

/// A VM accepted on a vhost-user socket and being served (its device runs on
/// vhost-user-backend's threads).
pub struct Served {
    daemon: VhostUserDaemon<Arc<Mutex<device::VshmDevice>>>,
    membership: Arc<device::Membership>,
    arbitration: Arc<dyn Arbitration>,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("vm", &self.vm())
            .finish_non_exhaustive()
    }
}

impl Served {
    /// The VM's peer id, once it has joined the namespace.
    pub fn vm(&self) -> Option<PeerId> {
        self.membership.id()
    }

    /// Serves until the frontend disconnects; then the namespace reclaims what the VM held.
    pub fn wait(mut self) -> Result<(), VhostUserError> {
        let ended = self.daemon.wait();
        // Its vring workers end too (they would wait for more kicks forever).
        for handler in self.daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        // However it ended, nothing it held outlives it — and a request still queued in a
        // vring worker acts no more (the id may go to the next VM).
        let vm = self.membership.retire();
        if let Some(vm) = vm {
            tracing::info!(vm = vm.raw(), "vhost-user VM disconnected");
            self.arbitration.gone(vm);
        }
        ended.map_err(|e| VhostUserError::Daemon(e.to_string()))
    }
}

/// Waits for the next VM on `listener` and starts serving it (it takes a peer slot at its
/// first request).
pub fn accept_one(
    listener: &mut Listener,
    arbitration: Arc<dyn Arbitration>,
    memfd: Arc<File>,
    config: DeviceConfig,
) -> Result<Served, VhostUserError> {
    let device = device::VshmDevice::new(Arc::clone(&arbitration), memfd, config)
        .map_err(|e| VhostUserError::Daemon(e.to_string()))?;
    let watched = device.listeners();
    let device = Arc::new(Mutex::new(device));
    let started = VhostUserDaemon::new(
        "vshm-vm".to_owned(),
        Arc::clone(&device),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserError::Daemon(e.to_string()))
    .and_then(|daemon| {
        // One worker thread serves both queues; it also watches the notices and the timer.
        let handler = daemon.get_epoll_handlers().into_iter().next();
        for (fd, id) in watched {
            handler
                .as_ref()
                .ok_or_else(|| VhostUserError::Daemon("no vring worker".into()))?
                .register_listener(fd, vmm_sys_util::epoll::EventSet::IN, u64::from(id))
                .map_err(|e| VhostUserError::Daemon(e.to_string()))?;
        }
        Ok(daemon)
    })
    .and_then(|mut daemon| {
        daemon
            .start(listener)
            .map(|()| daemon)
            .map_err(|e| VhostUserError::Daemon(e.to_string()))
    });
    let daemon = started?;
    tracing::info!("a vhost-user VM connected");
    let membership = device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .membership();
    Ok(Served {
        daemon,
        membership,
        arbitration,
    })
}

/// Accepts one VM on `listener` and serves it until its frontend disconnects; then the
/// namespace reclaims what it held. Blocks (run it on a thread of its own).
pub fn serve_one(
    listener: &mut Listener,
    arbitration: Arc<dyn Arbitration>,
    memfd: Arc<File>,
    config: DeviceConfig,
) -> Result<(), VhostUserError> {
    accept_one(listener, arbitration, memfd, config)?.wait()
}

/// Serves every VM that connects to `listener`, each on threads of its own, until the
/// namespace goes away (its region's loop stopped: [`Arbitration::stopped`], looked at
/// every [`ACCEPT_POLL`]). Blocks. The listener is closed on return but its path is left
/// alone (the caller knows whether it is still this socket's).
pub fn accept_loop(
    listener: Listener,
    arbitration: Arc<dyn Arbitration>,
    memfd: Arc<File>,
    config: DeviceConfig,
) {
    use std::os::fd::AsRawFd;
    // Its Drop would unlink the path whoever it belongs to now; the fd closes here.
    let listener = std::mem::ManuallyDrop::new(listener);
    let mut listener = ListenerGuard(listener);
    while !arbitration.stopped() {
        let mut pfd = libc::pollfd {
            fd: listener.0.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = i32::try_from(ACCEPT_POLL.as_millis()).unwrap_or(200);
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if ready <= 0 || arbitration.stopped() {
            continue;
        }
        match accept_one(
            &mut listener.0,
            Arc::clone(&arbitration),
            Arc::clone(&memfd),
            config,
        ) {
            Ok(served) => {
                let spawned = std::thread::Builder::new()
                    .name("vshm-vm".into())
                    .spawn(move || {
                        if let Err(e) = served.wait() {
                            tracing::info!("a vhost-user VM's connection ended: {e}");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!("cannot start a thread for a vhost-user VM: {e}");
                }
            }
            Err(e) => {
                tracing::warn!("vhost-user: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
    tracing::info!("vhost-user: the region stopped; no more VMs are taken");
}

/// How often the accept loop looks whether its region stopped.
pub const ACCEPT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Closes a listener's fd without unlinking its path.
struct ListenerGuard(std::mem::ManuallyDrop<Listener>);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: the listener's own fd, closed once: the listener is never dropped.
        unsafe { libc::close(self.0.as_raw_fd()) };
    }
}
