//! The arbiter's private state as plain data, for handing a region to a new vshmd process
//! (`crate::handoff`, docs/OPERATIONS.md): [`Arbiter::snapshot`] writes it out,
//! [`Arbiter::from_snapshot`] rebuilds an arbiter from it and the region, after checking
//! that the snapshot is whole (every heap byte accounted for exactly once, names unique,
//! generations below the next one) and that it describes the region it came with (the
//! published superblock's layout and region id). Nothing here knows sockets.
//!
//! Instants do not cross processes: what was "since" becomes an age in milliseconds and is
//! turned back into an instant that long ago. Rate buckets, request statistics, report
//! rate limits and the event outbox are not carried: they restart (OPERATIONS.md says so).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use vshm_format::layout::{Layout, Superblock};
use vshm_format::object::read_object;
use vshm_format::peer::read_peer_entry;
use vshm_format::shm::read_pod;
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};

use super::quarantine::{QuarantineState, Quarantined};
use super::{Arbiter, Backing, Counters, PeerRecord, Record};
use crate::policy::{Grant, Identity, RateLimiter};
use crate::telemetry::RequestStats;

/// The layout parameters a snapshot was taken with (the rest follows from them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutParams {
    /// Region size.
    pub region_size: u64,
    /// Peer slots.
    pub max_peers: u32,
    /// Object slots.
    pub max_objects: u32,
    /// Vectors per peer.
    pub vectors: u32,
    /// Heap granularity.
    pub alignment: u64,
    /// Name area bytes (FORMAT.md §5b).
    pub name_area_size: u64,
}

impl LayoutParams {
    fn of(l: &Layout) -> LayoutParams {
        LayoutParams {
            region_size: l.region_size,
            max_peers: l.max_peers,
            max_objects: l.max_objects,
            vectors: l.vectors,
            alignment: l.alignment,
            name_area_size: l.name_area_size,
        }
    }
}

/// One object record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordSnapshot {
    slot: u32,
    generation: u64,
    kind: u32,
    name: Option<String>,
    /// Where the name is in the name area (FORMAT.md §5b).
    name_off: u32,
    offset: u64,
    size: u64,
    max_size: u64,
    reserved: u64,
    persistent: bool,
    unlinked: bool,
    creator: u16,
    owner: Option<Identity>,
    created_ms: u64,
    repaired: bool,
    manual_reset: bool,
    wakes: u64,
    abandoned: u64,
    /// Mutex waiters in arrival order: (peer slot, token).
    queue: Vec<(u32, u32)>,
    /// The creator's slot and how long ago its holder bit was set.
    unclaimed: Option<(u32, u64)>,
}

/// One peer slot's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerSnapshot {
    id: u16,
    connected: bool,
    incarnation: u64,
    last_seq: u64,
    /// Its last request's sequence number and response.
    #[serde(default)]
    reply: Option<(u64, super::Reply)>,
    since_ms: Option<u64>,
    pid: Option<i32>,
    label: Option<String>,
    freed: u64,
    fenced: bool,
    acked: u64,
    /// The account of its grant; the policy is looked up again from the configuration.
    account: Option<Identity>,
    /// The name of the policy it had (checked against the one looked up).
    policy: Option<String>,
    denials: u64,
}

/// One destroyed range waiting in quarantine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantinedSnapshot {
    offset: u64,
    len: u64,
    seq: u64,
    waiting: u64,
    age_ms: u64,
}

/// A proxied peer's holds: (peer slot, [(object slot, generation, handles)]).
type ProxySnapshot = (u32, Vec<(u32, u64, u32)>);

/// Everything the arbiter knows that is not in the region.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArbiterSnapshot {
    /// The layout parameters.
    pub layout: LayoutParams,
    /// `backend_epoch` as published.
    pub epoch: u64,
    /// The region's identity.
    pub region_id: [u8; 16],
    objects: Vec<RecordSnapshot>,
    /// The heap's free extents (offset, length).
    free: Vec<(u64, u64)>,
    peers: Vec<PeerSnapshot>,
    next_generation: u64,
    counters: Counters,
    /// Non-zero entries of the last observed handle counts: (index, count).
    seen: Vec<(u32, u32)>,
    departures: u64,
    /// Heap ranges held back for fenced peer slots: (slot, offset, length).
    fenced_ranges: Vec<(u32, u64, u64)>,
    /// The highest `namespace_seq` seen (it never goes below it).
    namespace_seq: u64,
    quarantine: Vec<QuarantinedSnapshot>,
    revoke_seq: u64,
    claim_timeout_ms: u64,
    /// Per peer slot: the `revoked_handles` count already reported.
    revoked_reported: Vec<u64>,
    /// Proxied peers' holds.
    #[serde(default)]
    proxies: Vec<ProxySnapshot>,
}

