//! vshmd's event loop for one region: one thread, one epoll (event-manager), everything
//! non-blocking except short, bounded control-socket exchanges. Several regions run one
//! `Daemon` each on their own thread (`regions.rs`), which also handles the signals.

use std::fs::File;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;
use vshm_format::layout::{
    Layout, LayoutError, MAX_NAME_AREA, MAX_NAME_BYTES, NAME_GRANULE, VECTOR_CONTROL,
};
use vshm_format::shm::Fault;
use vshm_format::{PeerId, PeerSlot};

use crate::arbiter::Arbiter;
use crate::policy::{Identity, Rules, MAIN_SOCKET};
use crate::region::{Region, RegionError};
use crate::server::{
    bind_unix, bind_unix_as, pidfd_exited, remove_if_same, Accepted, Server, ServerError, SocketId,
};
use crate::telemetry::Event;

mod monitor;
pub mod regions;
mod takeover;
pub use monitor::loopback_only;
pub use takeover::{DaemonState, TakenOver, TakeoverError};

/// vshmd's settings for one region, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// The region's name (logs, status, its thread's name).
    pub name: String,
    /// ivshmem socket.
    pub socket: PathBuf,
    /// Control socket.
    pub control: PathBuf,
    /// Region size (power of two).
    pub size: u64,
    /// Client peer slots.
    pub max_peers: u32,
    /// Object table slots.
    pub max_objects: u32,
    /// Name area bytes (FORMAT.md §5b); `None`: the format's default for `max_objects`
    /// (64 bytes per object).
    pub name_bytes: Option<u64>,
    /// Interrupt vectors per peer.
    pub vectors: u32,
    /// Back the region with huge pages.
    pub hugepages: bool,
    /// mlock the region.
    pub lock: bool,
    /// Permission bits of the control socket (0600: owner only).
    pub control_mode: u32,
    /// Serve Prometheus metrics here (loopback only).
    pub metrics: Option<SocketAddr>,
    /// Permission bits of the ivshmem socket (0660 by default).
    pub socket_mode: u32,
    /// Group of the ivshmem socket file (`None`: vshmd's own).
    pub socket_group: Option<u32>,
    /// Further listening sockets of the region (`[[region.listen]]`).
    pub listen: Vec<ListenConfig>,
    /// Which policy each peer gets (unrestricted without `--config`).
    pub policy: Rules,
    /// The configuration file it came from, if any (shown in the status document).
    pub config_file: Option<PathBuf>,
    /// Longest time destroyed memory waits in quarantine (FORMAT.md §11a).
    pub quarantine: Duration,
    /// How long the event loop keeps looking for events after a doorbell before it sleeps.
    pub linger: Duration,
}

/// A further listening socket: peers connecting through it are told apart by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    /// Its name (rules refer to it).
    pub name: String,
    /// Its path.
    pub path: PathBuf,
    /// Permission bits.
    pub mode: u32,
    /// Group of the socket file.
    pub group: Option<u32>,
    /// The policy of its peers that no rule matches (for the status document).
    pub policy: String,
}

impl Config {
    /// A configuration with vshmd's defaults for everything but the socket paths (tests,
    /// embedding): what `vshmd --socket SOCKET --control CONTROL` gets.
    pub fn with_defaults(socket: PathBuf, control: PathBuf) -> Config {
        Config {
            name: crate::config::DEFAULT_REGION_NAME.to_string(),
            socket,
            control,
            size: crate::config::DEFAULT_SIZE,
            max_peers: crate::config::DEFAULT_MAX_PEERS,
            max_objects: crate::config::default_max_objects(crate::config::DEFAULT_SIZE),
            name_bytes: None,
            vectors: crate::config::DEFAULT_VECTORS,
            hugepages: false,
            lock: false,
            control_mode: crate::config::DEFAULT_CONTROL_MODE,
            metrics: None,
            socket_mode: crate::config::DEFAULT_SOCKET_MODE,
            socket_group: None,
            listen: Vec::new(),
            policy: Rules::unrestricted(),
            config_file: None,
            quarantine: std::time::Duration::from_millis(u64::from(
                crate::config::DEFAULT_QUARANTINE_MS,
            )),
            linger: std::time::Duration::from_micros(u64::from(crate::config::DEFAULT_LINGER_US)),
        }
    }
}

