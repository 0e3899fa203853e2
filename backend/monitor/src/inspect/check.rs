//! Cross-checks over what the walk found: free entries, lease words against the peer
//! table, overlapping heap ranges, unique generations and names, and heap use.

use std::collections::HashMap;

use vshm_format::layout::{
    object_state, Layout, ObjectEntry, LEASE_CLOSED, LEASE_HOLDERS, LEASE_KEEP,
};

use vshm_format::layout::holder_bit;
use vshm_format::PeerSlot;

use super::walk::Obj;
use super::{HeapUsage, Report, MAX_OVERLAPS};

/// A FREE entry is all zero except `seq` and its lease word, which is exactly CLOSED.
pub(super) fn check_free(e: &ObjectEntry, lease: u64, slot: u32, r: &mut Report) {
    let at = format!("object slot {slot}");
    if lease != LEASE_CLOSED {
        r.error(
            &at,
            format!("free slot's lease word is {lease:#018x}, not CLOSED ({LEASE_CLOSED:#018x})"),
        );
    }
    let leftovers = e.generation != 0
        || e.kind != 0
        || e.offset != 0
        || e.size != 0
        || e.max_size != 0
        || e.flags != 0
        || e.name_len != 0
        || e.name_hash != 0
        || e.name_off != 0
        || e.creator != 0;
    if leftovers {
        r.warning(
            at,
            format!(
                "free entry is not zeroed (generation {}, kind {}, offset {:#x}, max_size {}, \
                 flags {:#x}, name_len {})",
                e.generation, e.kind, e.offset, e.max_size, e.flags, e.name_len
            ),
        );
    }
}

