//! Reclaiming and repair: what a departed peer held (`peer_gone`), reaping closed objects
//! (cross-checked against the refcount cells and the private record; a lease word closed
//! behind its holders' backs is repaired instead), destroying them, the periodic `sweep`
//! that puts scribbled lease words right, and `note_repair`, which reports a repair once
//! per object.

use std::sync::atomic::Ordering;

use vshm_format::layout::holder_bit;
use vshm_format::layout::kind;
use vshm_format::layout::{
    peer_state, LEASE_CLOSED, LEASE_HOLDERS, LEASE_KEEP, OBJ_LEASE_OFF, PEER_FLAGS_OFF,
    PEER_STATE_OFF,
};
use vshm_format::lease::close_if_unheld;
use vshm_format::mailbox::{self, ClosedHint};
use vshm_format::object::{self, bump_namespace_seq};
use vshm_format::shm::zeroed;
use vshm_format::sync;
use vshm_format::{ObjectSlot, PeerId, PeerSlot};

use super::{Arbiter, Backing};
use crate::telemetry::Event;

/// The most rings of one peer's doorbell the host expects ahead of their count (requests
/// and hinted closes served before their rings were read): a handful in practice.
const MAX_RINGS_DUE: u64 = 64;

/// What a peer's departure released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaim {
    /// Handles the peer still held.
    pub handles: u64,
    /// Objects that died with it.
    pub destroyed: u64,
}

/// Where the heap range of an object destroyed during a reclaim goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// Back to the heap, for reuse.
    ToHeap,
    /// Held back for the fenced peer slot given: a process that was cut off may still
    /// write there, so the range stays out of the heap until `unfence`.
    HoldFor(PeerSlot),
    /// Quarantined for the whole quarantine time whoever acknowledges: memory a vhost-user
    /// VM had mapped when it left (its frontend may unmap it late, and cannot acknowledge).
    Linger,
}

impl<M: Backing> Arbiter<M> {
    /// A peer left (socket closed): drop every hold it had, destroy what only it held,
    /// clear its row and mailbox.
    pub fn peer_gone(&mut self, peer_id: PeerId) -> Reclaim {
        let Some(s) = self.slot_of(peer_id) else {
            return Reclaim::default();
        };
        self.reclaim_peer(peer_id, s, Release::ToHeap)
    }

    /// Reclaims peer `peer_id`, connected in slot `s` (see [`Arbiter::peer_gone`]); the
    /// memory of the objects that die with it goes where `release` says.
    pub(super) fn reclaim_peer(
        &mut self,
        peer_id: PeerId,
        s: PeerSlot,
        release: Release,
    ) -> Reclaim {
        let mut out = Reclaim::default();
        let slot = s.raw() as usize;
        // A VM vshmd stood in for may still have what it held mapped (docs/VHOST-USER.md
        // §5.2): what dies with it lingers.
        let dying = if release == Release::ToHeap && self.proxies.contains_key(&s) {
            Release::Linger
        } else {
            release
        };
        if !self.peers[slot].connected {
            return out;
        }
        self.peers[slot].connected = false;
        self.forget_seen(s);
        self.departures += 1;
        self.peers[slot].freed = self.departures;
        self.peers[slot].since = None;
        if let Some(base) = self.layout.peer_entry(s) {
            let _ =
                self.mem
                    .store_u32(base + PEER_STATE_OFF, peer_state::ABSENT, Ordering::Release);
            // Nobody is to ring this slot's last id any more (FORMAT.md §4).
            let _ = self
                .mem
                .store_u32(base + PEER_FLAGS_OFF, 0, Ordering::SeqCst);
        }
        // Its place in mutex queues goes, and what it owned is released as abandoned,
        // before the objects it held can die with it.
        self.release_mutexes_of(s, peer_id);
        let bit = holder_bit(s);
        let live: Vec<ObjectSlot> = self.live_slots().collect();
        let mut dead = Vec::new();
        for obj in live {
            out.handles += u64::from(self.cell_count(s, obj));
            let Some(lease) = self.lease_off(obj) else {
                continue;
            };
            let Ok(prev) = self.mem.fetch_and_u64(lease, !bit) else {
                continue;
            };
            if close_if_unheld(&self.mem, lease, prev & !bit).unwrap_or(false)
                || prev & LEASE_CLOSED != 0
            {
                dead.push(obj);
            }
        }
        let _ = self.clear_peer_memory(s);
        // A proxy's holds were counted and its holder bits cleared above.
        self.proxies.remove(&s);
        self.proxy_unwatch(s);
        if release == Release::ToHeap {
            // Its process is gone: nothing to wait for from it.
            self.quarantine_forget(s);
        }
        for obj in dead {
            if self.reap(obj, dying) {
                out.destroyed += 1;
            }
        }
        let _ = bump_namespace_seq(&self.mem);
        self.counters.reclaims += 1;
        if out.handles > 0 || out.destroyed > 0 {
            self.emit(Event::now("reclaimed").peer(peer_id).detail(format!(
                "{} handle(s) dropped, {} object(s) destroyed",
                out.handles, out.destroyed
            )));
        }
        out
    }

