//! The ivshmem server: QEMU's protocol (docs/specs/ivshmem-spec.rst), byte-exact.
//!
//! Server → client only; each message is one little-endian i64 with at most one fd.
//! On connect: 0 (version); the client's peer id; -1 + the shared-memory fd; for every
//! other peer its id once per vector with one eventfd each; the client's own id once per
//! vector with its eventfds. Later: id + fd = a peer joined. vshmd never sends "id alone"
//! (a peer left): QEMU frees that id's eventfd array on it and writes into the freed array
//! if the id joins again. A departed id is *parked* with its eventfds instead and handed,
//! with those same eventfds, to a later newcomer (FORMAT.md §15).
//! A refused client gets `-code` instead of the version, then a detail number, then the
//! connection is closed (vshm's own refusal codes, [`ConnectRefusal`]; QEMU gives up on
//! any version but 0).
//!
//! The host is peer 0. Each client gets its *own* set of eventfds for peer 0, so the backend
//! knows which client rang.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vshm_format::layout::HOST_PEER_ID;
use vshm_format::mailbox::ConnectRefusal;
use vshm_format::PeerId;

/// Time a client has to take its whole handshake (version, id, memory, eventfds) off its
/// socket; past it, it is cut off.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);

/// An fd attached to a queued message, kept open until the message is sent.
type Attached = crate::handoff::Shared;

/// One queued ivshmem message: an i64 and at most one fd.
struct Message {
    value: i64,
    fd: Option<Attached>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("value", &self.value)
            .field("fd", &self.fd.as_ref().map(|fd| fd.as_raw_fd()))
            .finish()
    }
}

/// A client's outgoing messages, in order (QEMU reads fds in the order they arrive), sent
/// as fast as its socket takes them and never waited for.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Message>,
    /// Bytes of the head message already written (a stream socket may take part of one).
    partial: usize,
    /// Messages written so far.
    sent: u64,
}

/// What writing a client's queue came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything is out.
    Empty,
    /// The socket is full; the rest waits for writability.
    Pending,
    /// The socket failed (the client left).
    Broken,
}

impl Outbox {
    fn push(&mut self, value: i64, fd: Option<Attached>) {
        self.queue.push_back(Message { value, fd });
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Messages written so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Writes as much as `out` takes without blocking.
    fn flush(&mut self, out: &mut impl MessageSink) -> Flushed {
        while let Some(m) = self.queue.front() {
            let bytes = m.value.to_le_bytes();
            let rest = &bytes[self.partial..];
            // The fd goes with the message's first byte.
            let fd = if self.partial == 0 {
                m.fd.as_ref().map(|f| f.as_raw_fd())
            } else {
                None
            };
            match out.send(rest, fd) {
                Ok(0) => return Flushed::Broken,
                Ok(n) if n < rest.len() => self.partial += n,
                Ok(_) => {
                    self.partial = 0;
                    self.sent += 1;
                    self.queue.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flushed::Pending,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Flushed::Broken,
            }
        }
        Flushed::Empty
    }

    /// Drops everything queued (closing the fds it kept).
    fn clear(&mut self) {
        self.queue.clear();
        self.partial = 0;
    }
}

/// Where an [`Outbox`] writes (a socket; a fake in tests).
trait MessageSink {
    fn send(&mut self, bytes: &[u8], fd: Option<RawFd>) -> io::Result<usize>;
}

impl MessageSink for &UnixStream {
    fn send(&mut self, bytes: &[u8], fd: Option<RawFd>) -> io::Result<usize> {
        match fd {
            Some(fd) => self.send_with_fd(bytes, fd).map_err(io::Error::from),
            None => io::Write::write(self, bytes),
        }
    }
}

/// A connected client (a QEMU or a host process).
#[derive(Debug)]
pub struct Client {
    /// Its peer id.
    pub id: PeerId,
    /// Which connection this is (counts up per region, never reused): names its fds in
    /// systemd's fd store (`crate::fdstore`).
    pub serial: u64,
    /// Its connection (non-blocking).
    pub stream: UnixStream,
    /// Its interrupt eventfds (we write vector k to interrupt it).
    pub own: Vec<Arc<EventFd>>,
    /// The eventfds it rings us on (our peer 0, its private copy).
    pub bells: Vec<Arc<EventFd>>,
    /// Process id of the other end (SO_PEERCRED), where known.
    pub pid: Option<i32>,
    /// User and group ids of the other end (SO_PEERCRED), where known: with the socket it
    /// came through and its process label, what its policy is chosen by (`policy`).
    pub uid: Option<u32>,
    /// See `uid`.
    pub gid: Option<u32>,
    /// A pidfd for that process, opened at connect (no PID reuse can fool it), where the
    /// kernel has pidfd_open.
    pub pidfd: Option<OwnedFd>,
    /// When it connected.
    pub since: SystemTime,
    /// What it has yet to be sent.
    pub outbox: Outbox,
    /// The daemon watches its socket for writability (output pending).
    pub watching_out: bool,
    /// Until the handshake is out: the deadline for it.
    handshake_until: Option<Instant>,
    /// Messages in the handshake (it is out once that many were written).
    handshake_len: u64,
    /// Every peer id whose eventfds it was sent (never forgotten: departures are not
    /// announced, so what it holds for an id stays valid for that id's next occupant).
    known: BTreeSet<PeerId>,
}

impl Client {
    /// Whether its handshake has not all been written yet.
    pub fn handshaking(&self) -> bool {
        self.handshake_until.is_some()
    }

    /// Whether it may hold the shared memory without having completed its handshake (the
    /// memfd, message 3, was written but not all of the rest).
    pub fn half_handshaken(&self) -> bool {
        self.handshaking() && self.outbox.sent() >= 3
    }

    /// Whether it has output waiting.
    pub fn wants_out(&self) -> bool {
        !self.outbox.is_empty()
    }
}

/// Opens a pidfd for `pid` (Linux 5.3+).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; nothing is
    // borrowed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the process behind a pidfd has exited (the pidfd is readable then).
pub fn pidfd_exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, without waiting.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc > 0 && p.revents & libc::POLLIN != 0
}

/// Why the socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another server answers on the path.
    #[error("{0} is in use by a running server (remove it only if that server is gone)")]
    InUse(PathBuf),
    /// Something other than a socket is at the path; it is never replaced.
    #[error("{0} exists and is not a socket (refusing to replace it; choose another path)")]
    NotSocket(PathBuf),
    /// A socket is at the path but whether a server listens on it could not be told.
    #[error("{path} exists and cannot check whether a server is listening on it: {source}")]
    Check {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Bind failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// Identity (device, inode) of a socket file we bound, so that cleanup only removes our own.
pub type SocketId = (u64, u64);

/// Binds a UNIX socket, replacing a stale socket file but never a live server, nor anything
/// that is not a socket. The socket is created owner-only and then given `mode`. Returns the
/// listener (non-blocking) and the socket file's identity for [`remove_if_same`].
pub fn bind_unix(path: &Path, mode: u32) -> Result<(UnixListener, SocketId), ServerError> {
    bind_unix_as(path, mode, None)
}

/// [`bind_unix`], and the socket file is given group `group` (while still owner-only, so
/// nobody outside that group can connect in between) before it gets `mode`.
pub fn bind_unix_as(
    path: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(UnixListener, SocketId), ServerError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let check_err = |source| ServerError::Check {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotSocket(path.to_owned()));
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::InUse(path.to_owned())),
                // Nobody listens: a stale socket left behind by a server that is gone.
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(check_err(e)),
                    }
                }
                // EACCES and the like: a server may well be running; leave it alone.
                Err(e) => return Err(check_err(e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(check_err(e)),
    }
    let bind_err = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    // Create the socket owner-only so nobody can connect before the chmod below.
    // SAFETY: umask has no memory effects; it is process-wide, and is restored right away.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(bind_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    let id = (meta.dev(), meta.ino());
    if let Some(gid) = group {
        if let Err(e) = std::os::unix::fs::chown(path, None, Some(gid)) {
            remove_if_same(path, id);
            return Err(bind_err(e));
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((listener, id))
}

/// Removes the socket file at `path` if it is still the one identified by `id` (someone may
/// have replaced it since). Returns whether it was removed.
pub fn remove_if_same(path: &Path, id: SocketId) -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == id => std::fs::remove_file(path).is_ok(),
        _ => false,
    }
}

