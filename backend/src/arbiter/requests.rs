//! The request path: `service` answers a peer's mailbox (recording telemetry per request)
//! and executes CREATE, DELETE and GROW (WAKE, LOCK, UNLOCK, CANCEL: `sync.rs`) against the private records, publishing the result;
//! `delete_by_name` is DELETE on the host's own authority (vshmctl delete).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use vshm_format::layout::holder_bit;
use vshm_format::layout::{kind, object_flags, object_state, ObjectEntry, Response, LEASE_KEEP};
use vshm_format::lease::close_if_unheld;
use vshm_format::mailbox::{self, Command, Refusal};
use vshm_format::object::{self, bump_namespace_seq};
use vshm_format::shm::Fault;
use vshm_format::sync;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset, Status};

use super::reclaim::Release;
use super::{Arbiter, Backing, Record};
use crate::telemetry::Event;

/// Why a CREATE failed: a status (with the object it concerns), a limit that was hit
/// (always STATUS_INSUFFICIENT_RESOURCES, with the reason in the response), or the
/// requester's policy.
#[derive(Debug, Clone)]
enum Denied {
    Status(Status, Option<ObjectSlot>),
    Limit(Refusal),
    /// The requester's policy (ACCESS_DENIED or QUOTA_EXCEEDED).
    Policy(crate::policy::Denial),
}

/// What a CREATE asks for, decoded.
#[derive(Debug, Clone, Copy)]
struct Shape {
    kind: u32,
    max_size: u64,
    initial_size: u64,
    persistent: bool,
    manual_reset: bool,
}

impl<M: Backing> Arbiter<M> {
    /// Handles a doorbell from `peer_id`: answers its pending request, if any. Returns
    /// whether a response was written (the caller then rings the peer).
    pub fn service(&mut self, peer_id: PeerId) -> bool {
        self.answer_pending(peer_id)
            .is_some_and(|a| self.deliver(&a))
    }

    /// [`Arbiter::service`] without writing the response: the caller makes the state durable
    /// first (`crate::fdstore`), then [`Arbiter::deliver`]s it — a peer never holds a
    /// response whose effects a crash could lose. The response is kept with the peer's
    /// record until its next request, so a journal holds it too.
    pub fn answer_pending(&mut self, peer_id: PeerId) -> Option<super::Answered> {
        let s = self.slot_of(peer_id)?;
        let slot = s.raw() as usize;
        if !self.peers[slot].connected {
            return None;
        }
        let last = self.peers[slot].last_seq;
        let Ok(Some((seq, req))) = mailbox::take_request(&self.mem, &self.layout, s, last) else {
            return None;
        };
        self.peers[slot].last_seq = seq;
        let resp = self.answer(peer_id, s, &req);
        let reply = super::Reply::of(&resp);
        self.peers[slot].reply = Some((seq, reply));
        Some(super::Answered {
            peer: s,
            seq,
            reply,
        })
    }

    /// Writes an answered request's response into the peer's mailbox (the caller then
    /// rings it). False if the mailbox could not be written.
    pub fn deliver(&self, a: &super::Answered) -> bool {
        mailbox::respond(&self.mem, &self.layout, a.peer, a.seq, &a.reply.response()).is_ok()
    }

    /// Decodes, admits and executes `req` from `peer_id` in slot `s`, counting and
    /// reporting it: the response, whichever transport carries it.
    fn answer(
        &mut self,
        peer_id: PeerId,
        s: PeerSlot,
        req: &vshm_format::layout::Request,
    ) -> Response {
        let started = std::time::Instant::now();
        let resp = match mailbox::decode(req, &self.layout) {
            Ok(cmd) => match self.admit(s, req.op) {
                Ok(()) => self.execute(peer_id, s, cmd),
                Err(d) => {
                    let status = self.refuse(s, crate::telemetry::op_name(req.op), &d);
                    mailbox::status_response(status)
                }
            },
            Err(status) => mailbox::decode_failure(req, &self.layout, status),
        };
        self.counters.requests += 1;
        let refusal = Refusal::from_response(&resp);
        let status = Status::from_code(resp.status);
        // A policy's reason (access.rs), taken even on success so it never outlives its request.
        let policy_reason = self.denial.take();
        if !status.is_some_and(Status::is_success) {
            self.counters.failed_requests += 1;
            let op = crate::telemetry::op_name(req.op);
            let mut e = Event::now("denied")
                .peer(peer_id)
                .detail(match (refusal, policy_reason) {
                    (Some(r), _) => format!("{op}: {r}"),
                    (None, Some(why)) => format!("{op}: {why}"),
                    (None, None) => op.to_string(),
                });
            if let Some(st) = status {
                e = e.status(st);
            }
            self.emit(e);
        }
        if let Some(r) = refusal {
            tracing::info!(
                peer_id = peer_id.raw(),
                op = crate::telemetry::op_name(req.op),
                "denied: STATUS_INSUFFICIENT_RESOURCES: {r}"
            );
        }
        tracing::debug!(
            peer_id = peer_id.raw(),
            op = req.op,
            status = resp.status,
            "request"
        );
        self.requests.record(req.op, resp.status, started.elapsed());
        resp
    }

