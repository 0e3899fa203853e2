//! Object table entries: seqlock snapshots for readers (the entry's head and, through its
//! checked reference, its name's bytes in the name area), seqlock publication for the host,
//! validation of everything a snapshot claims ([`EntryError`] says which field is wrong
//! and carries its value), and lookup by name. Peer-table reads live in [`crate::peer`] and
//! are re-exported here under their old paths.

use core::sync::atomic::{fence, Ordering};

use crate::ids::{Generation, ObjectSlot, PeerId, RegionOffset};
use crate::index;
use crate::layout::{
    const_usize, kind, object_flags, object_state, Layout, ObjectEntry, LEASE_CLOSED,
    MAX_NAME_BYTES, OBJ_GENERATION_OFF, OBJ_HEAD_LEN, OBJ_LEASE_OFF, OBJ_SEQ_OFF, OBJ_SIZE_OFF,
    OBJ_STATE_OFF, SB_NAMESPACE_SEQ_OFF,
};
use crate::name::{name_hash, validate_name_bytes, NameError};
use crate::shm::{bytes_of, bytes_of_mut, zeroed, Fault, SharedMemory};

pub use crate::peer::{find_peer_slot, peer_still_attached, read_peer, PeerInfo};

mod error;
pub use error::{
    check_heap_range, check_name_ref, check_object_range, EntryError, NameRefProblem, RangeProblem,
};

/// How many times a reader retries a snapshot the host keeps changing under it.
const SNAPSHOT_TRIES: u32 = 10_000;

/// What a validated entry says of its object, but for its name: small and `Copy`, all the
/// open path needs (its caller has the name). [`ObjectInfo`] is this and the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectHead {
    /// Table slot.
    pub slot: ObjectSlot,
    /// Generation of the object in this slot.
    pub generation: Generation,
    /// [`object_state`] (LIVE or UNLINKED; FREE entries are not returned as objects).
    pub state: u32,
    /// [`kind`].
    pub kind: u32,
    /// Region offset of the object's memory.
    pub offset: RegionOffset,
    /// Current size.
    pub size: u64,
    /// Max size.
    pub max_size: u64,
    /// [`object_flags`].
    pub flags: u32,
    /// Creator's peer id.
    pub creator: u32,
    /// Where the name's bytes are in the name area (0 for unnamed, or an object described
    /// by something other than its entry).
    pub name_off: u32,
}

/// A validated copy of one object entry with its name. Dereferences to its
/// [`ObjectHead`]; the name is [`ObjectInfo::name`]. It carries a name buffer of
/// [`MAX_NAME_BYTES`], so hot paths pass the head instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    head: ObjectHead,
    name_len: u32,
    name: [u8; MAX_NAME_BYTES],
}

impl core::ops::Deref for ObjectInfo {
    type Target = ObjectHead;
    fn deref(&self) -> &ObjectHead {
        &self.head
    }
}

impl ObjectInfo {
    /// A LIVE object as something other than its entry describes it (the vshm device's
    /// reply to an OPEN: a VM sees no entries). `name` must be valid (else it is dropped
    /// and the object described as unnamed); `creator` is unknown (0).
    #[allow(clippy::too_many_arguments)] // one per field a reply carries
    pub fn described(
        slot: ObjectSlot,
        generation: Generation,
        kind: u32,
        flags: u32,
        offset: RegionOffset,
        size: u64,
        max_size: u64,
        name: Option<&str>,
    ) -> ObjectInfo {
        let mut info = ObjectInfo {
            head: ObjectHead {
                slot,
                generation,
                state: object_state::LIVE,
                kind,
                offset,
                size,
                max_size,
                flags: flags & !object_flags::NAMED,
                creator: 0,
                name_off: 0,
            },
            name_len: 0,
            name: [0; MAX_NAME_BYTES],
        };
        let valid = name.filter(|n| validate_name_bytes(n.as_bytes()).is_ok());
        if let Some((n, len)) = valid.and_then(|n| Some((n, u32::try_from(n.len()).ok()?))) {
            info.name[..n.len()].copy_from_slice(n.as_bytes());
            info.name_len = len;
            info.head.flags |= object_flags::NAMED;
        }
        info
    }

    /// A head and the name it was validated with (`name` must be that object's name:
    /// the lookup compared it).
    fn with_name(head: ObjectHead, name: &[u8]) -> ObjectInfo {
        let mut info = ObjectInfo {
            head,
            name_len: 0,
            name: [0; MAX_NAME_BYTES],
        };
        if let (Some(dst), Ok(len)) = (info.name.get_mut(..name.len()), u32::try_from(name.len())) {
            dst.copy_from_slice(name);
            info.name_len = len;
        }
        info
    }

    /// The head: everything but the name.
    pub fn head(&self) -> ObjectHead {
        self.head
    }

