//! The transport's one background thread (`vshm-vhost-user`): it serves vshmd's requests
//! on the backend channel (SHMEM_MAP / SHMEM_UNMAP into the window), reads the used rings
//! when vshmd signals the call eventfd (both queues share it): waking the callers whose
//! answers came, posting the undos of answers nobody waited for any more, taking events
//! and posting their buffers again; and watches the main socket for vshmd hanging up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};

use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{FrontendReqHandler, HandlerResult, VhostUserFrontendReqHandlerMut};
use vmm_sys_util::eventfd::EventFd;
use vshm_format::virtio::WINDOW_SHMID;

use super::ring::{GuestMemory, Queue};
use super::window::Window;

/// What the callers and the thread share.
#[derive(Debug)]
pub(super) struct Shared {
    /// The request queue's state.
    pub(super) queue: Mutex<Queue>,
    /// Notified whenever a slot was answered or freed, and when the backend left.
    pub(super) changed: Condvar,
    /// The memory the rings and the request slots are in.
    pub(super) guest: GuestMemory,
    /// The request queue's kick eventfd.
    pub(super) kick: EventFd,
    /// The event queue's, if it runs.
    pub(super) kick_events: Option<EventFd>,
}

impl Shared {
    /// Reads the used ring; wakes the callers if anything came, kicks if it posted undos
    /// (it never waits for a slot: an undo goes in the slot its abandoned request frees).
    fn reap(&self) {
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        let reaped = q.reap(&self.guest.region()).unwrap_or_default();
        drop(q);
        if reaped.posted {
            let _ = self.kick.write(1);
        }
        if let (true, Some(kick)) = (reaped.events_posted, &self.kick_events) {
            let _ = kick.write(1);
        }
        if reaped.changed {
            self.changed.notify_all();
        }
    }

    /// The backend is gone: every pending and later call fails.
    fn hang_up(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.gone = true;
        }
        self.changed.notify_all();
    }
}

/// Serves SHMEM_MAP / SHMEM_UNMAP into the window (region 0; there is no other).
#[derive(Debug)]
pub(super) struct MapHandler {
    pub(super) window: Arc<Window>,
}

fn refused() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

impl VhostUserFrontendReqHandlerMut for MapHandler {
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        if req.shmid != WINDOW_SHMID {
            return Err(refused());
        }
        let writable = req.flags & VhostUserMMapFlags::WRITABLE.bits() != 0;
        let (offset, len, fd_offset) = (req.shm_offset, req.len, req.fd_offset);
        self.window
            .map(offset, len, fd.as_raw_fd(), fd_offset, writable)?;
        Ok(0)
    }

    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> HandlerResult<u64> {
        if req.shmid != WINDOW_SHMID {
            return Err(refused());
        }
        let (offset, len) = (req.shm_offset, req.len);
        self.window.unmap(offset, len)?;
        Ok(0)
    }
}

/// Everything the thread owns.
pub(super) struct Channel {
    pub(super) handler: FrontendReqHandler<Mutex<MapHandler>>,
    /// A copy of the main vhost-user socket, watched for hang-up only (the backend
    /// channel never shows one: this process holds the end it gave vshmd open).
    pub(super) main: OwnedFd,
    /// The request queue's call eventfd.
    pub(super) call: EventFd,
    /// Written by the transport's drop.
    pub(super) stop: EventFd,
    pub(super) shared: Arc<Shared>,
    pub(super) window: Arc<Window>,
}

/// How often the used ring is read even without a call (a safety net only).
const TICK_MS: libc::c_int = 200;

/// `poll(2)` on `fds`.
fn poll(fds: &mut [libc::pollfd], timeout_ms: libc::c_int) -> io::Result<()> {
    let n = libc::nfds_t::try_from(fds.len()).map_err(|_| refused())?;
    // SAFETY: `fds` is a valid, exclusively borrowed array of `n` pollfds for the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A close-on-exec copy of `fd`.
pub(super) fn dup_fd(fd: &dyn AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC of a descriptor `fd` keeps open for this call; the result is
    // checked.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just created, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

impl Channel {
    /// Runs until `stop` is written or vshmd hangs up.
    pub(super) fn run(mut self) {
        let mut channel_open = true;
        loop {
            let pollfd = |fd: libc::c_int, events: libc::c_short| libc::pollfd {
                fd,
                events,
                revents: 0,
            };
            let mut fds = [
                // A negative fd is skipped by poll.
                pollfd(
                    if channel_open {
                        self.handler.as_raw_fd()
                    } else {
                        -1
                    },
                    libc::POLLIN,
                ),
                pollfd(self.main.as_raw_fd(), libc::POLLRDHUP),
                pollfd(self.call.as_raw_fd(), libc::POLLIN),
                pollfd(self.stop.as_raw_fd(), libc::POLLIN),
            ];
            if let Err(e) = poll(&mut fds, TICK_MS) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return self.hang_up();
            }
            let [channel, main, call, stop] = fds.map(|p| p.revents);
            if stop != 0 {
                return;
            }
            if main != 0 {
                return self.hang_up();
            }
            if channel & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                channel_open = false;
            } else if channel & libc::POLLIN != 0 {
                // A request the handler refused was answered (with the error): go on. A
                // broken channel is not read again (the main socket says when vshmd left).
                if let Err(
                    vhost::vhost_user::Error::Disconnected
                    | vhost::vhost_user::Error::PartialMessage
                    | vhost::vhost_user::Error::SocketBroken(_)
                    | vhost::vhost_user::Error::SocketError(_),
                ) = self.handler.handle_request()
                {
                    channel_open = false;
                }
            }
            if call & libc::POLLIN != 0 {
                let _ = self.call.read();
            }
            self.shared.reap();
        }
    }

    /// vshmd is gone: nothing it mapped stays reachable, and every caller learns it.
    fn hang_up(&self) {
        // Failing that (never, for a range inside the reservation), the mappings stay; the
        // pages are still the region's and vshmd's quarantine keeps them from reuse a while.
        let _ = self.window.clear();
        self.shared.hang_up();
    }
}
