//! The status document: a snapshot of the arbiter's state for `vshmctl status`, built on
//! demand (never on the request path). Field names are documented in docs/MONITOR.md and
//! only ever added to.

use std::time::SystemTime;

use serde::Serialize;

use serde_json::{json, Value};
use vshm_format::layout::{holder_bit, kind, mutex_word, Superblock, OBJ_LEASE_OFF};
use vshm_format::shm::read_pod;
use vshm_format::sync;

use super::{Arbiter, Backing, Counters};

/// One peer.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    /// Peer id.
    pub id: u16,
    /// Peer table slot.
    pub slot: u32,
    /// Connected now.
    pub connected: bool,
    /// How it is attached: `ivshmem` (it sees the whole region) or `vhost-user` (the vshm
    /// virtio device: it sees only what it opened; docs/VHOST-USER.md); `-` once it left.
    pub transport: &'static str,
    /// QEMU's -name, else the process name.
    pub label: Option<String>,
    /// Process id (SO_PEERCRED).
    pub pid: Option<i32>,
    /// Seconds since the Unix epoch when it connected.
    pub connected_since: Option<u64>,
    /// Handles held (sum of its refcount cells).
    pub handles: u64,
    /// Max sizes of the sections it holds.
    pub bytes_held: u64,
    /// Connections so far in its slot.
    pub incarnation: u64,
    /// The policy it got (`null`: none given, everything allowed).
    pub policy: Option<String>,
    /// Its requests its policy refused (ACCESS_DENIED, QUOTA_EXCEEDED).
    pub denials: u64,
    /// What it does against its policy that vshmd cannot refuse in an ivshmem region
    /// (handles on names outside its `open` patterns, more than `max_handles`); omitted
    /// when nothing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub advisories: Vec<String>,
}

/// One object.
#[derive(Debug, Clone, Serialize)]
pub struct SectionStatus {
    /// Name (`null` for unnamed).
    pub name: Option<String>,
    /// Table slot.
    pub slot: u32,
    /// Generation.
    pub generation: u64,
    /// "section", "event" or "mutex".
    pub kind: &'static str,
    /// Region offset.
    pub offset: u64,
    /// Current size.
    pub size: u64,
    /// Max size.
    pub max_size: u64,
    /// Persistent.
    pub persistent: bool,
    /// Deleted, waiting for the last close.
    pub deleted: bool,
    /// Total handles.
    pub refs: u64,
    /// Handles per peer id (only peers holding some).
    pub refs_by_peer: Vec<(u16, u64)>,
    /// Creator's peer id (0 = the host).
    pub creator: u16,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Seconds since creation.
    pub age_secs: u64,
    /// WAKE requests served for it (any kind: section notifications wake too).
    pub wakes: u64,
    /// EVENT: manual reset (stays signalled until reset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manual_reset: Option<bool>,
    /// EVENT: signalled now (`sync` = 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signaled: Option<bool>,
    /// EVENT: signals counted so far (`signal_seq`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signals: Option<u64>,
    /// EVENT: peer ids of the connected holders whose waiter bit is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiters: Option<Vec<u16>>,
    /// MUTEX: the owner's peer id (`null` when free, or when the owner word names no
    /// connected peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<Option<u16>>,
    /// MUTEX: peers queued for it at the host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued: Option<u64>,
    /// MUTEX: times an owner died (or vanished) holding it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abandoned: Option<u64>,
    /// The block allocator inside the section, if it has one (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockStatus>,
}

/// The status document's name of an object kind.
pub(super) fn kind_name(kind: u32) -> &'static str {
    match kind {
        kind::SECTION => "section",
        kind::EVENT => "event",
        kind::MUTEX => "mutex",
        _ => "unknown",
    }
}

/// A section's block allocator (its header's counters, read unlocked).
#[derive(Debug, Clone, Serialize)]
pub struct BlockStatus {
    /// Bytes of used blocks.
    pub in_use: u64,
    /// Used blocks.
    pub count: u64,
    /// Bytes of free blocks.
    pub free: u64,
    /// Largest free block.
    pub largest_free: u64,
    /// 1 − largest_free/free.
    pub fragmentation: f64,
}

/// The allocator counters of the section at `offset` of `size` bytes, if it has a valid one.
fn block_status<M: vshm_format::shm::SharedMemory>(
    mem: &M,
    offset: vshm_format::RegionOffset,
    size: u64,
) -> Option<BlockStatus> {
    let s = vshm_format::blocks::stats(mem, offset, size).ok()??;
    Some(BlockStatus {
        in_use: s.in_use,
        count: s.count,
        free: s.free,
        largest_free: s.largest_free,
        fragmentation: s.fragmentation,
    })
}

