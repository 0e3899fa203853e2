//! Byte-exact layout of the shared region (docs/FORMAT.md is the prose version of this file).
//!
//! All structures are `#[repr(C)]`, little-endian, fixed width, and hold offsets, never
//! pointers. They are never overlaid on shared memory: readers copy them out with volatile
//! reads (see [`crate::shm`]) and validate the copy; atomically accessed fields are reached
//! through their byte offsets (the `*_OFF` constants).
//!
//! The structures derive zerocopy's `FromBytes`/`IntoBytes`, which refuse to compile if a
//! field change introduces padding; the size and offset asserts below pin the exact layout.
//! Where the tables sit in a region of a given size ([`Layout`]) and why a superblock is
//! refused ([`LayoutError`]) live in the `placement` submodule, re-exported here.

use core::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

mod placement;
pub use placement::{default_name_area, Layout, LayoutError};

/// `b"VSHMAREA"` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"VSHMAREA");
/// The format version this crate reads and writes. Written last by the backend.
pub const FORMAT_VERSION: u32 = 4;

/// Longest name, in Unicode scalar values (Rtk: 260 characters).
pub const MAX_NAME_CHARS: usize = 260;
/// Name storage in bytes: 260 characters of at most 4 UTF-8 bytes each.
pub const MAX_NAME_BYTES: usize = MAX_NAME_CHARS * 4;
/// Name-area granule: every name starts at a multiple of this many bytes of the area and
/// takes its length rounded up to it (version 4).
pub const NAME_GRANULE: u64 = 8;
/// Default name-area bytes per object slot (the area is `max_objects` × this unless
/// configured): room for names averaging up to 64 bytes.
pub const DEFAULT_NAME_BYTES_PER_OBJECT: u64 = 64;
/// Largest name area: every object slot holding a name of [`MAX_NAME_BYTES`] bytes. Fits a
/// u32, so an entry's `name_off` can address all of it.
pub const MAX_NAME_AREA: u64 = MAX_OBJECTS_LIMIT as u64 * MAX_NAME_BYTES as u64;
const _: () = assert!(MAX_NAME_AREA <= u32::MAX as u64);
const _: () = assert!(MAX_NAME_AREA % NAME_GRANULE == 0);

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
/// Vector the host rings on a client to say "an object you asked to be woken for changed"
/// (an event was signalled, a mutex handed over, a section notified). Regions served with a
/// single vector use [`VECTOR_CONTROL`] for this too.
pub const VECTOR_WAKE: u16 = 1;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
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
    /// Bumped by the host each time it destroys an object whose memory it then holds in
    /// quarantine (§11a): a peer that sees it move checks the handles it holds and
    /// acknowledges in its mailbox (`Request::audited_seq`).
    pub revoke_seq: u64,
    /// How long (ms) the host keeps destroyed memory in quarantine at most when a peer
    /// does not acknowledge; a CREATE refused with `refusal::IN_QUARANTINE` may be retried
    /// for this long.
    pub quarantine_ms: u32,
    /// Reserved, 0.
    pub reserved0: u32,
    /// Offset of the name index ([`crate::index`]; version 3).
    pub index_offset: u64,
    /// Entries in the name index: [`crate::index::index_slots`] of `max_objects`.
    pub index_slots: u32,
    /// Stride of a name-index entry ([`crate::index::INDEX_ENTRY_SIZE`], 8).
    pub index_entry_size: u32,
    /// Offset of the name area (version 4): the bytes of every object's name, referenced
    /// by the entries' `name_off`.
    pub name_area_offset: u64,
    /// Size of the name area in bytes (a multiple of [`NAME_GRANULE`], at most
    /// [`MAX_NAME_AREA`]; may be 0: then no object can have a name).
    pub name_area_size: u64,
    /// Reserved, 0.
    pub reserved: [u8; 64],
}