/// Why vshmd could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A parameter is unusable.
    #[error("{0}")]
    Config(String),
    /// The region.
    #[error(transparent)]
    Region(#[from] RegionError),
    /// A socket.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Writing the header failed.
    #[error("cannot initialise the region header: {0}")]
    Header(Fault),
    /// The event loop.
    #[error("event loop failed: {0}")]
    Events(String),
    /// Taking the region over from a running vshmd failed (it serves on).
    #[error("cannot take over from the running vshmd: {0}")]
    Takeover(#[from] TakeoverError),
    /// Other I/O.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// How a region's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A [`Stopper`] rang: its sockets are removed.
    Stopped,
    /// It handed the region to a new process (`vshmd --takeover`): its socket files stay.
    HandedOff,
}

impl Config {
    /// The layout this config produces, or a message naming the bad option.
    pub fn layout(&self, alignment: u64) -> Result<Layout, DaemonError> {
        Layout::compute_with_names(
            self.size,
            self.max_peers,
            self.max_objects,
            self.vectors,
            alignment,
            self.name_area_size(),
        )
        .map_err(|e| {
            DaemonError::Config(match e {
                LayoutError::BadRegionSize(s) => format!(
                    "--size {s}: QEMU needs a power of two of at least 1M (e.g. {})",
                    s.checked_next_power_of_two()
                        .unwrap_or(1 << 20)
                        .max(1 << 20)
                ),
                LayoutError::BadMaxPeers(n) => {
                    format!("--max-peers {n}: must be between 1 and 62")
                }
                LayoutError::BadMaxObjects(n) => {
                    format!("--max-objects {n}: must be between 1 and 65536")
                }
                LayoutError::BadVectors(v) => format!("--vectors {v}: must be between 1 and 64"),
                LayoutError::BadNameArea(n) => format!(
                    "--name-bytes {n}: must be a multiple of {NAME_GRANULE} and at most \
                     {MAX_NAME_AREA} (65536 names of {MAX_NAME_BYTES} bytes)"
                ),
                LayoutError::TooSmall(need, have) => format!(
                    "--size {have}: the header for these --max-peers/--max-objects/--name-bytes \
                     needs {need} bytes; use a larger size or fewer objects"
                ),
                other => other.to_string(),
            })
        })
    }

    /// The name area's size: `name_bytes`, or the format's default for `max_objects`.
    pub fn name_area_size(&self) -> u64 {
        self.name_bytes
            .unwrap_or_else(|| vshm_format::layout::default_name_area(self.max_objects))
    }

    /// The QEMU arguments that attach a VM.
    pub fn qemu_args(&self) -> String {
        format!(
            "-chardev socket,path={},id=vshm0 -device ivshmem-doorbell,chardev=vshm0,vectors={}",
            self.socket.display(),
            self.vectors
        )
    }

    /// A libvirt `<shmem>` element that attaches a VM.
    pub fn libvirt_xml(&self) -> String {
        format!(
            "<shmem name='vshm0'>\n  <model type='ivshmem-doorbell'/>\n  <server path='{}'/>\n  \
             <msi vectors='{}' ioeventfd='on'/>\n</shmem>",
            self.socket.display(),
            self.vectors
        )
    }
}

const TOKEN_LISTENER: u32 = 1;
pub(super) const TOKEN_CONTROL: u32 = 2;
const TOKEN_TIMER: u32 = 3;
const TOKEN_STOP: u32 = 4;
pub(super) const TOKEN_METRICS: u32 = 5;
const TOKEN_HANDOFF: u32 = 6;
/// Calls from the vhost-user device's threads wait (`crate::vhost_user::bridge`).
const TOKEN_VHOST: u32 = 7;
const TOKEN_CLIENT: u32 = 1 << 24;
const TOKEN_BELL: u32 = 2 << 24;
/// A monitor connection (control or metrics); the low bits index it.
pub(super) const TOKEN_CONN: u32 = 3 << 24;
/// A fenced peer's pidfd; the low bits are its slot.
const TOKEN_FENCE: u32 = 4 << 24;
/// A further ivshmem listener (`[[region.listen]]`); the low bits index it.
const TOKEN_LISTEN: u32 = 5 << 24;
const TOKEN_KIND: u32 = 0xFF << 24;

fn bell_token(id: PeerId, vector: usize) -> u32 {
    // Vectors are < 64 (validated), so the low byte holds them.
    TOKEN_BELL | u32::from(id.raw()) << 8 | u32::from(u8::try_from(vector).unwrap_or(u8::MAX))
}

/// How often closed objects are swept up even if nobody rang.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// The running backend.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    arbiter: Arbiter<Region>,
    server: Server,
    control: UnixListener,
    /// The control socket file we bound (removed on drop only if still ours).
    control_id: (u64, u64),
    /// Where a new vshmd asks for the region (`<control>.handoff`, owner only).
    handoff: UnixListener,
    /// Its file (removed on drop only if still ours).
    handoff_id: SocketId,
    timer: TimerFd,
    /// Readable once someone asked this loop to stop ([`Stopper`]).
    stop_bell: EventFd,
    /// The region's memfd, handed to every client.
    memfd: File,
    metrics: Option<TcpListener>,
    monitor: monitor::Monitor,
    /// The ivshmem listener was taken out of epoll after an accept error (out of fds).
    listener_paused: bool,
    /// The further listening sockets, in `config.listen` order.
    listeners: Vec<Listener>,
    /// Peers dropped by force while their process still ran, until it exits.
    fences: Vec<Fence>,
    started: SystemTime,
    stop: bool,
    /// Leave the socket files when dropped: handed over, or not yet taken over.
    keep_files: bool,
    /// The region was handed to another process: this one must not touch it again.
    handed_off: bool,
    /// A peer rang since the event loop last looked (it lingers after that: `LINGER`).
    rang: bool,
    /// systemd's fd store and the journal, when vshmd runs with `--fd-store`
    /// (`crate::fdstore`): written after every event.
    fdstore: Option<crate::fdstore::FdStore>,
    /// A [`Stopper`] (a signal) asked this loop to stop: a clean stop, not a failure.
    asked_to_stop: bool,
    /// The journal was written in this event, after its last change.
    journaled: bool,
    /// Calls from VMs attached through the vhost-user device (`--vhost-user`).
    vhost: Option<crate::vhost_user::bridge::Jobs>,
    /// The vhost-user socket's path and (device, inode), removed at the end if still ours.
    vhost_socket: Option<(std::path::PathBuf, (u64, u64))>,
}

