//! Unit tests of `heal`: a region nobody scribbled on is never rewritten (whatever the
//! namespace went through), and each host-written structure a peer scribbles on is put
//! back, counted and reported, with the reports rate-limited.

use std::sync::atomic::Ordering;

use vshm_format::layout::{
    kind, object_state, Layout, Superblock, LEASE_CLOSED, OBJ_LEASE_OFF, OBJ_SIGNAL_SEQ_OFF,
    SB_NAMESPACE_SEQ_OFF,
};
use vshm_format::lease::acquire;
use vshm_format::mailbox;
use vshm_format::object::{self, make_entry};
use vshm_format::shm::{bytes_of, read_pod, SharedMemory};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};

use super::tests::{arbiter, create, request};
use super::{Arbiter, HealReport};
use crate::region::Region;

fn repaired_details(a: &mut Arbiter<Region>) -> Vec<String> {
    a.drain_events()
        .filter(|e| e.kind == "repaired")
        .map(|e| e.detail.unwrap_or_default())
        .collect()
}

#[test]
fn a_region_nobody_scribbled_on_is_never_rewritten() {
    let mut a = arbiter();
    assert!(a.heal().is_clean(), "fresh region");
    let kept = create(&mut a, PeerId(1), "kept", true);
    let gone = create(&mut a, PeerId(2), "gone", false);
    let ev = mailbox::create_request(Some("ev"), kind::EVENT, 0, 0, false);
    let ev = request(&mut a, PeerId(3), &ev);
    // A signalled event (its sync words are the peers'), a grown section, a deleted one,
    // a departed peer, a destroyed event whose words were used: all as the host left them.
    let l = *a.layout();
    let ev_base = l.object_entry(ObjectSlot(ev.slot)).expect("slot");
    a.mem()
        .store_u64(ev_base + OBJ_SIGNAL_SEQ_OFF, 7, Ordering::SeqCst)
        .expect("signal");
    let grow = mailbox::grow_request(ObjectSlot(kept.slot), Generation(kept.generation), 8192);
    request(&mut a, PeerId(1), &grow);
    let del = mailbox::delete_request(ObjectSlot(gone.slot), Generation(gone.generation));
    request(&mut a, PeerId(2), &del);
    a.peer_gone(PeerId(3));
    a.peer_gone(PeerId(2));
    a.sweep();
    assert!(
        a.record_at(ObjectSlot(ev.slot)).is_none(),
        "event destroyed"
    );
    assert_eq!(a.heal(), HealReport::default());
    assert_eq!(a.counters().heals, 0);
    assert!(repaired_details(&mut a).is_empty());
}

#[test]
fn a_scribbled_superblock_is_rewritten_and_validates_again() {
    let mut a = arbiter();
    let before: Superblock = read_pod(a.mem(), 0).expect("read");
    let junk: Vec<u8> = (0..=255u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    a.mem().write_bytes(0, &junk).expect("scribble");
    let r = a.heal();
    assert!(r.superblock);
    let after: Superblock = read_pod(a.mem(), 0).expect("read");
    let size = a.mem().size();
    assert_eq!(Layout::from_superblock(&after, size), Ok(*a.layout()));
    let mut want = before;
    want.namespace_seq = after.namespace_seq;
    assert_eq!(bytes_of(&after), bytes_of(&want));
    assert!(
        after.namespace_seq > before.namespace_seq,
        "a namespace_seq scribbled backwards or forwards never ends up below what was published"
    );
    assert_eq!(a.counters().heals, r.repairs());
    let d = repaired_details(&mut a);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].starts_with("superblock [0x0, 0x100) rewritten"),
        "{d:?}"
    );
}

#[test]
fn a_namespace_seq_scribbled_backwards_is_raised_past_every_published_value() {
    let mut a = arbiter();
    create(&mut a, PeerId(1), "x", false);
    a.heal();
    let seq = object::namespace_seq(a.mem()).expect("seq");
    a.mem()
        .store_u64(SB_NAMESPACE_SEQ_OFF, 1, Ordering::SeqCst)
        .expect("scribble");
    let r = a.heal();
    assert!(r.namespace_seq && !r.superblock, "{r:?}");
    assert_eq!(object::namespace_seq(a.mem()), Ok(seq + 1));
    // Ahead is kept: peers only look again.
    a.mem()
        .store_u64(SB_NAMESPACE_SEQ_OFF, seq + 100, Ordering::SeqCst)
        .expect("scribble");
    assert!(a.heal().is_clean());
    assert_eq!(object::namespace_seq(a.mem()), Ok(seq + 100));
}

