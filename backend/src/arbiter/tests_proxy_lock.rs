//! Unit tests of mutexes for proxied peers (vhost-user VMs' LOCK, docs/VHOST-USER.md
//! §5.1): vshmd queues the LOCK, a look completes it when the mutex is handed over, a
//! timeout takes it back, and departures on either side are handled as for any peer.

use vshm_format::layout::kind;
use vshm_format::mailbox::Command;
use vshm_format::{Generation, ObjectSlot, PeerId, Status};

use super::tests::arbiter;
use super::{Arbiter, Backing};

pub(super) const A: PeerId = PeerId(4);
pub(super) const B: PeerId = PeerId(5);
const TOKEN: u32 = 7;

/// A mutex "m" created by proxied peer A and opened by proxied peer B.
pub(super) fn mutex<M: Backing>(a: &mut Arbiter<M>) -> (ObjectSlot, Generation) {
    // The test arbiter has room for four peers and three connected.
    a.peer_gone(PeerId(3));
    a.proxy_connected(A).expect("proxy A");
    a.proxy_connected(B).expect("proxy B");
    let cmd = Command::Create {
        name: Some("m"),
        kind: kind::MUTEX,
        max_size: 0,
        initial_size: 0,
        persistent: true,
        manual_reset: false,
    };
    let m = a.proxy_create(A, cmd).expect("create");
    a.proxy_open(B, "m").expect("B opens");
    (m.slot, m.generation)
}

#[test]
fn a_queued_proxied_lock_is_completed_by_the_look_after_the_handover() {
    let mut a = arbiter();
    let (slot, g) = mutex(&mut a);
    assert_eq!(
        a.proxy_lock(A, 1, slot, g, TOKEN, true),
        Some((Status::Success, 0))
    );
    assert_eq!(a.proxy_lock(B, 2, slot, g, TOKEN, true), None, "queued");
    assert!(a.proxy_poll(B).done.is_empty(), "not while A holds it");
    assert_eq!(a.proxy_unlock(A, slot, g, TOKEN), Status::Success);
    assert_eq!(a.proxy_poll(B).done, vec![(2, Status::Success, 0)]);
    assert_eq!(
        a.proxy_lock(A, 3, slot, g, TOKEN, false),
        Some((Status::Timeout, 0)),
        "B holds it now: a try says no"
    );
    assert_eq!(a.proxy_unlock(B, slot, g, TOKEN), Status::Success);
    assert_eq!(
        a.proxy_lock(A, 4, slot, g, TOKEN, false),
        Some((Status::Success, 0)),
        "the try left no queue entry behind: B's unlock freed it"
    );
}

#[test]
fn a_lock_taken_back_at_its_timeout_gives_back_a_handover_that_raced_it() {
    let mut a = arbiter();
    let (slot, g) = mutex(&mut a);
    a.proxy_lock(A, 1, slot, g, TOKEN, true);
    assert_eq!(a.proxy_lock(B, 2, slot, g, TOKEN, true), None);
    // Handed to B, but B's timeout comes before the look that would tell it.
    assert_eq!(a.proxy_unlock(A, slot, g, TOKEN), Status::Success);
    assert!(a.proxy_cancel_wait(B, 2), "taken back: B is told TIMEOUT");
    assert!(a.proxy_poll(B).done.is_empty());
    assert_eq!(
        a.proxy_lock(A, 3, slot, g, TOKEN, false),
        Some((Status::Success, 0)),
        "free again, not held by a VM that was told it timed out"
    );
}

#[test]
fn a_departed_vms_queued_lock_is_never_granted() {
    let mut a = arbiter();
    let (slot, g) = mutex(&mut a);
    a.proxy_lock(A, 1, slot, g, TOKEN, true);
    assert_eq!(a.proxy_lock(B, 2, slot, g, TOKEN, true), None);
    a.peer_gone(B);
    assert_eq!(a.proxy_unlock(A, slot, g, TOKEN), Status::Success);
    assert_eq!(
        a.proxy_lock(A, 3, slot, g, TOKEN, false),
        Some((Status::Success, 0)),
        "freed, not handed to the departed VM"
    );
}

#[test]
fn a_vm_that_departs_holding_the_mutex_hands_it_to_the_queue_as_abandoned() {
    let mut a = arbiter();
    let (slot, g) = mutex(&mut a);
    a.proxy_lock(A, 1, slot, g, TOKEN, true);
    assert_eq!(a.proxy_lock(B, 2, slot, g, TOKEN, true), None);
    a.peer_gone(A);
    assert_eq!(a.proxy_poll(B).done, vec![(2, Status::Abandoned, 0)]);
    assert_eq!(a.proxy_unlock(B, slot, g, TOKEN), Status::Success);
    assert_eq!(
        a.proxy_lock(B, 3, slot, g, TOKEN, false),
        Some((Status::Success, 0)),
        "abandoned is told once"
    );
}

#[test]
fn lock_refuses_what_is_not_a_held_mutex_and_a_zero_token() {
    let mut a = arbiter();
    let (slot, g) = mutex(&mut a);
    assert_eq!(
        a.proxy_lock(A, 1, slot, g, 0, true),
        Some((Status::InvalidParameter, 0))
    );
    assert_eq!(
        a.proxy_lock(A, 1, slot, Generation(g.raw() + 1), TOKEN, true),
        Some((Status::InvalidHandle, 0))
    );
    assert_eq!(
        a.proxy_lock(PeerId(9), 1, slot, g, TOKEN, true),
        Some((Status::InvalidHandle, 0)),
        "not a proxied peer"
    );
    assert_eq!(
        a.proxy_lock(A, 1, slot, g, TOKEN, true),
        Some((Status::Success, 0))
    );
    assert_eq!(
        a.proxy_lock(A, 2, slot, g, TOKEN, true),
        Some((Status::PossibleDeadlock, 0)),
        "not recursive"
    );
}