/// Offset of [`Superblock::version`].
pub const SB_VERSION_OFF: u64 = offset_of!(Superblock, version) as u64;
/// Offset of [`Superblock::namespace_seq`].
pub const SB_NAMESPACE_SEQ_OFF: u64 = offset_of!(Superblock, namespace_seq) as u64;
/// Offset of [`Superblock::revoke_seq`].
pub const SB_REVOKE_SEQ_OFF: u64 = offset_of!(Superblock, revoke_seq) as u64;

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
const _: () = assert!(offset_of!(Superblock, revoke_seq) == 144);
const _: () = assert!(offset_of!(Superblock, quarantine_ms) == 152);
const _: () = assert!(offset_of!(Superblock, index_offset) == 160);
const _: () = assert!(offset_of!(Superblock, index_slots) == 168);
const _: () = assert!(offset_of!(Superblock, index_entry_size) == 172);
const _: () = assert!(offset_of!(Superblock, name_area_offset) == 176);
const _: () = assert!(offset_of!(Superblock, name_area_size) == 184);
const _: () = assert!(offset_of!(Superblock, reserved) == 192);

/// Peer table entry states.
pub mod peer_state {
    /// Slot unused.
    pub const ABSENT: u32 = 0;
    /// A client holds this peer id.
    pub const CONNECTED: u32 = 1;
}

/// Peer table entry flags.
pub mod peer_flags {
    /// The peer has ivshmem doorbells the other peers can ring directly (a client of the
    /// ivshmem socket, whose eventfds the host handed to every other client). Clear for a
    /// peer the host stands in for (vhost-user), which only the host can wake.
    pub const DOORBELL: u32 = 1;
}

/// One peer table entry, host-written. The index is the peer's *slot* (its refcount row,
/// mailbox and holder bit); the ivshmem peer id is in the entry. Ids are never reused while
/// a QEMU may remember the old one (the server counts up), so slot ≠ id in general.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PeerEntry {
    /// [`peer_state`]; written last on connect, first on disconnect.
    pub state: u32,
    /// The ivshmem peer id (1..=65535) holding this slot.
    pub peer_id: u32,
    /// Counts connections in this slot; changes every time the id is handed out again.
    pub incarnation: u64,
    /// [`peer_flags`].
    pub flags: u32,
    /// Reserved, 0.
    pub reserved: [u8; 44],
}
const _: () = assert!(size_of::<PeerEntry>() == 64);
const _: () = assert!(offset_of!(PeerEntry, flags) == 16);
/// Offset of [`PeerEntry::state`].
pub const PEER_STATE_OFF: u64 = offset_of!(PeerEntry, state) as u64;
/// Offset of [`PeerEntry::flags`].
pub const PEER_FLAGS_OFF: u64 = offset_of!(PeerEntry, flags) as u64;
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

/// Object kinds sharing one namespace: a name is never two kinds of object.
pub mod kind {
    /// A shared-memory section (memory in the heap).
    pub const SECTION: u32 = 1;
    /// An event (no memory: its state is the entry's sync words).
    pub const EVENT: u32 = 2;
    /// A robust mutex (no memory: its state is the entry's sync words).
    pub const MUTEX: u32 = 3;
}

/// Object flags.
pub mod object_flags {
    /// Lives until deleted, not until its last handle closes.
    pub const PERSISTENT: u32 = 1;
    /// Has a name (unnamed objects cannot be found by lookup).
    pub const NAMED: u32 = 2;
    /// EVENT only: stays signalled until reset (else a wait consumes the signal).
    pub const MANUAL_RESET: u32 = 4;
    /// Every flag this version defines.
    pub const ALL: u32 = PERSISTENT | NAMED | MANUAL_RESET;
}

/// The mutex owner word ([`ObjectEntry::sync`] of a MUTEX): 0 = free; else the owner's peer
/// slot + 1 in bits 0..8 and its token (a thread id) in bits 8..40, with [`HANDOFF`] set
/// while the host holds a queue of waiters (then only the host changes the owner).
pub mod mutex_word {
    use crate::ids::PeerSlot;

    /// Set by the host while waiters are queued: an unlock must go through the host.
    pub const HANDOFF: u64 = 1 << 63;
    /// Bits naming the owner (slot + 1, token).
    pub const OWNER: u64 = (1 << 40) - 1;

    /// The owner word for `token` (non-zero) of peer slot `slot`.
    pub const fn owner(slot: PeerSlot, token: u32) -> u64 {
        (slot.0 as u64 + 1) | ((token as u64) << 8)
    }

    /// The peer slot named by an owner word, `None` if free or malformed.
    pub const fn slot(word: u64) -> Option<PeerSlot> {
        let s = word & 0xFF;
        if s == 0 || s > 62 {
            None
        } else {
            Some(PeerSlot(s as u32 - 1))
        }
    }

