//! The Linux guest transport's device discovery and registers, against a sysfs tree built
//! from plain files (the real device is exercised by the VM scenario tests).

use std::path::Path;

use vshm::pci::{PciError, PciTransport};
use vshm::Transport;
use vshm_format::layout::{peer_state, Layout, PeerEntry, FORMAT_VERSION};
use vshm_format::shm::{bytes_of, zeroed};
use vshm_tests::TempDir;

const REGION: u64 = 1 << 20;

fn device(root: &Path, bdf: &str, vendor: &str, region_id: Option<u8>, position: u32) {
    let dir = root.join(bdf);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("vendor"), format!("{vendor}\n")).expect("vendor");
    std::fs::write(dir.join("device"), "0x1110\n").expect("device");
    std::fs::write(dir.join("enable"), "0\n").expect("enable");
    let mut regs = vec![0u8; 256];
    regs[8..12].copy_from_slice(&position.to_le_bytes());
    std::fs::write(dir.join("resource0"), regs).expect("bar0");
    let mut shm = vec![0u8; 1 << 20];
    if let Some(id) = region_id {
        let layout = Layout::compute(REGION, 4, 16, 2, 4096).expect("layout");
        let mut sb = layout.superblock(1, [id; 16]);
        sb.version = FORMAT_VERSION;
        shm[..256].copy_from_slice(bytes_of(&sb));
        // The host publishes the peer (in some slot) before the guest learns its id.
        let mut peer: PeerEntry = zeroed();
        peer.state = peer_state::CONNECTED;
        peer.peer_id = position;
        let at = usize::try_from(layout.peer_entry(vshm_format::PeerSlot(2)).expect("slot 2"))
            .expect("offset");
        shm[at..at + 64].copy_from_slice(bytes_of(&peer));
    }
    std::fs::write(dir.join("resource2"), shm).expect("bar2");
}

#[test]
fn the_one_device_holding_a_vshm_region_is_found_enabled_and_rung() {
    let root = TempDir::new("sysfs");
    device(root.path(), "0000:00:02.0", "0x8086", Some(1), 0); // not ivshmem
    device(root.path(), "0000:00:03.0", "0x1af4", None, 1); // ivshmem, no vshm region
    device(root.path(), "0000:00:04.0", "0x1af4", Some(7), 3);
    let t = PciTransport::open_in(root.path(), None).expect("found");
    assert_eq!(t.bdf(), "0000:00:04.0");
    assert_eq!(
        t.peer_id(),
        vshm_format::PeerId(3),
        "IVPosition is our peer id"
    );
    let enable = std::fs::read_to_string(root.path().join("0000:00:04.0/enable")).expect("enable");
    assert_eq!(enable.trim(), "1", "the device was enabled");
    t.ring(vshm_format::PeerId::HOST, 1)
        .expect("ring the host on vector 1");
    let regs = std::fs::read(root.path().join("0000:00:04.0/resource0")).expect("bar0");
    assert_eq!(
        &regs[12..16],
        &1u32.to_le_bytes(),
        "doorbell = (host 0 << 16) | vector 1"
    );
    let ns = vshm::Namespace::attach(t).expect("attach over the BAR");
    assert_eq!(ns.layout().max_objects, 16);
}

#[test]
fn several_vshm_devices_must_be_chosen_by_address() {
    let root = TempDir::new("sysfs");
    device(root.path(), "0000:00:03.0", "0x1af4", Some(1), 1);
    device(root.path(), "0000:00:04.0", "0x1af4", Some(2), 1);
    let err = PciTransport::open_in(root.path(), None).expect_err("ambiguous");
    let msg = err.to_string();
    assert!(matches!(err, PciError::Ambiguous(_)), "{msg}");
    assert!(
        msg.contains("0000:00:03.0") && msg.contains("0000:00:04.0") && msg.contains("--pci"),
        "{msg}"
    );
    let t = PciTransport::open_in(root.path(), Some("0000:00:04.0")).expect("chosen");
    assert_eq!(t.bdf(), "0000:00:04.0");
}

#[test]
fn missing_or_wrong_devices_are_named_in_the_error() {
    let root = TempDir::new("sysfs");
    assert!(matches!(
        PciTransport::open_in(root.path(), None),
        Err(PciError::NoDevice(_))
    ));
    device(root.path(), "0000:00:02.0", "0x8086", None, 0);
    let err = PciTransport::open_in(root.path(), Some("0000:00:02.0")).expect_err("not ivshmem");
    assert!(err.to_string().contains("not an ivshmem device"), "{err}");
    device(root.path(), "0000:00:05.0", "0x1af4", Some(1), 0);
    let err = PciTransport::open_in(root.path(), Some("0000:00:05.0")).expect_err("position 0");
    assert!(matches!(err, PciError::BadPosition(_, 0)), "{err}");
    let err = PciTransport::open_in(root.path(), Some("0000:00:09.0")).expect_err("absent");
    assert!(err.to_string().contains("0000:00:09.0"), "{err}");
}