/// Credentials (pid, uid, gid) of the process at the other end of a UNIX socket.
pub fn peer_credentials(stream: &UnixStream) -> Option<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::ucred>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred)
}

/// What [`Server::accept`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Nothing pending.
    Nothing,
    /// The connection was refused before it got an id (why).
    Refused(&'static str),
    /// A new peer (its handshake is queued and goes out as its socket takes it).
    Connected(PeerId),
}

/// Tells a client why it is refused (FORMAT.md §15): `-code` where the protocol version
/// goes, then a detail number; the caller then drops (closes) the connection. Best effort:
/// a fresh socket has room for 16 bytes, and a client that is gone loses nothing.
fn refuse(stream: &UnixStream, why: ConnectRefusal) -> Accepted {
    let (code, detail) = why.to_wire();
    let mut msg = [0u8; 16];
    msg[..8].copy_from_slice(&code.to_le_bytes());
    msg[8..].copy_from_slice(&detail.to_le_bytes());
    if stream.set_nonblocking(true).is_ok() {
        let _ = io::Write::write(&mut &*stream, &msg);
    }
    Accepted::Refused(why.what())
}

/// The ivshmem server state.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file we bound (removed on drop only if still ours).
    id: SocketId,
    vectors: u32,
    max_peers: u32,
    clients: BTreeMap<PeerId, Client>,
    /// The lowest id never handed out (above 65535 once all were).
    next_id: u32,
    /// The highest id handed out (65535; lower only for tests, [`MAX_PEER_ID_ENV`]).
    max_id: PeerId,
    /// Ids whose occupant left, with the eventfds every client that knows the id holds.
    parked: BTreeMap<PeerId, Vec<Arc<EventFd>>>,
    /// The serial of the connection each id's eventfds were made for (they stay with the
    /// id, parked and reused): part of their names in the fd store.
    own_birth: BTreeMap<PeerId, u64>,
    /// The next connection's serial.
    next_serial: u64,
    /// Parked ids whose last occupant was cut off and may still run: not handed out until
    /// its process exited ([`Server::unfence_id`]).
    fenced_ids: BTreeSet<PeerId>,
    /// Peers vshmd disconnected because they stopped reading (their process may live on).
    cut_off: std::collections::HashSet<PeerId>,
    /// Most messages one client may have waiting (twice the largest handshake).
    queue_limit: usize,
    /// Some client's queue changed since [`Server::interest_changes`] last looked.
    queues_changed: bool,
    /// Leave the socket file when dropped (handed over, or not yet taken over).
    keep_file: bool,
    /// [`Server::hold_new_output`].
    hold_new_output: bool,
    /// Peer ids of VMs attached through the vhost-user device (no connection here).
    proxy_ids: BTreeSet<PeerId>,
    /// Ids such VMs had, for the next ones (never given to an ivshmem client: other
    /// clients hold nothing for them, but they were never parked with eventfds either).
    free_proxy_ids: Vec<PeerId>,
    /// Output held until [`Server::release_output`].
    output_held: bool,
}

/// Most messages a client may have waiting: twice the largest handshake (version, id,
/// memory, then `vectors` eventfds for the host, each other peer and itself), so a client
/// that takes its handshake slowly still gets the joins that happen meanwhile, and one that
/// stops reading costs at most this many queued messages (their fds are shared, not dup'd).
pub fn queue_limit(vectors: u32, max_peers: u32) -> usize {
    let handshake = 3 + u64::from(vectors) * (u64::from(max_peers) + 1);
    usize::try_from(2 * handshake).unwrap_or(usize::MAX)
}

/// Test knob: the highest peer id vshmd hands out (default and maximum 65535), so a test
/// can cycle through the whole id space quickly. Not for production use.
pub const MAX_PEER_ID_ENV: &str = "VSHMD_TEST_MAX_PEER_ID";

/// The highest peer id to hand out: [`MAX_PEER_ID_ENV`] if set to 1..=65535, else 65535.
fn max_peer_id() -> PeerId {
    std::env::var(MAX_PEER_ID_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u16>().ok())
        .filter(|&v| v >= 1)
        .map_or(PeerId(u16::MAX), PeerId)
}

impl Server {
    /// Listens on `path` (mode 0660: QEMU often runs as another user of the same group).
    pub fn bind(path: &Path, vectors: u32, max_peers: u32) -> Result<Server, ServerError> {
        Server::bind_as(path, vectors, max_peers, 0o660, None)
    }