    /// The name, `None` for an unnamed object.
    pub fn name(&self) -> Option<&str> {
        if self.flags & object_flags::NAMED == 0 || self.name_len == 0 {
            return None;
        }
        // Validated when the snapshot was taken.
        core::str::from_utf8(&self.name[..self.name_len as usize]).ok()
    }
}

impl ObjectHead {
    /// Persistent (lives until deleted).
    pub fn persistent(&self) -> bool {
        self.flags & object_flags::PERSISTENT != 0
    }
}

/// Reads the namespace sequence number (bumped by the host after each table change).
pub fn namespace_seq<M: SharedMemory + ?Sized>(mem: &M) -> Result<u64, Fault> {
    mem.load_u64(SB_NAMESPACE_SEQ_OFF, Ordering::Acquire)
}

/// A seqlocked copy of one object entry and of its name's bytes in the name area (version
/// 4: the name is not in the entry). Dereferences to the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The entry's host-written head (the lease line is not copied: zero here).
    pub entry: ObjectEntry,
    /// The name bytes (`entry.name_len` of them, the rest zero). All zero if the snapshot
    /// was taken without the name or the reference was out of bounds (then
    /// [`validate`] refuses it).
    pub name: [u8; MAX_NAME_BYTES],
}

impl core::ops::Deref for Snapshot {
    type Target = ObjectEntry;
    fn deref(&self) -> &ObjectEntry {
        &self.entry
    }
}

impl Snapshot {
    /// A snapshot of `entry` with `name` (truncated to [`MAX_NAME_BYTES`]) as its name
    /// bytes: what a reader would have copied (tests, fuzzers, the monitor's raw view).
    pub fn of(entry: ObjectEntry, name: &[u8]) -> Snapshot {
        let mut s = Snapshot {
            entry,
            name: [0; MAX_NAME_BYTES],
        };
        let n = name.len().min(MAX_NAME_BYTES);
        s.name[..n].copy_from_slice(&name[..n]);
        s
    }
}

/// Where entry `slot` is, or the fault a reader reports for a slot outside the table.
fn entry_base(layout: &Layout, slot: ObjectSlot) -> Result<u64, EntryError> {
    layout
        .object_entry(slot)
        .ok_or(EntryError::Fault(Fault::OutOfBounds {
            offset: u64::from(slot.0),
            len: 0,
        }))
}

/// The seqlock read of the entry at `base`: `copy(retry)` copies what the caller wants
/// (`retry`: an earlier copy was thrown away) between two even, equal reads of the
/// sequence word, which is returned. [`EntryError::Busy`] after [`SNAPSHOT_TRIES`].
fn seqlocked<M: SharedMemory + ?Sized>(
    mem: &M,
    base: u64,
    mut copy: impl FnMut(bool) -> Result<(), Fault>,
) -> Result<u64, EntryError> {
    for tries in 0..SNAPSHOT_TRIES {
        let s1 = mem.load_u64(base + OBJ_SEQ_OFF, Ordering::Acquire)?;
        if s1 & 1 == 1 {
            core::hint::spin_loop();
            continue;
        }
        copy(tries > 0)?;
        fence(Ordering::Acquire);
        let s2 = mem.load_u64(base + OBJ_SEQ_OFF, Ordering::Relaxed)?;
        if s1 == s2 {
            return Ok(s1);
        }
    }
    Err(EntryError::Busy)
}

/// Takes a consistent copy of entry `slot` (seqlock read) and, `with_name`, of its name's
/// bytes: the name reference is read once with the head, checked against the name area
/// ([`check_name_ref`]) and, if it is inside, those bytes are copied before the sequence is
/// read again; so the bytes belong to the head they came with. The copy is not yet
/// validated.
pub fn snapshot<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    with_name: bool,
) -> Result<Snapshot, EntryError> {
    let base = entry_base(layout, slot)?;
    let mut snap = Snapshot {
        entry: zeroed::<ObjectEntry>(),
        name: [0; MAX_NAME_BYTES],
    };
    let seq = seqlocked(mem, base, |retry| {
        mem.read_bytes(base, &mut bytes_of_mut(&mut snap.entry)[..OBJ_HEAD_LEN])?;
        if with_name {
            // A try the seqlock threw away may have left a longer name behind.
            if retry {
                snap.name = [0; MAX_NAME_BYTES];
            }
            let (off, len) = (snap.entry.name_off, snap.entry.name_len);
            if let (Ok(Some(at)), Some(dst)) = (
                check_name_ref(layout, off, len),
                snap.name.get_mut(..usize::from(len)),
            ) {
                mem.read_bytes(at, dst)?;
            }
        }
        Ok(())
    })?;
    snap.entry.seq = seq;
    Ok(snap)
}

