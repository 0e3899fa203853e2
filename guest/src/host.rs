//! Host-process transport: connect to vshmd's ivshmem socket exactly as QEMU does, receive
//! the shared-memory fd and the eventfds, map the region, ring the host through the eventfds
//! it handed us, and wait for our own eventfds (every vector).
//!
//! Waiting: one background thread (`vshm-bells`) drains every eventfd the host rings us on
//! and counts the rings; threads that wait sleep on a condition variable until the count
//! moves, then re-check their own condition. So any number of threads can wait on different
//! things at once and no thread can swallow a wake-up meant for another.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vshm_format::layout::{Layout, Superblock};
use vshm_format::mailbox::ConnectRefusal;
use vshm_format::shm::{read_pod, RawRegion};
use vshm_format::{PeerId, RegionOffset};

use crate::{Transport, TransportError};

#[cfg(feature = "vhost-user")]
pub mod vhost_user;

/// Failure to connect to vshmd.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The socket could not be reached.
    #[error("cannot connect to vshmd socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The server broke the ivshmem protocol.
    #[error("ivshmem protocol error from {path}: {what}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// Reading the socket failed.
    #[error("reading the vshmd socket failed: {0}")]
    Io(#[from] io::Error),
    /// The region could not be mapped.
    #[error("cannot map the shared memory ({size} bytes): {source}")]
    Map {
        /// Size of the memfd.
        size: u64,
        /// Cause.
        source: io::Error,
    },
    /// The region's header does not validate.
    #[error("the shared region is not a valid vshm region: {0}")]
    Region(vshm_format::layout::LayoutError),
    /// vshmd refused the connection and said why (e.g. every peer slot is in use).
    #[error("vshmd at {path} refused the connection: {reason}")]
    Refused {
        /// Socket path.
        path: PathBuf,
        /// Why (FORMAT.md §15).
        reason: ConnectRefusal,
    },
}

/// The start of an ivshmem client's handshake with vshmd (QEMU's server protocol): what
/// comes before the peers' eventfds. Every client of the socket reads it the same way —
/// this library's host transport and the VMM's ivshmem device.
#[derive(Debug)]
pub struct Handshake {
    /// The connection; the `(peer id, eventfd)` messages follow on it ([`recv_msg`]).
    pub sock: UnixStream,
    /// This client's peer id.
    pub peer_id: PeerId,
    /// The region's memfd.
    pub memfd: File,
}

/// Connects to the ivshmem socket at `path` and reads the protocol version (or vshmd's
/// refusal and its reason), this client's peer id and the region's fd.
pub fn handshake(path: &Path) -> Result<Handshake, HostError> {
    let protocol = |what: String| HostError::Protocol {
        path: path.to_owned(),
        what,
    };
    let sock = UnixStream::connect(path).map_err(|source| HostError::Connect {
        path: path.to_owned(),
        source,
    })?;
    let next = || -> Result<(i64, Option<File>), HostError> {
        recv_msg(&sock)?.ok_or_else(|| HostError::Protocol {
            path: path.to_owned(),
            what: "server closed the connection during the handshake".into(),
        })
    };
    match next()? {
        (0, None) => {}
        // A refusal (vshm's own): -code, then a detail, then the server closes.
        (v, None) if v < 0 => {
            let detail = match recv_msg(&sock) {
                Ok(Some((d, None))) => d,
                _ => 0,
            };
            let reason = ConnectRefusal::from_wire(v, detail).unwrap_or(ConnectRefusal::Other(v));
            return Err(HostError::Refused {
                path: path.to_owned(),
                reason,
            });
        }
        (v, _) => return Err(protocol(format!("unsupported protocol version {v}"))),
    }
    let peer_id = match next()? {
        (id, None) => u16::try_from(id)
            .map(PeerId)
            .map_err(|_| protocol(format!("bad peer id {id}")))?,
        (_, Some(_)) => return Err(protocol("peer id came with an fd".into())),
    };
    let memfd = match next()? {
        (-1, Some(f)) => f,
        (v, _) => return Err(protocol(format!("expected the shared memory fd, got {v}"))),
    };
    Ok(Handshake {
        sock,
        peer_id,
        memfd,
    })
}

