//! The namespace arbiter: the authoritative state of the namespace and the space map, kept in
//! the backend's private memory, and the mirror of it published into the shared header.
//!
//! Nothing read from the region is trusted: requests are copied out once and validated,
//! lease words and refcount cells are read as hints and cross-checked against the private
//! records before anything is destroyed.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use serde::Serialize;
use vshm_format::layout::{
    holder_bit, object_state, peer_state, refcell, Layout, PeerEntry, Response, LEASE_CLOSED,
    LEASE_HOLDERS, LEASE_KEEP, OBJ_LEASE_OFF, PEER_STATE_OFF, SB_VERSION_OFF,
};
use vshm_format::lease::close_if_unheld;
use vshm_format::mailbox::{self, Command};
use vshm_format::object::{self, bump_namespace_seq};
use vshm_format::shm::{bytes_of, zeroed, Fault, SharedMemory};
use vshm_format::{layout::FORMAT_VERSION, Status};

use crate::region::Region;
use crate::telemetry::{Event, RequestStats};

mod status;
pub use status::{PeerStatus, RegionStatus, SectionStatus, StatusReport};

/// Why a peer could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// All slots are taken.
    #[error("all {0} peer slots are in use")]
    Full(u32),
    /// Id 0 (the host) or an id already connected.
    #[error("peer id {0} is the host's or already connected")]
    BadId(u16),
    /// The region could not be written.
    #[error("cannot write the peer table: {0}")]
    Fault(Fault),
}

impl From<Fault> for ConnectError {
    fn from(f: Fault) -> Self {
        ConnectError::Fault(f)
    }
}

/// Shared memory the arbiter can also give back to the host.
pub trait Backing: SharedMemory {
    /// Frees `[offset, offset+len)` so it reads as zeroes and holds no host memory.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes of host memory backing the region now.
    fn resident(&self) -> u64;
}

impl Backing for Region {
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        Region::discard(self, offset, len)
    }
    fn resident(&self) -> u64 {
        self.resident_bytes()
    }
}

/// An object as the backend knows it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Generation (unique across the region's lifetime).
    pub generation: u64,
    /// Kind.
    pub kind: u32,
    /// Name, if named.
    pub name: Option<String>,
    /// Region offset.
    pub offset: u64,
    /// Current size.
    pub size: u64,
    /// Max size.
    pub max_size: u64,
    /// Bytes reserved in the heap (max size rounded up to the granularity).
    pub reserved: u64,
    /// Persistent.
    pub persistent: bool,
    /// Deleted (name gone, waiting for the last close).
    pub unlinked: bool,
    /// Creator's peer id.
    pub creator: u16,
    /// Creation time.
    pub created: SystemTime,
    /// A repair of its lease word was already reported.
    pub repaired: bool,
}

#[derive(Debug, Clone, Default)]
struct PeerRecord {
    /// The ivshmem id holding (or last holding) this slot.
    id: u16,
    connected: bool,
    incarnation: u64,
    last_seq: u64,
    since: Option<SystemTime>,
    /// Process id of the peer's end of the socket, where known.
    pid: Option<i32>,
    /// A name for people: QEMU's -name, else the process name.
    label: Option<String>,
    /// When the slot was last freed (a departure count; 0 = never used).
    freed: u64,
    /// Dropped by force while its process still ran: not reused until it has exited.
    fenced: bool,
}

/// What a peer's departure released.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reclaim {
    /// Handles the peer still held.
    pub handles: u64,
    /// Objects that died with it.
    pub destroyed: u64,
}

/// Counters for the monitor.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Counters {
    /// Requests answered.
    pub requests: u64,
    /// Requests answered with a failure status.
    pub failed_requests: u64,
    /// Objects created.
    pub created: u64,
    /// Objects destroyed.
    pub destroyed: u64,
    /// Peers reclaimed after they left.
    pub reclaims: u64,
    /// Lease words found inconsistent with refcount rows and repaired.
    pub repairs: u64,
    /// Objects deleted (unlinked) by request or by the host.
    pub deleted: u64,
    /// Successful grows.
    pub grown: u64,
    /// Doorbells rung by peers.
    pub doorbells: u64,
    /// Requests refused for lack of rights (ACCESS_DENIED), incl. control-socket admin.
    pub denials: u64,
    /// Events emitted.
    pub events: u64,
    /// Connections refused before they got a peer id (no slot or no safe id left).
    pub refused: u64,
}

