//! Reading the region's tables: the superblock, the peer table, the object table (seqlock
//! snapshots), the refcount rows and the mailboxes. What is wrong with an entry comes from the
//! format crate's validators ([`object::validate`], [`peer::read_peer_entry`]); this file
//! only turns their errors into findings.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use vshm_control::superblock::summarize;
use vshm_format::layout::op;
use vshm_format::layout::{
    holder_bit, kind, object_state, refcell, Layout, ObjectEntry, Superblock, LEASE_CLOSED,
    LEASE_HOLDERS, LEASE_KEEP, MAX_NAME_BYTES, MAX_NAME_CHARS, MB_LOCK_OFF, MB_REQ_SEQ_OFF,
    MB_RESP_SEQ_OFF, OBJ_LEASE_OFF, OBJ_SEQ_OFF,
};
use vshm_format::layout::{
    mutex_word, OBJ_ABANDONED_OFF, OBJ_SIGNAL_SEQ_OFF, OBJ_SYNC_OFF, OBJ_WAITERS_OFF,
};
use vshm_format::object::{self, EntryError, ObjectInfo, Snapshot};
use vshm_format::peer::{self, PeerError};
use vshm_format::shm::{read_pod, Fault, SharedMemory};
use vshm_format::NameError;
use vshm_format::{ObjectSlot, PeerSlot};

use super::check::{
    check_blocks, check_free, check_identities, check_lease, check_mutex_owner,
    check_name_overlaps, check_overlaps, heap_usage,
};
use super::{ObjectRow, PeerRow, Report, SyncRow, MB_OP_OFF, SEQ_WAIT_TRIES};

/// What an object slot turned out to hold.
#[derive(Clone, Copy)]
pub(super) enum SlotView {
    /// A FREE entry.
    Free,
    /// Unreadable or invalid (already a finding).
    Invalid,
    /// A valid object: index into the object list.
    Object(usize),
}

/// A valid object with the raw values the checks need.
pub(super) struct Obj {
    pub(super) row: ObjectRow,
    pub(super) state: u32,
    pub(super) lease: u64,
    /// The raw mutex owner word (0 for other kinds).
    pub(super) owner_word: u64,
    /// The granules its name takes in the name area, `[start, end)` (unnamed: none).
    pub(super) name_range: Option<(u64, u64)>,
}

/// Decodes and checks a region held in any [`SharedMemory`] (the mapped file, or a buffer).
/// Never writes through `mem`.
pub fn inspect_region<M: SharedMemory + ?Sized>(mem: &M) -> Report {
    let mut r = Report::new(String::new(), mem.size());
    let sb: Superblock = match read_pod(mem, 0) {
        Ok(sb) => sb,
        Err(f) => {
            r.error("superblock", format!("cannot read the superblock: {f}"));
            return r.finish();
        }
    };
    let mut summary = summarize(&sb);
    let layout = match Layout::from_superblock(&sb, mem.size()) {
        Ok(l) => l,
        Err(e) => {
            r.error(
                "superblock",
                format!("{e}; the tables cannot be located, nothing else was decoded"),
            );
            r.superblock = Some(summary);
            return r.finish();
        }
    };
    summary.valid = true;
    r.superblock = Some(summary);
    check_superblock_extras(&sb, &mut r);

    let peers = walk_peers(mem, &layout, &mut r);
    let (slots, mut objs) = walk_objects(mem, &layout, &mut r);
    let connected: u64 = peers
        .iter()
        .flatten()
        .fold(0, |m, p| m | holder_bit(PeerSlot(p.slot)));
    for o in &objs {
        check_lease(o, connected, &mut r);
        check_mutex_owner(o, connected, &mut r);
        check_blocks(mem, o, &mut r);
    }
    let handles = walk_refcounts(mem, &layout, &peers, &slots, &mut objs, &mut r);
    check_overlaps(&objs, &mut r);
    check_name_overlaps(&objs, &mut r);
    check_identities(&objs, &mut r);
    for o in &mut objs {
        o.row.holders = (0..layout.max_peers)
            .filter(|&i| o.lease & LEASE_HOLDERS & holder_bit(PeerSlot(i)) != 0)
            .filter_map(|i| peers.get(i as usize).and_then(Option::as_ref).map(|p| p.id))
            .collect();
        o.row.refs = o.row.refs_by_peer.iter().map(|x| u64::from(x.1)).sum();
    }
    let mut rows = Vec::new();
    for (p, n) in peers.into_iter().zip(handles) {
        if let Some(mut p) = p {
            p.handles = n;
            rows.push(p);
        }
    }
    walk_mailboxes(mem, &layout, &mut rows, &mut r);
    r.peers = rows;
    r.heap = Some(heap_usage(&layout, &objs));
    r.index = super::index::check_index(mem, &layout, &objs, &mut r);
    r.objects = objs.into_iter().map(|o| o.row).collect();
    r.finish()
}

