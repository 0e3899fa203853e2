//! The VMM's side of the vshm virtio device (docs/VHOST-USER.md), played through vhost's
//! frontend API for tests (no VMM, no guest): a VM's request queue in guest memory laid out
//! by hand, and a backend request channel that records SHMEM_MAP / SHMEM_UNMAP and reads
//! the memory they name.

use std::collections::{BTreeSet, HashMap};
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
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vshm_backend::vhost_user::device::RESP_MAP_FLAGS_OFF;
use vshm_format::layout::{kind, Request, Response};
use vshm_format::mailbox;
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed};
use vshm_format::virtio::{VirtioVshmEvent, EVENT_BYTES};

/// Guest memory: queue q's rings at GPA + q * 0x8000 (descriptors, available ring at
/// +0x1000, used ring at +0x2000); request slots (a 1280-byte request and its 768-byte
/// response, 0x800 each) from GPA + 0x3000; event buffers from GPA + 0xB000; LIST's second
/// writable area at GPA + 0x2_0000.
const GPA: u64 = 0x10_0000;
const QSTRIDE: u64 = 0x8000;
const REQ_SLOTS: u16 = 7;
const REQ_BASE: u64 = GPA + 0x3000;
const EVENT_BASE: u64 = GPA + QSTRIDE + 0x3000;
const EVENT_BUF: u64 = 32;
const LIST_AREA: u64 = GPA + 0x2_0000;
const QSIZE: u16 = 16;

/// A request posted and not answered yet ([`Vmm::post`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Posted(u16);

/// What the frontend was asked to map and unmap, and what the memory it was given holds.
#[derive(Debug, Default)]
pub struct Recorder {
    /// SHMEM_MAP: (fd offset, window offset, length, flags, the first 16 bytes there).
    pub maps: Vec<(u64, u64, u64, u64, Vec<u8>)>,
    /// SHMEM_UNMAP: (window offset, length).
    pub unmaps: Vec<(u64, u64)>,
    /// Fail every SHMEM_UNMAP (a broken frontend).
    pub fail_unmaps: bool,
    /// Answer each SHMEM_MAP only after this long (keeps the device's worker busy).
    pub map_delay: Option<Duration>,
}

impl VhostUserFrontendReqHandlerMut for Recorder {
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> HandlerResult<u64> {
        if let Some(d) = self.map_delay {
            std::thread::sleep(d);
        }
        // SAFETY: dup of an fd the handler holds for the duration of this call.
        let file = unsafe { File::from_raw_fd(libc::dup(fd.as_raw_fd())) };
        let mut head = vec![0u8; 16];
        file.read_exact_at(&mut head, req.fd_offset)?;
        self.maps
            .push((req.fd_offset, req.shm_offset, req.len, req.flags, head));
        Ok(0)
    }
    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> HandlerResult<u64> {
        if self.fail_unmaps {
            return Err(std::io::Error::other("this frontend fails SHMEM_UNMAP"));
        }
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
    kicks: [EventFd; 2],
    calls: [EventFd; 2],
    next_avail: [u16; 2],
    last_used: [u16; 2],
    /// Request slots in flight.
    busy: BTreeSet<u16>,
    /// Used-ring entries read but not claimed yet: head → bytes written.
    used: HashMap<u16, u32>,
    /// What the device asked the frontend to map and unmap.
    pub recorder: Arc<Mutex<Recorder>>,
    _backend_channel: std::thread::JoinHandle<()>,
}

impl Vmm {
    /// Connects to the device at `path` and sets it up as a VMM would.
    pub fn connect(path: &std::path::Path) -> Vmm {
        Vmm::connect_without(path, 0)
    }

    /// [`Vmm::connect`], negotiating every offered feature but those in `refused`.
    pub fn connect_without(path: &std::path::Path, refused: u64) -> Vmm {
        let mut frontend = Frontend::connect(path, 2).expect("connect");
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let features = frontend.get_features().expect("features");
        frontend
            .set_features(features & !refused)
            .expect("set features");
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
        // A request the handler refused was answered (with the error): the channel goes on.
        let backend_channel = std::thread::spawn(move || {
            while let Ok(_) | Err(vhost::vhost_user::Error::ReqHandlerError(_)) =
                handler.handle_request()
            {}
        });

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
            EventFd::new(EFD_NONBLOCK).expect("call"),
            EventFd::new(EFD_NONBLOCK).expect("call"),
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
        Vmm {
            frontend,
            mem,
            kicks,
            calls,
            next_avail: [0; 2],
            last_used: [0; 2],
            busy: BTreeSet::new(),
            used: HashMap::new(),
            recorder,
            _backend_channel: backend_channel,
        }
    }

    fn desc(&self, q: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(GPA + q * QSTRIDE + 16 * u64::from(i));
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
    }

    /// Makes descriptor chain `head` available on queue `q` and kicks.
    fn offer(&mut self, q: usize, head: u16) {
        let avail = GPA + q as u64 * QSTRIDE + 0x1000;
        let slot = u64::from(self.next_avail[q] % QSIZE);
        self.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .expect("avail ring");
        self.next_avail[q] = self.next_avail[q].wrapping_add(1);
        self.mem
            .write_obj(self.next_avail[q], GuestAddress(avail + 2))
            .expect("avail idx");
        self.kicks[q].write(1).expect("kick");
    }

    /// Reads queue `q`'s new used-ring entries: (head, bytes written).
    fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = GPA + q as u64 * QSTRIDE + 0x2000;
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.last_used[q] != idx {
            let e = used + 4 + 8 * u64::from(self.last_used[q] % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("used len");
            out.push((u16::try_from(id).expect("head"), len));
            self.last_used[q] = self.last_used[q].wrapping_add(1);
        }
        out
    }