/// [`snapshot`] of the entry's head alone (no name buffer to clear or carry).
fn snapshot_head<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<ObjectEntry, EntryError> {
    let base = entry_base(layout, slot)?;
    let mut entry = zeroed::<ObjectEntry>();
    let seq = seqlocked(mem, base, |_| {
        mem.read_bytes(base, &mut bytes_of_mut(&mut entry)[..OBJ_HEAD_LEN])
    })?;
    entry.seq = seq;
    Ok(entry)
}

/// Validates a snapshot (taken with its name). `Ok(None)` for a free slot. The checks run
/// in a fixed order (state, kind, range, flags, name reference, name) and the first
/// failure is returned.
pub fn validate(
    layout: &Layout,
    slot: ObjectSlot,
    snap: &Snapshot,
) -> Result<Option<ObjectInfo>, EntryError> {
    let len = usize::from(snap.entry.name_len);
    let head = validate_entry(layout, slot, &snap.entry, Some(&snap.name))?;
    // validate_entry checked that the name's length fits the buffer.
    Ok(head.map(|h| ObjectInfo::with_name(h, snap.name.get(..len).unwrap_or_default())))
}

/// [`validate`] of an entry's head, and of its name's bytes if `name` is the buffer its
/// snapshot copied them into (`None`: the head alone, the name not looked at).
fn validate_entry(
    layout: &Layout,
    slot: ObjectSlot,
    e: &ObjectEntry,
    name: Option<&[u8; MAX_NAME_BYTES]>,
) -> Result<Option<ObjectHead>, EntryError> {
    match e.state {
        object_state::FREE => return Ok(None),
        object_state::LIVE | object_state::UNLINKED => {}
        other => return Err(EntryError::BadState { state: other }),
    }
    if !matches!(e.kind, kind::SECTION | kind::EVENT | kind::MUTEX) {
        return Err(EntryError::BadKind { kind: e.kind });
    }
    check_object_range(layout, e.kind, e.offset, e.size, e.max_size).map_err(|problem| {
        EntryError::BadRange {
            offset: e.offset,
            size: e.size,
            max_size: e.max_size,
            problem,
        }
    })?;
    let allowed = if e.kind == kind::EVENT {
        object_flags::ALL
    } else {
        object_flags::NAMED | object_flags::PERSISTENT
    };
    let unknown = e.flags & !allowed;
    if unknown != 0 {
        return Err(EntryError::UnknownFlags {
            flags: e.flags,
            unknown,
        });
    }
    let name_len = u32::from(e.name_len);
    let named = e.flags & object_flags::NAMED != 0;
    if named != (name_len != 0) {
        return Err(EntryError::NamedMismatch {
            flags: e.flags,
            name_len,
        });
    }
    check_name_ref(layout, e.name_off, e.name_len).map_err(|problem| EntryError::BadNameRef {
        name_off: e.name_off,
        name_len,
        problem,
    })?;
    let bad_name = |error| EntryError::BadName { name_len, error };
    if usize::from(e.name_len) > MAX_NAME_BYTES {
        return Err(bad_name(NameError::TooLong {
            bytes: usize::from(e.name_len),
        }));
    }
    if let (true, Some(buffer)) = (named, name) {
        let bytes = buffer.get(..usize::from(e.name_len)).unwrap_or_default();
        validate_name_bytes(bytes).map_err(bad_name)?;
        let computed = name_hash(bytes);
        if computed != e.name_hash {
            return Err(EntryError::BadNameHash {
                name_len,
                stored: e.name_hash,
                computed,
            });
        }
    }
    Ok(Some(head_of(slot, e)))
}

/// The head a validated entry describes.
fn head_of(slot: ObjectSlot, e: &ObjectEntry) -> ObjectHead {
    ObjectHead {
        slot,
        generation: Generation(e.generation),
        state: e.state,
        kind: e.kind,
        offset: RegionOffset(e.offset),
        size: e.size,
        max_size: e.max_size,
        flags: e.flags,
        creator: u32::from(e.creator),
        name_off: e.name_off,
    }
}

/// Snapshot + validate in one step.
pub fn read_object<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<Option<ObjectInfo>, EntryError> {
    let e = snapshot(mem, layout, slot, true)?;
    validate(layout, slot, &e)
}

/// The entry of an object the caller holds, validated like [`read_object`] but for its
/// name, which is not read: the caller's holder bit pins the entry's identity and the
/// generation it compares proves it is the object it looked up, so the name area need not
/// be read again on every open.
pub fn read_held_object<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<Option<ObjectHead>, EntryError> {
    let e = snapshot_head(mem, layout, slot)?;
    validate_entry(layout, slot, &e, None)
}

