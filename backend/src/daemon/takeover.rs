//! A region's side of `vshmd --takeover` (docs/OPERATIONS.md): the running process hands
//! its region over — memfd, listening sockets, every client's connection and eventfds,
//! parked ids, fenced peers' pidfds, and the arbiter's and server's state — and stops
//! without removing its socket files; the new process rebuilds a [`Daemon`] from that,
//! checks it against its own configuration and the published header, and serves on. Peers
//! see a pause: rings wait in their eventfds, requests in their mailboxes.
//!
//! The exchange itself (framing, fd chunks, commit) is `crate::handoff`. Here: what a
//! region's state is ([`DaemonState`]), giving it ([`Daemon::handoff_requested`]) and
//! taking it ([`Daemon::take_over`], then [`Daemon::took_over`] once the old process let go).

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::SystemTime;

use event_manager::EventOps;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;
use vshm_format::{PeerId, PeerSlot};

use super::{
    monitor, raise_fd_limit, Config, Daemon, DaemonError, Fence, Listener, SWEEP_INTERVAL,
};
use crate::arbiter::{Arbiter, ArbiterSnapshot, SnapshotError};
use crate::fdstore;
use crate::handoff::{self, FdTable, HandoffError};
use crate::region::Region;
use crate::server::{peer_credentials, Server, ServerSnapshot, SocketId};
use crate::telemetry::Event;

/// Why this process could not take a region over (the running one serves on).
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The exchange failed.
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    /// The running vshmd was started with other settings.
    #[error("the running vshmd has {what} {running}, this one was given {here}")]
    Mismatch {
        /// Which setting.
        what: &'static str,
        /// The running process's value.
        running: String,
        /// This process's value.
        here: String,
    },
    /// The state is not whole or not this region's.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// The settings both processes must share (the region's shape and its sockets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Shape {
    name: String,
    socket: PathBuf,
    control: PathBuf,
    size: u64,
    max_peers: u32,
    max_objects: u32,
    #[serde(default)]
    name_bytes: u64,
    vectors: u32,
    hugepages: bool,
    listen: Vec<(String, PathBuf)>,
    metrics: Option<SocketAddr>,
}

impl Shape {
    fn of(c: &Config) -> Shape {
        Shape {
            name: c.name.clone(),
            socket: c.socket.clone(),
            control: c.control.clone(),
            size: c.size,
            max_peers: c.max_peers,
            max_objects: c.max_objects,
            name_bytes: c.name_area_size(),
            vectors: c.vectors,
            hugepages: c.hugepages,
            listen: c
                .listen
                .iter()
                .map(|l| (l.name.clone(), l.path.clone()))
                .collect(),
            metrics: c.metrics,
        }
    }

    /// The first setting that differs, named as an operator would.
    fn compare(&self, here: &Shape) -> Result<(), TakeoverError> {
        let checks: [(&'static str, bool, String, String); 11] = [
            (
                "region name",
                self.name == here.name,
                format!("{:?}", self.name),
                format!("{:?}", here.name),
            ),
            (
                "--socket",
                self.socket == here.socket,
                format!("{:?}", self.socket),
                format!("{:?}", here.socket),
            ),
            (
                "--control",
                self.control == here.control,
                format!("{:?}", self.control),
                format!("{:?}", here.control),
            ),
            (
                "--size",
                self.size == here.size,
                self.size.to_string(),
                here.size.to_string(),
            ),
            (
                "--max-peers",
                self.max_peers == here.max_peers,
                self.max_peers.to_string(),
                here.max_peers.to_string(),
            ),
            (
                "--max-objects",
                self.max_objects == here.max_objects,
                self.max_objects.to_string(),
                here.max_objects.to_string(),
            ),
            (
                "--name-bytes",
                self.name_bytes == here.name_bytes,
                self.name_bytes.to_string(),
                here.name_bytes.to_string(),
            ),
            (
                "--vectors",
                self.vectors == here.vectors,
                self.vectors.to_string(),
                here.vectors.to_string(),
            ),
            (
                "--hugepages",
                self.hugepages == here.hugepages,
                self.hugepages.to_string(),
                here.hugepages.to_string(),
            ),
            (
                "listening sockets",
                self.listen == here.listen,
                format!("{:?}", self.listen),
                format!("{:?}", here.listen),
            ),
            (
                "--metrics",
                self.metrics == here.metrics,
                format!("{:?}", self.metrics),
                format!("{:?}", here.metrics),
            ),
        ];
        match checks.into_iter().find(|(_, same, _, _)| !same) {
            Some((what, _, running, here)) => Err(TakeoverError::Mismatch {
                what,
                running,
                here,
            }),
            None => Ok(()),
        }
    }
}

/// A further listening socket's fd and file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ListenerState {
    name: String,
    fd: u32,
    id: SocketId,
}

