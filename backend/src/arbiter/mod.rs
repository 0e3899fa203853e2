//! The namespace arbiter: the authoritative state of the namespace and the space map, kept in
//! the backend's private memory, and the mirror of it published into the shared header.
//!
//! Nothing read from the region is trusted: requests are copied out once and validated,
//! lease words and refcount cells are read as hints and cross-checked against the private
//! records before anything is destroyed.
//!
//! This file holds that state, in one place: the [`Arbiter`] struct with its records
//! ([`Record`], the peer records, [`Counters`]), construction, accessors and the few reads
//! of the region every part shares. What acts on it lives next door: peer slots in
//! `peers.rs`, CREATE/DELETE/GROW in `requests.rs`, reclaiming, reaping, sweeping and
//! repairs in `reclaim.rs`, fencing in `fence.rs`, the event outbox and handle watching
//! in `events.rs`, the status document and dump in `status.rs`, `heal.rs`, which puts
//! back what a peer scribbled over the host-written parts of the header, and `access.rs`,
//! which asks each peer's policy (`crate::policy`) before a request acts.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use vshm_format::layout::{
    object_flags, refcell, Layout, Superblock, FORMAT_VERSION, LEASE_CLOSED, OBJ_LEASE_OFF,
    SB_VERSION_OFF,
};
use vshm_format::shm::{bytes_of, Fault, SharedMemory};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};

use crate::policy::{Grant, Identity, RateLimiter};
use crate::region::Region;
use crate::telemetry::{Event, RequestStats};

mod access;
mod events;
mod fence;
mod heal;
mod peers;
mod proxy;
mod proxy_sync;
mod quarantine;
mod reclaim;
mod recover;
mod requests;
mod snapshot;
mod status;
mod sync;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_access;
#[cfg(test)]
mod tests_heal;
#[cfg(test)]
mod tests_proxy;
#[cfg(test)]
mod tests_proxy_lock;
#[cfg(test)]
mod tests_proxy_lock_attacks;
#[cfg(test)]
mod tests_quarantine;
#[cfg(test)]
mod tests_snapshot;
#[cfg(test)]
mod tests_sync;
#[cfg(test)]
mod tests_sync_attacks;

pub use heal::HealReport;
pub use peers::ConnectError;
pub use proxy::ProxyHold;
pub use proxy_sync::{ProxyListed, ProxyNews};
pub use quarantine::{DEFAULT_CLAIM_TIMEOUT, DEFAULT_QUARANTINE};
pub use reclaim::Reclaim;
pub use recover::Ahead;
pub use snapshot::{ArbiterSnapshot, HeaderCheck, LayoutParams, SnapshotError};
pub use status::{PeerStatus, RegionStatus, SectionStatus, StatusReport};

/// Shared memory the arbiter can also give back to the host.
pub trait Backing: SharedMemory {
    /// Frees `[offset, offset+len)` so it reads as zeroes and holds no host memory.
    fn discard(&self, offset: RegionOffset, len: u64) -> io::Result<()>;
    /// Bytes of host memory backing the region now.
    fn resident(&self) -> u64;
}

impl Backing for Region {
    fn discard(&self, offset: RegionOffset, len: u64) -> io::Result<()> {
        Region::discard(self, offset.raw(), len)
    }
    fn resident(&self) -> u64 {
        self.resident_bytes()
    }
}