/// One protocol message: a little-endian i64 and at most one fd.
pub fn recv_msg(sock: &UnixStream) -> io::Result<Option<(i64, Option<File>)>> {
    let mut buf = [0u8; 8];
    let (n, file) = sock.recv_with_fd(&mut buf).map_err(io::Error::from)?;
    if n == 0 {
        return Ok(None);
    }
    // A message is 8 bytes; a stream may deliver it in pieces (never with a second fd).
    let mut got = n;
    while got < 8 {
        let m = (&*sock).read(&mut buf[got..])?;
        if m == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "truncated message",
            ));
        }
        got += m;
    }
    Ok(Some((i64::from_le_bytes(buf), file)))
}

/// A shared read-write mapping of a whole file (the region's memfd), unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is a plain address range; access goes through RawRegion.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `len` bytes of `file`, shared and writable.
    pub fn new(file: &File, len: u64) -> io::Result<Mapping> {
        Self::new_at(file, 0, len)
    }

    /// Maps `len` bytes of `file` from `offset` (page-aligned), shared and writable.
    pub fn new_at(file: &File, offset: u64, len: u64) -> io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh shared mapping of a file we own; the kernel picks the address and
        // we check the result. Nothing else refers to the address range yet.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Mapping { base, len })
    }

    /// The mapping as a region, borrowing the mapping: it cannot outlive it.
    ///
    /// ```compile_fail
    /// # fn f(file: &std::fs::File) {
    /// let region = vshm::host::Mapping::new(file, 4096).expect("map").region();
    /// let _ = vshm::format::shm::SharedMemory::size(&region); // the mapping is gone
    /// # }
    /// ```
    pub fn region(&self) -> RawRegion<'_> {
        // SAFETY: the mapping is `len` bytes, page-aligned, and valid until drop; the
        // region borrows `self`, so it cannot outlive the mapping.
        unsafe { RawRegion::new(self.base, self.len as u64) }
    }

    /// The address of `[offset, offset+len)` inside the mapping, if that range lies inside
    /// it and starts and ends on page boundaries.
    fn subrange(&self, offset: u64, len: u64) -> io::Result<(*mut libc::c_void, usize)> {
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let inside = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.len as u64);
        if !inside || len == 0 || offset % page != 0 || len % page != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok((self.base.as_ptr().wrapping_add(start).cast(), len))
    }

    /// Replaces `[offset, offset+len)` of the mapping with private zero pages: this
    /// process's accesses there stop reaching the shared file (a revoked section,
    /// docs/FORMAT.md §11a). Accesses racing with it see either the file or zeroes.
    pub fn fence(&self, offset: u64, len: u64) -> io::Result<()> {
        let (addr, len) = self.subrange(offset, len)?;
        // SAFETY: `addr..addr+len` lies inside our own mapping (checked above), so
        // MAP_FIXED replaces only pages we own; the mapping stays valid (now private) for
        // every RawRegion over it.
        let p = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Maps `[offset, offset+len)` of `file` at its place in the mapping again, shared
    /// (undoes [`Mapping::fence`]).
    pub fn unfence(&self, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let (addr, len) = self.subrange(offset, len)?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: as in `fence`: only pages inside our own mapping are replaced, by the
        // same file's pages at the same offset, as `new` mapped them.
        let p = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; every RawRegion over it borrowed `self`,
        // so none is left.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

struct Shared {
    gone: AtomicBool,
    /// Other peers' eventfds, per vector (for ringing them directly).
    peers: Mutex<BTreeMap<PeerId, Vec<File>>>,
    /// Rings received so far (any vector) and backend departures; waiters sleep until it
    /// moves.
    rings: Mutex<u64>,
    rung: Condvar,
    /// Run by the bells thread after each burst of rings (the namespace's audit, §11a).
    hook: Mutex<Option<crate::RingHook>>,
}

/// This peer's attributable acknowledgement (FORMAT.md §11a): its own copy of the host's
/// vector-1 eventfd, which no other peer holds.
struct Acker {
    bell: Option<File>,
}

impl Acker {
    fn acknowledge(&self, seq: u64) -> bool {
        let Some(bell) = &self.bell else {
            return false;
        };
        let value = vshm_format::revoke::ack_ring_value(seq);
        (&*bell).write_all(&value.to_ne_bytes()).is_ok()
    }
}

/// What the bells thread gives the ring hook.
struct BellsContext<'a> {
    map: &'a Mapping,
    acker: &'a Acker,
}

impl crate::transport::HookContext for BellsContext<'_> {
    fn region(&self) -> RawRegion<'_> {
        self.map.region()
    }
    fn revoke(&self, offset: RegionOffset, len: u64) -> bool {
        self.map.fence(offset.raw(), len).is_ok()
    }
    fn acknowledge(&self, seq: u64) -> bool {
        self.acker.acknowledge(seq)
    }
}