/// What the server calls as it hands an id out: the arbiter gives the peer a slot.
fn registrar(arbiter: &mut Arbiter<Region>) -> impl FnOnce(PeerId) -> io::Result<()> + '_ {
    |id| {
        arbiter
            .peer_connected(id)
            .map(|_slot| ())
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// A further ivshmem listening socket (removed on drop if still ours).
#[derive(Debug)]
struct Listener {
    name: String,
    path: PathBuf,
    listener: UnixListener,
    id: SocketId,
    /// Taken out of epoll after an accept error (out of fds), until the next tick.
    paused: bool,
    /// Leave the file when dropped (handed over, or not yet taken over).
    keep_file: bool,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if !self.keep_file {
            remove_if_same(&self.path, self.id);
        }
    }
}

/// A slot fenced while the process of the peer cut off from it runs.
#[derive(Debug)]
struct Fence {
    pid: i32,
    slot: PeerSlot,
    /// The peer id it had: not handed out again while the process may still use it.
    id: PeerId,
    /// Readable once the process exits (watched in epoll). None where pidfd_open failed
    /// (old kernel): then /proc is polled on the timer.
    pidfd: Option<OwnedFd>,
    /// The serial of the connection the pidfd was opened for: it keeps that connection's
    /// name in systemd's fd store (one file, one name; `crate::fdstore`). 0: unknown.
    serial: u64,
}

/// Raises the soft limit on open files to the hard limit: every peer costs 1 + 2 × vectors
/// fds (up to ~8000 for 62 peers with 64 vectors), beyond the usual soft limit of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Whether `pid` still runs (a zombie has unmapped its memory already). Only where no
/// pidfd could be opened: a PID can be reused.
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the ")" that ends the command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn random_bytes() -> [u8; 16] {
    let mut b = [0u8; 16];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = (t ^ u128::from(std::process::id())).to_le_bytes();
    }
    b
}

/// Asks one [`Daemon`]'s loop to stop, from any thread: it removes its sockets and
/// returns from [`Daemon::run`].
#[derive(Debug)]
pub struct Stopper(EventFd);

impl Stopper {
    /// Rings the loop's stop bell (harmless once it has stopped).
    pub fn stop(&self) {
        if let Err(e) = self.0.write(1) {
            tracing::error!("cannot ask an event loop to stop: {e}");
        }
    }
}

impl Daemon {
    /// Sets everything up. On error nothing is left behind (sockets are removed by drop).
    pub fn new(config: Config) -> Result<Daemon, DaemonError> {
        // Validate the parameters before touching the system.
        config.layout(4096)?;
        if config.socket == config.control {
            return Err(DaemonError::Config(
                "--control must differ from --socket".to_string(),
            ));
        }
        raise_fd_limit();
        let stop_bell = EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)?;
        let region = Region::create(config.size, config.hugepages, config.lock)?;
        let layout = config.layout(region.page_size())?;
        let id = random_bytes();
        let epoch = u64::from_le_bytes(id[..8].try_into().unwrap_or([0; 8]));
        let mut arbiter = Arbiter::new(region, layout, epoch, id).map_err(DaemonError::Header)?;
        arbiter.set_quarantine(config.quarantine);
        let server = Server::bind_as(
            &config.socket,
            config.vectors,
            config.max_peers,
            config.socket_mode,
            config.socket_group,
        )?;
        // Dropped (and their files removed) if anything below fails.
        let mut listeners = Vec::new();
        for l in &config.listen {
            let (listener, id) = bind_unix_as(&l.path, l.mode, l.group)?;
            listeners.push(Listener {
                name: l.name.clone(),
                path: l.path.clone(),
                listener,
                id,
                paused: false,
                keep_file: false,
            });
        }
        if config.control_mode & !0o777 != 0 {
            return Err(DaemonError::Config(format!(
                "--control-mode {:o}: permission bits only (e.g. 600 or 660)",
                config.control_mode
            )));
        }
        let metrics = match config.metrics {
            Some(addr) => {
                monitor::loopback_only(&addr).map_err(|e| DaemonError::Config(e.to_string()))?;
                let l = TcpListener::bind(addr).map_err(|e| {
                    DaemonError::Config(format!("--metrics {addr}: cannot listen: {e}"))
                })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
            None => None,
        };
        let (control, control_id) = bind_unix(&config.control, config.control_mode)?;
        // Owner only, whatever --control-mode says: it hands out the whole region.
        let (handoff, handoff_id) =
            match bind_unix(&crate::handoff::handoff_path(&config.control), 0o600) {
                Ok(h) => h,
                Err(e) => {
                    remove_if_same(&config.control, control_id);
                    return Err(e.into());
                }
            };
        let mut timer = TimerFd::new().map_err(io::Error::from)?;
        timer
            .reset(SWEEP_INTERVAL, Some(SWEEP_INTERVAL))
            .map_err(io::Error::from)?;
        let memfd = arbiter.mem().file().try_clone()?;
        Ok(Daemon {
            config,
            arbiter,
            server,
            control,
            control_id,
            handoff,
            handoff_id,
            timer,
            stop_bell,
            memfd,
            metrics,
            monitor: monitor::Monitor::default(),
            listener_paused: false,
            listeners,
            fences: Vec::new(),
            started: SystemTime::now(),
            stop: false,
            keep_files: false,
            handed_off: false,
            rang: false,
            fdstore: None,
            asked_to_stop: false,
            journaled: false,
            vhost: None,
            vhost_socket: None,
        })
    }

