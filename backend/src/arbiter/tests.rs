//! Unit tests of the arbiter on a real memfd region: reclaiming a departed peer, repairing
//! forged lease words, name reuse before a reap, requests from peers that are not connected,
//! fencing.

use std::sync::atomic::Ordering;

use vshm_format::layout::{
    holder_bit, kind, Layout, Request, Response, LEASE_CLOSED, LEASE_KEEP, MB_RESPONSE_OFF,
    OBJ_LEASE_OFF,
};
use vshm_format::lease::{acquire, release, Released};
use vshm_format::mailbox;
use vshm_format::shm::SharedMemory;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, Status};

use super::{Arbiter, ConnectError, Reclaim};
use crate::region::Region;

pub(super) fn arbiter() -> Arbiter<Region> {
    let region = Region::create(1 << 20, false, false).expect("memfd");
    let layout = Layout::compute(1 << 20, 4, 8, 1, 4096).expect("layout");
    let mut a = Arbiter::new(region, layout, 1, [0; 16]).expect("arbiter");
    for id in 1..=3 {
        a.peer_connected(PeerId(id)).expect("connect");
    }
    a
}

pub(super) fn request(a: &mut Arbiter<Region>, peer_id: PeerId, req: &Request) -> Response {
    let slot = PeerSlot(u32::from(peer_id.raw()) - 1);
    let mem = a.mem();
    let seq = mailbox::post(mem, a.layout(), slot, req).expect("post");
    assert!(a.service(peer_id), "answered");
    let mb = a.layout().mailbox(slot).expect("mailbox");
    assert_eq!(
        a.mem().load_u64(mb + MB_RESPONSE_OFF, Ordering::Acquire),
        Ok(seq)
    );
    mailbox::poll(a.mem(), a.layout(), slot, seq)
        .expect("poll")
        .expect("response")
}

pub(super) fn create(
    a: &mut Arbiter<Region>,
    peer_id: PeerId,
    name: &str,
    persistent: bool,
) -> Response {
    let r = mailbox::create_request(Some(name), kind::SECTION, 8192, 4096, persistent);
    request(a, peer_id, &r)
}

#[test]
fn a_departed_peers_holds_are_reclaimed_and_what_only_it_held_is_destroyed() {
    let mut a = arbiter();
    let only = create(&mut a, PeerId(1), "only-1", false);
    let shared = create(&mut a, PeerId(1), "shared", false);
    let (l, m) = (*a.layout(), a.mem());
    acquire(
        m,
        &l,
        PeerSlot(0),
        ObjectSlot(only.slot),
        Generation(only.generation),
        false,
    )
    .expect("hold");
    acquire(
        m,
        &l,
        PeerSlot(0),
        ObjectSlot(shared.slot),
        Generation(shared.generation),
        false,
    )
    .expect("hold");
    acquire(
        m,
        &l,
        PeerSlot(1),
        ObjectSlot(shared.slot),
        Generation(shared.generation),
        false,
    )
    .expect("peer 2 holds");
    let out = a.peer_gone(PeerId(1));
    assert_eq!(
        out,
        Reclaim {
            handles: 2,
            destroyed: 1
        }
    );
    assert!(a.record_at(ObjectSlot(only.slot)).is_none(), "destroyed");
    assert!(
        a.record_at(ObjectSlot(shared.slot)).is_some(),
        "peer 2 still holds it"
    );
    // Peers 2 and 3 were connected when `only` died: its memory waits for their word
    // (§11a); one acknowledgement is not enough.
    assert_eq!(a.status().region.quarantined, 8192);
    assert_eq!(
        a.status().region.free,
        a.status().region.heap_size - 2 * 8192
    );
    let seq = vshm_format::revoke::revoke_seq(a.mem()).expect("seq");
    a.acknowledged(PeerId(2), vshm_format::revoke::ack_ring_value(seq));
    a.sweep();
    assert_eq!(a.status().region.quarantined, 8192);
    a.acknowledged(PeerId(3), vshm_format::revoke::ack_ring_value(seq));
    a.sweep();
    assert_eq!(a.status().region.quarantined, 0);
    assert_eq!(a.status().region.free, a.status().region.heap_size - 8192);
    assert_eq!(
        a.mem().load_u32(
            l.refcount_cell(PeerSlot(0), ObjectSlot(shared.slot))
                .expect("cell"),
            Ordering::SeqCst
        ),
        Ok(0)
    );
}

