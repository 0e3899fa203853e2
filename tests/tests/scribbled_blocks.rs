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
use vshm_format::layout::{OBJ_SIZE_OFF, PEER_STATE_OFF};
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

/// Found by the long header-scribbler run: the allocator tiled its arena up to the size it
/// read from the section's object entry. A scribble that made that size larger for the
/// moment made an honest peer tile blocks past the section's real end; once vshmd healed the
/// size, the arena (which never shrinks) reached past the section, every later lock of the
/// allocator found it "stale" and waited out the whole lock timeout — for good. Fixed: the
/// arena grows only to a size vshmd vouched for in a GROW reply.
#[test]
fn a_scribbled_section_size_never_makes_the_allocator_outgrow_its_section() {
    watchdog(Duration::from_secs(60), || {
        let b = Backend::start(&["--size", "8M"]);
        let ns = b.connect();
        let (pool, _) = ns
            .create(
                Some("pool"),
                &CreateOptions {
                    max_size: 1 << 20,
                    initial_size: 64 << 10,
                    persistent: true,
                },
            )
            .expect("pool");
        let first = pool.allocate(1024, 16).expect("first block");
        let evil =
            Namespace::attach(HostTransport::connect(&b.socket).expect("connect")).expect("attach");
        let info = evil.info("pool").expect("info");
        let entry = evil.layout().object_entry(info.slot).expect("entry");
        // The size alone, as a scribble that misses the seqlock would leave it: the max.
        evil.transport()
            .region()
            .store_u64(entry + OBJ_SIZE_OFF, 1 << 20, Ordering::SeqCst)
            .expect("scribble");
        // Before vshmd's next heal: a block larger than the arena tiled so far.
        let big = pool.allocate(128 << 10, 16).expect("big block");
        // Once healed (vshmd heals every 200 ms), the section's size is what vshmd says, and
        // every block lies in it.
        std::thread::sleep(Duration::from_millis(600));
        let real = evil.info("pool").expect("info").size;
        assert!(
            big.offset + big.size <= real,
            "the block {big:?} lies past the section's end ({real} bytes)"
        );
        // And the allocator still works (before the fix: a lock timeout, for good).
        pool.free(first).expect("free after the heal");
        let again = pool.allocate(1024, 16).expect("allocate after the heal");
        assert!(again.offset + again.size <= real);
    });
}