/// Why a snapshot cannot become an arbiter for this region.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// It was taken with other layout parameters.
    #[error("the running vshmd's layout is {running:?}, this one's would be {here:?}")]
    Layout {
        /// The snapshot's.
        running: LayoutParams,
        /// The one computed here.
        here: LayoutParams,
    },
    /// The published superblock does not validate or does not describe this snapshot.
    #[error("the region's superblock does not match the handed-over state: {0}")]
    Superblock(String),
    /// A slot number is out of range or twice present.
    #[error("{what} {index} is out of range or listed twice")]
    BadIndex {
        /// Which table.
        what: &'static str,
        /// The index.
        index: u64,
    },
    /// The heap ranges do not tile the heap.
    #[error("heap range [{offset:#x}, +{len:#x}) ({what}) {problem}")]
    Heap {
        /// Where.
        offset: u64,
        /// How long.
        len: u64,
        /// Free extent, object, quarantine or fenced range.
        what: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The ranges add up to less than the heap.
    #[error("the heap ranges cover {covered:#x} of {size:#x} bytes")]
    HeapCoverage {
        /// Bytes covered.
        covered: u64,
        /// Heap bytes.
        size: u64,
    },
    /// Two live objects with one name.
    #[error("name {0:?} belongs to two live objects")]
    DuplicateName(String),
    /// A record's name cannot have the room its `name_off` says in the name area.
    #[error("object slot {slot}'s name: {error}")]
    NameArea {
        /// Slot.
        slot: u32,
        /// What is wrong with its name's range.
        error: crate::name_area::NameAreaError,
    },
    /// A record's generation is not below the next one.
    #[error("object slot {slot} has generation {generation}, not below the next ({next})")]
    Generation {
        /// Slot.
        slot: u32,
        /// Its generation.
        generation: u64,
        /// The next one.
        next: u64,
    },
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

fn age_ms(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The instant `ms` ago (now, if the clock does not reach back that far).
fn ago(ms: u64) -> Instant {
    let now = Instant::now();
    now.checked_sub(Duration::from_millis(ms)).unwrap_or(now)
}

/// What the cross-check of the published header found (differences are what `heal`
/// rewrites once the new process owns the region).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderCheck {
    /// Object entries that do not show their record (or show one where none is).
    pub objects_differ: u32,
    /// Peer entries that do not show their record.
    pub peers_differ: u32,
    /// The published name index does not index exactly the records (1) or does (0).
    pub index_differs: u32,
}

impl<M: Backing> Arbiter<M> {
    /// The private state, as plain data. Call at a clean point (no request half-served).
    pub fn snapshot(&self) -> ArbiterSnapshot {
        let objects = self
            .live_slots()
            .filter_map(|s| self.record_at(s).map(|r| (s, r)))
            .map(|(s, r)| RecordSnapshot {
                slot: s.raw(),
                generation: r.generation.0,
                kind: r.kind,
                name: r.name.clone(),
                name_off: r.name_off,
                offset: r.offset.raw(),
                size: r.size,
                max_size: r.max_size,
                reserved: r.reserved,
                persistent: r.persistent,
                unlinked: r.unlinked,
                creator: r.creator.raw(),
                owner: r.owner.as_deref().cloned(),
                created_ms: unix_ms(r.created),
                repaired: r.repaired,
                manual_reset: r.manual_reset,
                wakes: r.wakes,
                abandoned: r.abandoned,
                queue: r.queue.iter().map(|(p, t)| (p.raw(), *t)).collect(),
                unclaimed: r.unclaimed.map(|(p, t)| (p.raw(), age_ms(t))),
            })
            .collect();
        let peers = self
            .peers
            .iter()
            .map(|p| PeerSnapshot {
                id: p.id.raw(),
                connected: p.connected,
                incarnation: p.incarnation,
                last_seq: p.last_seq,
                reply: p.reply,
                since_ms: p.since.map(unix_ms),
                pid: p.pid,
                label: p.label.clone(),
                freed: p.freed,
                fenced: p.fenced,
                acked: p.acked,
                account: p.grant.as_ref().map(|g| (*g.account).clone()),
                policy: p.grant.as_ref().map(|g| g.policy.name.clone()),
                denials: p.denials,
            })
            .collect();
        let seen = self
            .seen
            .iter()
            .enumerate()
            .filter(|(_, &c)| c != 0)
            .filter_map(|(i, &c)| Some((u32::try_from(i).ok()?, c)))
            .collect();
        ArbiterSnapshot {
            layout: LayoutParams::of(&self.layout),
            epoch: self.epoch,
            region_id: self.region_id,
            objects,
            free: self.heap.extents().map(|(o, l)| (o.raw(), l)).collect(),
            peers,
            next_generation: self.next_generation.0,
            counters: self.counters,
            seen,
            departures: self.departures,
            fenced_ranges: self
                .fenced_ranges
                .iter()
                .map(|(s, o, l)| (s.raw(), o.raw(), *l))
                .collect(),
            namespace_seq: self.heal.namespace_seq(),
            quarantine: self
                .quarantine
                .entries
                .iter()
                .map(|q| QuarantinedSnapshot {
                    offset: q.offset.raw(),
                    len: q.len,
                    seq: q.seq,
                    waiting: q.waiting,
                    age_ms: age_ms(q.since),
                })
                .collect(),
            revoke_seq: self.quarantine.seq,
            claim_timeout_ms: u64::try_from(self.quarantine.claim_timeout.as_millis())
                .unwrap_or(u64::MAX),
            revoked_reported: self.quarantine.reported.clone(),
            proxies: self
                .proxies
                .iter()
                .map(|(p, h)| {
                    let holds = h.iter().map(|(o, (g, n))| (o.raw(), g.raw(), *n)).collect();
                    (p.raw(), holds)
                })
                .collect(),
        }
    }

    /// Rebuilds an arbiter from `snap` over `mem` (the region it was taken of), with
    /// `layout` computed from this process's configuration. Checks the snapshot is whole
    /// and belongs to this region; writes nothing to the region (the old process still owns
    /// it until it lets go). `resolve` gives a peer's account its policy again.
    pub fn from_snapshot(
        mem: M,
        layout: Layout,
        snap: ArbiterSnapshot,
        resolve: &dyn Fn(&Identity) -> Grant,
    ) -> Result<(Self, HeaderCheck), SnapshotError> {
        let here = LayoutParams::of(&layout);
        if snap.layout != here {
            return Err(SnapshotError::Layout {
                running: snap.layout,
                here,
            });
        }
        check_superblock(&mem, &layout, &snap)?;
        let max_objects = layout.max_objects as usize;
        let max_peers = layout.max_peers as usize;
        if snap.peers.len() != max_peers {
            return Err(SnapshotError::BadIndex {
                what: "peer table length",
                index: snap.peers.len() as u64,
            });
        }
        check_heap(&layout, &snap)?;
        let mut objects: Vec<Option<Record>> = vec![None; max_objects];
        let mut names = HashMap::new();
        // The name area's space map, rebuilt from the records' names (LIVE and UNLINKED):
        // each must lie in the area and overlap no other.
        let mut name_area = crate::name_area::NameArea::new(layout.name_area_size);
        for r in snap.objects {
            let bad = || SnapshotError::BadIndex {
                what: "object slot",
                index: u64::from(r.slot),
            };
            let cell = objects.get_mut(r.slot as usize).ok_or_else(bad)?;
            if cell.is_some() {
                return Err(bad());
            }
            if r.generation >= snap.next_generation {
                return Err(SnapshotError::Generation {
                    slot: r.slot,
                    generation: r.generation,
                    next: snap.next_generation,
                });
            }
            let slots = r.queue.iter().map(|q| q.0);
            for p in slots.chain(r.unclaimed.map(|u| u.0)) {
                if p as usize >= max_peers {
                    return Err(SnapshotError::BadIndex {
                        what: "peer slot",
                        index: u64::from(p),
                    });
                }
            }
            if let (Some(name), false) = (&r.name, r.unlinked) {
                if names.insert(name.clone(), ObjectSlot(r.slot)).is_some() {
                    return Err(SnapshotError::DuplicateName(name.clone()));
                }
            }
            match &r.name {
                Some(name) => name_area.adopt(r.name_off, name.len()),
                // Published as is, every reader would refuse the entry and heal would
                // republish it forever.
                None if r.name_off != 0 => {
                    Err(crate::name_area::NameAreaError::UnnamedWithOffset { off: r.name_off })
                }
                None => Ok(()),
            }
            .map_err(|error| SnapshotError::NameArea {
                slot: r.slot,
                error,
            })?;
            *cell = Some(Record {
                generation: Generation(r.generation),
                kind: r.kind,
                name: r.name,
                name_off: r.name_off,
                offset: RegionOffset(r.offset),
                size: r.size,
                max_size: r.max_size,
                reserved: r.reserved,
                persistent: r.persistent,
                unlinked: r.unlinked,
                creator: PeerId(r.creator),
                owner: r.owner.map(Arc::new),
                created: from_unix_ms(r.created_ms),
                repaired: r.repaired,
                manual_reset: r.manual_reset,
                wakes: r.wakes,
                abandoned: r.abandoned,
                abandon_report: None,
                queue: r
                    .queue
                    .into_iter()
                    .map(|(p, t)| (PeerSlot(p), t))
                    .collect::<VecDeque<_>>(),
                unclaimed: r.unclaimed.map(|(p, age)| (PeerSlot(p), ago(age))),
            });
        }
        let free_slots: BTreeSet<ObjectSlot> = (0..layout.max_objects)
            .map(ObjectSlot)
            .filter(|s| objects[s.raw() as usize].is_none())
            .collect();
        let peers: Vec<PeerRecord> = snap
            .peers
            .into_iter()
            .map(|p| {
                let grant = p.account.map(|account| {
                    let g = resolve(&account);
                    if p.policy.as_deref() != Some(g.policy.name.as_str()) {
                        tracing::warn!(
                            peer = p.id,
                            "policy {:?} of the running vshmd is {} here",
                            p.policy,
                            g.policy.name
                        );
                    }
                    g
                });
                PeerRecord {
                    id: PeerId(p.id),
                    connected: p.connected,
                    incarnation: p.incarnation,
                    last_seq: p.last_seq,
                    reply: p.reply,
                    since: p.since_ms.map(from_unix_ms),
                    pid: p.pid,
                    label: p.label,
                    freed: p.freed,
                    fenced: p.fenced,
                    acked: p.acked,
                    grant,
                    denials: p.denials,
                    denial_log: None,
                    rings_due: 0,
                }
            })
            .collect();
        let mut seen = vec![0; max_objects * max_peers];
        for (i, c) in snap.seen {
            *seen.get_mut(i as usize).ok_or(SnapshotError::BadIndex {
                what: "handle count",
                index: u64::from(i),
            })? = c;
        }
        let mut fenced_ranges = Vec::new();
        for (s, o, l) in snap.fenced_ranges {
            if s as usize >= max_peers {
                return Err(SnapshotError::BadIndex {
                    what: "fenced peer slot",
                    index: u64::from(s),
                });
            }
            fenced_ranges.push((PeerSlot(s), RegionOffset(o), l));
        }
        let mut quarantine = QuarantineState::new(layout.max_peers);
        quarantine.seq = snap.revoke_seq;
        quarantine.claim_timeout = Duration::from_millis(snap.claim_timeout_ms);
        if snap.revoked_reported.len() == max_peers {
            quarantine.reported = snap.revoked_reported;
        }
        quarantine.entries = snap
            .quarantine
            .into_iter()
            .map(|q| Quarantined {
                offset: RegionOffset(q.offset),
                len: q.len,
                seq: q.seq,
                waiting: q.waiting,
                since: ago(q.age_ms),
            })
            .collect();
        let mut proxies = std::collections::BTreeMap::new();
        for (p, holds) in &snap.proxies {
            if *p as usize >= max_peers {
                return Err(SnapshotError::BadIndex {
                    what: "proxied peer slot",
                    index: u64::from(*p),
                });
            }
            let mut h = super::proxy::Holds::new();
            for &(o, g, n) in holds {
                if o as usize >= max_objects {
                    return Err(SnapshotError::BadIndex {
                        what: "proxied hold's object slot",
                        index: u64::from(o),
                    });
                }
                h.insert(ObjectSlot(o), (Generation(g), n));
            }
            proxies.insert(PeerSlot(*p), h);
        }
        let mut heal = super::heal::HealState::default();
        heal.raise_namespace_seq(snap.namespace_seq);
        let arbiter = Arbiter {
            heap: crate::heap::Heap::with_free(
                RegionOffset(layout.heap_offset),
                layout.heap_size,
                layout.alignment,
                snap.free.iter().map(|&(o, l)| (RegionOffset(o), l)),
            ),
            name_area,
            mem,
            layout,
            epoch: snap.epoch,
            region_id: snap.region_id,
            objects,
            free_slots,
            names,
            index: vshm_format::index::HostIndex::new(&layout),
            peers,
            next_generation: Generation(snap.next_generation),
            counters: snap.counters,
            events: Vec::new(),
            rings: Vec::new(),
            requests: RequestStats::default(),
            seen,
            departures: snap.departures,
            fenced_ranges,
            last_refusal_report: None,
            heal,
            rates: RateLimiter::default(),
            denial: None,
            quarantine,
            proxies,
            proxy_watch: std::collections::BTreeMap::new(),
            proxy_due: true,
        };
        let mut arbiter = arbiter;
        let adopted = arbiter.adopt_index();
        let mut check = arbiter.check_header();
        check.index_differs = u32::from(!adopted);
        Ok((arbiter, check))
    }

    /// Compares the published object and peer tables with the records (read through the
    /// format's validators). Differences are not fatal: any peer can write there, and the
    /// first `heal` after the takeover rewrites them; they are counted for the log.
    fn check_header(&self) -> HeaderCheck {
        let mut check = HeaderCheck::default();
        for slot in self.object_slots() {
            let published = read_object(&self.mem, &self.layout, slot).ok().flatten();
            let same = match (self.record_at(slot), published) {
                (None, None) => true,
                (Some(r), Some(e)) => {
                    e.generation == r.generation
                        && e.offset == r.offset
                        && e.kind == r.kind
                        && e.size == r.size
                        && e.name_off == r.name_off
                        && e.name() == r.name.as_deref()
                }
                _ => false,
            };
            if !same {
                tracing::debug!(slot = slot.raw(), "object entry differs from its record");
            }
            check.objects_differ += u32::from(!same);
        }
        for (slot, p) in self.peer_slots() {
            let published = read_peer_entry(&self.mem, &self.layout, slot)
                .ok()
                .flatten();
            let same = match published {
                Some(e) => p.connected && e.peer_id == p.id && e.incarnation == p.incarnation,
                None => !p.connected,
            };
            check.peers_differ += u32::from(!same);
        }
        check
    }

    /// A new process took the region over: `backend_epoch` moves on by one (peers can
    /// tell a restart happened; FORMAT.md §3) and is published. Returns the new value.
    pub fn bump_epoch(&mut self) -> u64 {
        self.epoch = self.epoch.wrapping_add(1);
        let off = std::mem::offset_of!(Superblock, backend_epoch) as u64;
        let _ = self
            .mem
            .store_u64(off, self.epoch, std::sync::atomic::Ordering::Release);
        self.epoch
    }

    /// `backend_epoch` as this arbiter publishes it.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

/// The published superblock must validate, and give this layout and the snapshot's region id.
fn check_superblock<M: Backing>(
    mem: &M,
    layout: &Layout,
    snap: &ArbiterSnapshot,
) -> Result<(), SnapshotError> {
    let sb: Superblock =
        read_pod(mem, 0).map_err(|e| SnapshotError::Superblock(format!("cannot read it: {e}")))?;
    let published = Layout::from_superblock(&sb, mem.size())
        .map_err(|e| SnapshotError::Superblock(e.to_string()))?;
    if published != *layout {
        return Err(SnapshotError::Superblock(format!(
            "it describes {:?}",
            LayoutParams::of(&published)
        )));
    }
    if sb.region_id != snap.region_id {
        return Err(SnapshotError::Superblock(
            "its region id is not the handed-over one".to_string(),
        ));
    }
    Ok(())
}

/// Free extents, object reservations, quarantined and fenced ranges must each lie in the
/// heap, aligned, overlap nothing, and together cover all of it.
fn check_heap(layout: &Layout, snap: &ArbiterSnapshot) -> Result<(), SnapshotError> {
    let start = layout.heap_offset;
    let usable = layout.heap_size & !(layout.alignment - 1);
    let mut ranges: Vec<(u64, u64, &'static str)> = Vec::new();
    ranges.extend(snap.free.iter().map(|&(o, l)| (o, l, "free extent")));
    // Events and mutexes live in their entries and reserve no heap.
    ranges.extend(
        snap.objects
            .iter()
            .filter(|r| r.reserved != 0)
            .map(|r| (r.offset, r.reserved, "object")),
    );
    ranges.extend(
        snap.quarantine
            .iter()
            .map(|q| (q.offset, q.len, "quarantine")),
    );
    ranges.extend(snap.fenced_ranges.iter().map(|&(_, o, l)| (o, l, "fenced")));
    ranges.sort_unstable();
    let mut at = start;
    let mut covered = 0u64;
    for (offset, len, what) in ranges {
        let err = |problem| SnapshotError::Heap {
            offset,
            len,
            what,
            problem,
        };
        let end = offset.checked_add(len).ok_or_else(|| err("overflows"))?;
        if len == 0 || offset % layout.alignment != 0 || len % layout.alignment != 0 {
            return Err(err("is empty or not aligned"));
        }
        if offset < start || end > start + usable {
            return Err(err("lies outside the heap"));
        }
        if offset < at {
            return Err(err("overlaps another"));
        }
        at = end;
        covered += len;
    }
    if covered != usable {
        return Err(SnapshotError::HeapCoverage {
            covered,
            size: usable,
        });
    }
    Ok(())
}