/// The region.
#[derive(Debug, Clone, Serialize)]
pub struct RegionStatus {
    /// Region bytes.
    pub size: u64,
    /// Heap bytes.
    pub heap_size: u64,
    /// Heap bytes reserved by objects.
    pub used: u64,
    /// Heap bytes free.
    pub free: u64,
    /// Heap bytes of destroyed sections in quarantine (FORMAT.md §11a): neither used nor
    /// free until every peer acknowledged or the quarantine time passed.
    pub quarantined: u64,
    /// Ranges in quarantine.
    pub quarantined_ranges: usize,
    /// Largest free extent.
    pub largest_free: u64,
    /// Free extents.
    pub free_extents: usize,
    /// 1 − largest_free/free: 0 when all free space is one extent.
    pub fragmentation: f64,
    /// Bytes of host memory the region holds now.
    pub resident: u64,
    /// Bytes of the name area (FORMAT.md §5b).
    pub name_area_size: u64,
    /// Of those, bytes no name holds (a CREATE whose rounded name is longer than the
    /// largest free run is refused).
    pub name_area_free: u64,
    /// Max peers.
    pub max_peers: u32,
    /// Max objects.
    pub max_objects: u32,
    /// Backend epoch.
    pub epoch: u64,
}

/// The whole document (without the daemon's own `vshmd` section).
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Region.
    pub region: RegionStatus,
    /// Peers that are connected, or were.
    pub peers: Vec<PeerStatus>,
    /// Objects (LIVE and deleted-but-open).
    pub sections: Vec<SectionStatus>,
    /// Counters.
    pub counters: Counters,
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl<M: Backing> Arbiter<M> {
    /// A status snapshot.
    pub fn status(&self) -> StatusReport {
        let now = SystemTime::now();
        let mut handles_by_peer = vec![0u64; self.peers.len()];
        let mut bytes_by_peer = vec![0u64; self.peers.len()];
        let mut held_by_peer = vec![Vec::new(); self.peers.len()];
        let mut sections = Vec::new();
        for slot in self.live_slots() {
            let Some(rec) = self.objects[slot.raw() as usize].as_ref() else {
                continue;
            };
            let mut refs_by_peer = Vec::new();
            for (i, p) in self.peer_slots() {
                if !p.connected {
                    continue;
                }
                let n = u64::from(self.cell_count(i, slot));
                if n > 0 {
                    refs_by_peer.push((p.id.raw(), n));
                    handles_by_peer[i.raw() as usize] += n;
                    bytes_by_peer[i.raw() as usize] += rec.max_size;
                    held_by_peer[i.raw() as usize].push((slot, n));
                }
            }
            let is = |k: u32| (rec.kind == k).then_some(());
            let signals = sync::signal_seq(&self.mem, &self.layout, slot).unwrap_or(0);
            let word = sync::sync_word(&self.mem, &self.layout, slot).unwrap_or(0);
            let waiting = sync::waiters(&self.mem, &self.layout, slot).unwrap_or(0);
            let waiting = self.waiting_holders(slot, waiting);
            let waiters: Vec<u16> = self
                .peer_slots()
                .filter(|(i, _)| waiting & holder_bit(*i) != 0)
                .map(|(_, p)| p.id.raw())
                .collect();
            let owner = mutex_word::slot(word)
                .and_then(|s| self.peers.get(s.raw() as usize))
                .filter(|p| p.connected)
                .map(|p| p.id.raw());
            sections.push(SectionStatus {
                name: rec.name.clone(),
                slot: slot.raw(),
                generation: rec.generation.raw(),
                kind: kind_name(rec.kind),
                offset: rec.offset.raw(),
                size: rec.size,
                max_size: rec.max_size,
                persistent: rec.persistent,
                deleted: rec.unlinked,
                refs: refs_by_peer.iter().map(|x| x.1).sum(),
                refs_by_peer,
                creator: rec.creator.raw(),
                created: unix_secs(rec.created),
                age_secs: now.duration_since(rec.created).map_or(0, |d| d.as_secs()),
                wakes: rec.wakes,
                manual_reset: is(kind::EVENT).map(|()| rec.manual_reset),
                signaled: is(kind::EVENT).map(|()| word != 0),
                signals: is(kind::EVENT).map(|()| signals),
                waiters: is(kind::EVENT).map(|()| waiters),
                owner: is(kind::MUTEX).map(|()| owner),
                queued: is(kind::MUTEX).map(|()| rec.queue.len() as u64),
                abandoned: is(kind::MUTEX).map(|()| rec.abandoned),
                blocks: block_status(&self.mem, rec.offset, rec.size),
            });
        }
        let peers = self
            .peer_slots()
            .filter(|(_, p)| p.connected || p.incarnation > 0)
            .map(|(i, p)| PeerStatus {
                id: p.id.raw(),
                slot: i.raw(),
                connected: p.connected,
                // A departed peer's slot says nothing about how it came (its proxy record
                // went with it): "-" rather than a guess.
                transport: if self.proxies.contains_key(&i) {
                    "vhost-user"
                } else if p.connected {
                    "ivshmem"
                } else {
                    "-"
                },
                label: p.label.clone(),
                pid: p.pid,
                connected_since: p.since.map(unix_secs),
                handles: handles_by_peer[i.raw() as usize],
                bytes_held: bytes_by_peer[i.raw() as usize],
                incarnation: p.incarnation,
                policy: p.grant.as_ref().map(|g| g.policy.name.clone()),
                denials: p.denials,
                advisories: if p.connected {
                    self.advisories(i, &held_by_peer[i.raw() as usize])
                } else {
                    Vec::new()
                },
            })
            .collect();
        let free = self.heap.free_bytes();
        let largest = self.heap.largest_free();
        let (quarantined, quarantined_ranges) = self.quarantined();
        #[allow(clippy::cast_precision_loss)] // a ratio for people
        let fragmentation = if free == 0 {
            0.0
        } else {
            1.0 - largest as f64 / free as f64
        };
        StatusReport {
            region: RegionStatus {
                size: self.layout.region_size,
                heap_size: self.heap.size(),
                used: self.heap.size() - free - quarantined,
                free,
                quarantined,
                quarantined_ranges,
                largest_free: largest,
                free_extents: self.heap.free_extents(),
                fragmentation,
                resident: self.mem.resident(),
                name_area_size: self.name_area.size(),
                name_area_free: self.name_area.free_bytes(),
                max_peers: self.layout.max_peers,
                max_objects: self.layout.max_objects,
                epoch: self.epoch,
            },
            peers,
            sections,
            counters: self.counters,
        }
    }
}

