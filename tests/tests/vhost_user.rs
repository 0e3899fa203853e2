//! The vshm virtio device over a real vhost-user socket (docs/VHOST-USER.md), the test
//! playing the VMM (`vshm_tests::vhost_frontend`): first the device alone over an arbiter in
//! this process, then `vshmd --vhost-user` beside an ivshmem host peer in one namespace.

use std::sync::Arc;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vshm::CreateOptions;
use vshm_backend::arbiter::Arbiter;
use vshm_backend::region::Region;
use vshm_backend::vhost_user::device::{MAP_WRITABLE, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN};
use vshm_backend::vhost_user::{self, DeviceConfig, Local};
use vshm_format::layout::{kind, Layout};
use vshm_format::mailbox::Command;
use vshm_format::shm::SharedMemory;
use vshm_format::{PeerId, Status};
use vshm_tests::vhost_frontend::{map_flags, named, Vmm};
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
        let dir = TempDir::new("vhost-e2e");
        let vpath = dir.path().join("vhost.sock");
        let vpath_text = vpath.to_str().expect("utf-8 path");
        let b = Backend::start(&["--size", "8M", "--vhost-user", vpath_text]);
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
