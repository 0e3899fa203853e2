//! The VMM's vshm device (vmm/src/vshm_device.rs) against a real `vshmd --vhost-user`, the
//! test playing the guest's driver through the VMM's PCI bus and guest RAM: discovery by
//! PCI configuration cycles, virtio initialisation through BAR 0, a request queue in guest
//! RAM, and the window's KVM mappings following opens and closes. (A guest that reads the
//! window itself is tests/tests/vmm_guests.rs.)

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vshm_format::layout::{kind, Request, Response};
use vshm_format::mailbox;
use vshm_format::shm::{bytes_of, bytes_of_mut, zeroed};
use vshm_format::virtio::{
    self, OPEN_READ_ONLY, OP_CLOSE, OP_OPEN, VIRTIO_F_VERSION_1, VSHM_F_READ_ONLY,
};
use vshm_format::Status;
use vshm_tests::{wait_for, watchdog, Backend};
use vshm_vmm::pci::{Access, PciBus, CONFIG_ADDRESS, CONFIG_DATA};
use vshm_vmm::{Vm, VmConfig, VSHM_BAR0};

const RINGS: u64 = 0x20_0000;
const DESC: u64 = RINGS;
const AVAIL: u64 = RINGS + 0x1000;
const USED: u64 = RINGS + 0x2000;
const REQ: u64 = RINGS + 0x3000;
const RESP: u64 = RINGS + 0x4000;
const QSIZE: u16 = 16;

fn config_read(bus: &mut PciBus, dev: u32, reg: u32) -> u32 {
    bus.pio_write(
        CONFIG_ADDRESS,
        &(0x8000_0000 | (dev << 11) | reg).to_le_bytes(),
    );
    let mut d = [0u8; 4];
    bus.pio_read(CONFIG_DATA, &mut d);
    u32::from_le_bytes(d)
}

fn config_write(bus: &mut PciBus, dev: u32, reg: u32, v: u32) {
    bus.pio_write(
        CONFIG_ADDRESS,
        &(0x8000_0000 | (dev << 11) | reg).to_le_bytes(),
    );
    bus.pio_write(CONFIG_DATA, &v.to_le_bytes());
}

fn read32(vm: &mut Vm, addr: u64) -> u32 {
    let mut d = [0u8; 4];
    assert!(
        vm.pci().mmio(addr, Access::Read(&mut d)),
        "{addr:#x} decoded"
    );
    u32::from_le_bytes(d)
}

fn write(vm: &mut Vm, addr: u64, data: &[u8]) {
    assert!(
        vm.pci().mmio(addr, Access::Write(data)),
        "{addr:#x} decoded"
    );
}

/// The test's driver: the queue's state in guest RAM.
struct Driver {
    next: u16,
}