/// Finds the LIVE, not yet closed object called `name` (any kind), through the name index
/// (FORMAT.md §5a): O(1) whatever the table holds. Invalid entries are skipped: a scribbled
/// entry (or index) can hide a name but cannot make a reader misbehave. If nothing matched
/// but a candidate was skipped because the host kept it busy, the answer is
/// `Err(EntryError::Busy)` (look again) rather than "not found". An index that cannot
/// answer ([`index::Probe::Inconclusive`]: its sequence word kept moving or stayed odd, or
/// it has no EMPTY entry) is bypassed with [`scan_by_name`].
pub fn find_by_name<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    name: &str,
) -> Result<Option<ObjectInfo>, EntryError> {
    let head = find_head_by_name(mem, layout, name)?;
    Ok(head.map(|h| ObjectInfo::with_name(h, name.as_bytes())))
}

/// [`find_by_name`] without the name in the answer (the caller has it): what an open
/// needs, without the name buffer an [`ObjectInfo`] carries.
pub fn find_head_by_name<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    name: &str,
) -> Result<Option<ObjectHead>, EntryError> {
    let hash = name_hash(name.as_bytes());
    match index::probe(mem, layout, hash, |slot| {
        candidate(mem, layout, slot, name, hash, Prefilter::IndexedHash)
    })? {
        index::Probe::Found(head) => Ok(Some(head)),
        index::Probe::NotFound => Ok(None),
        index::Probe::Busy => Err(EntryError::Busy),
        index::Probe::Inconclusive => scan_head_by_name(mem, layout, name),
    }
}

/// How [`candidate`] rules out a slot before it reads the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prefilter {
    /// The slot came from an index entry carrying the name's hash: most such slots are
    /// the one, so the name is read at once.
    IndexedHash,
    /// A scan meets every slot: the entry's head (hash, length) is compared first, so a
    /// name is read only for a slot that may be it.
    EntryHead,
}

/// Whether object slot `slot` holds the LIVE, not yet closed object called `name` (whose
/// hash is `hash`): the check both the index probe and the scan apply to a slot.
fn candidate<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    name: &str,
    hash: u32,
    prefilter: Prefilter,
) -> Result<index::Candidate<ObjectHead>, EntryError> {
    use index::Candidate::{Busy, Match, Other};
    let Some(base) = layout.object_entry(slot) else {
        return Ok(Other);
    };
    // Cheap pre-filter with one atomic load; the snapshot below decides.
    if mem.load_u32(base + OBJ_STATE_OFF, Ordering::Relaxed)? != object_state::LIVE {
        return Ok(Other);
    }
    if prefilter == Prefilter::EntryHead {
        let head = match snapshot_head(mem, layout, slot) {
            Ok(h) => h,
            Err(EntryError::Busy) => return Ok(Busy),
            Err(EntryError::Fault(f)) => return Err(EntryError::Fault(f)),
            Err(_) => return Ok(Other),
        };
        if head.state != object_state::LIVE
            || head.name_hash != hash
            || usize::from(head.name_len) != name.len()
        {
            return Ok(Other);
        }
    }
    // Closed by its last holder but not yet reaped by the host: already dead.
    if mem.load_u64(base + OBJ_LEASE_OFF, Ordering::SeqCst)? & LEASE_CLOSED != 0 {
        return Ok(Other);
    }
    let full = match snapshot(mem, layout, slot, true) {
        Ok(f) => f,
        Err(EntryError::Busy) => return Ok(Busy),
        Err(_) => return Ok(Other),
    };
    let is_it = full.entry.flags & object_flags::NAMED != 0
        && full.name.get(..usize::from(full.entry.name_len)) == Some(name.as_bytes());
    match validate_entry(layout, slot, &full.entry, Some(&full.name)) {
        Ok(Some(head)) if head.state == object_state::LIVE && is_it => Ok(Match(head)),
        _ => Ok(Other),
    }
}

/// Finds `name` by scanning every slot of the object table in order (the version 2 lookup,
/// now the fallback when the index cannot answer). Same answers as [`find_by_name`].
pub fn scan_by_name<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    name: &str,
) -> Result<Option<ObjectInfo>, EntryError> {
    let head = scan_head_by_name(mem, layout, name)?;
    Ok(head.map(|h| ObjectInfo::with_name(h, name.as_bytes())))
}

/// [`scan_by_name`] answering with the head.
fn scan_head_by_name<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    name: &str,
) -> Result<Option<ObjectHead>, EntryError> {
    let hash = name_hash(name.as_bytes());
    let mut busy = false;
    for slot in (0..layout.max_objects).map(ObjectSlot) {
        match candidate(mem, layout, slot, name, hash, Prefilter::EntryHead)? {
            index::Candidate::Match(head) => return Ok(Some(head)),
            index::Candidate::Busy => busy = true,
            index::Candidate::Other => {}
        }
    }
    if busy {
        Err(EntryError::Busy)
    } else {
        Ok(None)
    }
}

/// The host's write of a whole entry (except the lease line): seqlock odd, fields,
/// seqlock even, then the namespace sequence is bumped. Writes no name bytes: for an
/// unnamed entry, a FREE image, or a named entry whose name is already in the area and
/// unchanged ([`publish_named`] writes it).
pub fn publish<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    entry: &ObjectEntry,
) -> Result<(), Fault> {
    publish_inner(mem, layout, slot, entry, None)
}

