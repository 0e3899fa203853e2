//! Unit tests of the arbiter's snapshot: a rebuilt arbiter over the same region serves on
//! as the original would, and a snapshot that is not whole or not this region's is refused.

use vshm_format::layout::Layout;
use vshm_format::{PeerId, Status};

use super::tests::{arbiter, create, request};
use super::{Arbiter, ArbiterSnapshot, SnapshotError};
use crate::policy::Grant;
use crate::region::Region;

/// The same memfd, mapped again (as the new process maps the one it was handed).
fn same_region(a: &Arbiter<Region>) -> Region {
    let file = a.mem().file().try_clone().expect("dup the memfd");
    Region::adopt(file, 1 << 20, false, false).expect("adopt")
}

fn rebuild(a: &Arbiter<Region>, snap: ArbiterSnapshot) -> Result<Arbiter<Region>, SnapshotError> {
    let layout = *a.layout();
    Arbiter::from_snapshot(same_region(a), layout, snap, &|_| {
        Grant::unrestricted("main")
    })
    .map(|(b, check)| {
        assert_eq!(check, Default::default(), "the header matches the records");
        b
    })
}

#[test]
fn a_rebuilt_arbiter_keeps_names_generations_and_space_and_serves_on() {
    let mut a = arbiter();
    let kept = create(&mut a, PeerId(1), "kept", true);
    assert_eq!(kept.status, Status::Success.code());
    let snap = a.snapshot();
    let json = serde_json::to_vec(&snap).expect("serialise");
    let back: ArbiterSnapshot = serde_json::from_slice(&json).expect("parse");
    let mut b = rebuild(&a, back).expect("rebuild");
    assert_eq!(b.counters().created, a.counters().created);
    // The name is still taken (create-or-open opens it) and a new one gets a new generation
    // and other space.
    let again = create(&mut b, PeerId(2), "kept", false);
    assert_eq!(again.status, Status::ObjectNameExists.code());
    assert_eq!(again.generation, kept.generation);
    let fresh = create(&mut b, PeerId(2), "fresh", false);
    assert_eq!(fresh.status, Status::Success.code());
    assert!(fresh.generation > kept.generation);
    assert_ne!(fresh.offset, kept.offset);
    // A peer's request sequence carried over: its next request is served, not ignored.
    let more = request(
        &mut b,
        PeerId(1),
        &vshm_format::mailbox::create_request(Some("more"), 1, 4096, 4096, false),
    );
    assert_eq!(more.status, Status::Success.code());
}

#[test]
fn a_snapshot_whose_heap_does_not_add_up_or_of_another_layout_is_refused() {
    let mut a = arbiter();
    create(&mut a, PeerId(1), "x", true);
    // Lose the free space: the heap is no longer covered.
    let mut snap = serde_json::to_value(a.snapshot()).expect("json");
    snap["free"] = serde_json::json!([]);
    let snap: ArbiterSnapshot = serde_json::from_value(snap).expect("parse");
    assert!(matches!(
        rebuild(&a, snap),
        Err(SnapshotError::HeapCoverage { .. })
    ));
    // Another layout (more objects) than the snapshot's.
    let other = Layout::compute(1 << 20, 4, 16, 1, 4096).expect("layout");
    let Err(e) = Arbiter::from_snapshot(same_region(&a), other, a.snapshot(), &|_| {
        Grant::unrestricted("main")
    }) else {
        panic!("a snapshot of another layout was taken");
    };
    assert!(matches!(e, SnapshotError::Layout { .. }), "{e}");
}
