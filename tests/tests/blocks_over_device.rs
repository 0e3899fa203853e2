//! Blocks inside a section (LSA AllocateSharedMemory / FreeSharedMemory) over the vshm
//! device: the allocator lives in the section, so a VM on the device and a peer on the
//! ivshmem socket allocate and free in the same heap at once; the VM learns who is attached
//! from vshmd (PEERS, docs/VHOST-USER.md §5.1) instead of a peer table it cannot see.

use std::time::Duration;

use vshm::blocks::AllocOptions;
use vshm::host::vhost_user::VhostUserTransport;
use vshm::{CreateOptions, Device, Namespace};
use vshm_tests::{wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(120);

fn device(vpath: &std::path::Path) -> Namespace<Device<VhostUserTransport>> {
    assert!(wait_for(Duration::from_secs(10), || vpath.exists()));
    let dev = VhostUserTransport::connect(vpath).expect("connect to the vshm device");
    Namespace::attach(Device(dev)).expect("attach over the device")
}

fn opts(initial: u64) -> CreateOptions {
    CreateOptions {
        max_size: 1 << 20,
        initial_size: initial,
        persistent: false,
    }
}

#[test]
fn a_vm_on_the_device_and_an_ivshmem_peer_allocate_and_free_in_one_heap() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "16M"]);
        let host = b.connect();
        let ns = device(&vpath);
        let (s, _) = ns.create(Some("heap/s"), &opts(16 << 10)).expect("create");
        let mine = s.allocate(1000, 64).expect("the VM allocates");
        assert_eq!(mine.offset % 64, 0);
        s.write_at(mine.offset, b"vm's block").expect("write");
        let h = host.open("heap/s").expect("host opens");
        let theirs = h.allocate(1000, 64).expect("the host allocates");
        let (a, b_) = (mine.offset..mine.offset + mine.size, theirs.offset);
        assert!(!a.contains(&b_), "disjoint blocks: {mine:?} {theirs:?}");
        let mut buf = [0u8; 10];
        h.read_at(mine.offset, &mut buf)
            .expect("host reads the VM's block");
        assert_eq!(&buf, b"vm's block");
        let stats = s.block_stats().expect("stats").expect("a heap");
        assert_eq!(stats.count, 2, "both see both blocks");
        // Either may free what the other allocated (persistent blocks are shared data).
        h.free(mine).expect("host frees the VM's block");
        s.free(theirs).expect("the VM frees the host's block");
        assert_eq!(s.block_stats().expect("stats").expect("a heap").count, 0);
        // A double free is refused and changes nothing.
        assert!(s.free(theirs).is_err());
    });
}

#[test]
fn an_allocation_that_does_not_fit_grows_the_section_over_the_device_and_catches_up_with_others_growth(
) {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "16M"]);
        let host = b.connect();
        let ns = device(&vpath);
        let (s, _) = ns.create(Some("grow/s"), &opts(8 << 10)).expect("create");
        let small = s.allocate(64, 8).expect("first");
        let big = s.allocate(64 << 10, 8).expect("one that needs a grow");
        assert!(s.size() > 64 << 10, "grown to {}", s.size());
        s.write_at(big.offset + (64 << 10) - 4, b"tail")
            .expect("the grown pages are mapped");
        // The host grows it further by allocating; the VM's next allocation catches up.
        let h = host.open("grow/s").expect("host opens");
        let huge = h.allocate(256 << 10, 8).expect("host's big block");
        let size_before = s.size();
        let after = s.allocate(128 << 10, 8).expect("after the host's growth");
        assert!(s.size() > size_before, "the VM caught up with the growth");
        for blk in [small, big, after] {
            s.free(blk).expect("free");
        }
        h.free(huge).expect("free");
    });
}

#[test]
fn blocks_owned_by_a_departed_peer_are_freed_by_the_next_allocator_user_on_the_other_transport() {
    watchdog(LIMIT, || {
        let (b, vpath) = Backend::start_with_vhost_user(&["--size", "16M"]);
        let keeper = b.connect();
        let (_k, _) = keeper
            .create(
                Some("own/s"),
                &CreateOptions {
                    persistent: true,
                    ..opts(64 << 10)
                },
            )
            .expect("create");
        let owned = AllocOptions { owned: true };

        // A VM's owned block goes once the VM is gone: the ivshmem peer's next op frees it.
        {
            let ns = device(&vpath);
            let s = ns.open("own/s").expect("VM opens");
            s.allocate_with(4096, 8, owned).expect("VM's owned block");
            assert_eq!(s.block_stats().expect("stats").expect("heap").count, 1);
        }
        let h = keeper.open("own/s").expect("host opens");
        assert!(
            wait_for(Duration::from_secs(10), || {
                let blk = h.allocate(16, 8).expect("host allocates");
                h.free(blk).expect("free");
                h.block_stats().expect("stats").expect("heap").count == 0
            }),
            "the departed VM's owned block was freed"
        );

        // An ivshmem peer's owned block goes once it is gone: the VM's next op frees it.
        let ns = device(&vpath);
        let s = ns.open("own/s").expect("VM opens");
        {
            let other = b.connect();
            let o = other.open("own/s").expect("peer opens");
            o.allocate_with(4096, 8, owned).expect("peer's owned block");
        }
        assert!(
            wait_for(Duration::from_secs(10), || {
                let blk = s.allocate(16, 8).expect("VM allocates");
                s.free(blk).expect("free");
                s.block_stats().expect("stats").expect("heap").count == 0
            }),
            "the departed ivshmem peer's owned block was freed by the VM"
        );
        // A live peer's owned block stays.
        let o2 = b.connect();
        let os = o2.open("own/s").expect("open");
        os.allocate_with(4096, 8, owned).expect("owned");
        for _ in 0..5 {
            let blk = s.allocate(16, 8).expect("VM allocates");
            s.free(blk).expect("free");
        }
        assert_eq!(
            s.block_stats().expect("stats").expect("heap").count,
            1,
            "a live owner's block is kept"
        );
    });
}
