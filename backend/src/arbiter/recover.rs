//! After a crash (`crate::fdstore`): the journal the arbiter was rebuilt from is written
//! after each event, so the published header may show the effects of the one event that
//! was being handled when vshmd died — an object created, deleted or grown, a response
//! written — that the records lack. An honest peer may already act on them (it got its
//! SUCCESS), so they are adopted when they are consistent with everything the records say;
//! anything else is healed back to the records as usual. What a scribbler could make of
//! this is no more than it could do with requests: an adopted "create" only takes heap
//! that was free, under a name nobody had, for a creator that is connected.

use std::sync::atomic::Ordering;
use std::time::Instant;

use vshm_format::layout::{holder_bit, kind, object_state, MB_REQ_SEQ_OFF, MB_RESP_SEQ_OFF};
use vshm_format::object::read_object;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot};

use super::{Arbiter, Backing, Record};

/// What [`Arbiter::adopt_ahead`] took from the header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ahead {
    /// Objects published after the journal, adopted as records.
    pub adopted: u32,
    /// Objects the header shows deleted.
    pub unlinked: u32,
    /// Sections the header shows grown.
    pub grown: u32,
    /// Requests already answered (not served again).
    pub answered: u32,
}

/// Generations a create just before the crash can have used beyond the journal's next one
/// (one event creates at most one object; a margin for safety, not for scribblers).
const GENERATIONS_AHEAD: u64 = 16;

impl<M: Backing> Arbiter<M> {
    /// Adopts what the published header shows beyond the records (see the module): call
    /// once, right after rebuilding from a journal and before serving.
    pub fn adopt_ahead(&mut self) -> Ahead {
        let mut ahead = Ahead::default();
        for slot in (0..self.layout.max_objects).map(ObjectSlot) {
            let Ok(Some(info)) = read_object(&self.mem, &self.layout, slot) else {
                continue;
            };
            match self.objects[slot.raw() as usize].as_ref() {
                None => match self.adopt_created(slot, &info) {
                    Ok(()) => ahead.adopted += 1,
                    Err(why) => tracing::warn!(
                        slot = slot.raw(),
                        generation = info.generation.raw(),
                        "an object entry the journal lacks was not adopted: {why}"
                    ),
                },
                Some(r) if r.generation == info.generation => {
                    let (unlinked, size, max) = (r.unlinked, r.size, r.max_size);
                    if !unlinked
                        && info.state == object_state::UNLINKED
                        && self.delete(slot, info.generation).is_ok()
                    {
                        ahead.unlinked += 1;
                    }
                    if info.kind == kind::SECTION && info.size > size && info.size <= max {
                        if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
                            r.size = info.size;
                            ahead.grown += 1;
                        }
                    }
                }
                Some(_) => {}
            }
        }
        // A response written but not journaled: the request is done, never served twice
        // (a second UNLOCK could release someone else's mutex).
        for (i, p) in self.peers.iter_mut().enumerate() {
            let Some(base) = u32::try_from(i)
                .ok()
                .and_then(|i| self.layout.mailbox(PeerSlot(i)))
            else {
                continue;
            };
            if !p.connected {
                continue;
            }
            let req = self.mem.load_u64(base + MB_REQ_SEQ_OFF, Ordering::Acquire);
            let resp = self.mem.load_u64(base + MB_RESP_SEQ_OFF, Ordering::Acquire);
            if let (Ok(req), Ok(resp)) = (req, resp) {
                if req != 0 && req == resp && req != p.last_seq {
                    p.last_seq = req;
                    ahead.answered += 1;
                }
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
        slot: ObjectSlot,
        info: &vshm_format::object::ObjectInfo,
    ) -> Result<(), String> {
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
        let Some(creator_slot) = u16::try_from(info.creator)
            .ok()
            .map(PeerId)
            .and_then(|id| self.slot_of(id))
        else {
            return Err(format!("its creator {} is not connected", info.creator));
        };
        let reserved = if info.kind == kind::SECTION {
            match self.heap.round(info.max_size) {
                Some(r) if self.take_unowned(info.offset, r) => r,
                _ => {
                    return Err(format!(
                        "its memory [{:#x}, +{:#x}) is not free",
                        info.offset.raw(),
                        info.max_size
                    ))
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
            offset: info.offset,
            size: info.size,
            max_size: info.max_size,
            reserved,
            persistent: info.persistent(),
            unlinked,
            creator: PeerId(u16::try_from(info.creator).unwrap_or(0)),
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
