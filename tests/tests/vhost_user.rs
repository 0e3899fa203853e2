//! The vshm virtio device over a real vhost-user socket (docs/VHOST-USER.md), the test
//! playing the VMM (`vshm_tests::vhost_frontend`): first the device alone over an arbiter in
//! this process, then `vshmd --vhost-user` beside an ivshmem host peer in one namespace.

use std::sync::Arc;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vshm::CreateOptions;
use vshm_backend::arbiter::{Arbiter, ProxyHold};
use vshm_backend::region::Region;
use vshm_backend::vhost_user::device::{
    MAP_WRITABLE, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN, OP_RESET, OP_SIGNAL, OP_WAIT, VSHM_F_EVENTQ,
};
use vshm_backend::vhost_user::{self, DeviceConfig, Local};
use vshm_format::layout::{kind, object_flags, Layout};
use vshm_format::mailbox::Command;
use vshm_format::shm::SharedMemory;
use vshm_format::virtio::{
    HandleFields, ListRecord, EVENT_CHANGED, EVENT_DELETED, EVENT_SIGNALLED, LIST_MANUAL_RESET,
    WAIT_SINCE,
};
use vshm_format::{PeerId, Status};
use vshm_tests::vhost_frontend::{map_flags, named, open_of, Posted, Vmm};
use vshm_tests::{wait_for, watchdog, Backend, TempDir};

const WINDOW: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[test]
fn a_vm_sees_only_what_it_opened_mapped_where_the_reply_says_and_loses_it_on_close_and_disconnect()
{
    let dir = TempDir::new("vhost");
    let path = dir.path().join("vhost.sock");

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
        quarantine_ms: 2000,
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

    // An object it does not hold is out of its reach by slot and generation, even one that
    // exists (the host's own section, guessed).
    let mut guess = named(vshm_format::layout::op::DELETE, "x", 0);
    let own = local.with(|a| {
        a.proxy_create(
            host,
            Command::Create {
                name: Some("host only"),
                kind: kind::SECTION,
                max_size: 4096,
                initial_size: 4096,
                persistent: false,
                manual_reset: false,
            },
        )
        .expect("create")
    });
    guess.slot = own.slot.raw();
    guess.generation = own.generation.raw();
    assert_eq!(vm.request(&guess).status, Status::InvalidHandle.code());
    assert!(local.with(|a| a.record_at(own.slot).is_some_and(|r| !r.unlinked)));

    // Growth: its own GROW maps the new pages after the old ones; another peer's growth
    // reaches it when it asks for a size it knows (answered INVALID_PARAMETER, as over the
    // mailbox, and mapped all the same).
    let maps_before = vm.recorder.lock().expect("recorder").maps.len();
    let mut grow = named(vshm_format::layout::op::GROW, "x", 0);
    grow.slot = opened.slot;
    grow.generation = opened.generation;
    grow.size = 16 << 10;
    assert_eq!(vm.request(&grow).status, Status::Success.code());
    local.with(|a| {
        let mut r = named(vshm_format::layout::op::GROW, "x", 0);
        r.slot = shared.slot.raw();
        r.generation = shared.generation.raw();
        r.size = 32 << 10;
        assert_eq!(a.proxy_request(host, &r).status, Status::Success.code());
    });
    grow.size = 16 << 10;
    assert_eq!(vm.request(&grow).status, Status::InvalidParameter.code());
    {
        let r = vm.recorder.lock().expect("recorder");
        let grown: Vec<(u64, u64)> = r.maps[maps_before..]
            .iter()
            .filter(|m| m.1 >= opened.offset && m.1 < opened.offset + (64 << 10))
            .map(|m| (m.1 - opened.offset, m.2))
            .collect();
        assert_eq!(
            grown,
            vec![(8 << 10, 8 << 10), (16 << 10, 16 << 10)],
            "the new pages, right after the old ones"
        );
    }

    // CLOSE unmaps before it answers.
    let mut close = named(OP_CLOSE, "x", 0);
    close.slot = opened.slot;
    close.generation = opened.generation;
    close.size = opened.offset;
    assert_eq!(vm.request(&close).status, Status::Success.code());
    assert_eq!(
        vm.recorder.lock().expect("recorder").unmaps,
        vec![(opened.offset, 32 << 10)],
        "everything it had mapped"
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
        vec!["shared".to_string(), "host only".to_string()],
        "the VM's own section died with it"
    );
}

