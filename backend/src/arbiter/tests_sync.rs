//! Unit tests of events and mutexes on the host side, on a real memfd region with requests
//! posted through the peers' mailboxes: CREATE of the new kinds and kind clashes, WAKE's
//! ring outbox, the mutex queue (grant, FIFO handoff, cancel, deadlock, not-owned),
//! abandonment on reclaim and the sweep's release of forged owner words.

use std::sync::atomic::Ordering;

use vshm_format::layout::{
    kind, mutex_word, object_flags, op, Layout, Request, Response, VECTOR_CONTROL, VECTOR_WAKE,
};
use vshm_format::lease::{acquire, release, Released};
use vshm_format::shm::SharedMemory;
use vshm_format::{mailbox, object, sync};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, Status};

use super::Arbiter;
use crate::region::Region;

/// A region with 4 peer slots and `vectors` vectors, peers 1..=`peers` connected (peer id
/// `n` in slot `n - 1`).
fn arbiter_with(peers: u16, vectors: u32) -> Arbiter<Region> {
    let region = Region::create(1 << 20, false, false).expect("memfd");
    let layout = Layout::compute(1 << 20, 4, 8, vectors, 4096).expect("layout");
    let mut a = Arbiter::new(region, layout, 1, [0; 16]).expect("arbiter");
    for id in 1..=peers {
        a.peer_connected(PeerId(id)).expect("connect");
    }
    a
}

pub(super) fn arbiter() -> Arbiter<Region> {
    arbiter_with(4, 2)
}

pub(super) fn slot_of(id: u16) -> PeerSlot {
    PeerSlot(u32::from(id) - 1)
}

pub(super) fn request(a: &mut Arbiter<Region>, id: u16, req: &Request) -> Response {
    let slot = slot_of(id);
    let seq = mailbox::post(a.mem(), a.layout(), slot, req).expect("post");
    assert!(a.service(PeerId(id)), "answered");
    mailbox::poll(a.mem(), a.layout(), slot, seq)
        .expect("poll")
        .expect("response")
}

pub(super) fn status(r: &Response) -> Option<Status> {
    Status::from_code(r.status)
}

fn create(a: &mut Arbiter<Region>, id: u16, name: &str, k: u32) -> Response {
    let req = if k == kind::SECTION {
        mailbox::create_request(Some(name), k, 8192, 4096, false)
    } else {
        mailbox::create_sync_request(Some(name), k, false, false)
    };
    request(a, id, &req)
}

pub(super) fn target(r: &Response) -> (ObjectSlot, Generation) {
    (ObjectSlot(r.slot), Generation(r.generation))
}

/// Peer `id` takes a handle on the object.
fn hold(a: &Arbiter<Region>, id: u16, r: &Response) {
    let (s, g) = target(r);
    acquire(a.mem(), a.layout(), slot_of(id), s, g, false).expect("hold");
}

/// Peer `id` closes its last handle on the object, and the host sweeps.
fn close(a: &mut Arbiter<Region>, id: u16, r: &Response) {
    let closed = release(a.mem(), a.layout(), slot_of(id), ObjectSlot(r.slot));
    assert_eq!(closed, Ok(Released::LastHold));
    a.sweep();
}

pub(super) fn mutex_op(
    a: &mut Arbiter<Region>,
    id: u16,
    code: u32,
    r: &Response,
    token: u32,
) -> Status {
    let (s, g) = target(r);
    let resp = request(a, id, &mailbox::mutex_request(code, s, g, token));
    status(&resp).expect("a known status")
}

fn word(a: &Arbiter<Region>, r: &Response) -> u64 {
    sync::sync_word(a.mem(), a.layout(), ObjectSlot(r.slot)).expect("word")
}

fn owner(id: u16, token: u32) -> u64 {
    mutex_word::owner(slot_of(id), token)
}

