//! Events and robust mutexes, the host's side (docs/FORMAT.md §6a): WAKE rings the waiting
//! holders of an object; LOCK, UNLOCK and CANCEL run a mutex's private FIFO queue and hand
//! the mutex over; a reclaimed peer's mutexes are released as abandoned, and the sweep
//! releases a mutex whose owner word names a slot nobody is connected in.
//!
//! The sync words are peer-written shared memory: every word read here is a hint. Nothing
//! read from them can grow, reorder or grant from a queue on its own; a scribbled word
//! costs at most that mutex's exclusion, never a panic or a leaked queue entry.

use std::sync::atomic::Ordering;

use vshm_format::layout::{holder_bit, kind, mutex_word, LEASE_HOLDERS};
use vshm_format::sync;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, Status};

use super::{Arbiter, Backing};
use crate::telemetry::Event;

/// How often the host retries a CAS on a mutex word that keeps changing under it (only a
/// peer scribbling on it can make that happen; then the request fails, the host does not
/// spin).
const CAS_TRIES: u32 = 1024;

/// Entries one peer may have in one mutex's queue (one per waiting thread or guest
/// process); a LOCK past it is STATUS_QUOTA_EXCEEDED. Without a bound, a peer posting LOCK
/// with ever new tokens would grow vshmd's memory, and every LOCK's scan of the queue,
/// without limit.
pub(super) const MAX_QUEUED_PER_PEER: usize = 1024;

type Answer<T> = Result<T, (Status, Option<ObjectSlot>)>;