#[test]
fn a_vm_on_vshmd_vhost_user_shares_sections_by_name_with_an_ivshmem_peer_and_is_reclaimed() {
    watchdog(std::time::Duration::from_secs(60), || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(
            wait_for(std::time::Duration::from_secs(10), || vpath.exists()),
            "the vhost-user socket is there"
        );
        let host = b.connect();
        let (sec, _) = host
            .create(Some("from-host"), &CreateOptions::new(64 << 10))
            .expect("create");
        sec.write_at(0, b"host bytes").expect("write");

        let mut vm = Vmm::connect(&vpath);
        let opened = vm.request(&named(OP_OPEN, "from-host", 0));
        assert_eq!(opened.status, Status::Success.code());
        assert_eq!(
            &vm.recorder.lock().expect("recorder").maps[0].4[..10],
            b"host bytes"
        );
        let made = vm.request(&named(1, "from-vm", 0));
        assert_eq!(made.status, Status::Success.code());
        let theirs = host
            .open("from-vm")
            .expect("the ivshmem peer opens what the VM made");
        assert_eq!(b.section("from-vm").expect("listed")["refs"], 2);
        let peers = b.status()["peers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["connected"] == true).count());
        assert_eq!(peers, 2, "the VM is a peer of the region: {}", b.status());

        drop(vm);
        assert!(
            wait_for(std::time::Duration::from_secs(5), || {
                b.section("from-vm").is_some_and(|s| s["refs"] == 1)
                    && b.section("from-host").is_some_and(|s| s["refs"] == 1)
            }),
            "the VM's holds were released: {}",
            b.status()
        );
        // The departed VM's slot no longer claims a transport.
        let status = b.status();
        let vias: Vec<&str> = status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter(|p| p["connected"] == false)
            .filter_map(|p| p["transport"].as_str())
            .collect();
        assert!(
            !vias.is_empty() && vias.iter().all(|v| *v == "-"),
            "{status}"
        );
        drop(theirs);
    });
}

