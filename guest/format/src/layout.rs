//! Byte-exact layout of the shared region (docs/FORMAT.md is the prose version of this file).
//!
//! All structures are `#[repr(C)]`, little-endian, fixed width, and hold offsets, never
//! pointers. They are never overlaid on shared memory: readers copy them out with volatile
//! reads (see [`crate::shm`]) and validate the copy; atomically accessed fields are reached
//! through their byte offsets (the `*_OFF` constants).

use core::mem::{offset_of, size_of};

/// `b"VSHMAREA"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VSHMAREA");
/// The format version this crate reads and writes. Written last by the backend.
pub const FORMAT_VERSION: u32 = 1;

/// Longest name, in Unicode scalar values (Rtk: 260 characters).
pub const MAX_NAME_CHARS: usize = 260;
/// Name storage in bytes: 260 characters of at most 4 UTF-8 bytes each.
pub const MAX_NAME_BYTES: usize = MAX_NAME_CHARS * 4;

/// The backend's own ivshmem peer id. Clients ring it at `(HOST_PEER_ID << 16) | vector`.
pub const HOST_PEER_ID: u16 = 0;
/// Highest number of client peers one region supports: one bit each in a lease word.
pub const MAX_PEERS_LIMIT: u32 = 62;
/// Highest number of objects one region supports (keeps the header a few MiB at most).
pub const MAX_OBJECTS_LIMIT: u32 = 65_536;
/// Heap allocations and the header are aligned to at least this.
pub const MIN_ALIGNMENT: u64 = 4096;
/// Smallest region vshmd creates (header + some heap).
pub const MIN_REGION_SIZE: u64 = 1 << 20;
/// Doorbell vector a client rings to make the host look at its mailbox (and sweep closed
/// objects). Also the vector the host rings on a client when a response is ready.
pub const VECTOR_CONTROL: u16 = 0;

/// `usize` → `u32` for compile-time sizes and offsets; fails the build instead of truncating.
#[allow(clippy::cast_possible_truncation)] // checked by the assert
pub const fn const_u32(n: usize) -> u32 {
    assert!(n <= u32::MAX as usize);
    n as u32
}

/// `u64` offset → `usize` index into a local copy of a structure; offsets here are < 4 KiB.
#[allow(clippy::cast_possible_truncation)] // checked by the assert
pub const fn const_usize(n: u64) -> usize {
    assert!(n <= 1 << 20);
    n as usize
}

/// Superblock at offset 0 of the region, written by the host only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`FORMAT_VERSION`]; 0 while the backend is still writing the header. Written last.
    pub version: u32,
    /// Reserved, 0.
    pub flags: u32,
    /// Size of the whole region (power of two).
    pub region_size: u64,
    /// Changes every time a backend (re)initialises the region.
    pub backend_epoch: u64,
    /// Random identity of this region, to pick among several ivshmem devices.
    pub region_id: [u8; 16],
    /// Client peer slots (peers attached at once).
    pub max_peers: u32,
    /// Object table entries.
    pub max_objects: u32,
    /// The host's peer id ([`HOST_PEER_ID`]).
    pub host_peer_id: u32,
    /// Interrupt vectors per peer (the QEMU `vectors=` property).
    pub vectors: u32,
    /// Offset of the peer table.
    pub peer_table_offset: u64,
    /// Offset of the object table.
    pub object_table_offset: u64,
    /// Offset of the refcount rows (one per peer slot).
    pub refcount_table_offset: u64,
    /// Offset of the mailboxes (one per peer slot).
    pub mailbox_table_offset: u64,
    /// Offset of the data heap.
    pub heap_offset: u64,
    /// Size of the data heap.
    pub heap_size: u64,
    /// Heap allocation granularity (the memfd's page size, ≥ 4096).
    pub alignment: u64,
    /// Stride of a peer entry ([`PeerEntry`] size).
    pub peer_entry_size: u32,
    /// Stride of an object entry ([`ObjectEntry`] size).
    pub object_entry_size: u32,
    /// Stride of a refcount row (max_objects × 4, rounded up to 64).
    pub refcount_row_size: u32,
    /// Stride of a mailbox ([`Mailbox`] size).
    pub mailbox_size: u32,
    /// Bumped by the host after every change to the peer or object table.
    pub namespace_seq: u64,
    /// Reserved, 0.
    pub reserved: [u8; 112],
}