#[test]
fn a_scribbled_live_entry_is_republished_and_its_lease_left_alone() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "victim", false);
    let other = create(&mut a, PeerId(1), "other", false);
    let l = *a.layout();
    let base = l.object_entry(ObjectSlot(r.slot)).expect("slot");
    let lease = a.mem().load_u64(base + OBJ_LEASE_OFF, Ordering::SeqCst);
    a.mem().write_bytes(base, &[0xA5; 64]).expect("head");
    let other_name = name_at(&a, ObjectSlot(other.slot));
    a.mem().write_bytes(other_name, b"oops").expect("name");
    assert_eq!(object::find_by_name(a.mem(), &l, "victim"), Ok(None));
    assert_eq!(object::find_by_name(a.mem(), &l, "other"), Ok(None));
    let rep = a.heal();
    assert_eq!(
        rep.object_slots,
        vec![ObjectSlot(r.slot), ObjectSlot(other.slot)]
    );
    assert_eq!(rep.names, vec![ObjectSlot(other.slot)]);
    for (name, slot) in [("victim", r.slot), ("other", other.slot)] {
        let found = object::find_by_name(a.mem(), &l, name)
            .expect("scan")
            .expect("found");
        assert_eq!(found.slot, ObjectSlot(slot));
    }
    assert_eq!(
        a.mem().load_u64(base + OBJ_LEASE_OFF, Ordering::SeqCst),
        lease
    );
    let d = repaired_details(&mut a);
    assert_eq!(d.len(), 1, "one event for the object table: {d:?}");
    assert!(
        d[0].starts_with(&format!(
            "object slot {} [{base:#x}, {:#x}) rewritten (+1 more)",
            r.slot,
            base + 128
        )),
        "{d:?}"
    );
}

#[test]
fn a_forged_live_entry_in_a_free_slot_is_erased_to_the_free_image() {
    let mut a = arbiter();
    let victim = create(&mut a, PeerId(1), "victim", false);
    let l = *a.layout();
    let forged = ObjectSlot(5);
    let entry = make_entry(
        Generation(99),
        object_state::LIVE,
        kind::SECTION,
        RegionOffset(victim.offset),
        4096,
        8192,
        false,
        Some("forged"),
        PeerId(2),
    );
    let mut entry = entry;
    entry.name_off = u32::try_from(l.name_area_size - 8).expect("small");
    object::publish_named(a.mem(), &l, forged, &entry, b"forged").expect("forge");
    let base = l.object_entry(forged).expect("slot");
    a.mem()
        .store_u64(base + OBJ_LEASE_OFF, 0, Ordering::SeqCst)
        .expect("open the lease");
    a.mem()
        .store_u64(base + OBJ_SIGNAL_SEQ_OFF, 3, Ordering::SeqCst)
        .expect("sync word");
    // The name index does not know it (only the host writes the index), but a scan does.
    assert_eq!(object::find_by_name(a.mem(), &l, "forged"), Ok(None));
    assert!(object::scan_by_name(a.mem(), &l, "forged")
        .expect("scan")
        .is_some());
    assert_eq!(a.heal().object_slots, vec![forged]);
    assert_eq!(object::scan_by_name(a.mem(), &l, "forged"), Ok(None));
    assert_eq!(object::find_by_name(a.mem(), &l, "forged"), Ok(None));
    assert!(
        acquire(a.mem(), &l, PeerSlot(2), forged, Generation(99), false).is_err(),
        "nobody can take a hold through it"
    );
    let mut raw = [0u8; 128];
    a.mem().read_bytes(base, &mut raw).expect("read");
    assert_eq!(u64::from_le_bytes(raw[0..8].try_into().expect("8")) & 1, 0);
    assert_eq!(
        u64::from_le_bytes(raw[64..72].try_into().expect("8")),
        LEASE_CLOSED
    );
    assert!(raw[8..64].iter().chain(&raw[72..]).all(|&b| b == 0));
    assert!(a.heal().is_clean());
}

/// Region offset of the name of the object in `slot`, from the entry the host published.
fn name_at(a: &Arbiter<Region>, slot: ObjectSlot) -> u64 {
    let e = object::snapshot(a.mem(), a.layout(), slot, false).expect("entry");
    object::check_name_ref(a.layout(), e.name_off, e.name_len)
        .expect("sane reference")
        .expect("named")
}

