//! A host process as its own vhost-user frontend and virtio driver for the vshm device
//! (docs/VHOST-USER.md), served by `vshmd --vhost-user PATH`: the host-process counterpart
//! of a VM on that socket. It sees no header and only the sections it opened, mapped into
//! its window by vshmd, so a process gets the same isolation a vhost-user VM has.
//!
//! [`VhostUserTransport::connect`] does what a VMM does at start (features, protocol
//! features, the config space, the window's size, a small "guest memory" for the request
//! queue, the backend request channel) and what a driver does at DRIVER_OK (queue 0 set up
//! and enabled), and, when the device offers `VSHM_F_EVENTQ`, queue 1 with every event
//! buffer posted.
//!
//! One background thread serves the backend channel (SHMEM_MAP / SHMEM_UNMAP into the
//! window), reads the used rings when vshmd signals them and wakes the callers whose
//! answers came, and notices vshmd hanging up (every pending and later call then fails
//! with [`TransportError::BackendGone`], and the window is cleared).
//!
//! Request slots: WAITs and LOCKs (requests that may stay pending) take at most 34 of the 42 (`ring::WAIT_SLOTS`, `ring::SLOTS`), so
//! however many threads wait, other requests find a slot; a WAIT past that waits for one,
//! its own timeout counting (it is answered STATUS_TIMEOUT, as the device would, if that
//! runs out first). A caller that stops waiting leaves its request to the device: when the
//! answer comes and granted something (an OPEN's or CREATE's handle, a LOCK's mutex, an
//! auto-reset event's signal a WAIT took), the thread posts the request that gives it back
//! (CLOSE, UNLOCK, SIGNAL) in the slot the answer frees.
//!
//! News (`DeviceTransport::news`): per object held, whether a DELETED event came and the
//! latest change count the OPEN/CREATE reply or a CHANGED/SIGNALLED event told; kept while
//! a handle on it is open (so for at most `MAX_HANDLES` objects).

mod channel;
mod ring;
mod window;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, FrontendReqHandler, VhostUserFrontend};
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vshm_format::layout::{op, Request, Response, FORMAT_VERSION};
use vshm_format::shm::RawRegion;
use vshm_format::virtio::{
    DeviceConfig, CONFIG_BYTES, OP_LIST, OP_WAIT, VIRTIO_F_VERSION_1, VSHM_F_EVENTQ,
    VSHM_F_READ_ONLY,
};
use vshm_format::{Generation, ObjectSlot};

use crate::{DeviceTransport, ObjectNews, TransportError};
use channel::{Channel, MapHandler, Shared};
use ring::{GuestMemory, Progress, Queue, EIO, EVENT_QUEUE_SIZE, LIST_ROOM, QUEUE_SIZE};
use window::Window;

/// Why connecting to the vshm device failed.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    /// The socket could not be reached.
    #[error("cannot connect to the vshm device at {path}: {source}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: vhost::Error,
    },
    /// A vhost-user message failed (refused, or the connection broke).
    #[error("the vshm device at {path}: {what} failed: {source}")]
    Message {
        /// Socket path.
        path: PathBuf,
        /// The message.
        what: &'static str,
        /// Cause.
        source: vhost::Error,
    },
    /// The device does not offer a virtio feature this transport needs.
    #[error(
        "the vshm device at {path} does not offer {feature} (it offers features {offered:#x})"
    )]
    MissingFeature {
        /// Socket path.
        path: PathBuf,
        /// The feature's name.
        feature: &'static str,
        /// What it offers.
        offered: u64,
    },
    /// The backend does not offer vhost-user protocol features this transport needs.
    #[error("the vshm device at {path} does not offer the vhost-user protocol features {missing} (it offers {offered:#x})")]
    MissingProtocolFeature {
        /// Socket path.
        path: PathBuf,
        /// The missing ones, by name.
        missing: String,
        /// The bits it offers.
        offered: u64,
    },
    /// The config space is another format version's.
    #[error("the vshm device at {path} speaks format version {found}, this library {expected}")]
    FormatVersion {
        /// Socket path.
        path: PathBuf,
        /// The config space's `format_version`.
        found: u32,
        /// This library's.
        expected: u32,
    },
    /// The config space is unusable.
    #[error("the vshm device at {path} has a bad config space: {what}")]
    BadConfig {
        /// Socket path.
        path: PathBuf,
        /// What is wrong, with the values.
        what: String,
    },
    /// GET_SHMEM_CONFIG's window size is not the config space's.
    #[error("the vshm device at {path} reports a window of {shmem:#x} bytes (GET_SHMEM_CONFIG) but {config:#x} in its config space")]
    WindowSize {
        /// Socket path.
        path: PathBuf,
        /// The config space's `window_size`.
        config: u64,
        /// Region 0's size from GET_SHMEM_CONFIG (0 if it has none).
        shmem: u64,
    },
    /// The window could not be reserved.
    #[error("cannot reserve the window ({size:#x} bytes): {source}")]
    Map {
        /// Its size.
        size: u64,
        /// Cause.
        source: io::Error,
    },
    /// An OS resource (memfd, eventfd, thread) could not be had.
    #[error("{what}: {source}")]
    Os {
        /// What.
        what: &'static str,
        /// Cause.
        source: io::Error,
    },
}