/// Offset of [`Superblock::version`].
pub const SB_VERSION_OFF: u64 = offset_of!(Superblock, version) as u64;
/// Offset of [`Superblock::namespace_seq`].
pub const SB_NAMESPACE_SEQ_OFF: u64 = offset_of!(Superblock, namespace_seq) as u64;

const _: () = assert!(size_of::<Superblock>() == 256);
const _: () = assert!(offset_of!(Superblock, version) == 8);
const _: () = assert!(offset_of!(Superblock, region_size) == 16);
const _: () = assert!(offset_of!(Superblock, region_id) == 32);
const _: () = assert!(offset_of!(Superblock, max_peers) == 48);
const _: () = assert!(offset_of!(Superblock, peer_table_offset) == 64);
const _: () = assert!(offset_of!(Superblock, heap_offset) == 96);
const _: () = assert!(offset_of!(Superblock, alignment) == 112);
const _: () = assert!(offset_of!(Superblock, peer_entry_size) == 120);
const _: () = assert!(offset_of!(Superblock, namespace_seq) == 136);

/// Peer table entry states.
pub mod peer_state {
    /// Slot unused.
    pub const ABSENT: u32 = 0;
    /// A client holds this peer id.
    pub const CONNECTED: u32 = 1;
}

/// One peer table entry, host-written. The index is the peer's *slot* (its refcount row,
/// mailbox and holder bit); the ivshmem peer id is in the entry. Ids are never reused while
/// a QEMU may remember the old one (the server counts up), so slot ≠ id in general.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// [`peer_state`]; written last on connect, first on disconnect.
    pub state: u32,
    /// The ivshmem peer id (1..=65535) holding this slot.
    pub peer_id: u32,
    /// Counts connections in this slot; changes every time the id is handed out again.
    pub incarnation: u64,
    /// Reserved, 0.
    pub reserved: [u8; 48],
}
const _: () = assert!(size_of::<PeerEntry>() == 64);
/// Offset of [`PeerEntry::state`].
pub const PEER_STATE_OFF: u64 = offset_of!(PeerEntry, state) as u64;
/// Offset of [`PeerEntry::peer_id`].
pub const PEER_ID_OFF: u64 = offset_of!(PeerEntry, peer_id) as u64;
/// Offset of [`PeerEntry::incarnation`].
pub const PEER_INCARNATION_OFF: u64 = offset_of!(PeerEntry, incarnation) as u64;

/// Object entry states (host-written).
pub mod object_state {
    /// Unused slot.
    pub const FREE: u32 = 0;
    /// Visible in the namespace.
    pub const LIVE: u32 = 1;
    /// Deleted: gone from the namespace, memory kept until the last handle closes.
    pub const UNLINKED: u32 = 2;
}

/// Object kinds sharing one namespace. Only sections exist in format version 1; the others
/// are reserved so that a name can never be two kinds of object.
pub mod kind {
    /// A shared-memory section.
    pub const SECTION: u32 = 1;
    /// An event (reserved).
    pub const EVENT: u32 = 2;
    /// A robust mutex (reserved).
    pub const MUTEX: u32 = 3;
}

/// Object flags.
pub mod object_flags {
    /// Lives until deleted, not until its last handle closes.
    pub const PERSISTENT: u32 = 1;
    /// Has a name (unnamed objects cannot be found by lookup).
    pub const NAMED: u32 = 2;
}

/// The lease word: the only object-table field peers write. Bit i = peer slot i holds at
/// least one handle; [`LEASE_KEEP`] keeps a persistent object alive with no holders;
/// [`LEASE_CLOSED`] is set exactly once, by whoever observes "no holders and no KEEP", and is
/// final for that generation. See docs/FORMAT.md, "Open and close without the host".
pub mod lease {
    /// Final: the object is dead, nobody may take a new hold.
    pub const LEASE_CLOSED: u64 = 1 << 63;
    /// Persistent and not deleted.
    pub const LEASE_KEEP: u64 = 1 << 62;
    /// Holder bits.
    pub const LEASE_HOLDERS: u64 = LEASE_KEEP - 1;

    /// The holder bit of a peer slot (slot < 62).
    pub const fn holder_bit(slot: u32) -> u64 {
        1u64 << slot
    }
}
pub use lease::{holder_bit, LEASE_CLOSED, LEASE_HOLDERS, LEASE_KEEP};