fn slot_list(bits: u64) -> String {
    (0..64u32)
        .filter(|i| bits & (1u64 << i) != 0)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A mutex held by a peer slot that is not connected: vshmd releases it as abandoned at its
/// next sweep (or it is a scribble); a word with HANDOFF but no owner is malformed.
pub(super) fn check_mutex_owner(o: &Obj, connected: u64, r: &mut Report) {
    let Some(sync) = &o.row.sync else {
        return;
    };
    let at = format!("object slot {}", o.row.slot);
    match sync.owner_slot {
        Some(slot) if connected & holder_bit(PeerSlot(slot)) == 0 => r.warning(
            &at,
            format!(
                "mutex owner word {:#018x} names peer slot {slot}, which is not connected: \
                 vshmd releases it as abandoned at its next sweep",
                o.owner_word
            ),
        ),
        None if o.owner_word != 0 => r.warning(
            &at,
            format!(
                "mutex owner word {:#018x} names no peer slot: vshmd frees it at its next sweep",
                o.owner_word
            ),
        ),
        _ => {}
    }
}

/// The lease word of a valid object against its entry and the peer table.
pub(super) fn check_lease(o: &Obj, connected: u64, r: &mut Report) {
    let at = format!("object slot {}", o.row.slot);
    let w = o.lease;
    let holders = w & LEASE_HOLDERS;
    let keep = w & LEASE_KEEP != 0;
    let closed = w & LEASE_CLOSED != 0;
    if closed {
        if holders != 0 || keep {
            r.error(
                &at,
                format!(
                    "lease word {w:#018x} is CLOSED but still has holder bits or KEEP (nobody \
                     sets bits on a closed word)"
                ),
            );
        } else {
            r.note(&at, "closed by its last holder, awaiting reap by the host");
        }
    }
    let stray = holders & !connected;
    if stray != 0 {
        r.error(
            &at,
            format!(
                "lease word {w:#018x} has holder bits of peer slots {} where no peer is connected",
                slot_list(stray)
            ),
        );
    }
    if keep && !o.row.persistent {
        r.error(&at, "KEEP is set but the object is not persistent");
    }
    if keep && o.row.persistent && o.state == object_state::UNLINKED {
        r.warning(
            &at,
            "KEEP is still set on a deleted object (the host clears it right after unlinking)",
        );
    }
    if o.row.persistent && o.state == object_state::LIVE && !keep {
        r.error(&at, "persistent and LIVE but KEEP is not set");
    }
    if !closed && !keep && holders == 0 {
        r.note(
            &at,
            "no holders and no KEEP but not closed: the host closes and reaps it at its next sweep",
        );
    }
}

/// Two valid objects whose `[offset, offset + max_size)` ranges overlap.
pub(super) fn check_overlaps(objs: &[Obj], r: &mut Report) {
    let ranges = objs
        .iter()
        .map(|o| {
            let end = o.row.offset.saturating_add(o.row.max_size);
            (o.row.offset, end, o.row.slot)
        })
        .collect();
    report_overlaps(
        ranges,
        r,
        ("heap", "more overlapping objects; stopped listing them"),
        |(start, end), slot2, (start2, end2)| {
            format!(
                "range [{start:#x}, {end:#x}) overlaps object slot {slot2} \
                 [{start2:#x}, {end2:#x})"
            )
        },
    );
}

/// No two entries' names share a granule of the name area (FORMAT.md §5b): the host gives
/// each name its own granules, so an overlap is a scribbled reference or a host bug.
pub(super) fn check_name_overlaps(objs: &[Obj], r: &mut Report) {
    let ranges = objs
        .iter()
        .filter_map(|o| o.name_range.map(|(start, end)| (start, end, o.row.slot)))
        .collect();
    report_overlaps(
        ranges,
        r,
        ("name area", "more overlapping names; stopped listing them"),
        |(start, end), slot2, (start2, end2)| {
            format!(
                "name [{start:#x}, {end:#x}) overlaps object slot {slot2}'s name \
                 [{start2:#x}, {end2:#x})"
            )
        },
    );
}

/// Reports each pair of `[start, end)` ranges (of the object slot given) that overlap, as
/// an error at the first one's slot, up to [`MAX_OVERLAPS`] (then one error at `limit`).
fn report_overlaps(
    mut ranges: Vec<(u64, u64, u32)>,
    r: &mut Report,
    limit: (&str, &str),
    describe: impl Fn((u64, u64), u32, (u64, u64)) -> String,
) {
    ranges.sort_unstable();
    let mut reported = 0;
    for (i, &(start, end, slot)) in ranges.iter().enumerate() {
        for &(start2, end2, slot2) in &ranges[i + 1..] {
            if start2 >= end {
                break;
            }
            if reported == MAX_OVERLAPS {
                r.error(limit.0, limit.1);
                return;
            }
            reported += 1;
            r.error(
                format!("object slot {slot}"),
                describe((start, end), slot2, (start2, end2)),
            );
        }
    }
}

/// Generations are unique and never 0; no two LIVE objects share a name.
pub(super) fn check_identities(objs: &[Obj], r: &mut Report) {
    let mut generations: HashMap<u64, u32> = HashMap::new();
    let mut names: HashMap<&str, u32> = HashMap::new();
    for o in objs {
        let at = format!("object slot {}", o.row.slot);
        if o.row.generation == 0 {
            r.error(&at, "generation 0 on an object (0 marks a free slot)");
        } else if let Some(other) = generations.insert(o.row.generation, o.row.slot) {
            r.error(
                &at,
                format!(
                    "generation {} is also object slot {other}'s (generations are unique)",
                    o.row.generation
                ),
            );
        }
        if o.state == object_state::LIVE {
            if let Some(name) = o.row.name.as_deref() {
                if let Some(other) = names.insert(name, o.row.slot) {
                    r.error(
                        &at,
                        format!(
                            "name {name:?} is also LIVE in object slot {other} (names are unique \
                             among LIVE objects)"
                        ),
                    );
                }
            }
        }
    }
}

pub(super) fn heap_usage(layout: &Layout, objs: &[Obj]) -> HeapUsage {
    let align = layout.alignment;
    let reserved = objs.iter().fold(0u64, |sum, o| {
        let rounded = o
            .row
            .max_size
            .checked_add(align - 1)
            .map_or(u64::MAX, |v| v & !(align - 1));
        sum.saturating_add(rounded)
    });
    HeapUsage {
        offset: layout.heap_offset,
        size: layout.heap_size,
        alignment: align,
        objects: objs.len(),
        reserved,
        free: layout.heap_size.saturating_sub(reserved),
    }
}

/// A section with a block allocator (docs/FORMAT.md, "Blocks inside a section"): its
/// counters as a note, and whatever `blocks::verify` finds (header, block headers, free
/// lists, counters) as an error — a note while the allocator's lock is held, since a live
/// peer may be midway through an operation.
pub(super) fn check_blocks<M: vshm_format::shm::SharedMemory + ?Sized>(
    mem: &M,
    o: &Obj,
    r: &mut Report,
) {
    use vshm_format::blocks;
    if o.row.kind != "section" {
        return;
    }
    let at = format!("object slot {}", o.row.slot);
    let offset = vshm_format::RegionOffset(o.row.offset);
    match blocks::verify(mem, offset, o.row.size) {
        Ok(None) => {}
        Ok(Some(s)) => r.note(
            at,
            format!(
                "block allocator: {} bytes in use in {} blocks, {} free, largest free {}, fragmentation {:.0}%",
                s.in_use,
                s.count,
                s.free,
                s.largest_free,
                s.fragmentation * 100.0
            ),
        ),
        Err(e) => {
            let locked = o
                .row
                .offset
                .checked_add(blocks::hdr::LOCK)
                .and_then(|l| mem.load_u64(l, std::sync::atomic::Ordering::SeqCst).ok())
                .is_some_and(|w| w != 0);
            if locked {
                r.note(at, format!("block allocator (locked, may be mid-operation): {e}"));
            } else {
                r.error(at, format!("block allocator: {e}"));
            }
        }
    }
}