    /// The arbiter (tests, embedding).
    pub fn arbiter(&self) -> &Arbiter<Region> {
        &self.arbiter
    }

    /// A handle that stops [`Daemon::run`] from another thread.
    pub fn stopper(&self) -> io::Result<Stopper> {
        self.stop_bell.try_clone().map(Stopper)
    }

    /// The region's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Runs until a [`Stopper`] rings (or it cannot watch its own fds; see the log).
    pub fn run(self) -> Result<Ended, DaemonError> {
        let mut manager: EventManager<Box<Daemon>> =
            EventManager::new().map_err(|e| DaemonError::Events(format!("{e:?}")))?;
        let linger = self.config.linger;
        let id = manager.add_subscriber(Box::new(self));
        let mut linger_until: Option<Instant> = None;
        loop {
            // Right after a doorbell, look again without sleeping for a moment (`linger`: a
            // peer's next request, the close after a create or the next of a burst, then
            // finds vshmd running rather than waking a sleeping CPU — in a VM a descheduled
            // vCPU, tens of µs here; BENCHMARKS.md P2).
            let lingering = linger_until.is_some_and(|t| Instant::now() < t);
            if lingering {
                manager.run_with_timeout(0)
            } else {
                manager.run()
            }
            .map_err(|e| DaemonError::Events(format!("{e:?}")))?;
            let daemon = manager
                .subscriber_mut(id)
                .map_err(|e| DaemonError::Events(format!("{e:?}")))?;
            if daemon.handed_off {
                return Ok(Ended::HandedOff);
            }
            if daemon.stop {
                tracing::info!("stopping");
                return Ok(Ended::Stopped);
            }
            if std::mem::take(&mut daemon.rang) && !linger.is_zero() {
                linger_until = Some(Instant::now() + linger);
            } else if lingering {
                std::hint::spin_loop();
            } else {
                linger_until = None;
            }
        }
    }

    /// The status document: the arbiter's snapshot plus what only the daemon knows.
    pub fn status_json(&self) -> serde_json::Value {
        let mut doc = serde_json::to_value(self.arbiter.status()).unwrap_or_default();
        if let Some(region) = doc.get_mut("region").and_then(|r| r.as_object_mut()) {
            region.insert("name".into(), self.config.name.clone().into());
        }
        let started = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let listen: Vec<serde_json::Value> = self
            .config
            .listen
            .iter()
            .map(|l| serde_json::json!({"name": l.name, "path": l.path, "policy": l.policy}))
            .collect();
        doc["vshmd"] = serde_json::json!({
            "pid": std::process::id(),
            // What `vshmd --version` prints; vshmctl warns when its own format differs.
            "version": env!("CARGO_PKG_VERSION"),
            "format_version": vshm_format::layout::FORMAT_VERSION,
            "socket": self.config.socket,
            "listen": listen,
            "config": self.config.config_file,
            "control": self.config.control,
            "vectors": self.config.vectors,
            "qemu_args": self.config.qemu_args(),
            "started": started,
            "uptime_secs": self.started.elapsed().map_or(0, |d| d.as_secs()),
        });
        doc
    }

    /// Accepts a connection on the main socket (`which` None) or on further listener
    /// `which`, and gives the new peer its policy.
    fn accept_client(&mut self, which: Option<usize>, ops: &mut EventOps) {
        let register = registrar(&mut self.arbiter);
        let accepted = match which {
            None => self.server.accept(&self.memfd, register),
            Some(i) => match self.listeners.get(i).map(|l| l.listener.accept()) {
                None => return,
                Some(Ok((stream, _))) => self.server.admit(stream, &self.memfd, register),
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Some(Err(e)) => {
                    tracing::warn!("accepting a client failed: {e}");
                    // Out of fds, typically: retry on the next tick (as for the main one).
                    if let Some(l) = self.listeners.get_mut(i) {
                        if !l.paused && ops.remove(Events::empty(&l.listener)).is_ok() {
                            l.paused = true;
                        }
                    }
                    return;
                }
            },
        };
        let id = match accepted {
            Ok(Accepted::Connected(id)) => id,
            Ok(Accepted::Nothing) => return,
            Ok(Accepted::Refused(why)) => {
                self.arbiter.count_refusal(why);
                return;
            }
            Err(e) => {
                tracing::warn!("accepting a client failed: {e}");
                // Out of fds, typically: a level-triggered listener would spin. Retry on
                // the next tick.
                if !self.listener_paused
                    && ops.remove(Events::empty(self.server.listener())).is_ok()
                {
                    self.listener_paused = true;
                }
                self.arbiter
                    .emit(Event::now("error").detail(format!("accepting a client: {e}")));
                return;
            }
        };
        self.identify(id, which);
        if !self.watch_client(id, ops) {
            tracing::error!(
                id = id.raw(),
                "cannot watch the new peer's fds; dropping it"
            );
            self.drop_client(id, false, ops);
        }
        if self.fdstore.is_some() {
            // Recorded before it gets its handshake (held till then): a client that has its
            // handshake is attached, and a crash from here on must not drop it.
            self.journal();
        }
    }