    /// [`Server::bind`] with the socket file's mode and group.
    pub fn bind_as(
        path: &Path,
        vectors: u32,
        max_peers: u32,
        mode: u32,
        group: Option<u32>,
    ) -> Result<Server, ServerError> {
        let (listener, id) = bind_unix_as(path, mode, group)?;
        Ok(Server {
            listener,
            path: path.to_owned(),
            id,
            vectors,
            max_peers,
            clients: BTreeMap::new(),
            next_id: 1,
            own_birth: BTreeMap::new(),
            next_serial: 1,
            max_id: max_peer_id(),
            parked: BTreeMap::new(),
            fenced_ids: BTreeSet::new(),
            cut_off: std::collections::HashSet::new(),
            queue_limit: queue_limit(vectors, max_peers),
            queues_changed: false,
            keep_file: false,
            hold_new_output: false,
            output_held: false,
            proxy_ids: BTreeSet::new(),
            free_proxy_ids: Vec::new(),
        })
    }

    /// The listening socket.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Connected clients.
    pub fn clients(&self) -> impl Iterator<Item = &Client> {
        self.clients.values()
    }

    /// One client.
    pub fn client(&self, id: PeerId) -> Option<&Client> {
        self.clients.get(&id)
    }

    /// Accepts one pending connection. `register` runs after the id is chosen and before
    /// the client learns it (the arbiter prepares the peer's memory there). The handshake
    /// and the join messages to the others are queued and written as far as each socket
    /// takes them: nothing here waits for any client.
    pub fn accept(
        &mut self,
        memfd: &File,
        register: impl FnOnce(PeerId) -> io::Result<()>,
    ) -> io::Result<Accepted> {
        let stream = match self.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Accepted::Nothing),
            Err(e) => return Err(e),
        };
        self.admit(stream, memfd, register)
    }

    /// [`Server::accept`] for a connection accepted elsewhere: the further listening
    /// sockets of a region (`vshmd --config`, `[[region.listen]]`) all feed this server.
    pub fn admit(
        &mut self,
        stream: UnixStream,
        memfd: &File,
        register: impl FnOnce(PeerId) -> io::Result<()>,
    ) -> io::Result<Accepted> {
        if self.clients.len() >= self.max_peers as usize {
            return Ok(refuse(
                &stream,
                ConnectRefusal::PeerSlotsFull {
                    max_peers: u64::from(self.max_peers),
                },
            ));
        }
        let Some(id) = self.next_safe_id() else {
            return Ok(refuse(&stream, ConnectRefusal::NoSafeId));
        };
        stream.set_nonblocking(true)?;
        let cred = peer_credentials(&stream);
        let pid = cred.map(|c| c.pid).filter(|&pid| pid > 0);
        let pidfd = pid.and_then(|p| match pidfd_open(p) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::debug!(pid = p, "pidfd_open failed: {e}");
                None
            }
        });
        let mk = || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map(Arc::new);
        // A parked id comes with the eventfds its earlier occupants had, which every client
        // that knows the id still holds for it: their rings now reach the newcomer.
        let serial = self.next_serial;
        let own = match self.parked.get(&id) {
            Some(fds) => fds.clone(),
            None => (0..self.vectors)
                .map(|_| mk())
                .collect::<io::Result<Vec<_>>>()?,
        };
        let bells = (0..self.vectors)
            .map(|_| mk())
            .collect::<io::Result<Vec<_>>>()?;
        let memfd: Attached = Arc::new(memfd.try_clone()?);
        if let Err(e) = register(id) {
            // The arbiter has no slot for it (e.g. the free ones are fenced): refuse it.
            tracing::debug!(id = id.raw(), "registering a new peer failed: {e}");
            return Ok(refuse(&stream, ConnectRefusal::NoReadySlot));
        }
        self.next_serial += 1;
        if !self.parked.contains_key(&id) {
            self.own_birth.insert(id, serial);
        }
        let mut client = Client {
            id,
            serial,
            pid,
            uid: cred.map(|c| c.uid),
            gid: cred.map(|c| c.gid),
            pidfd,
            stream,
            own,
            bells,
            since: SystemTime::now(),
            outbox: Outbox::default(),
            watching_out: false,
            handshake_until: Some(Instant::now() + HANDSHAKE_DEADLINE),
            handshake_len: 0,
            known: self.clients.keys().copied().chain([id]).collect(),
        };
        // Handed out: a parked id is no longer parked, a fresh one moves the counter on.
        if self.parked.remove(&id).is_none() {
            self.next_id = u32::from(id.raw()) + 1;
        }
        let raw = |p: PeerId| i64::from(p.raw());
        let shared = |fd: &Arc<EventFd>| -> Option<Attached> { Some(fd.clone()) };
        client.outbox.push(0, None);
        client.outbox.push(raw(id), None);
        client.outbox.push(-1, Some(memfd));
        for bell in &client.bells {
            client.outbox.push(i64::from(HOST_PEER_ID), shared(bell));
        }
        for other in self.clients.values() {
            for fd in &other.own {
                client.outbox.push(raw(other.id), shared(fd));
            }
        }
        for fd in &client.own {
            client.outbox.push(raw(id), shared(fd));
        }
        client.handshake_len = u64::try_from(client.outbox.len()).unwrap_or(u64::MAX);
        // Tell everyone else about the newcomer (queued: none of them is waited for). A
        // client that knows the id already holds these very eventfds for it: telling it
        // again would overfill QEMU's per-id array, so it is told nothing.
        let mut over = Vec::new();
        for other in self.clients.values_mut() {
            if !other.known.insert(id) {
                continue;
            }
            for fd in &client.own {
                other.outbox.push(raw(id), shared(fd));
            }
            if other.outbox.len() > self.queue_limit {
                over.push(other.id);
            }
        }
        tracing::info!(id = id.raw(), pid = client.pid, "peer connected");
        self.clients.insert(id, client);
        for other in over {
            self.cut(other, "its queue of unread messages is full");
        }
        if self.hold_new_output {
            self.output_held = true;
        } else {
            self.flush_all();
        }
        Ok(Accepted::Connected(id))
    }

    /// Writes every client's queue as far as its socket takes it.
    pub fn flush_all(&mut self) {
        let ids: Vec<PeerId> = self.clients.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
    }

    /// With `true`, [`Server::admit`] queues the handshake and the joins and holds every
    /// client's output until [`Server::release_output`]: the caller first records the new
    /// client where a crash cannot lose it (`crate::fdstore`) — a client that has its
    /// handshake is attached — and a record that must wait (a busy service manager) holds
    /// the handshake with it.
    pub fn hold_new_output(&mut self, hold: bool) {
        self.hold_new_output = hold;
    }

    /// Writes what [`Server::hold_new_output`] held.
    pub fn release_output(&mut self) {
        if std::mem::take(&mut self.output_held) {
            self.queues_changed = true;
            self.flush_all();
        }
    }

    /// Writes as much of client `id`'s queue as its socket takes. A broken socket is shut
    /// down so the event loop sees the end of stream and drops the client.
    pub fn flush(&mut self, id: PeerId) -> Option<Flushed> {
        if self.output_held {
            return Some(Flushed::Pending);
        }
        let c = self.clients.get_mut(&id)?;
        self.queues_changed = true;
        let done = c.outbox.flush(&mut &c.stream);
        if c.handshake_until.is_some() && c.outbox.sent() >= c.handshake_len {
            c.handshake_until = None;
        }
        if done == Flushed::Broken {
            c.outbox.clear();
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        Some(done)
    }

    /// Cuts client `id` off: it is alive but not taking its messages. Its socket is shut
    /// down (the event loop then drops it) and [`Server::was_cut_off`] says so.
    fn cut(&mut self, id: PeerId, why: &str) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        tracing::warn!(id = id.raw(), pid = c.pid, "cutting off a peer: {why}");
        self.queues_changed = true;
        c.outbox.clear();
        let _ = c.stream.shutdown(std::net::Shutdown::Both);
        self.cut_off.insert(id);
    }

    /// Cuts off every client whose handshake is not out by its deadline. Runs on the timer.
    pub fn expire_handshakes(&mut self, now: Instant) {
        let late: Vec<PeerId> = self
            .clients
            .values()
            .filter(|c| c.handshake_until.is_some_and(|d| now > d))
            .filter(|c| !self.cut_off.contains(&c.id))
            .map(|c| c.id)
            .collect();
        for id in late {
            self.cut(id, "it did not take its handshake in time");
        }
    }

    /// The next peer id to hand out: the lowest parked id that is not fenced, else the
    /// lowest never handed out (up to [`Server::max_id`]). Departures are never announced
    /// and a reused id keeps its eventfds, so no client ever sees an id leave and come back
    /// (QEMU's use-after-free, FORMAT.md §15), and ids run out only if more than the id
    /// space are connected or fenced at once. `None` then.
    fn next_safe_id(&self) -> Option<PeerId> {
        let parked = self
            .parked
            .keys()
            .copied()
            .find(|id| !self.fenced_ids.contains(id) && !self.clients.contains_key(id));
        parked.or_else(|| {
            let id = u16::try_from(self.next_id).ok().map(PeerId)?;
            (id != PeerId::HOST && id <= self.max_id && !self.clients.contains_key(&id))
                .then_some(id)
        })
    }

    /// A peer id for a VM attached through the vhost-user device: never one an ivshmem
    /// client has, had (parked) or will be given.
    pub fn reserve_proxy_id(&mut self) -> Option<PeerId> {
        let id = self.free_proxy_ids.pop().or_else(|| {
            let id = u16::try_from(self.next_id).ok().map(PeerId)?;
            if id == PeerId::HOST || id > self.max_id || self.clients.contains_key(&id) {
                return None;
            }
            self.next_id += 1;
            Some(id)
        })?;
        self.proxy_ids.insert(id);
        Some(id)
    }

    /// The VM that had proxy id `id` is gone.
    pub fn release_proxy_id(&mut self, id: PeerId) {
        if self.proxy_ids.remove(&id) {
            self.free_proxy_ids.push(id);
        }
    }

    /// Keeps `id` (parked, its last occupant cut off while its process runs) from being
    /// handed out: that process may still look its slot up by id or read its eventfds.
    pub fn fence_id(&mut self, id: PeerId) {
        self.fenced_ids.insert(id);
    }

    /// The process behind fenced `id` exited: the id may be handed out again.
    pub fn unfence_id(&mut self, id: PeerId) {
        self.fenced_ids.remove(&id);
    }

    /// The highest peer id handed out.
    pub fn max_id(&self) -> PeerId {
        self.max_id
    }

    /// Clients whose need to be watched for writability changed since the last call:
    /// (id, socket fd, watch for writability). The caller updates its epoll interest.
    pub fn interest_changes(&mut self) -> Vec<(PeerId, RawFd, bool)> {
        let mut out = Vec::new();
        if !std::mem::take(&mut self.queues_changed) {
            return out; // the doorbell path: nothing was queued or written
        }
        let held = self.output_held;
        for c in self.clients.values_mut() {
            // Held output is not watched for: writability would wake the loop for nothing.
            let want = c.wants_out() && !held;
            if want != c.watching_out {
                c.watching_out = want;
                out.push((c.id, c.stream.as_raw_fd(), want));
            }
        }
        out
    }

    /// Whether vshmd cut `id` off (rather than it leaving); forgets the mark.
    pub fn was_cut_off(&mut self, id: PeerId) -> bool {
        self.cut_off.remove(&id)
    }

    /// Removes a client and parks its id with its eventfds. The others are told nothing:
    /// QEMU would free the id's eventfd array and write into it when the id is reused, and
    /// what they hold for the id stays valid for its next occupant (rings meant for the one
    /// who left land on an eventfd vshmd keeps open, and wake the next one spuriously).
    pub fn disconnect(&mut self, id: PeerId) -> Option<Client> {
        let client = self.clients.remove(&id)?;
        self.parked.insert(id, client.own.clone());
        tracing::info!(id = id.raw(), "peer disconnected; its id is parked");
        Some(client)
    }

    /// Interrupts client `id` on `vector`.
    pub fn notify(&self, id: PeerId, vector: usize) {
        if let Some(fd) = self.clients.get(&id).and_then(|c| c.own.get(vector)) {
            let _ = fd.write(1);
        }
    }
}