/// The arbiter.
#[derive(Debug)]
pub struct Arbiter<M: Backing> {
    mem: M,
    layout: Layout,
    epoch: u64,
    objects: Vec<Option<Record>>,
    free_slots: BTreeSet<u32>,
    names: HashMap<String, u32>,
    heap: crate::heap::Heap,
    peers: Vec<PeerRecord>,
    next_generation: u64,
    counters: Counters,
    /// Outbox of events, drained by the event loop.
    events: Vec<Event>,
    requests: RequestStats,
    /// Last observed handle count per (object slot, peer slot), to report opens and closes
    /// that never reach the host.
    seen: Vec<u32>,
    /// Peers that have left so far (orders slot reuse).
    departures: u64,
    /// While reclaiming a fenced peer: its slot (destroyed objects' memory is held back).
    fencing: Option<u32>,
    /// Heap ranges held back for fenced peer slots: (slot, offset, length).
    fenced_ranges: Vec<(u32, u64, u64)>,
    /// When a refused connection was last reported.
    last_refusal_report: Option<std::time::Instant>,
}

impl<M: Backing> Arbiter<M> {
    /// Writes a fresh header into `mem` and publishes it (version last).
    pub fn new(mem: M, layout: Layout, epoch: u64, region_id: [u8; 16]) -> Result<Self, Fault> {
        // Everything below the heap starts zeroed; free object slots carry a CLOSED lease so
        // a stale opener can never take a hold on them.
        mem.zero(0, layout.heap_offset)?;
        for slot in 0..layout.max_objects {
            if let Some(base) = layout.object_entry(slot) {
                mem.store_u64(base + OBJ_LEASE_OFF, LEASE_CLOSED, Ordering::Relaxed)?;
            }
        }
        let sb = layout.superblock(epoch, region_id);
        mem.write_bytes(0, bytes_of(&sb))?;
        mem.store_u32(SB_VERSION_OFF, FORMAT_VERSION, Ordering::Release)?;
        let max_objects = layout.max_objects as usize;
        Ok(Arbiter {
            heap: crate::heap::Heap::new(layout.heap_offset, layout.heap_size, layout.alignment),
            mem,
            layout,
            epoch,
            objects: vec![None; max_objects],
            free_slots: (0..layout.max_objects).collect(),
            names: HashMap::new(),
            peers: vec![PeerRecord::default(); layout.max_peers as usize],
            next_generation: 1,
            counters: Counters::default(),
            events: Vec::new(),
            requests: RequestStats::default(),
            seen: vec![0; max_objects * layout.max_peers as usize],
            departures: 0,
            fencing: None,
            fenced_ranges: Vec::new(),
            last_refusal_report: None,
        })
    }

    /// Adds an event to the outbox (the daemon adds its own: peers connecting, leaving).
    pub fn emit(&mut self, e: Event) {
        self.counters.events += 1;
        self.events.push(e);
    }

    /// Takes the events emitted since the last call.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// Records that a peer rang the host.
    pub fn count_doorbell(&mut self) {
        self.counters.doorbells += 1;
    }

    /// Records a connection refused before it got a peer id; reported once per second at
    /// most (a client retrying in a loop must not flood the log or the event stream).
    pub fn count_refusal(&mut self, why: &'static str) {
        self.counters.refused += 1;
        let now = std::time::Instant::now();
        if self
            .last_refusal_report
            .is_some_and(|t| now.duration_since(t).as_secs() < 1)
        {
            return;
        }
        self.last_refusal_report = Some(now);
        tracing::warn!("refusing a client: {why}");
        self.emit(Event::now("error").detail(format!("refused a client: {why}")));
    }

    /// Records an admin request refused on the control socket.
    pub fn count_denial(&mut self, what: &str) {
        self.counters.denials += 1;
        self.emit(
            Event::now("denied")
                .status(Status::AccessDenied)
                .detail(what),
        );
    }