impl Driver {
    /// Initialises the device as a driver does (VERSION_1 only) with queue 0 set up.
    fn start(vm: &mut Vm) -> Driver {
        let c = VSHM_BAR0;
        write(vm, c + 0x14, &[0]);
        write(vm, c + 0x14, &[1 | 2]);
        write(vm, c + 8, &1u32.to_le_bytes());
        write(vm, c + 0xC, &1u32.to_le_bytes());
        write(vm, c + 0x14, &[1 | 2 | 8]);
        write(vm, c + 0x16, &0u16.to_le_bytes());
        write(vm, c + 0x18, &QSIZE.to_le_bytes());
        for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            write(vm, c + off, &addr.to_le_bytes());
        }
        write(vm, c + 0x1C, &1u16.to_le_bytes());
        write(vm, c + 0x14, &[1 | 2 | 8 | 4]);
        assert_eq!(read32(vm, c + 0x14) & 0xFF, 1 | 2 | 8 | 4, "DRIVER_OK");
        Driver { next: 0 }
    }

    fn request(&mut self, vm: &mut Vm, req: &Request) -> Response {
        let mem = vm.memory().clone();
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = DESC + 16 * i;
            mem.write_obj(addr, GuestAddress(at)).expect("desc");
            mem.write_obj(len, GuestAddress(at + 8)).expect("desc");
            mem.write_obj(flags, GuestAddress(at + 12)).expect("desc");
            mem.write_obj(next, GuestAddress(at + 14)).expect("desc");
        };
        mem.write_slice(bytes_of(req), GuestAddress(REQ))
            .expect("request");
        desc(0, REQ, 1280, 1, 1);
        desc(1, RESP, 768, 2, 0);
        mem.write_obj(
            0u16,
            GuestAddress(AVAIL + 4 + 2 * u64::from(self.next % QSIZE)),
        )
        .expect("avail");
        self.next = self.next.wrapping_add(1);
        mem.write_obj(self.next, GuestAddress(AVAIL + 2))
            .expect("avail idx");
        // Through the bus: the VMM's own path when KVM's ioeventfd does not take it.
        write(vm, VSHM_BAR0 + 0x3000, &0u16.to_le_bytes());
        let until = Instant::now() + Duration::from_secs(10);
        while mem.read_obj::<u16>(GuestAddress(USED + 2)).expect("used") != self.next {
            assert!(Instant::now() < until, "no response within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut resp: Response = zeroed();
        mem.read_slice(bytes_of_mut(&mut resp), GuestAddress(RESP))
            .expect("response");
        resp
    }
}

fn named(op: u32, name: &str, flags: u32) -> Request {
    let mut r = mailbox::create_request(Some(name), kind::SECTION, 64 << 10, 8 << 10, false);
    r.op = op;
    r.flags |= flags;
    r
}