#[test]
fn a_lease_closed_behind_the_holders_backs_is_repaired_not_destroyed() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "victim", false);
    let (l, m) = (*a.layout(), a.mem());
    acquire(
        m,
        &l,
        PeerSlot(0),
        ObjectSlot(r.slot),
        Generation(r.generation),
        false,
    )
    .expect("hold");
    // A misbehaving peer forges CLOSED into the lease word.
    let lease = l.object_entry(ObjectSlot(r.slot)).expect("slot") + OBJ_LEASE_OFF;
    m.store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
        .expect("forge");
    assert_eq!(a.sweep(), 0);
    assert!(
        a.record_at(ObjectSlot(r.slot)).is_some(),
        "the holder's section survives"
    );
    assert_eq!(a.counters().repairs, 1);
    assert_eq!(
        a.mem().load_u64(lease, Ordering::SeqCst),
        Ok(holder_bit(PeerSlot(0)))
    );
    assert_eq!(
        release(a.mem(), &l, PeerSlot(0), ObjectSlot(r.slot)),
        Ok(Released::LastHold)
    );
    assert_eq!(a.sweep(), 1);
}

#[test]
fn a_forged_close_of_a_persistent_section_nobody_holds_is_repaired() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "keep-me", true);
    let l = *a.layout();
    let lease = l.object_entry(ObjectSlot(r.slot)).expect("slot") + OBJ_LEASE_OFF;
    // The creator never took its hold; a peer forges CLOSED.
    a.mem()
        .store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
        .expect("forge");
    assert_eq!(a.sweep(), 0);
    assert!(
        a.record_at(ObjectSlot(r.slot)).is_some(),
        "persistent sections live until deleted"
    );
    assert_eq!(a.mem().load_u64(lease, Ordering::SeqCst), Ok(LEASE_KEEP));
    // And a KEEP bit stripped by a peer is put back.
    a.mem()
        .store_u64(lease, 0, Ordering::SeqCst)
        .expect("strip");
    assert_eq!(a.sweep(), 0);
    assert_eq!(a.mem().load_u64(lease, Ordering::SeqCst), Ok(LEASE_KEEP));
}

#[test]
fn create_reuses_a_name_whose_last_holder_closed_before_the_host_reaped_it() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "n", false);
    let l = *a.layout();
    acquire(
        a.mem(),
        &l,
        PeerSlot(0),
        ObjectSlot(r.slot),
        Generation(r.generation),
        false,
    )
    .expect("hold");
    assert_eq!(
        release(a.mem(), &l, PeerSlot(0), ObjectSlot(r.slot)),
        Ok(Released::LastHold)
    );
    // No sweep in between: the CREATE arrives first.
    let again = create(&mut a, PeerId(1), "n", false);
    assert_eq!(Status::from_code(again.status), Some(Status::Success));
    assert_ne!(again.generation, r.generation);
}

#[test]
fn holder_bits_of_absent_peers_are_dropped_by_the_sweep() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "stray", false);
    let l = *a.layout();
    let lease = l.object_entry(ObjectSlot(r.slot)).expect("slot") + OBJ_LEASE_OFF;
    // Peer 4 never connected, yet its bit appears (scribbled); peer 1 never took its hold.
    a.mem()
        .store_u64(lease, holder_bit(PeerSlot(3)), Ordering::SeqCst)
        .expect("scribble");
    assert_eq!(a.sweep(), 1, "no real holder left: destroyed");
    let region = a.status().region;
    assert_eq!(region.free + region.quarantined, region.heap_size);
}

#[test]
fn requests_of_a_peer_that_is_not_connected_are_ignored() {
    let mut a = arbiter();
    assert!(!a.service(PeerId(4)), "peer 4 is not connected");
    assert!(!a.service(PeerId(0)), "the host is not a client");
    assert!(!a.service(PeerId(999)), "junk id");
    a.peer_gone(PeerId(2));
    assert!(!a.service(PeerId(2)));
}

