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

#[test]
fn what_the_header_shows_beyond_an_older_journal_is_adopted_and_answered_requests_are_not_served_again(
) {
    use vshm_format::mailbox::{delete_request, grow_request};
    use vshm_format::{Generation, ObjectSlot};
    let mut a = arbiter();
    let kept = create(&mut a, PeerId(1), "kept", true);
    let doomed = create(&mut a, PeerId(1), "doomed", true);
    let journal = a.snapshot();
    // What happened after the last journal write, each answered before the crash.
    let late = create(&mut a, PeerId(2), "late", false);
    assert_eq!(late.status, Status::Success.code());
    let slot = |r: &vshm_format::layout::Response| (ObjectSlot(r.slot), Generation(r.generation));
    let (ds, dg) = slot(&doomed);
    assert_eq!(
        request(&mut a, PeerId(1), &delete_request(ds, dg)).status,
        0
    );
    let (ks, kg) = slot(&kept);
    let grown = request(&mut a, PeerId(3), &grow_request(ks, kg, 8192));
    // Peer 3 holds nothing: refused, but answered all the same.
    assert_eq!(grown.status, Status::InvalidHandle.code());
    let grown = request(&mut a, PeerId(1), &grow_request(ks, kg, 8192));
    assert_eq!(grown.status, Status::Success.code());

    let layout = *a.layout();
    let (mut b, _) = Arbiter::from_snapshot(same_region(&a), layout, journal, &|_| {
        Grant::unrestricted("main")
    })
    .expect("rebuild");
    let ahead = b.adopt_ahead();
    assert_eq!(
        ahead,
        super::Ahead {
            adopted: 1,
            unlinked: 1,
            grown: 1,
            answered: 3
        }
    );
    // Nothing of it is undone by the first heal.
    b.heal();
    let (ls, _) = slot(&late);
    let rec = b.record_at(ls).expect("late adopted");
    assert_eq!(rec.name.as_deref(), Some("late"));
    assert_eq!(b.record_at(ks).map(|r| r.size), Some(8192));
    assert!(b.record_at(ds).is_some_and(|r| r.unlinked));
    // The names: "late" taken (create-or-open opens it), "doomed" free again.
    let again = create(&mut b, PeerId(3), "late", false);
    assert_eq!(again.status, Status::ObjectNameExists.code());
    assert_eq!(again.generation, late.generation);
    let reborn = create(&mut b, PeerId(3), "doomed", false);
    assert_eq!(reborn.status, Status::Success.code());
    // New memory is never the adopted object's.
    let (lo, lm) = (late.offset, late.max_size);
    assert!(reborn.offset >= lo + lm || reborn.offset + reborn.max_size <= lo);
    assert!(reborn.generation > late.generation);
}

#[test]
fn a_header_entry_the_journal_lacks_is_not_adopted_over_memory_a_record_owns() {
    let mut a = arbiter();
    let kept = create(&mut a, PeerId(1), "kept", true);
    let journal = a.snapshot();
    // A forged entry in a free slot pointing at "kept"'s memory, with the next generation.
    let forged = vshm_format::object::make_entry(
        vshm_format::Generation(kept.generation + 1),
        vshm_format::layout::object_state::LIVE,
        vshm_format::layout::kind::SECTION,
        vshm_format::RegionOffset(kept.offset),
        4096,
        8192,
        false,
        Some("forged"),
        PeerId(2),
    );
    vshm_format::object::publish(a.mem(), a.layout(), vshm_format::ObjectSlot(3), &forged)
        .expect("forge");
    let layout = *a.layout();
    let (mut b, _) = Arbiter::from_snapshot(same_region(&a), layout, journal, &|_| {
        Grant::unrestricted("main")
    })
    .expect("rebuild");
    assert_eq!(b.adopt_ahead().adopted, 0);
    assert!(b.record_at(vshm_format::ObjectSlot(3)).is_none());
}