    /// Destroys `slot` if its lease is CLOSED and no connected peer's refcount row disagrees;
    /// repairs the lease if one does. Returns whether it destroyed; the memory goes where
    /// `release` says.
    pub(super) fn reap(&mut self, slot: ObjectSlot, release: Release) -> bool {
        let Some(lease) = self.lease_off(slot) else {
            return false;
        };
        let Ok(w) = self.mem.load_u64(lease, Ordering::SeqCst) else {
            return false;
        };
        if w & LEASE_CLOSED == 0 {
            return false;
        }
        let Some(rec) = self.objects[slot.raw() as usize].as_ref() else {
            return false;
        };
        // A legitimately closed object has no holder with a count (the closer CASed CLOSED
        // only into a word with no holder bits, and count > 0 implies the bit), and is not
        // persistent-and-undeleted (such a word carries KEEP, which blocks closing).
        let keep = rec.persistent && !rec.unlinked;
        let mut holders = 0u64;
        for (i, p) in self.peer_slots() {
            if p.connected && self.cell_count(i, slot) > 0 {
                holders |= holder_bit(i);
            }
        }
        if holders != 0 || keep {
            let keep_bit = if keep { LEASE_KEEP } else { 0 };
            let _ = self
                .mem
                .store_u64(lease, holders | keep_bit, Ordering::SeqCst);
            self.counters.repairs += 1;
            self.note_repair(slot, "lease word closed while peers held it");
            return false;
        }
        self.destroy(slot, release);
        true
    }

    fn destroy(&mut self, slot: ObjectSlot, release: Release) {
        let Some(rec) = self.objects[slot.raw() as usize].take() else {
            return;
        };
        if let (Some(n), false) = (&rec.name, rec.unlinked) {
            self.names.remove(n);
        }
        if let Some(base) = self.layout.object_entry(slot) {
            let _ = object::publish(&self.mem, &self.layout, slot, &zeroed());
            let _ = self
                .mem
                .store_u64(base + OBJ_LEASE_OFF, LEASE_CLOSED, Ordering::SeqCst);
        }
        // Published FREE: a name still LIVE until now leaves the index, and the name's
        // room in the name area (kept while UNLINKED) is free again.
        if let (Some(n), false) = (&rec.name, rec.unlinked) {
            self.index_remove(n, slot);
        }
        if let Some(n) = &rec.name {
            self.name_area.release(rec.name_off, n.len());
        }
        if let Ok(n) = sync::signal_seq(&self.mem, &self.layout, slot) {
            if rec.kind == kind::EVENT {
                self.counters.retired_signals = self.counters.retired_signals.wrapping_add(n);
            }
        }
        // A FREE slot is all zero but `seq` and the CLOSED lease (§5): its sync words go
        // too, so that `heal` finds the canonical FREE image here.
        let _ = sync::reset_words(&self.mem, &self.layout, slot);
        // Events and mutexes reserve nothing: there is no range to give back.
        match release {
            _ if rec.reserved == 0 => {}
            // Someone may still hold it without the host knowing (§11a): quarantine.
            Release::ToHeap => self.quarantine_range(rec.offset, rec.reserved),
            // A process that was cut off may still write here: keep the range out of the
            // heap until it is gone (its pages are punched out all the same).
            Release::HoldFor(fence) => self.fenced_ranges.push((fence, rec.offset, rec.reserved)),
            Release::Linger => self.quarantine_lingering(rec.offset, rec.reserved),
        }
        if rec.reserved == 0 {
            // Nothing to punch.
        } else if let Err(e) = self.mem.discard(rec.offset, rec.reserved) {
            tracing::error!(slot = slot.raw(), "could not return section memory: {e}");
            self.emit(
                Event::now("error")
                    .object(slot, rec.name.as_deref())
                    .detail(format!(
                        "could not return the section's memory to the host: {e}"
                    )),
            );
        }
        self.free_slots.insert(slot);
        self.counters.destroyed += 1;
        for p in 0..self.layout.max_peers as usize {
            if let Some(c) = self
                .seen
                .get_mut(slot.raw() as usize * self.layout.max_peers as usize + p)
            {
                *c = 0;
            }
        }
        self.emit(
            Event::now("destroyed")
                .object(slot, rec.name.as_deref())
                .size(rec.reserved),
        );
        // Debug, as "created" (requests.rs): the event stream has every one.
        tracing::debug!(
            slot = slot.raw(),
            generation = rec.generation.raw(),
            name = rec.name.as_deref().unwrap_or("<unnamed>"),
            "destroyed"
        );
    }