/// The vhost-user protocol features this transport needs.
fn needed_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::SHMEM
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// A host process connected to vshmd's vhost-user socket as the vshm device's frontend and
/// driver. A [`DeviceTransport`]: wrap it in [`crate::Device`] for a [`crate::Namespace`].
pub struct VhostUserTransport {
    path: PathBuf,
    config: DeviceConfig,
    /// Features acknowledged (without the vhost-user protocol bit).
    features: u64,
    /// The connection; dropped (vshmd sees the VM leave) before the window is unmapped.
    frontend: Option<Frontend>,
    shared: Arc<Shared>,
    window: Arc<Window>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for VhostUserTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserTransport")
            .field("path", &self.path)
            .field("config", &self.config)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

impl VhostUserTransport {
    /// Connects to the vshm device at `path` (`vshmd --vhost-user PATH`) and sets it up.
    pub fn connect(path: &Path) -> Result<VhostUserTransport, VhostUserError> {
        let message = |what: &'static str| {
            move |source| VhostUserError::Message {
                path: path.to_owned(),
                what,
                source,
            }
        };
        let os = |what: &'static str| move |source| VhostUserError::Os { what, source };
        let mut frontend =
            Frontend::connect(path, 2).map_err(|source| VhostUserError::Connect {
                path: path.to_owned(),
                source,
            })?;
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);

        // Virtio features: VERSION_1 required, READ_ONLY and EVENTQ if offered, no
        // EVENT_IDX.
        let offered = frontend.get_features().map_err(message("GET_FEATURES"))?;
        let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        for (bit, feature) in [
            (VIRTIO_F_VERSION_1, "VIRTIO_F_VERSION_1"),
            (protocol_bit, "VHOST_USER_F_PROTOCOL_FEATURES"),
        ] {
            if offered & bit == 0 {
                return Err(VhostUserError::MissingFeature {
                    path: path.to_owned(),
                    feature,
                    offered,
                });
            }
        }
        let features = VIRTIO_F_VERSION_1 | (offered & (VSHM_F_READ_ONLY | VSHM_F_EVENTQ));
        frontend
            .set_features(features | protocol_bit)
            .map_err(message("SET_FEATURES"))?;
        let proto = frontend
            .get_protocol_features()
            .map_err(message("GET_PROTOCOL_FEATURES"))?;
        let need = needed_protocol_features();
        if !proto.contains(need) {
            return Err(VhostUserError::MissingProtocolFeature {
                path: path.to_owned(),
                missing: format!("{:?}", need - proto),
                offered: proto.bits(),
            });
        }
        frontend
            .set_protocol_features(need | (proto & VhostUserProtocolFeatures::MQ))
            .map_err(message("SET_PROTOCOL_FEATURES"))?;
        frontend.set_owner().map_err(message("SET_OWNER"))?;