/// One object table entry.
///
/// The first cache line is host-written and guarded by `seq` (a seqlock: odd while the
/// host writes). The second line holds only the peer-written lease word, so lease traffic
/// does not bounce the line readers snapshot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectEntry {
    /// Seqlock counter, odd while the host is updating this entry.
    pub seq: u64,
    /// Generation: changes every time this slot holds a new object. Handles carry it.
    pub generation: u64,
    /// [`object_state`].
    pub state: u32,
    /// [`kind`].
    pub kind: u32,
    /// Region offset of the object's memory (inside the heap, aligned).
    pub offset: u64,
    /// Current size (grows up to `max_size`, never moves).
    pub size: u64,
    /// Reserved size.
    pub max_size: u64,
    /// [`object_flags`].
    pub flags: u32,
    /// Name length in bytes (0 for unnamed).
    pub name_len: u32,
    /// [`crate::name_hash`] of the name bytes.
    pub name_hash: u32,
    /// Peer id that created the object (0 = the host).
    pub creator: u32,
    /// The lease word ([`lease`]), peer-written with atomics.
    pub lease: u64,
    /// Reserved, 0.
    pub reserved1: [u8; 56],
    /// UTF-8 name, `name_len` bytes used, the rest zero.
    pub name: [u8; MAX_NAME_BYTES],
    /// Reserved, 0.
    pub reserved2: [u8; 112],
}
const _: () = assert!(size_of::<ObjectEntry>() == 1280);
const _: () = assert!(offset_of!(ObjectEntry, generation) == 8);
const _: () = assert!(offset_of!(ObjectEntry, state) == 16);
const _: () = assert!(offset_of!(ObjectEntry, offset) == 24);
const _: () = assert!(offset_of!(ObjectEntry, flags) == 48);
const _: () = assert!(offset_of!(ObjectEntry, creator) == 60);
const _: () = assert!(offset_of!(ObjectEntry, lease) == 64);
const _: () = assert!(offset_of!(ObjectEntry, name) == 128);
/// Offset of [`ObjectEntry::seq`].
pub const OBJ_SEQ_OFF: u64 = offset_of!(ObjectEntry, seq) as u64;
/// Offset of [`ObjectEntry::generation`].
pub const OBJ_GENERATION_OFF: u64 = offset_of!(ObjectEntry, generation) as u64;
/// Offset of [`ObjectEntry::state`].
pub const OBJ_STATE_OFF: u64 = offset_of!(ObjectEntry, state) as u64;
/// Offset of [`ObjectEntry::size`].
pub const OBJ_SIZE_OFF: u64 = offset_of!(ObjectEntry, size) as u64;
/// Offset of [`ObjectEntry::lease`].
pub const OBJ_LEASE_OFF: u64 = offset_of!(ObjectEntry, lease) as u64;
/// Offset of [`ObjectEntry::name`].
pub const OBJ_NAME_OFF: u64 = offset_of!(ObjectEntry, name) as u64;
/// Bytes of the host-written part a seqlock snapshot copies (everything before the lease).
pub const OBJ_HEAD_LEN: usize = offset_of!(ObjectEntry, lease);

/// Refcount cell (u32, one per object per peer, written only by its peer): bits 0..30 count
/// this peer's handles; bit 31 is the peer's own transition lock, held while it changes its
/// holder bit (0 ↔ 1 handles).
pub mod refcell {
    /// The peer-local transition lock.
    pub const REF_LOCK: u32 = 1 << 31;
    /// The handle count.
    pub const REF_COUNT: u32 = REF_LOCK - 1;
}

/// Mailbox operations.
pub mod op {
    /// Create (or open if the name exists) an object.
    pub const CREATE: u32 = 1;
    /// Delete: remove the name now, free the memory at the last close.
    pub const DELETE: u32 = 2;
    /// Grow a section's size up to its max size.
    pub const GROW: u32 = 3;
}

