//! Found by the chaos scribbler (tests/tests/chaos.rs): the block allocator inside a section
//! decides that an owned block's owner is gone from the peer table alone
//! (`blocks::PeerTable::incarnation` → `peer::read_peer`, which answers `None` for an entry
//! that does not validate). A peer that scribbles over a live peer's table entry — which
//! vshmd heals, but only up to 200 ms later — makes the next allocator operation of any
//! other peer free the live peer's owned blocks and hand them out again: two honest peers
//! then share bytes, and the heal cannot undo it. Fixed: the library looks at a peer that
//! seems gone again for two heal periods before the allocator believes it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vshm::blocks::AllocOptions;
use vshm::host::HostTransport;
use vshm::{CreateOptions, Namespace, Transport};
use vshm_format::layout::PEER_STATE_OFF;
use vshm_format::shm::SharedMemory;
use vshm_tests::{watchdog, Backend};

#[test]
fn a_scribbled_peer_entry_does_not_hand_a_live_owners_blocks_to_another_peer() {
    watchdog(Duration::from_secs(60), || {
        let b = Backend::start(&["--size", "4M"]);
        let owner = b.connect();
        let (pool, _) = owner
            .create(
                Some("pool"),
                &CreateOptions {
                    max_size: 64 << 10,
                    initial_size: 64 << 10,
                    persistent: true,
                },
            )
            .expect("pool");
        let mine = pool
            .allocate_with(1024, 16, AllocOptions { owned: true })
            .expect("owner's block");
        pool.write_at(mine.offset, &[0xAA; 1024]).expect("fill");
        let me = owner.peer_id();
        let slot = owner
            .peers()
            .find(|p| p.peer_id == me)
            .map(|p| p.slot)
            .expect("owner's slot");

        let other = b.connect();
        let theirs_pool = other.open("pool").expect("open pool");
        let evil =
            Namespace::attach(HostTransport::connect(&b.socket).expect("connect")).expect("attach");
        let entry = evil.layout().peer_entry(slot).expect("peer entry");
        // One word: the owner's entry no longer validates (state 7 is no known state).
        evil.transport()
            .region()
            .store_u32(entry + PEER_STATE_OFF, 7, Ordering::SeqCst)
            .expect("scribble");
        // Before vshmd's next heal: another honest peer allocates in the same section.
        let theirs = theirs_pool
            .allocate_with(1024, 16, AllocOptions { owned: true })
            .expect("other's block");
        theirs_pool
            .write_at(theirs.offset, &[0xBB; 1024])
            .expect("fill");

        let disjoint =
            theirs.offset + theirs.size <= mine.offset || mine.offset + mine.size <= theirs.offset;
        let mut buf = [0u8; 1024];
        pool.read_at(mine.offset, &mut buf).expect("read");
        assert!(
            disjoint && buf.iter().all(|&x| x == 0xAA),
            "the live owner's block {mine:?} was handed to another peer as {theirs:?}; \
             the owner now reads {:#04x}",
            buf[0]
        );
    });
}
