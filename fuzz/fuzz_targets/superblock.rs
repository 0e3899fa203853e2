//! Any 256 bytes as a superblock: `Layout::from_superblock` never panics, and a layout it
//! accepts is exactly the computed one and keeps every table inside the region, in order,
//! without overlap, checked through the layout's own accessors.
//!
//! Input: 256 superblock bytes; optional 8 more bytes (LE) are the mapped size, else the
//! mapped size is the superblock's own `region_size`.
#![no_main]

use std::mem::size_of;

use libfuzzer_sys::fuzz_target;
use vshm_format::layout::{
    Layout, Mailbox, ObjectEntry, PeerEntry, Superblock, FORMAT_VERSION, MIN_ALIGNMENT,
};
use vshm_format::{ObjectSlot, PeerSlot};
use vshm_fuzz::{pod_from, prefix};

fuzz_target!(|data: &[u8]| {
    let sb: Superblock = pod_from(data);
    let mapped = match data.get(256..264) {
        Some(m) => u64::from_le_bytes(prefix(m)),
        None => sb.region_size,
    };
    let l = match Layout::from_superblock(&sb, mapped) {
        Ok(l) => l,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    check(&sb, &l, mapped);
});

fn check(sb: &Superblock, l: &Layout, mapped: u64) {
    assert_eq!(sb.version, FORMAT_VERSION);
    assert_eq!(l.region_size, mapped);
    // The layout is the one the host would compute from these parameters (the name area's
    // size is one: FORMAT.md §2), and its
    // superblock is the one accepted (all but the free fields).
    let again = Layout::compute_with_names(
        l.region_size,
        l.max_peers,
        l.max_objects,
        l.vectors,
        l.alignment,
        l.name_area_size,
    );
    assert_eq!(again, Ok(*l));
    let mut want = l.superblock(sb.backend_epoch, sb.region_id);
    want.version = sb.version;
    want.flags = sb.flags;
    want.host_peer_id = sb.host_peer_id;
    want.namespace_seq = sb.namespace_seq;
    // Host-written words a reader does not validate (FORMAT.md §3, §11a).
    want.revoke_seq = sb.revoke_seq;
    want.quarantine_ms = sb.quarantine_ms;
    want.reserved0 = sb.reserved0;
    want.reserved = sb.reserved;
    assert_eq!(&want, sb);

    assert!(l.alignment.is_power_of_two() && l.alignment >= MIN_ALIGNMENT);
    let peer = size_of::<PeerEntry>() as u64;
    let obj = size_of::<ObjectEntry>() as u64;
    let mb = size_of::<Mailbox>() as u64;

    // Peer table: after the superblock, last entry before the object table.
    let first = l.peer_entry(PeerSlot(0)).expect("max_peers >= 1");
    assert!(first >= size_of::<Superblock>() as u64);
    let last = l.peer_entry(PeerSlot(l.max_peers - 1)).expect("last peer");
    assert!(last + peer <= l.object_table);
    assert_eq!(l.peer_entry(PeerSlot(l.max_peers)), None);

    // Object table: 64-aligned, last entry before the refcount rows.
    let first = l.object_entry(ObjectSlot(0)).expect("max_objects >= 1");
    assert_eq!(first % 64, 0);
    let last = l
        .object_entry(ObjectSlot(l.max_objects - 1))
        .expect("last object");
    assert!(last + obj <= l.refcount_table);
    assert_eq!(l.object_entry(ObjectSlot(l.max_objects)), None);

    // Refcount rows: a row holds every object; the last cell is before the mailboxes.
    assert!(u64::from(l.refcount_row_size) >= u64::from(l.max_objects) * 4);
    let p = PeerSlot(l.max_peers - 1);
    let o = ObjectSlot(l.max_objects - 1);
    let cell = l.refcount_cell(p, o).expect("last cell");
    assert!(cell >= l.refcount_table && cell + 4 <= l.mailbox_table);
    let row_end = l.refcount_table + u64::from(l.max_peers) * u64::from(l.refcount_row_size);
    assert!(row_end <= l.mailbox_table);
    assert_eq!(l.refcount_cell(PeerSlot(l.max_peers), ObjectSlot(0)), None);
    assert_eq!(
        l.refcount_cell(PeerSlot(0), ObjectSlot(l.max_objects)),
        None
    );

    // Mailboxes: 64-aligned, the last one ends before the heap.
    let first = l.mailbox(PeerSlot(0)).expect("first mailbox");
    assert_eq!(first % 64, 0);
    let last = l.mailbox(PeerSlot(l.max_peers - 1)).expect("last mailbox");
    assert!(last + mb <= l.heap_offset);
    assert_eq!(l.mailbox(PeerSlot(l.max_peers)), None);

    // Name index (FORMAT.md §5a): after the mailboxes, 64-aligned, a power of two of at
    // least twice max_objects entries, the last one before the heap.
    assert!(last + mb <= l.index_table);
    assert_eq!(l.index_table % 64, 0);
    assert!(l.index_slots.is_power_of_two());
    assert!(u64::from(l.index_slots) >= 2 * u64::from(l.max_objects));
    assert_eq!(l.index_seq(), l.index_table);
    let end = l.index_entry(l.index_slots - 1).expect("last index entry") + 8;
    assert!(end <= l.heap_offset);
    assert_eq!(l.index_entry(l.index_slots), None);

    // Name area (FORMAT.md §5b): after the index, 64-aligned, a multiple of 8 bytes, ends
    // before the heap; a reader accepts references up to the heap (the area and the
    // padding after it, `name_span`): one to the last byte before the heap is inside, one
    // past it is not.
    assert!(end <= l.name_area);
    assert_eq!(l.name_area % 64, 0);
    assert_eq!(l.name_area_size % 8, 0);
    assert!(l.name_area + l.name_area_size <= l.heap_offset);
    let span = l.name_span();
    assert_eq!(l.name_area + span, l.heap_offset);
    assert!(span >= l.name_area_size);
    if let Ok(last) = u32::try_from(span.saturating_sub(8)) {
        if span >= 8 {
            assert_eq!(l.name_bytes(last, 8), Some(l.name_area + u64::from(last)));
            assert_eq!(l.name_bytes(last, 9), None);
        }
    }
    assert_eq!(l.name_bytes(u32::MAX, u64::MAX), None);

    // Heap: aligned, at least one page, ends at the region's end.
    assert_eq!(l.heap_offset % l.alignment, 0);
    assert!(l.heap_size >= l.alignment);
    assert_eq!(l.heap_offset.checked_add(l.heap_size), Some(l.region_size));
    assert!(l.heap_contains(l.heap_offset, l.heap_size));
    assert!(!l.heap_contains(l.heap_offset - 1, 1));
    assert!(!l.heap_contains(l.heap_offset, l.heap_size + 1));
}