/// The value of the handshake message that carries the region's memfd (ivshmem: -1).
const MEMORY_MESSAGE: i64 = -1;

/// Fresh eventfds standing in for ones systemd did not keep (a client cut off at recovery).
fn stand_ins(n: usize) -> io::Result<Vec<Arc<EventFd>>> {
    (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map(Arc::new))
        .collect()
}

/// One client, as plain data with its fds named by index ([`crate::handoff::FdTable`]).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClientSnapshot {
    id: u16,
    /// 0 from a vshmd before serials: one is given on arrival.
    #[serde(default)]
    serial: u64,
    stream: u32,
    own: Vec<u32>,
    bells: Vec<u32>,
    pid: Option<i32>,
    uid: Option<u32>,
    gid: Option<u32>,
    pidfd: Option<u32>,
    since_ms: u64,
    /// Queued messages: value and attached fd.
    outbox: Vec<(i64, Option<u32>)>,
    partial: usize,
    sent: u64,
    /// Time left to take the handshake, if it is not out yet.
    handshake_left_ms: Option<u64>,
    handshake_len: u64,
    known: Vec<u16>,
}

/// The server's state, as plain data (the listener travels as an fd of its own).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ServerSnapshot {
    /// The socket file bound (device, inode).
    pub socket_id: SocketId,
    clients: Vec<ClientSnapshot>,
    next_id: u32,
    /// Parked ids with their eventfds.
    parked: Vec<(u16, Vec<u32>)>,
    fenced_ids: Vec<u16>,
    cut_off: Vec<u16>,
    #[serde(default)]
    next_serial: u64,
    #[serde(default)]
    own_birth: Vec<(u16, u64)>,
}

