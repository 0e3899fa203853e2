//! Unit tests of proxied peers (vhost-user VMs, docs/VHOST-USER.md §7): vshmd keeps their
//! holds itself, so the namespace treats them as holders and no scribble takes a hold away.

use std::sync::atomic::Ordering;

use vshm_format::layout::{kind, LEASE_CLOSED, OBJ_LEASE_OFF};
use vshm_format::lease::{acquire, release, Released};
use vshm_format::mailbox::Command;
use vshm_format::shm::SharedMemory;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, Status};

use super::tests::{arbiter, create};
use super::tests_proxy_lock::{A, B};

const PROXY: PeerId = PeerId(4);

fn section(name: &str, persistent: bool) -> Command<'_> {
    Command::Create {
        name: Some(name),
        kind: kind::SECTION,
        max_size: 8192,
        initial_size: 4096,
        persistent,
        manual_reset: false,
    }
}

#[test]
fn a_proxied_peer_creates_and_opens_and_its_last_close_destroys() {
    let mut a = arbiter();
    a.proxy_connected(PROXY).expect("proxy");
    let made = a
        .proxy_create(PROXY, section("mine", false))
        .expect("create");
    assert!(made.created);
    let again = a
        .proxy_create(PROXY, section("mine", false))
        .expect("create-or-open");
    assert!(!again.created);
    assert_eq!((again.slot, again.generation), (made.slot, made.generation));
    let opened = a.proxy_open(PROXY, "mine").expect("open");
    assert_eq!(a.proxy_holds(PROXY), vec![(made.slot, made.generation, 3)]);
    assert_eq!(a.status().sections[0].refs, 3, "status counts its handles");
    for _ in 0..3 {
        a.proxy_close(PROXY, opened.slot, opened.generation)
            .expect("close");
    }
    assert!(
        a.record_at(made.slot).is_none(),
        "the last close destroyed it"
    );
    assert_eq!(
        a.proxy_close(PROXY, made.slot, made.generation),
        Err(Status::InvalidHandle),
        "a handle it no longer has"
    );
    assert_eq!(a.proxy_open(PROXY, "mine"), Err(Status::ObjectNameNotFound));
}

#[test]
fn a_proxied_peers_hold_survives_a_forged_close_and_a_scribbled_row() {
    let mut a = arbiter();
    a.proxy_connected(PROXY).expect("proxy");
    let r = create(&mut a, PeerId(1), "shared", false);
    let slot = ObjectSlot(r.slot);
    let (l, m) = (*a.layout(), a.mem());
    acquire(m, &l, PeerSlot(0), slot, Generation(r.generation), false).expect("creator's hold");
    let held = a.proxy_open(PROXY, "shared").expect("open");
    // The creator closes; a hostile peer then zeroes the proxy's (unused) row and forges
    // CLOSED into the lease word.
    assert_eq!(release(a.mem(), &l, PeerSlot(0), slot), Ok(Released::Held));
    let lease = l.object_entry(slot).expect("entry") + OBJ_LEASE_OFF;
    let row = l.refcount_cell(PeerSlot(3), slot).expect("cell");
    a.mem().store_u32(row, 0, Ordering::SeqCst).expect("zero");
    a.mem()
        .store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
        .expect("forge");
    assert_eq!(a.sweep(), 0, "nothing destroyed");
    assert!(
        a.record_at(slot).is_some(),
        "the proxied peer's section lives"
    );
    a.proxy_close(PROXY, held.slot, held.generation)
        .expect("close");
    assert!(a.record_at(slot).is_none(), "its close was the last");
}

#[test]
fn counts_scribbled_into_a_proxied_peers_row_keep_nothing_alive() {
    let mut a = arbiter();
    a.proxy_connected(PROXY).expect("proxy");
    let r = create(&mut a, PeerId(1), "brief", false);
    let slot = ObjectSlot(r.slot);
    let l = *a.layout();
    acquire(
        a.mem(),
        &l,
        PeerSlot(0),
        slot,
        Generation(r.generation),
        false,
    )
    .expect("hold");
    let row = l.refcount_cell(PeerSlot(3), slot).expect("cell");
    a.mem()
        .store_u32(row, 5, Ordering::SeqCst)
        .expect("scribble");
    assert_eq!(
        release(a.mem(), &l, PeerSlot(0), slot),
        Ok(Released::LastHold)
    );
    assert_eq!(a.sweep(), 1, "destroyed at its last real close");
}

#[test]
fn a_departed_proxied_peer_is_reclaimed_like_any_other() {
    let mut a = arbiter();
    a.proxy_connected(PROXY).expect("proxy");
    let only = a
        .proxy_create(PROXY, section("only-mine", false))
        .expect("create");
    let kept = a
        .proxy_create(PROXY, section("kept", true))
        .expect("create");
    let out = a.peer_gone(PROXY);
    assert_eq!((out.handles, out.destroyed), (2, 1));
    assert!(a.record_at(only.slot).is_none());
    assert!(a.record_at(kept.slot).is_some(), "persistent");
    assert!(a.proxy_holds(PROXY).is_empty());
    // Its slot serves an ordinary peer next, with a row of its own again.
    a.peer_connected(PeerId(5)).expect("reuse");
    assert_eq!(a.proxy_open(PeerId(5), "kept"), Err(Status::InvalidHandle));
}