#[test]
fn a_name_scribbled_in_the_name_area_is_restored_from_the_host_records() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "frames-of-cam0", false);
    let kept = create(&mut a, PeerId(2), "kept", false);
    let l = *a.layout();
    let at = name_at(&a, ObjectSlot(r.slot));
    a.mem().write_bytes(at + 7, b"X").expect("scribble");
    assert_eq!(
        object::find_by_name(a.mem(), &l, "frames-of-cam0"),
        Ok(None),
        "a scribbled name hides the object until the heal"
    );
    let seq = object::namespace_seq(a.mem()).expect("seq");
    let rep = a.heal();
    assert_eq!(rep.names, vec![ObjectSlot(r.slot)]);
    assert_eq!(rep.object_slots, vec![ObjectSlot(r.slot)]);
    assert!(
        object::namespace_seq(a.mem()).expect("seq") > seq,
        "rewritten through the entry's seqlock"
    );
    let found = object::find_by_name(a.mem(), &l, "frames-of-cam0")
        .expect("lookup")
        .expect("found again");
    assert_eq!(found.slot, ObjectSlot(r.slot));
    assert_eq!(
        object::find_by_name(a.mem(), &l, "kept")
            .expect("lookup")
            .map(|i| i.slot),
        Some(ObjectSlot(kept.slot))
    );
    let d = repaired_details(&mut a);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        d[0].starts_with(&format!(
            "name of object slot {} [{at:#x}, {:#x}) rewritten",
            r.slot,
            at + 14
        )),
        "{d:?}"
    );
    assert!(a.heal().is_clean());
}

#[test]
fn a_scribbled_name_reference_is_republished_pointing_at_the_hosts_name() {
    let mut a = arbiter();
    let r = create(&mut a, PeerId(1), "victim", false);
    let l = *a.layout();
    let base = l.object_entry(ObjectSlot(r.slot)).expect("slot");
    // name_off (bytes 60..64) pointed far outside the area.
    a.mem()
        .store_u32(base + 60, 0xFFFF_FFF8, Ordering::SeqCst)
        .expect("scribble");
    assert_eq!(object::find_by_name(a.mem(), &l, "victim"), Ok(None));
    assert_eq!(a.heal().object_slots, vec![ObjectSlot(r.slot)]);
    assert!(object::find_by_name(a.mem(), &l, "victim")
        .expect("lookup")
        .is_some());
}

#[test]
fn a_scribbled_peer_table_is_rewritten_from_the_peer_records() {
    let mut a = arbiter();
    a.peer_gone(PeerId(2));
    let l = *a.layout();
    let table = l.peer_entry(PeerSlot(0)).expect("slot");
    let junk: Vec<u8> = (0..=255u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(5))
        .collect();
    a.mem().write_bytes(table, &junk).expect("scribble");
    assert!(!object::peer_still_attached(
        a.mem(),
        &l,
        PeerSlot(0),
        PeerId(1),
        1
    ));
    let r = a.heal();
    assert_eq!(
        r.peer_slots,
        (0..4).map(PeerSlot).collect::<Vec<_>>(),
        "all four slots were hit"
    );
    assert!(object::peer_still_attached(
        a.mem(),
        &l,
        PeerSlot(0),
        PeerId(1),
        1
    ));
    assert!(object::peer_still_attached(
        a.mem(),
        &l,
        PeerSlot(2),
        PeerId(3),
        1
    ));
    assert_eq!(
        object::read_peer(a.mem(), &l, PeerSlot(0)).map(|p| p.doorbell),
        Some(true),
        "the DOORBELL flag is back: signallers ring the peer directly again"
    );
    assert_eq!(object::read_peer(a.mem(), &l, PeerSlot(1)), None, "absent");
    assert_eq!(
        object::read_peer(a.mem(), &l, PeerSlot(3)),
        None,
        "never used"
    );
    assert_eq!(object::find_peer_slot(a.mem(), &l, PeerId(2)), None);
    assert!(a.heal().is_clean());
    let d = repaired_details(&mut a);
    assert!(
        d[0].starts_with("peer slot 0 [0x100, 0x140) rewritten (+3 more)"),
        "{d:?}"
    );
}

#[test]
fn a_scribbler_in_a_loop_is_counted_every_time_but_reported_once_a_second() {
    let mut a = arbiter();
    for _ in 0..5 {
        a.mem().write_bytes(0, &[0xFF; 8]).expect("scribble");
        assert!(a.heal().superblock);
    }
    assert_eq!(a.counters().heals, 5);
    assert_eq!(repaired_details(&mut a).len(), 1);
}