#[test]
fn a_fenced_peers_slot_and_the_memory_of_what_died_with_it_are_held_back_until_unfenced() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "doomed", false);
    let l = *a.layout();
    acquire(
        a.mem(),
        &l,
        PeerSlot(0),
        ObjectSlot(r.slot),
        Generation(r.generation),
        false,
    )
    .expect("hold");
    let heap = a.status().region.heap_size;
    assert_eq!(
        a.peer_gone_fenced(PeerId(9)),
        (Reclaim::default(), None),
        "not connected"
    );
    let (out, slot) = a.peer_gone_fenced(PeerId(1));
    assert_eq!(
        out,
        Reclaim {
            handles: 1,
            destroyed: 1
        }
    );
    assert_eq!(slot, Some(PeerSlot(0)));
    assert!(a.record_at(ObjectSlot(r.slot)).is_none(), "destroyed");
    assert_eq!(
        a.status().region.free,
        heap - 8192,
        "its memory is held back"
    );
    // Slot 3 is free and slot 0 fenced: the next peer gets 3, the one after finds none.
    assert_eq!(a.peer_connected(PeerId(4)), Ok(PeerSlot(3)));
    assert_eq!(a.peer_connected(PeerId(5)), Err(ConnectError::Full(4)));
    a.unfence(PeerSlot(0));
    assert_eq!(a.status().region.free, heap);
    assert_eq!(a.peer_connected(PeerId(5)), Ok(PeerSlot(0)));
}

/// Peer 1 creates `name`, holds it and closes its last handle: the object is unheld.
fn create_and_close(a: &mut Arbiter<Region>, name: &str) -> ObjectSlot {
    let r = create(a, PeerId(1), name, false);
    let l = *a.layout();
    let s = ObjectSlot(r.slot);
    acquire(a.mem(), &l, PeerSlot(0), s, Generation(r.generation), false).expect("hold");
    assert_eq!(release(a.mem(), &l, PeerSlot(0), s), Ok(Released::LastHold));
    s
}

fn live(a: &Arbiter<Region>) -> usize {
    a.status().sections.len()
}

#[test]
fn a_close_hint_that_explains_the_ring_destroys_that_object_without_a_sweep_of_the_table() {
    let mut a = arbiter();
    let _kept = create(&mut a, PeerId(2), "kept", true);
    let closed = create_and_close(&mut a, "closed");
    mailbox::hint_closed(a.mem(), a.layout(), PeerSlot(0), closed).expect("hint");
    let sweeps = a.counters().table_sweeps;
    assert_eq!(a.sweep_after_ring(PeerId(1), 1, false), 1, "destroyed");
    assert_eq!(a.counters().table_sweeps, sweeps, "no sweep of the table");
    assert_eq!(a.counters().hinted_closes, 1);
    assert_eq!(live(&a), 1, "only the persistent one is left");
    // The ring of an answered request plus the close's: explained too.
    let closed = create_and_close(&mut a, "closed-2");
    mailbox::hint_closed(a.mem(), a.layout(), PeerSlot(0), closed).expect("hint");
    assert_eq!(a.sweep_after_ring(PeerId(1), 2, true), 1);
    assert_eq!(a.counters().table_sweeps, sweeps);
    // A lone ring that carried the request just answered: nothing to look at.
    assert_eq!(a.sweep_after_ring(PeerId(1), 1, true), 0);
    assert_eq!(a.counters().table_sweeps, sweeps);
    // A fast peer: its close hinted while the host was serving the doorbell of its
    // request, so that doorbell counted one ring and the close's ring comes next.
    let closed = create_and_close(&mut a, "closed-3");
    mailbox::hint_closed(a.mem(), a.layout(), PeerSlot(0), closed).expect("hint");
    assert_eq!(a.sweep_after_ring(PeerId(1), 1, true), 1);
    assert_eq!(
        a.sweep_after_ring(PeerId(1), 1, false),
        0,
        "the close's own ring"
    );
    assert_eq!(
        a.counters().table_sweeps,
        sweeps,
        "still no sweep of the table"
    );
    assert_eq!(a.counters().hinted_closes, 3);
    // But a ring nothing accounts for is a close that did not hint: swept.
    assert_eq!(a.sweep_after_ring(PeerId(1), 1, false), 0);
    assert_eq!(a.counters().table_sweeps, sweeps + 1);
}

