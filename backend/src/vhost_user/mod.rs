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

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vshm_format::layout::{Request, Response};
use vshm_format::{Generation, ObjectSlot, PeerId, Status};

use crate::arbiter::{Arbiter, ProxyHold};
use crate::region::Region;

/// Default size of a VM's window (`--vhost-user PATH[,window=SIZE]`).
pub const DEFAULT_WINDOW: u64 = 256 << 20;

pub use vshm_format::virtio::DeviceConfig;

/// The 32 config-space bytes (little-endian, docs/VHOST-USER.md §4).
pub fn config_bytes(c: &DeviceConfig) -> [u8; 32] {
    c.to_bytes()
}

/// What a VM's device asks of the namespace (see the module).
pub trait Arbitration: std::fmt::Debug + Send + Sync {
    /// A new VM: its peer id in the namespace.
    fn connect(&self) -> Result<PeerId, Status>;
    /// Create-or-open (the request is a CREATE).
    fn create(&self, vm: PeerId, req: &Request) -> Result<ProxyHold, Box<Response>>;
    /// Open by name.
    fn open(&self, vm: PeerId, name: &str) -> Result<ProxyHold, Status>;
    /// Close one handle.
    fn close(&self, vm: PeerId, slot: ObjectSlot, generation: Generation) -> Result<(), Status>;
    /// Any other mailbox operation (DELETE, GROW, WAKE, LOCK, UNLOCK, CANCEL).
    fn request(&self, vm: PeerId, req: &Request) -> Response;
    /// The VM is gone: reclaim what it held.
    fn gone(&self, vm: PeerId);
}

/// [`Arbitration`] by an arbiter behind a mutex, ids handed out from `first_id` up.
#[derive(Debug)]
pub struct Local {
    arbiter: Mutex<Arbiter<Region>>,
    next_id: Mutex<u16>,
}

impl Local {
    /// Serves `arbiter`'s namespace; VMs get peer ids from `first_id` on.
    pub fn new(arbiter: Arbiter<Region>, first_id: u16) -> Local {
        Local {
            arbiter: Mutex::new(arbiter),
            next_id: Mutex::new(first_id),
        }
    }

    /// Runs `f` on the arbiter (tests look at the namespace through it).
    pub fn with<R>(&self, f: impl FnOnce(&mut Arbiter<Region>) -> R) -> R {
        let mut a = self
            .arbiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut a)
    }
}

impl Arbitration for Local {
    fn connect(&self) -> Result<PeerId, Status> {
        let mut next = self
            .next_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let id = PeerId(*next);
        *next = next.checked_add(1).ok_or(Status::InsufficientResources)?;
        self.with(|a| a.proxy_connected(id))
            .map(|_| id)
            .map_err(|_| Status::InsufficientResources)
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
    fn gone(&self, vm: PeerId) {
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
    let device = Arc::new(Mutex::new(device::VshmDevice::new(
        Arc::clone(&arbitration),
        memfd,
        config,
    )));
    let started = VhostUserDaemon::new(
        "vshm-vm".to_owned(),
        Arc::clone(&device),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| VhostUserError::Daemon(e.to_string()))
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
/// namespace goes away (its region stopped). Blocks.
pub fn accept_loop(
    mut listener: Listener,
    arbitration: Arc<dyn Arbitration>,
    memfd: Arc<File>,
    config: DeviceConfig,
) {
    loop {
        match accept_one(
            &mut listener,
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
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
}