        let config = read_config(path, &mut frontend)?;
        let shmem = frontend
            .get_shmem_config()
            .map_err(message("GET_SHMEM_CONFIG"))?;
        let sizes = shmem.memory_sizes;
        let window_size = match shmem.nregions {
            0 => 0,
            _ => sizes[usize::from(vshm_format::virtio::WINDOW_SHMID)],
        };
        if window_size != config.window_size {
            return Err(VhostUserError::WindowSize {
                path: path.to_owned(),
                config: config.window_size,
                shmem: window_size,
            });
        }

        let guest = GuestMemory::new().map_err(os("the request queue's memory"))?;
        frontend
            .set_mem_table(&[guest.table_entry()])
            .map_err(message("SET_MEM_TABLE"))?;

        let window =
            Arc::new(
                Window::reserve(window_size).map_err(|source| VhostUserError::Map {
                    size: window_size,
                    source,
                })?,
            );
        let mut handler = FrontendReqHandler::new(Arc::new(Mutex::new(MapHandler {
            window: Arc::clone(&window),
        })))
        .map_err(|e| VhostUserError::Os {
            what: "the backend request channel",
            source: io::Error::other(e.to_string()),
        })?;
        handler.set_reply_ack_flag(true);
        frontend
            .set_backend_request_fd(&handler.get_tx_raw_fd())
            .map_err(message("SET_BACKEND_REQ_FD"))?;

        // Queue 0, as a driver sets it up at DRIVER_OK.
        let kick = EventFd::new(0).map_err(os("the kick eventfd"))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(os("the call eventfd"))?;
        let (desc, avail, used) = ring::ring_addresses(&guest);
        start_queue(
            &mut frontend,
            usize::from(vshm_format::virtio::REQUEST_QUEUE),
            QUEUE_SIZE,
            (desc, avail, used),
            &call,
            &kick,
        )
        .map_err(|(what, e)| message(what)(e))?;

        // Queue 1, every event buffer posted, if the device reports events.
        let mut queue = Queue::new();
        let kick_events = if features & VSHM_F_EVENTQ != 0 {
            queue
                .start_events(&guest.region())
                .map_err(|e| VhostUserError::Os {
                    what: "the event queue",
                    source: io::Error::other(e.to_string()),
                })?;
            let kick = EventFd::new(0).map_err(os("the event queue's kick eventfd"))?;
            let (desc, avail, used) = ring::event_ring_addresses(&guest);
            start_queue(
                &mut frontend,
                usize::from(vshm_format::virtio::EVENT_QUEUE),
                EVENT_QUEUE_SIZE,
                (desc, avail, used),
                &call,
                &kick,
            )
            .map_err(|(what, e)| message(what)(e))?;
            // The buffers are there.
            kick.write(1).map_err(os("the event queue's kick"))?;
            Some(kick)
        } else {
            None
        };

        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            changed: Condvar::new(),
            guest,
            kick,
            kick_events,
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(os("an eventfd"))?;
        let channel = Channel {
            handler,
            main: channel::dup_fd(&frontend).map_err(os("a copy of the vhost-user socket"))?,
            call,
            stop: stop.try_clone().map_err(os("an eventfd"))?,
            shared: Arc::clone(&shared),
            window: Arc::clone(&window),
        };
        let thread = std::thread::Builder::new()
            .name("vshm-vhost-user".into())
            .spawn(move || channel.run())
            .map_err(os("the backend request thread"))?;
        Ok(VhostUserTransport {
            path: path.to_owned(),
            config,
            features,
            frontend: Some(frontend),
            shared,
            window,
            stop,
            thread: Some(thread),
        })
    }

    /// The window's size in bytes (the device's config space and GET_SHMEM_CONFIG agree).
    pub fn window_size(&self) -> u64 {
        self.config.window_size
    }

    /// The device's config space.
    pub fn config(&self) -> DeviceConfig {
        self.config
    }

    /// Whether the device reports events (`VSHM_F_EVENTQ`): [`DeviceTransport::news`]
    /// answers then.
    pub fn events_supported(&self) -> bool {
        self.features & VSHM_F_EVENTQ != 0
    }

    /// Whether the device agreed to map sections read-only (`VSHM_F_READ_ONLY`).
    pub fn read_only_supported(&self) -> bool {
        self.features & VSHM_F_READ_ONLY != 0
    }

    /// Whether vshmd hung up.
    pub fn backend_gone(&self) -> bool {
        self.lock().map_or(true, |q| q.gone)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Queue>, TransportError> {
        self.shared.queue.lock().map_err(|_| EIO)
    }

    /// Waits on the condition variable until `deadline` (forever if `None`); returns the
    /// guard and whether the deadline passed.
    fn wait<'a>(
        &'a self,
        q: MutexGuard<'a, Queue>,
        deadline: Option<Instant>,
    ) -> Result<(MutexGuard<'a, Queue>, bool), TransportError> {
        match deadline {
            None => Ok((self.shared.changed.wait(q).map_err(|_| EIO)?, false)),
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok((q, true));
                }
                let (q, _) = self.shared.changed.wait_timeout(q, left).map_err(|_| EIO)?;
                Ok((q, false))
            }
        }
    }
}

