//! The ivshmem server: QEMU's protocol (docs/specs/ivshmem-spec.rst), byte-exact.
//!
//! Server → client only; each message is one little-endian i64 with at most one fd.
//! On connect: 0 (version); the client's peer id; -1 + the shared-memory fd; for every
//! other peer its id once per vector with one eventfd each; the client's own id once per
//! vector with its eventfds. Later: id + fd = a peer joined; id alone = a peer left.
//!
//! The host is peer 0. Each client gets its *own* set of eventfds for peer 0, so the backend
//! knows which client rang.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vshm_format::layout::HOST_PEER_ID;
use vshm_format::PeerId;

/// A connected client (a QEMU or a host process).
#[derive(Debug)]
pub struct Client {
    /// Its peer id.
    pub id: PeerId,
    /// Its connection.
    pub stream: UnixStream,
    /// Its interrupt eventfds (we write vector k to interrupt it).
    pub own: Vec<EventFd>,
    /// The eventfds it rings us on (our peer 0, its private copy).
    pub bells: Vec<EventFd>,
    /// Process id of the other end (SO_PEERCRED), where known.
    pub pid: Option<i32>,
    /// When it connected.
    pub since: SystemTime,
    /// The server's connect/disconnect clock when it joined.
    joined: u64,
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

fn peer_pid(stream: &UnixStream) -> Option<i32> {
    peer_credentials(stream)
        .map(|c| c.pid)
        .filter(|&pid| pid > 0)
}

fn send(stream: &UnixStream, value: i64, fd: Option<RawFd>) -> io::Result<()> {
    let bytes = value.to_le_bytes();
    match fd {
        Some(fd) => {
            let n = stream
                .send_with_fd(&bytes[..], fd)
                .map_err(io::Error::from)?;
            if n != bytes.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "short ivshmem message",
                ));
            }
            Ok(())
        }
        None => (&*stream).write_all(&bytes),
    }
}

/// What [`Server::accept`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Nothing pending.
    Nothing,
    /// The connection was refused before it got an id (why).
    Refused(&'static str),
    /// A new peer.
    Connected(PeerId),
    /// The peer was registered but the handshake failed: reclaim the id.
    Failed(PeerId),
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
    next_id: PeerId,
    /// Counts connects and disconnects (orders joins against departures).
    clock: u64,
    /// When each id last left.
    departed: std::collections::HashMap<PeerId, u64>,
    /// Peers vshmd disconnected because they stopped reading (their process may live on).
    cut_off: std::collections::HashSet<PeerId>,
}

impl Server {
    /// Listens on `path` (mode 0660: QEMU often runs as another user of the same group).
    pub fn bind(path: &Path, vectors: u32, max_peers: u32) -> Result<Server, ServerError> {
        let (listener, id) = bind_unix(path, 0o660)?;
        Ok(Server {
            listener,
            path: path.to_owned(),
            id,
            vectors,
            max_peers,
            clients: BTreeMap::new(),
            next_id: PeerId(1),
            clock: 0,
            departed: std::collections::HashMap::new(),
            cut_off: std::collections::HashSet::new(),
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
    /// the client learns it (the arbiter prepares the peer's memory there).
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
        if self.clients.len() >= self.max_peers as usize {
            return Ok(Accepted::Refused("all peer slots are in use"));
        }
        let Some(id) = self.next_safe_id() else {
            return Ok(Accepted::Refused(
                "every free peer id was seen leaving by a connected peer",
            ));
        };
        self.next_id = PeerId(id.raw().wrapping_add(1));
        stream.set_nonblocking(false)?;
        // A peer that does not read costs the loop at most this per message, once: it is
        // then cut off.
        stream.set_write_timeout(Some(Duration::from_millis(250)))?;
        let mk = || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC);
        let own = (0..self.vectors)
            .map(|_| mk())
            .collect::<io::Result<Vec<_>>>()?;
        let bells = (0..self.vectors)
            .map(|_| mk())
            .collect::<io::Result<Vec<_>>>()?;
        let client = Client {
            id,
            pid: peer_pid(&stream),
            stream,
            own,
            bells,
            since: SystemTime::now(),
            joined: self.clock + 1,
        };
        if let Err(e) = register(id) {
            // The arbiter has no slot for it (e.g. the free ones are fenced): refuse it.
            tracing::debug!(id = id.raw(), "registering a new peer failed: {e}");
            return Ok(Accepted::Refused("no peer slot is free"));
        }
        if let Err(e) = self.handshake(&client, memfd) {
            // It may have received the memory before failing: the caller reclaims the id.
            tracing::warn!(id = id.raw(), "handshake failed: {e}");
            return Ok(Accepted::Failed(id));
        }
        // Tell everyone else about the newcomer; drop anyone who cannot be told.
        let mut broken = Vec::new();
        for other in self.clients.values() {
            for fd in &client.own {
                if let Err(e) = send(&other.stream, i64::from(id.raw()), Some(fd.as_raw_fd())) {
                    // Timed out: alive but not reading (cut it off). Anything else: it left.
                    let stuck = matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    );
                    broken.push((other.id, stuck));
                    break;
                }
            }
        }
        self.clock += 1;
        tracing::info!(id = id.raw(), pid = client.pid, "peer connected");
        self.clients.insert(id, client);
        for (b, stuck) in broken {
            if stuck {
                tracing::warn!(
                    id = b.raw(),
                    "peer stopped reading its socket; disconnecting it"
                );
                self.cut_off.insert(b);
            }
            let _ = self
                .clients
                .get(&b)
                .map(|c| c.stream.shutdown(std::net::Shutdown::Both));
        }
        Ok(Accepted::Connected(id))
    }