fn rings(a: &mut Arbiter<Region>) -> Vec<(PeerId, u16)> {
    a.drain_rings().collect()
}

/// A mutex created by peer 1 and held by peers 1..=4.
fn held_mutex(a: &mut Arbiter<Region>, name: &str) -> Response {
    let m = create(a, 1, name, kind::MUTEX);
    assert_eq!(status(&m), Some(Status::Success));
    for id in 1..=4 {
        hold(a, id, &m);
    }
    m
}

#[test]
fn events_and_mutexes_are_created_without_heap_memory_and_publish_their_flags() {
    let mut a = arbiter();
    let heap = a.status().region.free;
    let req = mailbox::create_sync_request(Some("ev"), kind::EVENT, false, true);
    let ev = request(&mut a, 1, &req);
    assert_eq!(status(&ev), Some(Status::Success));
    assert_eq!((ev.offset, ev.size, ev.max_size), (0, 0, 0));
    let m = create(&mut a, 1, "mx", kind::MUTEX);
    assert_eq!(status(&m), Some(Status::Success));
    assert_eq!(a.status().region.free, heap, "nothing reserved");
    let e = object::snapshot(a.mem(), a.layout(), ObjectSlot(ev.slot), true).expect("entry");
    assert_eq!(e.kind, kind::EVENT);
    assert_ne!(
        e.flags & object_flags::MANUAL_RESET,
        0,
        "manual reset published"
    );
    assert!(
        object::read_object(a.mem(), a.layout(), ObjectSlot(ev.slot))
            .expect("valid")
            .is_some()
    );
    let e = object::snapshot(a.mem(), a.layout(), ObjectSlot(m.slot), true).expect("entry");
    assert_eq!(
        (e.kind, e.flags & object_flags::MANUAL_RESET),
        (kind::MUTEX, 0)
    );
    // Deleted and closed by their last holder, they are destroyed and give nothing back to
    // the heap.
    for r in [&ev, &m] {
        hold(&a, 1, r);
        let (s, g) = target(r);
        let d = request(&mut a, 1, &mailbox::delete_request(s, g));
        assert_eq!(status(&d), Some(Status::Success));
        close(&mut a, 1, r);
        assert!(a.record_at(s).is_none(), "destroyed");
    }
    assert_eq!(a.status().region.free, heap);
    assert_eq!(a.status().region.free_extents, 1, "no zero-length extent");
}

#[test]
fn a_name_is_never_two_kinds_for_every_pair_both_ways() {
    let kinds = [kind::SECTION, kind::EVENT, kind::MUTEX];
    for &first in &kinds {
        for &second in &kinds {
            let mut a = arbiter();
            let r = create(&mut a, 1, "shared-name", first);
            assert_eq!(status(&r), Some(Status::Success));
            let again = create(&mut a, 2, "shared-name", second);
            let expect = if first == second {
                Status::ObjectNameExists
            } else {
                Status::InvalidHandle
            };
            assert_eq!(status(&again), Some(expect), "{first} then {second}");
            if first == second {
                assert_eq!(again.slot, r.slot);
            }
        }
    }
}

#[test]
fn a_slot_reused_after_a_mutex_starts_with_zeroed_sync_words() {
    let mut a = arbiter();
    let m = create(&mut a, 1, "m", kind::MUTEX);
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 7), Status::Success);
    sync::register_waiter(a.mem(), a.layout(), ObjectSlot(m.slot), PeerSlot(2)).expect("wait");
    sync::mutex_mark_abandoned(a.mem(), a.layout(), ObjectSlot(m.slot)).expect("mark");
    hold(&a, 1, &m);
    let (s, g) = target(&m);
    request(&mut a, 1, &mailbox::delete_request(s, g));
    close(&mut a, 1, &m);
    assert!(a.record_at(s).is_none());
    let sec = create(&mut a, 1, "sec", kind::SECTION);
    assert_eq!(sec.slot, m.slot, "the lowest free slot is reused");
    let (mem, l) = (a.mem(), a.layout());
    assert_eq!(sync::sync_word(mem, l, s), Ok(0));
    assert_eq!(sync::waiters(mem, l, s), Ok(0));
    assert_eq!(sync::signal_seq(mem, l, s), Ok(0));
    assert_eq!(sync::mutex_take_abandoned(mem, l, s), Ok(false));
}

