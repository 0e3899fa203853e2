//! Unit tests of access control and quotas in the arbiter: denials by pattern and by quota
//! answer the right status to the right peer only, are counted and reported, and quotas
//! free up when the objects that used them are destroyed.

use std::sync::Arc;

use vshm_format::layout::{kind, op};
use vshm_format::lease::{acquire, release};
use vshm_format::mailbox;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, Status};

use super::tests::{arbiter, create, request};
use crate::policy::{Glob, Grant, Identity, Patterns, Policy, Rate};

fn identity(label: &str) -> Identity {
    Identity {
        socket: "main".into(),
        uid: Some(1000),
        gid: Some(1000),
        label: Some(label.into()),
    }
}

fn grant(policy: &Policy, label: &str) -> Grant {
    Grant {
        policy: Arc::new(policy.clone()),
        account: Arc::new(identity(label)),
    }
}

fn web() -> Policy {
    let mut p = Policy::unrestricted();
    p.name = "web".into();
    p.create = Patterns::new(vec![Glob::new("web/*").expect("glob")]);
    p.delete = p.create.clone();
    p.delete_others = Patterns::none();
    p
}

#[test]
fn a_create_outside_the_patterns_is_access_denied_and_other_peers_are_unaffected() {
    let mut a = arbiter();
    a.set_peer_grant(PeerId(1), grant(&web(), "vm-a"));
    assert_eq!(
        create(&mut a, PeerId(1), "db/x", false).status,
        Status::AccessDenied.code()
    );
    assert_eq!(
        create(&mut a, PeerId(1), "web/x", false).status,
        Status::Success.code()
    );
    // Peer 2 has no policy: unrestricted.
    assert_eq!(
        create(&mut a, PeerId(2), "db/x", false).status,
        Status::Success.code()
    );
    let c = a.counters();
    assert_eq!((c.denials, c.access_denied, c.quota_exceeded), (1, 1, 0));
    let st = a.status();
    let p1 = st.peers.iter().find(|p| p.id == 1).expect("peer 1");
    assert_eq!((p1.policy.as_deref(), p1.denials), (Some("web"), 1));
    let p2 = st.peers.iter().find(|p| p.id == 2).expect("peer 2");
    assert_eq!((p2.policy.as_deref(), p2.denials), (None, 0));
    let denied: Vec<_> = a.drain_events().filter(|e| e.kind == "denied").collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].status, Some("STATUS_ACCESS_DENIED"));
    let detail = denied[0].detail.as_deref().unwrap_or("");
    assert!(
        detail.starts_with("create: \"db/x\" is outside policy \"web\"'s create patterns")
            && detail.contains("web/*"),
        "{detail}"
    );
}

#[test]
fn a_byte_quota_refuses_with_quota_exceeded_and_frees_up_when_the_section_is_destroyed() {
    let mut a = arbiter();
    let mut p = Policy::unrestricted();
    p.name = "small".into();
    p.max_bytes = Some(16384);
    a.set_peer_grant(PeerId(1), grant(&p, "vm-a"));
    let first = create(&mut a, PeerId(1), "a", false); // 8192 bytes each
    let second = create(&mut a, PeerId(1), "b", false);
    assert_eq!(second.status, Status::Success.code());
    let third = create(&mut a, PeerId(1), "c", false);
    assert_eq!(third.status, Status::QuotaExceeded.code());
    assert_eq!(third.slot, 0, "a refusal carries no object");
    // Deleted but still held: still counted.
    let l = *a.layout();
    let (slot, generation) = (ObjectSlot(first.slot), Generation(first.generation));
    acquire(a.mem(), &l, PeerSlot(0), slot, generation, false).expect("hold");
    let del = mailbox::delete_request(slot, generation);
    assert_eq!(
        request(&mut a, PeerId(1), &del).status,
        Status::Success.code()
    );
    assert_eq!(
        create(&mut a, PeerId(1), "c", false).status,
        Status::QuotaExceeded.code()
    );
    // The last close destroys it.
    release(a.mem(), &l, PeerSlot(0), slot).expect("close");
    a.sweep();
    assert!(a.record_at(ObjectSlot(first.slot)).is_none(), "destroyed");
    assert_eq!(
        create(&mut a, PeerId(1), "c", false).status,
        Status::Success.code()
    );
    assert_eq!(a.counters().quota_exceeded, 2);
}

#[test]
fn an_object_quota_counts_events_and_mutexes_too() {
    let mut a = arbiter();
    let mut p = Policy::unrestricted();
    p.max_objects = Some(2);
    a.set_peer_grant(PeerId(1), grant(&p, "vm-a"));
    assert_eq!(
        create(&mut a, PeerId(1), "s", false).status,
        Status::Success.code()
    );
    let ev = mailbox::create_sync_request(Some("e"), kind::EVENT, false, false);
    assert_eq!(
        request(&mut a, PeerId(1), &ev).status,
        Status::Success.code()
    );
    let mx = mailbox::create_sync_request(Some("m"), kind::MUTEX, false, false);
    assert_eq!(
        request(&mut a, PeerId(1), &mx).status,
        Status::QuotaExceeded.code()
    );
}