    /// The token named by an owner word.
    #[allow(clippy::cast_possible_truncation)] // masked to 32 bits
    pub const fn token(word: u64) -> u32 {
        ((word >> 8) & 0xFFFF_FFFF) as u32
    }
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

    use crate::ids::PeerSlot;

    /// The holder bit of a peer slot (slot < 62).
    pub const fn holder_bit(slot: PeerSlot) -> u64 {
        1u64 << slot.0
    }
}
pub use lease::{holder_bit, LEASE_CLOSED, LEASE_HOLDERS, LEASE_KEEP};

/// One object table entry (128 bytes, two cache lines; version 4).
///
/// The first cache line is host-written and guarded by `seq` (a seqlock: odd while the
/// host writes). The second line holds only the peer-written lease and sync words, so lease
/// traffic does not bounce the line readers snapshot. The name is not in the entry: it is
/// `name_len` bytes at `name_off` in the name area (host-written, read under this entry's
/// seqlock, docs/FORMAT.md §5b).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
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
    /// Name length in bytes (0 for unnamed; at most [`MAX_NAME_BYTES`]).
    pub name_len: u16,
    /// Peer id that created the object (0 = the host).
    pub creator: u16,
    /// [`crate::name_hash`] of the name bytes.
    pub name_hash: u32,
    /// Offset of the name's bytes from the start of the name area (a multiple of
    /// [`NAME_GRANULE`]; 0 for unnamed).
    pub name_off: u32,
    /// The lease word ([`lease`]), peer-written with atomics.
    pub lease: u64,
    /// Sync word: bumped (fetch-add) by every signal, notify and unlock. Peer-written.
    pub signal_seq: u64,
    /// Sync word: bit i = peer slot i asked to be rung on the next change (set by the
    /// waiter before it re-checks; cleared by the host when it rings).
    pub waiters: u64,
    /// Sync word: EVENT 0/1 signalled; MUTEX the owner word ([`mutex_word`]); SECTION 0.
    pub sync: u64,
    /// Sync word: MUTEX 1 = its last owner died holding it (the next owner swaps it to 0
    /// and is told STATUS_ABANDONED).
    pub abandoned: u64,
    /// Reserved, 0.
    pub reserved: [u8; 24],
}
const _: () = assert!(size_of::<ObjectEntry>() == 128);
const _: () = assert!(offset_of!(ObjectEntry, generation) == 8);
const _: () = assert!(offset_of!(ObjectEntry, state) == 16);
const _: () = assert!(offset_of!(ObjectEntry, offset) == 24);
const _: () = assert!(offset_of!(ObjectEntry, flags) == 48);
const _: () = assert!(offset_of!(ObjectEntry, name_len) == 52);
const _: () = assert!(offset_of!(ObjectEntry, creator) == 54);
const _: () = assert!(offset_of!(ObjectEntry, name_hash) == 56);
const _: () = assert!(offset_of!(ObjectEntry, name_off) == 60);
const _: () = assert!(offset_of!(ObjectEntry, lease) == 64);
const _: () = assert!(offset_of!(ObjectEntry, signal_seq) == 72);
const _: () = assert!(offset_of!(ObjectEntry, waiters) == 80);
const _: () = assert!(offset_of!(ObjectEntry, sync) == 88);
const _: () = assert!(offset_of!(ObjectEntry, abandoned) == 96);
const _: () = assert!(offset_of!(ObjectEntry, reserved) == 104);
const _: () = assert!(MAX_NAME_BYTES <= u16::MAX as usize);
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
/// Offset of [`ObjectEntry::signal_seq`].
pub const OBJ_SIGNAL_SEQ_OFF: u64 = offset_of!(ObjectEntry, signal_seq) as u64;
/// Offset of [`ObjectEntry::waiters`].
pub const OBJ_WAITERS_OFF: u64 = offset_of!(ObjectEntry, waiters) as u64;
/// Offset of [`ObjectEntry::sync`].
pub const OBJ_SYNC_OFF: u64 = offset_of!(ObjectEntry, sync) as u64;
/// Offset of [`ObjectEntry::abandoned`].
pub const OBJ_ABANDONED_OFF: u64 = offset_of!(ObjectEntry, abandoned) as u64;
/// Offset of [`ObjectEntry::reserved`] (the lease and sync words end here).
pub const OBJ_RESERVED_OFF: u64 = offset_of!(ObjectEntry, reserved) as u64;
/// Bytes of the host-written part a seqlock snapshot copies (everything before the lease).
pub const OBJ_HEAD_LEN: usize = offset_of!(ObjectEntry, lease);