#[test]
fn a_vhost_user_socket_vshmd_cannot_create_is_refused_at_start_naming_it() {
    let dir = TempDir::new("vhost-bad");
    let out = vshm_tests::command(&vshm_tests::bin("vshmd"))
        .arg("--socket")
        .arg(dir.path().join("vshm.sock"))
        .args([
            "--size",
            "4M",
            "--vhost-user",
            "/nonexistent/dir/vhost.sock",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vshmd");
    assert!(!out.status.success(), "vshmd started anyway");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--vhost-user") && err.contains("/nonexistent/dir/vhost.sock"),
        "{err}"
    );
    assert!(
        !dir.path().join("vshm.sock").exists(),
        "nothing is left behind"
    );
}

const VHOST_POLICY: &str = r#"
[region]
socket = "{dir}/vshm.sock"
size = "4M"

[[region.rule]]
socket = "vhost-user"
policy = "web"

[policy.web]
create = ["web/*"]
open = ["web/*"]
"#;

#[test]
fn a_vhost_user_vm_gets_the_policy_its_rule_names_and_is_refused_outside_it() {
    watchdog(std::time::Duration::from_secs(60), || {
        let dir = TempDir::new("vhost-policy");
        let vpath = dir.path().join("vhost.sock");
        let b = Backend::start_with_config(
            VHOST_POLICY,
            &["--vhost-user", vpath.to_str().expect("utf-8")],
        );
        assert!(wait_for(std::time::Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        host.create(Some("db/secret"), &CreateOptions::new(4096))
            .expect("the host may");
        let mut vm = Vmm::connect(&vpath);
        assert_eq!(
            vm.request(&named(OP_OPEN, "db/secret", 0)).status,
            Status::AccessDenied.code(),
            "a vhost-user VM does not reach what its policy keeps from it"
        );
        assert_eq!(
            vm.request(&named(1, "db/mine", 0)).status,
            Status::AccessDenied.code()
        );
        assert_eq!(
            vm.request(&named(1, "web/page", 0)).status,
            Status::Success.code()
        );
        assert!(
            vm.recorder.lock().expect("recorder").maps.len() == 1,
            "only web/page mapped"
        );
        let vm_peer = b.status()["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["transport"] == "vhost-user")
            .cloned()
            .expect("the VM in the status");
        assert_eq!(vm_peer["policy"], "web");
    });
}

/// A device served over an arbiter in this process, a host-side peer (id 1) to act in the
/// namespace, and a connected VM (peer 100 once it asks for something).
struct InProcess {
    _dir: TempDir,
    local: Arc<Local>,
    served: Option<std::thread::JoinHandle<Result<(), vhost_user::VhostUserError>>>,
    vm: Option<Vmm>,
}

const HOST: PeerId = PeerId(1);

impl InProcess {
    fn start(refused_features: u64) -> InProcess {
        let dir = TempDir::new("vhost-ev");
        let path = dir.path().join("vhost.sock");
        let region = Region::create(4 << 20, false, false).expect("region");
        let layout = Layout::compute(4 << 20, 8, 64, 2, 4096).expect("layout");
        let memfd = Arc::new(region.file().try_clone().expect("memfd"));
        let arbiter = Arbiter::new(region, layout, 7, [0; 16]).expect("arbiter");
        let local = Arc::new(Local::new(arbiter, 100));
        local.with(|a| a.proxy_connected(HOST).expect("host peer"));
        let config = DeviceConfig {
            window_size: WINDOW,
            page_size: PAGE,
            region_epoch: 7,
            quarantine_ms: 2000,
        };
        let mut listener = vhost_user::listen(&path).expect("listen");
        let arb: Arc<dyn vhost_user::Arbitration> = local.clone();
        let served =
            std::thread::spawn(move || vhost_user::serve_one(&mut listener, arb, memfd, config));
        let vm = Vmm::connect_without(&path, refused_features);
        InProcess {
            _dir: dir,
            local,
            served: Some(served),
            vm: Some(vm),
        }
    }

    fn vm(&mut self) -> &mut Vmm {
        self.vm.as_mut().expect("connected")
    }

    /// The host peer creates `name` of `kind` (a section of 8 KiB, max 64 KiB).
    fn host_creates(&self, name: &str, kind: u32, manual_reset: bool) -> ProxyHold {
        self.local.with(|a| {
            a.proxy_create(
                HOST,
                Command::Create {
                    name: Some(name),
                    kind,
                    max_size: if kind == vshm_format::layout::kind::SECTION {
                        64 << 10
                    } else {
                        0
                    },
                    initial_size: if kind == vshm_format::layout::kind::SECTION {
                        8 << 10
                    } else {
                        0
                    },
                    persistent: false,
                    manual_reset,
                },
            )
            .expect("create")
        })
    }

    /// The VM opens `name`.
    fn vm_opens(&mut self, name: &str) -> vshm_format::layout::Response {
        let r = self.vm().request(&open_of(0, name));
        assert_eq!(r.status, Status::Success.code(), "open {name}");
        r
    }

    /// The host creates auto-reset event "ev", the VM opens it and posts a WAIT on it,
    /// still unanswered after `settle`. Returns the event and the WAIT.
    fn vm_waits_on_a_new_event(&mut self, settle: std::time::Duration) -> (ProxyHold, Posted) {
        let ev = self.host_creates("ev", kind::EVENT, false);
        let e = self.vm_opens("ev");
        let w = self.vm().post(&on(OP_WAIT, &e, 0));
        assert!(
            self.vm().answer_within(w, settle).is_none(),
            "the WAIT is pending"
        );
        (ev, w)
    }

    /// The VM disconnects; its serving thread ends.
    fn disconnect(&mut self) {
        drop(self.vm.take());
        if let Some(s) = self.served.take() {
            s.join().expect("serving thread").ok();
        }
    }
}

/// A request on (slot, generation) of `held`.
fn on(op: u32, held: &vshm_format::layout::Response, size: u64) -> vshm_format::layout::Request {
    let mut r = named(op, "x", 0);
    // Fields an op does not use are 0 (an UNLOCK's `max_size` names a dead owner).
    r.name_len = 0;
    r.max_size = 0;
    r.slot = held.slot;
    r.generation = held.generation;
    r.size = size;
    r
}

#[test]
fn events_about_held_objects_wait_coalesced_for_a_buffer_and_arrive_with_a_call_when_one_is_posted()
{
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let sec = t.host_creates("sec", kind::SECTION, false);
        let ev = t.host_creates("ev", kind::EVENT, false);
        let other = t.host_creates("not held", kind::EVENT, false);
        let s = t.vm_opens("sec");
        let e = t.vm_opens("ev");
        let _ = t.vm().called(1);

        // No buffer posted: the host signals twice, grows the section, signals one the VM
        // does not hold.
        t.local.with(|a| {
            assert_eq!(
                a.proxy_signal(HOST, ev.slot, ev.generation),
                Status::Success
            );
            assert_eq!(
                a.proxy_signal(HOST, ev.slot, ev.generation),
                Status::Success
            );
            assert_eq!(
                a.proxy_signal(HOST, other.slot, other.generation),
                Status::Success
            );
            let mut g = named(vshm_format::layout::op::GROW, "x", 0);
            g.slot = sec.slot.raw();
            g.generation = sec.generation.raw();
            g.size = 16 << 10;
            assert_eq!(a.proxy_request(HOST, &g).status, Status::Success.code());
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(t.vm().events().is_empty(), "nowhere to put them yet");

        t.vm().post_event_buffers(8, 24);
        let got = t
            .vm()
            .events_until(std::time::Duration::from_secs(5), |e| e.len() >= 2);
        assert!(
            t.vm().called(1),
            "the event queue's call eventfd was signalled"
        );
        let mut got: Vec<(u32, u32, u64)> = got.iter().map(|x| (x.kind, x.slot, x.value)).collect();
        got.sort_unstable();
        assert_eq!(
            got,
            vec![(EVENT_CHANGED, s.slot, 0), (EVENT_SIGNALLED, e.slot, 2)],
            "one per object, the latest value; nothing about what it does not hold"
        );

        // With buffers waiting, a change made in shared memory without WAKE arrives at the
        // next look (the loop's tick), a delete at once.
        t.local.with(|a| {
            vshm_format::sync::notify(a.mem(), a.layout(), sec.slot).expect("notify");
        });
        t.local.tick();
        t.local.with(|a| {
            let mut d = named(vshm_format::layout::op::DELETE, "x", 0);
            d.slot = ev.slot.raw();
            d.generation = ev.generation.raw();
            assert_eq!(a.proxy_request(HOST, &d).status, Status::Success.code());
        });
        let got = t
            .vm()
            .events_until(std::time::Duration::from_secs(5), |e| e.len() >= 2);
        let got: Vec<(u32, u32, u64, u64)> = got
            .iter()
            .map(|x| (x.kind, x.slot, x.generation, x.value))
            .collect();
        assert_eq!(
            got,
            vec![
                (EVENT_CHANGED, s.slot, s.generation, 1),
                (EVENT_DELETED, e.slot, e.generation, 0)
            ]
        );
        t.disconnect();
    });
}

#[test]
fn a_driver_that_did_not_negotiate_the_event_queue_gets_no_events() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(VSHM_F_EVENTQ);
        let ev = t.host_creates("ev", kind::EVENT, false);
        t.vm_opens("ev");
        t.vm().post_event_buffers(4, 24);
        t.local
            .with(|a| a.proxy_signal(HOST, ev.slot, ev.generation));
        let got = t
            .vm()
            .events_until(std::time::Duration::from_millis(300), |e| !e.is_empty());
        assert!(got.is_empty(), "{got:?}");
        t.disconnect();
    });
}

#[test]
fn a_wait_completes_when_its_event_is_signalled_without_holding_up_other_requests_and_times_out_otherwise(
) {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let ev = t.host_creates("ev", kind::EVENT, false);
        let manual = t.host_creates("manual", kind::EVENT, true);
        t.host_creates("sec", kind::SECTION, false);
        let e = t.vm_opens("ev");
        let m = t.vm_opens("manual");
        let s = t.vm_opens("sec");

        // A WAIT with no timeout stays pending; the queue goes on.
        let waiting = t.vm().post(&on(OP_WAIT, &e, 0));
        let other = t.vm().request(&named(OP_OPEN, "sec", 0));
        assert_eq!(other.status, Status::Success.code(), "answered meanwhile");
        assert!(t.vm().answer(waiting).is_none(), "still waiting");
        // The host signals: the WAIT completes and takes the auto-reset event.
        t.local
            .with(|a| a.proxy_signal(HOST, ev.slot, ev.generation));
        let done = t
            .vm()
            .answer_within(waiting, std::time::Duration::from_secs(5))
            .expect("answered when signalled");
        assert_eq!(done.status, Status::Success.code());
        assert_eq!((done.slot, done.size), (e.slot, 1), "its signal count");
        let set = t
            .local
            .with(|a| vshm_format::sync::sync_word(a.mem(), a.layout(), ev.slot).expect("word"));
        assert_eq!(
            set, 0,
            "an auto-reset event is taken by the WAIT that got it"
        );

        // A timeout: STATUS_TIMEOUT after it, not before.
        let started = std::time::Instant::now();
        let r = t.vm().request(&on(OP_WAIT, &e, 100));
        assert_eq!(r.status, Status::Timeout.code());
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));

        // The VM's own SIGNAL sets a manual-reset event: WAITs complete at once until RESET.
        assert_eq!(
            t.vm().request(&on(OP_SIGNAL, &m, 0)).status,
            Status::Success.code()
        );
        for _ in 0..2 {
            assert_eq!(
                t.vm().request(&on(OP_WAIT, &m, 0)).status,
                Status::Success.code()
            );
        }
        assert_eq!(
            t.vm().request(&on(OP_RESET, &m, 0)).status,
            Status::Success.code()
        );
        assert_eq!(
            t.vm().request(&on(OP_WAIT, &m, 50)).status,
            Status::Timeout.code()
        );
        let _ = manual;

        // On a section: the next change (SIGNAL on a section notifies it).
        let w = t.vm().post(&on(OP_WAIT, &s, 0));
        assert!(t.vm().answer(w).is_none());
        assert_eq!(
            t.vm().request(&on(OP_SIGNAL, &s, 0)).status,
            Status::Success.code()
        );
        let done = t
            .vm()
            .answer_within(w, std::time::Duration::from_secs(5))
            .expect("notified");
        assert_eq!(done.status, Status::Success.code());

        // Not on what it does not hold.
        let mut guess = on(OP_SIGNAL, &e, 0);
        guess.slot = ev.slot.raw() + 1;
        assert_eq!(t.vm().request(&guess).status, Status::InvalidHandle.code());
        t.disconnect();
    });
}