/// A request a peer writes into its own mailbox. `req_seq` is written last (release); the
/// host copies the whole request out, then validates it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Bumped by the peer to post a request (written last).
    pub req_seq: u64,
    /// Peer-local lock serialising the peer's own threads on this mailbox (host ignores it).
    pub lock: u32,
    /// [`op`].
    pub op: u32,
    /// [`object_flags`] for CREATE.
    pub flags: u32,
    /// [`kind`] for CREATE.
    pub kind: u32,
    /// Object slot for DELETE / GROW.
    pub slot: u32,
    /// Name length in bytes for CREATE (0 = unnamed).
    pub name_len: u32,
    /// Object generation for DELETE / GROW.
    pub generation: u64,
    /// Max size for CREATE.
    pub max_size: u64,
    /// Initial size for CREATE, new size for GROW.
    pub size: u64,
    /// Reserved, 0.
    pub reserved1: [u8; 72],
    /// Name bytes for CREATE.
    pub name: [u8; MAX_NAME_BYTES],
    /// Reserved, 0.
    pub reserved2: [u8; 112],
}
const _: () = assert!(size_of::<Request>() == 1280);
const _: () = assert!(offset_of!(Request, lock) == 8);
const _: () = assert!(offset_of!(Request, op) == 12);
const _: () = assert!(offset_of!(Request, slot) == 24);
const _: () = assert!(offset_of!(Request, generation) == 32);
const _: () = assert!(offset_of!(Request, size) == 48);
const _: () = assert!(offset_of!(Request, name) == 128);

/// The host's answer, in the same mailbox. `resp_seq` is written last (release) and equals
/// the `req_seq` it answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// Copy of the answered `req_seq` (written last).
    pub resp_seq: u64,
    /// NTSTATUS ([`crate::Status`]).
    pub status: u32,
    /// Object slot.
    pub slot: u32,
    /// Object generation.
    pub generation: u64,
    /// Region offset of the object's memory.
    pub offset: u64,
    /// Current size.
    pub size: u64,
    /// Max size.
    pub max_size: u64,
    /// Reserved, 0.
    pub reserved: [u8; 720],
}
const _: () = assert!(size_of::<Response>() == 768);
const _: () = assert!(offset_of!(Response, generation) == 16);
const _: () = assert!(offset_of!(Response, max_size) == 40);

/// One peer's mailbox: request (peer-written) then response (host-written).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// Peer-written.
    pub request: Request,
    /// Host-written.
    pub response: Response,
}
const _: () = assert!(size_of::<Mailbox>() == 2048);
/// Offset of the request's `req_seq` in a mailbox.
pub const MB_REQ_SEQ_OFF: u64 = 0;
/// Offset of the request's peer-local `lock` in a mailbox.
pub const MB_LOCK_OFF: u64 = offset_of!(Request, lock) as u64;
/// Offset of the response in a mailbox.
pub const MB_RESPONSE_OFF: u64 = offset_of!(Mailbox, response) as u64;
/// Offset of the response's `resp_seq` in a mailbox.
pub const MB_RESP_SEQ_OFF: u64 = MB_RESPONSE_OFF;

/// Why a region or its superblock cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The magic is not [`MAGIC`].
    BadMagic(u64),
    /// The backend has not published the header yet (version 0).
    NotReady,
    /// A version this reader does not understand.
    UnsupportedVersion(u32),
    /// The superblock's region size does not match the mapping (superblock, mapped).
    SizeMismatch(u64, u64),
    /// Region size is not a power of two, or too small.
    BadRegionSize(u64),
    /// max_peers outside 1..=62.
    BadMaxPeers(u32),
    /// max_objects outside 1..=65536.
    BadMaxObjects(u32),
    /// Alignment not a power of two ≥ 4096.
    BadAlignment(u64),
    /// vectors outside 1..=64.
    BadVectors(u32),
    /// A table stride differs from this version's structure size (which table, value).
    BadStride(&'static str, u32),
    /// A table is misplaced: out of bounds, misaligned or overlapping (which table, offset).
    BadTable(&'static str, u64),
    /// The region is too small for the header plus one heap page (needed, available).
    TooSmall(u64, u64),
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            LayoutError::BadMagic(m) => write!(f, "bad magic {m:#018x}"),
            LayoutError::NotReady => write!(f, "region header not published yet"),
            LayoutError::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            LayoutError::SizeMismatch(s, m) => {
                write!(f, "superblock says {s} bytes but {m} are mapped")
            }
            LayoutError::BadRegionSize(s) => {
                write!(
                    f,
                    "region size {s} is not a power of two ≥ {MIN_REGION_SIZE}"
                )
            }
            LayoutError::BadMaxPeers(n) => {
                write!(f, "max peers {n} outside 1..={MAX_PEERS_LIMIT}")
            }
            LayoutError::BadMaxObjects(n) => {
                write!(f, "max objects {n} outside 1..={MAX_OBJECTS_LIMIT}")
            }
            LayoutError::BadAlignment(a) => write!(f, "alignment {a} is not a power of two ≥ 4096"),
            LayoutError::BadVectors(v) => write!(f, "vectors {v} outside 1..=64"),
            LayoutError::BadStride(t, v) => write!(f, "{t} stride {v} does not match format"),
            LayoutError::BadTable(t, o) => write!(f, "{t} at offset {o:#x} is misplaced"),
            LayoutError::TooSmall(n, a) => {
                write!(
                    f,
                    "region needs at least {n} bytes for its header and heap, has {a}"
                )
            }
        }
    }
}