fn check_superblock_extras(sb: &Superblock, r: &mut Report) {
    if sb.flags != 0 {
        r.warning(
            "superblock",
            format!("reserved flags are {:#x}, not 0", sb.flags),
        );
    }
    if sb.host_peer_id != 0 {
        r.warning(
            "superblock",
            format!("host_peer_id is {}, not 0", sb.host_peer_id),
        );
    }
    if sb.reserved.iter().any(|&b| b != 0) {
        r.warning("superblock", "reserved bytes 176..256 are not all zero");
    }
}

/// The peer table: one entry per slot, `Some` for a connected peer with a valid id
/// ([`peer::read_peer_entry`] decides and says why not).
fn walk_peers<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    r: &mut Report,
) -> Vec<Option<PeerRow>> {
    let mut peers: Vec<Option<PeerRow>> = Vec::new();
    let mut by_id: HashMap<u16, u32> = HashMap::new();
    for slot in 0..layout.max_peers {
        let at = format!("peer slot {slot}");
        let row = match peer::read_peer_entry(mem, layout, PeerSlot(slot)) {
            Ok(p) => p.map(|p| PeerRow {
                slot,
                id: p.peer_id.raw(),
                incarnation: p.incarnation,
                handles: 0,
                req_seq: 0,
                resp_seq: 0,
                pending: false,
            }),
            Err(PeerError::Fault(_)) => {
                r.error(at, "the entry cannot be read");
                peers.push(None);
                continue;
            }
            Err(e) => {
                r.error(&at, format!("{e}; treated as absent"));
                None
            }
        };
        if let Some(p) = &row {
            if p.incarnation == 0 {
                r.warning(&at, "connected with incarnation 0 (the host counts from 1)");
            }
            if let Some(first) = by_id.insert(p.id, slot) {
                r.error(
                    &at,
                    format!(
                        "peer id {} is also connected in peer slot {first}: a client with that \
                         id finds no slot",
                        p.id
                    ),
                );
            }
        }
        peers.push(row);
    }
    peers
}

/// The object table: a view of every slot and the list of valid objects.
fn walk_objects<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    r: &mut Report,
) -> (Vec<SlotView>, Vec<Obj>) {
    let mut slots = Vec::new();
    let mut objs = Vec::new();
    for slot in 0..layout.max_objects {
        let view = match read_slot(mem, layout, slot, r) {
            Some((entry, lease)) => match object::validate(layout, ObjectSlot(slot), &entry) {
                Ok(None) => {
                    check_free(&entry, lease, slot, r);
                    SlotView::Free
                }
                Ok(Some(info)) => {
                    let mut obj = object_row(&info, lease);
                    read_sync(mem, layout, &info, &mut obj);
                    objs.push(obj);
                    SlotView::Object(objs.len() - 1)
                }
                Err(err) => {
                    r.error(
                        format!("object slot {slot}"),
                        format!(
                            "invalid entry: {} [{}]",
                            why_invalid(&entry, err),
                            entry_tag(err)
                        ),
                    );
                    SlotView::Invalid
                }
            },
            None => SlotView::Invalid,
        };
        slots.push(view);
    }
    (slots, objs)
}