    /// Logs and reports a repair of `slot`'s lease word once per object: a peer that keeps
    /// scribbling (and ringing) must not flood the log or the event stream; the
    /// `repairs` counter still counts every one.
    fn note_repair(&mut self, slot: ObjectSlot, what: &'static str) {
        let Some(rec) = self.objects[slot.raw() as usize].as_mut() else {
            return;
        };
        if rec.repaired {
            return;
        }
        rec.repaired = true;
        let name = rec.name.clone();
        tracing::warn!(
            slot = slot.raw(),
            "{what}: repaired (further repairs of this object are only counted)"
        );
        self.emit(
            Event::now("repaired")
                .object(slot, name.as_deref())
                .detail(what),
        );
    }

    /// Destroys every closed object and drops holder bits of peers that are not connected.
    /// Runs on a timer, and after a doorbell that may have come from closes no hint named
    /// ([`Arbiter::sweep_after_ring`]). Returns how many objects it destroyed.
    pub fn sweep(&mut self) -> usize {
        self.counters.table_sweeps += 1;
        self.sweep_mutexes();
        let connected = self.connected_mask();
        let mut destroyed = 0;
        for slot in self.object_slots() {
            if self.sweep_slot(slot, connected) {
                destroyed += 1;
            }
        }
        self.expire_unclaimed();
        self.release_quarantine();
        destroyed
    }

    /// After a doorbell from `peer` whose eventfd counted `rings` (`answered`: a request
    /// was answered for it): destroys what its closes left unheld. A close names its object
    /// in the peer's close hint before it rings (FORMAT.md §9): the host takes the hint and
    /// destroys that object alone when every ring counted is accounted for — one per
    /// request answered and per hinted close, whose rings may be counted by this doorbell
    /// or the next (a close that hinted while this doorbell was being served rings after
    /// the count was read). Anything else (a ring no hint or request explains: a close by a
    /// peer that does not hint; several closes; a hint of a slot that was not closed: a
    /// scribble) sweeps the whole table. Returns how many objects it destroyed.
    pub fn sweep_after_ring(&mut self, peer: PeerId, rings: u64, answered: bool) -> usize {
        let Some(s) = self.slot_of(peer) else {
            return self.sweep();
        };
        let hint =
            mailbox::take_closed_hint(&self.mem, &self.layout, s).unwrap_or(ClosedHint::Many);
        let mut destroyed = 0;
        let hinted = match hint {
            ClosedHint::None => Some(0),
            ClosedHint::One(slot) => {
                let connected = self.connected_mask();
                self.sweep_slot(slot, connected).then(|| {
                    destroyed = 1;
                    self.counters.hinted_closes += 1;
                    1
                })
            }
            ClosedHint::Many => None,
        };
        let Some(rec) = self.peers.get_mut(s.raw() as usize) else {
            return destroyed + self.sweep();
        };
        let expected = hinted.map(|h| rec.rings_due + u64::from(answered) + h);
        match expected {
            Some(e) if rings <= e => {
                // Bounded: a peer that hints without ringing only delays its own next
                // unhinted close to the timer's sweep.
                rec.rings_due = (e - rings).min(MAX_RINGS_DUE);
                if destroyed > 0 {
                    self.expire_unclaimed();
                    self.release_quarantine();
                }
                destroyed
            }
            _ => {
                rec.rings_due = 0;
                destroyed + self.sweep()
            }
        }
    }

    /// One object of the sweep: puts its lease word right and destroys it if it is closed.
    /// Whether it was destroyed.
    fn sweep_slot(&mut self, slot: ObjectSlot, connected: u64) -> bool {
        let Some(keep) = self
            .objects
            .get(slot.raw() as usize)
            .and_then(Option::as_ref)
            .map(|r| r.persistent && !r.unlinked)
        else {
            return false;
        };
        let Some(lease) = self.lease_off(slot) else {
            return false;
        };
        let Ok(w) = self.mem.load_u64(lease, Ordering::SeqCst) else {
            return false;
        };
        // Only a peer's scribbling can produce these three; put the word right.
        let stray = w & LEASE_HOLDERS & !connected;
        if stray != 0 {
            self.counters.repairs += 1;
            self.note_repair(slot, "holder bits of absent peers cleared");
            let _ = self.mem.fetch_and_u64(lease, !stray);
        }
        if w & LEASE_CLOSED == 0 && keep != (w & LEASE_KEEP != 0) {
            self.note_repair(slot, "KEEP bit disagreed with the object's persistence");
            self.counters.repairs += 1;
            let _ = if keep {
                self.mem.fetch_or_u64(lease, LEASE_KEEP)
            } else {
                self.mem.fetch_and_u64(lease, !LEASE_KEEP)
            };
        }
        // A word left with no holders and no KEEP is dead even if its last holder could
        // not close it (it gave up on a word that kept changing, or died mid-close).
        if let Ok(now) = self.mem.load_u64(lease, Ordering::SeqCst) {
            let _ = close_if_unheld(&self.mem, lease, now);
        }
        self.reap(slot, Release::ToHeap)
    }
}