/// [`publish`], also (re)writing `name` at the entry's `name_off` in the name area while
/// the seqlock is odd, so a reader never pairs the entry with half-written name bytes.
/// Fails, writing nothing, if the entry's name reference does not hold `name`
/// (`name_len` differs or the range is outside the area).
pub fn publish_named<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    entry: &ObjectEntry,
    name: &[u8],
) -> Result<(), Fault> {
    publish_inner(mem, layout, slot, entry, Some(name))
}

fn publish_inner<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    entry: &ObjectEntry,
    name: Option<&[u8]>,
) -> Result<(), Fault> {
    let base = layout.object_entry(slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(slot.0),
        len: 0,
    })?;
    let name_at = match name {
        None => None,
        Some(n) => {
            let bad = Fault::OutOfBounds {
                offset: u64::from(entry.name_off),
                len: n.len() as u64,
            };
            // The host places names inside `name_area_size` only (readers accept the
            // padding after it too: `Layout::name_span`).
            let inside = u64::from(entry.name_off)
                .checked_add(n.len() as u64)
                .is_some_and(|end| end <= layout.name_area_size);
            if n.len() != usize::from(entry.name_len) || !inside {
                return Err(bad);
            }
            match check_name_ref(layout, entry.name_off, entry.name_len) {
                Ok(Some(at)) => Some((at, n)),
                Ok(None) => None,
                Err(_) => return Err(bad),
            }
        }
    };
    let seq = mem.load_u64(base + OBJ_SEQ_OFF, Ordering::Relaxed)?;
    // Next odd value (seq+1 if seq is even; seq+2 if a peer scribbled an odd value).
    let odd = seq.wrapping_add(1) | 1;
    mem.store_u64(base + OBJ_SEQ_OFF, odd, Ordering::Relaxed)?;
    fence(Ordering::Release);
    let bytes = bytes_of(entry);
    // Generation and state are also read outside the seqlock (the lease protocol's
    // re-check), so they are written with single atomic stores, never byte copies; the rest
    // of the head (kind onwards) is copied. The lease line is not touched.
    mem.store_u64(
        base + OBJ_GENERATION_OFF,
        entry.generation,
        Ordering::SeqCst,
    )?;
    mem.store_u32(base + OBJ_STATE_OFF, entry.state, Ordering::SeqCst)?;
    // `size` is read alone by handles (Section::size), so it gets an atomic store too.
    let kind_off = const_usize(OBJ_STATE_OFF) + 4;
    let size_off = const_usize(OBJ_SIZE_OFF);
    mem.write_bytes(base + kind_off as u64, &bytes[kind_off..size_off])?;
    mem.store_u64(base + OBJ_SIZE_OFF, entry.size, Ordering::Release)?;
    mem.write_bytes(base + OBJ_SIZE_OFF + 8, &bytes[size_off + 8..OBJ_HEAD_LEN])?;
    if let Some((at, n)) = name_at {
        mem.write_bytes(at, n)?;
    }
    mem.store_u64(base + OBJ_SEQ_OFF, odd.wrapping_add(1), Ordering::Release)?;
    bump_namespace_seq(mem)
}

/// Bumps the superblock's namespace sequence (host only).
pub fn bump_namespace_seq<M: SharedMemory + ?Sized>(mem: &M) -> Result<(), Fault> {
    let v = mem.load_u64(SB_NAMESPACE_SEQ_OFF, Ordering::Relaxed)?;
    mem.store_u64(SB_NAMESPACE_SEQ_OFF, v.wrapping_add(1), Ordering::Release)
}

/// Reads the generation of `slot` (one atomic load).
pub fn generation<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<Generation, Fault> {
    let base = layout.object_entry(slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(slot.0),
        len: 0,
    })?;
    mem.load_u64(base + OBJ_GENERATION_OFF, Ordering::SeqCst)
        .map(Generation)
}

/// Reads the state of `slot` (one atomic load).
pub fn state<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<u32, Fault> {
    let base = layout.object_entry(slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(slot.0),
        len: 0,
    })?;
    mem.load_u32(base + OBJ_STATE_OFF, Ordering::SeqCst)
}