    /// A mailbox request (DELETE, GROW, WAKE, LOCK, UNLOCK, CANCEL; CREATE through
    /// [`Arbiter::proxy_create`]) from a peer vshmd stands in for, carried by its own
    /// transport (docs/VHOST-USER.md): answered as if it had come through a mailbox.
    pub fn proxy_request(
        &mut self,
        peer_id: PeerId,
        req: &vshm_format::layout::Request,
    ) -> Response {
        match self
            .slot_of(peer_id)
            .filter(|s| self.proxies.contains_key(s))
        {
            Some(s) if req.op != vshm_format::layout::op::CREATE => self.answer(peer_id, s, req),
            Some(_) => mailbox::status_response(Status::InvalidParameter),
            None => mailbox::status_response(Status::InvalidHandle),
        }
    }

    pub(super) fn execute(
        &mut self,
        peer_id: PeerId,
        peer: PeerSlot,
        cmd: Command<'_>,
    ) -> Response {
        // Whatever it does (a GROW, a DELETE, a WAKE) may be news to a proxied holder.
        self.proxy_due = true;
        let result = match cmd {
            Command::Create {
                name,
                kind,
                max_size,
                initial_size,
                persistent,
                manual_reset,
            } => match self.create(
                peer_id,
                peer,
                name,
                Shape {
                    kind,
                    max_size,
                    initial_size,
                    persistent,
                    manual_reset,
                },
            ) {
                Err(Denied::Limit(refusal)) => {
                    let mut r = mailbox::status_response(Status::InsufficientResources);
                    refusal.write(&mut r);
                    return r;
                }
                Err(Denied::Status(status, slot)) => Err((status, slot)),
                Err(Denied::Policy(d)) => Err((self.refuse(peer, "create", &d), None)),
                Ok(slot) => Ok(slot),
            },
            Command::Delete { slot, generation } => match self.may_delete(peer, slot) {
                // An unknown or already deleted object is answered as before (NOT_FOUND,
                // DELETE_PENDING), whatever the policy: the table shows that to anyone.
                Err(d) if self.record(slot, generation).is_some_and(|r| !r.unlinked) => {
                    Err((self.refuse(peer, "delete", &d), None))
                }
                _ => self.delete(slot, generation).map(|()| slot),
            },
            Command::Grow {
                slot,
                generation,
                size,
            } => self.grow(peer, slot, generation, size).map(|()| slot),
            Command::Wake { slot, generation } => self.wake(peer, slot, generation).map(|()| slot),
            Command::Lock {
                slot,
                generation,
                token,
            } => self.lock(peer, slot, generation, token),
            Command::Unlock {
                slot,
                generation,
                token,
                presumed_dead,
            } => self
                .unlock(peer, slot, generation, token, presumed_dead)
                .map(|()| slot),
            Command::Cancel {
                slot,
                generation,
                token,
            } => self.cancel(peer, slot, generation, token).map(|()| slot),
        };
        match result {
            Ok(slot) => self.response(Status::Success, slot),
            Err((status, Some(slot))) => self.response(status, slot),
            Err((status, None)) => mailbox::status_response(status),
        }
    }

    fn response(&self, status: Status, slot: ObjectSlot) -> Response {
        let mut r = mailbox::status_response(status);
        if let Some(rec) = self.record_at(slot) {
            r.slot = slot.raw();
            r.generation = rec.generation.raw();
            r.offset = rec.offset.raw();
            r.size = rec.size;
            r.max_size = rec.max_size;
        }
        r
    }