/// A consistent copy of one entry and its lease word, or `None` (with a finding).
fn read_slot<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: u32,
    r: &mut Report,
) -> Option<(Snapshot, u64)> {
    let at = format!("object slot {slot}");
    let Some(base) = layout.object_entry(ObjectSlot(slot)) else {
        r.error(at, "outside the object table");
        return None;
    };
    let lease = match mem.load_u64(base + OBJ_LEASE_OFF, Ordering::SeqCst) {
        Ok(w) => w,
        Err(f) => {
            r.error(at, format!("cannot read the lease word: {f}"));
            return None;
        }
    };
    // An odd counter that stays odd is a host stopped mid-publication; object::snapshot
    // would spin on it, so wait a little here and describe the torn copy instead.
    let mut settled = false;
    let mut seq = 0;
    for _ in 0..SEQ_WAIT_TRIES {
        match mem.load_u64(base + OBJ_SEQ_OFF, Ordering::Acquire) {
            Ok(s) if s & 1 == 0 => {
                settled = true;
                break;
            }
            Ok(s) => seq = s,
            Err(f) => {
                r.error(at, format!("cannot read the seqlock counter: {f}"));
                return None;
            }
        }
        std::thread::yield_now();
    }
    if !settled {
        let copy = match unsynchronised_copy(mem, layout, base) {
            Ok(e) => match object::validate(layout, ObjectSlot(slot), &e) {
                Ok(None) => "FREE".to_string(),
                Ok(Some(info)) => format!(
                    "{} {} generation {}",
                    state_name(info.state),
                    shown_name(info.name()),
                    info.generation
                ),
                Err(err) => format!("invalid: {}", why_invalid(&e, err)),
            },
            Err(f) => format!("unreadable: {f}"),
        };
        r.error(
            at,
            format!(
                "seqlock counter {seq} stays odd: the host is stuck in the middle of publishing \
                 this entry; unsynchronised copy: {copy}"
            ),
        );
        return None;
    }
    match object::snapshot(mem, layout, ObjectSlot(slot), true) {
        Ok(e) => Some((e, lease)),
        Err(EntryError::Busy) => {
            r.warning(
                at,
                "the entry kept changing while it was read (the host is publishing it)",
            );
            None
        }
        Err(e) => {
            r.error(at, format!("cannot read the entry: {e}"));
            None
        }
    }
}

/// The entry at `base` and its name's bytes (if its reference lies in the name area),
/// copied without the seqlock (for describing an entry whose counter stays odd).
fn unsynchronised_copy<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    base: u64,
) -> Result<Snapshot, Fault> {
    let e = read_pod::<ObjectEntry, M>(mem, base)?;
    let mut snap = Snapshot::of(e, &[]);
    if let Ok(Some(at)) = object::check_name_ref(layout, e.name_off, e.name_len) {
        if let Some(dst) = snap.name.get_mut(..usize::from(e.name_len)) {
            mem.read_bytes(at, dst)?;
        }
    }
    Ok(snap)
}

fn state_name(state: u32) -> &'static str {
    match state {
        object_state::LIVE => "LIVE",
        object_state::UNLINKED => "UNLINKED",
        object_state::FREE => "FREE",
        _ => "?",
    }
}

fn kind_name(k: u32) -> &'static str {
    match k {
        kind::SECTION => "section",
        kind::EVENT => "event",
        kind::MUTEX => "mutex",
        _ => "?",
    }
}

/// A name for messages: quoted, control characters escaped.
fn shown_name(name: Option<&str>) -> String {
    name.map_or_else(|| "<unnamed>".to_string(), |n| format!("{n:?}"))
}

fn object_row(info: &ObjectInfo, lease: u64) -> Obj {
    Obj {
        row: ObjectRow {
            slot: info.slot.raw(),
            name: info.name().map(str::to_string),
            state: state_name(info.state),
            kind: kind_name(info.kind),
            generation: info.generation.raw(),
            offset: info.offset.raw(),
            size: info.size,
            max_size: info.max_size,
            persistent: info.persistent(),
            creator: info.creator,
            lease: format!("{lease:#018x}"),
            closed: lease & LEASE_CLOSED != 0,
            keep: lease & LEASE_KEEP != 0,
            holders: Vec::new(),
            refs: 0,
            refs_by_peer: Vec::new(),
            sync: None,
        },
        state: info.state,
        lease,
        owner_word: 0,
        name_range: info.name().map(|n| {
            let start = u64::from(info.name_off);
            (start, start + (n.len() as u64).next_multiple_of(8))
        }),
    }
}

