//! The VMM's side of the vshm virtio device (docs/VHOST-USER.md), played through vhost's
//! frontend API for tests (no VMM, no guest): a VM's request queue in guest memory laid out
//! by hand, and a backend request channel that records SHMEM_MAP / SHMEM_UNMAP and reads
//! the memory they name.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserMMap, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vshm_backend::vhost_user::device::RESP_MAP_FLAGS_OFF;
use vshm_format::layout::{kind, Request, Response};
use vshm_format::mailbox;
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed};

/// Guest memory: the queue's rings and the request buffers.
const GPA: u64 = 0x10_0000;
const DESC: u64 = GPA;
const AVAIL: u64 = GPA + 0x1000;
const USED: u64 = GPA + 0x2000;
const REQ: u64 = GPA + 0x3000;
const RESP: u64 = GPA + 0x4000;
const QSIZE: u16 = 16;

/// What the frontend was asked to map and unmap, and what the memory it was given holds.
#[derive(Debug, Default)]
pub struct Recorder {
    /// SHMEM_MAP: (fd offset, window offset, length, flags, the first 16 bytes there).
    pub maps: Vec<(u64, u64, u64, u64, Vec<u8>)>,
    /// SHMEM_UNMAP: (window offset, length).
    pub unmaps: Vec<(u64, u64)>,
}

impl VhostUserFrontendReqHandlerMut for Recorder {
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        // SAFETY: dup of an fd the handler holds for the duration of this call.
        let file = unsafe { File::from_raw_fd(libc::dup(fd.as_raw_fd())) };
        let mut head = vec![0u8; 16];
        file.read_exact_at(&mut head, req.fd_offset)?;
        self.maps
            .push((req.fd_offset, req.shm_offset, req.len, req.flags, head));
        Ok(0)
    }
    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> HandlerResult<u64> {
        self.unmaps.push((req.shm_offset, req.len));
        Ok(0)
    }
}

/// The test's VMM: a connected frontend with queue 0 set up in guest memory.
#[allow(missing_debug_implementations)] // vhost's Frontend has no Debug
pub struct Vmm {
    /// The vhost-user connection.
    pub frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    _calls: [EventFd; 2],
    next_avail: u16,
    /// What the device asked the frontend to map and unmap.
    pub recorder: Arc<Mutex<Recorder>>,
    _backend_channel: std::thread::JoinHandle<()>,
}