#[test]
fn growing_an_event_or_a_mutex_is_an_invalid_handle() {
    let mut a = arbiter();
    for (name, k) in [("e", kind::EVENT), ("m", kind::MUTEX)] {
        let r = create(&mut a, 1, name, k);
        let (s, g) = target(&r);
        let grown = request(&mut a, 1, &mailbox::grow_request(s, g, 4096));
        assert_eq!(status(&grown), Some(Status::InvalidHandle), "{name}");
    }
}

#[test]
fn wake_rings_exactly_the_waiting_holders_on_the_wake_vector() {
    let mut a = arbiter();
    let ev = create(&mut a, 1, "ev", kind::EVENT);
    hold(&a, 1, &ev);
    hold(&a, 2, &ev);
    hold(&a, 4, &ev);
    let s = ObjectSlot(ev.slot);
    // 2 holds and waits; 3 waits without holding; 4 holds without waiting.
    for p in [2, 3] {
        sync::register_waiter(a.mem(), a.layout(), s, slot_of(p)).expect("wait");
    }
    assert!(sync::event_set(a.mem(), a.layout(), s).expect("signal"));
    let w = request(
        &mut a,
        1,
        &mailbox::wake_request(s, Generation(ev.generation)),
    );
    assert_eq!(status(&w), Some(Status::Success));
    assert_eq!(rings(&mut a), vec![(PeerId(2), VECTOR_WAKE)]);
    assert_eq!(sync::waiters(a.mem(), a.layout(), s), Ok(0), "bits taken");
    assert_eq!(a.record_at(s).map(|r| r.wakes), Some(1));
    assert_eq!(a.counters().wakes, 1);
    let metrics = crate::metrics::render(&a.status(), a.request_stats());
    assert!(metrics.contains("vshm_wakes_total 1"), "{metrics}");
    assert!(metrics.contains("vshm_event_signals_total 1"), "{metrics}");
    // A peer that does not hold the object cannot make the host ring anyone.
    sync::register_waiter(a.mem(), a.layout(), s, slot_of(2)).expect("wait");
    let w = request(
        &mut a,
        3,
        &mailbox::wake_request(s, Generation(ev.generation)),
    );
    assert_eq!(status(&w), Some(Status::InvalidHandle));
    // Nor can a stale generation.
    let w = request(
        &mut a,
        1,
        &mailbox::wake_request(s, Generation(ev.generation + 1)),
    );
    assert_eq!(status(&w), Some(Status::InvalidHandle));
    assert!(rings(&mut a).is_empty());
}

#[test]
fn with_a_single_vector_wake_ups_go_out_on_vector_0() {
    let mut a = arbiter_with(2, 1);
    let ev = create(&mut a, 1, "ev", kind::EVENT);
    hold(&a, 2, &ev);
    let s = ObjectSlot(ev.slot);
    sync::register_waiter(a.mem(), a.layout(), s, slot_of(2)).expect("wait");
    request(
        &mut a,
        1,
        &mailbox::wake_request(s, Generation(ev.generation)),
    );
    assert_eq!(rings(&mut a), vec![(PeerId(2), VECTOR_CONTROL)]);
}