/// A fenced peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FenceState {
    pid: i32,
    slot: u32,
    id: u16,
    pidfd: Option<u32>,
    #[serde(default)]
    serial: u64,
}

/// One region's state as it crosses: plain data, fds named by index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonState {
    shape: Shape,
    /// The old process (for the log).
    pid: u32,
    memfd: u32,
    arbiter: ArbiterSnapshot,
    listener: u32,
    server: ServerSnapshot,
    listeners: Vec<ListenerState>,
    control: u32,
    control_id: SocketId,
    metrics: Option<u32>,
    handoff: u32,
    handoff_id: SocketId,
    fences: Vec<FenceState>,
}

/// What the old process sends: its state, or why not.
#[derive(Debug, Serialize, Deserialize)]
enum Offer {
    State(Box<DaemonState>),
    Refused(String),
}

/// What the new process found when it took a region over (for the banner and the log).
#[derive(Debug, Clone, Copy)]
pub struct TakenOver {
    /// The process it came from.
    pub from_pid: u32,
    /// Peers connected.
    pub peers: usize,
    /// Header entries that differed from the records (rewritten by the first heal).
    pub differ: u32,
}

impl Daemon {
    /// The handoff socket is readable: a new vshmd asks for the region. Runs between
    /// events, so no request is half-served; until the exchange ends this loop serves
    /// nothing. If it fails before the new process committed, the loop goes on as before.
    pub(super) fn handoff_requested(&mut self) {
        let stream = match self.handoff.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::warn!("accepting a takeover connection failed: {e}");
                return;
            }
        };
        // The region is all the memory and every VM's fds: only vshmd's own user (or root)
        // may take it, whatever the socket file's mode.
        let cred = peer_credentials(&stream);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        let pid = cred.map_or(0, |c| c.pid);
        if !cred.is_some_and(|c| c.uid == me || c.uid == 0) {
            tracing::warn!(pid, "refusing a takeover from another user");
            return;
        }
        tracing::info!(pid, "a new vshmd asks to take the region over; pausing");
        match self.hand_off(&stream) {
            Ok(()) => {
                tracing::info!(pid, "handed the region over; stopping");
                self.handed_off = true;
                self.stop = true;
                self.keep_files();
            }
            Err(e) => {
                tracing::warn!(pid, "takeover failed, serving on: {e}");
                self.arbiter
                    .emit(Event::now("error").detail(format!("takeover by pid {pid} failed: {e}")));
            }
        }
    }

    fn hand_off(&mut self, stream: &UnixStream) -> Result<(), HandoffError> {
        handoff::set_timeouts(stream, handoff::STEP_TIMEOUT).map_err(|source| {
            HandoffError::Io {
                step: "setting timeouts",
                source,
            }
        })?;
        handoff::read_hello(stream)?;
        // Rings the arbiter decided on go out now; they are not part of the state.
        self.ring_peers();
        let mut fds = FdTable::default();
        let state = self.state(&mut fds);
        let json = serde_json::to_vec(&Offer::State(Box::new(state)))?;
        handoff::send_state(stream, &json, &fds)?;
        handoff::await_commit(stream)?;
        // The new process serves only once it has read this; if it cannot be written the
        // new process is gone, and this one resumes.
        handoff::release(stream)
    }

    /// Everything that must survive, fds added to `fds`.
    fn state(&self, fds: &mut FdTable) -> DaemonState {
        let memfd = fds.add(&self.memfd, || "memfd".into());
        let (listener, server) = self.server.snapshot(fds);
        DaemonState {
            shape: Shape::of(&self.config),
            pid: std::process::id(),
            memfd,
            arbiter: self.arbiter.snapshot(),
            listener,
            server,
            listeners: self
                .listeners
                .iter()
                .map(|l| ListenerState {
                    name: l.name.clone(),
                    fd: fds.add(&l.listener, || format!("listen.{}", l.name)),
                    id: l.id,
                })
                .collect(),
            control: fds.add(&self.control, || "control".into()),
            control_id: self.control_id,
            metrics: self
                .metrics
                .as_ref()
                .map(|m| fds.add(m, || "metrics".into())),
            handoff: fds.add(&self.handoff, || "handoff".into()),
            handoff_id: self.handoff_id,
            fences: self
                .fences
                .iter()
                .map(|f| FenceState {
                    serial: f.serial,
                    pid: f.pid,
                    slot: f.slot.raw(),
                    id: f.id.raw(),
                    pidfd: f.pidfd.as_ref().map(|p| {
                        fds.add(p, || {
                            format!("fence.{}.{}.{}", f.slot.raw(), f.id.raw(), f.pid)
                        })
                    }),
                })
                .collect(),
        }
    }

    /// Keeps this region in systemd's fd store from now on (`vshmd --fd-store`): stores
    /// its fds and writes the first journal at once.
    pub fn keep_in_fd_store(
        &mut self,
        store: fdstore::FdStore,
    ) -> Result<(), fdstore::FdStoreError> {
        self.fdstore = Some(store);
        self.server.hold_new_output(true);
        self.try_journal().map(|_| ())
    }

    /// Writes the journal (and stores new fds) if the region is kept in the fd store. A
    /// failure is logged: the region serves on, but a crash now would lose more.
    pub(super) fn journal(&mut self) {
        if self.fdstore.is_none() || self.handed_off {
            return;
        }
        match self.try_journal() {
            // Every fd is stored: what was held for them may go out.
            Ok(true) => self.server.release_output(),
            // The service manager does not read now: new clients' handshakes wait, and
            // the rest is stored after the next event (at the latest the next tick).
            Ok(false) => tracing::debug!("the service manager is busy; new handshakes wait"),
            Err(e) => tracing::warn!("cannot keep the region in systemd's fd store: {e}"),
        }
    }

    fn try_journal(&mut self) -> Result<bool, fdstore::FdStoreError> {
        let mut fds = FdTable::default();
        let state = self.state(&mut fds);
        let json = serde_json::to_vec(&state)
            .map_err(|e| fdstore::FdStoreError::Write(io::Error::other(e)))?;
        match self.fdstore.as_mut() {
            Some(store) => store.record(&fds, &json),
            None => Ok(true),
        }
    }

    /// Leaves every socket file in place when dropped.
    pub(super) fn keep_files(&mut self) {
        self.keep_files = true;
        self.server.keep_socket_file();
        for l in &mut self.listeners {
            l.keep_file = true;
        }
    }

    /// Asks the vshmd serving `config`'s region for it and rebuilds it here, checked
    /// against `config` and the published header. Writes nothing to the region and
    /// removes no socket file: until [`Daemon::took_over`] the old process owns both.
    /// Returns the connection to commit on (dropping it makes the old process resume).
    pub fn take_over(config: Config) -> Result<(Daemon, UnixStream, TakenOver), DaemonError> {
        config.layout(4096)?;
        raise_fd_limit();
        let path = handoff::handoff_path(&config.control);
        let stream = handoff::connect(&path).map_err(TakeoverError::from)?;
        let (json, mut fds) = handoff::recv_state(&stream).map_err(TakeoverError::from)?;
        let state = match serde_json::from_slice::<Offer>(&json)
            .map_err(|e| TakeoverError::from(HandoffError::from(e)))?
        {
            Offer::State(s) => *s,
            Offer::Refused(why) => {
                return Err(TakeoverError::from(HandoffError::Refused(why)).into())
            }
        };
        let (daemon, taken) = Daemon::rebuild(config, state, &mut fds)?;
        Ok((daemon, stream, taken))
    }

    /// Rebuilds the region a crashed vshmd left in systemd's fd store (`crate::fdstore`):
    /// the journal's state and the fds passed back, checked like a handover; then what the
    /// published header shows beyond the journal is reconciled, and this process owns the
    /// region at once (a new `backend_epoch`, a heal).
    pub fn recover(
        config: Config,
        mut found: fdstore::Recovered,
    ) -> Result<(Daemon, TakenOver), DaemonError> {
        config.layout(4096)?;
        raise_fd_limit();
        let state: DaemonState = serde_json::from_slice(&found.state)
            .map_err(|e| TakeoverError::from(HandoffError::from(e)))?;
        let (mut daemon, taken) = Daemon::rebuild(config, state, &mut found.fds)?;
        let ahead = daemon.arbiter.adopt_ahead();
        if !found.missing.is_empty() {
            tracing::info!(
                count = found.missing.len(),
                "stored fds systemd no longer had (hung-up clients): their peers are reclaimed"
            );
        }
        if !found.unnamed.is_empty() {
            tracing::warn!(
                names = ?found.unnamed,
                "fds stored after the last journal write (connections in progress): closed"
            );
        }
        daemon.fdstore = Some(found.store);
        daemon.server.hold_new_output(true);
        // Connections the crashed process accepted but never journaled: their clients wait
        // for a handshake. Only the main socket's (a further socket's policy is not known).
        for fd in std::mem::take(&mut found.reconnect) {
            if daemon.config.listen.is_empty() {
                daemon.readmit(UnixStream::from(fd));
            }
        }
        daemon.took_over(&taken, "recovered");
        // At once, not after the first event: a second crash before it would start from
        // the same journal and publish the same backend_epoch again.
        daemon.journal();
        tracing::info!(
            journal = found.seq,
            peers = taken.peers,
            adopted = ahead.adopted,
            redelivered = ahead.redelivered,
            answered = ahead.answered,
            "recovered the region from systemd's fd store"
        );
        Ok((daemon, taken))
    }

    /// A [`Daemon`] from a handed-over or journaled state and its fds, checked against
    /// `config` and the published header.
    fn rebuild(
        config: Config,
        state: DaemonState,
        fds: &mut handoff::Received,
    ) -> Result<(Daemon, TakenOver), DaemonError> {
        state.shape.compare(&Shape::of(&config))?;
        let take = |fds: &mut handoff::Received, i| fds.take(i).map_err(TakeoverError::from);
        let memfd = File::from(take(fds, state.memfd)?);
        let region = Region::adopt(
            memfd.try_clone()?,
            config.size,
            config.hugepages,
            config.lock,
        )?;
        let layout = config.layout(region.page_size())?;
        let policy = config.policy.clone();
        let (arbiter, check) =
            Arbiter::from_snapshot(region, layout, state.arbiter, &|id| policy.resolve(id))
                .map_err(TakeoverError::from)?;
        let listener = UnixListener::from(take(fds, state.listener)?);
        let server = Server::from_snapshot(
            listener,
            &config.socket,
            config.vectors,
            config.max_peers,
            state.server,
            fds,
            &memfd,
        )
        .map_err(TakeoverError::from)?;
        let mut listeners = Vec::new();
        for l in &config.listen {
            let Some(s) = state.listeners.iter().find(|s| s.name == l.name) else {
                return Err(TakeoverError::Mismatch {
                    what: "listening socket",
                    running: "none".into(),
                    here: l.name.clone(),
                }
                .into());
            };
            listeners.push(Listener {
                name: l.name.clone(),
                path: l.path.clone(),
                listener: UnixListener::from(take(fds, s.fd)?),
                id: s.id,
                paused: false,
                keep_file: true,
            });
        }
        let control = UnixListener::from(take(fds, state.control)?);
        let metrics = match state.metrics {
            Some(i) => Some(TcpListener::from(take(fds, i)?)),
            None => None,
        };
        let handoff = UnixListener::from(take(fds, state.handoff)?);
        let mut fences = Vec::new();
        for f in state.fences {
            fences.push(Fence {
                pid: f.pid,
                slot: PeerSlot(f.slot),
                id: PeerId(f.id),
                // One systemd dropped (the process exited): /proc is polled instead.
                pidfd: f.pidfd.and_then(|i| fds.take(i).ok()),
                serial: f.serial,
            });
        }
        let mut timer = TimerFd::new().map_err(io::Error::from)?;
        timer
            .reset(SWEEP_INTERVAL, Some(SWEEP_INTERVAL))
            .map_err(io::Error::from)?;
        let taken = TakenOver {
            from_pid: state.pid,
            peers: server.clients().count(),
            differ: check.objects_differ + check.peers_differ + check.index_differs,
        };
        if taken.differ > 0 {
            tracing::warn!(
                objects = check.objects_differ,
                peers = check.peers_differ,
                index = check.index_differs,
                "header entries differ from the handed-over records; heal rewrites them"
            );
        }
        let daemon = Daemon {
            config,
            arbiter,
            server,
            control,
            control_id: state.control_id,
            handoff,
            handoff_id: state.handoff_id,
            timer,
            stop_bell: EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)?,
            memfd,
            metrics,
            monitor: monitor::Monitor::default(),
            listener_paused: false,
            listeners,
            fences,
            started: SystemTime::now(),
            stop: false,
            keep_files: true,
            handed_off: false,
            rang: false,
            fdstore: None,
            asked_to_stop: false,
            journaled: false,
            vhost: None,
            vhost_socket: None,
        };
        Ok((daemon, taken))
    }

    /// The old process let go: this one owns the region and its socket files now. Moves
    /// `backend_epoch` on (FORMAT.md §3), publishes this configuration's quarantine time,
    /// and heals what differed from the records.
    pub fn took_over(&mut self, taken: &TakenOver, how: &'static str) {
        self.keep_files = false;
        self.server.own_socket_file();
        for l in &mut self.listeners {
            l.keep_file = false;
        }
        let epoch = self.arbiter.bump_epoch();
        self.arbiter.set_quarantine(self.config.quarantine);
        self.arbiter.heal();
        tracing::info!(
            from = taken.from_pid,
            peers = taken.peers,
            epoch,
            how,
            "took the region over"
        );
        self.arbiter.emit(Event::now(how).detail(format!(
            "from pid {}, {} peer(s); backend_epoch {epoch:#x}",
            taken.from_pid, taken.peers
        )));
    }

    /// Watches what an adopted region brought along: its clients' sockets and bells and
    /// its fenced peers' pidfds (a fresh region has none).
    pub(super) fn watch_adopted(&mut self, ops: &mut EventOps) -> bool {
        let ids: Vec<PeerId> = self.server.clients().map(|c| c.id).collect();
        let mut ok = true;
        for id in ids {
            ok &= self.watch_client(id, ops);
        }
        for fence in std::mem::take(&mut self.fences) {
            self.add_fence(fence, ops);
        }
        ok
    }
}