/// Reads an event's or mutex's sync words (single atomic loads, like any peer would).
fn read_sync<M: SharedMemory + ?Sized>(mem: &M, layout: &Layout, info: &ObjectInfo, obj: &mut Obj) {
    if info.kind == kind::SECTION {
        return;
    }
    let slot = info.slot;
    let load = |off: u64| {
        layout
            .object_entry(slot)
            .and_then(|b| mem.load_u64(b + off, Ordering::SeqCst).ok())
            .unwrap_or(0)
    };
    let waiters = load(OBJ_WAITERS_OFF);
    let word = load(OBJ_SYNC_OFF);
    let mut row = SyncRow {
        signals: load(OBJ_SIGNAL_SEQ_OFF),
        waiter_slots: (0..layout.max_peers)
            .filter(|&i| waiters & holder_bit(PeerSlot(i)) != 0)
            .collect(),
        ..SyncRow::default()
    };
    if info.kind == kind::EVENT {
        row.signaled = Some(word != 0);
    } else {
        row.owner_slot = mutex_word::slot(word).map(PeerSlot::raw);
        row.owner_token = row.owner_slot.map(|_| mutex_word::token(word));
        row.handoff = word & mutex_word::HANDOFF != 0;
        row.abandoned = load(OBJ_ABANDONED_OFF) != 0;
        obj.owner_word = word;
    }
    obj.row.sync = Some(row);
}

/// Explains an [`EntryError`] in the words inspect has always used. The error carries the
/// values; only the name messages need the name itself (the error is small and `Copy`, so it
/// does not carry 1040 bytes), which comes from the copy it was found in.
fn why_invalid(e: &Snapshot, err: EntryError) -> String {
    let name = || {
        e.name
            .get(..usize::from(e.name_len))
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    };
    match err {
        EntryError::BadName { name_len, error } => match error {
            NameError::TooLong { .. } => {
                format!("name_len {name_len} exceeds {MAX_NAME_BYTES} bytes")
            }
            NameError::NotUtf8 { .. } => format!("name of {name_len} bytes is not valid UTF-8"),
            NameError::Backslash { .. } => format!("name {:?} contains a backslash", name()),
            NameError::Nul { .. } => format!("name {:?} contains a NUL", name()),
            NameError::TooManyChars { .. } => {
                format!("name is longer than {MAX_NAME_CHARS} characters")
            }
            NameError::Empty => format!("name {:?} is invalid", name()),
        },
        EntryError::BadNameHash {
            stored, computed, ..
        } => format!(
            "name_hash {stored:#010x} is not the FNV-1a hash {computed:#010x} of the name {:?}",
            name()
        ),
        _ => err.to_string(),
    }
}

/// The bracketed tag after an invalid entry's description: the error's old tuple-variant
/// `Debug` form (`BadRange(offset, size, max_size)`), kept so the text and JSON reports stay
/// byte-for-byte what they were before the format's errors gained named fields.
fn entry_tag(err: EntryError) -> String {
    match err {
        EntryError::BadState { state } => format!("BadState({state})"),
        EntryError::BadKind { kind } => format!("BadKind({kind})"),
        EntryError::BadRange {
            offset,
            size,
            max_size,
            ..
        } => format!("BadRange({offset}, {size}, {max_size})"),
        EntryError::UnknownFlags { flags, .. } | EntryError::NamedMismatch { flags, .. } => {
            format!("BadFlags({flags})")
        }
        EntryError::BadName { name_len, .. }
        | EntryError::BadNameHash { name_len, .. }
        | EntryError::BadNameRef { name_len, .. } => format!("BadName({name_len})"),
        EntryError::Busy => "Busy".to_string(),
        EntryError::Fault(f) => format!("Fault({f:?})"),
    }
}