#[test]
fn the_vmms_vshm_device_is_found_on_pci_initialised_through_bar0_and_maps_exactly_what_is_open() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let (b, vpath) =
            Backend::start_with_vhost_user(&["--size", "8M", "--vhost-user-window", "16M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (sec, _) = host
            .create(Some("from-host"), &vshm::CreateOptions::new(64 << 10))
            .expect("create");
        sec.write_at(0, b"host bytes").expect("write");

        let mut vm = Vm::freestanding(&VmConfig {
            mem_size: 16 << 20,
            vshm: Some(vpath.clone()),
            args: Vec::new(),
            ivshmem: None,
        })
        .expect("the VM with its vshm device");

        // Discovery: the device at 00:01.0, its capabilities, its BARs as firmware set them.
        let bus = vm.pci();
        assert_eq!(
            config_read(bus, 1, 0),
            u32::from(virtio::PCI_DEVICE) << 16 | u32::from(virtio::PCI_VENDOR)
        );
        let mut at = config_read(bus, 1, 0x34) & 0xFF;
        let mut kinds = Vec::new();
        while at != 0 {
            let head = config_read(bus, 1, at);
            assert_eq!(head & 0xFF, 0x09, "a virtio vendor capability");
            kinds.push(head >> 24);
            if head >> 24 == 8 {
                assert_eq!(
                    config_read(bus, 1, at + 4) & 0xFF,
                    4,
                    "the window is in BAR 4"
                );
                assert_eq!(config_read(bus, 1, at + 12), 16 << 20, "the window's size");
            }
            at = (head >> 8) & 0xFF;
        }
        assert_eq!(kinds, vec![1, 2, 3, 4, 8]);
        assert_eq!(
            config_read(bus, 1, 0x10),
            u32::try_from(VSHM_BAR0).expect("below 4 GiB")
        );

        // Virtio initialisation (common configuration at BAR 0 + 0).
        let c = VSHM_BAR0;
        write(&mut vm, c + 0x14, &[0]);
        write(&mut vm, c + 0x14, &[1 | 2]);
        write(&mut vm, c, &1u32.to_le_bytes());
        let high = read32(&mut vm, c + 4);
        write(&mut vm, c, &0u32.to_le_bytes());
        let low = read32(&mut vm, c + 4);
        let offered = u64::from(high) << 32 | u64::from(low);
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
        assert_ne!(offered & VSHM_F_READ_ONLY, 0);
        // A feature the device did not offer does not stick.
        write(&mut vm, c + 8, &1u32.to_le_bytes());
        write(&mut vm, c + 0xC, &(1u32 << 31).to_le_bytes());
        write(&mut vm, c + 0x14, &[1 | 2 | 8]);
        assert_eq!(
            read32(&mut vm, c + 0x14) & 0xFF & 8,
            0,
            "FEATURES_OK refused"
        );
        write(&mut vm, c + 0x14, &[0]);
        write(&mut vm, c + 0x14, &[1 | 2]);
        write(&mut vm, c + 8, &1u32.to_le_bytes());
        write(&mut vm, c + 0xC, &1u32.to_le_bytes());
        write(&mut vm, c + 8, &0u32.to_le_bytes());
        write(
            &mut vm,
            c + 0xC,
            &u32::try_from(VSHM_F_READ_ONLY)
                .expect("low word")
                .to_le_bytes(),
        );
        write(&mut vm, c + 0x14, &[1 | 2 | 8]);
        assert_eq!(read32(&mut vm, c + 0x14) & 8, 8, "FEATURES_OK");
        assert_eq!(read32(&mut vm, c + 0x12) & 0xFFFF, 2, "two queues");
        write(&mut vm, c + 0x16, &0u16.to_le_bytes());
        write(&mut vm, c + 0x18, &QSIZE.to_le_bytes());
        for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
            write(
                &mut vm,
                c + off,
                &u32::try_from(addr & 0xFFFF_FFFF)
                    .expect("low half")
                    .to_le_bytes(),
            );
            write(
                &mut vm,
                c + off + 4,
                &u32::try_from(addr >> 32).expect("high half").to_le_bytes(),
            );
        }
        write(&mut vm, c + 0x1C, &1u16.to_le_bytes());
        write(&mut vm, c + 0x14, &[1 | 2 | 8 | 4]);
        assert_eq!(read32(&mut vm, c + 0x14) & 0x40, 0, "no DEVICE_NEEDS_RESET");
        // The device configuration (BAR 0 + 0x2000) is the backend's.
        let mut cfg = [0u8; virtio::CONFIG_BYTES];
        for (i, chunk) in cfg.chunks_mut(4).enumerate() {
            chunk.copy_from_slice(&read32(&mut vm, c + 0x2000 + 4 * i as u64).to_le_bytes());
        }
        let cfg = virtio::DeviceConfig::from_bytes(&cfg).expect("this format's config");
        assert_eq!(cfg.window_size, 16 << 20);

        // Requests: what is open is mapped, writable or not as opened, and nothing else.
        let mut d = Driver { next: 0 };
        assert!(vm.vshm_mappings().is_empty());
        let opened = d.request(&mut vm, &named(OP_OPEN, "from-host", 0));
        assert_eq!(opened.status, Status::Success.code());
        assert_eq!(vm.vshm_mappings(), vec![(opened.offset, 64 << 10, true)]);
        let ro = d.request(&mut vm, &named(OP_OPEN, "from-host", OPEN_READ_ONLY));
        assert_eq!(ro.status, Status::Success.code());
        assert!(vm.vshm_mappings().contains(&(ro.offset, 64 << 10, false)));
        let mut close = named(OP_CLOSE, "x", 0);
        close.slot = opened.slot;
        close.generation = opened.generation;
        close.size = opened.offset;
        assert_eq!(d.request(&mut vm, &close).status, Status::Success.code());
        assert_eq!(vm.vshm_mappings(), vec![(ro.offset, 64 << 10, false)]);
        assert_eq!(b.section("from-host").expect("listed")["refs"], 2);

        // The guest moves BAR 4 (sizing it writes all ones; then over RAM): the window is
        // nowhere while there, and its mappings come back when it is somewhere valid again.
        let bus = vm.pci();
        config_write(bus, 1, 0x24, 0xFFFF_FFFF);
        config_write(bus, 1, 0x20, 0xFFFF_FFFF);
        assert_eq!(vm.vshm_window_base(), None, "a BAR being sized is no place");
        let bus = vm.pci();
        config_write(bus, 1, 0x20, 0);
        config_write(bus, 1, 0x24, 0);
        assert_eq!(vm.vshm_window_base(), None, "not over RAM");
        let bus = vm.pci();
        config_write(bus, 1, 0x20, 0);
        config_write(bus, 1, 0x24, 2);
        assert_eq!(vm.vshm_window_base(), Some(8 << 30));
        config_write(vm.pci(), 1, 4, 0);
        assert_eq!(vm.vshm_window_base(), None, "memory decoding off");
        config_write(vm.pci(), 1, 4, 2);
        assert_eq!(vm.vshm_window_base(), Some(8 << 30));
        assert_eq!(vm.vshm_mappings(), vec![(ro.offset, 64 << 10, false)]);

        // The VMM goes: vshmd reclaims the VM's hold.
        drop(vm);
        assert!(
            wait_for(Duration::from_secs(5), || b
                .section("from-host")
                .is_some_and(|s| s["refs"] == 1)),
            "the VM's hold was released: {}",
            b.status()
        );
    });
}

