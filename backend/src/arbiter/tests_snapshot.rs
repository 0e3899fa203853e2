//! Unit tests of the arbiter's snapshot: a rebuilt arbiter over the same region serves on
//! as the original would, and a snapshot that is not whole or not this region's is refused.

use vshm_format::layout::Layout;
use vshm_format::shm::SharedMemory;
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

/// Posts `req` in `peer_id`'s mailbox (without serving it); its sequence number.
fn post(a: &Arbiter<Region>, peer_id: PeerId, req: &vshm_format::layout::Request) -> u64 {
    let slot = vshm_format::PeerSlot(u32::from(peer_id.raw()) - 1);
    vshm_format::mailbox::post(a.mem(), a.layout(), slot, req).expect("post")
}

fn rebuilt(a: &Arbiter<Region>, journal: ArbiterSnapshot) -> Arbiter<Region> {
    let layout = *a.layout();
    Arbiter::from_snapshot(same_region(a), layout, journal, &|_| {
        Grant::unrestricted("main")
    })
    .map(|(b, _)| b)
    .expect("rebuild")
}

#[test]
fn a_response_journaled_but_not_delivered_before_a_crash_is_delivered_by_the_recovery() {
    let mut a = arbiter();
    let req = vshm_format::mailbox::create_request(Some("made"), 1, 8192, 4096, false);
    let seq = post(&a, PeerId(2), &req);
    a.answer_pending(PeerId(2)).expect("answered");
    let journal = a.snapshot();
    // The crash comes before `deliver`: the peer has no response.
    let slot = vshm_format::PeerSlot(1);
    assert_eq!(
        vshm_format::mailbox::poll(a.mem(), a.layout(), slot, seq),
        Ok(None)
    );
    let mut b = rebuilt(&a, journal);
    assert_eq!(b.adopt_ahead().redelivered, 1);
    let resp = vshm_format::mailbox::poll(b.mem(), b.layout(), slot, seq)
        .expect("poll")
        .expect("the response is there");
    assert_eq!(resp.status, Status::Success.code());
    assert!(b.record_at(vshm_format::ObjectSlot(resp.slot)).is_some());
    // Not served twice: the peer's next request is.
    let next = create(&mut b, PeerId(2), "next", false);
    assert_eq!(next.status, Status::Success.code());
}

#[test]
fn an_entry_a_pending_create_published_before_the_crash_is_adopted_and_the_create_opens_it() {
    let mut a = arbiter();
    let journal = a.snapshot();
    let req = vshm_format::mailbox::create_request(Some("early"), 1, 8192, 4096, false);
    post(&a, PeerId(2), &req);
    // Executed (the entry is published) but neither journaled nor delivered.
    a.answer_pending(PeerId(2)).expect("executed");
    let mut b = rebuilt(&a, journal);
    assert_eq!(b.name_area.free_bytes(), 512, "the journal had no names");
    assert_eq!(b.adopt_ahead().adopted, 1);
    assert_eq!(
        b.name_area.free_bytes(),
        512 - 8,
        "the adopted entry's name keeps its room in the name area"
    );
    assert!(b.heal().is_clean(), "adopted as published");
    assert!(b.service(PeerId(2)), "the pending create is served again");
    let slot = vshm_format::PeerSlot(1);
    let mb = b.layout().mailbox(slot).expect("mailbox");
    let seq = b
        .mem()
        .load_u64(mb, std::sync::atomic::Ordering::Acquire)
        .expect("req_seq");
    let resp = vshm_format::mailbox::poll(b.mem(), b.layout(), slot, seq)
        .expect("poll")
        .expect("answered");
    assert_eq!(
        resp.status,
        Status::ObjectNameExists.code(),
        "it opens what it had made"
    );
    let fresh = create(&mut b, PeerId(3), "fresh", false);
    assert!(
        fresh.offset >= resp.offset + resp.max_size || fresh.offset + fresh.max_size <= resp.offset
    );
    for name in ["early", "fresh"] {
        assert!(
            vshm_format::object::find_by_name(b.mem(), b.layout(), name)
                .expect("lookup")
                .is_some(),
            "{name}: the new name did not overwrite the adopted one"
        );
    }
}