/// GET_CONFIG, checked: this format's version, a usable window.
/// Sets queue `q` up as a driver does at DRIVER_OK: its size, its rings' addresses (desc,
/// avail, used), base 0, its call and kick eventfds, enabled. An error names the message
/// the backend refused.
fn start_queue(
    frontend: &mut Frontend,
    q: usize,
    size: u16,
    (desc, avail, used): (u64, u64, u64),
    call: &EventFd,
    kick: &EventFd,
) -> Result<(), (&'static str, vhost::Error)> {
    let named = |what: &'static str| move |e| (what, e);
    frontend
        .set_vring_num(q, size)
        .map_err(named("SET_VRING_NUM"))?;
    let addresses = VringConfigData {
        queue_max_size: size,
        queue_size: size,
        flags: 0,
        desc_table_addr: desc,
        used_ring_addr: used,
        avail_ring_addr: avail,
        log_addr: None,
    };
    frontend
        .set_vring_addr(q, &addresses)
        .map_err(named("SET_VRING_ADDR"))?;
    frontend
        .set_vring_base(q, 0)
        .map_err(named("SET_VRING_BASE"))?;
    frontend
        .set_vring_call(q, call)
        .map_err(named("SET_VRING_CALL"))?;
    frontend
        .set_vring_kick(q, kick)
        .map_err(named("SET_VRING_KICK"))?;
    frontend
        .set_vring_enable(q, true)
        .map_err(named("SET_VRING_ENABLE"))
}

fn read_config(path: &Path, frontend: &mut Frontend) -> Result<DeviceConfig, VhostUserError> {
    let bad = |what: String| VhostUserError::BadConfig {
        path: path.to_owned(),
        what,
    };
    let len = u32::try_from(CONFIG_BYTES).unwrap_or(u32::MAX);
    let (_, payload) = frontend
        .get_config(0, len, VhostUserConfigFlags::empty(), &[0; CONFIG_BYTES])
        .map_err(|source| VhostUserError::Message {
            path: path.to_owned(),
            what: "GET_CONFIG",
            source,
        })?;
    let bytes: [u8; CONFIG_BYTES] = payload
        .as_slice()
        .try_into()
        .map_err(|_| bad(format!("{} bytes, not {CONFIG_BYTES}", payload.len())))?;
    let Some(config) = DeviceConfig::from_bytes(&bytes) else {
        return Err(VhostUserError::FormatVersion {
            path: path.to_owned(),
            found: u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
            expected: FORMAT_VERSION,
        });
    };
    let page = window::page_size();
    let (size, granule) = (config.window_size, config.page_size);
    if granule == 0 || granule % page != 0 {
        return Err(bad(format!(
            "page size {granule:#x} is not a multiple of this system's {page:#x}"
        )));
    }
    if size == 0 || size % granule != 0 {
        return Err(bad(format!(
            "window size {size:#x} is not a non-zero multiple of its page size {granule:#x}"
        )));
    }
    Ok(config)
}