/// An object as the backend knows it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Generation (unique across the region's lifetime).
    pub generation: Generation,
    /// Kind.
    pub kind: u32,
    /// Name, if named.
    pub name: Option<String>,
    /// Where the name's bytes are in the name area (FORMAT.md §5b; 0 if unnamed). Its room
    /// is taken from `Arbiter::name_area` while the record exists, UNLINKED included.
    pub name_off: u32,
    /// Region offset.
    pub offset: RegionOffset,
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
    pub creator: PeerId,
    /// The VM account its reservation counts against (the creator's, see `policy`).
    pub owner: Option<Arc<Identity>>,
    /// Creation time.
    pub created: SystemTime,
    /// A repair of its lease word was already reported.
    pub repaired: bool,
    /// EVENT: stays signalled until reset (published as `MANUAL_RESET`).
    pub manual_reset: bool,
    /// WAKE requests served for it.
    pub wakes: u64,
    /// MUTEX: times its owner died (or vanished) holding it.
    pub abandoned: u64,
    /// MUTEX: when an abandonment was last logged and reported, and how many since then
    /// were counted but not reported (a peer forging owner words must not flood the log).
    pub abandon_report: Option<(std::time::Instant, u64)>,
    /// MUTEX: peers waiting for it, in arrival order: (peer slot, token). Private: nothing
    /// in the region can add to or reorder it.
    pub queue: VecDeque<(PeerSlot, u32)>,
    /// The creator's slot and when the host set its holder bit, until the creator takes
    /// its hold (see `quarantine::expire_unclaimed`).
    pub unclaimed: Option<(PeerSlot, std::time::Instant)>,
}

impl Record {
    /// The `object_flags` its entry publishes.
    pub fn published_flags(&self) -> u32 {
        let mut f = 0;
        if self.persistent {
            f |= object_flags::PERSISTENT;
        }
        if self.name.is_some() {
            f |= object_flags::NAMED;
        }
        if self.manual_reset {
            f |= object_flags::MANUAL_RESET;
        }
        f
    }
}

#[derive(Debug, Clone, Default)]
struct PeerRecord {
    /// The ivshmem id holding (or last holding) this slot.
    id: PeerId,
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
    /// The highest `revoke_seq` it has acknowledged through its own doorbell (§11a).
    acked: u64,
    /// Its policy and account; `None` (no policy given, e.g. unit tests): unrestricted.
    grant: Option<Grant>,
    /// Requests of its refused by its policy.
    denials: u64,
    /// When a denial of its was last logged, and how many since went unlogged.
    denial_log: Option<(std::time::Instant, u64)>,
    /// Its last request's sequence number and response, kept until the next one: after a
    /// crash the journal delivers a response the crashed process made durable but may not
    /// have written (`recover.rs`).
    reply: Option<(u64, Reply)>,
    /// Rings of its doorbell the host expects without a sweep: requests answered and
    /// closes taken from its close hint before their rings were counted (FORMAT.md §9).
    rings_due: u64,
}

/// A response as the journal keeps it (the mailbox response's fields that carry anything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    status: u32,
    slot: u32,
    generation: u64,
    offset: u64,
    size: u64,
    max_size: u64,
    reason: u32,
    os_error: u32,
    limit: u64,
    wanted: u64,
}

impl Reply {
    fn of(r: &vshm_format::layout::Response) -> Reply {
        Reply {
            status: r.status,
            slot: r.slot,
            generation: r.generation,
            offset: r.offset,
            size: r.size,
            max_size: r.max_size,
            reason: r.reason,
            os_error: r.os_error,
            limit: r.limit,
            wanted: r.wanted,
        }
    }

    fn response(&self) -> vshm_format::layout::Response {
        let mut r = vshm_format::mailbox::status_response(vshm_format::Status::Success);
        r.status = self.status;
        r.slot = self.slot;
        r.generation = self.generation;
        r.offset = self.offset;
        r.size = self.size;
        r.max_size = self.max_size;
        r.reason = self.reason;
        r.os_error = self.os_error;
        r.limit = self.limit;
        r.wanted = self.wanted;
        r
    }
}

/// A request answered but not delivered yet ([`Arbiter::answer_pending`]).
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    peer: PeerSlot,
    seq: u64,
    reply: Reply,
}