#[test]
fn a_mutex_is_granted_then_queued_and_handed_over_in_arrival_order() {
    let mut a = arbiter();
    let m = held_mutex(&mut a, "m");
    let s = ObjectSlot(m.slot);
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 11), Status::Success);
    assert_eq!(word(&a, &m), owner(1, 11));
    for id in [3, 2, 4] {
        assert_eq!(
            mutex_op(&mut a, id, op::LOCK, &m, 20 + u32::from(id)),
            Status::Pending
        );
    }
    assert_eq!(word(&a, &m), owner(1, 11) | mutex_word::HANDOFF);
    assert_eq!(a.record_at(s).map(|r| r.queue.len()), Some(3));
    assert!(rings(&mut a).is_empty());
    let seq0 = sync::signal_seq(a.mem(), a.layout(), s).expect("seq");
    // Each owner unlocks in turn: 3, then 2, then 4 get it, each rung on the wake vector.
    for (from, from_token, to, more) in [(1, 11, 3, true), (3, 23, 2, true), (2, 22, 4, false)] {
        assert_eq!(
            mutex_op(&mut a, from, op::UNLOCK, &m, from_token),
            Status::Success
        );
        let handoff = if more { mutex_word::HANDOFF } else { 0 };
        assert_eq!(word(&a, &m), owner(to, 20 + u32::from(to)) | handoff);
        assert_eq!(rings(&mut a), vec![(PeerId(to), VECTOR_WAKE)]);
    }
    assert_eq!(mutex_op(&mut a, 4, op::UNLOCK, &m, 24), Status::Success);
    assert_eq!(word(&a, &m), 0, "an empty queue frees it");
    assert_eq!(sync::signal_seq(a.mem(), a.layout(), s), Ok(seq0 + 4));
    assert_eq!(a.counters().handoffs, 3);
}

#[test]
fn only_the_owner_unlocks_and_the_owner_cannot_lock_again() {
    let mut a = arbiter();
    let m = held_mutex(&mut a, "m");
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 5), Status::Success);
    assert_eq!(
        mutex_op(&mut a, 1, op::LOCK, &m, 5),
        Status::PossibleDeadlock
    );
    assert_eq!(
        mutex_op(&mut a, 2, op::UNLOCK, &m, 5),
        Status::MutantNotOwned
    );
    assert_eq!(word(&a, &m), owner(1, 5), "unchanged");
    // Another thread (token) of the owner's peer is not the owner: it queues.
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 6), Status::Pending);
    // A free mutex cannot be unlocked at all.
    let free = held_mutex(&mut a, "free");
    assert_eq!(
        mutex_op(&mut a, 1, op::UNLOCK, &free, 5),
        Status::MutantNotOwned
    );
    // Mutex operations on an event are invalid handles.
    let ev = create(&mut a, 1, "ev", kind::EVENT);
    for code in [op::LOCK, op::UNLOCK, op::CANCEL] {
        assert_eq!(mutex_op(&mut a, 1, code, &ev, 5), Status::InvalidHandle);
    }
}

#[test]
fn a_peer_that_does_not_hold_a_mutex_cannot_lock_it_through_the_host() {
    let mut a = arbiter();
    let m = create(&mut a, 1, "m", kind::MUTEX);
    assert_eq!(mutex_op(&mut a, 2, op::LOCK, &m, 5), Status::InvalidHandle);
    assert_eq!(word(&a, &m), 0);
}

#[test]
fn an_unlock_on_behalf_of_a_dead_process_of_the_same_peer_marks_it_abandoned() {
    let mut a = arbiter();
    let m = held_mutex(&mut a, "m");
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 100), Status::Success);
    assert_eq!(mutex_op(&mut a, 2, op::LOCK, &m, 7), Status::Pending);
    assert_eq!(mutex_op(&mut a, 1, op::UNLOCK, &m, 101), Status::Success);
    assert_eq!(word(&a, &m), owner(2, 7));
    let s = ObjectSlot(m.slot);
    assert_eq!(sync::mutex_take_abandoned(a.mem(), a.layout(), s), Ok(true));
    assert_eq!(a.record_at(s).map(|r| r.abandoned), Some(1));
}