#[test]
fn a_mailbox_showing_a_response_the_journal_never_had_is_not_served_again() {
    let mut a = arbiter();
    let journal = a.snapshot();
    // Delivered without being journaled: what only a scribble can make now.
    create(&mut a, PeerId(2), "one", false);
    let mut b = rebuilt(&a, journal);
    let ahead = b.adopt_ahead();
    assert_eq!((ahead.adopted, ahead.answered), (0, 1));
    assert!(!b.service(PeerId(2)), "nothing pending");
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
    let mut forged = forged;
    forged.name_off = u32::try_from(a.layout().name_area_size - 8).expect("small");
    vshm_format::object::publish_named(
        a.mem(),
        a.layout(),
        vshm_format::ObjectSlot(3),
        &forged,
        b"forged",
    )
    .expect("forge");
    assert!(
        vshm_format::object::read_object(a.mem(), a.layout(), vshm_format::ObjectSlot(3))
            .expect("a valid entry")
            .is_some(),
        "only its memory is wrong"
    );
    let layout = *a.layout();
    let (mut b, _) = Arbiter::from_snapshot(same_region(&a), layout, journal, &|_| {
        Grant::unrestricted("main")
    })
    .expect("rebuild");
    assert_eq!(b.adopt_ahead().adopted, 0);
    assert!(b.record_at(vshm_format::ObjectSlot(3)).is_none());
}

/// Found by an attack: a hostile peer (policy "web": may create only `web/*`, one object at most)
/// forges, in free object slots, several LIVE persistent sections with the next
/// generations, free heap memory, names outside its patterns, and as creator either
/// itself or a victim peer (charging the victim's account). If vshmd crashes while these
/// are in the header, `adopt_ahead` adopts every one: no policy check (patterns, quotas),
/// no "one event creates at most one object" bound, and the creator's identity is taken
/// from a header field any peer can write.
#[test]
fn forged_entries_beyond_the_journal_are_not_adopted_whatever_their_creator_field_says() {
    use std::sync::Arc;
    use vshm_format::layout::{kind, object_state};
    use vshm_format::object::{make_entry, publish_named};
    use vshm_format::{Generation, ObjectSlot, RegionOffset};
    let mut a = arbiter();
    let kept = create(&mut a, PeerId(2), "kept", true);
    assert_eq!(kept.status, Status::Success.code());
    let journal = a.snapshot();
    let next = a.next_generation.raw();
    // Free heap extents as the journal has them.
    let free: Vec<(u64, u64)> = a.heap.extents().map(|(o, l)| (o.raw(), l)).collect();
    let (base, len) = *free.iter().max_by_key(|(_, l)| *l).expect("free heap");
    assert!(len >= 4 * 8192, "room for the forgeries");
    // Slots the records leave free.
    let slots: Vec<u32> = (0..a.layout().max_objects)
        .filter(|&s| a.record_at(ObjectSlot(s)).is_none())
        .take(3)
        .collect();
    let creators = [PeerId(1), PeerId(1), PeerId(2)];
    for (i, &s) in slots.iter().enumerate() {
        let entry = make_entry(
            Generation(next + i as u64),
            object_state::LIVE,
            kind::SECTION,
            RegionOffset(base + 8192 * i as u64),
            8192,
            8192,
            true,
            Some(&format!("db/forged-{i}")),
            creators[i],
        );
        let mut entry = entry;
        entry.name_off =
            u32::try_from(a.layout().name_area_size - 16 * (i as u64 + 1)).expect("small");
        let name = format!("db/forged-{i}");
        publish_named(a.mem(), a.layout(), ObjectSlot(s), &entry, name.as_bytes()).expect("forge");
    }
    let layout = *a.layout();
    let (mut b, _) = Arbiter::from_snapshot(same_region(&a), layout, journal, &|_| {
        Grant::unrestricted("main")
    })
    .expect("rebuild");
    // Peer 1's grant as the configuration resolves it: creates only web/*, one object.
    let mut web = crate::policy::Policy::unrestricted();
    web.name = "web".into();
    web.create =
        crate::policy::Patterns::new(vec![crate::policy::Glob::new("web/*").expect("glob")]);
    web.max_objects = Some(1);
    let account = Arc::new(crate::policy::Identity {
        socket: "main".into(),
        uid: Some(1000),
        gid: Some(1000),
        label: Some("hostile".into()),
    });
    b.set_peer_grant(
        PeerId(1),
        Grant {
            policy: Arc::new(web),
            account,
        },
    );
    let ahead = b.adopt_ahead();
    let adopted: Vec<String> = slots
        .iter()
        .filter_map(|&s| b.record_at(ObjectSlot(s)).and_then(|r| r.name.clone()))
        .collect();
    assert!(
        ahead.adopted <= 1,
        "one event creates at most one object, yet {} forged creates were adopted: {adopted:?}",
        ahead.adopted
    );
    for &s in &slots[..2] {
        assert!(
            b.record_at(ObjectSlot(s)).is_none(),
            "a create peer 1's policy denies (name outside web/*) was adopted: {adopted:?}"
        );
    }
}

