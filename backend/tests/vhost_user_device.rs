//! The vshm virtio device over a real vhost-user socket, with the test playing the VMM's side
//! through vhost's frontend API (no VMM, no guest): a VM's request queue in guest memory the
//! test lays out by hand, a backend request channel that records SHMEM_MAP / SHMEM_UNMAP
//! and reads the memory they name. docs/VHOST-USER.md is the contract.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserMMap, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vshm_backend::arbiter::Arbiter;
use vshm_backend::region::Region;
use vshm_backend::vhost_user::device::{
    MAP_WRITABLE, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN, RESP_MAP_FLAGS_OFF,
};
use vshm_backend::vhost_user::{self, DeviceConfig, Local};
use vshm_format::layout::{kind, Layout, Request, Response};
use vshm_format::mailbox::{self, Command};
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed, SharedMemory};
use vshm_format::{PeerId, Status};

const WINDOW: u64 = 1 << 20;
const PAGE: u64 = 4096;
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
struct Recorder {
    maps: Vec<(u64, u64, u64, u64, Vec<u8>)>,
    unmaps: Vec<(u64, u64)>,
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
struct Vmm {
    frontend: Frontend,
    mem: GuestMemoryMmap,
    kick: EventFd,
    _calls: [EventFd; 2],
    next_avail: u16,
    recorder: Arc<Mutex<Recorder>>,
    _backend_channel: std::thread::JoinHandle<()>,
}

impl Vmm {
    fn connect(path: &std::path::Path) -> Vmm {
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
    fn request(&mut self, req: &Request) -> Response {
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

fn memfd(name: &str) -> File {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: a valid name and flags; the new fd is ours.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: just created, owned by nobody else.
    unsafe { File::from_raw_fd(fd) }
}

fn named(op: u32, name: &str, flags: u32) -> Request {
    let mut r = mailbox::create_request(Some(name), kind::SECTION, 64 << 10, 8 << 10, false);
    r.op = op;
    r.flags |= flags;
    r
}

fn map_flags(r: &Response) -> u32 {
    let b = bytes_of(r);
    u32::from_le_bytes(
        b[RESP_MAP_FLAGS_OFF..RESP_MAP_FLAGS_OFF + 4]
            .try_into()
            .expect("4 bytes"),
    )
}

#[test]
fn a_vm_sees_only_what_it_opened_mapped_where_the_reply_says_and_loses_it_on_close_and_disconnect()
{
    let dir = std::env::temp_dir().join(format!("vshm-vhost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("vhost.sock");

    // The namespace: a host-side holder made a section with data in it.
    let region = Region::create(4 << 20, false, false).expect("region");
    let layout = Layout::compute(4 << 20, 8, 64, 2, 4096).expect("layout");
    let memfd = Arc::new(region.file().try_clone().expect("memfd"));
    let arbiter = Arbiter::new(region, layout, 7, [0; 16]).expect("arbiter");
    let local = Arc::new(Local::new(arbiter, 100));
    let host = PeerId(1);
    let shared = local.with(|a| {
        a.proxy_connected(host).expect("host peer");
        let h = a
            .proxy_create(
                host,
                Command::Create {
                    name: Some("shared"),
                    kind: kind::SECTION,
                    max_size: 64 << 10,
                    initial_size: 8 << 10,
                    persistent: false,
                    manual_reset: false,
                },
            )
            .expect("create");
        a.mem()
            .write_bytes(h.offset.raw(), b"written by host")
            .expect("write");
        h
    });
    let config = DeviceConfig {
        window_size: WINDOW,
        page_size: PAGE,
        region_epoch: 7,
    };
    let mut listener = vhost_user::listen(&path).expect("listen");
    let arb: Arc<dyn vhost_user::Arbitration> = local.clone();
    let served =
        std::thread::spawn(move || vhost_user::serve_one(&mut listener, arb, memfd, config));

    let mut vm = Vmm::connect(&path);
    let shmem = vm.frontend.get_shmem_config().expect("GET_SHMEM_CONFIG");
    assert_eq!(shmem.nregions, 1);
    assert_eq!({ shmem.memory_sizes }[0], WINDOW);
    let (_, cfg) = vm
        .frontend
        .get_config(0, 32, VhostUserConfigFlags::empty(), &[0u8; 32])
        .expect("config");
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().expect("8")), WINDOW);
    assert_eq!(u64::from_le_bytes(cfg[8..16].try_into().expect("8")), PAGE);

    // OPEN maps exactly the section's pages, writable, where the reply says.
    let opened = vm.request(&named(OP_OPEN, "shared", 0));
    assert_eq!(opened.status, Status::Success.code());
    assert_eq!(
        (opened.slot, opened.generation),
        (shared.slot.raw(), shared.generation.raw())
    );
    assert_eq!(map_flags(&opened), MAP_WRITABLE);
    {
        let r = vm.recorder.lock().expect("recorder");
        let (fd_offset, at, len, flags, head) = &r.maps[0];
        assert_eq!(*fd_offset, shared.offset.raw(), "the section's memory");
        assert_eq!(*at, opened.offset, "where the reply says");
        assert_eq!(*len, 8 << 10, "its size, not its reservation");
        assert_eq!(*flags, 1, "writable");
        assert_eq!(&head[..15], b"written by host");
    }
    // A read-only open maps the same pages read-only, elsewhere in the window.
    let ro = vm.request(&named(OP_OPEN, "shared", OPEN_READ_ONLY));
    assert_eq!(ro.status, Status::Success.code());
    assert_eq!(map_flags(&ro), 0);
    assert!(
        ro.offset >= opened.offset + (64 << 10),
        "its own reserved range"
    );
    assert_eq!(
        vm.recorder.lock().expect("recorder").maps[1].3,
        0,
        "read-only"
    );
    // CREATE of a new name maps a new section; of the same name, opens it.
    let made = vm.request(&named(1, "made by the vm", 0));
    assert_eq!(made.status, Status::Success.code());
    let again = vm.request(&named(1, "made by the vm", 0));
    assert_eq!(again.status, Status::ObjectNameExists.code());
    assert_eq!(again.slot, made.slot);
    // An unknown name, a bad name, a close of a handle it does not have.
    assert_eq!(
        vm.request(&named(OP_OPEN, "nobody", 0)).status,
        Status::ObjectNameNotFound.code()
    );
    let mut bad = named(OP_CLOSE, "x", 0);
    bad.slot = opened.slot;
    bad.generation = opened.generation;
    bad.size = opened.offset + PAGE;
    assert_eq!(vm.request(&bad).status, Status::InvalidHandle.code());

    // CLOSE unmaps before it answers.
    let mut close = named(OP_CLOSE, "x", 0);
    close.slot = opened.slot;
    close.generation = opened.generation;
    close.size = opened.offset;
    assert_eq!(vm.request(&close).status, Status::Success.code());
    assert_eq!(
        vm.recorder.lock().expect("recorder").unmaps,
        vec![(opened.offset, 8 << 10)]
    );
    assert_eq!(local.with(|a| a.proxy_holds(PeerId(100)).len()), 2);

    // The VM goes: everything it held is released, what only it held is destroyed.
    drop(vm);
    served.join().expect("serving thread").ok();
    let (holds, names) = local.with(|a| {
        let names: Vec<String> = a
            .status()
            .sections
            .iter()
            .filter_map(|s| s.name.clone())
            .collect();
        (a.proxy_holds(PeerId(100)), names)
    });
    assert!(holds.is_empty());
    assert_eq!(
        names,
        vec!["shared".to_string()],
        "the VM's own section died with it"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