impl DeviceTransport for VhostUserTransport {
    /// The window: every byte reads and writes; a range the device mapped read-only is a
    /// private copy of the section's pages that keeps a stray write to itself.
    fn window(&self) -> RawRegion<'_> {
        self.window.region()
    }

    fn gone(&self) -> bool {
        self.backend_gone()
    }

    fn quarantine_ms(&self) -> Option<u32> {
        Some(self.config().quarantine_ms)
    }

    /// The thread id (a mutex locked over the device is owned by the thread).
    fn thread_token(&self) -> u32 {
        crate::os::current_tid()
    }

    fn call(
        &self,
        req: &Request,
        records: &mut [u8],
        timeout: Duration,
    ) -> Result<Option<Response>, TransportError> {
        let started = Instant::now();
        let deadline = started.checked_add(timeout);
        let room = if req.op == OP_LIST {
            u32::try_from(records.len())
                .unwrap_or(u32::MAX)
                .min(LIST_ROOM)
        } else {
            0
        };
        // A WAIT's own timeout (`size` ms, 0: none; a LOCK's is `max_size`) counts from
        // now, while it waits for a slot too.
        let wait_ms = match req.op {
            OP_WAIT => req.size,
            op::LOCK => req.max_size,
            _ => 0,
        };
        let own = (wait_ms > 0)
            .then(|| started.checked_add(Duration::from_millis(wait_ms)))
            .flatten();
        let parked = match (deadline, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mem = self.shared.guest.region();
        let mut q = self.lock()?;
        // A slot (and the LIST area), as soon as one is free (a WAIT: one of WAITs' share).
        let slot = loop {
            if q.gone {
                return Err(TransportError::BackendGone);
            }
            if let Some(slot) = q.take_slot(room > 0, req.op, req.flags) {
                break slot;
            }
            let (guard, late) = self.wait(q, parked)?;
            q = guard;
            if late {
                if own.is_some_and(|at| Instant::now() >= at) {
                    // The WAIT's time is up before it was posted: what the device would
                    // have answered.
                    return Ok(Some(wait_timed_out(req)));
                }
                return Ok(None);
            }
        };
        let mut req = *req;
        if wait_ms > 0 {
            // What is left of its timeout.
            let waited = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            let left = wait_ms.saturating_sub(waited).max(1);
            if req.op == op::LOCK {
                req.max_size = left;
            } else {
                req.size = left;
            }
        }
        if let Err(e) = q.post(&mem, slot, &req, room) {
            q.untake(slot);
            return Err(e);
        }
        if let Err(e) = self.shared.kick.write(1) {
            // Posted but maybe never seen: the slot waits for its answer (or the hang-up).
            q.abandon(&mem, slot);
            return Err(TransportError::Os(e.raw_os_error().unwrap_or(libc::EIO)));
        }
        loop {
            if q.progress(slot) == Progress::Answered {
                let r = q.collect(&mem, slot, records);
                // A slot came free.
                self.shared.changed.notify_all();
                return r;
            }
            if q.gone {
                return Err(TransportError::BackendGone);
            }
            let (guard, late) = self.wait(q, deadline)?;
            q = guard;
            if late && q.progress(slot) != Progress::Answered {
                if q.abandon(&mem, slot) {
                    let _ = self.shared.kick.write(1);
                }
                return Ok(None);
            }
        }
    }

    fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    fn news(&self, slot: ObjectSlot, generation: Generation) -> Option<ObjectNews> {
        let q = self.lock().ok()?;
        if !q.has_events() {
            return None;
        }
        let k = q.known(slot.0, generation.0)?;
        Some(ObjectNews {
            deleted: k.deleted,
            change_count: k.change_count,
        })
    }
}

/// The answer to a WAIT whose timeout passed before a slot was free for it: STATUS_TIMEOUT
/// on the object it named, as the device answers a WAIT whose time is up.
fn wait_timed_out(req: &Request) -> Response {
    let mut r = vshm_format::mailbox::status_response(vshm_format::Status::Timeout);
    r.slot = req.slot;
    r.generation = req.generation;
    r
}

impl Drop for VhostUserTransport {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Disconnect (vshmd reclaims this peer's holds), then let the window go.
        drop(self.frontend.take());
    }
}