impl Vmm {
    /// Connects to the device at `path` and sets it up as a VMM would.
    pub fn connect(path: &std::path::Path) -> Vmm {
        let mut frontend = Frontend::connect(path, 2).expect("connect");
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let features = frontend.get_features().expect("features");
        frontend.set_features(features).expect("set features");
        let proto = frontend.get_protocol_features().expect("protocol features");
        for want in [
            VhostUserProtocolFeatures::SHMEM,
            VhostUserProtocolFeatures::BACKEND_REQ,
            VhostUserProtocolFeatures::CONFIG,
        ] {
            assert!(
                proto.contains(want),
                "the device offers {want:?}: {proto:?}"
            );
        }
        frontend.set_protocol_features(proto).expect("set protocol");
        frontend.set_owner().expect("owner");

        let recorder = Arc::new(Mutex::new(Recorder::default()));
        let mut handler =
            FrontendReqHandler::new(Arc::new(Mutex::new(RecorderRef(Arc::clone(&recorder)))))
                .expect("handler");
        handler.set_reply_ack_flag(true);
        frontend
            .set_backend_request_fd(&handler.get_tx_raw_fd())
            .expect("backend request fd");
        let backend_channel = std::thread::spawn(move || while handler.handle_request().is_ok() {});

        let file = memfd("guest");
        file.set_len(0x10_0000).expect("size");
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(GPA),
            0x10_0000,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("guest memory");
        let region = mem.find_region(GuestAddress(GPA)).expect("region");
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).expect("region info");
        let host = info.userspace_addr;
        frontend.set_mem_table(&[info]).expect("mem table");
        // One kick and one call eventfd per queue (a shared one would be watched once).
        let kicks = [
            EventFd::new(0).expect("kick"),
            EventFd::new(0).expect("kick"),
        ];
        let calls = [
            EventFd::new(0).expect("call"),
            EventFd::new(0).expect("call"),
        ];
        for q in 0..2usize {
            let base = host + (q as u64) * 0x8000;
            frontend.set_vring_num(q, QSIZE).expect("num");
            frontend
                .set_vring_addr(
                    q,
                    &VringConfigData {
                        queue_max_size: QSIZE,
                        queue_size: QSIZE,
                        flags: 0,
                        desc_table_addr: base,
                        used_ring_addr: base + 0x2000,
                        avail_ring_addr: base + 0x1000,
                        log_addr: None,
                    },
                )
                .expect("addr");
            frontend.set_vring_base(q, 0).expect("base");
            frontend.set_vring_call(q, &calls[q]).expect("call");
            frontend.set_vring_kick(q, &kicks[q]).expect("kick");
            frontend.set_vring_enable(q, true).expect("enable");
        }
        let [kick, _] = kicks;
        Vmm {
            frontend,
            mem,
            kick,
            _calls: calls,
            next_avail: 0,
            recorder,
            _backend_channel: backend_channel,
        }
    }

    /// Posts `req` on queue 0, kicks, and waits for its response.
    pub fn request(&mut self, req: &Request) -> Response {
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(DESC + 16 * i);
            self.mem.write_obj(addr, at).expect("desc addr");
            self.mem
                .write_obj(len, at.unchecked_add(8))
                .expect("desc len");
            self.mem
                .write_obj(flags, at.unchecked_add(12))
                .expect("desc flags");
            self.mem
                .write_obj(next, at.unchecked_add(14))
                .expect("desc next");
        };
        self.mem
            .write_slice(bytes_of(req), GuestAddress(REQ))
            .expect("request");
        desc(0, REQ, 1280, 1, 1);
        desc(1, RESP, 768, 2, 0);
        let slot = u64::from(self.next_avail % QSIZE);
        self.mem
            .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
            .expect("avail ring");
        self.next_avail = self.next_avail.wrapping_add(1);
        self.mem
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        self.kick.write(1).expect("kick");
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
            if used == self.next_avail {
                break;
            }
            assert!(Instant::now() < until, "no response within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut resp: Response = zeroed();
        self.mem
            .read_slice(bytes_of_mut(&mut resp), GuestAddress(RESP))
            .expect("response");
        resp
    }
}

/// The recorder behind the handler (which wants to own its backend).
struct RecorderRef(Arc<Mutex<Recorder>>);

impl VhostUserFrontendReqHandlerMut for RecorderRef {
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        self.0.lock().expect("recorder").shmem_map(req, fd)
    }
    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> HandlerResult<u64> {
        self.0.lock().expect("recorder").shmem_unmap(req)
    }
}

/// A fresh memfd.
pub fn memfd(name: &str) -> File {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: a valid name and flags; the new fd is ours.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: just created, owned by nobody else.
    unsafe { File::from_raw_fd(fd) }
}

/// A request naming a section (CREATE's fields; `op` and extra `flags` given).
pub fn named(op: u32, name: &str, flags: u32) -> Request {
    let mut r = mailbox::create_request(Some(name), kind::SECTION, 64 << 10, 8 << 10, false);
    r.op = op;
    r.flags |= flags;
    r
}

/// A response's `map_flags` (docs/VHOST-USER.md §5).
pub fn map_flags(r: &Response) -> u32 {
    let b = bytes_of(r);
    u32::from_le_bytes(
        b[RESP_MAP_FLAGS_OFF..RESP_MAP_FLAGS_OFF + 4]
            .try_into()
            .expect("4 bytes"),
    )
}