#[test]
fn a_wait_pending_at_disconnect_is_dropped_and_its_vm_reclaimed() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let ev = t.host_creates("ev", kind::EVENT, false);
        let e = t.vm_opens("ev");
        let w = t.vm().post(&on(OP_WAIT, &e, 0));
        assert!(t.vm().answer(w).is_none());
        t.disconnect();
        assert!(t.local.with(|a| a.proxy_holds(PeerId(100)).is_empty()));
        // The event's next signal is nobody's (no hold, no WAIT left to take it).
        t.local
            .with(|a| a.proxy_signal(HOST, ev.slot, ev.generation));
        let set = t
            .local
            .with(|a| vshm_format::sync::sync_word(a.mem(), a.layout(), ev.slot).expect("word"));
        assert_eq!(set, 1, "still set: no departed WAIT took it");
    });
}

#[test]
fn list_names_only_what_the_vms_policy_lets_it_open_and_says_how_much_room_all_would_take() {
    watchdog(std::time::Duration::from_secs(60), || {
        let dir = TempDir::new("vhost-list");
        let vpath = dir.path().join("vhost.sock");
        let b = Backend::start_with_config(
            VHOST_POLICY,
            &["--vhost-user", vpath.to_str().expect("utf-8")],
        );
        assert!(wait_for(std::time::Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let _s = host
            .create(Some("db/secret"), &CreateOptions::new(4096))
            .expect("create");
        let _a = host
            .create(Some("web/a"), &CreateOptions::new(4096))
            .expect("create");
        let _e = host
            .create_event(
                Some("web/ev"),
                &vshm::EventOptions {
                    manual_reset: true,
                    persistent: false,
                },
            )
            .expect("event");
        let mut vm = Vmm::connect(&vpath);
        let (resp, records) = vm.list(4096);
        assert_eq!(resp.status, Status::Success.code());
        let listed: Vec<(String, u32, u8)> = ListRecord::parse(&records)
            .map(|r| {
                (
                    String::from_utf8_lossy(r.name).into_owned(),
                    u32::from(r.kind),
                    r.flags,
                )
            })
            .collect();
        assert_eq!(
            listed,
            vec![
                ("web/a".to_string(), kind::SECTION, 0),
                ("web/ev".to_string(), kind::EVENT, LIST_MANUAL_RESET),
            ],
            "db/secret is hidden"
        );
        assert_eq!((resp.size, resp.limit), (records.len() as u64, 2));
        assert_eq!(resp.max_size, resp.size, "everything fitted");
        // Room for one record only: one, and the room all would take.
        let (resp, records) = vm.list(12);
        assert_eq!((resp.limit, resp.size, resp.max_size), (1, 9, 19));
        assert_eq!(ListRecord::parse(&records).count(), 1);
    });
}

#[test]
fn vshmd_stops_cleanly_with_a_vm_connected_and_takes_its_vhost_user_socket_away() {
    watchdog(std::time::Duration::from_secs(60), || {
        let dir = TempDir::new("vhost-stop");
        let vpath = dir.path().join("vhost.sock");
        let b = Backend::start(&[
            "--size",
            "4M",
            "--vhost-user",
            vpath.to_str().expect("utf-8"),
        ]);
        assert!(wait_for(std::time::Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (_sec, _) = host
            .create(Some("held"), &CreateOptions::new(4096))
            .expect("create");
        let mut vm = Vmm::connect(&vpath);
        let held = vm.request(&named(OP_OPEN, "held", 0));
        assert_eq!(held.status, Status::Success.code());
        // A WAIT pending too.
        let e = vm.post(&on(OP_WAIT, &held, 0));
        let status = b.terminate();
        assert!(status.success(), "vshmd exited with {status}");
        assert!(
            wait_for(std::time::Duration::from_secs(5), || !vpath.exists()),
            "the accept loop ended with its region and the socket went"
        );
        let _ = vm.answer(e);
    });
}

#[test]
fn a_window_range_whose_unmap_failed_is_never_reused_and_its_hold_goes_at_disconnect() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let made = t.vm().request(&named(1, "vm section", 0));
        assert_eq!(made.status, Status::Success.code());
        t.vm().recorder.lock().expect("recorder").fail_unmaps = true;
        let mut close = on(OP_CLOSE, &made, made.offset);
        close.size = made.offset;
        assert_eq!(
            t.vm().request(&close).status,
            Status::InsufficientResources.code(),
            "the close failed: its pages may still be mapped"
        );
        t.vm().recorder.lock().expect("recorder").fail_unmaps = false;
        assert_eq!(
            t.local.with(|a| a.proxy_holds(PeerId(100)).len()),
            1,
            "the hold stays while the VM may reach the pages"
        );
        // Whatever it opens next lands elsewhere in the window.
        for name in ["a", "b"] {
            let r = t.vm().request(&named(1, name, 0));
            assert_eq!(r.status, Status::Success.code());
            assert!(
                r.offset >= made.offset + made.max_size || r.offset + r.max_size <= made.offset,
                "{name} at {:#x} overlaps the range whose unmap failed at {:#x}",
                r.offset,
                made.offset
            );
        }
        t.disconnect();
        let (holds, quarantined) = t
            .local
            .with(|a| (a.proxy_holds(PeerId(100)), a.quarantined()));
        assert!(holds.is_empty(), "released at disconnect");
        assert_eq!(quarantined.1, 3, "and its memory lingers like the rest");
    });
}

#[test]
fn an_ivshmem_peers_signal_completes_a_vms_wait_and_reaches_its_event_queue_through_vshmd() {
    watchdog(std::time::Duration::from_secs(60), || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "4M"]);
        assert!(wait_for(std::time::Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (ev, _) = host
            .create_event(Some("bell"), &vshm::EventOptions::default())
            .expect("event");
        let mut vm = Vmm::connect(&vpath);
        let e = vm.request(&open_of(kind::EVENT, "bell"));
        assert_eq!(e.status, Status::Success.code());
        vm.post_event_buffers(4, 24);
        let w = vm.post(&on(OP_WAIT, &e, 0));
        assert!(vm.answer(w).is_none(), "nothing signalled yet");
        // vshmd has taken the WAIT when the VM's bit is in the event's waiters word.
        let waiting = || {
            vshm_format::sync::waiters(
                &vshm::Transport::region(host.transport()),
                host.layout(),
                ev.slot(),
            )
            .unwrap_or(0)
                != 0
        };
        assert!(
            wait_for(std::time::Duration::from_secs(5), waiting),
            "WAIT taken"
        );
        // The VM has no doorbell another peer could ring: the signal below must go through
        // a WAKE request (FORMAT.md §6a, direct rings).
        let doorbells: Vec<bool> = host.peers().map(|p| p.doorbell).collect();
        assert_eq!(
            doorbells.len(),
            2,
            "the host peer and the VM: {doorbells:?}"
        );
        assert_eq!(
            doorbells.iter().filter(|&&d| d).count(),
            1,
            "only the ivshmem peer has a doorbell: {doorbells:?}"
        );
        ev.signal().expect("signal");
        let done = vm
            .answer_within(w, std::time::Duration::from_secs(5))
            .expect("the WAIT completed");
        assert_eq!(done.status, Status::Success.code());
        assert_eq!(
            b.section("bell").expect("row")["wakes"].as_u64(),
            Some(1),
            "woken through a WAKE request (not the loop's tick)"
        );
        let got = vm.events_until(std::time::Duration::from_secs(5), |e| !e.is_empty());
        assert_eq!(
            got.iter().map(|x| (x.kind, x.slot)).collect::<Vec<_>>(),
            vec![(EVENT_SIGNALLED, e.slot)]
        );
        // The VM's SIGNAL wakes the ivshmem peer's wait.
        std::thread::scope(|sc| {
            let waiter = sc.spawn(|| ev.wait(Some(std::time::Duration::from_secs(5))).is_ok());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(
                vm.request(&on(OP_SIGNAL, &e, 0)).status,
                Status::Success.code()
            );
            assert!(
                waiter.join().expect("waiter"),
                "the ivshmem peer's wait saw the VM's signal"
            );
        });
    });
}