    /// Heap space for a section: from the free heap, else after releasing what the
    /// quarantine may release now; refused as IN_QUARANTINE when the rest of the quarantine
    /// would make it fit (a retry soon succeeds), else as NO_FREE_EXTENT.
    fn allocate_section(&mut self, max_size: u64) -> Result<(RegionOffset, u64), Denied> {
        if let Some(got) = self.heap.allocate(max_size) {
            return Ok(got);
        }
        if self.release_quarantine() > 0 {
            if let Some(got) = self.heap.allocate(max_size) {
                return Ok(got);
            }
        }
        let wanted = self.heap.round(max_size).unwrap_or(max_size);
        let (quarantined, _) = self.quarantined();
        Err(Denied::Limit(
            if quarantined > 0 && self.fits_after_quarantine(max_size) {
                Refusal::InQuarantine {
                    wanted,
                    quarantined,
                }
            } else {
                Refusal::NoFreeExtent {
                    wanted,
                    largest: self.heap.largest_free(),
                }
            },
        ))
    }

    fn create(
        &mut self,
        peer_id: PeerId,
        peer: PeerSlot,
        name: Option<&str>,
        shape: Shape,
    ) -> Result<ObjectSlot, Denied> {
        let Shape {
            kind,
            max_size,
            initial_size,
            persistent,
            manual_reset,
        } = shape;
        if let Some(n) = name {
            // A name whose object was closed by its last holder but not yet reaped is free.
            if let Some(&slot) = self.names.get(n) {
                self.reap(slot, Release::ToHeap);
            }
            if let Some(&slot) = self.names.get(n) {
                let existing = self.objects[slot.raw() as usize].as_ref().map(|r| r.kind);
                return Err(if existing != Some(kind) {
                    Denied::Status(Status::InvalidHandle, None)
                } else if let Err(d) = self.may_open(peer, name) {
                    // Create-or-open of an existing name is an open: not worth a handle to
                    // a peer whose policy says it may not open it (advisory elsewhere, but
                    // vshmd need not help).
                    Denied::Policy(d)
                } else {
                    Denied::Status(Status::ObjectNameExists, Some(slot))
                });
            }
        }
        // Rights and quotas before anything is taken.
        let wanted = if kind == kind::SECTION {
            self.heap.round(max_size).unwrap_or(max_size)
        } else {
            0
        };
        let owner = self
            .may_create(peer, name, wanted)
            .map_err(Denied::Policy)?;
        let slot = *self
            .free_slots
            .first()
            .ok_or(Denied::Limit(Refusal::ObjectTableFull {
                max_objects: u64::from(self.layout.max_objects),
            }))?;
        // Events and mutexes have no memory: their state is the entry's sync words.
        let (offset, reserved) = if kind == kind::SECTION {
            self.allocate_section(max_size)?
        } else {
            (RegionOffset(0), 0)
        };
        // The range was punched when it was last freed; punch again so bytes a misbehaving
        // peer wrote after that cannot reach the new owner.
        if reserved > 0 {
            if let Err(e) = self.mem.discard(offset, reserved) {
                self.heap.release(offset, reserved);
                return Err(Denied::Limit(Refusal::PrepareFailed {
                    wanted: reserved,
                    os_error: e
                        .raw_os_error()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(0),
                }));
            }
        }
        // The name's room in the name area (FORMAT.md §5b), taken last so a refusal has
        // only the heap range to give back; written with the entry, under its seqlock.
        let name_off = match name {
            Some(n) => match self.name_area.allocate(n.len()) {
                Some(off) => off,
                None => {
                    if reserved > 0 {
                        self.heap.release(offset, reserved);
                    }
                    return Err(Denied::Limit(Refusal::NameAreaFull {
                        wanted: crate::name_area::NameArea::rounded(n.len()),
                        largest: self.name_area.largest_free(),
                    }));
                }
            },
            None => 0,
        };
        let generation = self.next_generation;
        self.next_generation.0 += 1;
        let lease = holder_bit(peer) | if persistent { LEASE_KEEP } else { 0 };
        let mut entry = object::make_entry(
            generation,
            object_state::LIVE,
            kind,
            offset,
            initial_size,
            max_size,
            persistent,
            name,
            peer_id,
        );
        if manual_reset {
            entry.flags |= object_flags::MANUAL_RESET;
        }
        entry.name_off = name_off;
        // The slot may have held an event or a mutex: its sync words start from zero,
        // stored before the entry is published (like the lease word). The name goes into
        // the index before the entry is LIVE, so every LIVE name is indexed (FORMAT §5a).
        let indexed = match name {
            Some(n) => self.index_insert(n, slot),
            None => Ok(()),
        };
        let published = indexed
            .and_then(|()| {
                self.lease_off(slot)
                    .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })
            })
            .and_then(|l| {
                sync::reset_words(&self.mem, &self.layout, slot)?;
                self.mem.store_u64(l, lease, Ordering::SeqCst)
            })
            .and_then(|()| match name {
                Some(n) => {
                    object::publish_named(&self.mem, &self.layout, slot, &entry, n.as_bytes())
                }
                None => object::publish(&self.mem, &self.layout, slot, &entry),
            });
        if published.is_err() {
            if let Some(n) = name {
                self.index_remove(n, slot);
                self.name_area.release(name_off, n.len());
            }
            if reserved > 0 {
                self.heap.release(offset, reserved);
            }
            return Err(Denied::Limit(Refusal::PublishFailed));
        }
        self.free_slots.remove(&slot);
        if let Some(n) = name {
            self.names.insert(n.to_owned(), slot);
        }
        self.objects[slot.raw() as usize] = Some(Record {
            generation,
            kind,
            name: name.map(str::to_owned),
            name_off,
            offset,
            size: initial_size,
            max_size,
            reserved,
            persistent,
            unlinked: false,
            creator: peer_id,
            owner,
            created: SystemTime::now(),
            repaired: false,
            manual_reset,
            wakes: 0,
            abandoned: 0,
            abandon_report: None,
            queue: VecDeque::new(),
            unclaimed: Some((peer, std::time::Instant::now())),
        });
        self.counters.created += 1;
        let mut created = Event::now("created")
            .peer(peer_id)
            .object(slot, name)
            .size(max_size);
        if kind != kind::SECTION {
            created = created.detail(super::status::kind_name(kind));
        }
        self.emit(created);
        // Debug, not info: one line per object made a create-and-destroy loop spend more of
        // vshmd's time formatting logs than serving (BENCHMARKS.md P2); the event stream
        // (`vshmctl events`) has every creation.
        tracing::debug!(
            slot = slot.raw(),
            generation = generation.raw(),
            name = name.unwrap_or("<unnamed>"),
            max_size,
            peer_id = peer_id.raw(),
            "created"
        );
        Ok(slot)
    }

    pub(super) fn record(&self, slot: ObjectSlot, generation: Generation) -> Option<&Record> {
        self.record_at(slot).filter(|r| r.generation == generation)
    }

    fn publish_record(&self, slot: ObjectSlot) -> Result<(), Fault> {
        let Some(entry) = self.record_entry(slot) else {
            return Ok(());
        };
        object::publish(&self.mem, &self.layout, slot, &entry)
    }

    /// The entry the host publishes for `slot` from its private record (lease line zero;
    /// `seq` is the seqlock's business); `None` if the slot has no record (FREE).
    pub(super) fn record_entry(&self, slot: ObjectSlot) -> Option<ObjectEntry> {
        let r = self.record_at(slot)?;
        let state = if r.unlinked {
            object_state::UNLINKED
        } else {
            object_state::LIVE
        };
        let mut entry = object::make_entry(
            r.generation,
            state,
            r.kind,
            r.offset,
            r.size,
            r.max_size,
            r.persistent,
            r.name.as_deref(),
            r.creator,
        );
        if r.manual_reset {
            entry.flags |= object_flags::MANUAL_RESET;
        }
        entry.name_off = r.name_off;
        Some(entry)
    }

    pub(super) fn delete(
        &mut self,
        slot: ObjectSlot,
        generation: Generation,
    ) -> Result<(), (Status, Option<ObjectSlot>)> {
        let rec = self
            .record(slot, generation)
            .ok_or((Status::ObjectNameNotFound, None))?;
        if rec.unlinked {
            return Err((Status::DeletePending, None));
        }
        let name = rec.name.clone();
        if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
            r.unlinked = true;
        }
        if let Some(n) = &name {
            self.names.remove(n);
        }
        let _ = self.publish_record(slot);
        // Published UNLINKED: now the name may leave the index.
        if let Some(n) = &name {
            self.index_remove(n, slot);
        }
        if let Some(lease) = self.lease_off(slot) {
            if let Ok(prev) = self.mem.fetch_and_u64(lease, !LEASE_KEEP) {
                let _ = close_if_unheld(&self.mem, lease, prev & !LEASE_KEEP);
            }
        }
        tracing::info!(
            slot = slot.raw(),
            name = name.as_deref().unwrap_or("<unnamed>"),
            "deleted"
        );
        self.counters.deleted += 1;
        self.emit(Event::now("deleted").object(slot, name.as_deref()));
        self.reap(slot, Release::ToHeap);
        Ok(())
    }

    /// Deletes a LIVE object by name on the host's own authority (vshmctl delete).
    pub fn delete_by_name(&mut self, name: &str) -> Result<(), Status> {
        let slot = *self.names.get(name).ok_or(Status::ObjectNameNotFound)?;
        let generation = self.objects[slot.raw() as usize]
            .as_ref()
            .map(|r| r.generation)
            .ok_or(Status::ObjectNameNotFound)?;
        self.delete(slot, generation).map_err(|(s, _)| s)?;
        let _ = bump_namespace_seq(&self.mem);
        Ok(())
    }

    fn grow(
        &mut self,
        peer: PeerSlot,
        slot: ObjectSlot,
        generation: Generation,
        size: u64,
    ) -> Result<(), (Status, Option<ObjectSlot>)> {
        let rec = self
            .record(slot, generation)
            .filter(|r| r.kind == kind::SECTION)
            .ok_or((Status::InvalidHandle, None))?;
        let held = self
            .lease_off(slot)
            .and_then(|l| self.mem.load_u64(l, Ordering::SeqCst).ok())
            .is_some_and(|w| w & holder_bit(peer) != 0);
        if !held {
            return Err((Status::InvalidHandle, None));
        }
        if size < rec.size || size > rec.max_size {
            return Err((Status::InvalidParameter, Some(slot)));
        }
        if size == rec.size {
            // Nothing changes: do not make readers retry a republished entry.
            return Ok(());
        }
        let name = rec.name.clone();
        if let Some(r) = self.objects[slot.raw() as usize].as_mut() {
            r.size = size;
        }
        let _ = self.publish_record(slot);
        self.counters.grown += 1;
        let peer_id = self.peers[peer.raw() as usize].id;
        self.emit(
            Event::now("grown")
                .peer(peer_id)
                .object(slot, name.as_deref())
                .size(size),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vshm_format::layout::{kind, refusal};
    use vshm_format::mailbox::{self, Refusal};
    use vshm_format::{PeerId, Status};

    use super::super::tests::{arbiter, create, request};

    #[test]
    fn a_full_object_table_and_a_full_heap_are_told_apart_in_the_response() {
        let mut a = arbiter();
        let heap = a.layout().heap_size;
        let max_objects = a.layout().max_objects;
        // The heap: a request that fits the heap but no free extent. Fill most of it first.
        let big = mailbox::create_request(Some("big"), kind::SECTION, heap - 8192, 0, false);
        assert_eq!(
            request(&mut a, PeerId(1), &big).status,
            Status::Success.code()
        );
        let r = mailbox::create_request(Some("more"), kind::SECTION, 16384, 0, false);
        let resp = request(&mut a, PeerId(1), &r);
        assert_eq!(resp.status, Status::InsufficientResources.code());
        assert_eq!(resp.reason, refusal::NO_FREE_EXTENT);
        assert_eq!(
            Refusal::from_response(&resp),
            Some(Refusal::NoFreeExtent {
                wanted: 16384,
                largest: 8192
            })
        );
        // Larger than the whole heap: answered at decode.
        let r = mailbox::create_request(Some("huge"), kind::SECTION, heap + 1, 0, false);
        let resp = request(&mut a, PeerId(1), &r);
        assert_eq!(
            Refusal::from_response(&resp),
            Some(Refusal::LargerThanHeap {
                wanted: heap + 1,
                heap_size: heap
            })
        );
        // The table: events need no heap.
        for i in 1..max_objects {
            let r = mailbox::create_sync_request(Some(&format!("e{i}")), kind::EVENT, false, false);
            assert_eq!(
                request(&mut a, PeerId(1), &r).status,
                Status::Success.code()
            );
        }
        let resp = create(&mut a, PeerId(2), "last", false);
        assert_eq!(resp.status, Status::InsufficientResources.code());
        assert_eq!(
            Refusal::from_response(&resp),
            Some(Refusal::ObjectTableFull {
                max_objects: u64::from(max_objects)
            })
        );
        // Other failures carry no reason.
        let resp = request(
            &mut a,
            PeerId(1),
            &mailbox::create_request(Some("x"), kind::SECTION, 0, 0, false),
        );
        assert_eq!(resp.status, Status::InvalidParameter.code());
        assert_eq!(resp.reason, refusal::NONE);
    }
}
