//! After a crash (`crate::fdstore`). A response is delivered only once the journal holds
//! its effects (and the response itself, kept with the peer's record), so the records a
//! journal rebuilds explain everything a peer was told. What the crash may have cut short:
//! a response journaled but not yet written (written now), and a request executed but not
//! journaled — its effects are in the header but nobody was told of them; the request is
//! still pending and is served again. Its effects are healed back to the records, except
//! one: an entry a pending CREATE published, which a lock-free opener may have opened in
//! that moment, is adopted when the requester's pending request names it, the requester is
//! its creator, and the requester's policy allows it (patterns, quotas), as for the
//! request itself; the CREATE served again then opens it. An adopted create only takes
//! memory no record owns, under a name nobody has.

use std::sync::atomic::Ordering;
use std::time::Instant;

use vshm_format::layout::{
    holder_bit, kind, object_state, op, Request, MB_REQ_SEQ_OFF, MB_RESP_SEQ_OFF, VECTOR_CONTROL,
};
use vshm_format::mailbox;
use vshm_format::object::read_object;
use vshm_format::shm::read_pod;
use vshm_format::{Generation, ObjectSlot, PeerSlot};

use super::{Arbiter, Backing, Record};

/// What [`Arbiter::adopt_ahead`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ahead {
    /// An object its pending CREATE had published before the crash, adopted as a record.
    pub adopted: u32,
    /// Responses the journal held and the mailboxes lacked, written now.
    pub redelivered: u32,
    /// Mailboxes showing a response the journal never had (not served again).
    pub answered: u32,
}

/// Generations a create just before the crash can have used beyond the journal's next one
/// (one event creates at most one object; a margin for safety, not for scribblers).
const GENERATIONS_AHEAD: u64 = 16;

impl<M: Backing> Arbiter<M> {
    /// Reconciles the published header and the mailboxes with the records just rebuilt from
    /// a journal (see the module): call once, before serving.
    pub fn adopt_ahead(&mut self) -> Ahead {
        let mut ahead = Ahead::default();
        let mut creating: Vec<(PeerSlot, Request)> = Vec::new();
        for i in 0..self.peers.len() {
            let s = PeerSlot(u32::try_from(i).unwrap_or(u32::MAX));
            if !self.peers[i].connected {
                continue;
            }
            let Some(base) = self.layout.mailbox(s) else {
                continue;
            };
            let req_seq = self.mem.load_u64(base + MB_REQ_SEQ_OFF, Ordering::Acquire);
            let resp_seq = self.mem.load_u64(base + MB_RESP_SEQ_OFF, Ordering::Acquire);
            let (Ok(req_seq), Ok(resp_seq)) = (req_seq, resp_seq) else {
                continue;
            };
            // A response the journal holds that the crash kept from the mailbox.
            if let Some((seq, reply)) = self.peers[i].reply {
                if seq == req_seq && resp_seq != seq {
                    let _ = mailbox::respond(&self.mem, &self.layout, s, seq, &reply.response());
                    self.rings.push((self.peers[i].id, VECTOR_CONTROL));
                    ahead.redelivered += 1;
                    continue;
                }
            }
            if req_seq == 0 || req_seq == self.peers[i].last_seq {
                continue;
            }
            if req_seq == resp_seq {
                // Shows a response the journal never had (a scribble: responses are
                // delivered only once journaled): never served again all the same.
                self.peers[i].last_seq = req_seq;
                ahead.answered += 1;
                continue;
            }
            // Pending: served once this process runs. A CREATE may have been executed
            // (its entry published) just before the crash.
            if let Ok(req) = read_pod::<Request, _>(&self.mem, base) {
                if req.op == op::CREATE && req.name_len > 0 {
                    creating.push((s, req));
                }
            }
        }
        for slot in (0..self.layout.max_objects).map(ObjectSlot) {
            if ahead.adopted > 0 || creating.is_empty() {
                break;
            }
            if self.record_at(slot).is_some() {
                continue;
            }
            let Ok(Some(info)) = read_object(&self.mem, &self.layout, slot) else {
                continue;
            };
            let Some(name) = info.name() else {
                continue;
            };
            let by = creating.iter().find(|(s, req)| {
                let len = (req.name_len as usize).min(req.name.len());
                req.name[..len] == *name.as_bytes()
                    && u32::from(self.peers[s.raw() as usize].id.raw()) == info.creator
            });
            let Some(&(s, _)) = by else {
                continue;
            };
            match self.adopt_created(s, slot, &info) {
                Ok(()) => ahead.adopted += 1,
                Err(why) => tracing::warn!(
                    slot = slot.raw(),
                    generation = info.generation.raw(),
                    "an object the journal lacks was not adopted: {why}"
                ),
            }
        }
        ahead
    }

