//! Events, notifications and names for peers vshmd stands in for (vhost-user VMs,
//! docs/VHOST-USER.md §5.1, §5.3, §6). Such a peer cannot touch an object's sync words, so
//! vshmd does it on its behalf: SIGNAL and RESET act on them as a library would, a WAIT is
//! registered here and completed when [`Arbiter::proxy_poll`] finds its condition true
//! (a LOCK the same way: queued like any locker's, completed when the mutex is handed to it),
//! and the same look reports what changed about every object the peer holds (deleted,
//! grown or notified, signalled).
//!
//! How vshmd hears of changes made in shared memory: it sets the proxied peer's bit in the
//! `waiters` word of every event and section the peer holds, as a waiting library does
//! (docs/FORMAT.md §6a), so a peer that signals or notifies sends WAKE; the ring that WAKE
//! asks for, aimed at a proxied peer, only marks a look as due. The bit is set again at
//! every look (the host's WAKE clears it), before the words are read, so no change is
//! missed; the daemon also looks on its timer.

use std::collections::BTreeMap;

use vshm_format::layout::{kind, mutex_word};
use vshm_format::sync;
use vshm_format::virtio::{
    PeersReply, VirtioVshmEvent, EVENT_CHANGED, EVENT_DELETED, EVENT_SIGNALLED, LIST_MANUAL_RESET,
    LIST_PERSISTENT, PEERS_MAX,
};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, Status};

use super::{Arbiter, Backing};

/// What a proxied peer was last told about one object it holds.
#[derive(Debug, Clone, Copy)]
struct Seen {
    generation: Generation,
    size: u64,
    seq: u64,
    unlinked: bool,
}

/// A WAIT not answered yet.
#[derive(Debug, Clone, Copy)]
struct Wait {
    id: u64,
    slot: ObjectSlot,
    generation: Generation,
    /// A section's change count when the WAIT came (it completes when it differs).
    since: u64,
    /// A LOCK queued for the mutex: the token of the VM's thread that asked (it completes
    /// when the mutex is handed to that owner).
    lock: Option<u32>,
}

/// One proxied peer's watch (see the module).
#[derive(Debug, Default)]
pub(super) struct Watch {
    seen: BTreeMap<ObjectSlot, Seen>,
    waits: Vec<Wait>,
}

/// What [`Arbiter::proxy_poll`] found for one proxied peer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProxyNews {
    /// Events about objects it holds, oldest first.
    pub events: Vec<VirtioVshmEvent>,
    /// WAITs completed: (the id the transport gave it, status, the object's change count).
    pub done: Vec<(u64, Status, u64)>,
}

/// One name a proxied peer may open (LIST).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyListed {
    /// The name.
    pub name: String,
    /// `vshm_format::layout::kind`.
    pub kind: u32,
    /// `LIST_PERSISTENT` | `LIST_MANUAL_RESET`.
    pub flags: u8,
}

impl<M: Backing> Arbiter<M> {
    /// Whether a look at proxied peers is due (something happened that may be news to
    /// them); clears it.
    pub fn take_proxy_due(&mut self) -> bool {
        std::mem::take(&mut self.proxy_due)
    }

    /// Marks a look at proxied peers as due (the daemon's timer: a change made in shared
    /// memory without a WAKE is seen within a tick).
    pub fn proxy_due_soon(&mut self) {
        self.proxy_due = true;
    }

    /// The (slot, generation) proxied peer `s` holds, if it holds it.
    fn proxy_holding(&self, s: PeerSlot, slot: ObjectSlot, generation: Generation) -> bool {
        self.proxies
            .get(&s)
            .is_some_and(|h| self.proxy_count(h, slot) > 0)
            && self
                .record_at(slot)
                .is_some_and(|r| r.generation == generation)
    }

    fn proxy_slot_of(&self, peer_id: PeerId) -> Result<PeerSlot, Status> {
        self.slot_of(peer_id)
            .filter(|s| self.proxies.contains_key(s))
            .ok_or(Status::InvalidHandle)
    }