    /// Gives newly admitted peer `id` (through the main socket, `which` None, or further
    /// listener `which`) its policy and reports it.
    fn identify(&mut self, id: PeerId, which: Option<usize>) {
        let Some(client) = self.server.client(id) else {
            return;
        };
        let pid = client.pid;
        let label = pid.and_then(monitor::short_label);
        // Who it is decides its policy: given now, before its first request can be read
        // (this loop reads doorbells only after this returns).
        let socket = match which {
            None => MAIN_SOCKET.to_string(),
            Some(i) => self
                .listeners
                .get(i)
                .map_or_else(String::new, |l| l.name.clone()),
        };
        let identity = Identity {
            socket,
            uid: client.uid,
            gid: client.gid,
            label: label.clone(),
        };
        let grant = self.config.policy.resolve(&identity);
        tracing::info!(
            id = id.raw(),
            policy = grant.policy.name.as_str(),
            "peer identified: {identity}"
        );
        let mut e = Event::now("peer_connected").peer(id);
        let mut detail: Vec<String> = label
            .iter()
            .map(|l| format!("{l} (pid {})", pid.unwrap_or(0)))
            .collect();
        if self.config.config_file.is_some() {
            detail.push(format!(
                "policy {} via socket {}",
                grant.policy.name, identity.socket
            ));
        }
        if !detail.is_empty() {
            e = e.detail(detail.join(", "));
        }
        self.arbiter.emit(e);
        self.arbiter.set_peer_process(id, pid, label);
        self.arbiter.set_peer_grant(id, grant);
    }

    /// Admits a connection accepted on the main socket by a process that crashed before it
    /// was journaled (`crate::fdstore`): its client was told nothing yet (its handshake
    /// was held), so it is served as a new one. Watched by the loop's `init`.
    pub(super) fn readmit(&mut self, stream: std::os::unix::net::UnixStream) {
        let register = registrar(&mut self.arbiter);
        match self.server.admit(stream, &self.memfd, register) {
            Ok(Accepted::Connected(id)) => {
                tracing::info!(
                    id = id.raw(),
                    "a connection the crash cut short is admitted again"
                );
                self.identify(id, None);
            }
            Ok(Accepted::Refused(why)) => self.arbiter.count_refusal(why),
            Ok(Accepted::Nothing) => {}
            Err(e) => tracing::warn!("admitting a connection again failed: {e}"),
        }
    }

    /// Watches client `id`'s socket and the bells it rings us on. False if one could not be.
    fn watch_client(&self, id: PeerId, ops: &mut EventOps) -> bool {
        let Some(client) = self.server.client(id) else {
            return false;
        };
        let mut ok = true;
        let mut watch = |what: &str, e: Events| {
            if let Err(err) = ops.add(e) {
                tracing::error!(id = id.raw(), "cannot watch the peer's {what}: {err:?}");
                ok = false;
            }
        };
        watch(
            "socket",
            Events::with_data(
                &client.stream,
                TOKEN_CLIENT | u32::from(id.raw()),
                EventSet::IN,
            ),
        );
        for (v, bell) in client.bells.iter().enumerate() {
            watch(
                "doorbell",
                Events::with_data(bell, bell_token(id, v), EventSet::IN),
            );
        }
        ok
    }