#[test]
fn when_vshmd_goes_the_vms_window_loses_every_mapping() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let mut vm = Vm::freestanding(&VmConfig {
            mem_size: 16 << 20,
            vshm: Some(vpath.clone()),
            args: Vec::new(),
            ivshmem: None,
        })
        .expect("the VM");
        let mut d = Driver::start(&mut vm);
        let made = d.request(&mut vm, &named(1, "mine", 0));
        assert_eq!(made.status, Status::Success.code());
        assert_eq!(vm.vshm_mappings().len(), 1);
        b.terminate();
        assert!(
            wait_for(Duration::from_secs(5), || vm.vshm_mappings().is_empty()),
            "the mapping of a backend that left stays reachable"
        );
    });
}

#[test]
fn a_guests_device_reset_releases_every_handle_it_had_and_unmaps_its_window() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "8M"]);
        assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
        let host = b.connect();
        let (h, _) = host
            .create(Some("kept"), &vshm::CreateOptions::new(8 << 10))
            .expect("host creates");
        let mut vm = Vm::freestanding(&VmConfig {
            mem_size: 16 << 20,
            vshm: Some(vpath.clone()),
            args: Vec::new(),
            ivshmem: None,
        })
        .expect("the VM");
        let mut d = Driver::start(&mut vm);
        let mut open = named(OP_OPEN, "kept", 0);
        open.kind = 0;
        assert_eq!(d.request(&mut vm, &open).status, Status::Success.code());
        assert_eq!(vm.vshm_mappings().len(), 1);
        assert_eq!(host.holders(h.slot()).count(), 2, "the host and the VM");
        // The guest resets the device (a reboot, a driver reload): status 0.
        write(&mut vm, VSHM_BAR0 + 0x14, &[0]);
        assert!(
            wait_for(Duration::from_secs(5), || vm.vshm_mappings().is_empty()),
            "the window keeps a mapping the reset driver cannot name"
        );
        assert!(
            wait_for(Duration::from_secs(5), || host.holders(h.slot()).count()
                == 1),
            "the VM still holds the section after its device reset"
        );
        // The driver starts over (its rings from zero) and works.
        vm.memory()
            .write_obj(0u16, GuestAddress(USED + 2))
            .expect("used idx");
        let mut d = Driver::start(&mut vm);
        assert_eq!(d.request(&mut vm, &open).status, Status::Success.code());
        assert_eq!(vm.vshm_mappings().len(), 1);
    });
}