#[test]
fn a_wait_whose_timer_and_signal_arrive_together_leaves_the_device_answering() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let ev = t.host_creates("ev", kind::EVENT, false);
        t.host_creates("sec", kind::SECTION, false);
        let e = t.vm_opens("ev");
        // The worker sits in a slow SHMEM_MAP while the signal and the WAIT's deadline both
        // come due: one wake-up then reports the bell and the timer, and the timer is
        // cleared by the time it is read (a blocking read hung the worker for good).
        t.vm().recorder.lock().expect("recorder").map_delay =
            Some(std::time::Duration::from_millis(300));
        let w = t.vm().post(&on(OP_WAIT, &e, 100));
        let o = t.vm().post(&named(OP_OPEN, "sec", 0));
        std::thread::sleep(std::time::Duration::from_millis(30));
        t.local.with(|a| {
            assert_eq!(
                a.proxy_signal(HOST, ev.slot, ev.generation),
                Status::Success
            )
        });
        let limit = std::time::Duration::from_secs(5);
        assert!(
            t.vm().answer_within(w, limit).is_some(),
            "the WAIT is answered"
        );
        assert!(
            t.vm().answer_within(o, limit).is_some(),
            "the OPEN is answered"
        );
        t.vm().recorder.lock().expect("recorder").map_delay = None;
        let again = t.vm().post(&open_of(kind::EVENT, "ev"));
        let r = t
            .vm()
            .answer_within(again, limit)
            .expect("the device still answers");
        assert_eq!(r.status, Status::Success.code());
    });
}