/// Where everything is, computed from the parameters (host) or validated from a superblock
/// (everyone else). All offsets are region offsets; every accessor does checked arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Whole region size.
    pub region_size: u64,
    /// Client peer slots.
    pub max_peers: u32,
    /// Object slots.
    pub max_objects: u32,
    /// Vectors per peer.
    pub vectors: u32,
    /// Heap granularity.
    pub alignment: u64,
    /// Peer table offset.
    pub peer_table: u64,
    /// Object table offset.
    pub object_table: u64,
    /// Refcount rows offset.
    pub refcount_table: u64,
    /// Refcount row stride.
    pub refcount_row_size: u32,
    /// Mailboxes offset.
    pub mailbox_table: u64,
    /// Heap offset.
    pub heap_offset: u64,
    /// Heap size.
    pub heap_size: u64,
}

const fn round_up(v: u64, align: u64) -> Option<u64> {
    match v.checked_add(align - 1) {
        Some(x) => Some(x & !(align - 1)),
        None => None,
    }
}

impl Layout {
    /// Computes the layout the host publishes. Fails with the parameter at fault.
    pub fn compute(
        region_size: u64,
        max_peers: u32,
        max_objects: u32,
        vectors: u32,
        alignment: u64,
    ) -> Result<Layout, LayoutError> {
        if !region_size.is_power_of_two() || region_size < MIN_REGION_SIZE {
            return Err(LayoutError::BadRegionSize(region_size));
        }
        if max_peers == 0 || max_peers > MAX_PEERS_LIMIT {
            return Err(LayoutError::BadMaxPeers(max_peers));
        }
        if max_objects == 0 || max_objects > MAX_OBJECTS_LIMIT {
            return Err(LayoutError::BadMaxObjects(max_objects));
        }
        if vectors == 0 || vectors > 64 {
            return Err(LayoutError::BadVectors(vectors));
        }
        if !alignment.is_power_of_two() || alignment < MIN_ALIGNMENT {
            return Err(LayoutError::BadAlignment(alignment));
        }
        // With the limits above nothing here can overflow a u64; the arithmetic is
        // checked anyway so a future limit change cannot silently wrap.
        let too_big = LayoutError::TooSmall(u64::MAX, region_size);
        let peer_table = size_of::<Superblock>() as u64;
        let object_table = peer_table
            .checked_add(u64::from(max_peers) * size_of::<PeerEntry>() as u64)
            .and_then(|v| round_up(v, 64))
            .ok_or(too_big)?;
        let refcount_table = object_table
            .checked_add(u64::from(max_objects) * size_of::<ObjectEntry>() as u64)
            .ok_or(too_big)?;
        let row = round_up(u64::from(max_objects) * 4, 64).ok_or(too_big)?;
        let refcount_row_size = u32::try_from(row).map_err(|_| too_big)?;
        let mailbox_table = refcount_table
            .checked_add(u64::from(max_peers) * row)
            .and_then(|v| round_up(v, 64))
            .ok_or(too_big)?;
        let header_end = mailbox_table
            .checked_add(u64::from(max_peers) * size_of::<Mailbox>() as u64)
            .ok_or(too_big)?;
        let heap_offset = round_up(header_end, alignment).ok_or(too_big)?;
        let needed = heap_offset.checked_add(alignment).ok_or(too_big)?;
        if needed > region_size {
            return Err(LayoutError::TooSmall(needed, region_size));
        }
        Ok(Layout {
            region_size,
            max_peers,
            max_objects,
            vectors,
            alignment,
            peer_table,
            object_table,
            refcount_table,
            refcount_row_size,
            mailbox_table,
            heap_offset,
            heap_size: region_size - heap_offset,
        })
    }