#[test]
fn a_close_hint_that_cannot_explain_every_ring_or_names_a_live_object_sweeps_the_table() {
    let mut a = arbiter();
    let kept = create(&mut a, PeerId(2), "kept", true);
    // Two closes, one hint (the second close's hint turned it into MANY).
    let first = create_and_close(&mut a, "a");
    mailbox::hint_closed(a.mem(), a.layout(), PeerSlot(0), first).expect("hint");
    let second = create_and_close(&mut a, "b");
    mailbox::hint_closed(a.mem(), a.layout(), PeerSlot(0), second).expect("hint");
    let sweeps = a.counters().table_sweeps;
    a.sweep_after_ring(PeerId(1), 2, false);
    assert_eq!(a.counters().table_sweeps, sweeps + 1);
    assert_eq!(live(&a), 1, "both destroyed");
    // A hint naming a held object (a scribble, or a peer lying): the object stays and the
    // close this ring really carried is found by the sweep.
    create_and_close(&mut a, "c");
    mailbox::hint_closed(a.mem(), a.layout(), PeerSlot(0), ObjectSlot(kept.slot))
        .expect("forged hint");
    assert_eq!(a.sweep_after_ring(PeerId(1), 1, false), 1);
    assert_eq!(a.counters().table_sweeps, sweeps + 2);
    assert_eq!(live(&a), 1, "the persistent object is untouched");
    // One hint explaining one of two rings: the other ring may be a close without a hint
    // (an older library), so the table is swept as well.
    let hinted = create_and_close(&mut a, "d");
    create_and_close(&mut a, "e");
    mailbox::hint_closed(a.mem(), a.layout(), PeerSlot(0), hinted).expect("hint");
    a.sweep_after_ring(PeerId(1), 2, false);
    assert_eq!(a.counters().table_sweeps, sweeps + 3);
    assert_eq!(live(&a), 1, "both destroyed");
}

#[test]
fn a_create_whose_name_does_not_fit_the_name_area_is_refused_cleanly_and_fits_once_room_is_freed() {
    let mut a = arbiter();
    // 8 objects: a name area of 8 × 64 = 512 bytes. A 300-byte name takes 304 of them.
    assert_eq!(a.layout().name_area_size, 512);
    let big = "é".repeat(150);
    let first = create(&mut a, PeerId(1), &big, false);
    assert_eq!(first.status, Status::Success.code());
    let other = format!("{big}!");
    let (free_slots, heap_free, names_free, seq) = (
        a.free_slots.len(),
        a.heap.free_bytes(),
        a.name_area.free_bytes(),
        vshm_format::object::namespace_seq(a.mem()).expect("seq"),
    );
    assert_eq!(names_free, 512 - 304);
    let region = a.status().region;
    assert_eq!(
        (region.name_area_size, region.name_area_free),
        (512, 512 - 304),
        "the status shows how full the name area is"
    );
    let refused = create(&mut a, PeerId(2), &other, false);
    assert_eq!(refused.status, Status::InsufficientResources.code());
    assert_eq!(
        mailbox::Refusal::from_response(&refused),
        Some(mailbox::Refusal::NameAreaFull {
            wanted: 304,
            largest: 208
        })
    );
    // No partial state: no slot, no heap, no name room, nothing published or indexed.
    assert_eq!(a.free_slots.len(), free_slots);
    assert_eq!(a.heap.free_bytes(), heap_free);
    assert_eq!(a.name_area.free_bytes(), names_free);
    assert_eq!(
        vshm_format::object::namespace_seq(a.mem()).expect("seq"),
        seq
    );
    assert_eq!(
        vshm_format::object::find_by_name(a.mem(), a.layout(), &other),
        Ok(None)
    );
    assert!(
        a.heal().is_clean(),
        "the refusal left the header as published"
    );
    // Unnamed objects need no name room.
    let unnamed = mailbox::create_request(None, kind::EVENT, 0, 0, false);
    assert_eq!(
        request(&mut a, PeerId(2), &unnamed).status,
        Status::Success.code()
    );
    // Deleted but still held (UNLINKED): the name keeps its room.
    let del = mailbox::delete_request(ObjectSlot(first.slot), Generation(first.generation));
    assert_eq!(
        request(&mut a, PeerId(1), &del).status,
        Status::Success.code()
    );
    assert!(a
        .record_at(ObjectSlot(first.slot))
        .is_some_and(|r| r.unlinked));
    assert_eq!(
        create(&mut a, PeerId(2), &other, false).status,
        Status::InsufficientResources.code()
    );
    // Destroyed (its only holder left): the room is free and the name fits.
    a.peer_gone(PeerId(1));
    a.sweep();
    assert!(a.record_at(ObjectSlot(first.slot)).is_none());
    assert_eq!(a.name_area.free_bytes(), 512);
    let second = create(&mut a, PeerId(2), &other, false);
    assert_eq!(second.status, Status::Success.code());
    let found = vshm_format::object::find_by_name(a.mem(), a.layout(), &other)
        .expect("lookup")
        .expect("found");
    assert_eq!(found.slot, ObjectSlot(second.slot));
    assert!(a.heal().is_clean());
}
