//! Any bytes as an object entry and its layout's name area: `object::validate` never
//! panics; an entry it accepts has a defined state and kind, a range that is inside the
//! heap (a section: aligned, non-empty, size within max size) or empty (an event or mutex),
//! known flags, a name reference inside the name area (aligned, at most 1040 bytes) and a
//! valid name there whose hash matches. The same entry placed in a region and read with the
//! seqlock snapshot (`object::read_object`, which reads the name from the area) gets the
//! same verdict. The first 64 bytes are also checked as a peer-table entry
//! (`peer::validate_peer`).
//!
//! Input: 128 entry bytes; an optional 129th byte picks the layout and the slot; the rest
//! (if any) is the start of the name area.
#![no_main]

use std::mem::size_of;
use std::sync::atomic::Ordering;

use libfuzzer_sys::fuzz_target;
use vshm_format::layout::{
    kind, object_flags, object_state, peer_state, ObjectEntry, PeerEntry, OBJ_SEQ_OFF,
};
use vshm_format::object::{self, EntryError, ObjectInfo, Snapshot};
use vshm_format::peer::validate_peer;
use vshm_format::shm::{bytes_of, SharedMemory};
use vshm_format::{name_hash, validate_name, ObjectSlot, PeerSlot};
use vshm_fuzz::{layout, pod_from, Buf};

fuzz_target!(|data: &[u8]| {
    let entry_len = size_of::<ObjectEntry>();
    let selector = data.get(entry_len).copied().unwrap_or(0);
    let l = layout(selector);
    let e: ObjectEntry = pod_from(data);
    let area = data.get(entry_len + 1..).unwrap_or(&[]);
    let area = &area[..area
        .len()
        .min(usize::try_from(l.name_span()).expect("small"))];
    let slot = ObjectSlot(u32::from(selector) % l.max_objects.min(8));
    // What a reader copies: the name's bytes if the reference is inside the area.
    let name: Vec<u8> = match object::check_name_ref(&l, e.name_off, e.name_len) {
        Ok(Some(_)) => {
            let from = e.name_off as usize;
            (from..from + usize::from(e.name_len))
                .map(|i| area.get(i).copied().unwrap_or(0))
                .collect()
        }
        _ => Vec::new(),
    };
    let snap = Snapshot::of(e, &name);
    let verdict = object::validate(&l, slot, &snap);
    match &verdict {
        Ok(None) => assert_eq!(e.state, object_state::FREE),
        Ok(Some(info)) => check_accepted(&l, slot, &e, info),
        Err(err) => {
            let _ = err.to_string();
        }
    }

    // The same bytes through the region and the seqlock reader. The region ends after the
    // name area or the entry, whichever is later (the name area sits after the tables).
    let base = l.object_entry(slot).expect("slot in range");
    let end = (base + entry_len as u64).max(l.name_area + l.name_span());
    let mut buf = Buf::new(usize::try_from(end).expect("small"));
    let mem = buf.region();
    mem.write_bytes(base, bytes_of(&e)).expect("in bounds");
    mem.write_bytes(l.name_area, area).expect("in bounds");
    if e.seq & 1 == 1 {
        // A writer in progress: the reader gives up after its retries (10 000 spins, so
        // only checked for one selector in 16, to keep the target fast) ...
        if selector >> 4 == 0xF {
            assert_eq!(object::read_object(&mem, &l, slot), Err(EntryError::Busy));
        }
        // ... and once the writer is done (seq even), agrees with validate.
        mem.store_u64(base + OBJ_SEQ_OFF, e.seq.wrapping_add(1), Ordering::Relaxed)
            .expect("in bounds");
    }
    let read = object::read_object(&mem, &l, slot);
    assert_eq!(
        read.map(|o| o.map(summary)),
        verdict.map(|o| o.map(summary))
    );

    // The first 64 bytes as a peer-table entry.
    let p: PeerEntry = pod_from(data);
    match validate_peer(PeerSlot(0), &p) {
        Ok(None) => assert_eq!(p.state, peer_state::ABSENT),
        Ok(Some(info)) => {
            assert_eq!(p.state, peer_state::CONNECTED);
            assert_ne!(info.peer_id.raw(), 0);
            assert_eq!(u32::from(info.peer_id.raw()), p.peer_id);
            assert_eq!(info.incarnation, p.incarnation);
        }
        Err(err) => {
            let _ = err.to_string();
        }
    }
});

/// What a reader learns from an accepted entry (the name array beyond the name's length
/// is not part of it: the snapshot does not copy it).
fn summary(i: ObjectInfo) -> (u32, u64, u32, u32, u64, u64, u64, u32, u32, Option<String>) {
    (
        i.slot.0,
        i.generation.0,
        i.state,
        i.kind,
        i.offset.0,
        i.size,
        i.max_size,
        i.flags,
        i.creator,
        i.name().map(str::to_owned),
    )
}

fn check_accepted(
    l: &vshm_format::layout::Layout,
    slot: ObjectSlot,
    e: &ObjectEntry,
    info: &ObjectInfo,
) {
    assert_eq!(info.slot, slot);
    assert!(matches!(
        info.state,
        object_state::LIVE | object_state::UNLINKED
    ));
    match info.kind {
        kind::SECTION => {
            assert!(info.max_size > 0);
            assert!(info.size <= info.max_size);
            assert_eq!(info.offset.0 % l.alignment, 0);
            assert!(l.heap_contains(info.offset.0, info.max_size));
            assert!(info.offset.0 >= l.heap_offset);
            assert!(info.offset.0 + info.max_size <= l.region_size);
            assert!(info.flags & object_flags::MANUAL_RESET == 0);
        }
        kind::EVENT | kind::MUTEX => {
            assert_eq!((info.offset.0, info.size, info.max_size), (0, 0, 0));
            if info.kind == kind::MUTEX {
                assert!(info.flags & object_flags::MANUAL_RESET == 0);
            }
        }
        other => panic!("accepted kind {other}"),
    }
    assert_eq!(info.flags & !object_flags::ALL, 0);
    match info.name() {
        Some(name) => {
            assert!(info.flags & object_flags::NAMED != 0);
            assert_eq!(name.len(), usize::from(e.name_len));
            assert_eq!(
                object::check_name_ref(l, e.name_off, e.name_len).map(|r| r.is_some()),
                Ok(true)
            );
            assert_eq!(validate_name(name), Ok(()));
            assert_eq!(name_hash(name.as_bytes()), e.name_hash);
        }
        None => {
            assert!(info.flags & object_flags::NAMED == 0);
            assert_eq!((e.name_len, e.name_off), (0, 0));
        }
    }
}