/// UNLOCK on behalf of a dead owner, naming the owner the poster saw.
fn unlock_on_behalf(
    a: &mut Arbiter<Region>,
    id: u16,
    m: &Response,
    token: u32,
    dead: u32,
) -> Status {
    let req = mailbox::unlock_on_behalf_request(
        ObjectSlot(m.slot),
        Generation(m.generation),
        token,
        dead,
    );
    status(&request(a, id, &req)).expect("a status")
}

#[test]
fn a_stale_unlock_on_behalf_of_a_dead_owner_leaves_the_mutex_with_its_new_live_owner() {
    let mut a = arbiter();
    let m = held_mutex(&mut a, "m");
    // Thread 100 of peer 1 owns it; threads 7 and 8 (also of peer 1) are queued.
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 100), Status::Success);
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 7), Status::Pending);
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 8), Status::Pending);
    // 100 dies; the guest driver releases it on its behalf: abandoned, handed to 7.
    assert_eq!(
        unlock_on_behalf(&mut a, 1, &m, 0x3FFF_FFFF, 100),
        Status::Success
    );
    assert_eq!(word(&a, &m) & mutex_word::OWNER, owner(1, 7));
    // Thread 8 saw 100 dead too and posts its own release on 100's behalf, late: the
    // mutex moved on, so nothing happens to 7 ...
    assert_eq!(
        unlock_on_behalf(&mut a, 1, &m, 8, 100),
        Status::MutantNotOwned
    );
    assert_eq!(word(&a, &m) & mutex_word::OWNER, owner(1, 7));
    // ... and had it been handed to 8 itself, its stale request would not count as 8's
    // own unlock either.
    assert_eq!(mutex_op(&mut a, 1, op::UNLOCK, &m, 7), Status::Success);
    assert_eq!(word(&a, &m) & mutex_word::OWNER, owner(1, 8));
    assert_eq!(
        unlock_on_behalf(&mut a, 1, &m, 8, 100),
        Status::MutantNotOwned
    );
    assert_eq!(word(&a, &m) & mutex_word::OWNER, owner(1, 8));
}

#[test]
fn a_cancelled_waiter_is_skipped() {
    let mut a = arbiter();
    let m = held_mutex(&mut a, "m");
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 1), Status::Success);
    assert_eq!(mutex_op(&mut a, 2, op::LOCK, &m, 2), Status::Pending);
    assert_eq!(mutex_op(&mut a, 3, op::LOCK, &m, 3), Status::Pending);
    assert_eq!(mutex_op(&mut a, 2, op::CANCEL, &m, 2), Status::Success);
    assert_eq!(
        mutex_op(&mut a, 2, op::CANCEL, &m, 2),
        Status::Success,
        "twice"
    );
    assert_eq!(mutex_op(&mut a, 1, op::UNLOCK, &m, 1), Status::Success);
    assert_eq!(word(&a, &m), owner(3, 3), "3 without HANDOFF: 2 left");
    // The last waiter cancelling clears HANDOFF, so the owner can unlock on its own.
    assert_eq!(mutex_op(&mut a, 4, op::LOCK, &m, 4), Status::Pending);
    assert_eq!(word(&a, &m), owner(3, 3) | mutex_word::HANDOFF);
    assert_eq!(mutex_op(&mut a, 4, op::CANCEL, &m, 4), Status::Success);
    assert_eq!(word(&a, &m), owner(3, 3));
}

