//! Attacks on the host's side of mutexes: queue entries that outlive the waiter's hold, and
//! a peer that floods a mutex's queue with tokens.

use vshm_format::layout::{kind, mutex_word, op, Response};
use vshm_format::lease::{acquire, release, Released};
use vshm_format::{mailbox, sync};
use vshm_format::{ObjectSlot, PeerId, PeerSlot, Status};

use super::tests_sync::{arbiter, mutex_op, request, slot_of, target};
use super::Arbiter;
use crate::region::Region;

/// A mutex created by peer 1 and held by peers 1..=4.
fn held_mutex(a: &mut Arbiter<Region>) -> Response {
    let req = mailbox::create_sync_request(Some("mx"), kind::MUTEX, false, false);
    let m = request(a, 1, &req);
    assert_eq!(Status::from_code(m.status), Some(Status::Success));
    let (s, g) = target(&m);
    for id in 1..=4 {
        acquire(a.mem(), a.layout(), slot_of(id), s, g, false).expect("hold");
    }
    m
}

#[test]
fn a_queued_peer_that_closed_its_handle_is_never_handed_the_mutex() {
    let mut a = arbiter();
    let m = held_mutex(&mut a);
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 11), Status::Success);
    assert_eq!(mutex_op(&mut a, 2, op::LOCK, &m, 22), Status::Pending);
    assert_eq!(mutex_op(&mut a, 3, op::LOCK, &m, 33), Status::Pending);
    // Peer 2 leaves without CANCEL (an error path, or a guest process that died queued):
    // it holds the mutex no more, so it can never unlock it.
    let released = release(a.mem(), a.layout(), slot_of(2), ObjectSlot(m.slot));
    assert_eq!(released, Ok(Released::Held));
    a.sweep();
    assert_eq!(mutex_op(&mut a, 1, op::UNLOCK, &m, 11), Status::Success);
    let w = sync::sync_word(a.mem(), a.layout(), ObjectSlot(m.slot)).expect("word");
    assert_eq!(
        w & mutex_word::OWNER,
        mutex_word::owner(slot_of(3), 33),
        "handed to the next waiter that still holds the mutex, not to peer 2"
    );
}

#[test]
fn a_peer_cannot_grow_a_mutex_queue_without_bound() {
    let mut a = arbiter();
    let m = held_mutex(&mut a);
    assert_eq!(mutex_op(&mut a, 1, op::LOCK, &m, 1), Status::Success);
    let mut refused = 0;
    for token in 1..=3000 {
        if mutex_op(&mut a, 2, op::LOCK, &m, token) != Status::Pending {
            refused += 1;
        }
    }
    let queued = a.record_at(ObjectSlot(m.slot)).expect("record").queue.len();
    assert!(
        queued <= super::sync::MAX_QUEUED_PER_PEER,
        "{queued} entries queued by one peer"
    );
    assert!(refused > 0);
    // Other peers still queue.
    assert_eq!(mutex_op(&mut a, 3, op::LOCK, &m, 7), Status::Pending);
}

#[test]
fn a_peer_forging_dead_owners_is_counted_every_time_but_reported_once_a_second() {
    let mut a = arbiter();
    let m = held_mutex(&mut a);
    let (s, _) = target(&m);
    let _ = a.drain_events().count();
    // Peer 4 (slot 3) leaves; a peer then keeps forging owner words that name its slot.
    a.peer_gone(PeerId(4));
    let _ = a.drain_events().count();
    let forged = mutex_word::owner(PeerSlot(3), 99);
    for _ in 0..50 {
        let _ = sync::mutex_swap_word(a.mem(), a.layout(), s, 0, forged);
        a.sweep();
    }
    assert_eq!(a.counters().abandoned, 50, "every release is counted");
    let reported = a.drain_events().filter(|e| e.kind == "abandoned").count();
    assert_eq!(reported, 1, "but reported at most once a second");
    assert_eq!(
        sync::sync_word(a.mem(), a.layout(), s),
        Ok(0),
        "and the mutex is free"
    );
}
