//! Peers vshmd stands in for: a VM attached through the vhost-user device
//! (docs/VHOST-USER.md §7) cannot see the region's header, so vshmd opens and closes on its
//! behalf. Such a peer occupies a peer slot like any other — its entry is published, its
//! holder bits are set in lease words, so ivshmem peers' lock-free closes and vshmd's own
//! reaping treat it the same — but its holds are counted here, in private memory, instead
//! of in its refcount row: no scribble on the region can take a hold away from it, and a
//! destroy never waits for its acknowledgement.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use vshm_format::layout::{holder_bit, LEASE_CLOSED};
use vshm_format::lease::close_if_unheld;
use vshm_format::mailbox::Command;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset, Status};

use super::reclaim::Release;
use super::{Arbiter, Backing, ConnectError};

/// The holds vshmd keeps for one proxied peer: object slot → (generation, handles).
pub(super) type Holds = BTreeMap<ObjectSlot, (Generation, u32)>;

/// An object a proxied peer now holds (one more handle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHold {
    /// Its slot.
    pub slot: ObjectSlot,
    /// Its generation.
    pub generation: Generation,
    /// `vshm_format::layout::kind`.
    pub kind: u32,
    /// Region offset of its memory (sections).
    pub offset: RegionOffset,
    /// Its size now.
    pub size: u64,
    /// Its max size.
    pub max_size: u64,
    /// The request created it (else it existed: STATUS_OBJECT_NAME_EXISTS).
    pub created: bool,
    /// `vshm_format::layout::object_flags` as its entry publishes them.
    pub flags: u32,
    /// Its change count (`signal_seq`) now.
    pub change_count: u64,
}

impl<M: Backing> Arbiter<M> {
    /// A peer vshmd stands in for connected (see the module): a slot and a published entry,
    /// as [`Arbiter::peer_connected`], and an empty set of holds.
    pub fn proxy_connected(&mut self, peer_id: PeerId) -> Result<PeerSlot, ConnectError> {
        let s = self.publish_peer(peer_id, false)?;
        self.proxies.insert(s, Holds::new());
        Ok(s)
    }

    /// The holder bits of proxied peers.
    pub(super) fn proxy_mask(&self) -> u64 {
        self.proxies.keys().fold(0, |m, &s| m | holder_bit(s))
    }

    /// A proxied peer's handles on `obj` (0 for another generation than the record's).
    pub(super) fn proxy_count(&self, holds: &Holds, obj: ObjectSlot) -> u32 {
        match (holds.get(&obj), self.record_at(obj)) {
            (Some(&(g, n)), Some(r)) if r.generation == g => n,
            _ => 0,
        }
    }

    fn proxy_slot(&self, peer_id: PeerId) -> Result<PeerSlot, Status> {
        self.slot_of(peer_id)
            .filter(|s| self.proxies.contains_key(s))
            .ok_or(Status::InvalidHandle)
    }

    /// Opens the LIVE object called `name` for proxied peer `peer_id` (STATUS_OBJECT_NAME_NOT_FOUND
    /// if there is none, or its last holder has just closed it).
    pub fn proxy_open(&mut self, peer_id: PeerId, name: &str) -> Result<ProxyHold, Status> {
        let s = self.proxy_slot(peer_id)?;
        self.may_open(s, Some(name))
            .map_err(|d| self.refuse(s, "open", &d))?;
        let slot = *self.names.get(name).ok_or(Status::ObjectNameNotFound)?;
        self.proxy_take(s, slot)
    }