    /// Validates a superblock copied out of a region of `mapped_size` bytes. The result is
    /// the layout the superblock would have been computed from: a superblock that merely
    /// claims sane-looking but inconsistent offsets is rejected.
    pub fn from_superblock(sb: &Superblock, mapped_size: u64) -> Result<Layout, LayoutError> {
        if sb.magic != MAGIC {
            return Err(LayoutError::BadMagic(sb.magic));
        }
        if sb.version == 0 {
            return Err(LayoutError::NotReady);
        }
        if sb.version != FORMAT_VERSION {
            return Err(LayoutError::UnsupportedVersion(sb.version));
        }
        if sb.region_size != mapped_size {
            return Err(LayoutError::SizeMismatch(sb.region_size, mapped_size));
        }
        if sb.peer_entry_size as usize != size_of::<PeerEntry>() {
            return Err(LayoutError::BadStride("peer table", sb.peer_entry_size));
        }
        if sb.object_entry_size as usize != size_of::<ObjectEntry>() {
            return Err(LayoutError::BadStride("object table", sb.object_entry_size));
        }
        if sb.mailbox_size as usize != size_of::<Mailbox>() {
            return Err(LayoutError::BadStride("mailbox table", sb.mailbox_size));
        }
        let l = Layout::compute(
            sb.region_size,
            sb.max_peers,
            sb.max_objects,
            sb.vectors,
            sb.alignment,
        )?;
        let checks: [(&'static str, u64, u64); 5] = [
            ("peer table", sb.peer_table_offset, l.peer_table),
            ("object table", sb.object_table_offset, l.object_table),
            ("refcount table", sb.refcount_table_offset, l.refcount_table),
            ("mailbox table", sb.mailbox_table_offset, l.mailbox_table),
            ("heap", sb.heap_offset, l.heap_offset),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(LayoutError::BadTable(what, got));
            }
        }
        if sb.refcount_row_size != l.refcount_row_size {
            return Err(LayoutError::BadStride(
                "refcount rows",
                sb.refcount_row_size,
            ));
        }
        if sb.heap_size != l.heap_size {
            return Err(LayoutError::BadTable("heap size", sb.heap_size));
        }
        Ok(l)
    }

    /// The superblock describing this layout, with version 0 (unpublished).
    pub fn superblock(&self, backend_epoch: u64, region_id: [u8; 16]) -> Superblock {
        Superblock {
            magic: MAGIC,
            version: 0,
            flags: 0,
            region_size: self.region_size,
            backend_epoch,
            region_id,
            max_peers: self.max_peers,
            max_objects: self.max_objects,
            host_peer_id: u32::from(HOST_PEER_ID),
            vectors: self.vectors,
            peer_table_offset: self.peer_table,
            object_table_offset: self.object_table,
            refcount_table_offset: self.refcount_table,
            mailbox_table_offset: self.mailbox_table,
            heap_offset: self.heap_offset,
            heap_size: self.heap_size,
            alignment: self.alignment,
            peer_entry_size: const_u32(size_of::<PeerEntry>()),
            object_entry_size: const_u32(size_of::<ObjectEntry>()),
            refcount_row_size: self.refcount_row_size,
            mailbox_size: const_u32(size_of::<Mailbox>()),
            namespace_seq: 0,
            reserved: [0; 112],
        }
    }

    /// Offset of peer entry `slot`, or `None` if out of range.
    pub fn peer_entry(&self, slot: u32) -> Option<u64> {
        (slot < self.max_peers)
            .then(|| self.peer_table + u64::from(slot) * size_of::<PeerEntry>() as u64)
    }

    /// Offset of object entry `slot`, or `None` if out of range.
    pub fn object_entry(&self, slot: u32) -> Option<u64> {
        (slot < self.max_objects)
            .then(|| self.object_table + u64::from(slot) * size_of::<ObjectEntry>() as u64)
    }

    /// Offset of the refcount cell of peer slot `peer` for object `slot`.
    pub fn refcount_cell(&self, peer: u32, slot: u32) -> Option<u64> {
        (peer < self.max_peers && slot < self.max_objects).then(|| {
            self.refcount_table
                + u64::from(peer) * u64::from(self.refcount_row_size)
                + u64::from(slot) * 4
        })
    }