/// The refcount rows: per-object handle counts, and each against the lease word. Returns
/// the handles counted by each peer slot.
fn walk_refcounts<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peers: &[Option<PeerRow>],
    slots: &[SlotView],
    objs: &mut [Obj],
    r: &mut Report,
) -> Vec<u64> {
    let mut handles = vec![0u64; peers.len()];
    for (p, peer) in (0..layout.max_peers).zip(peers) {
        let mut absent_nonzero = 0u32;
        let mut first_nonzero = None;
        for (s, view) in (0..layout.max_objects).zip(slots) {
            let Some(off) = layout.refcount_cell(PeerSlot(p), ObjectSlot(s)) else {
                continue;
            };
            let v = match mem.load_u32(off, Ordering::Acquire) {
                Ok(v) => v,
                Err(f) => {
                    r.error(
                        format!("peer slot {p}"),
                        format!("cannot read the refcount cell for object slot {s}: {f}"),
                    );
                    break;
                }
            };
            let Some(peer) = peer else {
                if v != 0 {
                    absent_nonzero += 1;
                    first_nonzero.get_or_insert(s);
                }
                continue;
            };
            let at = || format!("object slot {s}");
            // A locked cell's low bits name the lock owner, not a count (FORMAT.md §6).
            let n = refcell::count(v).unwrap_or(0);
            let locked = refcell::lock_owner(v);
            if let Some(token) = locked {
                let by = match token {
                    0 => "an untagged owner".to_string(),
                    t => format!("owner token {t}"),
                };
                r.note(
                    at(),
                    format!(
                        "peer {} (slot {p}) holds its refcount lock ({by}): a transition in \
                         progress (taken over by the peer's next open or close if that owner \
                         died)",
                        peer.id
                    ),
                );
            }
            let locked = locked.is_some();
            match *view {
                SlotView::Free if n > 0 => {
                    r.error(
                        at(),
                        format!(
                            "peer {} (slot {p}) counts {n} handle(s) on a free slot",
                            peer.id
                        ),
                    );
                }
                SlotView::Object(i) => {
                    let Some(o) = objs.get_mut(i) else {
                        continue;
                    };
                    let bit = o.lease & holder_bit(PeerSlot(p)) != 0;
                    if n > 0 {
                        o.row.refs_by_peer.push((peer.id, n));
                        if let Some(h) = handles.get_mut(p as usize) {
                            *h += u64::from(n);
                        }
                        if !bit {
                            r.error(
                                at(),
                                format!(
                                    "peer {} (slot {p}) counts {n} handle(s) but its holder bit \
                                     is not set in the lease word {:#018x}",
                                    peer.id, o.lease
                                ),
                            );
                        }
                    } else if bit && !locked && o.lease & LEASE_CLOSED == 0 {
                        r.note(
                            at(),
                            format!(
                                "peer {} (slot {p}) has its holder bit set but counts no handles \
                                 (a creator yet to take its hold, or an open in progress)",
                                peer.id
                            ),
                        );
                    }
                }
                _ => {}
            }
        }
        if let Some(first) = first_nonzero {
            r.warning(
                format!("peer slot {p}"),
                format!(
                    "no peer is connected but {absent_nonzero} refcount cell(s) are not zero \
                     (first: object slot {first}); the host zeroes a row when its peer leaves"
                ),
            );
        }
    }
    handles
}

/// Connected peers' mailboxes: a request posted and not answered is a note.
fn walk_mailboxes<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    rows: &mut [PeerRow],
    r: &mut Report,
) {
    for p in rows {
        let at = format!("peer slot {}", p.slot);
        let Some(base) = layout.mailbox(PeerSlot(p.slot)) else {
            continue;
        };
        let read = (|| {
            Ok::<_, Fault>((
                mem.load_u64(base + MB_REQ_SEQ_OFF, Ordering::Acquire)?,
                mem.load_u64(base + MB_RESP_SEQ_OFF, Ordering::Acquire)?,
                mem.load_u32(base + MB_LOCK_OFF, Ordering::Acquire)?,
                mem.load_u32(base + MB_OP_OFF, Ordering::Relaxed)?,
            ))
        })();
        let (req, resp, lock, opcode) = match read {
            Ok(x) => x,
            Err(f) => {
                r.error(at, format!("cannot read the mailbox: {f}"));
                continue;
            }
        };
        p.req_seq = req;
        p.resp_seq = resp;
        p.pending = req != resp;
        if p.pending {
            let op_name = match opcode {
                op::CREATE => "CREATE",
                op::DELETE => "DELETE",
                op::GROW => "GROW",
                _ => "unknown op",
            };
            r.note(
                at,
                format!(
                    "peer {}: request {req} ({op_name} {opcode}) is not answered (resp_seq \
                     {resp}{}); if this stays, the host is not serving requests",
                    p.id,
                    if lock != 0 { ", mailbox locked" } else { "" }
                ),
            );
        }
    }
}