/// Builds an entry for the host to publish. `name` must already be validated; its
/// reference is left at offset 0: the host sets `name_off` to where it allocated the name
/// in the area, then publishes with [`publish_named`].
#[allow(clippy::too_many_arguments)]
pub fn make_entry(
    generation: Generation,
    state: u32,
    kind: u32,
    offset: RegionOffset,
    size: u64,
    max_size: u64,
    persistent: bool,
    name: Option<&str>,
    creator: PeerId,
) -> ObjectEntry {
    let mut e = zeroed::<ObjectEntry>();
    e.generation = generation.0;
    e.state = state;
    e.kind = kind;
    e.offset = offset.0;
    e.size = size;
    e.max_size = max_size;
    e.creator = creator.0;
    e.flags = if persistent {
        object_flags::PERSISTENT
    } else {
        0
    };
    if let Some(n) = name {
        let b = n.as_bytes();
        let len = b.len().min(MAX_NAME_BYTES);
        e.name_len = u16::try_from(len).unwrap_or(0);
        e.name_hash = name_hash(&b[..len]);
        e.flags |= object_flags::NAMED;
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Generation, ObjectSlot, PeerId, RegionOffset};
    use crate::shm::RawRegion;
    use core::ptr::NonNull;

    fn region(buf: &mut [u64]) -> (RawRegion<'_>, Layout) {
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: buf outlives the region in each test; 8-aligned; len bytes.
        let mem = unsafe { RawRegion::new(base, (buf.len() * 8) as u64) };
        (
            mem,
            Layout::compute(1 << 20, 2, 4, 1, 4096).expect("layout"),
        )
    }

    fn good(layout: &Layout) -> ObjectEntry {
        make_entry(
            Generation(1),
            object_state::LIVE,
            kind::SECTION,
            RegionOffset(layout.heap_offset),
            10,
            4096,
            false,
            Some("name"),
            PeerId(1),
        )
    }

    #[test]
    fn a_published_entry_reads_back_and_is_found_by_name() {
        let mut buf = vec![0u64; (1 << 20) / 8];
        let (mem, layout) = region(&mut buf);
        let mut ix = crate::index::HostIndex::new(&layout);
        ix.insert(&mem, &layout, name_hash(b"name"), ObjectSlot(2))
            .expect("index");
        let mut e = good(&layout);
        e.name_off = 128;
        publish_named(&mem, &layout, ObjectSlot(2), &e, b"name").expect("publish");
        let info = read_object(&mem, &layout, ObjectSlot(2))
            .expect("valid")
            .expect("live");
        assert_eq!(
            (info.slot, info.name(), info.size),
            (ObjectSlot(2), Some("name"), 10)
        );
        assert_eq!(
            find_by_name(&mem, &layout, "name")
                .expect("scan")
                .map(|i| i.slot),
            Some(ObjectSlot(2))
        );
        assert_eq!(find_by_name(&mem, &layout, "Name").expect("scan"), None);
        assert_eq!(namespace_seq(&mem), Ok(1));
    }

    /// An open reads the name once, when it looks the object up; the re-read after its
    /// hold compares the generation instead. That re-read still validates the head (an
    /// `ObjectHead`: it has no name to be empty or stale).
    #[test]
    fn a_holders_read_validates_the_head_but_not_the_name() {
        let mut buf = vec![0u64; (1 << 20) / 8];
        let (mem, layout) = region(&mut buf);
        let mut e = good(&layout);
        e.name_off = 128;
        publish_named(&mem, &layout, ObjectSlot(1), &e, b"name").expect("publish");
        let full = read_object(&mem, &layout, ObjectSlot(1))
            .expect("valid")
            .expect("live");
        let held = read_held_object(&mem, &layout, ObjectSlot(1))
            .expect("valid")
            .expect("live");
        assert_eq!(held, full.head(), "the same head as the lookup's");
        // A scribbled name byte: the lookup refuses the entry (its hash no longer
        // matches), the holder's read, which does not use the name, does not.
        let at = layout.name_area + 128;
        let word = mem.load_u64(at, Ordering::Relaxed).expect("in bounds");
        mem.store_u64(at, word ^ 0xFF, Ordering::Relaxed)
            .expect("in bounds");
        assert!(read_object(&mem, &layout, ObjectSlot(1)).is_err());
        assert_eq!(find_by_name(&mem, &layout, "name").expect("look"), None);
        assert!(read_held_object(&mem, &layout, ObjectSlot(1)).is_ok());
        // A scribbled head is refused by both.
        let base = layout.object_entry(ObjectSlot(1)).expect("slot");
        mem.store_u32(base + OBJ_STATE_OFF, 9, Ordering::Relaxed)
            .expect("in bounds");
        assert_eq!(
            read_held_object(&mem, &layout, ObjectSlot(1)),
            Err(EntryError::BadState { state: 9 })
        );
    }

    #[test]
    fn corrupt_entries_are_rejected_with_the_field_at_fault() {
        let mut buf = vec![0u64; (1 << 20) / 8];
        let (_mem, layout) = region(&mut buf);
        let g = good(&layout);
        let check = |e: ObjectEntry| validate(&layout, ObjectSlot(0), &Snapshot::of(e, b"name"));
        assert!(check(g).is_ok());
        let mut e = g;
        e.state = 9;
        assert_eq!(check(e), Err(EntryError::BadState { state: 9 }));
        let mut e = g;
        e.kind = 0;
        assert_eq!(check(e), Err(EntryError::BadKind { kind: 0 }));
        let range = |e: ObjectEntry, problem| {
            Err(EntryError::BadRange {
                offset: e.offset,
                size: e.size,
                max_size: e.max_size,
                problem,
            })
        };
        let mut e = g;
        e.offset = 0; // the header, not the heap
        assert_eq!(
            check(e),
            range(
                e,
                RangeProblem::BeforeHeap {
                    heap_offset: layout.heap_offset
                }
            )
        );
        let mut e = g;
        e.max_size = u64::MAX;
        assert_eq!(check(e), range(e, RangeProblem::Overflow));
        let mut e = g;
        e.max_size = 1 << 20;
        assert_eq!(
            check(e),
            range(
                e,
                RangeProblem::BeyondHeap {
                    region_end: 1 << 20
                }
            )
        );
        let mut e = g;
        e.size = e.max_size + 1;
        assert_eq!(check(e), range(e, RangeProblem::SizeOverMax));
        let mut e = g;
        e.max_size = 0;
        e.size = 0;
        assert_eq!(check(e), range(e, RangeProblem::ZeroMaxSize));
        let mut e = g;
        e.offset += 1;
        assert_eq!(
            check(e),
            range(e, RangeProblem::Misaligned { alignment: 4096 }),
            "misaligned"
        );
        let mut e = g;
        e.name_len = 5000;
        assert_eq!(
            check(e),
            Err(EntryError::BadNameRef {
                name_off: 0,
                name_len: 5000,
                problem: NameRefProblem::TooLong
            })
        );
        let mut e = g;
        e.name_hash = name_hash(b"n\\me");
        assert_eq!(
            validate(&layout, ObjectSlot(0), &Snapshot::of(e, b"n\\me")),
            Err(EntryError::BadName {
                name_len: 4,
                error: NameError::Backslash { at: 1 }
            })
        );
        let mut e = g;
        e.name_hash ^= 1;
        assert_eq!(
            check(e),
            Err(EntryError::BadNameHash {
                name_len: 4,
                stored: name_hash(b"name") ^ 1,
                computed: name_hash(b"name"),
            })
        );
        let mut e = g;
        e.flags = 0x82;
        assert_eq!(
            check(e),
            Err(EntryError::UnknownFlags {
                flags: 0x82,
                unknown: 0x80
            })
        );
        let mut e = g;
        e.flags = 0; // says unnamed but has a name length
        assert_eq!(
            check(e),
            Err(EntryError::NamedMismatch {
                flags: 0,
                name_len: 4
            })
        );
    }

    #[test]
    fn entry_errors_describe_the_values_found() {
        let text = |e: EntryError| e.to_string();
        assert_eq!(
            text(EntryError::BadState { state: 9 }),
            "state 9 is not FREE (0), LIVE (1) or UNLINKED (2)"
        );
        assert_eq!(
            text(EntryError::BadRange {
                offset: 0x10_0000,
                size: 0,
                max_size: 4096,
                problem: RangeProblem::BeyondHeap {
                    region_end: 0x10_0000
                },
            }),
            "range [0x100000, 0x101000) ends beyond the heap (region end 0x100000)"
        );
        assert_eq!(
            text(EntryError::NamedMismatch {
                flags: 2,
                name_len: 0
            }),
            "NAMED is set but name_len is 0"
        );
        assert_eq!(
            text(EntryError::BadName {
                name_len: 3,
                error: NameError::Nul { at: 1 }
            }),
            "object name of 3 bytes is invalid: the name contains a NUL at byte 1"
        );
    }

    #[test]
    fn a_reader_gives_up_on_an_entry_held_odd_forever() {
        let mut buf = vec![0u64; (1 << 20) / 8];
        let (mem, layout) = region(&mut buf);
        let mut ix = crate::index::HostIndex::new(&layout);
        ix.insert(&mem, &layout, name_hash(b"name"), ObjectSlot(1))
            .expect("index");
        let mut e = good(&layout);
        e.name_off = 64;
        publish_named(&mem, &layout, ObjectSlot(1), &e, b"name").expect("publish");
        let base = layout.object_entry(ObjectSlot(1)).expect("slot");
        mem.store_u64(base + OBJ_SEQ_OFF, 7, Ordering::SeqCst)
            .expect("odd seq");
        assert_eq!(
            snapshot(&mem, &layout, ObjectSlot(1), true),
            Err(EntryError::Busy)
        );
        assert_eq!(
            find_by_name(&mem, &layout, "name"),
            Err(EntryError::Busy),
            "skipped, not hung, and reported as busy rather than not found"
        );
        assert_eq!(
            find_by_name(&mem, &layout, "other"),
            Ok(None),
            "through the index, a busy entry of another name is not a candidate"
        );
        assert_eq!(
            scan_by_name(&mem, &layout, "other"),
            Err(EntryError::Busy),
            "the scan meets it and cannot tell"
        );
        // The host's next publication recovers from any odd value.
        publish(&mem, &layout, ObjectSlot(1), &e).expect("publish");
        assert!(read_object(&mem, &layout, ObjectSlot(1))
            .expect("valid")
            .is_some());
    }

    #[test]
    fn a_name_reference_outside_the_area_misaligned_or_too_long_is_refused() {
        let mut buf = vec![0u64; (1 << 20) / 8];
        let (_mem, layout) = region(&mut buf);
        assert_eq!(layout.name_area_size, 4 * 64);
        // A reader accepts the area and the padding after it, up to the heap.
        let span = layout.name_span();
        assert!(span >= layout.name_area_size && span % 8 == 0, "{span}");
        let span32 = u32::try_from(span).expect("small");
        let mut e = good(&layout);
        let check = |e: ObjectEntry| validate(&layout, ObjectSlot(0), &Snapshot::of(e, b"name"));
        let bad = |e: ObjectEntry, problem| {
            Err(EntryError::BadNameRef {
                name_off: e.name_off,
                name_len: u32::from(e.name_len),
                problem,
            })
        };
        // The last granule before the heap holds a 4-byte name; one granule further does not.
        e.name_off = 250;
        assert_eq!(check(e), bad(e, NameRefProblem::Misaligned));
        e.name_off = span32 - 8;
        assert!(check(e).is_ok(), "ends exactly where the heap begins");
        e.name_off = span32;
        assert_eq!(
            check(e),
            bad(e, NameRefProblem::OutsideArea { area_size: span })
        );
        e.name_off = 0xFFFF_FFF8;
        assert_eq!(
            check(e),
            bad(e, NameRefProblem::OutsideArea { area_size: span }),
            "no overflow: checked arithmetic"
        );
        // A reader that took a superblock whose `name_area_size` a peer had scribbled
        // smaller (the heap does not move: the padding absorbs it) still accepts every name
        // the host placed.
        let mut shrunk = layout;
        shrunk.name_area_size = 0;
        e.name_off = 248;
        assert!(
            validate(&shrunk, ObjectSlot(0), &Snapshot::of(e, b"name")).is_ok(),
            "a name in the area is found whatever name_area_size says"
        );
        e.name_off = 0;
        e.name_len = 1041;
        assert_eq!(check(e), bad(e, NameRefProblem::TooLong));
        let mut e = zeroed::<ObjectEntry>();
        e.state = object_state::LIVE;
        e.kind = kind::EVENT;
        e.name_off = 8;
        assert_eq!(
            validate(&layout, ObjectSlot(0), &Snapshot::of(e, b"")),
            bad(e, NameRefProblem::UnnamedWithOffset)
        );
    }

    #[test]
    fn a_snapshot_never_reads_outside_the_name_area_whatever_the_reference_says() {
        let mut buf = vec![0u64; (1 << 20) / 8];
        let (mem, layout) = region(&mut buf);
        let mut e = good(&layout);
        e.name_off = 64;
        publish_named(&mem, &layout, ObjectSlot(1), &e, b"name").expect("publish");
        // A scribbler points the reference past the area (past its end, where it wrote
        // the same bytes past it): the snapshot copies nothing and the validator refuses it.
        let base = layout.object_entry(ObjectSlot(1)).expect("slot");
        let at = layout.name_span() + 8;
        mem.write_bytes(layout.name_area + at, b"name")
            .expect("heap");
        mem.store_u32(
            base + 60,
            u32::try_from(at).expect("small"),
            Ordering::SeqCst,
        )
        .expect("scribble");
        let snap = snapshot(&mem, &layout, ObjectSlot(1), true).expect("snapshot");
        assert_eq!(
            snap.name[..4],
            [0; 4],
            "nothing copied from outside the area"
        );
        assert!(matches!(
            validate(&layout, ObjectSlot(1), &snap),
            Err(EntryError::BadNameRef {
                problem: NameRefProblem::OutsideArea { .. },
                ..
            })
        ));
        assert_eq!(find_by_name(&mem, &layout, "name"), Ok(None));
    }

    #[test]
    fn publish_named_refuses_a_name_that_does_not_fit_its_reference_and_writes_nothing() {
        let mut buf = vec![0u64; (1 << 20) / 8];
        let (mem, layout) = region(&mut buf);
        let mut e = good(&layout);
        e.name_off = 256; // the area is 256 bytes
        assert!(publish_named(&mem, &layout, ObjectSlot(1), &e, b"name").is_err());
        e.name_off = 0;
        assert!(publish_named(&mem, &layout, ObjectSlot(1), &e, b"other").is_err());
        assert_eq!(namespace_seq(&mem), Ok(0), "nothing published");
        assert_eq!(state(&mem, &layout, ObjectSlot(1)), Ok(object_state::FREE));
    }
}