    /// Posts `req` on queue 0 and kicks; the answer is [`Vmm::answer`]'s.
    pub fn post(&mut self, req: &Request) -> Posted {
        self.post_with_room(req, 0)
    }

    fn post_with_room(&mut self, req: &Request, room: u32) -> Posted {
        let i = (0..REQ_SLOTS)
            .find(|i| !self.busy.contains(i))
            .expect("a free request slot");
        self.busy.insert(i);
        let req_at = REQ_BASE + u64::from(i) * 0x800;
        self.mem
            .write_slice(bytes_of(req), GuestAddress(req_at))
            .expect("request");
        // Descriptors 2i (request), 2i+1 (response) and, for LIST, the last one.
        let (d0, d1) = (2 * i, 2 * i + 1);
        self.desc(0, d0, req_at, 1280, 1, d1);
        if room > 0 {
            self.desc(0, d1, req_at + 1280, 768, 2 | 1, QSIZE - 1);
            self.desc(0, QSIZE - 1, LIST_AREA, room, 2, 0);
        } else {
            self.desc(0, d1, req_at + 1280, 768, 2, 0);
        }
        self.offer(0, d0);
        Posted(d0)
    }

    /// Offers `p`'s chain again while it is still pending (a misbehaving driver: each offer
    /// is a new request to the device).
    pub fn repost(&mut self, p: Posted) {
        self.offer(0, p.0);
    }

    /// Every used-ring entry that came for `p`'s head so far (a driver that offered it more
    /// than once gets more than one).
    pub fn answers_for(&mut self, p: Posted) -> usize {
        let mut n = 0;
        for (head, len) in self.take_used(0) {
            if head == p.0 {
                n += 1;
            } else {
                self.used.insert(head, len);
            }
        }
        n
    }

    /// The response to `p` if it came (bytes written, the response).
    pub fn answer(&mut self, p: Posted) -> Option<(u32, Response)> {
        for (head, len) in self.take_used(0) {
            self.used.insert(head, len);
        }
        let len = self.used.remove(&p.0)?;
        self.busy.remove(&(p.0 / 2));
        let mut resp: Response = zeroed();
        self.mem
            .read_slice(
                bytes_of_mut(&mut resp),
                GuestAddress(REQ_BASE + u64::from(p.0 / 2) * 0x800 + 1280),
            )
            .expect("response");
        Some((len, resp))
    }

    /// Waits up to `limit` for the response to `p`.
    pub fn answer_within(&mut self, p: Posted, limit: Duration) -> Option<Response> {
        let until = Instant::now() + limit;
        loop {
            if let Some((_, r)) = self.answer(p) {
                return Some(r);
            }
            if Instant::now() >= until {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// LIST with `room` bytes for records: the response and those bytes.
    pub fn list(&mut self, room: u32) -> (Response, Vec<u8>) {
        let mut req: Request = zeroed();
        req.op = vshm_format::virtio::OP_LIST;
        let p = self.post_with_room(&req, room);
        let resp = self
            .answer_within(p, Duration::from_secs(10))
            .expect("no LIST response within 10 s");
        let mut records = vec![0u8; usize::try_from(resp.size.min(u64::from(room))).expect("size")];
        self.mem
            .read_slice(&mut records, GuestAddress(LIST_AREA))
            .expect("records");
        (resp, records)
    }

    /// Posts `n` empty device-writable buffers of `size` bytes on the event queue and kicks.
    pub fn post_event_buffers(&mut self, n: u16, size: u32) {
        for _ in 0..n {
            let i = self.next_avail[1] % QSIZE;
            self.desc(1, i, EVENT_BASE + u64::from(i) * EVENT_BUF, size, 2, 0);
            self.offer(1, i);
        }
    }

    /// The events the device has filled in since the last call, in the order it used the
    /// buffers (a buffer it gave back short reads as nothing).
    pub fn events(&mut self) -> Vec<VirtioVshmEvent> {
        self.take_used(1)
            .into_iter()
            .filter(|&(_, len)| len as usize == EVENT_BYTES)
            .map(|(head, _)| {
                let mut b = [0u8; EVENT_BYTES];
                self.mem
                    .read_slice(
                        &mut b,
                        GuestAddress(EVENT_BASE + u64::from(head) * EVENT_BUF),
                    )
                    .expect("event");
                VirtioVshmEvent::from_bytes(&b)
            })
            .collect()
    }

    /// Collects events until `done` says it has what it waits for, or `limit` passes.
    pub fn events_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&[VirtioVshmEvent]) -> bool,
    ) -> Vec<VirtioVshmEvent> {
        let until = Instant::now() + limit;
        let mut all = Vec::new();
        loop {
            all.extend(self.events());
            if done(&all) || Instant::now() >= until {
                return all;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether the device signalled queue `q`'s call eventfd since the last look.
    pub fn called(&self, q: usize) -> bool {
        self.calls[q].read().is_ok_and(|n| n > 0)
    }

    /// Posts `req` on queue 0, kicks, and waits for its response.
    pub fn request(&mut self, req: &Request) -> Response {
        let p = self.post(req);
        self.answer_within(p, Duration::from_secs(10))
            .expect("no response within 10 s")
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

/// OPEN of `name`, an object of `kind` (0: any kind).
pub fn open_of(kind: u32, name: &str) -> Request {
    let mut r = named(vshm_format::virtio::OP_OPEN, name, 0);
    r.kind = kind;
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
