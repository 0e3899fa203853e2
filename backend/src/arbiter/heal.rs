//! Healing: vshmd owns what it publishes. `heal` compares the host-written parts of the
//! header — the superblock, the peer table, every object entry (FREE slots included), the
//! names in the name area and the name index —
//! with what the private records say they must be, rewrites what differs, and counts and
//! reports each repair. Any party can write any byte of the region (ivshmem has no memory
//! protection), so a peer scribbling once over the header must not break the namespace for
//! everybody until vshmd restarts: after the scribbling stops, the next heal (timer: every
//! 200 ms) puts everything the host owns back.
//!
//! What is *not* healed here: peer-written words — lease words of live objects (the sweep
//! repairs those against the refcount rows), sync words of live objects (§6a), refcount
//! rows and mailboxes — and the heap.
//!
//! Cost: one volatile copy of each structure (256 + 64 × `max_peers` + 128 ×
//! `max_objects` bytes: 128 KiB for 1024 objects; the name of every named object, read
//! from the name area; and the name index, 8 bytes per entry, compared with the host's
//! mirror word by word) and a byte compare; a rewrite only where something differs, so a
//! clean region is never written. The name area's free room is not compared: no entry
//! points there, and the host writes a name's bytes before an entry points to them.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vshm_format::layout::{
    const_usize, peer_flags, peer_state, ObjectEntry, PeerEntry, Superblock, FORMAT_VERSION,
    LEASE_CLOSED, OBJ_HEAD_LEN, OBJ_LEASE_OFF, OBJ_RESERVED_OFF, PEER_FLAGS_OFF, PEER_ID_OFF,
    PEER_INCARNATION_OFF, PEER_STATE_OFF, SB_NAMESPACE_SEQ_OFF, SB_VERSION_OFF,
};
use vshm_format::object;
use vshm_format::shm::{bytes_of, read_pod, zeroed};
use vshm_format::sync;
use vshm_format::{ObjectSlot, PeerSlot};

use super::{Arbiter, Backing};
use crate::telemetry::Event;

/// At most one `repaired` event per structure (superblock, peer table, object table) in
/// this long; repairs in between are counted (`counters.heals`) and summed into the next
/// event, so a peer scribbling in a loop cannot flood the event stream or the log.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The doorbell path heals at most this often (a burst of doorbells heals at its start and
/// then every 20 ms); the 200 ms timer heals regardless.
const DOORBELL_HEAL_GAP: Duration = Duration::from_millis(20);
/// Object entries a doorbell's heal looks at (round robin through the table).
const DOORBELL_HEAL_OBJECTS: u32 = 1024;

/// Superblock, peer table, object table, name index: the structures reports are
/// rate-limited by.
const STRUCTURES: usize = 4;
const SUPERBLOCK: usize = 0;
const PEER_TABLE: usize = 1;
const OBJECT_TABLE: usize = 2;
const NAME_INDEX: usize = 3;

const SB_SIZE: usize = size_of::<Superblock>();
const SB_VERSION: usize = const_usize(SB_VERSION_OFF);
const SB_NS_SEQ: usize = const_usize(SB_NAMESPACE_SEQ_OFF);
const ENTRY_SIZE: usize = size_of::<ObjectEntry>();
/// The lease word and the four sync words (peer-written) end here; the reserved bytes
/// follow to the end of the entry.
const SYNC_END: usize = const_usize(OBJ_RESERVED_OFF);

/// What one `heal` put right.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealReport {
    /// The superblock (other than `namespace_seq`) differed and was rewritten.
    pub superblock: bool,
    /// `namespace_seq` had gone backwards and was raised past every value published.
    pub namespace_seq: bool,
    /// Peer-table entries rewritten.
    pub peer_slots: Vec<PeerSlot>,
    /// Object entries rewritten (a FREE slot gets the canonical FREE image).
    pub object_slots: Vec<ObjectSlot>,
    /// Of those, the ones whose name in the name area differed (rewritten with the entry).
    pub names: Vec<ObjectSlot>,
    /// The name index differed from the host's mirror and was rewritten (FORMAT.md §5a).
    pub index: bool,
}

impl HealReport {
    /// Repairs made (one per structure or entry rewritten).
    pub fn repairs(&self) -> u64 {
        u64::from(self.superblock)
            + u64::from(self.namespace_seq)
            + self.peer_slots.len() as u64
            + self.object_slots.len() as u64
            + u64::from(self.index)
    }

    /// Nothing differed.
    pub fn is_clean(&self) -> bool {
        self.repairs() == 0
    }
}