    pub(super) fn seq_of(&self, slot: ObjectSlot) -> u64 {
        sync::signal_seq(&self.mem, &self.layout, slot).unwrap_or(0)
    }

    fn seen_now(&self, slot: ObjectSlot) -> Option<Seen> {
        let r = self.record_at(slot)?;
        Some(Seen {
            generation: r.generation,
            size: r.size,
            seq: self.seq_of(slot),
            unlinked: r.unlinked,
        })
    }

    /// SIGNAL for proxied peer `peer_id`: sets an event it holds (or notifies a section it
    /// holds) and wakes the waiting holders, as a library's signal and WAKE would.
    pub fn proxy_signal(
        &mut self,
        peer_id: PeerId,
        slot: ObjectSlot,
        generation: Generation,
    ) -> Status {
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return Status::InvalidHandle;
        };
        if !self.proxy_holding(s, slot, generation) {
            return Status::InvalidHandle;
        }
        self.set_and_wake(slot)
    }

    /// Sets the event in `slot` (or notifies the section) and wakes its waiting holders.
    fn set_and_wake(&mut self, slot: ObjectSlot) -> Status {
        let set = match self.record_at(slot).map(|r| r.kind) {
            Some(kind::EVENT) => sync::event_set(&self.mem, &self.layout, slot),
            Some(kind::SECTION) => sync::notify(&self.mem, &self.layout, slot),
            _ => return Status::InvalidHandle,
        };
        match set {
            Ok(wake) => {
                if wake {
                    self.ring_waiters(slot);
                }
                self.proxy_due = true;
                Status::Success
            }
            Err(_) => Status::InsufficientResources,
        }
    }

    /// RESET for proxied peer `peer_id`: clears an event it holds.
    pub fn proxy_reset(
        &mut self,
        peer_id: PeerId,
        slot: ObjectSlot,
        generation: Generation,
    ) -> Status {
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return Status::InvalidHandle;
        };
        if !self.proxy_holding(s, slot, generation)
            || self.record_at(slot).map(|r| r.kind) != Some(kind::EVENT)
        {
            return Status::InvalidHandle;
        }
        match sync::event_reset(&self.mem, &self.layout, slot) {
            Ok(()) => Status::Success,
            Err(_) => Status::InsufficientResources,
        }
    }

    /// Takes an event for a waiter, as a library's wait does once (`event_try_take`).
    fn proxy_try_take(&self, slot: ObjectSlot) -> bool {
        let manual = self.record_at(slot).is_some_and(|r| r.manual_reset);
        sync::event_try_take(&self.mem, &self.layout, slot, manual).unwrap_or(false)
    }

    /// WAIT for proxied peer `peer_id` on an event or section it holds, known to its
    /// transport as `id`: `Some(status)` if it completes at once (an event that is set, and
    /// taken if it resets itself; or a refusal), else `None`: it stays registered until a
    /// look ([`Arbiter::proxy_poll`]) completes it or [`Arbiter::proxy_cancel_wait`]
    /// takes it back.
    pub fn proxy_wait(
        &mut self,
        peer_id: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        seen: Option<u64>,
    ) -> Option<(Status, u64)> {
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return Some((Status::InvalidHandle, 0));
        };
        if !self.proxy_holding(s, slot, generation) {
            return Some((Status::InvalidHandle, 0));
        }
        let k = self.record_at(slot).map(|r| r.kind);
        if k != Some(kind::EVENT) && k != Some(kind::SECTION) {
            return Some((Status::InvalidHandle, 0));
        }
        // Asks to be rung before it looks (FORMAT.md §6a: no wake-up is lost).
        let _ = sync::register_waiter(&self.mem, &self.layout, slot, s);
        let since = self.seq_of(slot);
        // A section that changed since the count the VM saw last: that change is the news.
        if k == Some(kind::SECTION) && seen.is_some_and(|c| c != since) {
            return Some((Status::Success, since));
        }
        if k == Some(kind::EVENT) && self.proxy_try_take(slot) {
            return Some((Status::Success, since));
        }
        self.proxy_watch.entry(s).or_default().waits.push(Wait {
            id,
            slot,
            generation,
            since,
            lock: None,
        });
        None
    }

    /// LOCK for proxied peer `peer_id` on a mutex it holds, for its thread `token`, known to
    /// its transport as `id`: `Some(status)` if it is answered at once — SUCCESS or
    /// ABANDONED (granted), STATUS_TIMEOUT (`queue` false and another owner holds it), or a
    /// refusal — else `None`: queued, completed by a look when the mutex is handed over, or
    /// taken back by [`Arbiter::proxy_cancel_wait`].
    pub fn proxy_lock(
        &mut self,
        peer_id: PeerId,
        id: u64,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        queue: bool,
    ) -> Option<(Status, u64)> {
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return Some((Status::InvalidHandle, 0));
        };
        if !self.proxy_holding(s, slot, generation)
            || self.record_at(slot).map(|r| r.kind) != Some(kind::MUTEX)
        {
            return Some((Status::InvalidHandle, 0));
        }
        if token == 0 {
            return Some((Status::InvalidParameter, 0));
        }
        // One LOCK per thread at a time: two would share one queue entry (both told granted,
        // or one stranded when the other's timeout takes the entry out).
        let pending = self.proxy_watch.get(&s).is_some_and(|w| {
            w.waits
                .iter()
                .any(|x| x.slot == slot && x.lock == Some(token))
        });
        if pending {
            return Some((Status::PossibleDeadlock, 0));
        }
        match self.lock(s, slot, generation, token) {
            Ok(_) => Some((self.proxy_acquired(slot), 0)),
            Err((Status::Pending, _)) if queue => {
                self.proxy_watch.entry(s).or_default().waits.push(Wait {
                    id,
                    slot,
                    generation,
                    since: 0,
                    lock: Some(token),
                });
                None
            }
            // A try: out of the queue again; a grant that came meanwhile is kept.
            Err((Status::Pending, _)) => {
                let _ = self.cancel(s, slot, generation, token);
                Some(if self.proxy_owns(s, slot, token) {
                    (self.proxy_acquired(slot), 0)
                } else {
                    (Status::Timeout, 0)
                })
            }
            Err((status, _)) => Some((status, 0)),
        }
    }

    /// UNLOCK for proxied peer `peer_id`'s thread `token` (as a mailbox UNLOCK; for the
    /// undo of a LOCK nobody heard the answer to).
    pub fn proxy_unlock(
        &mut self,
        peer_id: PeerId,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
    ) -> Status {
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return Status::InvalidHandle;
        };
        if !self.proxy_holding(s, slot, generation) {
            return Status::InvalidHandle;
        }
        match self.unlock(s, slot, generation, token, None) {
            Ok(()) => Status::Success,
            Err((status, _)) => status,
        }
    }

    /// Gives back a grant nobody heard of (LOCK `granted` SUCCESS or ABANDONED for thread
    /// `token` of proxied peer `peer_id`): an ABANDONED one stays abandoned for the next
    /// owner (what the mutex protects may still be half-updated).
    pub fn proxy_give_back(
        &mut self,
        peer_id: PeerId,
        slot: ObjectSlot,
        generation: Generation,
        token: u32,
        granted: Status,
    ) -> Status {
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return Status::InvalidHandle;
        };
        if !self.proxy_owns(s, slot, token) {
            return Status::MutantNotOwned;
        }
        if granted == Status::Abandoned {
            let _ = sync::mutex_mark_abandoned(&self.mem, &self.layout, slot);
        }
        self.proxy_unlock(peer_id, slot, generation, token)
    }

    /// Gives back the signal a WAIT of proxied peer `peer_id` took from an auto-reset event
    /// when nobody will hear that WAIT's answer (its queue stopped, or its transport gave
    /// up, in the same instant): the event is set again, as if that WAIT had not come. A
    /// manual-reset event's WAIT took nothing; a section's WAIT takes nothing. vshmd undoes
    /// its own take, so the peer need not hold the event any more (it may have closed its
    /// handle since): the object's identity is checked, not the peer's hold.
    pub fn proxy_give_back_signal(&mut self, slot: ObjectSlot, generation: Generation) -> Status {
        let took = self.record_at(slot).is_some_and(|r| {
            r.kind == kind::EVENT && !r.manual_reset && r.generation == generation
        });
        if !took {
            return Status::Success;
        }
        self.set_and_wake(slot)
    }

    /// PEERS for proxied peer `peer_id`: its own slot and incarnation, and who is attached
    /// in every slot, from vshmd's records (what the block allocator inside a section
    /// needs to tell a departed owner; a header's peer table could be scribbled).
    pub fn proxy_peers(&self, peer_id: PeerId) -> Result<PeersReply, Status> {
        let s = self.proxy_slot_of(peer_id)?;
        let mut reply = PeersReply {
            me: s,
            incarnation: 0,
            count: (self.layout.max_peers as usize).min(PEERS_MAX),
            slots: [0; PEERS_MAX],
        };
        for (slot, p) in self.peer_slots() {
            if let Some(at) = reply.slots.get_mut(slot.raw() as usize) {
                *at = if p.connected { p.incarnation } else { 0 };
            }
        }
        reply.incarnation = reply.slots.get(s.raw() as usize).copied().unwrap_or(0);
        Ok(reply)
    }

    /// Whether the mutex in `slot` is owned by thread `token` of proxied slot `s`.
    fn proxy_owns(&self, s: PeerSlot, slot: ObjectSlot, token: u32) -> bool {
        sync::mutex_held_by(&self.mem, &self.layout, slot, mutex_word::owner(s, token))
            .unwrap_or(false)
    }

    /// A proxied peer was just granted the mutex in `slot`: SUCCESS, or ABANDONED if its
    /// last owner died holding it (the mark is taken, as a library's new owner takes it).
    fn proxy_acquired(&self, slot: ObjectSlot) -> Status {
        if sync::mutex_take_abandoned(&self.mem, &self.layout, slot).unwrap_or(false) {
            Status::Abandoned
        } else {
            Status::Success
        }
    }

    /// Takes back WAIT `id` of proxied peer `peer_id` (its timeout passed): `true` if it
    /// was still waiting, `false` if a look completed it already (its answer is in that
    /// look's [`ProxyNews`]).
    pub fn proxy_cancel_wait(&mut self, peer_id: PeerId, id: u64) -> bool {
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return false;
        };
        let Some(w) = self.proxy_watch.get_mut(&s) else {
            return false;
        };
        let Some(at) = w.waits.iter().position(|x| x.id == id) else {
            return false;
        };
        let taken = w.waits.remove(at);
        if let Some(token) = taken.lock {
            // Out of the queue; a handover that came before the look is given back (the VM
            // is told STATUS_TIMEOUT, so it would never unlock it).
            let (slot, generation) = (taken.slot, taken.generation);
            let _ = self.cancel(s, slot, generation, token);
            if self.proxy_owns(s, slot, token) {
                let _ = self.unlock(s, slot, generation, token, None);
            }
        }
        true
    }

    /// Looks at everything proxied peer `peer_id` holds: what changed since it was last
    /// told (deleted; a section grown or notified; an event signalled), and which of its
    /// WAITs can complete. Sets its bit in the `waiters` word of each event and section
    /// again first, so the next change made in shared memory comes with a WAKE.
    pub fn proxy_poll(&mut self, peer_id: PeerId) -> ProxyNews {
        let mut news = ProxyNews::default();
        let Ok(s) = self.proxy_slot_of(peer_id) else {
            return news;
        };
        let held: std::collections::BTreeSet<ObjectSlot> = self
            .proxies
            .get(&s)
            .map(|h| {
                h.keys()
                    .copied()
                    .filter(|&o| self.proxy_count(h, o) > 0)
                    .collect()
            })
            .unwrap_or_default();
        for &slot in &held {
            if matches!(
                self.record_at(slot).map(|r| r.kind),
                Some(kind::EVENT | kind::SECTION)
            ) {
                let _ = sync::register_waiter(&self.mem, &self.layout, slot, s);
            }
        }
        let mut watch = self.proxy_watch.remove(&s).unwrap_or_default();
        watch.seen.retain(|o, _| held.contains(o));
        for &slot in &held {
            let (Some(now), Some(k)) = (self.seen_now(slot), self.record_at(slot).map(|r| r.kind))
            else {
                continue;
            };
            let Some(before) = watch.seen.insert(slot, now) else {
                // First look since it took the hold: what it saw at its open is no news.
                continue;
            };
            if before.generation != now.generation {
                continue;
            }
            let event = |kind: u32, value: u64| VirtioVshmEvent {
                kind,
                slot: slot.raw(),
                generation: now.generation.raw(),
                value,
            };
            if now.unlinked && !before.unlinked {
                news.events.push(event(EVENT_DELETED, 0));
            }
            match k {
                kind::SECTION if now.size != before.size || now.seq != before.seq => {
                    news.events.push(event(EVENT_CHANGED, now.seq));
                }
                kind::EVENT if now.seq != before.seq => {
                    news.events.push(event(EVENT_SIGNALLED, now.seq));
                }
                _ => {}
            }
        }
        let waits = std::mem::take(&mut watch.waits);
        for w in waits {
            if !self.proxy_holding(s, w.slot, w.generation) {
                if let Some(token) = w.lock {
                    let _ = self.cancel(s, w.slot, w.generation, token);
                }
                news.done.push((w.id, Status::InvalidHandle, 0));
                continue;
            }
            if let Some(token) = w.lock {
                if self.proxy_owns(s, w.slot, token) {
                    // Handed over (its entry is gone) or named by a scribble: either way
                    // no entry of it may stay to be handed the mutex again later.
                    let _ = self.cancel(s, w.slot, w.generation, token);
                    let status = self.proxy_acquired(w.slot);
                    news.done.push((w.id, status, 0));
                } else {
                    watch.waits.push(w);
                }
                continue;
            }
            let seq = self.seq_of(w.slot);
            let ready = match self.record_at(w.slot).map(|r| r.kind) {
                Some(kind::EVENT) => self.proxy_try_take(w.slot),
                _ => seq != w.since,
            };
            if ready {
                news.done.push((w.id, Status::Success, seq));
            } else {
                watch.waits.push(w);
            }
        }
        self.proxy_watch.insert(s, watch);
        news
    }

    /// Records what proxied peer slot `s` sees of `slot` now that it took a hold (its first
    /// look reports only what changes after this).
    pub(super) fn proxy_seen_now(&mut self, s: PeerSlot, slot: ObjectSlot) {
        let Some(now) = self.seen_now(slot) else {
            return;
        };
        let w = self.proxy_watch.entry(s).or_default();
        match w.seen.get(&slot) {
            Some(old) if old.generation == now.generation => {}
            _ => {
                w.seen.insert(slot, now);
            }
        }
    }

    /// Forgets proxied peer slot `s`'s watch (it left: its WAITs are dropped).
    pub(super) fn proxy_unwatch(&mut self, s: PeerSlot) {
        self.proxy_watch.remove(&s);
    }

    /// LIST for proxied peer `peer_id`: the live names its policy lets it open, in name
    /// order.
    pub fn proxy_list(&self, peer_id: PeerId) -> Result<Vec<ProxyListed>, Status> {
        let s = self.proxy_slot_of(peer_id)?;
        let mut out: Vec<ProxyListed> = self
            .names
            .iter()
            .filter(|(name, _)| self.may_open(s, Some(name)).is_ok())
            .filter_map(|(name, &slot)| {
                let r = self.record_at(slot).filter(|r| !r.unlinked)?;
                let mut flags = 0;
                if r.persistent {
                    flags |= LIST_PERSISTENT;
                }
                if r.manual_reset {
                    flags |= LIST_MANUAL_RESET;
                }
                Some(ProxyListed {
                    name: name.clone(),
                    kind: r.kind,
                    flags,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