    /// Offset of peer slot `peer`'s mailbox.
    pub fn mailbox(&self, peer: u32) -> Option<u64> {
        (peer < self.max_peers)
            .then(|| self.mailbox_table + u64::from(peer) * size_of::<Mailbox>() as u64)
    }

    /// Whether `[offset, offset+len)` lies inside the heap, with checked arithmetic.
    pub fn heap_contains(&self, offset: u64, len: u64) -> bool {
        match offset.checked_add(len) {
            Some(end) => offset >= self.heap_offset && end <= self.region_size,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_layout() -> Layout {
        Layout::compute(64 << 20, 32, 1024, 2, 4096).expect("valid parameters")
    }

    #[test]
    fn computed_tables_are_ordered_aligned_and_inside_the_region() {
        let l = default_layout();
        assert_eq!(l.peer_table, 256);
        assert!(l.object_table >= l.peer_table + 32 * 64);
        assert_eq!(l.object_table % 64, 0);
        assert!(l.refcount_table >= l.object_table + 1024 * 1280);
        assert!(l.mailbox_table >= l.refcount_table + 32 * 4096);
        assert_eq!(l.mailbox_table % 64, 0);
        assert_eq!(l.heap_offset % 4096, 0);
        assert!(l.heap_offset >= l.mailbox_table + 32 * 2048);
        assert_eq!(l.heap_offset + l.heap_size, 64 << 20);
    }

    #[test]
    fn superblock_round_trips_through_validation() {
        let l = default_layout();
        let mut sb = l.superblock(7, [1; 16]);
        assert_eq!(
            Layout::from_superblock(&sb, 64 << 20),
            Err(LayoutError::NotReady)
        );
        sb.version = FORMAT_VERSION;
        assert_eq!(Layout::from_superblock(&sb, 64 << 20), Ok(l));
    }

    #[test]
    fn corrupt_superblocks_are_rejected_with_the_field_at_fault() {
        let l = default_layout();
        let good = {
            let mut sb = l.superblock(7, [1; 16]);
            sb.version = FORMAT_VERSION;
            sb
        };
        let size = 64 << 20;
        let mut sb = good;
        sb.magic ^= 1;
        assert!(matches!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadMagic(_))
        ));
        let mut sb = good;
        sb.version = 99;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::UnsupportedVersion(99))
        );
        assert_eq!(
            Layout::from_superblock(&good, size / 2),
            Err(LayoutError::SizeMismatch(size, size / 2))
        );
        let mut sb = good;
        sb.max_peers = 63;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadMaxPeers(63))
        );
        let mut sb = good;
        sb.max_objects = u32::MAX;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadMaxObjects(u32::MAX))
        );
        let mut sb = good;
        sb.heap_offset = size - 16;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadTable("heap", size - 16))
        );
        let mut sb = good;
        sb.object_table_offset = 8;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadTable("object table", 8))
        );
        let mut sb = good;
        sb.object_entry_size = 64;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadStride("object table", 64))
        );
        let mut sb = good;
        sb.alignment = 4095;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadAlignment(4095))
        );
    }

    #[test]
    fn region_sizes_must_be_powers_of_two_and_fit_the_header() {
        assert_eq!(
            Layout::compute(3 << 20, 4, 16, 1, 4096),
            Err(LayoutError::BadRegionSize(3 << 20))
        );
        assert!(matches!(
            Layout::compute(1 << 20, 62, 65_536, 1, 4096),
            Err(LayoutError::TooSmall(_, _))
        ));
        assert!(Layout::compute(1 << 20, 4, 16, 1, 4096).is_ok());
    }

    #[test]
    fn table_accessors_refuse_out_of_range_indices() {
        let l = default_layout();
        assert!(l.object_entry(1023).is_some());
        assert_eq!(l.object_entry(1024), None);
        assert_eq!(l.peer_entry(32), None);
        assert_eq!(l.refcount_cell(0, 1024), None);
        assert_eq!(l.mailbox(32), None);
        assert!(!l.heap_contains(u64::MAX, 2));
        assert!(!l.heap_contains(0, 1));
        assert!(l.heap_contains(l.heap_offset, l.heap_size));
        assert!(!l.heap_contains(l.heap_offset, l.heap_size + 1));
    }
}