impl Server {
    /// The state to hand to a new process; every fd it names is added to `fds` (the
    /// listener too, as `listener`).
    pub fn snapshot(&self, fds: &mut crate::handoff::FdTable) -> (u32, ServerSnapshot) {
        let listener = fds.add(&self.listener, || "socket".into());
        let birth = |id: PeerId| self.own_birth.get(&id).copied().unwrap_or(0);
        let own_name = |id: PeerId, v: usize| format!("own.{}.{}.{v}", id.raw(), birth(id));
        // Every fd with a name of its own first: a queued message shares another client's
        // eventfd, which must keep that client's name whatever the order.
        for c in self.clients.values() {
            for (v, e) in c.own.iter().enumerate() {
                fds.add(&**e, || own_name(c.id, v));
            }
        }
        for (id, own) in &self.parked {
            for (v, e) in own.iter().enumerate() {
                fds.add(&**e, || own_name(*id, v));
            }
        }
        let clients = self
            .clients
            .values()
            .map(|c| ClientSnapshot {
                id: c.id.raw(),
                serial: c.serial,
                stream: fds.add(&c.stream, || format!("conn.{}", c.serial)),
                own: c
                    .own
                    .iter()
                    .enumerate()
                    .map(|(v, e)| fds.add(&**e, || own_name(c.id, v)))
                    .collect(),
                bells: c
                    .bells
                    .iter()
                    .enumerate()
                    .map(|(v, e)| fds.add(&**e, || format!("bell.{}.{v}", c.serial)))
                    .collect(),
                pid: c.pid,
                uid: c.uid,
                gid: c.gid,
                pidfd: c
                    .pidfd
                    .as_ref()
                    .map(|p| fds.add(p, || format!("pidfd.{}", c.serial))),
                since_ms: c
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0)),
                // Messages are numbered from the first ever queued (sent + position).
                outbox: (c.outbox.sent..)
                    .zip(c.outbox.queue.iter())
                    .map(|(n, m)| {
                        // The memory message's fd is a copy of the region's memfd: not named
                        // again (systemd keeps one name per file); the receiver
                        // attaches its own copy.
                        let fd = m
                            .fd
                            .as_ref()
                            .filter(|_| m.value != MEMORY_MESSAGE)
                            .map(|f| fds.add(&f.as_raw_fd(), || format!("msg.{}.{n}", c.serial)));
                        (m.value, fd)
                    })
                    .collect(),
                partial: c.outbox.partial,
                sent: c.outbox.sent,
                handshake_left_ms: c.handshake_until.map(|d| {
                    u64::try_from(d.saturating_duration_since(Instant::now()).as_millis())
                        .unwrap_or(u64::MAX)
                }),
                handshake_len: c.handshake_len,
                known: c.known.iter().map(|p| p.raw()).collect(),
            })
            .collect();
        let parked = self
            .parked
            .iter()
            .map(|(id, own)| {
                let own = own
                    .iter()
                    .enumerate()
                    .map(|(v, e)| fds.add(&**e, || own_name(*id, v)))
                    .collect();
                (id.raw(), own)
            })
            .collect();
        (
            listener,
            ServerSnapshot {
                socket_id: self.id,
                clients,
                next_id: self.next_id,
                parked,
                fenced_ids: self.fenced_ids.iter().map(|p| p.raw()).collect(),
                cut_off: self.cut_off.iter().map(|p| p.raw()).collect(),
                next_serial: self.next_serial,
                own_birth: self.own_birth.iter().map(|(i, b)| (i.raw(), *b)).collect(),
            },
        )
    }

    /// Rebuilds a server from another process's state and the fds it sent. The socket
    /// file is left in place when it is dropped until [`Server::own_socket_file`].
    pub fn from_snapshot(
        listener: UnixListener,
        path: &Path,
        vectors: u32,
        max_peers: u32,
        snap: ServerSnapshot,
        fds: &mut crate::handoff::Received,
        memfd: &File,
    ) -> Result<Server, crate::handoff::HandoffError> {
        // Eventfds first, so an fd queued in a message is shared with its owner.
        let mut clients = BTreeMap::new();
        let mut pending = Vec::new();
        let mut next_serial = snap.next_serial.max(1);
        let mut own_birth: BTreeMap<PeerId, u64> = snap
            .own_birth
            .into_iter()
            .map(|(i, b)| (PeerId(i), b))
            .collect();
        let mut cut = Vec::new();
        for c in snap.clients {
            let id = PeerId(c.id);
            let eventfds = |fds: &mut crate::handoff::Received, list: &[u32]| {
                list.iter()
                    .map(|&i| fds.eventfd(i))
                    .collect::<Result<Vec<_>, _>>()
            };
            let (own, bells, stream) = match (eventfds(fds, &c.own), eventfds(fds, &c.bells)) {
                (Ok(own), Ok(bells)) => (own, bells, fds.stream(c.stream)?),
                (own, bells) if fds.is_recovered() => {
                    // systemd did not keep them all (its store was full): this client
                    // cannot be served as it was; it is cut off and reclaimed.
                    tracing::warn!(
                        id = c.id,
                        "eventfds of a client missing from the fd store: cut off"
                    );
                    let io = |source: io::Error| crate::handoff::HandoffError::Io {
                        step: "making stand-in eventfds",
                        source,
                    };
                    let own = own.or_else(|_| stand_ins(c.own.len())).map_err(io)?;
                    let bells = bells.or_else(|_| stand_ins(c.bells.len())).map_err(io)?;
                    drop(fds.take(c.stream));
                    cut.push(id);
                    (own, bells, crate::handoff::closed_stream()?)
                }
                (Err(e), _) | (_, Err(e)) => return Err(e),
            };
            // A pidfd systemd did not keep: /proc is polled instead.
            let pidfd = c.pidfd.and_then(|i| fds.take(i).ok());
            let serial = if c.serial == 0 {
                next_serial += 1;
                next_serial - 1
            } else {
                c.serial
            };
            own_birth.entry(id).or_insert(serial);
            pending.push((id, c.outbox));
            clients.insert(
                id,
                Client {
                    id,
                    serial,
                    stream,
                    own,
                    bells,
                    pid: c.pid,
                    uid: c.uid,
                    gid: c.gid,
                    pidfd,
                    since: SystemTime::UNIX_EPOCH + Duration::from_millis(c.since_ms),
                    outbox: Outbox {
                        queue: VecDeque::new(),
                        partial: c.partial,
                        sent: c.sent,
                    },
                    // Recomputed by the first `interest_changes`.
                    watching_out: false,
                    handshake_until: c
                        .handshake_left_ms
                        .map(|ms| Instant::now() + Duration::from_millis(ms)),
                    handshake_len: c.handshake_len,
                    known: c.known.into_iter().map(PeerId).collect(),
                },
            );
        }
        let mut parked = BTreeMap::new();
        let mut fenced_ids: BTreeSet<PeerId> = snap.fenced_ids.into_iter().map(PeerId).collect();
        for (id, own) in snap.parked {
            let own = match own
                .iter()
                .map(|&i| fds.eventfd(i))
                .collect::<Result<Vec<_>, _>>()
            {
                Ok(own) => own,
                Err(_) if fds.is_recovered() => {
                    // Clients that know the id hold its old eventfds: never hand it out
                    // again with new ones.
                    tracing::warn!(
                        id,
                        "a parked id's eventfds are missing from the fd store: retired"
                    );
                    fenced_ids.insert(PeerId(id));
                    continue;
                }
                Err(e) => return Err(e),
            };
            parked.insert(PeerId(id), own);
            own_birth.entry(PeerId(id)).or_insert_with(|| {
                next_serial += 1;
                next_serial - 1
            });
        }
        for (id, outbox) in pending {
            let mut queue = VecDeque::with_capacity(outbox.len());
            let mut whole = true;
            for (value, fd) in outbox {
                let fd = if value == MEMORY_MESSAGE {
                    let copy =
                        memfd
                            .try_clone()
                            .map_err(|source| crate::handoff::HandoffError::Io {
                                step: "copying the memfd for a queued handshake",
                                source,
                            })?;
                    Some(Arc::new(copy) as Attached)
                } else {
                    match fd.map(|i| fds.attached(i)).transpose() {
                        Ok(fd) => fd,
                        Err(_) if fds.is_recovered() => {
                            whole = false;
                            None
                        }
                        Err(e) => return Err(e),
                    }
                };
                queue.push_back(Message { value, fd });
            }
            if !whole && !cut.contains(&id) {
                tracing::warn!(
                    id = id.raw(),
                    "a queued message's fd is missing from the fd store: cut off"
                );
                cut.push(id);
            }
            if let Some(c) = clients.get_mut(&id) {
                c.outbox.queue = queue;
            }
        }
        // A client cut off here reads the end of its stand-in socket at once.
        for id in &cut {
            if let Some(c) = clients.get_mut(id) {
                c.stream = crate::handoff::closed_stream()?;
            }
        }
        Ok(Server {
            listener,
            path: path.to_owned(),
            id: snap.socket_id,
            vectors,
            max_peers,
            clients,
            next_id: snap.next_id,
            max_id: max_peer_id(),
            parked,
            own_birth,
            next_serial,
            fenced_ids,
            cut_off: snap.cut_off.into_iter().map(PeerId).collect(),
            queue_limit: queue_limit(vectors, max_peers),
            queues_changed: true,
            keep_file: true,
            hold_new_output: false,
            output_held: false,
            proxy_ids: BTreeSet::new(),
            free_proxy_ids: Vec::new(),
        })
    }

    /// Leaves the socket file in place when dropped (it was handed to another process, or
    /// is still the old process's).
    pub fn keep_socket_file(&mut self) {
        self.keep_file = true;
    }

    /// Removes the socket file when dropped, if it is still the one bound (this process
    /// now serves it).
    pub fn own_socket_file(&mut self) {
        self.keep_file = false;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.keep_file {
            remove_if_same(&self.path, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory for one test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vshm-bind-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn a_regular_file_at_the_path_is_neither_replaced_nor_removed() {
        let dir = scratch("file");
        let path = dir.join("control");
        std::fs::write(&path, b"precious").expect("write");
        let err = bind_unix(&path, 0o600).expect_err("must not bind over a file");
        assert!(
            matches!(err, ServerError::NotSocket(ref p) if *p == path),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&*path.to_string_lossy()) && msg.contains("is not a socket"),
            "{msg}"
        );
        assert_eq!(std::fs::read(&path).expect("still there"), b"precious");
        // Nor a directory.
        let sub = dir.join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        assert!(matches!(
            bind_unix(&sub, 0o600),
            Err(ServerError::NotSocket(_))
        ));
        assert!(sub.is_dir());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_stale_socket_is_replaced_with_the_requested_mode() {
        use std::os::unix::fs::FileTypeExt;
        let dir = scratch("stale");
        let path = dir.join("s");
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(path.exists(), "the dropped listener leaves its file behind");
        let (listener, id) = bind_unix(&path, 0o640).expect("replaces the stale socket");
        let meta = std::fs::symlink_metadata(&path).expect("stat");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        UnixStream::connect(&path).expect("the new listener answers");
        drop(listener);
        assert!(remove_if_same(&path, id));
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_live_listener_makes_binding_fail_with_in_use() {
        let dir = scratch("live");
        let path = dir.join("s");
        let live = UnixListener::bind(&path).expect("bind");
        let err = bind_unix(&path, 0o600).expect_err("must not steal a live socket");
        assert!(
            matches!(err, ServerError::InUse(ref p) if *p == path),
            "{err}"
        );
        UnixStream::connect(&path).expect("the live listener still answers");
        drop(live);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn drop_removes_only_the_socket_it_bound() {
        let dir = scratch("drop");
        let path = dir.join("s");
        // Normally the server removes its socket.
        drop(Server::bind(&path, 1, 8).expect("bind"));
        assert!(!path.exists());
        // If the path was replaced meanwhile, the replacement is left alone.
        let server = Server::bind(&path, 1, 8).expect("bind");
        std::fs::remove_file(&path).expect("unlink");
        std::fs::write(&path, b"someone else's").expect("write");
        drop(server);
        assert_eq!(std::fs::read(&path).expect("kept"), b"someone else's");
        // Likewise a socket of another server bound at the same path.
        std::fs::remove_file(&path).expect("unlink");
        let server = Server::bind(&path, 1, 8).expect("bind");
        std::fs::remove_file(&path).expect("unlink");
        let other = UnixListener::bind(&path).expect("bind");
        drop(server);
        UnixStream::connect(&path).expect("the other server's socket is still there");
        drop(other);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn connect(server: &mut Server, memfd: &File) -> (UnixStream, PeerId) {
        let client = UnixStream::connect(server.path()).expect("connect");
        for _ in 0..1000 {
            if let Accepted::Connected(id) = server.accept(memfd, |_| Ok(())).expect("accept") {
                return (client, id);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no connection accepted");
    }

    /// Reads one message (i64 + optional fd) a client was sent, if one is waiting.
    fn next_msg(client: &UnixStream) -> Option<(i64, Option<File>)> {
        let mut buf = [0u8; 8];
        let (n, fd) = client.recv_with_fd(&mut buf).ok()?;
        (n == 8).then(|| (i64::from_le_bytes(buf), fd))
    }

    /// Every message waiting for `client` (after the server flushed).
    fn drain(client: &UnixStream) -> Vec<(i64, bool)> {
        client.set_nonblocking(true).expect("nonblocking");
        std::iter::from_fn(|| next_msg(client))
            .map(|(v, fd)| (v, fd.is_some()))
            .collect()
    }

    #[test]
    fn a_departed_id_is_parked_never_announced_and_handed_on_with_the_same_eventfds() {
        let dir = std::env::temp_dir().join(format!("vshm-server-park-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut server = Server::bind(&dir.join("s"), 2, 8).expect("bind");
        let memfd = File::open("/dev/zero").expect("an fd to send");
        let (a_sock, a) = connect(&mut server, &memfd);
        let (_b_sock, b) = connect(&mut server, &memfd);
        assert_eq!((a, b), (PeerId(1), PeerId(2)));
        let b_fds = server.client(b).expect("b").own.clone();
        let _ = drain(&a_sock);
        server.disconnect(b);
        assert!(drain(&a_sock).is_empty(), "A is not told that 2 left");
        // The next newcomer gets 2 back, with the eventfds A already holds for 2, and A is
        // told nothing (its QEMU would count them as a second set).
        let (c_sock, c) = connect(&mut server, &memfd);
        assert_eq!(c, PeerId(2));
        let c_fds = &server.client(c).expect("c").own;
        assert!(
            c_fds.iter().zip(&b_fds).all(|(x, y)| Arc::ptr_eq(x, y)),
            "the same eventfds"
        );
        assert!(drain(&a_sock).is_empty(), "A already knows 2");
        // C's handshake: version, id, memory, 2 host bells, A's 2 eventfds, its own 2.
        let hs = drain(&c_sock);
        assert_eq!(hs.len(), 3 + 2 + 2 + 2, "{hs:?}");
        assert_eq!(&hs[..2], &[(0, false), (2, false)]);
        // C knew 1 (A) when it joined: when 1 is reused it is told nothing.
        server.disconnect(a);
        let (_d_sock, d) = connect(&mut server, &memfd);
        assert_eq!(d, PeerId(1), "1 is parked and reused");
        assert!(drain(&c_sock).is_empty(), "C already holds 1's eventfds");
        // A client that joined while 3 was parked (fenced) never knew 3: it is told when 3
        // is handed out.
        let (_e_sock, e) = connect(&mut server, &memfd);
        assert_eq!(e, PeerId(3));
        server.disconnect(e);
        server.fence_id(e);
        let (f_sock, f) = connect(&mut server, &memfd);
        assert_eq!(f, PeerId(4), "3 is fenced");
        let _ = drain(&f_sock);
        server.unfence_id(e);
        let (_g_sock, g) = connect(&mut server, &memfd);
        assert_eq!(g, PeerId(3));
        assert_eq!(
            drain(&f_sock),
            [(3, true), (3, true)],
            "F never knew 3: it learns its eventfds"
        );
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ids_never_run_out_while_one_peer_lives_through_many_times_the_id_space() {
        let dir = std::env::temp_dir().join(format!("vshm-server-ids-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut server = Server::bind(&dir.join("s"), 1, 8).expect("bind");
        server.max_id = PeerId(4);
        let memfd = File::open("/dev/zero").expect("an fd to send");
        let (long_sock, long) = connect(&mut server, &memfd);
        for _ in 0..5 * 4 {
            let (_sock, id) = connect(&mut server, &memfd);
            assert!(id != long && id <= PeerId(4), "{id:?}");
            server.disconnect(id);
            let _ = drain(&long_sock);
        }
        // A fenced id is not handed out until its process is gone.
        let (_x, x) = connect(&mut server, &memfd);
        server.disconnect(x);
        server.fence_id(x);
        let (_y, y) = connect(&mut server, &memfd);
        assert_ne!(y, x, "a fenced id waits");
        server.disconnect(y);
        server.unfence_id(x);
        let (_z, z) = connect(&mut server, &memfd);
        assert_eq!(z, x.min(y), "the lowest parked id, once unfenced");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Accepts the pending connection, expecting a refusal.
    fn refused(server: &mut Server, memfd: &File, ok: bool) -> (UnixStream, &'static str) {
        let client = UnixStream::connect(server.path()).expect("connect");
        for _ in 0..1000 {
            match server
                .accept(memfd, |_| {
                    if ok {
                        Ok(())
                    } else {
                        Err(io::Error::other("fenced"))
                    }
                })
                .expect("accept")
            {
                Accepted::Refused(why) => return (client, why),
                Accepted::Connected(id) => panic!("{id} connected"),
                Accepted::Nothing => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        panic!("no connection accepted");
    }

    /// Everything the server sent before closing.
    fn read_to_end(mut s: &UnixStream) -> Vec<i64> {
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut s, &mut bytes).expect("read");
        bytes
            .chunks(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect()
    }

    #[test]
    fn a_refused_client_is_told_why_with_a_negative_version_and_then_closed() {
        let dir = std::env::temp_dir().join(format!("vshm-refuse-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut server = Server::bind(&dir.join("s"), 1, 1).expect("bind");
        let memfd = File::open("/dev/zero").expect("an fd to send");
        let (_a, a) = connect(&mut server, &memfd);
        let (b, why) = refused(&mut server, &memfd, true);
        assert_eq!(why, "all peer slots are in use");
        assert_eq!(read_to_end(&b), [-1, 1]);
        assert_eq!(
            vshm_format::mailbox::ConnectRefusal::from_wire(-1, 1)
                .expect("refusal")
                .to_string(),
            "the only peer slot is in use (max_peers 1)"
        );
        server.disconnect(a);
        let (c, why) = refused(&mut server, &memfd, false);
        assert!(why.starts_with("no free peer slot is ready"), "{why}");
        assert_eq!(read_to_end(&c), [-3, 0]);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A sink that takes at most `budget` bytes per call and a limited number of calls
    /// before it is full, recording what it got.
    struct Sink {
        got: Vec<(Vec<u8>, Option<RawFd>)>,
        budget: usize,
        calls_left: usize,
        broken: bool,
    }

    impl MessageSink for Sink {
        fn send(&mut self, bytes: &[u8], fd: Option<RawFd>) -> io::Result<usize> {
            if self.broken {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            if self.calls_left == 0 {
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            self.calls_left -= 1;
            let n = bytes.len().min(self.budget);
            self.got.push((bytes[..n].to_vec(), fd));
            Ok(n)
        }
    }

    fn fd_of(f: &File) -> Option<Attached> {
        Some(Arc::new(f.try_clone().expect("dup")))
    }

    #[test]
    fn an_outbox_sends_in_order_resumes_a_split_message_and_sends_its_fd_once() {
        let f = File::open("/dev/null").expect("an fd");
        let mut out = Outbox::default();
        out.push(0, None);
        out.push(7, fd_of(&f));
        out.push(9, None);
        // A socket that takes 5 bytes at a time, then is full after 3 writes.
        let mut sink = Sink {
            got: Vec::new(),
            budget: 5,
            calls_left: 3,
            broken: false,
        };
        assert_eq!(out.flush(&mut sink), Flushed::Pending);
        assert_eq!((out.sent(), out.len()), (1, 2));
        sink.calls_left = 10;
        assert_eq!(out.flush(&mut sink), Flushed::Empty);
        assert_eq!(out.sent(), 3);
        let bytes: Vec<u8> = sink.got.iter().flat_map(|(b, _)| b.clone()).collect();
        let expect: Vec<u8> = [0i64, 7, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(bytes, expect, "the byte stream is the messages in order");
        let fds: Vec<usize> = sink
            .got
            .iter()
            .enumerate()
            .filter(|(_, (_, fd))| fd.is_some())
            .map(|(i, _)| i)
            .collect();
        // Writes: [0..5) [5..8) of 0, then [0..5) of 7 with the fd, [5..8) of 7 without.
        assert_eq!(
            fds,
            vec![2],
            "the fd goes once, with its message's first byte"
        );
        // A broken socket says so.
        out.push(1, None);
        sink.broken = true;
        assert_eq!(out.flush(&mut sink), Flushed::Broken);
    }

    #[test]
    fn the_queue_limit_covers_twice_the_largest_handshake() {
        assert_eq!(queue_limit(1, 1), 2 * (3 + 2));
        assert_eq!(queue_limit(64, 62), 2 * (3 + 64 * 63));
    }

    #[test]
    fn a_client_that_does_not_read_is_never_waited_for_and_is_cut_off_past_its_queue_limit() {
        let dir = scratch("limit");
        let mut server = Server::bind(&dir.join("s"), 64, 8).expect("bind");
        let memfd = File::open("/dev/zero").expect("an fd to send");
        let (_silent, silent) = connect(&mut server, &memfd);
        // Others come and go; each join queues 64 messages for the silent client. (Each id is
        // fenced as it leaves, so every newcomer gets a fresh id the silent client must be
        // told about: a reused id it knows costs it nothing.)
        let started = Instant::now();
        let mut cycles = 0;
        while !server.cut_off.contains(&silent) && cycles < 200 {
            let (c, id) = connect(&mut server, &memfd);
            drop(c);
            server.disconnect(id);
            server.fence_id(id);
            cycles += 1;
        }
        assert!(server.was_cut_off(silent), "cut off after {cycles} joins");
        // 2 × (3 + 64 × 9) messages, 64 per join: about 18 cycles.
        assert!(cycles > 10, "not before its queue is full ({cycles} joins)");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "nothing waited for the silent client ({:?})",
            started.elapsed()
        );
        let c = server
            .client(silent)
            .expect("still listed until the loop drops it");
        assert!(c.outbox.is_empty(), "its queue was dropped");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_client_that_does_not_take_its_handshake_in_time_is_cut_off() {
        let dir = scratch("deadline");
        let mut server = Server::bind(&dir.join("s"), 64, 8).expect("bind");
        let memfd = File::open("/dev/zero").expect("an fd to send");
        let mut keep = Vec::new();
        // Enough peers that a handshake (3 + 64 × (peers + 1) messages with fds) cannot fit
        // in a socket buffer.
        for _ in 0..6 {
            keep.push(connect(&mut server, &memfd));
        }
        let (_silent, silent) = connect(&mut server, &memfd);
        let c = server.client(silent).expect("connected");
        assert!(
            c.handshaking() && c.half_handshaken(),
            "it has the memory, not the rest"
        );
        server.expire_handshakes(Instant::now());
        assert!(!server.was_cut_off(silent), "not before its deadline");
        server.expire_handshakes(Instant::now() + HANDSHAKE_DEADLINE + Duration::from_secs(1));
        assert!(server.was_cut_off(silent));
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