/// Counters for the monitor.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
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
    /// Host-written header parts (superblock, namespace sequence, peer entries, object
    /// entries) found different from the host's records and rewritten by `heal`.
    pub heals: u64,
    /// Objects deleted (unlinked) by request or by the host.
    pub deleted: u64,
    /// Successful grows.
    pub grown: u64,
    /// Doorbells rung by peers.
    pub doorbells: u64,
    /// Requests refused for lack of rights (ACCESS_DENIED) or by a quota
    /// (QUOTA_EXCEEDED), incl. control-socket admin requests.
    pub denials: u64,
    /// Of `denials`: peer requests a policy refused with ACCESS_DENIED.
    pub access_denied: u64,
    /// Of `denials`: peer requests a policy refused with QUOTA_EXCEEDED (bytes, objects,
    /// request rate).
    pub quota_exceeded: u64,
    /// Events emitted.
    pub events: u64,
    /// Connections refused before they got a peer id (no slot or no safe id left).
    pub refused: u64,
    /// WAKE requests served.
    pub wakes: u64,
    /// Wake-ups rung to peers (for WAKE and for mutex handoffs).
    pub rings: u64,
    /// Mutexes handed from one owner to a queued waiter by the host.
    pub handoffs: u64,
    /// Mutexes released because their owner died (or vanished) holding them.
    pub abandoned: u64,
    /// Signals counted by events that have since been destroyed (so a total over
    /// live and past events never goes down).
    pub retired_signals: u64,
    /// Destroyed ranges put in quarantine (FORMAT.md §11a).
    pub quarantined: u64,
    /// Quarantined ranges released because every peer acknowledged.
    pub quarantine_acked: u64,
    /// Quarantined ranges released because the quarantine time passed first.
    pub quarantine_expired: u64,
    /// Handles peers reported revoked (destroyed behind their backs).
    pub revoked_handles: u64,
    /// Creator holds the host dropped because the creator never took them.
    pub unclaimed_expired: u64,
    /// Whole-table sweeps (the timer's, and after doorbells no close hint explained).
    #[serde(default)]
    pub table_sweeps: u64,
    /// Closed objects destroyed from a peer's close hint without a sweep of the table
    /// (FORMAT.md §9).
    #[serde(default)]
    pub hinted_closes: u64,
}

/// The arbiter.
#[derive(Debug)]
pub struct Arbiter<M: Backing> {
    mem: M,
    layout: Layout,
    epoch: u64,
    region_id: [u8; 16],
    objects: Vec<Option<Record>>,
    free_slots: BTreeSet<ObjectSlot>,
    names: HashMap<String, ObjectSlot>,
    /// The host's mirror of the name index it publishes (FORMAT.md §5a): every LIVE
    /// named record has its entry there.
    index: vshm_format::index::HostIndex,
    heap: crate::heap::Heap,
    /// The name area's space map: the room of every record's name.
    name_area: crate::name_area::NameArea,
    peers: Vec<PeerRecord>,
    next_generation: Generation,
    counters: Counters,
    /// Outbox of events, drained by the event loop.
    events: Vec<Event>,
    /// Outbox of doorbells to ring (peer id, vector), drained by the event loop: the
    /// arbiter has no sockets.
    rings: Vec<(PeerId, u16)>,
    requests: RequestStats,
    /// Last observed handle count per (object slot, peer slot), to report opens and closes
    /// that never reach the host.
    seen: Vec<u32>,
    /// Peers that have left so far (orders slot reuse).
    departures: u64,
    /// Heap ranges held back for fenced peer slots: (slot, offset, length).
    fenced_ranges: Vec<(PeerSlot, RegionOffset, u64)>,
    /// When a refused connection was last reported.
    last_refusal_report: Option<std::time::Instant>,
    /// What `heal` remembers between runs (namespace sequence, report rate limits).
    heal: heal::HealState,
    /// Request rate buckets per VM account.
    rates: RateLimiter,
    /// Why the request being served was refused by a policy (for its `denied` event).
    denial: Option<String>,
    /// Destroyed memory waiting for acknowledgements, and the revocation counter.
    quarantine: quarantine::QuarantineState,
    /// Peers vshmd stands in for (vhost-user VMs) and the holds it keeps for them, in
    /// private memory instead of their refcount rows (`proxy.rs`).
    proxies: BTreeMap<PeerSlot, proxy::Holds>,
    /// What each proxied peer was last told about the objects it holds, and its WAITs
    /// (`proxy_sync.rs`).
    proxy_watch: BTreeMap<PeerSlot, proxy_sync::Watch>,
    /// Something a proxied peer may want to hear of happened (`proxy_sync.rs`).
    proxy_due: bool,
}