impl Shared {
    /// Counts a ring and wakes every waiting thread (each re-checks its own condition).
    fn bump(&self) {
        if let Ok(mut n) = self.rings.lock() {
            *n = n.wrapping_add(1);
        }
        self.rung.notify_all();
    }
}

/// The longest a waiter sleeps without re-checking its condition: a safety net for a ring
/// that never comes (a peer may scribble the `waiters` word that asks for it).
const RECHECK: Duration = Duration::from_millis(50);

/// How long a wait looks at its condition before it sleeps on the ring count: a few µs,
/// about what an eventfd round trip between two processes costs here (BENCHMARKS.md P2,
/// P3), so an answer that comes within it costs no sleep and no hop through the bells
/// thread; short enough not to take a core a peer needs for long.
const SPIN: Duration = Duration::from_micros(5);

/// A lock poisoned by a panicking thread: report it as an I/O error.
const POISONED: TransportError = TransportError::Os(libc::EIO);

/// A host process attached to vshmd as an ivshmem peer.
pub struct HostTransport {
    sock: UnixStream,
    peer_id: PeerId,
    /// Eventfds the host gave us for ringing it, by vector.
    host_bells: Vec<File>,
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    /// Drains our own vectors' eventfds (see the module doc); stopped through `stop`.
    bells: Option<JoinHandle<()>>,
    stop: EventFd,
    memfd: File,
    /// Shared with the bells thread, which runs the ring hook over it.
    map: Arc<Mapping>,
    /// Shared with the bells thread too.
    acker: Arc<Acker>,
}

impl std::fmt::Debug for HostTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTransport")
            .field("peer_id", &self.peer_id)
            .field("size", &self.map.len)
            .finish()
    }
}

impl HostTransport {
    /// Connects to the vshmd socket at `path` and completes the ivshmem handshake.
    pub fn connect(path: &Path) -> Result<HostTransport, HostError> {
        let protocol = |what: String| HostError::Protocol {
            path: path.to_owned(),
            what,
        };
        let Handshake {
            sock,
            peer_id,
            memfd,
        } = handshake(path)?;
        let next = || -> Result<(i64, Option<File>), HostError> {
            recv_msg(&sock)?.ok_or_else(|| HostError::Protocol {
                path: path.to_owned(),
                what: "server closed the connection during the handshake".into(),
            })
        };
        let size = memfd.metadata()?.len();
        let map =
            Arc::new(Mapping::new(&memfd, size).map_err(|source| HostError::Map { size, source })?);
        let region = map.region();
        // A superblock that does not validate may have been scribbled by a peer: vshmd
        // rewrites it within one heal period, so look again briefly before giving up.
        let layout = crate::os::retry_scribbled(|| {
            let sb: Superblock = read_pod(&region, 0)
                .map_err(|_| vshm_format::layout::LayoutError::TooSmall(256, size))?;
            Layout::from_superblock(&sb, size)
        })
        .map_err(HostError::Region)?;
        let vectors = layout.vectors as usize;

        let mut host_bells = Vec::new();
        let mut own = Vec::new();
        let mut peers: BTreeMap<PeerId, Vec<File>> = BTreeMap::new();
        while own.len() < vectors {
            let (id, fd) = next()?;
            let id = u16::try_from(id)
                .map(PeerId)
                .map_err(|_| protocol(format!("bad peer id {id}")))?;
            let fd = fd.ok_or_else(|| protocol(format!("peer {id} left during the handshake")))?;
            if id == peer_id {
                own.push(fd);
            } else if id == PeerId::HOST {
                host_bells.push(fd);
            } else {
                peers.entry(id).or_default().push(fd);
            }
        }
        if host_bells.len() != vectors {
            return Err(protocol(format!(
                "got {} host eventfds, expected {vectors}",
                host_bells.len()
            )));
        }
        let shared = Arc::new(Shared {
            gone: AtomicBool::new(false),
            peers: Mutex::new(peers),
            rings: Mutex::new(0),
            rung: Condvar::new(),
            hook: Mutex::new(None),
        });
        let reader = {
            let sock = sock.try_clone()?;
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vshm-ivshmem".into())
                .spawn(move || read_peer_updates(&sock, &shared))?
        };
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let acker = Arc::new(Acker {
            bell: match host_bells.get(usize::from(vshm_format::layout::VECTOR_WAKE)) {
                Some(f) => Some(f.try_clone()?),
                None => None,
            },
        });
        let bells = {
            let stop = stop.try_clone()?;
            let shared = Arc::clone(&shared);
            let map = Arc::clone(&map);
            let acker = Arc::clone(&acker);
            std::thread::Builder::new()
                .name("vshm-bells".into())
                .spawn(move || {
                    let ctx = BellsContext {
                        map: &map,
                        acker: &acker,
                    };
                    drain_bells(&own, &stop, &shared, &ctx);
                })?
        };
        Ok(HostTransport {
            sock,
            peer_id,
            host_bells,
            shared,
            reader: Some(reader),
            bells: Some(bells),
            stop,
            memfd,
            map,
            acker,
        })
    }