/// `mov rbx, 0x8000_0000; mov rax, [rbx]; mov dx, 0x3f8; mov ecx, 8;
///  1: out dx, al; shr rax, 8; dec ecx; jnz 1b; mov dx, 0xf4; mov al, 0; out dx, al; hlt`:
/// prints the first 8 bytes of the ivshmem BAR 2 (at [`vshm_vmm::IVSHMEM_REGION`]).
const PRINT_REGION_MAGIC: &[u8] = &[
    0x48, 0xBB, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x48, 0x8B, 0x03, 0x66, 0xBA, 0xF8,
    0x03, 0xB9, 0x08, 0x00, 0x00, 0x00, 0xEE, 0x48, 0xC1, 0xE8, 0x08, 0xFF, 0xC9, 0x75, 0xF7, 0x66,
    0xBA, 0xF4, 0x00, 0xB0, 0x00, 0xEE, 0xF4,
];

#[test]
fn the_vmms_ivshmem_device_is_a_peer_of_the_region_shows_it_in_bar2_and_rings_doorbells() {
    use vshm::Transport as _;
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    watchdog(Duration::from_secs(60), || {
        let b = Backend::start(&["--size", "8M"]);
        let host = vshm::host::HostTransport::connect(&b.socket).expect("a host peer");
        let mut vm = Vm::freestanding(&VmConfig {
            mem_size: 16 << 20,
            vshm: None,
            args: Vec::new(),
            ivshmem: Some(b.socket.clone()),
        })
        .expect("the VM with its ivshmem device");
        let id = vm.ivshmem_peer_id().expect("attached");
        let listed = b.status()["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .any(|p| p["id"].as_u64() == Some(u64::from(id)) && p["connected"] == true);
        assert!(listed, "the VM is peer {id} of the region: {}", b.status());
        assert_ne!(id, host.peer_id().0);

        // PCI: QEMU's ivshmem-doorbell identity; IVPosition is the peer id.
        assert_eq!(config_read(vm.pci(), 1, 0), 0x1110_1AF4);
        assert_eq!(
            config_read(vm.pci(), 1, 8) >> 8,
            0x05_0000,
            "class: RAM memory"
        );
        assert_eq!(
            read32(&mut vm, vshm_vmm::IVSHMEM_BAR0 + 8),
            u32::from(id),
            "IVPosition"
        );

        // The doorbell rings the peer it names: another VM's IntrStatus shows it, once.
        let mut other = Vm::freestanding(&VmConfig {
            mem_size: 16 << 20,
            vshm: None,
            args: Vec::new(),
            ivshmem: Some(b.socket.clone()),
        })
        .expect("a second VM");
        let other_id = other.ivshmem_peer_id().expect("attached");
        let status = vshm_vmm::IVSHMEM_BAR0 + 4;
        assert_eq!(read32(&mut other, status), 0, "nothing rang it yet");
        let ring = (u32::from(other_id) << 16) | 1;
        // The server announces a new peer's eventfds asynchronously: ring until it is known.
        assert!(
            wait_for(Duration::from_secs(5), || {
                write(&mut vm, vshm_vmm::IVSHMEM_BAR0 + 0xC, &ring.to_le_bytes());
                read32(&mut other, status) == 1
            }),
            "VM {id}'s doorbell reached VM {other_id}"
        );
        assert_eq!(read32(&mut other, status), 0, "read once, cleared");
        // A doorbell to a peer nobody announced is dropped.
        write(
            &mut vm,
            vshm_vmm::IVSHMEM_BAR0 + 0xC,
            &(60u32 << 16).to_le_bytes(),
        );
        drop(other);

        // A guest reads the region through BAR 2: vshmd's superblock magic.
        vm.load_flat(PRINT_REGION_MAGIC).expect("load");
        vm.start_at(vshm_vmm::ENTRY).expect("start");
        let out = vm.run(1000).expect("run");
        assert_eq!(out.status, Some(0), "{out}");
        assert_eq!(out.serial, b"VSHMAREA", "{out}");
        drop(vm);
        assert!(
            wait_for(Duration::from_secs(5), || !b.status()["peers"]
                .as_array()
                .expect("peers")
                .iter()
                .any(
                    |p| p["id"].as_u64() == Some(u64::from(id)) && p["connected"] == true
                )),
            "the VM left the region: {}",
            b.status()
        );
    });
}