impl<M: Backing> Arbiter<M> {
    /// Writes a fresh header into `mem` and publishes it (version last).
    pub fn new(mem: M, layout: Layout, epoch: u64, region_id: [u8; 16]) -> Result<Self, Fault> {
        // Everything below the heap starts zeroed; free object slots carry a CLOSED lease so
        // a stale opener can never take a hold on them.
        mem.zero(0, layout.heap_offset)?;
        for slot in (0..layout.max_objects).map(ObjectSlot) {
            if let Some(base) = layout.object_entry(slot) {
                mem.store_u64(base + OBJ_LEASE_OFF, LEASE_CLOSED, Ordering::Relaxed)?;
            }
        }
        let quarantine = quarantine::QuarantineState::new(layout.max_peers);
        let sb = expected_superblock(&layout, epoch, region_id, &quarantine);
        mem.write_bytes(0, bytes_of(&sb))?;
        mem.store_u32(SB_VERSION_OFF, FORMAT_VERSION, Ordering::Release)?;
        let max_objects = layout.max_objects as usize;
        Ok(Arbiter {
            heap: crate::heap::Heap::new(
                RegionOffset(layout.heap_offset),
                layout.heap_size,
                layout.alignment,
            ),
            name_area: crate::name_area::NameArea::new(layout.name_area_size),
            mem,
            layout,
            epoch,
            region_id,
            objects: vec![None; max_objects],
            free_slots: (0..layout.max_objects).map(ObjectSlot).collect(),
            names: HashMap::new(),
            // The zeroed header is an empty index (all EMPTY, sequence 0).
            index: vshm_format::index::HostIndex::new(&layout),
            peers: vec![PeerRecord::default(); layout.max_peers as usize],
            next_generation: Generation(1),
            counters: Counters::default(),
            events: Vec::new(),
            rings: Vec::new(),
            requests: RequestStats::default(),
            seen: vec![0; max_objects * layout.max_peers as usize],
            departures: 0,
            fenced_ranges: Vec::new(),
            last_refusal_report: None,
            heal: heal::HealState::default(),
            rates: RateLimiter::default(),
            denial: None,
            quarantine,
            proxies: BTreeMap::new(),
            proxy_watch: BTreeMap::new(),
            proxy_due: false,
        })
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

    /// Private record of `slot` (tests and the monitor).
    pub fn record_at(&self, slot: ObjectSlot) -> Option<&Record> {
        self.objects.get(slot.raw() as usize)?.as_ref()
    }

    /// Every object slot of the table, in order.
    fn object_slots(&self) -> impl Iterator<Item = ObjectSlot> {
        (0..self.layout.max_objects).map(ObjectSlot)
    }

    fn live_slots(&self) -> impl Iterator<Item = ObjectSlot> + '_ {
        self.object_slots()
            .zip(self.objects.iter())
            .filter(|(_, r)| r.is_some())
            .map(|(i, _)| i)
    }

    /// Adds `name` in `slot` to the published name index (before its entry is published
    /// LIVE, FORMAT.md §5a).
    fn index_insert(&mut self, name: &str, slot: ObjectSlot) -> Result<(), Fault> {
        let hash = vshm_format::name_hash(name.as_bytes());
        self.index.insert(&self.mem, &self.layout, hash, slot)
    }

    /// Removes `name` in `slot` from the published name index (after its entry stopped
    /// being LIVE, FORMAT.md §5a).
    fn index_remove(&mut self, name: &str, slot: ObjectSlot) {
        let hash = vshm_format::name_hash(name.as_bytes());
        let _ = self.index.remove(&self.mem, &self.layout, hash, slot);
    }