/// At most one `abandoned` log line and event per mutex per this interval.
const ABANDON_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
impl<M: Backing> Arbiter<M> {
    /// Takes the doorbells to ring (peer id, vector) since the last call.
    pub fn drain_rings(&mut self) -> std::vec::Drain<'_, (PeerId, u16)> {
        self.rings.drain(..)
    }

    /// Queues a wake-up for the peer connected in `peer` (none if nobody is).
    fn ring(&mut self, peer: PeerSlot) {
        // A peer vshmd stands in for has no doorbell: it hears through its transport, which
        // looks at what it holds (`proxy_sync.rs`).
        if self.proxies.contains_key(&peer) {
            self.proxy_due = true;
            return;
        }
        let Some(id) = self
            .peers
            .get(peer.raw() as usize)
            .filter(|p| p.connected)
            .map(|p| p.id)
        else {
            return;
        };
        let vector = self.layout.wake_vector();
        self.rings.push((id, vector));
        self.counters.rings += 1;
    }

    fn connected(&self, peer: PeerSlot) -> bool {
        self.peers
            .get(peer.raw() as usize)
            .is_some_and(|p| p.connected)
    }

    fn lease_word(&self, slot: ObjectSlot) -> u64 {
        self.lease_off(slot)
            .and_then(|l| self.mem.load_u64(l, Ordering::SeqCst).ok())
            .unwrap_or(0)
    }

    /// Whether `peer` holds `slot`: a handle counted in its cell, or its holder bit.
    fn holds(&self, peer: PeerSlot, slot: ObjectSlot) -> bool {
        self.cell_count(peer, slot) > 0 || self.lease_word(slot) & holder_bit(peer) != 0
    }

    /// Peer slots set in `bits`, in order.
    fn slots_in(&self, bits: u64) -> impl Iterator<Item = PeerSlot> {
        (0..self.layout.max_peers)
            .map(PeerSlot)
            .filter(move |&p| bits & holder_bit(p) != 0)
    }

    /// The bits of `slot`'s waiters word that the host would ring: connected peers that
    /// hold the object.
    pub(super) fn waiting_holders(&self, slot: ObjectSlot, waiters: u64) -> u64 {
        waiters & self.lease_word(slot) & LEASE_HOLDERS & self.connected_mask()
    }

    /// Takes `slot`'s waiters word and rings the waiters that are connected holders; the
    /// other bits are dropped (a real waiter sets its bit again before it sleeps again).
    pub(super) fn ring_waiters(&mut self, slot: ObjectSlot) {
        let Ok(bits) = sync::take_waiters(&self.mem, &self.layout, slot) else {
            return;
        };
        let ring = self.waiting_holders(slot, bits);
        let peers: Vec<PeerSlot> = self.slots_in(ring).collect();
        for p in peers {
            self.ring(p);
        }
    }

    /// WAKE: rings the waiting holders of an object the requester holds.
    pub(super) fn wake(
        &mut self,
        peer: PeerSlot,
        slot: ObjectSlot,
        generation: Generation,
    ) -> Answer<()> {
        self.record(slot, generation)
            .ok_or((Status::InvalidHandle, None))?;
        if !self.holds(peer, slot) {
            return Err((Status::InvalidHandle, None));
        }
        self.ring_waiters(slot);
        if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
            r.wakes += 1;
        }
        self.counters.wakes += 1;
        Ok(())
    }

    /// The mutex at (slot, generation), else INVALID_HANDLE.
    fn mutex(&self, slot: ObjectSlot, generation: Generation) -> Answer<()> {
        self.record(slot, generation)
            .filter(|r| r.kind == kind::MUTEX)
            .map(|_| ())
            .ok_or((Status::InvalidHandle, None))
    }

    fn mutex_word(&self, slot: ObjectSlot) -> Answer<u64> {
        sync::sync_word(&self.mem, &self.layout, slot)
            .map_err(|_| (Status::InsufficientResources, None))
    }

    fn queue_len(&self, slot: ObjectSlot) -> usize {
        self.record_at(slot).map_or(0, |r| r.queue.len())
    }

    /// LOCK: grants a free mutex (SUCCESS) or queues the requester (PENDING).
    pub(super) fn lock(
        &mut self,
        peer: PeerSlot,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
    ) -> Answer<ObjectSlot> {
        self.mutex(slot, generation)?;
        if !self.holds(peer, slot) {
            return Err((Status::InvalidHandle, None));
        }
        let me = mutex_word::owner(peer, token);
        let mut w = self.mutex_word(slot)?;
        for _ in 0..CAS_TRIES {
            if w & mutex_word::OWNER == me {
                return Err((Status::PossibleDeadlock, Some(slot)));
            }
            let new = if w & mutex_word::OWNER == 0 {
                // Free (a HANDOFF bit left alone with no owner is only scribbling). With
                // waiters still queued the new owner's unlock must come through the host.
                let handoff = if self.queue_len(slot) > 0 {
                    mutex_word::HANDOFF
                } else {
                    0
                };
                me | handoff
            } else {
                w | mutex_word::HANDOFF
            };
            let swapped = if new == w {
                Ok(w)
            } else {
                sync::mutex_swap_word(&self.mem, &self.layout, slot, w, new)
                    .map_err(|_| (Status::InsufficientResources, None))?
            };
            match swapped {
                Ok(_) if w & mutex_word::OWNER == 0 => return Ok(slot),
                Ok(_) => {
                    if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
                        if !r.queue.contains(&(peer, token)) {
                            let mine = r.queue.iter().filter(|(p, _)| *p == peer).count();
                            if mine >= MAX_QUEUED_PER_PEER {
                                return Err((Status::QuotaExceeded, Some(slot)));
                            }
                            r.queue.push_back((peer, token));
                        }
                    }
                    return Err((Status::Pending, Some(slot)));
                }
                Err(now) => w = now,
            }
        }
        Err((Status::InsufficientResources, None))
    }

    /// UNLOCK: the owner (by slot; a token that differs is a process of the same peer
    /// releasing on behalf of a dead one: abandoned) hands the mutex to the next waiter.
    /// `presumed_dead`: the owner such a request saw; if the word names another owner now
    /// (the mutex moved on since), nothing is done — else a stale request would abandon a
    /// live owner, or count as the new owner's own unlock.
    pub(super) fn unlock(
        &mut self,
        peer: PeerSlot,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        presumed_dead: Option<u32>,
    ) -> Answer<()> {
        self.mutex(slot, generation)?;
        let w = self.mutex_word(slot)?;
        if mutex_word::slot(w) != Some(peer) {
            return Err((Status::MutantNotOwned, Some(slot)));
        }
        if presumed_dead.is_some_and(|dead| dead != mutex_word::token(w)) {
            return Err((Status::MutantNotOwned, Some(slot)));
        }
        if mutex_word::token(w) != token {
            let id = self.peers.get(peer.raw() as usize).map(|p| p.id);
            let detail = format!(
                "released by token {token} on behalf of token {}",
                mutex_word::token(w)
            );
            return if self.abandon(slot, w, id, &detail) {
                Ok(())
            } else {
                Err((Status::MutantNotOwned, Some(slot)))
            };
        }
        if self.hand_over(slot, w & mutex_word::OWNER).is_some() {
            Ok(())
        } else {
            Err((Status::MutantNotOwned, Some(slot)))
        }
    }

    /// CANCEL: the requester leaves the queue (if it is still in it). Always SUCCESS for a
    /// mutex: a grant that came just before is the requester's to keep.
    pub(super) fn cancel(
        &mut self,
        peer: PeerSlot,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
    ) -> Answer<()> {
        self.mutex(slot, generation)?;
        let emptied = match self.objects[slot.raw() as usize].as_mut() {
            Some(r) => {
                let before = r.queue.len();
                r.queue.retain(|&e| e != (peer, token));
                before > 0 && r.queue.is_empty()
            }
            None => false,
        };
        if emptied {
            // Nobody is queued any more: the owner may unlock without the host again.
            if let Ok(w) = sync::sync_word(&self.mem, &self.layout, slot) {
                if w & mutex_word::HANDOFF != 0 && w & mutex_word::OWNER != 0 {
                    let _ = sync::mutex_swap_word(
                        &self.mem,
                        &self.layout,
                        slot,
                        w,
                        w & !mutex_word::HANDOFF,
                    );
                }
            }
        }
        Ok(())
    }

    /// Hands the mutex in `slot`, whose owner bits are `owner`, to the first queued waiter
    /// of a connected peer (HANDOFF kept if more remain), or frees it. Rings the new owner
    /// (or, freed, the waiting holders). `None` if the owner changed under the host (only a
    /// peer scribbling does that); else the new owner's peer slot, if any.
    fn hand_over(&mut self, slot: ObjectSlot, owner: u64) -> Option<Option<PeerSlot>> {
        let mut w = sync::sync_word(&self.mem, &self.layout, slot).ok()?;
        for _ in 0..CAS_TRIES {
            if w & mutex_word::OWNER != owner {
                return None;
            }
            // Entries of peers that are gone are never granted (reclaim drops them; this
            // is the second line), nor of peers that no longer hold the mutex (they left
            // the queue without CANCEL: they could never unlock it).
            let eligible: Vec<bool> = (0..self.layout.max_peers)
                .map(|p| self.connected(PeerSlot(p)) && self.holds(PeerSlot(p), slot))
                .collect();
            let next = self.objects[slot.raw() as usize].as_mut().and_then(|r| {
                r.queue
                    .retain(|(p, _)| eligible.get(p.raw() as usize).copied().unwrap_or(false));
                r.queue.front().copied().map(|e| (e, r.queue.len() > 1))
            });
            let new = match next {
                Some(((p, t), more)) => {
                    mutex_word::owner(p, t) | if more { mutex_word::HANDOFF } else { 0 }
                }
                None => 0,
            };
            match sync::mutex_swap_word(&self.mem, &self.layout, slot, w, new).ok()? {
                Ok(_) => {
                    let _ = sync::host_count_change(&self.mem, &self.layout, slot);
                    return Some(match next {
                        Some(((p, _), _)) => {
                            if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
                                r.queue.pop_front();
                            }
                            self.counters.handoffs += 1;
                            self.ring(p);
                            Some(p)
                        }
                        None => {
                            self.ring_waiters(slot);
                            None
                        }
                    });
                }
                Err(now) => w = now,
            }
        }
        None
    }

    /// Releases the mutex in `slot` whose word was `w` as abandoned: marks it, hands it
    /// over (or frees it), counts and reports it. `peer` is who held it, if known.
    fn abandon(&mut self, slot: ObjectSlot, w: u64, peer: Option<PeerId>, why: &str) -> bool {
        let owned = w & mutex_word::OWNER != 0;
        if owned {
            let _ = sync::mutex_mark_abandoned(&self.mem, &self.layout, slot);
        }
        let Some(next) = self.hand_over(slot, w & mutex_word::OWNER) else {
            return false;
        };
        if !owned {
            // A HANDOFF bit alone: nothing was held, nothing to report.
            return true;
        }
        self.counters.abandoned += 1;
        // Counted every time; logged and reported at most once a second per mutex, with
        // the number left unreported since (a peer forging owner words that name gone
        // slots would otherwise make every sweep log and emit).
        let now = std::time::Instant::now();
        let (name, unreported) = match self.objects[slot.raw() as usize].as_mut() {
            Some(r) => {
                r.abandoned += 1;
                match r.abandon_report {
                    Some((at, n)) if now.duration_since(at) < ABANDON_REPORT_INTERVAL => {
                        r.abandon_report = Some((at, n + 1));
                        return true;
                    }
                    previous => {
                        r.abandon_report = Some((now, 0));
                        (r.name.clone(), previous.map_or(0, |(_, n)| n))
                    }
                }
            }
            None => (None, 0),
        };
        let to = match next.and_then(|p| self.peers.get(p.raw() as usize)) {
            Some(p) => format!("handed to peer {}", p.id.raw()),
            None => "freed".to_string(),
        };
        let more = if unreported > 0 {
            format!(" (+{unreported} more since the last report)")
        } else {
            String::new()
        };
        tracing::warn!(slot = slot.raw(), "mutex abandoned: {why}; {to}{more}");
        let mut e = Event::now("abandoned")
            .object(slot, name.as_deref())
            .detail(format!("{why}; {to}{more}"));
        if let Some(id) = peer {
            e = e.peer(id);
        }
        self.emit(e);
        true
    }

    /// Reclaiming peer slot `s` (already not connected): its queue entries go, and every
    /// mutex it owns is released as abandoned.
    pub(super) fn release_mutexes_of(&mut self, s: PeerSlot, peer_id: PeerId) {
        let mutexes: Vec<ObjectSlot> = self
            .live_slots()
            .filter(|&o| self.record_at(o).is_some_and(|r| r.kind == kind::MUTEX))
            .collect();
        for obj in &mutexes {
            if let Some(r) = self.objects[obj.raw() as usize].as_mut() {
                r.queue.retain(|&(p, _)| p != s);
            }
        }
        for obj in mutexes {
            let Ok(w) = sync::sync_word(&self.mem, &self.layout, obj) else {
                continue;
            };
            if mutex_word::slot(w) == Some(s) {
                self.abandon(obj, w, Some(peer_id), "its owner left");
            }
        }
    }

    /// Proxied peer slot `s` closed its last handle on `slot`: if that is a mutex, its queue
    /// entries go and, if it owns it, the mutex is released as abandoned.
    pub(super) fn proxy_leave_mutex(&mut self, s: PeerSlot, slot: ObjectSlot, peer_id: PeerId) {
        if self.record_at(slot).map(|r| r.kind) != Some(kind::MUTEX) {
            return;
        }
        if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
            r.queue.retain(|&(p, _)| p != s);
        }
        if let Ok(w) = sync::sync_word(&self.mem, &self.layout, slot) {
            if mutex_word::slot(w) == Some(s) {
                self.abandon(slot, w, Some(peer_id), "its owner closed its last handle");
            }
        }
    }

    /// Sweep: a mutex whose word names no connected peer (forged to name a dead slot,
    /// malformed, or a HANDOFF bit with no owner) is released, as abandoned if it named
    /// an owner.
    pub(super) fn sweep_mutexes(&mut self) {
        let mutexes: Vec<ObjectSlot> = self
            .live_slots()
            .filter(|&o| self.record_at(o).is_some_and(|r| r.kind == kind::MUTEX))
            .collect();
        for obj in mutexes {
            let Ok(w) = sync::sync_word(&self.mem, &self.layout, obj) else {
                continue;
            };
            if w == 0 {
                continue;
            }
            let owner = mutex_word::slot(w);
            if owner.is_some_and(|p| self.connected(p)) {
                continue;
            }
            let id = owner
                .and_then(|p| self.peers.get(p.raw() as usize))
                .map(|p| p.id)
                .filter(|&id| id != PeerId::HOST);
            let why = match owner {
                Some(p) => format!("its owner word names slot {}, not connected", p.raw()),
                None => format!("its owner word {w:#x} names no peer"),
            };
            self.abandon(obj, w, id, &why);
        }
    }
}