#[test]
fn a_reclaimed_owner_abandons_the_mutex_to_the_next_queued_waiter() {
    let mut a = arbiter();
    let m = held_mutex(&mut a, "m");
    let s = ObjectSlot(m.slot);
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 1), Status::Success);
    assert_eq!(mutex_op(&mut a, 2, op::LOCK, &m, 2), Status::Pending);
    assert_eq!(mutex_op(&mut a, 3, op::LOCK, &m, 3), Status::Pending);
    a.drain_events().for_each(drop);
    a.peer_gone(PeerId(1));
    assert_eq!(word(&a, &m), owner(2, 2) | mutex_word::HANDOFF);
    assert_eq!(rings(&mut a), vec![(PeerId(2), VECTOR_WAKE)]);
    assert_eq!(a.record_at(s).map(|r| r.abandoned), Some(1));
    assert_eq!(a.counters().abandoned, 1);
    let events: Vec<_> = a.drain_events().collect();
    let ab = events
        .iter()
        .find(|e| e.kind == "abandoned")
        .expect("an abandoned event");
    assert_eq!((ab.peer, ab.name.as_deref()), (Some(1), Some("m")));
    assert_eq!(sync::mutex_take_abandoned(a.mem(), a.layout(), s), Ok(true));
    let st = a.status();
    let row = st.sections.iter().find(|r| r.slot == m.slot).expect("row");
    assert_eq!(
        (row.owner, row.queued, row.abandoned),
        (Some(Some(2)), Some(1), Some(1))
    );
    let metrics = crate::metrics::render(&st, a.request_stats());
    assert!(
        metrics.contains("vshm_mutex_abandoned_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("vshm_mutex_handoffs_total 1"), "{metrics}");
}

#[test]
fn a_queued_waiter_that_is_reclaimed_is_never_granted() {
    let mut a = arbiter();
    let m = held_mutex(&mut a, "m");
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 1), Status::Success);
    assert_eq!(mutex_op(&mut a, 2, op::LOCK, &m, 2), Status::Pending);
    assert_eq!(mutex_op(&mut a, 3, op::LOCK, &m, 3), Status::Pending);
    a.peer_gone(PeerId(2));
    // A new peer takes the freed slot 1 (slot order: freed longest ago, 1 is the only one).
    assert_eq!(a.peer_connected(PeerId(9)), Ok(PeerSlot(1)));
    assert_eq!(mutex_op(&mut a, 1, op::UNLOCK, &m, 1), Status::Success);
    assert_eq!(word(&a, &m), owner(3, 3));
    a.peer_gone(PeerId(3));
    assert_eq!(word(&a, &m), 0, "3 abandoned it, nobody is queued: freed");
    assert_eq!(
        a.record_at(ObjectSlot(m.slot)).map(|r| r.abandoned),
        Some(1)
    );
}

#[test]
fn the_sweep_releases_a_mutex_whose_owner_word_names_a_dead_slot_or_nobody() {
    let mut a = arbiter_with(3, 2);
    let m = create(&mut a, 1, "m", kind::MUTEX);
    hold(&a, 1, &m);
    let s = ObjectSlot(m.slot);
    let off = a.layout().object_entry(s).expect("entry") + vshm_format::layout::OBJ_SYNC_OFF;
    // Slot 3 is not connected: a forged owner.
    a.mem()
        .store_u64(off, mutex_word::owner(PeerSlot(3), 9), Ordering::SeqCst)
        .expect("forge");
    a.sweep();
    assert_eq!(word(&a, &m), 0);
    assert_eq!(a.record_at(s).map(|r| r.abandoned), Some(1));
    assert_eq!(sync::mutex_take_abandoned(a.mem(), a.layout(), s), Ok(true));
    // Garbage does not panic and is released too; the mutex works afterwards.
    for junk in [u64::MAX, mutex_word::HANDOFF, 0xFF, 0x1234_5600] {
        a.mem()
            .store_u64(off, junk, Ordering::SeqCst)
            .expect("scribble");
        assert_eq!(
            mutex_op(&mut a, 1, op::UNLOCK, &m, 1),
            Status::MutantNotOwned
        );
        a.sweep();
        assert_eq!(word(&a, &m), 0, "{junk:#x}");
    }
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 1), Status::Success);
    a.sweep();
    assert_eq!(word(&a, &m), owner(1, 1), "a connected owner keeps it");
}