/// Refcount cell (u32, one per object per peer, written only by its peer). Unlocked (bit 31
/// clear), bits 0..30 count this peer's handles. Locked (bit 31 set), the peer is changing its
/// holder bit (0 ↔ 1 handles) and bits 0..30 are the lock owner's token, not a count: the
/// count is taken only at 0 and left at 0 or 1 by the unlock, so it needs no bits meanwhile.
pub mod refcell {
    /// The peer-local transition lock.
    pub const REF_LOCK: u32 = 1 << 31;
    /// The handle count (unlocked), or the lock owner's token (locked).
    pub const REF_COUNT: u32 = REF_LOCK - 1;

    /// The handle count an unlocked cell value says; `None` while it is locked (the low bits
    /// are then a token). A reader that wants a number counts a locked cell as 0, as an
    /// untagged lock always read: the owner's handle exists only once it unlocks at 1.
    pub const fn count(v: u32) -> Option<u32> {
        if v & REF_LOCK == 0 {
            Some(v & REF_COUNT)
        } else {
            None
        }
    }

    /// The token of the lock owner a locked cell value names (0: an untagged lock, whose
    /// owner is unknown); `None` if it is unlocked.
    pub const fn lock_owner(v: u32) -> Option<u32> {
        if v & REF_LOCK == 0 {
            None
        } else {
            Some(v & REF_COUNT)
        }
    }

    /// The locked cell value naming `token` (reduced to 31 bits; a token that reduces to 0
    /// names owner 1, which is never presumed dead by a sane liveness check).
    pub const fn locked_by(token: u32) -> u32 {
        let t = token & REF_COUNT;
        REF_LOCK | if t == 0 { 1 } else { t }
    }
}

/// Mailbox operations.
pub mod op {
    /// Create (or open if the name exists) an object.
    pub const CREATE: u32 = 1;
    /// Delete: remove the name now, free the memory at the last close.
    pub const DELETE: u32 = 2;
    /// Grow a section's size up to its max size.
    pub const GROW: u32 = 3;
    /// Ring the peers in an object's `waiters` word that hold it (after a signal, notify
    /// or unlock that found waiters).
    pub const WAKE: u32 = 4;
    /// Take a mutex through the host: granted at once (SUCCESS) or queued (PENDING).
    /// `size` carries the caller's token.
    pub const LOCK: u32 = 5;
    /// Release a mutex whose owner word has HANDOFF set: the host hands it to the next
    /// queued waiter. `size` carries the caller's token.
    pub const UNLOCK: u32 = 6;
    /// Leave a mutex's queue after a timeout. `size` carries the caller's token.
    pub const CANCEL: u32 = 7;
}

/// A request a peer writes into its own mailbox. `req_seq` is written last (release); the
/// host copies the whole request out, then validates it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
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
    /// Not part of a request: the highest `Superblock::revoke_seq` for which this peer
    /// has checked every handle it holds (§11a). Written by the peer whenever it likes,
    /// never by `post`; the host reads it to release quarantined memory.
    pub audited_seq: u64,
    /// Not part of a request: handles this peer found revoked (their object destroyed
    /// while it held them) so far, a running count the host reports (§11a).
    pub revoked_handles: u64,
    /// Not part of a request: which object the peer's last close that left it unheld was
    /// ([`CLOSED_HINT_MANY`] for several), so the host looks at that one alone (§9).
    pub closed_hint: u64,
    /// Reserved, 0.
    pub reserved2: [u8; 88],
}
const _: () = assert!(size_of::<Request>() == 1280);
const _: () = assert!(offset_of!(Request, closed_hint) == 1184);
/// Offset of the peer's close hint (`Request::closed_hint`) in its mailbox.
pub const MB_CLOSED_HINT_OFF: u64 = offset_of!(Request, closed_hint) as u64;
/// `closed_hint`: more than one close since the host last took the hint.
pub const CLOSED_HINT_MANY: u64 = u64::MAX;
const _: () = assert!(offset_of!(Request, audited_seq) == 1168);
/// Offset of the peer's audit word (`Request::audited_seq`) in its mailbox.
pub const MB_AUDITED_SEQ_OFF: u64 = offset_of!(Request, audited_seq) as u64;
/// Offset of the peer's revoked-handle count (`Request::revoked_handles`) in its mailbox.
pub const MB_REVOKED_OFF: u64 = offset_of!(Request, revoked_handles) as u64;
const _: () = assert!(offset_of!(Request, lock) == 8);
const _: () = assert!(offset_of!(Request, op) == 12);
const _: () = assert!(offset_of!(Request, slot) == 24);
const _: () = assert!(offset_of!(Request, generation) == 32);
const _: () = assert!(offset_of!(Request, size) == 48);
const _: () = assert!(offset_of!(Request, name) == 128);