#[test]
fn a_destroy_does_not_wait_for_a_proxied_peers_acknowledgement() {
    let mut a = arbiter();
    for id in 1..=3 {
        a.peer_gone(PeerId(id));
    }
    a.proxy_connected(PROXY).expect("proxy");
    let made = a
        .proxy_create(PROXY, section("brief", false))
        .expect("create");
    a.proxy_close(PROXY, made.slot, made.generation)
        .expect("close");
    assert_eq!(
        a.quarantined(),
        (0, 0),
        "nobody to wait for: straight back to the heap"
    );
}

#[test]
fn a_proxied_peers_holds_cross_a_snapshot() {
    let mut a = arbiter();
    a.proxy_connected(PROXY).expect("proxy");
    let made = a
        .proxy_create(PROXY, section("mine", false))
        .expect("create");
    let snap = a.snapshot();
    let json = serde_json::to_vec(&snap).expect("serialise");
    let back = serde_json::from_slice(&json).expect("parse");
    let file = a.mem().file().try_clone().expect("dup");
    let region = crate::region::Region::adopt(file, 1 << 20, false, false).expect("adopt");
    let (mut b, _) = super::Arbiter::from_snapshot(region, *a.layout(), back, &|_| {
        crate::policy::Grant::unrestricted("main")
    })
    .expect("rebuild");
    assert_eq!(b.proxy_holds(PROXY), vec![(made.slot, made.generation, 1)]);
    b.proxy_close(PROXY, made.slot, made.generation)
        .expect("close");
    assert!(b.record_at(made.slot).is_none());
}

#[test]
fn what_dies_with_a_departed_proxied_peer_stays_out_of_the_heap_for_the_quarantine_time() {
    let mut a = arbiter();
    a.set_quarantine(std::time::Duration::from_millis(100));
    // Nobody else is connected: an ivshmem peer's memory would go back at once.
    for id in 1..=3 {
        a.peer_gone(PeerId(id));
    }
    a.proxy_connected(PROXY).expect("proxy");
    let made = a
        .proxy_create(PROXY, section("vm's", false))
        .expect("create");
    a.peer_gone(PROXY);
    assert!(a.record_at(made.slot).is_none(), "destroyed with it");
    assert_eq!(a.quarantined(), (8192, 1), "its frontend may still map it");
    a.release_quarantine();
    assert_eq!(a.quarantined().1, 1, "no acknowledgement releases it");
    a.proxy_connected(PeerId(5)).expect("next VM");
    let next = a
        .proxy_create(PeerId(5), section("next", false))
        .expect("create");
    assert_ne!(next.offset, made.offset, "not handed to the next section");
    std::thread::sleep(std::time::Duration::from_millis(120));
    a.release_quarantine();
    assert_eq!(a.quarantined(), (0, 0), "its time is up");
}

/// An event "name" created by proxied peer A (after making room for A and B).
fn proxied_event<M: super::Backing>(
    a: &mut super::Arbiter<M>,
    name: &str,
    manual_reset: bool,
) -> (ObjectSlot, Generation) {
    let cmd = Command::Create {
        name: Some(name),
        kind: kind::EVENT,
        max_size: 0,
        initial_size: 0,
        persistent: true,
        manual_reset,
    };
    let e = a.proxy_create(A, cmd).expect("create");
    (e.slot, e.generation)
}

/// A WAIT whose answer nobody will hear gives back the signal it took from an auto-reset
/// event, even after its waiter closed its handle (vshmd undoes its own take); a
/// manual-reset event's WAIT took nothing, and a stale generation names another object.
#[test]
fn a_signal_given_back_returns_to_an_auto_reset_event_even_after_its_waiter_closed() {
    let mut a = arbiter();
    a.peer_gone(PeerId(3));
    a.proxy_connected(A).expect("proxy A");
    a.proxy_connected(B).expect("proxy B");
    let (auto, g) = proxied_event(&mut a, "auto", false);
    a.proxy_open(B, "auto").expect("B opens");
    assert_eq!(a.proxy_signal(A, auto, g), Status::Success);
    assert_eq!(
        a.proxy_wait(B, 1, auto, g, None).map(|(s, _)| s),
        Some(Status::Success),
        "B's WAIT takes the signal"
    );
    assert_eq!(a.proxy_close(B, auto, g), Ok(()));
    assert_eq!(
        a.proxy_give_back_signal(auto, Generation(g.raw() + 1)),
        Status::Success
    );
    assert_eq!(
        a.proxy_wait(A, 2, auto, g, None),
        None,
        "a stale generation gave nothing back"
    );
    assert!(a.proxy_cancel_wait(A, 2));
    assert_eq!(a.proxy_give_back_signal(auto, g), Status::Success);
    assert_eq!(
        a.proxy_wait(A, 3, auto, g, None).map(|(s, _)| s),
        Some(Status::Success),
        "the signal is back for the next waiter"
    );

    let (manual, m) = proxied_event(&mut a, "manual", true);
    assert_eq!(a.proxy_give_back_signal(manual, m), Status::Success);
    assert_eq!(
        a.proxy_wait(A, 4, manual, m, None),
        None,
        "a manual-reset event is not set again: its WAIT took nothing"
    );
}