/// What healing remembers from one run to the next.
#[derive(Debug, Default)]
pub(super) struct HealState {
    /// The highest `namespace_seq` seen so far: the value never goes below it.
    namespace_seq: u64,
    /// When the last heal ran.
    last_run: Option<Instant>,
    /// The object slot the next doorbell heal starts at (it looks at a slice of the table,
    /// round robin).
    cursor: u32,
    /// Per structure: when a repair was last reported.
    reported: [Option<Instant>; STRUCTURES],
    /// Per structure: repairs since that report that were only counted.
    unreported: [u64; STRUCTURES],
}

impl HealState {
    /// The highest `namespace_seq` seen so far.
    pub(super) fn namespace_seq(&self) -> u64 {
        self.namespace_seq
    }

    /// Takes over another process's floor for `namespace_seq` (it never goes below it).
    pub(super) fn raise_namespace_seq(&mut self, seen: u64) {
        self.namespace_seq = self.namespace_seq.max(seen);
    }
}

/// The first repair of a structure in one heal, and how many there were.
#[derive(Default)]
struct Found {
    first: Option<String>,
    count: u64,
}

impl Found {
    fn add(&mut self, what: impl FnOnce() -> String) {
        if self.first.is_none() {
            self.first = Some(what());
        }
        self.count += 1;
    }
}

fn range(start: u64, len: usize) -> String {
    format!("[{start:#x}, {:#x})", start + len as u64)
}

fn all_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

impl<M: Backing> Arbiter<M> {
    /// Compares everything the host publishes in the header with its private state and
    /// rewrites what differs; counts every repair in `counters.heals` and reports them as
    /// `repaired` events naming the region range (rate-limited per structure). Runs on the
    /// timer and after doorbells.
    pub fn heal(&mut self) -> HealReport {
        self.heal_part(None)
    }

    /// [`Arbiter::heal`], of every object entry and the name index (`objects` = `None`), or
    /// of the superblock, the peer table and the next `objects` object entries (round
    /// robin) alone: the doorbell path, whose cost must not grow with the table.
    fn heal_part(&mut self, objects: Option<u32>) -> HealReport {
        let mut report = HealReport::default();
        let mut found: [Found; STRUCTURES] = Default::default();
        self.heal_superblock(&mut report, &mut found[SUPERBLOCK]);
        self.heal_peers(&mut report, &mut found[PEER_TABLE]);
        let max = self.layout.max_objects;
        let slots: Vec<ObjectSlot> = match objects {
            Some(n) if n < max => {
                let start = self.heal.cursor % max;
                self.heal.cursor = (start + n) % max;
                (0..n).map(|i| ObjectSlot((start + i) % max)).collect()
            }
            _ => self.object_slots().collect(),
        };
        self.heal_objects(&slots, &mut report, &mut found[OBJECT_TABLE]);
        if objects.is_none() {
            self.heal_index(&mut report, &mut found[NAME_INDEX]);
        }
        // Every value published so far, ours included (each rewrite above bumped it).
        if let Ok(now) = self.mem.load_u64(SB_NAMESPACE_SEQ_OFF, Ordering::Acquire) {
            self.heal.namespace_seq = self.heal.namespace_seq.max(now);
        }
        self.counters.heals += report.repairs();
        let now = Instant::now();
        self.heal.last_run = Some(now);
        for (which, f) in found.into_iter().enumerate() {
            self.report_heal(which, f, now);
        }
        report
    }

    /// After a doorbell: the superblock, the peer table and the next
    /// [`DOORBELL_HEAL_OBJECTS`] object entries, unless a heal ran less than 20 ms ago (a
    /// peer ringing in a loop must not make vshmd copy the header for every ring, and the
    /// cost of one must not grow with `--max-objects`: BENCHMARKS.md P2). The timer's
    /// [`Arbiter::heal`] looks at everything.
    pub fn heal_soon(&mut self) -> Option<HealReport> {
        let due = self
            .heal
            .last_run
            .is_none_or(|t| t.elapsed() >= DOORBELL_HEAL_GAP);
        due.then(|| self.heal_part(Some(DOORBELL_HEAL_OBJECTS)))
    }