/// The host's answer, in the same mailbox. `resp_seq` is written last (release) and equals
/// the `req_seq` it answers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
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
    /// Which limit refused the request ([`refusal`]); 0 unless `status` is
    /// STATUS_INSUFFICIENT_RESOURCES (readers ignore it with any other status).
    pub reason: u32,
    /// [`refusal::PREPARE_FAILED`]: the OS error number (errno), else 0.
    pub os_error: u32,
    /// The limit that was hit: the object table's size ([`refusal::OBJECT_TABLE_FULL`]),
    /// the largest free heap extent ([`refusal::NO_FREE_EXTENT`]), the heap's size
    /// ([`refusal::LARGER_THAN_HEAP`]); else 0.
    pub limit: u64,
    /// The bytes the request needed (`max_size` rounded up to the alignment; for
    /// [`refusal::LARGER_THAN_HEAP`] the requested `max_size`); 0 if it needed none.
    pub wanted: u64,
    /// Reserved, 0.
    pub reserved: [u8; 696],
}
const _: () = assert!(size_of::<Response>() == 768);
const _: () = assert!(offset_of!(Response, generation) == 16);
const _: () = assert!(offset_of!(Response, max_size) == 40);
const _: () = assert!(offset_of!(Response, reason) == 48);
const _: () = assert!(offset_of!(Response, os_error) == 52);
const _: () = assert!(offset_of!(Response, limit) == 56);
const _: () = assert!(offset_of!(Response, wanted) == 64);

/// `Response::reason`: which limit refused a CREATE (always with
/// STATUS_INSUFFICIENT_RESOURCES). Codes a reader does not know are shown as a number.
pub mod refusal {
    /// No reason given.
    pub const NONE: u32 = 0;
    /// Every object slot is taken; `limit` = the table's size.
    pub const OBJECT_TABLE_FULL: u32 = 1;
    /// No free heap extent is as large as `wanted`; `limit` = the largest free extent.
    pub const NO_FREE_EXTENT: u32 = 2;
    /// `wanted` (the requested `max_size`) is larger than the whole heap; `limit` = its size.
    pub const LARGER_THAN_HEAP: u32 = 3;
    /// The range could not be prepared (punched out of the memfd); `os_error` = errno.
    pub const PREPARE_FAILED: u32 = 4;
    /// The object entry could not be published.
    pub const PUBLISH_FAILED: u32 = 5;
    /// Enough memory is free but part of it is still in quarantine (§11a) until peers
    /// acknowledge or `Superblock::quarantine_ms` passes; `limit` = bytes in quarantine.
    /// Retrying later succeeds.
    pub const IN_QUARANTINE: u32 = 6;
    /// No free run of the name area (§5b) holds the name (version 4); `limit` = the largest
    /// free run, `wanted` = the name's length rounded up to the granule.
    pub const NAME_AREA_FULL: u32 = 7;
}

/// Why vshmd refused an ivshmem client (FORMAT.md §15): sent instead of the protocol
/// version as `-code`, followed by one message carrying a detail number, then the server
/// closes the connection. QEMU reports `server sent version -N` and gives up.
pub mod connect_refusal {
    /// `max_peers` clients are connected; detail = `max_peers`.
    pub const PEER_SLOTS_FULL: i64 = 1;
    /// No peer id is safe to hand out (every id is connected or fenced); detail = 0.
    pub const NO_SAFE_ID: i64 = 2;
    /// No free peer slot could be given out (the free ones are fenced while their old
    /// processes run, or could not be cleared); detail = `max_peers`.
    pub const NO_READY_SLOT: i64 = 3;
}

/// One peer's mailbox: request (peer-written) then response (host-written).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
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