#[test]
fn an_entry_published_before_the_crash_is_not_adopted_if_its_name_overlaps_a_records_name() {
    let mut a = arbiter();
    let kept = create(&mut a, PeerId(1), "kept", true);
    let journal = a.snapshot();
    let req = vshm_format::mailbox::create_request(Some("early"), 1, 8192, 4096, false);
    post(&a, PeerId(2), &req);
    a.answer_pending(PeerId(2)).expect("executed");
    // A scribbler moves the new entry's name onto "kept"'s room (and writes it there).
    let slot = vshm_format::ObjectSlot(
        (0..8)
            .find(|&s| s != kept.slot && a.record_at(vshm_format::ObjectSlot(s)).is_some())
            .expect("the early object"),
    );
    let kept_off = a
        .record_at(vshm_format::ObjectSlot(kept.slot))
        .expect("kept")
        .name_off;
    let mut e = vshm_format::object::snapshot(a.mem(), a.layout(), slot, false)
        .expect("entry")
        .entry;
    e.name_off = kept_off;
    vshm_format::object::publish_named(a.mem(), a.layout(), slot, &e, b"early").expect("move");
    let mut b = rebuilt(&a, journal);
    assert_eq!(b.adopt_ahead().adopted, 0);
    assert!(b.record_at(slot).is_none());
    assert_eq!(
        b.name_area.free_bytes(),
        512 - 8,
        "only kept's room is taken"
    );
}

#[test]
fn a_rebuilt_arbiter_adopts_the_name_area_with_its_holes() {
    let mut a = arbiter();
    for n in ["one", "two-two-two-two-two", "three"] {
        assert_eq!(
            create(&mut a, PeerId(1), n, true).status,
            Status::Success.code()
        );
    }
    // Free the middle name's room: a deleted object is destroyed once nobody holds it.
    let two = vshm_format::object::find_by_name(a.mem(), a.layout(), "two-two-two-two-two")
        .expect("lookup")
        .expect("found");
    let del = vshm_format::mailbox::delete_request(two.slot, two.generation);
    assert_eq!(
        request(&mut a, PeerId(1), &del).status,
        Status::Success.code()
    );
    a.peer_gone(PeerId(1));
    a.sweep();
    let free = a.name_area.free_bytes();
    assert_eq!(free, 512 - 8 - 8);
    let json = serde_json::to_vec(&a.snapshot()).expect("serialise");
    let mut b = rebuild(&a, serde_json::from_slice(&json).expect("parse")).expect("rebuild");
    assert_eq!(b.name_area.free_bytes(), free);
    assert_eq!(b.name_area.largest_free(), a.name_area.largest_free());
    // A new name goes into free room only: every name is still found.
    let four = create(&mut b, PeerId(2), "four-four-four", false);
    assert_eq!(four.status, Status::Success.code());
    for n in ["one", "three", "four-four-four"] {
        assert!(
            vshm_format::object::find_by_name(b.mem(), b.layout(), n)
                .expect("lookup")
                .is_some(),
            "{n}"
        );
    }
    assert!(b.heal().is_clean());
}

#[test]
fn a_snapshot_whose_names_overlap_leave_the_name_area_or_belong_to_no_name_is_refused() {
    let mut a = arbiter();
    create(&mut a, PeerId(1), "first", true);
    create(&mut a, PeerId(1), "second", true);
    let snap = serde_json::to_value(a.snapshot()).expect("json");
    let mut overlap = snap.clone();
    let first_off = overlap["objects"][0]["name_off"].clone();
    overlap["objects"][1]["name_off"] = first_off;
    let overlap: ArbiterSnapshot = serde_json::from_value(overlap).expect("parse");
    let e = rebuild(&a, overlap).expect_err("refused");
    assert!(
        matches!(
            e,
            SnapshotError::NameArea {
                error: crate::name_area::NameAreaError::Overlaps { .. },
                ..
            }
        ),
        "{e}"
    );
    let mut unnamed = snap.clone();
    unnamed["objects"][1]["name"] = serde_json::Value::Null;
    let unnamed: ArbiterSnapshot = serde_json::from_value(unnamed).expect("parse");
    let e = rebuild(&a, unnamed).expect_err("refused");
    assert!(
        matches!(
            e,
            SnapshotError::NameArea {
                error: crate::name_area::NameAreaError::UnnamedWithOffset { .. },
                ..
            }
        ),
        "{e}"
    );
    let mut outside = snap;
    outside["objects"][1]["name_off"] = serde_json::json!(512);
    let outside: ArbiterSnapshot = serde_json::from_value(outside).expect("parse");
    let e = rebuild(&a, outside).expect_err("refused");
    assert!(
        matches!(
            e,
            SnapshotError::NameArea {
                error: crate::name_area::NameAreaError::OutOfBounds { .. },
                ..
            }
        ),
        "{e}"
    );
}