    /// The superblock: all 256 bytes but `namespace_seq` must be what `Arbiter::new`
    /// wrote; they are rewritten with `version` stored last (release), as at startup, so a
    /// reader that copies it meanwhile sees a superblock that does not validate (and tries
    /// again) rather than a half-right one that does.
    ///
    /// `namespace_seq` is host-written too, but only ever moves forward: a value ahead of
    /// the host's is kept (peers only compare it for change, and a forward jump just makes
    /// them look again); a value below the highest one seen could make a peer take a
    /// changed table for an unchanged one, so it is raised to one past that highest value,
    /// a value no peer can have cached.
    fn heal_superblock(&mut self, report: &mut HealReport, found: &mut Found) {
        let Ok(cur) = read_pod::<Superblock, _>(&self.mem, 0) else {
            return;
        };
        let mut want = self.expected_superblock();
        want.version = FORMAT_VERSION;
        want.namespace_seq = cur.namespace_seq;
        if bytes_of(&cur) != bytes_of(&want) {
            let b = bytes_of(&want);
            let _ = self.mem.write_bytes(0, &b[..SB_VERSION]);
            let _ = self
                .mem
                .write_bytes(SB_VERSION_OFF + 4, &b[SB_VERSION + 4..SB_NS_SEQ]);
            let _ = self
                .mem
                .write_bytes(SB_NAMESPACE_SEQ_OFF + 8, &b[SB_NS_SEQ + 8..SB_SIZE]);
            let _ = self
                .mem
                .store_u32(SB_VERSION_OFF, FORMAT_VERSION, Ordering::Release);
            report.superblock = true;
            found.add(|| format!("superblock {}", range(0, SB_SIZE)));
        }
        let Ok(seq) = self.mem.load_u64(SB_NAMESPACE_SEQ_OFF, Ordering::Acquire) else {
            return;
        };
        let floor = self.heal.namespace_seq;
        if seq < floor {
            let raised = floor.wrapping_add(1);
            let _ = self
                .mem
                .store_u64(SB_NAMESPACE_SEQ_OFF, raised, Ordering::Release);
            report.namespace_seq = true;
            found.add(|| {
                format!(
                    "superblock namespace_seq {} went back to {seq}, raised to {raised}",
                    range(SB_NAMESPACE_SEQ_OFF, 8)
                )
            });
        }
    }

    /// Each peer-table entry: a CONNECTED slot as `peer_connected` wrote it; any other the
    /// ABSENT image keeping the last peer id and incarnation (FORMAT §4). Rewritten with
    /// `state` last when CONNECTED (release, as at connect) and first when ABSENT.
    fn heal_peers(&mut self, report: &mut HealReport, found: &mut Found) {
        for (slot, rec) in self.peer_slots() {
            let Some(base) = self.layout.peer_entry(slot) else {
                continue;
            };
            let Ok(cur) = read_pod::<PeerEntry, _>(&self.mem, base) else {
                continue;
            };
            let mut want = zeroed::<PeerEntry>();
            want.state = if rec.connected {
                peer_state::CONNECTED
            } else {
                peer_state::ABSENT
            };
            want.peer_id = u32::from(rec.id.raw());
            want.incarnation = rec.incarnation;
            if rec.connected && !self.proxies.contains_key(&slot) {
                want.flags = peer_flags::DOORBELL;
            }
            if bytes_of(&cur) == bytes_of(&want) {
                continue;
            }
            let state = base + PEER_STATE_OFF;
            if !rec.connected {
                let _ = self.mem.store_u32(state, want.state, Ordering::Release);
            }
            let _ = self
                .mem
                .store_u32(base + PEER_ID_OFF, want.peer_id, Ordering::SeqCst);
            let _ = self.mem.store_u64(
                base + PEER_INCARNATION_OFF,
                want.incarnation,
                Ordering::SeqCst,
            );
            let _ = self
                .mem
                .store_u32(base + PEER_FLAGS_OFF, want.flags, Ordering::SeqCst);
            let rest = PEER_FLAGS_OFF + 4;
            let _ = self
                .mem
                .zero(base + rest, size_of::<PeerEntry>() as u64 - rest);
            if rec.connected {
                let _ = self.mem.store_u32(state, want.state, Ordering::Release);
            }
            report.peer_slots.push(slot);
            found.add(|| {
                format!(
                    "peer slot {} {}",
                    slot.raw(),
                    range(base, size_of::<PeerEntry>())
                )
            });
        }
    }