    /// Records who a connected peer is (from SO_PEERCRED and /proc), for the monitor.
    pub fn set_peer_process(&mut self, peer_id: u16, pid: Option<i32>, label: Option<String>) {
        if let Some(s) = self.slot_of(peer_id) {
            let rec = &mut self.peers[s as usize];
            rec.pid = pid;
            rec.label = label;
        }
    }

    /// Request counts and latencies.
    pub fn request_stats(&self) -> &RequestStats {
        &self.requests
    }

    /// The region.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Counters.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The slot of connected peer `peer_id`.
    fn slot_of(&self, peer_id: u16) -> Option<u32> {
        self.peer_slots()
            .find(|(_, p)| p.connected && p.id == peer_id)
            .map(|(s, _)| s)
    }

    /// Peer slots with their records, as u32 slot numbers.
    fn peer_slots(&self) -> impl Iterator<Item = (u32, &PeerRecord)> + '_ {
        (0..self.layout.max_peers).zip(self.peers.iter())
    }

    /// A peer id was handed out: give it a free slot, clear that slot's refcount row and
    /// mailbox, publish the peer entry. Must run before the peer learns its id.
    pub fn peer_connected(&mut self, peer_id: u16) -> Result<u32, ConnectError> {
        if peer_id == 0 || self.slot_of(peer_id).is_some() {
            return Err(ConnectError::BadId(peer_id));
        }
        // The free slot freed longest ago: a reclaimed peer that has not noticed yet (its
        // process still running) checks its slot's incarnation before touching it, and
        // reusing its slot last leaves it the most time to notice.
        let s = self
            .peer_slots()
            .filter(|(_, p)| !p.connected && !p.fenced)
            .min_by_key(|(_, p)| p.freed)
            .map(|(s, _)| s)
            .ok_or(ConnectError::Full(self.layout.max_peers))?;
        let slot = s as usize;
        self.clear_peer_memory(s)?;
        self.forget_seen(s);
        let incarnation = self.peers[slot].incarnation + 1;
        let mut e = zeroed::<PeerEntry>();
        e.peer_id = u32::from(peer_id);
        e.incarnation = incarnation;
        let base = self
            .layout
            .peer_entry(s)
            .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })?;
        self.mem.write_bytes(base, bytes_of(&e))?;
        self.mem.store_u32(
            base + PEER_STATE_OFF,
            peer_state::CONNECTED,
            Ordering::Release,
        )?;
        // Only now, with the entry published, is the slot taken.
        let rec = &mut self.peers[slot];
        rec.id = peer_id;
        rec.connected = true;
        rec.incarnation = incarnation;
        rec.last_seq = 0;
        rec.since = Some(SystemTime::now());
        rec.pid = None;
        rec.label = None;
        bump_namespace_seq(&self.mem)?;
        Ok(s)
    }

    fn clear_peer_memory(&self, slot: u32) -> Result<(), Fault> {
        let row = self
            .layout
            .refcount_cell(slot, 0)
            .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })?;
        self.mem
            .zero(row, u64::from(self.layout.refcount_row_size))?;
        let mb = self
            .layout
            .mailbox(slot)
            .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })?;
        self.mem.zero(
            mb,
            std::mem::size_of::<vshm_format::layout::Mailbox>() as u64,
        )
    }

    /// A peer left (socket closed): drop every hold it had, destroy what only it held,
    /// clear its row and mailbox.
    pub fn peer_gone(&mut self, peer_id: u16) -> Reclaim {
        let mut out = Reclaim::default();
        let Some(s) = self.slot_of(peer_id) else {
            return out;
        };
        let slot = s as usize;
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
        }
        let bit = holder_bit(s);
        let live: Vec<u32> = self.live_slots().collect();
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
        for obj in dead {
            if self.reap(obj) {
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

    /// As [`Arbiter::peer_gone`] for a peer dropped by force whose process still runs (and
    /// still maps the region): its slot and the memory of the objects that die with it are
    /// held back until [`Arbiter::unfence`]. Returns the slot to unfence.
    pub fn peer_gone_fenced(&mut self, peer_id: u16) -> (Reclaim, Option<u32>) {
        let slot = self.slot_of(peer_id);
        self.fencing = slot;
        let out = self.peer_gone(peer_id);
        self.fencing = None;
        if let Some(s) = slot {
            self.peers[s as usize].fenced = true;
        }
        (out, slot)
    }

    /// The fenced peer in `slot` has exited: its slot and held-back memory are free.
    pub fn unfence(&mut self, slot: u32) {
        if let Some(p) = self.peers.get_mut(slot as usize) {
            p.fenced = false;
        }
        let (mine, rest): (Vec<_>, Vec<_>) = self
            .fenced_ranges
            .drain(..)
            .partition(|&(s, _, _)| s == slot);
        self.fenced_ranges = rest;
        for (_, offset, len) in mine {
            self.heap.release(offset, len);
            let _ = self.mem.discard(offset, len);
        }
    }

    fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.layout.max_objects)
            .zip(self.objects.iter())
            .filter(|(_, r)| r.is_some())
            .map(|(i, _)| i)
    }

    fn lease_off(&self, slot: u32) -> Option<u64> {
        self.layout.object_entry(slot).map(|b| b + OBJ_LEASE_OFF)
    }

    fn cell_count(&self, peer: u32, obj: u32) -> u32 {
        self.layout
            .refcount_cell(peer, obj)
            .and_then(|c| self.mem.load_u32(c, Ordering::Acquire).ok())
            .map_or(0, |v| v & refcell::REF_COUNT)
    }

    fn connected_mask(&self) -> u64 {
        self.peer_slots()
            .filter(|(_, p)| p.connected)
            .fold(0, |m, (i, _)| m | holder_bit(i))
    }

    /// Handles a doorbell from `peer_id`: answers its pending request, if any. Returns
    /// whether a response was written (the caller then rings the peer).
    pub fn service(&mut self, peer_id: u16) -> bool {
        let Some(s) = self.slot_of(peer_id) else {
            return false;
        };
        let slot = s as usize;
        if !self.peers[slot].connected {
            return false;
        }
        let last = self.peers[slot].last_seq;
        let Ok(Some((seq, req))) = mailbox::take_request(&self.mem, &self.layout, s, last) else {
            return false;
        };
        self.peers[slot].last_seq = seq;
        let started = std::time::Instant::now();
        let resp = match mailbox::decode(&req, &self.layout) {
            Ok(cmd) => self.execute(peer_id, s, cmd),
            Err(status) => mailbox::status_response(status),
        };
        self.counters.requests += 1;
        let status = Status::from_code(resp.status);
        if !status.is_some_and(Status::is_success) {
            self.counters.failed_requests += 1;
            let mut e = Event::now("denied")
                .peer(peer_id)
                .detail(crate::telemetry::op_name(req.op));
            if let Some(st) = status {
                e = e.status(st);
            }
            self.emit(e);
        }
        tracing::debug!(peer_id, op = req.op, status = resp.status, "request");
        self.requests.record(req.op, resp.status, started.elapsed());
        mailbox::respond(&self.mem, &self.layout, s, seq, &resp).is_ok()
    }

    fn execute(&mut self, peer_id: u16, peer: u32, cmd: Command<'_>) -> Response {
        let result = match cmd {
            Command::Create {
                name,
                kind,
                max_size,
                initial_size,
                persistent,
            } => self.create(
                peer_id,
                peer,
                name,
                kind,
                max_size,
                initial_size,
                persistent,
            ),
            Command::Delete { slot, generation } => self.delete(slot, generation).map(|()| slot),
            Command::Grow {
                slot,
                generation,
                size,
            } => self.grow(peer, slot, generation, size).map(|()| slot),
        };
        match result {
            Ok(slot) => self.response(Status::Success, slot),
            Err((status, Some(slot))) => self.response(status, slot),
            Err((status, None)) => mailbox::status_response(status),
        }
    }

    fn response(&self, status: Status, slot: u32) -> Response {
        let mut r = mailbox::status_response(status);
        if let Some(Some(rec)) = self.objects.get(slot as usize) {
            r.slot = slot;
            r.generation = rec.generation;
            r.offset = rec.offset;
            r.size = rec.size;
            r.max_size = rec.max_size;
        }
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        peer_id: u16,
        peer: u32,
        name: Option<&str>,
        kind: u32,
        max_size: u64,
        initial_size: u64,
        persistent: bool,
    ) -> Result<u32, (Status, Option<u32>)> {
        if let Some(n) = name {
            // A name whose object was closed by its last holder but not yet reaped is free.
            if let Some(&slot) = self.names.get(n) {
                self.reap(slot);
            }
            if let Some(&slot) = self.names.get(n) {
                let existing = self.objects[slot as usize].as_ref().map(|r| r.kind);
                return Err(if existing == Some(kind) {
                    (Status::ObjectNameExists, Some(slot))
                } else {
                    (Status::InvalidHandle, None)
                });
            }
        }
        let slot = *self
            .free_slots
            .first()
            .ok_or((Status::InsufficientResources, None))?;
        let (offset, reserved) = self
            .heap
            .allocate(max_size)
            .ok_or((Status::InsufficientResources, None))?;
        // The range was punched when it was last freed; punch again so bytes a misbehaving
        // peer wrote after that cannot reach the new owner.
        if self.mem.discard(offset, reserved).is_err() {
            self.heap.release(offset, reserved);
            return Err((Status::InsufficientResources, None));
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let lease = holder_bit(peer) | if persistent { LEASE_KEEP } else { 0 };
        let entry = object::make_entry(
            generation,
            object_state::LIVE,
            kind,
            offset,
            initial_size,
            max_size,
            persistent,
            name,
            u32::from(peer_id),
        );
        let published = self
            .lease_off(slot)
            .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })
            .and_then(|l| self.mem.store_u64(l, lease, Ordering::SeqCst))
            .and_then(|()| object::publish(&self.mem, &self.layout, slot, &entry));
        if published.is_err() {
            self.heap.release(offset, reserved);
            return Err((Status::InsufficientResources, None));
        }
        self.free_slots.remove(&slot);
        if let Some(n) = name {
            self.names.insert(n.to_owned(), slot);
        }
        self.objects[slot as usize] = Some(Record {
            generation,
            kind,
            name: name.map(str::to_owned),
            offset,
            size: initial_size,
            max_size,
            reserved,
            persistent,
            unlinked: false,
            creator: peer_id,
            created: SystemTime::now(),
            repaired: false,
        });
        self.counters.created += 1;
        self.emit(
            Event::now("created")
                .peer(peer_id)
                .object(slot, name)
                .size(max_size),
        );
        tracing::info!(
            slot,
            generation,
            name = name.unwrap_or("<unnamed>"),
            max_size,
            peer_id,
            "created"
        );
        Ok(slot)
    }

    fn record(&self, slot: u32, generation: u64) -> Option<&Record> {
        self.objects
            .get(slot as usize)?
            .as_ref()
            .filter(|r| r.generation == generation)
    }

    fn publish_record(&self, slot: u32) -> Result<(), Fault> {
        let Some(Some(r)) = self.objects.get(slot as usize) else {
            return Ok(());
        };
        let state = if r.unlinked {
            object_state::UNLINKED
        } else {
            object_state::LIVE
        };
        let entry = object::make_entry(
            r.generation,
            state,
            r.kind,
            r.offset,
            r.size,
            r.max_size,
            r.persistent,
            r.name.as_deref(),
            u32::from(r.creator),
        );
        object::publish(&self.mem, &self.layout, slot, &entry)
    }

    fn delete(&mut self, slot: u32, generation: u64) -> Result<(), (Status, Option<u32>)> {
        let rec = self
            .record(slot, generation)
            .ok_or((Status::ObjectNameNotFound, None))?;
        if rec.unlinked {
            return Err((Status::DeletePending, None));
        }
        let name = rec.name.clone();
        if let Some(r) = self.objects[slot as usize].as_mut() {
            r.unlinked = true;
        }
        if let Some(n) = &name {
            self.names.remove(n);
        }
        let _ = self.publish_record(slot);
        if let Some(lease) = self.lease_off(slot) {
            if let Ok(prev) = self.mem.fetch_and_u64(lease, !LEASE_KEEP) {
                let _ = close_if_unheld(&self.mem, lease, prev & !LEASE_KEEP);
            }
        }
        tracing::info!(
            slot,
            name = name.as_deref().unwrap_or("<unnamed>"),
            "deleted"
        );
        self.counters.deleted += 1;
        self.emit(Event::now("deleted").object(slot, name.as_deref()));
        self.reap(slot);
        Ok(())
    }

    /// Deletes a LIVE object by name on the host's own authority (vshmctl delete).
    pub fn delete_by_name(&mut self, name: &str) -> Result<(), Status> {
        let slot = *self.names.get(name).ok_or(Status::ObjectNameNotFound)?;
        let generation = self.objects[slot as usize]
            .as_ref()
            .map(|r| r.generation)
            .ok_or(Status::ObjectNameNotFound)?;
        self.delete(slot, generation).map_err(|(s, _)| s)?;
        let _ = bump_namespace_seq(&self.mem);
        Ok(())
    }

    fn grow(
        &mut self,
        peer: u32,
        slot: u32,
        generation: u64,
        size: u64,
    ) -> Result<(), (Status, Option<u32>)> {
        let rec = self
            .record(slot, generation)
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
        if let Some(r) = self.objects[slot as usize].as_mut() {
            r.size = size;
        }
        let _ = self.publish_record(slot);
        self.counters.grown += 1;
        let peer_id = self.peers[peer as usize].id;
        self.emit(
            Event::now("grown")
                .peer(peer_id)
                .object(slot, name.as_deref())
                .size(size),
        );
        Ok(())
    }

    /// Destroys `slot` if its lease is CLOSED and no connected peer's refcount row disagrees;
    /// repairs the lease if one does. Returns whether it destroyed.
    fn reap(&mut self, slot: u32) -> bool {
        let Some(lease) = self.lease_off(slot) else {
            return false;
        };
        let Ok(w) = self.mem.load_u64(lease, Ordering::SeqCst) else {
            return false;
        };
        if w & LEASE_CLOSED == 0 {
            return false;
        }
        let Some(rec) = self.objects[slot as usize].as_ref() else {
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
        self.destroy(slot);
        true
    }

    fn destroy(&mut self, slot: u32) {
        let Some(rec) = self.objects[slot as usize].take() else {
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
        match self.fencing {
            // A process that was cut off may still write here: keep the range out of the
            // heap until it is gone (its pages are punched out all the same).
            Some(fence) => self.fenced_ranges.push((fence, rec.offset, rec.reserved)),
            None => self.heap.release(rec.offset, rec.reserved),
        }
        if let Err(e) = self.mem.discard(rec.offset, rec.reserved) {
            tracing::error!(slot, "could not return section memory: {e}");
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
                .get_mut(slot as usize * self.layout.max_peers as usize + p)
            {
                *c = 0;
            }
        }
        self.emit(
            Event::now("destroyed")
                .object(slot, rec.name.as_deref())
                .size(rec.reserved),
        );
        tracing::info!(
            slot,
            generation = rec.generation,
            name = rec.name.as_deref().unwrap_or("<unnamed>"),
            "destroyed"
        );
    }

    /// Logs and reports a repair of `slot`'s lease word once per object: a peer that keeps
    /// scribbling (and ringing) must not flood the log or the event stream; the
    /// `repairs` counter still counts every one.
    fn note_repair(&mut self, slot: u32, what: &'static str) {
        let Some(rec) = self.objects[slot as usize].as_mut() else {
            return;
        };
        if rec.repaired {
            return;
        }
        rec.repaired = true;
        let name = rec.name.clone();
        tracing::warn!(
            slot,
            "{what}: repaired (further repairs of this object are only counted)"
        );
        self.emit(
            Event::now("repaired")
                .object(slot, name.as_deref())
                .detail(what),
        );
    }

    /// Forgets what `observe_handles` last saw for peer slot `peer` (it changes hands).
    fn forget_seen(&mut self, peer: u32) {
        let max_peers = self.layout.max_peers as usize;
        for obj in 0..self.layout.max_objects as usize {
            if let Some(c) = self.seen.get_mut(obj * max_peers + peer as usize) {
                *c = 0;
            }
        }
    }

    /// Compares every connected peer's handle counts with the last look and emits `opened` /
    /// `closed` events for the differences: opens and closes never reach the host, so this
    /// is how the monitor sees them (at the timer's pace, coalesced).
    pub fn observe_handles(&mut self) {
        let max_peers = self.layout.max_peers as usize;
        for slot in 0..self.layout.max_objects {
            let Some(name) = self.objects[slot as usize].as_ref().map(|r| r.name.clone()) else {
                continue;
            };
            for p in 0..self.layout.max_peers {
                let rec = &self.peers[p as usize];
                let now = if rec.connected {
                    self.cell_count(p, slot)
                } else {
                    0
                };
                let i = slot as usize * max_peers + p as usize;
                let before = self.seen.get(i).copied().unwrap_or(0);
                if now == before {
                    continue;
                }
                let id = rec.id;
                if let Some(c) = self.seen.get_mut(i) {
                    *c = now;
                }
                // A departed peer's counts vanish with it: `reclaimed` already says so.
                if !self.peers[p as usize].connected {
                    continue;
                }
                let (kind, n) = if now > before {
                    ("opened", now - before)
                } else {
                    ("closed", before - now)
                };
                self.emit(
                    Event::now(kind)
                        .peer(id)
                        .object(slot, name.as_deref())
                        .detail(format!("{n} handle(s), {now} now")),
                );
            }
        }
    }

    /// Destroys every closed object and drops holder bits of peers that are not connected.
    /// Runs after each doorbell and on a timer. Returns how many objects it destroyed.
    pub fn sweep(&mut self) -> usize {
        let connected = self.connected_mask();
        let mut destroyed = 0;
        for slot in 0..self.layout.max_objects {
            let Some(keep) = self.objects[slot as usize]
                .as_ref()
                .map(|r| r.persistent && !r.unlinked)
            else {
                continue;
            };
            let Some(lease) = self.lease_off(slot) else {
                continue;
            };
            let Ok(w) = self.mem.load_u64(lease, Ordering::SeqCst) else {
                continue;
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
            if self.reap(slot) {
                destroyed += 1;
            }
        }
        destroyed
    }

    /// Private record of `slot` (tests and the monitor).
    pub fn record_at(&self, slot: u32) -> Option<&Record> {
        self.objects.get(slot as usize)?.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vshm_format::layout::{kind, Request, MB_RESPONSE_OFF};
    use vshm_format::lease::{acquire, release, Released};

    fn arbiter() -> Arbiter<Region> {
        let region = Region::create(1 << 20, false, false).expect("memfd");
        let layout = Layout::compute(1 << 20, 4, 8, 1, 4096).expect("layout");
        let mut a = Arbiter::new(region, layout, 1, [0; 16]).expect("arbiter");
        for id in 1..=3 {
            a.peer_connected(id).expect("connect");
        }
        a
    }

    fn request(a: &mut Arbiter<Region>, peer_id: u16, req: &Request) -> Response {
        let slot = u32::from(peer_id) - 1;
        let mem = a.mem();
        let seq = mailbox::post(mem, a.layout(), slot, req).expect("post");
        assert!(a.service(peer_id), "answered");
        let mb = a.layout().mailbox(slot).expect("mailbox");
        assert_eq!(
            a.mem().load_u64(mb + MB_RESPONSE_OFF, Ordering::Acquire),
            Ok(seq)
        );
        mailbox::poll(a.mem(), a.layout(), slot, seq)
            .expect("poll")
            .expect("response")
    }

    fn create(a: &mut Arbiter<Region>, peer_id: u16, name: &str, persistent: bool) -> Response {
        let r = mailbox::create_request(Some(name), kind::SECTION, 8192, 4096, persistent);
        request(a, peer_id, &r)
    }

    #[test]
    fn a_departed_peers_holds_are_reclaimed_and_what_only_it_held_is_destroyed() {
        let mut a = arbiter();
        let only = create(&mut a, 1, "only-1", false);
        let shared = create(&mut a, 1, "shared", false);
        let (l, m) = (*a.layout(), a.mem());
        acquire(m, &l, 0, only.slot, only.generation, false).expect("hold");
        acquire(m, &l, 0, shared.slot, shared.generation, false).expect("hold");
        acquire(m, &l, 1, shared.slot, shared.generation, false).expect("peer 2 holds");
        let out = a.peer_gone(1);
        assert_eq!(
            out,
            Reclaim {
                handles: 2,
                destroyed: 1
            }
        );
        assert!(a.record_at(only.slot).is_none(), "destroyed");
        assert!(a.record_at(shared.slot).is_some(), "peer 2 still holds it");
        assert_eq!(a.status().region.free, a.status().region.heap_size - 8192);
        assert_eq!(
            a.mem().load_u32(
                l.refcount_cell(0, shared.slot).expect("cell"),
                Ordering::SeqCst
            ),
            Ok(0)
        );
    }

    #[test]
    fn a_lease_closed_behind_the_holders_backs_is_repaired_not_destroyed() {
        let mut a = arbiter();
        let r = create(&mut a, 1, "victim", false);
        let (l, m) = (*a.layout(), a.mem());
        acquire(m, &l, 0, r.slot, r.generation, false).expect("hold");
        // A misbehaving peer forges CLOSED into the lease word.
        let lease = l.object_entry(r.slot).expect("slot") + OBJ_LEASE_OFF;
        m.store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
            .expect("forge");
        assert_eq!(a.sweep(), 0);
        assert!(
            a.record_at(r.slot).is_some(),
            "the holder's section survives"
        );
        assert_eq!(a.counters().repairs, 1);
        assert_eq!(a.mem().load_u64(lease, Ordering::SeqCst), Ok(holder_bit(0)));
        assert_eq!(release(a.mem(), &l, 0, r.slot), Ok(Released::LastHold));
        assert_eq!(a.sweep(), 1);
    }

    #[test]
    fn a_forged_close_of_a_persistent_section_nobody_holds_is_repaired() {
        let mut a = arbiter();
        let r = create(&mut a, 1, "keep-me", true);
        let l = *a.layout();
        let lease = l.object_entry(r.slot).expect("slot") + OBJ_LEASE_OFF;
        // The creator never took its hold; a peer forges CLOSED.
        a.mem()
            .store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
            .expect("forge");
        assert_eq!(a.sweep(), 0);
        assert!(
            a.record_at(r.slot).is_some(),
            "persistent sections live until deleted"
        );
        assert_eq!(a.mem().load_u64(lease, Ordering::SeqCst), Ok(LEASE_KEEP));
        // And a KEEP bit stripped by a peer is put back.
        a.mem()
            .store_u64(lease, 0, Ordering::SeqCst)
            .expect("strip");
        assert_eq!(a.sweep(), 0);
        assert_eq!(a.mem().load_u64(lease, Ordering::SeqCst), Ok(LEASE_KEEP));
    }

    #[test]
    fn create_reuses_a_name_whose_last_holder_closed_before_the_host_reaped_it() {
        let mut a = arbiter();
        let r = create(&mut a, 1, "n", false);
        let l = *a.layout();
        acquire(a.mem(), &l, 0, r.slot, r.generation, false).expect("hold");
        assert_eq!(release(a.mem(), &l, 0, r.slot), Ok(Released::LastHold));
        // No sweep in between: the CREATE arrives first.
        let again = create(&mut a, 1, "n", false);
        assert_eq!(Status::from_code(again.status), Some(Status::Success));
        assert_ne!(again.generation, r.generation);
    }

    #[test]
    fn holder_bits_of_absent_peers_are_dropped_by_the_sweep() {
        let mut a = arbiter();
        let r = create(&mut a, 1, "stray", false);
        let l = *a.layout();
        let lease = l.object_entry(r.slot).expect("slot") + OBJ_LEASE_OFF;
        // Peer 4 never connected, yet its bit appears (scribbled); peer 1 never took its hold.
        a.mem()
            .store_u64(lease, holder_bit(3), Ordering::SeqCst)
            .expect("scribble");
        assert_eq!(a.sweep(), 1, "no real holder left: destroyed");
        assert_eq!(a.status().region.free, a.status().region.heap_size);
    }

    #[test]
    fn requests_of_a_peer_that_is_not_connected_are_ignored() {
        let mut a = arbiter();
        assert!(!a.service(4), "peer 4 is not connected");
        assert!(!a.service(0), "the host is not a client");
        assert!(!a.service(999), "junk id");
        a.peer_gone(2);
        assert!(!a.service(2));
    }
}