    /// Disconnects a peer and reclaims what it held. `forced`: vshmd cut it off (vshmctl
    /// disconnect) rather than it leaving; if its process still runs it still maps the
    /// region, so its slot and freed memory are fenced until the process exits. A client
    /// dropped after it was sent the memory but before its handshake was out is fenced
    /// likewise: it may map the region without ever having been a well-behaved peer.
    fn drop_client(&mut self, id: PeerId, forced: bool, ops: &mut EventOps) {
        let Some(client) = self.server.client(id) else {
            return;
        };
        let pid = client.pid;
        let half = client.half_handshaken();
        let client_handshaking = client.handshaking();
        let alive = match (&client.pidfd, pid) {
            (Some(pidfd), _) => !pidfd_exited(pidfd),
            (None, Some(p)) => process_alive(p),
            (None, None) => false,
        };
        let _ = ops.remove(Events::empty(&client.stream));
        for bell in &client.bells {
            let _ = ops.remove(Events::empty(&**bell));
        }
        let forced = self.server.was_cut_off(id) || forced || half;
        if client_handshaking {
            self.arbiter.emit(
                Event::now("error")
                    .peer(id)
                    .detail("ivshmem handshake failed (not taken in time, or the client left)"),
            );
        }
        // Closes it made before leaving are reported as closes, not lost in the reclaim.
        self.arbiter.observe_handles();
        self.arbiter.emit(Event::now("peer_gone").peer(id));
        let fence = forced && alive;
        let (reclaim, slot) = if fence {
            self.arbiter.peer_gone_fenced(id)
        } else {
            (self.arbiter.peer_gone(id), None)
        };
        let gone = self.server.disconnect(id);
        if let (Some(slot), Some(pid)) = (slot, pid) {
            let serial = gone.as_ref().map_or(0, |c| c.serial);
            let pidfd = gone.and_then(|c| c.pidfd);
            self.server.fence_id(id);
            self.add_fence(
                Fence {
                    pid,
                    slot,
                    id,
                    pidfd,
                    serial,
                },
                ops,
            );
        }
        tracing::info!(
            id = id.raw(),
            handles = reclaim.handles,
            destroyed = reclaim.destroyed,
            fenced = fence,
            "reclaimed"
        );
    }

    /// Keeps `fence` until its process exits: watches its pidfd, or polls /proc without one.
    fn add_fence(&mut self, mut fence: Fence, ops: &mut EventOps) {
        if let Some(fd) = &fence.pidfd {
            let token = TOKEN_FENCE | (fence.slot.raw() & 0xFF_FFFF);
            if ops
                .add(Events::with_data_raw(fd.as_raw_fd(), token, EventSet::IN))
                .is_err()
            {
                tracing::warn!(pid = fence.pid, "cannot watch a pidfd; polling /proc");
                fence.pidfd = None;
            }
        } else {
            tracing::info!(
                pid = fence.pid,
                "no pidfd for a fenced peer's process (pidfd_open failed); polling /proc"
            );
        }
        self.fences.push(fence);
    }

    /// The process of the peer fenced in `slot` exited (its pidfd is readable).
    fn fence_exited(&mut self, slot: u32, ops: &mut EventOps) {
        let Some(i) = self
            .fences
            .iter()
            .position(|f| f.slot.raw() == slot && f.pidfd.is_some())
        else {
            return;
        };
        let fence = self.fences.swap_remove(i);
        if let Some(fd) = &fence.pidfd {
            let _ = ops.remove(Events::empty_raw(fd.as_raw_fd()));
        }
        tracing::info!(pid = fence.pid, "a fenced peer's process exited; unfencing");
        self.arbiter.unfence(fence.slot);
        self.server.unfence_id(fence.id);
    }

    /// Lifts the fences without a pidfd whose processes have exited. Runs on the timer.
    fn lift_fences(&mut self) {
        let mut i = 0;
        while i < self.fences.len() {
            let f = &self.fences[i];
            if f.pidfd.is_some() || process_alive(f.pid) {
                i += 1;
            } else {
                self.arbiter.unfence(f.slot);
                self.server.unfence_id(f.id);
                self.fences.swap_remove(i);
            }
        }
    }

    /// Watches the further listeners paused after an accept error again. Runs on the timer.
    fn resume_further_listeners(&mut self, ops: &mut EventOps) {
        for (i, l) in self.listeners.iter_mut().enumerate() {
            let token = TOKEN_LISTEN | u32::try_from(i).unwrap_or(0);
            if l.paused
                && ops
                    .add(Events::with_data(&l.listener, token, EventSet::IN))
                    .is_ok()
            {
                l.paused = false;
            }
        }
    }

    /// Updates which clients' sockets are watched for writability (output queued).
    fn watch_client_output(&mut self, ops: &mut EventOps) {
        for (id, fd, out) in self.server.interest_changes() {
            let set = if out {
                EventSet::IN | EventSet::OUT
            } else {
                EventSet::IN
            };
            let token = TOKEN_CLIENT | u32::from(id.raw());
            let _ = ops.modify(Events::with_data_raw(fd, token, set));
        }
    }