    fn handshake(&self, c: &Client, memfd: &File) -> io::Result<()> {
        send(&c.stream, 0, None)?;
        send(&c.stream, i64::from(c.id.raw()), None)?;
        send(&c.stream, -1, Some(memfd.as_raw_fd()))?;
        for bell in &c.bells {
            send(&c.stream, i64::from(HOST_PEER_ID), Some(bell.as_raw_fd()))?;
        }
        for other in self.clients.values() {
            for fd in &other.own {
                send(&c.stream, i64::from(other.id.raw()), Some(fd.as_raw_fd()))?;
            }
        }
        for fd in &c.own {
            send(&c.stream, i64::from(c.id.raw()), Some(fd.as_raw_fd()))?;
        }
        Ok(())
    }

    /// The next peer id to hand out: ids count up, skipping 0 and ids in use, and an id
    /// whose departure a connected peer witnessed is never reused — QEMU frees part of its
    /// per-id state when told a peer left and writes into it if the id comes back
    /// (ivshmem-server simply counts up; this also survives the wrap at 65535).
    fn next_safe_id(&self) -> Option<PeerId> {
        let oldest = self
            .clients
            .values()
            .map(|c| c.joined)
            .min()
            .unwrap_or(u64::MAX);
        let mut id = self.next_id;
        for _ in 0..=u16::MAX {
            let witnessed = self.departed.get(&id).is_some_and(|&left| left >= oldest);
            if id != PeerId::HOST && !self.clients.contains_key(&id) && !witnessed {
                return Some(id);
            }
            id = PeerId(id.raw().wrapping_add(1));
        }
        None
    }

    /// Whether vshmd cut `id` off (rather than it leaving); forgets the mark.
    pub fn was_cut_off(&mut self, id: PeerId) -> bool {
        self.cut_off.remove(&id)
    }

    /// Removes a client and tells the others it is gone.
    pub fn disconnect(&mut self, id: PeerId) -> Option<Client> {
        let client = self.clients.remove(&id)?;
        self.clock += 1;
        self.departed.insert(id, self.clock);
        for other in self.clients.values() {
            if let Err(e) = send(&other.stream, i64::from(id.raw()), None) {
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    tracing::warn!(
                        id = other.id.raw(),
                        "peer stopped reading its socket; disconnecting it"
                    );
                    self.cut_off.insert(other.id);
                }
                let _ = other.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        tracing::info!(id = id.raw(), "peer disconnected");
        Some(client)
    }

    /// Interrupts client `id` on `vector`.
    pub fn notify(&self, id: PeerId, vector: usize) {
        if let Some(fd) = self.clients.get(&id).and_then(|c| c.own.get(vector)) {
            let _ = fd.write(1);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        remove_if_same(&self.path, self.id);
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

    #[test]
    fn an_id_whose_departure_a_connected_peer_saw_is_not_handed_out_again() {
        let dir = std::env::temp_dir().join(format!("vshm-server-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut server = Server::bind(&dir.join("s"), 1, 8).expect("bind");
        let memfd = File::open("/dev/zero").expect("an fd to send");
        server.next_id = PeerId(5);
        let (_a, a) = connect(&mut server, &memfd);
        let (_b, b) = connect(&mut server, &memfd);
        assert_eq!((a, b), (PeerId(5), PeerId(6)));
        server.disconnect(b);
        // As if the counter had wrapped around to 6: A saw 6 leave, so 6 is skipped.
        server.next_id = PeerId(6);
        let (_c, c) = connect(&mut server, &memfd);
        assert_eq!(c, PeerId(7));
        // Once everyone who saw 6 leave is gone, 6 is safe again.
        server.disconnect(a);
        server.next_id = PeerId(6);
        let (_d, d) = connect(&mut server, &memfd);
        assert_eq!(d, PeerId(6));
        // Ids wrap past 65535 to 1, never 0.
        server.next_id = PeerId(u16::MAX);
        let (_e, e) = connect(&mut server, &memfd);
        let (_f, f) = connect(&mut server, &memfd);
        assert_eq!((e, f), (PeerId(u16::MAX), PeerId(1)));
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