#[test]
fn the_quota_belongs_to_the_vm_so_a_reconnect_does_not_reset_it() {
    let mut a = arbiter();
    let mut p = Policy::unrestricted();
    p.max_objects = Some(1);
    a.set_peer_grant(PeerId(1), grant(&p, "vm-a"));
    assert_eq!(
        create(&mut a, PeerId(1), "keep", true).status,
        Status::Success.code()
    );
    a.peer_gone(PeerId(1));
    a.peer_connected(PeerId(4)).expect("reconnect");
    a.set_peer_grant(PeerId(4), grant(&p, "vm-a"));
    assert_eq!(
        create(&mut a, PeerId(4), "more", false).status,
        Status::QuotaExceeded.code()
    );
    // Another VM under the same policy has its own quota.
    a.set_peer_grant(PeerId(2), grant(&p, "vm-b"));
    assert_eq!(
        create(&mut a, PeerId(2), "more", false).status,
        Status::Success.code()
    );
}

#[test]
fn deleting_another_vms_object_needs_delete_others() {
    let mut a = arbiter();
    a.set_peer_grant(PeerId(1), grant(&web(), "vm-a"));
    a.set_peer_grant(PeerId(2), grant(&web(), "vm-b"));
    let r = create(&mut a, PeerId(1), "web/x", true);
    let del = mailbox::delete_request(ObjectSlot(r.slot), Generation(r.generation));
    assert_eq!(
        request(&mut a, PeerId(2), &del).status,
        Status::AccessDenied.code()
    );
    assert!(a.record_at(ObjectSlot(r.slot)).is_some_and(|r| !r.unlinked));
    // An admin policy may.
    let mut admin = web();
    admin.delete_others = Patterns::any();
    a.set_peer_grant(PeerId(3), grant(&admin, "vm-c"));
    assert_eq!(
        request(&mut a, PeerId(3), &del).status,
        Status::Success.code()
    );
    // A deleted or unknown object is answered as ever, whatever the policy says.
    let again = request(&mut a, PeerId(2), &del).status;
    assert!(
        again == Status::DeletePending.code() || again == Status::ObjectNameNotFound.code(),
        "{again:#x}"
    );
}

#[test]
fn a_rate_limit_refuses_requests_past_the_burst_but_never_an_unlock() {
    let mut a = arbiter();
    let mut p = Policy::unrestricted();
    p.rate = Some(Rate {
        per_sec: 0.001,
        burst: 2.0,
    });
    a.set_peer_grant(PeerId(1), grant(&p, "vm-a"));
    let m = request(
        &mut a,
        PeerId(1),
        &mailbox::create_sync_request(Some("m"), kind::MUTEX, false, false),
    );
    assert_eq!(m.status, Status::Success.code());
    let (slot, generation) = (ObjectSlot(m.slot), Generation(m.generation));
    let lock = mailbox::mutex_request(op::LOCK, slot, generation, 7);
    assert_eq!(
        request(&mut a, PeerId(1), &lock).status,
        Status::Success.code()
    );
    // The burst of 2 is spent.
    assert_eq!(
        create(&mut a, PeerId(1), "x", false).status,
        Status::QuotaExceeded.code()
    );
    let unlock = mailbox::mutex_request(op::UNLOCK, slot, generation, 7);
    assert_eq!(
        request(&mut a, PeerId(1), &unlock).status,
        Status::Success.code()
    );
    // Others are not limited by peer 1's bucket.
    assert_eq!(
        create(&mut a, PeerId(2), "x", false).status,
        Status::Success.code()
    );
}

#[test]
fn holding_names_outside_the_open_patterns_is_reported_not_refused() {
    let mut a = arbiter();
    let mut p = web();
    p.open = Patterns::new(vec![Glob::new("web/*").expect("glob")]);
    p.max_handles = Some(0);
    let r = create(&mut a, PeerId(2), "db/x", false);
    a.set_peer_grant(PeerId(1), grant(&p, "vm-a"));
    let l = *a.layout();
    acquire(
        a.mem(),
        &l,
        PeerSlot(0),
        ObjectSlot(r.slot),
        Generation(r.generation),
        false,
    )
    .expect("the open itself cannot be refused");
    a.observe_handles();
    let adv: Vec<_> = a.drain_events().filter(|e| e.kind == "advisory").collect();
    assert_eq!(adv.len(), 1, "{adv:?}");
    let st = a.status();
    let p1 = st.peers.iter().find(|p| p.id == 1).expect("peer 1");
    assert_eq!(p1.advisories.len(), 2, "{:?}", p1.advisories);
    assert!(p1.advisories[0].contains("max_handles 0"));
    assert!(p1.advisories[1].contains("\"db/x\""));
    // A create-or-open of the existing name is refused: it would be an open.
    assert_eq!(
        create(&mut a, PeerId(1), "db/x", false).status,
        Status::AccessDenied.code()
    );
}