    /// The (hash, slot) pairs the name index must hold: every LIVE named record.
    fn indexed_names(&self) -> Vec<(u32, ObjectSlot)> {
        self.object_slots()
            .zip(self.objects.iter())
            .filter_map(|(slot, r)| {
                let r = r.as_ref().filter(|r| !r.unlinked)?;
                let name = r.name.as_deref()?;
                Some((vshm_format::name_hash(name.as_bytes()), slot))
            })
            .collect()
    }

    /// The published name index if it indexes exactly the records (after a takeover or a
    /// crash), else a fresh one the next heal publishes. Returns whether it adopted.
    fn adopt_index(&mut self) -> bool {
        let live = self.indexed_names();
        match vshm_format::index::HostIndex::adopt(&self.mem, &self.layout, &live) {
            Some(ix) => {
                self.index = ix;
                true
            }
            None => {
                self.index = vshm_format::index::HostIndex::build(&self.layout, live);
                false
            }
        }
    }

    fn lease_off(&self, slot: ObjectSlot) -> Option<u64> {
        self.layout.object_entry(slot).map(|b| b + OBJ_LEASE_OFF)
    }

    /// The superblock as the host publishes it now (`namespace_seq` 0: it moves on its own).
    fn expected_superblock(&self) -> Superblock {
        expected_superblock(&self.layout, self.epoch, self.region_id, &self.quarantine)
    }

    /// Rewrites the superblock's host-set words that change after startup
    /// (`revoke_seq`, `quarantine_ms`).
    fn publish_superblock_extras(&self) {
        let sb = self.expected_superblock();
        let _ = vshm_format::revoke::publish_revoke_seq(&self.mem, sb.revoke_seq);
        let _ = self.mem.store_u32(
            std::mem::offset_of!(Superblock, quarantine_ms) as u64,
            sb.quarantine_ms,
            Ordering::Release,
        );
    }

    /// A peer's handle count on `obj`, as a hint. A locked cell reads 0: its low bits name
    /// the lock owner (FORMAT.md §6), and the owner's handle exists only once it unlocks at 1.
    /// Use [`Arbiter::cell_lock_owner`] to tell a locked cell from an unheld one.
    fn cell_count(&self, peer: PeerSlot, obj: ObjectSlot) -> u32 {
        // A proxy's holds are the ones vshmd keeps for it; its row in the region is unused
        // (and whatever a scribbler writes there counts for nothing).
        if let Some(holds) = self.proxies.get(&peer) {
            return self.proxy_count(holds, obj);
        }
        self.cell_word(peer, obj)
            .and_then(refcell::count)
            .unwrap_or(0)
    }

    /// The raw refcount cell of `peer` for `obj` (None if the access failed).
    fn cell_word(&self, peer: PeerSlot, obj: ObjectSlot) -> Option<u32> {
        self.layout
            .refcount_cell(peer, obj)
            .and_then(|c| self.mem.load_u32(c, Ordering::Acquire).ok())
    }

    /// The token of the user of `peer` that holds the cell lock for `obj` (0: an untagged
    /// lock), or None if the cell is not locked. A locked cell means that peer is between
    /// 0 and 1 handles on `obj`: it may end holding (only on a word without CLOSED, which
    /// its holder-bit CAS requires) or not.
    #[allow(dead_code)] // for reap's locked-cell rule (issue 9); nothing reads it yet
    fn cell_lock_owner(&self, peer: PeerSlot, obj: ObjectSlot) -> Option<u32> {
        self.cell_word(peer, obj).and_then(refcell::lock_owner)
    }
}

/// The superblock a host with this layout and quarantine state publishes (version set,
/// `namespace_seq` 0).
fn expected_superblock(
    layout: &Layout,
    epoch: u64,
    region_id: [u8; 16],
    quarantine: &quarantine::QuarantineState,
) -> Superblock {
    let mut sb = layout.superblock(epoch, region_id);
    sb.revoke_seq = quarantine.seq;
    sb.quarantine_ms = u32::try_from(quarantine.timeout.as_millis()).unwrap_or(u32::MAX);
    sb
}
