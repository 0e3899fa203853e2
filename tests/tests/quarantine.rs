//! Scenario 5 of issue #9 with a real vshmd and real host peers: an intruder zeroes an
//! honest holder's refcount cell, stores CLOSED into the lease word and rings. vshmd cannot
//! tell that from an honest last close and destroys the section — but its memory stays in
//! quarantine until every peer has checked its holds (FORMAT.md §11a). The victim's library
//! finds its hold revoked, fences the range off from its own mapping, and only then
//! acknowledges; so the intruder's next create never shares bytes with the victim.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vshm::host::{HostTransport, Mapping};
use vshm::{CreateOptions, Error, Namespace, Transport};
use vshm_format::layout::{Layout, LEASE_CLOSED, OBJ_LEASE_OFF, VECTOR_CONTROL};
use vshm_format::shm::SharedMemory;
use vshm_format::{ObjectSlot, PeerId};
use vshm_tests::{wait_for, watchdog, Backend};

const LIMIT: Duration = Duration::from_secs(60);
const SIZE: u64 = 64 * 1024;

/// A peer that maps the region and writes wherever it likes.
struct Intruder {
    transport: HostTransport,
    map: Mapping,
    layout: Layout,
}

impl Intruder {
    fn new(b: &Backend, layout: Layout) -> Intruder {
        let transport = HostTransport::connect(&b.socket).expect("connect");
        let map = vshm_tests::map(transport.memfd());
        Intruder {
            transport,
            map,
            layout,
        }
    }

    /// Makes `slot` look closed by its last holder, `victim`, and rings vshmd.
    fn forge_last_close(&self, victim: vshm_format::PeerSlot, slot: ObjectSlot) {
        let mem = self.map.region();
        let cell = self.layout.refcount_cell(victim, slot).expect("cell");
        let lease = self.layout.object_entry(slot).expect("entry") + OBJ_LEASE_OFF;
        mem.store_u32(cell, 0, Ordering::SeqCst)
            .expect("zero the cell");
        mem.store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
            .expect("store CLOSED");
        self.transport
            .ring(PeerId::HOST, VECTOR_CONTROL)
            .expect("ring");
    }
}

fn counter(b: &Backend, name: &str) -> u64 {
    b.status()["counters"][name].as_u64().expect("counter")
}

fn victim_slot(ns: &Namespace<HostTransport>) -> vshm_format::PeerSlot {
    ns.peers()
        .find(|p| p.peer_id == ns.peer_id())
        .expect("own peer entry")
        .slot
}

#[test]
fn a_forged_last_close_never_makes_the_victims_memory_someone_elses() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let victim = b.connect();
        let (precious, _) = victim
            .create(Some("precious"), &CreateOptions::new(SIZE))
            .expect("create");
        precious.write_at(0, &[0xAA; 4096]).expect("write");
        let intruder = Intruder::new(&b, *victim.layout());
        intruder.forge_last_close(victim_slot(&victim), precious.slot());

        // vshmd destroys it (the header says nobody holds it) ...
        assert!(
            wait_for(Duration::from_secs(5), || b.section("precious").is_none()),
            "the forged close destroyed the section"
        );
        // ... and the victim's library, rung, finds out without being called.
        assert!(
            wait_for(Duration::from_secs(5), || victim.revoked_handles() == 1),
            "the victim's audit found the revoked hold"
        );
        assert!(precious.is_revoked());
        assert!(matches!(
            precious.read_at(0, &mut [0; 16]),
            Err(Error::Revoked { .. })
        ));
        assert!(
            wait_for(Duration::from_secs(5), || counter(&b, "revoked_handles")
                == 1),
            "vshmd counted the victim's report"
        );

        // The intruder creates at once: whatever range it gets, the victim's accesses to
        // its old section never reach it.
        let other = b.connect();
        let (loot, _) = other
            .create(Some("loot"), &CreateOptions::new(SIZE))
            .expect("create");
        loot.write_at(0, &[0x55; 4096]).expect("write");
        let p = precious.as_ptr();
        for i in 0..4096 {
            // SAFETY: the victim's old section lies inside its mapping (now fenced to
            // private pages); writing there is what a victim unaware of the revocation does.
            unsafe { p.add(i).write_volatile(0xEE) };
        }
        let mut seen = vec![0u8; 4096];
        loot.read_at(0, &mut seen).expect("read");
        assert!(
            seen.iter().all(|&x| x == 0x55),
            "the victim's writes reached the new section"
        );
        // Closing the revoked handle touches nothing shared.
        precious.close().expect("close a revoked handle");
        assert!(b.section("loot").is_some());
        // The victim can use the namespace as before, and memory it is handed again is
        // shared once more (its fenced range is mapped back when it holds it anew).
        drop(loot);
        let (fresh, _) = victim
            .create(Some("fresh"), &CreateOptions::new(SIZE))
            .expect("create after a revocation");
        fresh.write_at(0, b"after").expect("write");
        let seen_by_other = other.open("fresh").expect("open");
        let mut buf = [0u8; 5];
        seen_by_other.read_at(0, &mut buf).expect("read");
        assert_eq!(&buf, b"after");
    });
}

#[test]
fn memory_freed_by_an_honest_close_is_reused_once_every_peer_has_acknowledged() {
    watchdog(LIMIT, || {
        // A long quarantine: only acknowledgements can release it within the test.
        let b = Backend::start(&["--size", "4M", "--quarantine-ms", "600000"]);
        let a = b.connect();
        let _watcher = b.connect();
        let (s, _) = a
            .create(Some("first"), &CreateOptions::new(SIZE))
            .expect("create");
        let first = s.offset();
        drop(s);
        assert!(
            wait_for(Duration::from_secs(5), || {
                b.status()["region"]["quarantined"].as_u64() == Some(0)
            }),
            "both peers acknowledged: {}",
            b.status()["region"]
        );
        assert!(counter(&b, "quarantine_acked") >= 1);
        let (again, _) = a
            .create(Some("second"), &CreateOptions::new(SIZE))
            .expect("create");
        assert_eq!(again.offset(), first, "the range was released for reuse");
        assert_eq!(a.revoked_handles(), 0, "an honest close revokes nothing");
    });
}

#[test]
fn a_revoke_seq_scribbled_to_the_next_value_does_not_hide_the_revocation_from_the_victim() {
    watchdog(LIMIT, || {
        let b = Backend::start(&["--size", "4M"]);
        let victim = b.connect();
        let (precious, _) = victim
            .create(Some("precious"), &CreateOptions::new(SIZE))
            .expect("create");
        let intruder = Intruder::new(&b, *victim.layout());
        // The intruder publishes the value the next destroy will have, and lets the victim
        // audit it (nothing is revoked yet), so the real destroy's audit looks done.
        let mem = intruder.map.region();
        let next = vshm_format::revoke::revoke_seq(&mem).expect("seq") + 1;
        vshm_format::revoke::publish_revoke_seq(&mem, next).expect("scribble");
        victim.audit();
        intruder.forge_last_close(victim_slot(&victim), precious.slot());
        assert!(
            wait_for(Duration::from_secs(5), || b.section("precious").is_none()),
            "destroyed"
        );
        // Created at once: the victim has not confirmed yet, the range is still held.
        let other = b.connect();
        let (loot, _) = other
            .create(Some("loot"), &CreateOptions::new(SIZE))
            .expect("create");
        assert_ne!(loot.offset(), precious.offset());
        assert!(
            wait_for(Duration::from_secs(5), || precious.is_revoked()),
            "the victim's periodic check found the revocation"
        );
        assert_eq!(victim.revoked_handles(), 1);
    });
}