    /// Each object entry. With a record: bytes 0..64 must be what the record publishes and
    /// the name area must hold its name at `name_off` (both rewritten through the seqlock,
    /// `object::publish_named`), the reserved bytes zero; the lease and sync words are the
    /// peers' and left alone. Without one (FREE): the canonical FREE image, all zero but an
    /// even `seq` and a CLOSED lease — so a forged LIVE entry in a free slot is erased,
    /// state first.
    fn heal_objects(&mut self, slots: &[ObjectSlot], report: &mut HealReport, found: &mut Found) {
        let mut name_buf = Vec::new();
        for &slot in slots {
            let Some(base) = self.layout.object_entry(slot) else {
                continue;
            };
            let Ok(cur) = read_pod::<ObjectEntry, _>(&self.mem, base) else {
                continue;
            };
            let cur_b = bytes_of(&cur);
            let want = self.record_entry(slot);
            let live = want.is_some();
            let want = want.unwrap_or_else(zeroed::<ObjectEntry>);
            let want_b = bytes_of(&want);
            let head_ok = cur.seq & 1 == 0 && cur_b[8..OBJ_HEAD_LEN] == want_b[8..OBJ_HEAD_LEN];
            // The record's name where its entry says it is (the host's private copy is the
            // truth; `record_entry` put the record's `name_off` in `want`).
            let name = self
                .record_at(slot)
                .and_then(|r| r.name.as_deref())
                .map(str::as_bytes);
            let name_at = name.and_then(|n| {
                self.layout
                    .name_bytes(want.name_off, n.len() as u64)
                    .map(|at| (at, n))
            });
            let name_ok = name_at.is_none_or(|(at, n)| {
                name_buf.clear();
                name_buf.resize(n.len(), 0);
                self.mem.read_bytes(at, &mut name_buf).is_ok() && name_buf == *n
            });
            let reserved_ok = all_zero(&cur_b[SYNC_END..]);
            // Only a FREE slot's lease and sync words are the host's.
            let free_words_ok =
                live || (cur.lease == LEASE_CLOSED && all_zero(&cur_b[OBJ_HEAD_LEN + 8..SYNC_END]));
            if head_ok && name_ok && reserved_ok && free_words_ok {
                continue;
            }
            if !head_ok || !name_ok {
                let _ = match &name {
                    Some(n) => object::publish_named(&self.mem, &self.layout, slot, &want, n),
                    None => object::publish(&self.mem, &self.layout, slot, &want),
                };
            }
            if !free_words_ok {
                let _ = self
                    .mem
                    .store_u64(base + OBJ_LEASE_OFF, LEASE_CLOSED, Ordering::SeqCst);
                let _ = sync::reset_words(&self.mem, &self.layout, slot);
            }
            if !reserved_ok {
                let _ = self
                    .mem
                    .zero(base + SYNC_END as u64, (ENTRY_SIZE - SYNC_END) as u64);
            }
            report.object_slots.push(slot);
            if !name_ok {
                report.names.push(slot);
            }
            found.add(|| match name_at {
                Some((at, n)) if !name_ok && head_ok => {
                    format!("name of object slot {} {}", slot.raw(), range(at, n.len()))
                }
                _ => format!(
                    "object slot {} {}{}",
                    slot.raw(),
                    range(base, ENTRY_SIZE),
                    if live { "" } else { " (FREE image)" }
                ),
            });
        }
    }

    /// The name index: its sequence word, reserved bytes and every entry must be what the
    /// mirror says; anything else is rewritten from the mirror under the sequence word
    /// (FORMAT.md §5a), which moves past both the host's value and whatever is there.
    fn heal_index(&mut self, report: &mut HealReport, found: &mut Found) {
        let Ok(Some(first)) = self.index.heal(&self.mem, &self.layout) else {
            return;
        };
        report.index = true;
        let at = match first.and_then(|p| self.layout.index_entry(p).map(|o| (p, o))) {
            Some((p, off)) => format!("name index entry {p} {}", range(off, 8)),
            None => format!("name index header {}", range(self.layout.index_table, 64)),
        };
        found.add(|| at);
    }

    /// Emits one `repaired` event for structure `which` if it found something and none was
    /// emitted for it in the last second; otherwise only counts.
    fn report_heal(&mut self, which: usize, found: Found, now: Instant) {
        let Some(first) = found.first else {
            return;
        };
        let recent =
            self.heal.reported[which].is_some_and(|t| now.duration_since(t) < REPORT_EVERY);
        if recent {
            self.heal.unreported[which] += found.count;
            return;
        }
        let earlier = std::mem::take(&mut self.heal.unreported[which]);
        self.heal.reported[which] = Some(now);
        let mut detail = format!("{first} rewritten");
        if found.count > 1 {
            detail.push_str(&format!(" (+{} more)", found.count - 1));
        }
        if earlier > 0 {
            detail.push_str(&format!("; {earlier} earlier repair(s) only counted"));
        }
        tracing::warn!("a peer scribbled on the header: {detail}");
        self.emit(Event::now("repaired").detail(detail));
    }
}