    /// Create-or-open for proxied peer `peer_id`, as a CREATE request over the mailbox
    /// (`cmd` must be one), but the hold is taken at once: `created` is false when it opened
    /// an existing object (STATUS_OBJECT_NAME_EXISTS to the VM). A refusal is the response
    /// a mailbox CREATE would have had (with the limit that was hit).
    pub fn proxy_create(
        &mut self,
        peer_id: PeerId,
        cmd: Command<'_>,
    ) -> Result<ProxyHold, Box<vshm_format::layout::Response>> {
        let refused = |st: Status| Box::new(vshm_format::mailbox::status_response(st));
        let s = self.proxy_slot(peer_id).map_err(refused)?;
        if !matches!(cmd, Command::Create { .. }) {
            return Err(refused(Status::InvalidParameter));
        }
        self.admit(s, vshm_format::layout::op::CREATE)
            .map_err(|d| refused(self.refuse(s, "create", &d)))?;
        let resp = self.execute(peer_id, s, cmd);
        let status = Status::from_code(resp.status);
        let slot = ObjectSlot(resp.slot);
        match status {
            Some(Status::Success) => {
                // The creator's holder bit is set by CREATE; its hold is this one.
                if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
                    r.unclaimed = None;
                }
                self.proxy_count_up(s, slot);
                self.proxy_hold(slot, true).ok_or(Box::new(resp))
            }
            Some(Status::ObjectNameExists) => self.proxy_take(s, slot).map_err(refused),
            _ => Err(Box::new(resp)),
        }
    }

    fn proxy_hold(&self, slot: ObjectSlot, created: bool) -> Option<ProxyHold> {
        let r = self.record_at(slot)?;
        Some(ProxyHold {
            slot,
            generation: r.generation,
            kind: r.kind,
            offset: r.offset,
            size: r.size,
            max_size: r.max_size,
            created,
            flags: r.published_flags(),
            change_count: self.seq_of(slot),
        })
    }

    fn proxy_count_up(&mut self, s: PeerSlot, slot: ObjectSlot) {
        let Some(generation) = self.record_at(slot).map(|r| r.generation) else {
            return;
        };
        if let Some(holds) = self.proxies.get_mut(&s) {
            let e = holds.entry(slot).or_insert((generation, 0));
            if e.0 != generation {
                *e = (generation, 0);
            }
            e.1 = e.1.saturating_add(1);
        }
        self.proxy_seen_now(s, slot);
    }

    /// One more handle of proxy slot `s` on `slot`: the holder bit goes into the lease word
    /// unless the word is CLOSED (its last holder closed it: reaped now, not found).
    fn proxy_take(&mut self, s: PeerSlot, slot: ObjectSlot) -> Result<ProxyHold, Status> {
        let r = self.record_at(slot).ok_or(Status::ObjectNameNotFound)?;
        if r.unlinked {
            return Err(Status::DeletePending);
        }
        let lease = self.lease_off(slot).ok_or(Status::InvalidHandle)?;
        let bit = holder_bit(s);
        let mut cur = self
            .mem
            .load_u64(lease, Ordering::SeqCst)
            .map_err(|_| Status::InvalidHandle)?;
        loop {
            if cur & LEASE_CLOSED != 0 {
                self.reap(slot, Release::ToHeap);
                return Err(Status::ObjectNameNotFound);
            }
            match self.mem.cas_u64(lease, cur, cur | bit) {
                Ok(Ok(_)) => break,
                Ok(Err(now)) => cur = now,
                Err(_) => return Err(Status::InvalidHandle),
            }
        }
        self.proxy_count_up(s, slot);
        self.proxy_hold(slot, false)
            .ok_or(Status::ObjectNameNotFound)
    }

    /// Closes one handle of proxied peer `peer_id` on (`slot`, `generation`); the last one
    /// takes its holder bit out of the lease word, and the object dies if that was the last
    /// hold anywhere.
    pub fn proxy_close(
        &mut self,
        peer_id: PeerId,
        slot: ObjectSlot,
        generation: Generation,
    ) -> Result<(), Status> {
        let s = self.proxy_slot(peer_id)?;
        let holds = self.proxies.get_mut(&s).ok_or(Status::InvalidHandle)?;
        let last = match holds.get_mut(&slot) {
            Some((g, n)) if *g == generation && *n > 0 => {
                *n -= 1;
                *n == 0
            }
            _ => return Err(Status::InvalidHandle),
        };
        if !last {
            return Ok(());
        }
        holds.remove(&slot);
        // Its last handle on a mutex: it can no longer UNLOCK it (nor be handed it), so a
        // mutex it owns goes to the next locker as abandoned, and its queue entries go.
        self.proxy_leave_mutex(s, slot, peer_id);
        let Some(lease) = self.lease_off(slot) else {
            return Ok(());
        };
        let bit = holder_bit(s);
        if let Ok(prev) = self.mem.fetch_and_u64(lease, !bit) {
            if close_if_unheld(&self.mem, lease, prev & !bit).unwrap_or(false) {
                self.reap(slot, Release::ToHeap);
            }
        }
        Ok(())
    }

    /// The handles proxied peer `peer_id` has on each object (for its transport's
    /// bookkeeping and for tests).
    pub fn proxy_holds(&self, peer_id: PeerId) -> Vec<(ObjectSlot, Generation, u32)> {
        self.slot_of(peer_id)
            .and_then(|s| self.proxies.get(&s))
            .map(|h| h.iter().map(|(&o, &(g, n))| (o, g, n)).collect())
            .unwrap_or_default()
    }
}