    fn client_readable(&mut self, id: PeerId, set: EventSet, ops: &mut EventOps) {
        let Some(client) = self.server.client(id) else {
            return;
        };
        let mut buf = [0u8; 64];
        // Clients never send; readable means data to discard or end of stream.
        // SAFETY: recv into a local buffer of the given length.
        let n = unsafe {
            libc::recv(
                client.stream.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let would_block = n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock;
        if n == 0 || (n < 0 && !would_block) || set.contains(EventSet::HANG_UP) {
            self.drop_client(id, false, ops);
        }
    }

    /// Rings what the arbiter queued: it has no sockets, the server does.
    fn ring_peers(&mut self) {
        for (id, vector) in self.arbiter.drain_rings() {
            self.server.notify(id, usize::from(vector));
        }
    }

    fn doorbell(&mut self, id: PeerId, vector: usize) {
        self.rang = true;
        let value = self
            .server
            .client(id)
            .and_then(|c| c.bells.get(vector))
            .and_then(|bell| bell.read().ok())
            .unwrap_or(0);
        // Vector 1 towards the host carries this peer's acknowledgements of revocations
        // (FORMAT.md §11a): only it holds that eventfd, so the value is its own word.
        if vector == usize::from(vshm_format::layout::VECTOR_WAKE) {
            self.arbiter.acknowledged(id, value);
        }
        self.arbiter.count_doorbell();
        let answered = self.arbiter.answer_pending(id);
        if let Some(a) = answered {
            // The peer is waiting for this: answer before the housekeeping below, which
            // does not change the answer. Durable before the peer can act on it (no-op
            // without --fd-store).
            self.journal();
            self.journaled = true;
            if self.arbiter.deliver(&a) {
                self.server.notify(id, usize::from(VECTOR_CONTROL));
            }
        }
        self.arbiter.heal_soon();
        // A ring on vector 0 is a request or a close that left an object unheld, and the
        // eventfd adds rings up. Rings the answered request and the peer's close hint
        // explain need no sweep of the whole table (a look at every live object's lease
        // word); the timer sweeps anyway. Vector 1 carries acknowledgements (handled above),
        // never a close.
        if vector == usize::from(VECTOR_CONTROL)
            && self.arbiter.sweep_after_ring(id, value, answered.is_some()) > 0
        {
            // What it destroyed is journaled at the end of this dispatch.
            self.journaled = false;
        }
    }
}

impl MutEventSubscriber for Daemon {
    fn init(&mut self, ops: &mut EventOps) {
        let adds = [
            ops.add(Events::with_data(
                self.server.listener(),
                TOKEN_LISTENER,
                EventSet::IN,
            )),
            ops.add(Events::with_data(
                &self.control,
                TOKEN_CONTROL,
                EventSet::IN,
            )),
            ops.add(Events::with_data(&self.timer, TOKEN_TIMER, EventSet::IN)),
            ops.add(Events::with_data(&self.stop_bell, TOKEN_STOP, EventSet::IN)),
            ops.add(Events::with_data(
                &self.handoff,
                TOKEN_HANDOFF,
                EventSet::IN,
            )),
        ];
        // A region taken over from another process brings clients and fences along.
        if !self.watch_adopted(ops) {
            tracing::error!("cannot watch the handed-over peers' fds");
            self.stop = true;
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let token = TOKEN_LISTEN | u32::try_from(i).unwrap_or(0);
            if ops
                .add(Events::with_data(&l.listener, token, EventSet::IN))
                .is_err()
            {
                tracing::error!("cannot watch listening socket {}", l.path.display());
                self.stop = true;
            }
        }
        if let Some(l) = &self.metrics {
            if ops
                .add(Events::with_data(l, TOKEN_METRICS, EventSet::IN))
                .is_err()
            {
                tracing::error!("cannot watch the metrics listener");
                self.stop = true;
            }
        }
        if let Some(jobs) = &self.vhost {
            if ops
                .add(Events::with_data(jobs.bell(), TOKEN_VHOST, EventSet::IN))
                .is_err()
            {
                tracing::error!("cannot watch the vhost-user device's calls");
                self.stop = true;
            }
        }
        if adds.iter().any(Result::is_err) {
            tracing::error!("cannot watch the daemon's own fds");
            self.stop = true;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Handed over: the rest of this batch of events is the new process's business.
        if self.handed_off {
            return;
        }
        let data = events.data();
        match data & TOKEN_KIND {
            TOKEN_CLIENT => {
                let id = PeerId(u16::try_from(data & 0xFFFF).unwrap_or(0));
                let set = events.event_set();
                if set.contains(EventSet::OUT) {
                    self.server.flush(id);
                }
                if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.client_readable(id, set, ops);
                }
            }
            TOKEN_FENCE => self.fence_exited(data & 0xFF_FFFF, ops),
            TOKEN_CONN => {
                let index = usize::try_from(data & 0xFF_FFFF).unwrap_or(usize::MAX);
                self.conn_event(index, events.event_set(), ops);
            }
            TOKEN_BELL => {
                let id = PeerId(u16::try_from((data >> 8) & 0xFFFF).unwrap_or(0));
                self.doorbell(id, (data & 0xFF) as usize);
            }
            TOKEN_LISTEN => {
                let index = usize::try_from(data & 0xFF_FFFF).unwrap_or(usize::MAX);
                self.accept_client(Some(index), ops);
            }
            _ => match data {
                TOKEN_LISTENER => self.accept_client(None, ops),
                TOKEN_CONTROL => self.accept_monitor(monitor::Kind::Control, ops),
                TOKEN_METRICS => self.accept_monitor(monitor::Kind::Metrics, ops),
                TOKEN_HANDOFF => self.handoff_requested(),
                TOKEN_VHOST => {
                    if let Some(jobs) = self.vhost.take() {
                        jobs.run(self);
                        self.vhost = Some(jobs);
                    }
                }
                TOKEN_TIMER => {
                    let _ = self.timer.wait();
                    // Changes made in shared memory without a WAKE reach vhost-user VMs
                    // within a tick.
                    self.arbiter.proxy_due_soon();
                    self.arbiter.heal();
                    self.arbiter.sweep();
                    self.arbiter.observe_handles();
                    self.expire_conns(ops);
                    self.resume_listeners(ops);
                    if self.listener_paused
                        && ops
                            .add(Events::with_data(
                                self.server.listener(),
                                TOKEN_LISTENER,
                                EventSet::IN,
                            ))
                            .is_ok()
                    {
                        self.listener_paused = false;
                    }
                    self.resume_further_listeners(ops);
                    self.lift_fences();
                    self.server.expire_handshakes(Instant::now());
                }
                TOKEN_STOP => {
                    let _ = self.stop_bell.read();
                    self.stop = true;
                    self.asked_to_stop = true;
                }
                _ => {}
            },
        }
        // Wake-ups the arbiter decided on (WAKE, mutex handoffs, reclaims, sweeps).
        self.ring_peers();
        // What vhost-user VMs are to hear of (events, WAITs completed).
        if let Some(jobs) = self.vhost.take() {
            jobs.deliver(self);
            self.vhost = Some(jobs);
        }
        // Clients with messages queued are watched for writability, the others not.
        self.watch_client_output(ops);
        // Whatever happened, tell the watchers (and keep it in the ring).
        self.publish_events(ops);
        // Then keep what a crash must not lose (no-op without --fd-store), unless a
        // request's delivery just did.
        if !std::mem::take(&mut self.journaled) {
            self.journal();
        }
    }
}

impl crate::vhost_user::bridge::Host for Daemon {
    fn arbiter(&mut self) -> &mut Arbiter<Region> {
        &mut self.arbiter
    }
    fn reserve_id(&mut self) -> Option<PeerId> {
        self.server.reserve_proxy_id()
    }
    fn release_id(&mut self, id: PeerId) {
        self.server.release_proxy_id(id);
    }
    fn grant(&mut self, id: PeerId) {
        // Who the frontend is stays inside vhost-user-backend's listener: the socket alone
        // identifies these VMs to the rules (`socket = "vhost-user"`).
        let identity = Identity {
            socket: crate::policy::VHOST_USER_SOCKET.to_string(),
            uid: None,
            gid: None,
            label: None,
        };
        let grant = self.config.policy.resolve(&identity);
        tracing::info!(
            id = id.raw(),
            policy = grant.policy.name.as_str(),
            "vhost-user VM identified: {identity}"
        );
        self.arbiter.set_peer_grant(id, grant);
    }
}

impl Daemon {
    /// Serves the region to VMs through the vhost-user device too (`vshmd --vhost-user
    /// PATH`, docs/VHOST-USER.md): listens on `path` now and accepts VMs on a thread of its
    /// own; their calls are answered by this loop. Call before [`Daemon::run`].
    pub fn serve_vhost_user(
        &mut self,
        path: &std::path::Path,
        window: u64,
    ) -> Result<(), DaemonError> {
        let page = self.arbiter.layout().alignment.max(4096);
        if window < page || window % page != 0 {
            return Err(DaemonError::Config(format!(
                "--vhost-user-window {window}: a multiple of the page size ({page}), at least one page"
            )));
        }
        let listener = crate::vhost_user::listen(path)
            .map_err(|e| DaemonError::Config(format!("--vhost-user: {e}")))?;
        let bound = std::fs::metadata(path).ok().map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        let owned = (path.to_owned(), bound);
        self.vhost_socket = bound.map(|id| (path.to_owned(), id));
        let (bridge, jobs) = crate::vhost_user::bridge::bridge()?;
        let memfd = std::sync::Arc::new(self.memfd.try_clone()?);
        let config = crate::vhost_user::DeviceConfig {
            window_size: window,
            page_size: page,
            region_epoch: self.arbiter.epoch(),
            quarantine_ms: u32::try_from(self.config.quarantine.as_millis()).unwrap_or(u32::MAX),
        };
        self.vhost = Some(jobs);
        std::thread::Builder::new()
            .name(format!("vshmd-{}-vhost", self.config.name))
            .spawn(move || {
                crate::vhost_user::accept_loop(listener, bridge, memfd, config);
                // Its loop stopped. The path goes only if it is still this socket (a
                // process that took the region over may have bound it anew).
                let (path, bound) = owned;
                let now = std::fs::metadata(&path).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.dev(), m.ino())
                });
                if bound.is_some() && now == bound {
                    let _ = std::fs::remove_file(&path);
                }
            })?;
        tracing::info!(path = %path.display(), window, "serving VMs through vhost-user");
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Kept in systemd's fd store and ending by a failure: systemd starts vshmd again
        // with the stored sockets, whose files must still lead to them.
        if self.fdstore.is_some() && !self.asked_to_stop {
            self.keep_files();
        }
        if !self.keep_files {
            remove_if_same(&self.config.control, self.control_id);
            remove_if_same(
                &crate::handoff::handoff_path(&self.config.control),
                self.handoff_id,
            );
            if let Some((path, id)) = &self.vhost_socket {
                remove_if_same(path, *id);
            }
        }
    }
}