#[test]
fn a_vm_cannot_keep_more_waits_pending_than_a_queue_holds_by_offering_one_chain_again() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        t.host_creates("ev", kind::EVENT, false);
        let e = t.vm_opens("ev");
        let first = t.vm().post(&on(OP_WAIT, &e, 0));
        // 299 more offers of the same chain: the device keeps at most 256 WAITs pending (its
        // queue size) and refuses the rest at once, into that chain.
        let mut refused = 0;
        for _ in 0..299 {
            t.vm().repost(first);
            std::thread::sleep(std::time::Duration::from_millis(3));
            refused += t.vm().answers_for(first);
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while refused < 300 - 256 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(10));
            refused += t.vm().answers_for(first);
        }
        assert_eq!(refused, 300 - 256, "pending WAITs beyond 256 are refused");
    });
}

#[test]
fn a_stopped_request_queue_drops_its_pending_waits_and_a_later_signal_stays_with_the_event() {
    use vhost::VhostBackend as _;
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let (ev, w) = t.vm_waits_on_a_new_event(std::time::Duration::from_millis(200));
        // The guest resets or reboots: the frontend stops the ring (GET_VRING_BASE).
        t.vm()
            .frontend
            .get_vring_base(0)
            .expect("stop the request queue");
        t.local.with(|a| {
            assert_eq!(
                a.proxy_signal(HOST, ev.slot, ev.generation),
                Status::Success
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            t.vm().answer(w).is_none(),
            "nothing is written into a stopped ring"
        );
        // The signal was not taken by the dropped WAIT: the next waiter gets it at once.
        let taken = t
            .local
            .with(|a| a.proxy_wait(HOST, 1 << 40, ev.slot, ev.generation, None));
        assert_eq!(taken.map(|(s, _)| s), Some(Status::Success));
    });
}