    /// Takes `[offset, offset + len)` for an adopted object if no record owns any of it:
    /// every byte free in the space map or waiting in quarantine (the crashed process may
    /// have released a quarantined range and handed it out in the same event). Changes
    /// nothing otherwise.
    fn take_unowned(&mut self, offset: vshm_format::RegionOffset, len: u64) -> bool {
        let Some(end) = offset.raw().checked_add(len) else {
            return false;
        };
        // The pieces of the range, each from the space map (true) or from quarantine.
        let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = offset.raw();
        while at < end {
            let free = self
                .heap
                .extents()
                .find(|&(o, l)| o.raw() <= at && at < o.raw().saturating_add(l))
                .map(|(o, l)| (o.raw().saturating_add(l).min(end), true));
            let held = || {
                self.quarantine
                    .entries
                    .iter()
                    .find(|q| q.offset.raw() <= at && at < q.offset.raw().saturating_add(q.len))
                    .map(|q| (q.offset.raw().saturating_add(q.len).min(end), false))
            };
            let Some((to, from_heap)) = free.or_else(held) else {
                return false;
            };
            pieces.push((at, to - at, from_heap));
            at = to;
        }
        for (o, l, from_heap) in pieces {
            if from_heap {
                if !self.heap.take_range(vshm_format::RegionOffset(o), l) {
                    return false;
                }
            } else {
                self.quarantine.carve(vshm_format::RegionOffset(o), l);
            }
        }
        true
    }

    /// Takes a header entry the records lack as a created object, if it is one the
    /// journal could have missed: a generation not handed out yet by the records, a
    /// known kind, memory that is free in the space map (taken now), a name nobody has,
    /// and a creator that is connected.
    fn adopt_created(
        &mut self,
        creator_slot: PeerSlot,
        slot: ObjectSlot,
        info: &vshm_format::object::ObjectInfo,
    ) -> Result<(), String> {
        if self.record_at(slot).is_some() {
            return Err("its slot holds a record".into());
        }
        let next = self.next_generation.raw();
        let g = info.generation.raw();
        if g < next || g >= next.saturating_add(GENERATIONS_AHEAD) {
            return Err(format!("generation {g}, the records' next is {next}"));
        }
        if !matches!(info.kind, kind::SECTION | kind::EVENT | kind::MUTEX) {
            return Err(format!("kind {}", info.kind));
        }
        let name = info.name().map(str::to_owned);
        if name.as_ref().is_some_and(|n| self.names.contains_key(n))
            && info.state == object_state::LIVE
        {
            return Err(format!("its name {name:?} is taken"));
        }
        let creator = self.peers[creator_slot.raw() as usize].id;
        if info.creator != u32::from(creator.raw()) {
            return Err(format!(
                "its creator field says peer {}, the request came from peer {}",
                info.creator,
                creator.raw()
            ));
        }
        // The requester's policy, as for any create (patterns, quotas).
        let wanted = if info.kind == kind::SECTION {
            self.heap.round(info.max_size).unwrap_or(info.max_size)
        } else {
            0
        };
        self.may_create(creator_slot, name.as_deref(), wanted)
            .map_err(|d| format!("its creator's policy refuses it: {d}"))?;
        // Its name's room in the name area, where its entry says it is (the validator
        // checked it lies in the area; it must also overlap no record's name).
        if let Some(n) = &name {
            self.name_area
                .adopt(info.name_off, n.len())
                .map_err(|e| format!("its name: {e}"))?;
        }
        let reserved = if info.kind == kind::SECTION {
            match self.heap.round(info.max_size) {
                Some(r) if self.take_unowned(info.offset, r) => r,
                _ => {
                    if let Some(n) = &name {
                        self.name_area.release(info.name_off, n.len());
                    }
                    return Err(format!(
                        "its memory [{:#x}, +{:#x}) is not free",
                        info.offset.raw(),
                        info.max_size
                    ));
                }
            }
        } else {
            0
        };
        let owner = self.grant(creator_slot).map(|g| g.account.clone());
        let lease = self
            .lease_off(slot)
            .and_then(|l| self.mem.load_u64(l, Ordering::SeqCst).ok())
            .unwrap_or(0);
        let unlinked = info.state == object_state::UNLINKED;
        self.objects[slot.raw() as usize] = Some(Record {
            generation: info.generation,
            kind: info.kind,
            name: name.clone(),
            name_off: info.name_off,
            offset: info.offset,
            size: info.size,
            max_size: info.max_size,
            reserved,
            persistent: info.persistent(),
            unlinked,
            creator,
            owner,
            created: std::time::SystemTime::now(),
            repaired: false,
            manual_reset: info.flags & vshm_format::layout::object_flags::MANUAL_RESET != 0,
            wakes: 0,
            abandoned: 0,
            abandon_report: None,
            queue: std::collections::VecDeque::new(),
            // Until the creator takes its hold, as after any create.
            unclaimed: (lease & holder_bit(creator_slot) != 0)
                .then_some((creator_slot, Instant::now())),
        });
        self.free_slots.remove(&slot);
        if let (Some(n), false) = (name, unlinked) {
            // Its CREATE indexed it before publishing; the mirror learns it now (and if
            // the region's index differs, the next heal rewrites it).
            let _ = self.index_insert(&n, slot);
            self.names.insert(n, slot);
        }
        self.next_generation = Generation(g + 1);
        tracing::info!(
            slot = slot.raw(),
            generation = g,
            "adopted an object published just before the crash"
        );
        Ok(())
    }
}