impl<M: Backing> Arbiter<M> {
    /// Everything the backend knows, for bug reports: the superblock as published, the
    /// layout, every record with its lease word, peers, the heap's free list, counters.
    pub fn dump(&self) -> Value {
        let sb = read_pod::<Superblock, _>(&self.mem, 0)
            .ok()
            .map(|sb| vshm_control::superblock::summarize(&sb));
        let objects: Vec<Value> = self
            .live_slots()
            .filter_map(|slot| {
                let r = self.objects[slot.raw() as usize].as_ref()?;
                let lease = self.layout.object_entry(slot).and_then(|b| {
                    self.mem
                        .load_u64(b + OBJ_LEASE_OFF, std::sync::atomic::Ordering::SeqCst)
                        .ok()
                });
                Some(json!({
                    "slot": slot.raw(),
                    "generation": r.generation.raw(),
                    "kind": r.kind,
                    "name": r.name,
                    "offset": r.offset.raw(),
                    "size": r.size,
                    "max_size": r.max_size,
                    "reserved": r.reserved,
                    "persistent": r.persistent,
                    "deleted": r.unlinked,
                    "creator": r.creator.raw(),
                    "created": unix_secs(r.created),
                    "lease": lease.map(|w| format!("{w:#018x}")),
                    "manual_reset": r.manual_reset,
                    "wakes": r.wakes,
                    "abandoned": r.abandoned,
                    "queue": r.queue.iter().map(|(p, t)| (p.raw(), *t)).collect::<Vec<_>>(),
                    "sync_words": {
                        "signal_seq": sync::signal_seq(&self.mem, &self.layout, slot).ok(),
                        "waiters": sync::waiters(&self.mem, &self.layout, slot)
                            .ok()
                            .map(|w| format!("{w:#018x}")),
                        "sync": sync::sync_word(&self.mem, &self.layout, slot)
                            .ok()
                            .map(|w| format!("{w:#018x}")),
                    },
                }))
            })
            .collect();
        let peers: Vec<Value> = self
            .peer_slots()
            .filter(|(_, p)| p.connected || p.incarnation > 0)
            .map(|(slot, p)| {
                json!({
                    "slot": slot.raw(), "id": p.id.raw(), "connected": p.connected,
                    "incarnation": p.incarnation, "last_request": p.last_seq,
                    "pid": p.pid, "label": p.label,
                })
            })
            .collect();
        let requests: Vec<Value> = self
            .requests
            .by_op_status()
            .map(|(op, status, n)| json!({ "op": op, "status": status, "count": n }))
            .collect();
        json!({
            "superblock": sb,
            "layout": {
                "region_size": self.layout.region_size,
                "peer_table": self.layout.peer_table,
                "object_table": self.layout.object_table,
                "refcount_table": self.layout.refcount_table,
                "refcount_row_size": self.layout.refcount_row_size,
                "mailbox_table": self.layout.mailbox_table,
                "heap_offset": self.layout.heap_offset,
                "heap_size": self.layout.heap_size,
                "alignment": self.layout.alignment,
            },
            "objects": objects,
            "peers": peers,
            "heap": {
                "free": self.heap.free_bytes(),
                "free_extents": self
                    .heap
                    .extents()
                    .map(|(o, l)| (o.raw(), l))
                    .collect::<Vec<_>>(),
            },
            "next_generation": self.next_generation.raw(),
            "counters": self.counters,
            "requests": requests,
        })
    }
}
