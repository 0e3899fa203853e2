//! The name index (FORMAT.md §5a): decoded entry by entry with the format crate's
//! [`index::decode`], and cross-checked against the valid objects the walk found: every
//! LIVE named object must be reachable from its home position, every entry must point to
//! a LIVE object with that name hash.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use vshm_format::index::{self, IndexWord, INDEX_EMPTY};
use vshm_format::layout::{object_state, Layout};
use vshm_format::shm::SharedMemory;
use vshm_format::{name_hash, ObjectSlot};

use super::walk::Obj;
use super::{IndexUsage, Report};

/// Reads and checks the name index; `None` (with a finding) if it cannot be read.
pub(super) fn check_index<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    objs: &[Obj],
    r: &mut Report,
) -> Option<IndexUsage> {
    let at = "name index";
    let seq = match mem.load_u64(layout.index_seq(), Ordering::Acquire) {
        Ok(s) => s,
        Err(f) => {
            r.error(at, format!("cannot read the name index: {f}"));
            return None;
        }
    };
    if seq & 1 == 1 {
        r.warning(
            at,
            format!(
                "sequence word {seq} is odd: the host is rewriting the index, or it was \
                 scribbled (lookups then scan the object table)"
            ),
        );
    }
    let mut reserved = [0u8; index::INDEX_RESERVED_LEN];
    if mem
        .read_bytes(layout.index_seq() + 8, &mut reserved)
        .is_ok_and(|()| reserved.iter().any(|&b| b != 0))
    {
        r.warning(at, "reserved header bytes 8..64 are not all zero");
    }
    let mut words = Vec::with_capacity(layout.index_slots as usize);
    for pos in 0..layout.index_slots {
        let v = layout
            .index_entry(pos)
            .and_then(|o| mem.load_u64(o, Ordering::Acquire).ok());
        let Some(v) = v else {
            r.error(at, format!("cannot read entry {pos}"));
            return None;
        };
        words.push(v);
    }
    // LIVE named objects by slot: (name, hash).
    let live: HashMap<u32, (&str, u32)> = objs
        .iter()
        .filter(|o| o.state == object_state::LIVE)
        .filter_map(|o| {
            let n = o.row.name.as_deref()?;
            Some((o.row.slot, (n, name_hash(n.as_bytes()))))
        })
        .collect();
    let mut usage = IndexUsage {
        offset: layout.index_table,
        slots: layout.index_slots,
        seq,
        entries: 0,
        tombstones: 0,
        longest_probe: 0,
    };
    for (pos, &v) in (0u32..).zip(&words) {
        let where_ = format!("name index entry {pos}");
        match index::decode(v, layout.max_objects) {
            IndexWord::Empty => {}
            IndexWord::Tombstone => usage.tombstones += 1,
            IndexWord::Invalid(v) => {
                r.error(&where_, format!("value {v:#018x} names no object slot"));
            }
            IndexWord::Points { hash, slot } => {
                usage.entries += 1;
                let home = index::home(hash, layout.index_slots);
                let dist = pos.wrapping_sub(home) & (layout.index_slots - 1);
                usage.longest_probe = usage.longest_probe.max(dist + 1);
                match live.get(&slot.0) {
                    Some(&(_, h)) if h == hash => {}
                    _ => r.warning(
                        &where_,
                        format!(
                            "points to object slot {} for name hash {hash:#010x}, which holds \
                             no LIVE object of that hash (a removal in progress, or scribbled)",
                            slot.0
                        ),
                    ),
                }
            }
        }
    }
    let mut slots: Vec<_> = live.iter().collect();
    slots.sort_unstable_by_key(|(s, _)| **s);
    for (&slot, &(name, hash)) in slots {
        let word = index::entry(hash, ObjectSlot(slot));
        if index::position_of(&words, hash, word).is_none() {
            r.error(
                format!("object slot {slot}"),
                format!(
                    "LIVE object {name:?} is not reachable in the name index: lookups by name \
                     do not find it (the host heals the index)"
                ),
            );
        }
    }
    let free = words.iter().filter(|&&w| w == INDEX_EMPTY).count();
    if free == 0 {
        r.warning(at, "no EMPTY entry: every lookup scans the object table");
    }
    Some(usage)
}
