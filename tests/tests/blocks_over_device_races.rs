//! Blocks over the vshm device at the worst moments (docs/VHOST-USER.md §5.1 row 14, §8):
//! a VM's allocator must never take a live peer for departed, however long it waited for
//! the lock. Found by a review; it failed before its fix.

use std::time::Duration;

use vshm::host::vhost_user::VhostUserTransport;
use vshm::host::HostTransport;
use vshm::{CreateOptions, Device, Namespace};
use vshm_format::blocks::{hdr, lock_word, Me};
use vshm_tests::{wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(120);

fn device(vpath: &std::path::Path) -> Namespace<Device<VhostUserTransport>> {
    assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
    let dev = VhostUserTransport::connect(vpath).expect("connect to the vshm device");
    Namespace::attach(Device(dev)).expect("attach over the device")
}

/// The allocator lock word a peer on the ivshmem socket takes (as its library would).
fn word_of(ns: &Namespace<HostTransport>) -> u64 {
    let me = ns
        .peers()
        .find(|p| p.peer_id == ns.peer_id())
        .expect("in the peer table");
    lock_word(Me {
        slot: me.slot,
        incarnation: me.incarnation,
        token: 4242,
    })
}

fn lock_of(s: &vshm::Section<'_, HostTransport>) -> u64 {
    let mut b = [0u8; 8];
    s.read_at(hdr::LOCK, &mut b).expect("read the lock word");
    u64::from_le_bytes(b)
}

fn set_lock(s: &vshm::Section<'_, HostTransport>, w: u64) {
    s.write_at(hdr::LOCK, &w.to_le_bytes())
        .expect("write the lock word");
}

#[test]
fn a_vms_allocator_never_breaks_the_lock_of_a_peer_that_attached_while_it_waited() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "16M"]);
        let keeper = b.connect();
        let ks = keeper
            .create(
                Some("lockwait/s"),
                &CreateOptions {
                    max_size: 1 << 20,
                    initial_size: 64 << 10,
                    persistent: false,
                },
            )
            .expect("create")
            .0;
        let blk = ks.allocate(16, 8).expect("the heap exists");
        ks.free(blk).expect("free");
        // The keeper (live, attached before the VM) holds the allocator lock.
        set_lock(&ks, word_of(&keeper));
        let (tx, rx) = std::sync::mpsc::channel();
        let vm = std::thread::spawn(move || {
            let ns = device(&vpath);
            let s = ns.open("lockwait/s").expect("VM opens");
            tx.send(()).expect("ready");
            s.allocate(64, 8).map(|_| ()).map_err(|e| format!("{e}"))
        });
        rx.recv().expect("the VM is about to allocate");
        std::thread::sleep(Duration::from_millis(500));
        // A peer that attached after the VM's PEERS answer takes the lock: the VM asks again
        // (its one fresh look) and sees it attached.
        let r1 = b.connect();
        set_lock(&ks, word_of(&r1));
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(lock_of(&ks), word_of(&r1), "r1's lock is respected");
        // Another peer attaches and takes the lock after that fresh look.
        let r2 = b.connect();
        let w2 = word_of(&r2);
        set_lock(&ks, w2);
        std::thread::sleep(Duration::from_millis(1000));
        let now = lock_of(&ks);
        set_lock(&ks, 0);
        let vm_result = vm.join().expect("VM thread");
        assert_eq!(
            now, w2,
            "a live peer's allocator lock was broken by the VM (word now {now:#x})"
        );
        assert_eq!(vm_result, Ok(()), "the VM allocates once the lock is free");
        drop((r1, r2));
    });
}