#[test]
fn a_scribbled_name_index_is_rewritten_from_the_records_and_lookups_work_again() {
    let mut a = arbiter();
    let names: Vec<String> = (0..6).map(|i| format!("ix{i}")).collect();
    for n in &names {
        create(&mut a, PeerId(1), n, true);
    }
    let l = *a.layout();
    assert!(a.heal().is_clean());
    // A peer overwrites the whole index: EMPTY everywhere, and an odd sequence word.
    for pos in 0..l.index_slots {
        vshm_format::index::store_entry(a.mem(), &l, pos, 0).expect("scribble");
    }
    a.mem()
        .store_u64(l.index_seq(), 41, Ordering::SeqCst)
        .expect("scribble seq");
    // Lookups are not misled: an odd sequence word sends them to the scan.
    for n in &names {
        assert!(object::find_by_name(a.mem(), &l, n)
            .expect("lookup")
            .is_some());
    }
    // With an even one, the index says "not found": a scribble can hide names...
    a.mem()
        .store_u64(l.index_seq(), 42, Ordering::SeqCst)
        .expect("scribble seq");
    assert_eq!(object::find_by_name(a.mem(), &l, &names[0]), Ok(None));
    // ...until the next heal puts the index back, past the scribbled sequence value.
    let r = a.heal();
    assert!(r.index && r.object_slots.is_empty(), "{r:?}");
    assert!(object::namespace_seq(a.mem()).is_ok());
    let seq = a
        .mem()
        .load_u64(l.index_seq(), Ordering::SeqCst)
        .expect("seq");
    assert!(seq > 42 && seq % 2 == 0, "{seq}");
    for n in &names {
        assert!(
            object::find_by_name(a.mem(), &l, n)
                .expect("lookup")
                .is_some(),
            "{n}"
        );
    }
    assert!(a.heal().is_clean(), "clean once healed");
    assert!(a.counters().heals >= 1);
}

#[test]
fn deleted_and_destroyed_names_leave_the_index_and_new_ones_enter_it() {
    let mut a = arbiter();
    let l = *a.layout();
    let keep = create(&mut a, PeerId(1), "keep", true);
    let gone = create(&mut a, PeerId(1), "gone", true);
    assert!(object::find_by_name(a.mem(), &l, "gone")
        .expect("lookup")
        .is_some());
    assert_eq!(
        a.delete_by_name("gone"),
        Ok(()),
        "deleted by the host's own authority"
    );
    assert_eq!(object::find_by_name(a.mem(), &l, "gone"), Ok(None));
    let again = create(&mut a, PeerId(1), "gone", true);
    let found = object::find_by_name(a.mem(), &l, "gone")
        .expect("lookup")
        .expect("found");
    assert_eq!(
        (found.slot.raw(), found.generation.raw()),
        (again.slot, again.generation)
    );
    assert_ne!(again.generation, gone.generation);
    assert!(object::find_by_name(a.mem(), &l, "keep")
        .expect("lookup")
        .is_some_and(|i| i.slot.raw() == keep.slot));
    assert!(a.heal().is_clean(), "the published index is the mirror");
}

#[test]
fn a_doorbell_heal_looks_at_a_slice_of_the_object_table_round_robin_and_the_timer_at_all_of_it() {
    let region = Region::create(16 << 20, false, false).expect("memfd");
    let layout = Layout::compute(16 << 20, 4, 4096, 1, 4096).expect("layout");
    let mut a = Arbiter::new(region, layout, 1, [0; 16]).expect("arbiter");
    // A forged LIVE entry in a free slot far into the table (slot 3000 of 4096).
    let far = ObjectSlot(3000);
    let base = layout.object_entry(far).expect("slot");
    a.mem()
        .store_u32(
            base + vshm_format::layout::OBJ_STATE_OFF,
            object_state::LIVE,
            Ordering::SeqCst,
        )
        .expect("scribble");
    // The first doorbell heal looks at slots 0..1024: not there yet.
    let r = a.heal_soon().expect("due: no heal ran yet");
    assert!(r.object_slots.is_empty(), "{r:?}");
    assert!(a.heal_soon().is_none(), "at most one every 20 ms");
    // Each later one at the next 1024 slots: the third finds it.
    std::thread::sleep(std::time::Duration::from_millis(25));
    assert!(a.heal_soon().expect("due").object_slots.is_empty());
    std::thread::sleep(std::time::Duration::from_millis(25));
    assert_eq!(a.heal_soon().expect("due").object_slots, vec![far]);
    // The timer's heal looks at every slot.
    a.mem()
        .store_u32(
            base + vshm_format::layout::OBJ_STATE_OFF,
            object_state::LIVE,
            Ordering::SeqCst,
        )
        .expect("scribble again");
    assert_eq!(a.heal().object_slots, vec![far]);
}