/// A WAIT a look completes in the same instant its queue stops (a guest reset): either the
/// VM heard the answer, and the auto-reset event's signal was its, or the event still has
/// the signal for the next waiter. Never neither (the signal lost), never both.
#[test]
fn a_signal_taken_by_a_wait_whose_queue_stops_that_instant_is_heard_or_stays_with_the_event() {
    use vhost::VhostBackend as _;
    watchdog(std::time::Duration::from_secs(240), || {
        let (mut heard, mut kept) = (0, 0);
        // The race is won by the stop in about 1 round in 30 here (2 of 60, twice).
        for round in 0..150 {
            let mut t = InProcess::start(0);
            let (ev, w) = t.vm_waits_on_a_new_event(std::time::Duration::from_millis(20));
            // The signal completes the WAIT; the stop races the device's answer.
            t.local.with(|a| {
                assert_eq!(
                    a.proxy_signal(HOST, ev.slot, ev.generation),
                    Status::Success
                )
            });
            t.vm()
                .frontend
                .get_vring_base(0)
                .expect("stop the request queue");
            std::thread::sleep(std::time::Duration::from_millis(30));
            let vm_heard = t.vm().answer(w).is_some();
            let taken = t
                .local
                .with(|a| a.proxy_wait(HOST, 1 << 40, ev.slot, ev.generation, None))
                .map(|(s, _)| s)
                == Some(Status::Success);
            assert!(
                vm_heard != taken,
                "round {round}: the VM heard the WAIT's answer: {vm_heard}, the next waiter \
                 took the signal: {taken} (exactly one must be true; {heard} rounds heard, \
                 {kept} kept the signal so far)"
            );
            if vm_heard {
                heard += 1;
            } else {
                kept += 1;
            }
            t.disconnect();
        }
    });
}

#[test]
fn an_open_names_the_objects_kind_flags_and_change_count_and_refuses_another_kind_than_asked() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let sec = t.host_creates("sec", kind::SECTION, false);
        t.host_creates("manual", kind::EVENT, true);
        for _ in 0..3 {
            t.local
                .with(|a| a.proxy_signal(HOST, sec.slot, sec.generation));
        }
        let s = t.vm().request(&open_of(kind::SECTION, "sec"));
        assert_eq!(s.status, Status::Success.code());
        let f = HandleFields::read(&s);
        assert_eq!((f.kind, f.change_count), (kind::SECTION, 3), "{f:?}");
        assert_eq!(f.map_flags, MAP_WRITABLE);
        let m = t.vm().request(&open_of(0, "manual"));
        let f = HandleFields::read(&m);
        assert_eq!(f.kind, kind::EVENT, "kind 0 opens any kind");
        assert_ne!(f.object_flags & object_flags::MANUAL_RESET, 0, "{f:?}");

        // Another kind than asked: refused, and nothing mapped or held for it.
        let maps = t.vm().recorder.lock().expect("recorder").maps.len();
        let wrong = t.vm().request(&open_of(kind::EVENT, "sec"));
        assert_eq!(wrong.status, Status::InvalidHandle.code());
        assert_eq!(t.vm().recorder.lock().expect("recorder").maps.len(), maps);
        t.disconnect();
    });
}

#[test]
fn a_wait_since_a_change_count_the_section_has_passed_completes_at_once_and_otherwise_waits() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let sec = t.host_creates("sec", kind::SECTION, false);
        let s = t.vm_opens("sec");
        let seen = HandleFields::read(&s).change_count;
        // A change between the open and the WAIT is not lost.
        t.local
            .with(|a| a.proxy_signal(HOST, sec.slot, sec.generation));
        let mut since = on(OP_WAIT, &s, 5_000);
        since.flags = WAIT_SINCE;
        since.max_size = seen;
        let r = t.vm().request(&since);
        assert_eq!(r.status, Status::Success.code());
        assert_eq!(r.size, seen + 1, "the count it completed at");
        // Since the count it has now: no change, so the timeout.
        since.max_size = r.size;
        since.size = 100;
        assert_eq!(t.vm().request(&since).status, Status::Timeout.code());
        t.disconnect();
    });
}

/// LOCK (token in `size`, timeout in `max_size`, [`LOCK_TRY`] in `flags`) on `held`.
fn lock_on(
    held: &vshm_format::layout::Response,
    token: u32,
    timeout_ms: u64,
    flags: u32,
) -> vshm_format::layout::Request {
    let mut r = on(vshm_format::layout::op::LOCK, held, u64::from(token));
    r.max_size = timeout_ms;
    r.flags = flags;
    r
}

#[test]
fn a_lock_stays_pending_without_holding_up_the_queue_until_the_owner_unlocks_and_a_try_or_timeout_leaves_no_queue_entry(
) {
    use vshm_format::layout::op;
    use vshm_format::virtio::LOCK_TRY;
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let m = t.host_creates("m", kind::MUTEX, false);
        let held = t.vm_opens("m");
        let host_token = 3;
        assert_eq!(
            t.local
                .with(|a| a.proxy_lock(HOST, 1, m.slot, m.generation, host_token, true)),
            Some((Status::Success, 0)),
            "the host peer holds it"
        );
        // A try and a timed LOCK: no, without a queue entry left behind.
        let r = t.vm().request(&lock_on(&held, 11, 0, LOCK_TRY));
        assert_eq!(r.status, Status::Timeout.code());
        let started = std::time::Instant::now();
        let r = t.vm().request(&lock_on(&held, 11, 100, 0));
        assert_eq!(r.status, Status::Timeout.code());
        assert!(started.elapsed() >= std::time::Duration::from_millis(100));
        // An untimed LOCK stays pending while other requests are answered.
        let waiting = t.vm().post(&lock_on(&held, 11, 0, 0));
        let other = t.vm().request(&open_of(0, "m"));
        assert_eq!(other.status, Status::Success.code(), "answered meanwhile");
        assert!(t.vm().answer(waiting).is_none(), "still queued");
        // The owner unlocks: handed to the VM, which is told.
        assert_eq!(
            t.local
                .with(|a| a.proxy_unlock(HOST, m.slot, m.generation, host_token)),
            Status::Success
        );
        let done = t
            .vm()
            .answer_within(waiting, std::time::Duration::from_secs(5))
            .expect("granted");
        assert_eq!(done.status, Status::Success.code());
        // Its UNLOCK frees it; a second one is refused.
        let unlock = on(op::UNLOCK, &held, 11);
        assert_eq!(t.vm().request(&unlock).status, Status::Success.code());
        assert_eq!(
            t.vm().request(&unlock).status,
            Status::MutantNotOwned.code()
        );
        assert_eq!(
            t.local
                .with(|a| a.proxy_lock(HOST, 2, m.slot, m.generation, host_token, false)),
            Some((Status::Success, 0)),
            "free: the try and the timeout left nothing queued"
        );
        // Queued at disconnect: dropped, never granted to the departed VM.
        let queued = t.vm().post(&lock_on(&held, 11, 0, 0));
        assert!(t.vm().answer(queued).is_none());
        t.disconnect();
        assert_eq!(
            t.local
                .with(|a| a.proxy_unlock(HOST, m.slot, m.generation, host_token)),
            Status::Success
        );
        assert_eq!(
            t.local
                .with(|a| a.proxy_lock(HOST, 3, m.slot, m.generation, host_token, false)),
            Some((Status::Success, 0)),
            "freed, not handed to the departed VM"
        );
    });
}