    /// The shared-memory fd (the memfd vshmd owns).
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    /// Peer ids currently connected besides us and the host, as the server announced them.
    pub fn other_peers(&self) -> Vec<PeerId> {
        self.shared
            .peers
            .lock()
            .map(|p| p.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Whether vshmd closed our connection.
    pub fn backend_gone(&self) -> bool {
        self.shared.gone.load(Ordering::Acquire)
    }
}

/// Keeps reading the socket after the handshake: peers joining (id + fd) and leaving (id
/// alone). Marks the backend gone at EOF and wakes any waiter.
fn read_peer_updates(sock: &UnixStream, shared: &Shared) {
    while let Ok(Some((id, fd))) = recv_msg(sock) {
        let Ok(id) = u16::try_from(id).map(PeerId) else {
            continue;
        };
        if let Ok(mut peers) = shared.peers.lock() {
            match fd {
                Some(f) => peers.entry(id).or_default().push(f),
                None => {
                    peers.remove(&id);
                }
            }
        }
    }
    shared.gone.store(true, Ordering::Release);
    shared.bump();
}

/// Drains our eventfds (one per vector) as the host rings them, runs the ring hook (after
/// rings, and when it asked to run again) and wakes the waiters, until `stop` is written.
fn drain_bells(own: &[File], stop: &EventFd, shared: &Shared, ctx: &BellsContext<'_>) {
    let mut fds: Vec<libc::pollfd> = own
        .iter()
        .map(|f| f.as_raw_fd())
        .chain(std::iter::once(stop.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let Ok(nfds) = libc::nfds_t::try_from(fds.len()) else {
        return;
    };
    let mut again: Option<Instant> = None;
    loop {
        let timeout = again.map_or(-1, |at| {
            let ms = at.saturating_duration_since(Instant::now()).as_millis();
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        });
        // SAFETY: `fds` is a valid array of `nfds` pollfds for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        if rc < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        let mut rang = false;
        for (pfd, file) in fds.iter().zip(own) {
            if pfd.revents & libc::POLLIN != 0 {
                let mut buf = [0u8; 8];
                let _ = (&*file).read(&mut buf);
                rang = true;
            } else if pfd.revents != 0 {
                // POLLERR/POLLHUP on an eventfd: nothing more will come from it.
                return;
            }
        }
        let due = again.is_some_and(|at| Instant::now() >= at);
        if rang || due {
            again = None;
            if let Ok(hook) = shared.hook.lock() {
                if let Some(hook) = hook.as_ref() {
                    again = hook(ctx).map(|d| Instant::now() + d);
                }
            }
        }
        if rang {
            shared.bump();
        }
    }
}

impl Drop for HostTransport {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(b) = self.bells.take() {
            let _ = b.join();
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

fn ring_file(f: &File) -> Result<(), TransportError> {
    (&*f)
        .write_all(&1u64.to_ne_bytes())
        .map_err(|e| TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
}

impl Transport for HostTransport {
    fn region(&self) -> RawRegion<'_> {
        self.map.region()
    }

    fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    fn ring(&self, peer: PeerId, vector: u16) -> Result<(), TransportError> {
        if self.backend_gone() {
            return Err(TransportError::BackendGone);
        }
        let v = usize::from(vector);
        if peer == self.peer_id {
            // Another thread of this process waits: what our bells thread does when an
            // eventfd of ours is rung, without the trip through the eventfd.
            if v >= self.host_bells.len() {
                return Err(TransportError::Os(libc::EINVAL));
            }
            self.shared.bump();
            return Ok(());
        }
        if peer == PeerId::HOST {
            return match self.host_bells.get(v) {
                Some(f) => ring_file(f),
                None => Err(TransportError::Os(libc::EINVAL)),
            };
        }
        let peers = self
            .shared
            .peers
            .lock()
            .map_err(|_| TransportError::Os(libc::EIO))?;
        match peers.get(&peer).and_then(|fds| fds.get(v)) {
            Some(f) => ring_file(f),
            None => Err(TransportError::Os(libc::ENOENT)),
        }
    }

    fn thread_token(&self) -> u32 {
        crate::os::current_tid()
    }

    fn notify_local(&self) {
        self.shared.bump();
    }

    fn token_alive(&self, token: u32) -> bool {
        crate::os::process_alive(token)
    }

    fn revoke(&self, offset: RegionOffset, len: u64) -> bool {
        self.map.fence(offset.raw(), len).is_ok()
    }

    fn restore(&self, offset: RegionOffset, len: u64) -> Result<(), TransportError> {
        self.map
            .unfence(&self.memfd, offset.raw(), len)
            .map_err(|e| TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    /// A host process is a peer of its own: it acknowledges through its own copy of the
    /// host's vector-1 eventfd.
    fn acknowledge(&self, seq: u64) -> bool {
        self.acker.acknowledge(seq)
    }

    fn set_ring_hook(&self, hook: Option<crate::RingHook>) {
        if let Ok(mut h) = self.shared.hook.lock() {
            *h = hook;
        }
    }

    fn wait_until(
        &self,
        ready: &mut dyn FnMut() -> bool,
        timeout: Duration,
    ) -> Result<bool, TransportError> {
        let start = Instant::now();
        let spin = SPIN.min(timeout);
        while start.elapsed() < spin {
            if ready() {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        loop {
            // Read the ring count before the condition: a ring after the check moves it, so
            // the wait below cannot miss it.
            let seen = *self.shared.rings.lock().map_err(|_| POISONED)?;
            if ready() {
                return Ok(true);
            }
            if self.backend_gone() {
                return Err(TransportError::BackendGone);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(false);
            }
            let rings = self.shared.rings.lock().map_err(|_| POISONED)?;
            let _ = self
                .shared
                .rung
                .wait_timeout_while(rings, left.min(RECHECK), |n| *n == seen)
                .map_err(|_| POISONED)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use vshm_format::shm::SharedMemory;

    use super::Mapping;

    /// A 64 KiB shared file (a memfd, as vshmd's region) and a mapping of it.
    fn shared_file() -> (std::fs::File, Mapping) {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"vshm-fence-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: a fresh fd we own.
        let mut file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(64 * 1024).expect("size");
        file.seek(SeekFrom::Start(0)).expect("seek");
        file.write_all(&[7u8; 64 * 1024]).expect("fill");
        let map = Mapping::new(&file, 64 * 1024).expect("map");
        (file, map)
    }

    #[test]
    fn a_fenced_range_reads_zeroes_and_its_writes_never_reach_the_file_until_unfenced() {
        let (file, map) = shared_file();
        let other = Mapping::new(&file, 64 * 1024).expect("second mapping");
        map.fence(16 * 1024, 8 * 1024).expect("fence");
        let r = map.region();
        let mut buf = [0u8; 4];
        r.read_bytes(16 * 1024, &mut buf).expect("read");
        assert_eq!(buf, [0; 4], "private zero pages");
        r.write_bytes(16 * 1024, &[9; 4]).expect("write");
        other
            .region()
            .read_bytes(16 * 1024, &mut buf)
            .expect("read");
        assert_eq!(buf, [7; 4], "the write stayed private");
        r.read_bytes(24 * 1024, &mut buf).expect("read");
        assert_eq!(buf, [7; 4], "outside the range the file is still mapped");
        map.unfence(&file, 16 * 1024, 8 * 1024).expect("unfence");
        r.read_bytes(16 * 1024, &mut buf).expect("read");
        assert_eq!(buf, [7; 4], "shared again");
        r.write_bytes(16 * 1024, &[5; 4]).expect("write");
        other
            .region()
            .read_bytes(16 * 1024, &mut buf)
            .expect("read");
        assert_eq!(buf, [5; 4], "and its writes reach the file");
    }

    #[test]
    fn a_range_outside_the_mapping_or_off_page_boundaries_is_refused() {
        let (_file, map) = shared_file();
        assert!(map.fence(60 * 1024, 8 * 1024).is_err(), "past the end");
        assert!(map.fence(100, 4096).is_err(), "unaligned offset");
        assert!(map.fence(4096, 100).is_err(), "unaligned length");
        assert!(map.fence(4096, 0).is_err(), "empty");
        assert!(map.fence(u64::MAX - 4095, 4096).is_err(), "overflow");
    }
}