#[test]
fn peers_tells_a_vm_its_own_slot_and_who_is_attached_from_vshmds_records() {
    use vshm_format::virtio::{PeersReply, OP_PEERS};
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let mut req = named(OP_PEERS, "x", 0);
        req.name_len = 0;
        let r = t.vm().request(&req);
        assert_eq!(r.status, Status::Success.code());
        let p = PeersReply::read(&r).expect("a reply that adds up");
        let host_slot = t.local.with(|a| {
            a.status()
                .peers
                .iter()
                .find(|x| x.id == HOST.raw())
                .map(|x| x.slot)
                .expect("the host peer")
        });
        assert!(p.incarnation_of(vshm_format::PeerSlot(host_slot)).is_some());
        assert_eq!(p.incarnation_of(p.me), Some(p.incarnation));
        // A departure shows at the next PEERS.
        t.local.with(|a| a.peer_gone(HOST));
        let r = t.vm().request(&req);
        let p = PeersReply::read(&r).expect("reply");
        assert_eq!(p.incarnation_of(vshm_format::PeerSlot(host_slot)), None);
        t.disconnect();
    });
}

#[test]
fn a_device_reset_closes_every_handle_the_vm_had_and_hands_its_mutexes_on_as_abandoned() {
    use vhost::vhost_user::VhostUserFrontend as _;
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        t.host_creates("sec", kind::SECTION, false);
        let m = t.host_creates("m", kind::MUTEX, false);
        let s = t.vm_opens("sec");
        let held = t.vm_opens("m");
        assert_eq!(
            t.vm().request(&lock_on(&held, 11, 0, 0)).status,
            Status::Success.code()
        );
        let host_token = 3;
        assert_eq!(
            t.local
                .with(|a| a.proxy_lock(HOST, 1, m.slot, m.generation, host_token, true)),
            None,
            "the host queues behind the VM"
        );
        // The guest's driver resets the device: it knows none of its handles any more.
        t.vm().frontend.reset_device().expect("RESET_DEVICE");
        assert!(
            t.local.with(|a| a.proxy_holds(PeerId(100)).is_empty()),
            "nothing held for the reset driver"
        );
        let unmaps = t.vm().recorder.lock().expect("recorder").unmaps.clone();
        assert!(
            unmaps.iter().any(|&(at, _)| at == s.offset),
            "the section's pages left the window: {unmaps:?}"
        );
        assert_eq!(
            t.local.with(|a| a.proxy_poll(HOST).done),
            vec![(1, Status::Abandoned, 0)],
            "the queued host got the mutex, told it was abandoned"
        );
        t.disconnect();
    });
}

#[test]
fn events_waiting_about_an_object_go_with_the_vms_last_handle_on_it() {
    watchdog(std::time::Duration::from_secs(60), || {
        let mut t = InProcess::start(0);
        let ev = t.host_creates("ev", kind::EVENT, false);
        let kept = t.host_creates("kept", kind::EVENT, false);
        let e = t.vm_opens("ev");
        let k = t.vm_opens("kept");
        // No buffer posted: both signals wait, coalesced, for one.
        t.local.with(|a| {
            a.proxy_signal(HOST, ev.slot, ev.generation);
            a.proxy_signal(HOST, kept.slot, kept.generation);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        // The VM closes its handle on "ev": what waits about it is dropped.
        let close = on(OP_CLOSE, &e, e.offset);
        assert_eq!(t.vm().request(&close).status, Status::Success.code());
        t.vm().post_event_buffers(8, 24);
        let got = t
            .vm()
            .events_until(std::time::Duration::from_secs(5), |x| !x.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut all: Vec<u32> = got.iter().map(|x| x.slot).collect();
        all.extend(t.vm().events().iter().map(|x| x.slot));
        assert_eq!(all, vec![k.slot], "only news of what it still holds");
        t.disconnect();
    });
}
