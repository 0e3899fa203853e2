//! Blocks inside a section: a buddy allocator whose whole state lives in the section it
//! manages (LSA AllocateSharedMemory / FreeSharedMemory). docs/FORMAT.md, "Blocks inside a
//! section", is the byte-exact spec; this module is its reference implementation.
//!
//! # Why a buddy allocator
//!
//! * **Bounded work, no scan.** Allocate and free are O(log n): one free list per order,
//!   split down on allocate, merge with the buddy on free. The buddy of a block is found by
//!   arithmetic (`offset ^ size`), never by searching.
//! * **Recoverable from the blocks alone.** The blocks always tile the arena: every step that
//!   changes the tiling (a split, a merge, marking a block used or free, growing the arena) is
//!   *one* atomic store of one block header, ordered so that the tiling before and after it is
//!   valid. The free lists and counters are derived data. A peer that dies holding the lock
//!   leaves at worst half-updated lists and counters; the peer that breaks its lock rebuilds
//!   them by walking the headers (O(n), on recovery only) and loses nothing.
//! * **Cheap validation of untrusted frees.** A block is at a known power-of-two alignment and
//!   its header carries a check value over (heap id, offset, header), so a forged, stale,
//!   misaligned or foreign offset is refused before anything is written.
//! * **Alignment for free.** A block of order k is aligned to 2^k; an alignment request
//!   becomes a block large enough to put the data at that alignment.
//!
//! The price is internal fragmentation (up to half a block) and that a block of 2^k bytes
//! needs a section of at least 2^(k+1) bytes (the allocator header occupies the first 512
//! bytes, so the first block of each order starts at 2^k). Segregated size classes would
//! waste less for small objects but need either a scan or per-page metadata to coalesce,
//! and their recovery is harder to prove.
//!
//! # Concurrency and death
//!
//! One lock word in the header (CAS), tagged with the taker's peer slot, the low 24 bits of
//! its incarnation and its token. A waiter may break the lock of a taker that the peer table
//! no longer shows attached with that incarnation (vshmd published that it is gone), or of a
//! taker in its own slot and incarnation whose token the caller's `token_alive` says is dead.
//! The breaker rebuilds the lists and counters before it uses them.
//!
//! Nothing here blocks: [`Heap::lock`] makes one attempt and says who holds the lock; the
//! caller waits (its transport) and retries. Growing the section is the caller's business
//! too: an allocation that does not fit says how large the section must become
//! ([`BlockError::NeedGrow`]) and fails with [`BlockError::NoMemory`] only when that is more
//! than the section's max size.

mod heap;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_attacks;

use core::sync::atomic::Ordering;

pub use heap::{Guard, Heap};

use crate::ids::{PeerSlot, RegionOffset};
use crate::layout::Layout;
use crate::peer::read_peer;
use crate::shm::{check_range, Fault, SharedMemory};
use crate::Status;

/// `"VSHMHEAP"`: the allocator is ready (written last by the initialiser).
pub const MAGIC: u64 = u64::from_le_bytes(*b"VSHMHEAP");
/// `"VSHMINIT"`: an initialiser holds the lock and is writing the header.
pub const MAGIC_INIT: u64 = u64::from_le_bytes(*b"VSHMINIT");
/// The allocator format version.
pub const VERSION: u32 = 1;
/// The allocator header at section offset 0; blocks start after it.
pub const HEADER_SIZE: u64 = 512;
/// The header at the start of every block; the data follows it.
pub const BLOCK_HEADER_SIZE: u64 = 16;
/// Smallest block: 32 bytes (header, and the two free-list links when free).
pub const MIN_ORDER: u32 = 5;
/// Largest block: 2^47 bytes.
pub const MAX_ORDER: u32 = 47;

/// Byte offsets of the allocator header fields (from the section's start).
pub mod hdr {
    /// u64 [`super::MAGIC`], written last (or [`super::MAGIC_INIT`] during initialisation).
    pub const MAGIC: u64 = 0;
    /// u32 [`super::VERSION`].
    pub const VERSION: u64 = 8;
    /// u32 header size (512).
    pub const HEADER_SIZE: u64 = 12;
    /// u64 heap id: non-zero, salts every block check value.
    pub const HEAP_ID: u64 = 16;
    /// u64 lock word ([`super::lock_word`]); 0 = free.
    pub const LOCK: u64 = 24;
    /// u64 arena end: the blocks tile `[512, covered)`.
    pub const COVERED: u64 = 32;
    /// u64 bytes of used blocks (whole blocks, headers included).
    pub const IN_USE: u64 = 40;
    /// u64 used blocks.
    pub const BLOCKS: u64 = 48;
    /// u64 bytes of free blocks.
    pub const FREE: u64 = 56;
    /// u64 used blocks tagged with an owner.
    pub const OWNED: u64 = 64;
    /// u64 peer-table fingerprint at the last sweep of owned blocks.
    pub const PEER_FP: u64 = 72;
    /// u64 broken locks (recoveries) so far.
    pub const RECOVERIES: u64 = 80;
    /// u64 owned blocks freed because their owner was gone.
    pub const RECLAIMED: u64 = 88;
    /// u64 free-list heads, one per order [`super::MIN_ORDER`]..=[`super::MAX_ORDER`].
    pub const HEADS: u64 = 128;
}

/// Offset of the free-list head of `order`.
pub const fn head_off(order: u32) -> u64 {
    hdr::HEADS + 8 * (order - MIN_ORDER) as u64
}
const _: () = assert!(head_off(MAX_ORDER) + 8 <= HEADER_SIZE);

/// Block header states (bits 0..8 of the header word).
pub mod state {
    /// A free block, on the free list of its order.
    pub const FREE: u8 = 1;
    /// An allocated block.
    pub const USED: u8 = 2;
    /// Not a block: the 16 bytes before the data of a block allocated with an alignment
    /// above 16, naming the distance back to the block's start.
    pub const LEAD: u8 = 3;
}

/// The decoded low half of a header word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// [`state`].
    pub state: u8,
    /// log2 of the block size (LEAD: unused, 0).
    pub order: u8,
    /// Owner's peer slot + 1; 0 = untagged (persistent).
    pub owner: u8,
    /// log2 of the distance from the block start to its data (4 = 16: right after the header).
    pub lead: u8,
}

impl Tag {
    fn low(self) -> u32 {
        u32::from(self.state)
            | (u32::from(self.order) << 8)
            | (u32::from(self.owner) << 16)
            | (u32::from(self.lead) << 24)
    }

    /// The block size.
    pub fn size(self) -> u64 {
        1u64 << self.order
    }
}

/// The check value of a header word at `offset` with low half `low` (FORMAT.md gives the
/// same steps): a 64-bit mix of heap id, offset and low half, top 32 bits.
pub fn check_value(heap_id: u64, offset: u64, low: u32) -> u32 {
    let mut x = heap_id
        ^ offset.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ u64::from(low).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    #[allow(clippy::cast_possible_truncation)] // the top 32 bits
    let top = (x >> 32) as u32;
    top
}

/// The header word for `tag` at `offset`.
pub fn encode(heap_id: u64, offset: u64, tag: Tag) -> u64 {
    let low = tag.low();
    u64::from(low) | (u64::from(check_value(heap_id, offset, low)) << 32)
}

/// Decodes a header word read at `offset`; `None` unless its check value matches.
pub fn decode(heap_id: u64, offset: u64, word: u64) -> Option<Tag> {
    #[allow(clippy::cast_possible_truncation)] // the low and high halves
    let (low, check) = (word as u32, (word >> 32) as u32);
    if check != check_value(heap_id, offset, low) {
        return None;
    }
    let [state, order, owner, lead] = low.to_le_bytes();
    Some(Tag {
        state,
        order,
        owner,
        lead,
    })
}

/// The lock word of a taker: bits 0..8 peer slot + 1, 8..32 low 24 bits of its incarnation,
/// 32..64 its token.
pub const fn lock_word(me: Me) -> u64 {
    (me.slot.0 as u64 + 1) & 0xFF
        | ((me.incarnation & INCARNATION_MASK) << 8)
        | ((me.token as u64) << 32)
}

/// The incarnation bits a lock word keeps.
pub const INCARNATION_MASK: u64 = 0xFF_FFFF;

/// Who takes the lock: a peer slot, its incarnation (peer table) and a token naming the
/// thread or process inside the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Me {
    /// Peer slot.
    pub slot: PeerSlot,
    /// The slot's incarnation when this peer attached.
    pub incarnation: u64,
    /// The transport's lock token (a guest process's pid; 1 for a host process).
    pub token: u32,
}

/// What the allocator needs to know about other peers: vshmd's peer table and the caller's
/// knowledge of its own processes.
pub trait Peers {
    /// The incarnation of the peer attached in `slot`, `None` if none is.
    fn incarnation(&self, slot: PeerSlot) -> Option<u64>;
    /// Whether the user of this peer named `token` is alive (false only when known dead).
    fn token_alive(&self, token: u32) -> bool;
    /// A value that changes whenever a peer attaches or detaches (owned blocks are swept
    /// when it changes).
    fn fingerprint(&self) -> u64;
    /// Whether the peer that attached in `slot` with `incarnation` (compared in the bits of
    /// `mask`) is still attached. Deciding "no" frees that peer's owned blocks or breaks
    /// its lock, so an implementation should not believe one look at a table any peer can
    /// scribble on (vshmd heals it within 200 ms): the guest library answers "attached"
    /// until the peer has looked gone for two heal periods (see [`Peers::settled`]). The
    /// default believes the table at once.
    fn attached(&self, slot: PeerSlot, incarnation: u64, mask: u64) -> bool {
        self.incarnation(slot)
            .is_some_and(|now| now & mask == incarnation & mask)
    }
    /// Whether every [`Peers::attached`] answer so far was final. An implementation may
    /// answer "attached" for now while it waits to believe a departure; then the owners'
    /// blocks are looked at again by a later operation (the sweep does not record the
    /// peer table as seen).
    fn settled(&self) -> bool {
        true
    }
}

/// [`Peers`] from the region's peer table.
pub struct PeerTable<'a, M: SharedMemory + ?Sized> {
    /// The region.
    pub mem: &'a M,
    /// Its layout.
    pub layout: &'a Layout,
    /// The transport's `token_alive`.
    pub token_alive: &'a dyn Fn(u32) -> bool,
}

impl<M: SharedMemory + ?Sized> core::fmt::Debug for PeerTable<'_, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PeerTable").finish_non_exhaustive()
    }
}

impl<M: SharedMemory + ?Sized> Peers for PeerTable<'_, M> {
    fn incarnation(&self, slot: PeerSlot) -> Option<u64> {
        read_peer(self.mem, self.layout, slot).map(|p| p.incarnation)
    }
    fn token_alive(&self, token: u32) -> bool {
        (self.token_alive)(token)
    }
    fn fingerprint(&self) -> u64 {
        peers_fingerprint((0..self.layout.max_peers).map(|s| self.incarnation(PeerSlot(s))))
    }
}

/// [`Peers::fingerprint`] of who is attached in each slot, in slot order (`None`: nobody).
/// One fold for every view of the peers, so peers reading the table and VMs asking vshmd
/// agree on it (and do not walk the owners again for nothing).
pub fn peers_fingerprint(incarnations: impl Iterator<Item = Option<u64>>) -> u64 {
    incarnations.fold(0u64, |acc, inc| {
        let v = inc.map_or(0, |i| i.wrapping_add(1));
        (acc ^ v.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(7)
    })
}

/// Why an allocator operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockError {
    /// An access left the section or the region.
    Fault(Fault),
    /// The section holds other data (its first 512 bytes are neither zero nor a header).
    NotAHeap,
    /// The allocator header does not validate (which field).
    BadHeader(&'static str),
    /// The header says the arena is larger than the size the caller passed: another peer
    /// grew the section; read its size again and retry.
    Stale,
    /// A block header on a walk does not validate: the blocks cannot be rebuilt.
    Corrupt {
        /// Its section offset.
        offset: u64,
    },
    /// A read-only check found the lists or counters inconsistent with the blocks.
    Inconsistent {
        /// What differs.
        what: &'static str,
        /// Where (section offset or order), if it applies.
        at: u64,
    },
    /// The lock is held by a live taker (its lock word): wait and retry.
    Busy {
        /// The lock word found.
        owner: u64,
    },
    /// The allocation does not fit now; it fits once the section is at least this large.
    NeedGrow {
        /// The section size needed.
        min_size: u64,
    },
    /// The allocation does not fit even in the section's max size.
    NoMemory,
    /// A size of 0, an alignment that is not a power of two, or a block too large.
    BadParameter,
    /// The offset is not the data of a block of this section.
    NotABlock {
        /// The offset given.
        offset: u64,
    },
    /// The block is already free.
    DoubleFree {
        /// The offset given.
        offset: u64,
    },
    /// The size given is not the block's size.
    WrongSize {
        /// The block's usable size.
        size: u64,
    },
    /// The block belongs to another section's allocator.
    WrongHeap,
}

impl From<Fault> for BlockError {
    fn from(f: Fault) -> Self {
        BlockError::Fault(f)
    }
}

impl BlockError {
    /// The NTSTATUS for this error (docs/FORMAT.md, "Blocks inside a section").
    pub fn status(self) -> Status {
        match self {
            BlockError::NoMemory | BlockError::NeedGrow { .. } => Status::NoMemory,
            BlockError::NotAHeap
            | BlockError::BadParameter
            | BlockError::NotABlock { .. }
            | BlockError::DoubleFree { .. }
            | BlockError::WrongSize { .. } => Status::InvalidParameter,
            BlockError::Busy { .. } => Status::InsufficientResources,
            BlockError::Fault(_)
            | BlockError::BadHeader(_)
            | BlockError::Stale
            | BlockError::Corrupt { .. }
            | BlockError::Inconsistent { .. }
            | BlockError::WrongHeap => Status::InvalidHandle,
        }
    }
}

impl core::fmt::Display for BlockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            BlockError::Fault(x) => write!(f, "{x}"),
            BlockError::NotAHeap => write!(f, "the section holds data, not an allocator"),
            BlockError::BadHeader(what) => write!(f, "allocator header: {what}"),
            BlockError::Stale => write!(f, "the section grew meanwhile"),
            BlockError::Corrupt { offset } => {
                write!(f, "block header at {offset:#x} does not validate")
            }
            BlockError::Inconsistent { what, at } => write!(f, "{what} (at {at:#x})"),
            BlockError::Busy { owner } => write!(f, "allocator lock held by {owner:#x}"),
            BlockError::NeedGrow { min_size } => write!(f, "needs a section of {min_size} bytes"),
            BlockError::NoMemory => write!(f, "does not fit, even at the section's max size"),
            BlockError::BadParameter => write!(f, "bad size or alignment"),
            BlockError::NotABlock { offset } => write!(f, "{offset:#x} is not a block"),
            BlockError::DoubleFree { offset } => write!(f, "block {offset:#x} is already free"),
            BlockError::WrongSize { size } => write!(f, "the block's size is {size}"),
            BlockError::WrongHeap => write!(f, "the block belongs to another section"),
        }
    }
}

/// An allocator's counters, as its header publishes them (a snapshot: unlocked reads).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockStats {
    /// Bytes of used blocks (whole blocks: headers and rounding included).
    pub in_use: u64,
    /// Used blocks.
    pub count: u64,
    /// Bytes of free blocks.
    pub free: u64,
    /// The largest free block (the most one allocation can get without growing).
    pub largest_free: u64,
    /// 1 − largest_free / free (0 when nothing is free): how far free memory is from being
    /// one block.
    pub fragmentation: f64,
    /// Used blocks tagged with an owner.
    pub owned: u64,
    /// The arena: bytes the blocks tile (in_use + free).
    pub arena: u64,
    /// Locks broken (recoveries) so far.
    pub recoveries: u64,
    /// Owned blocks freed because their owner was gone.
    pub reclaimed: u64,
}

/// `1 − largest / free`, 0 when nothing is free.
pub fn fragmentation(free: u64, largest: u64) -> f64 {
    if free == 0 {
        0.0
    } else {
        #[allow(clippy::cast_precision_loss)] // a ratio for display
        let r = largest as f64 / free as f64;
        1.0 - r
    }
}

/// Loads u64 field `field` of the allocator at `base` (region offset).
fn field<M: SharedMemory + ?Sized>(mem: &M, base: u64, field: u64) -> Result<u64, Fault> {
    let at = base.checked_add(field).ok_or(Fault::OutOfBounds {
        offset: base,
        len: field,
    })?;
    mem.load_u64(at, Ordering::SeqCst)
}

/// Reads the counters of the allocator in the section at `section` (region offset) of
/// `section_size` bytes, without the lock. `Ok(None)`: the section has no (ready) allocator.
pub fn stats<M: SharedMemory + ?Sized>(
    mem: &M,
    section: RegionOffset,
    section_size: u64,
) -> Result<Option<BlockStats>, BlockError> {
    let base = section.0;
    if section_size < HEADER_SIZE {
        return Ok(None);
    }
    check_range(mem.size(), base, HEADER_SIZE)?;
    if field(mem, base, hdr::MAGIC)? != MAGIC {
        return Ok(None);
    }
    let version = mem.load_u32(base + hdr::VERSION, Ordering::SeqCst)?;
    if version != VERSION {
        return Err(BlockError::BadHeader("unknown version"));
    }
    let covered = field(mem, base, hdr::COVERED)?;
    if covered < HEADER_SIZE || covered > section_size {
        return Err(BlockError::BadHeader("arena end outside the section"));
    }
    let largest_free = (MIN_ORDER..=MAX_ORDER)
        .rev()
        .find(|&k| field(mem, base, head_off(k)).is_ok_and(|h| h != 0))
        .map_or(0, |k| 1u64 << k);
    let free = field(mem, base, hdr::FREE)?;
    Ok(Some(BlockStats {
        in_use: field(mem, base, hdr::IN_USE)?,
        count: field(mem, base, hdr::BLOCKS)?,
        free,
        largest_free,
        fragmentation: fragmentation(free, largest_free),
        owned: field(mem, base, hdr::OWNED)?,
        arena: covered - HEADER_SIZE,
        recoveries: field(mem, base, hdr::RECOVERIES)?,
        reclaimed: field(mem, base, hdr::RECLAIMED)?,
    }))
}

/// Checks the allocator in a section without the lock and without writing (inspect): walks
/// the blocks, checks every header, that free buddies are merged, the free lists against the
/// blocks and the counters against both. `Ok(None)`: no allocator. The first problem found
/// is the error. O(n): for tools and tests, never on an operation's path.
pub fn verify<M: SharedMemory + ?Sized>(
    mem: &M,
    section: RegionOffset,
    section_size: u64,
) -> Result<Option<BlockStats>, BlockError> {
    let Some(published) = stats(mem, section, section_size)? else {
        return Ok(None);
    };
    let base = section.0;
    let heap_id = field(mem, base, hdr::HEAP_ID)?;
    let covered = published.arena + HEADER_SIZE;
    let mut walked = BlockStats::default();
    let mut free_per_order = [0u64; (MAX_ORDER + 1) as usize];
    let mut prev_free: Option<(u64, u8)> = None;
    let mut p = HEADER_SIZE;
    while p < covered {
        let w = field(mem, base, p)?;
        let tag = decode(heap_id, p, w)
            .filter(|t| block_shape_ok(p, *t, covered))
            .ok_or(BlockError::Corrupt { offset: p })?;
        let size = tag.size();
        if tag.state == state::FREE {
            walked.free += size;
            walked.largest_free = walked.largest_free.max(size);
            free_per_order[usize::from(tag.order)] += 1;
            if let Some((q, k)) = prev_free {
                let merged = 2 * size;
                if k == tag.order && q + size == p && q % merged == 0 && q + merged <= covered {
                    return Err(BlockError::Inconsistent {
                        what: "free buddies not merged",
                        at: q,
                    });
                }
            }
            prev_free = Some((p, tag.order));
        } else {
            walked.in_use += size;
            walked.count += 1;
            walked.owned += u64::from(tag.owner != 0);
            prev_free = None;
        }
        p += size;
    }
    for k in MIN_ORDER..=MAX_ORDER {
        let mut n = 0u64;
        let mut prev = 0u64;
        let mut at = field(mem, base, head_off(k))?;
        while at != 0 {
            n += 1;
            let ok = at >= HEADER_SIZE
                && at < covered
                && at % BLOCK_HEADER_SIZE == 0
                && decode(heap_id, at, field(mem, base, at)?)
                    .is_some_and(|t| t.state == state::FREE && u32::from(t.order) == k)
                && field(mem, base, at + 24)? == prev;
            if !ok || n > free_per_order[k as usize] {
                return Err(BlockError::Inconsistent {
                    what: "free list does not match the blocks",
                    at: u64::from(k),
                });
            }
            prev = at;
            at = field(mem, base, at + 16)?;
        }
        if n != free_per_order[k as usize] {
            return Err(BlockError::Inconsistent {
                what: "free block missing from its list",
                at: u64::from(k),
            });
        }
    }
    let counters = [
        ("bytes in use", published.in_use, walked.in_use),
        ("block count", published.count, walked.count),
        ("free bytes", published.free, walked.free),
        ("owned blocks", published.owned, walked.owned),
        (
            "largest free block",
            published.largest_free,
            walked.largest_free,
        ),
    ];
    for (what, header, blocks) in counters {
        if header != blocks {
            return Err(BlockError::Inconsistent { what, at: header });
        }
    }
    Ok(Some(published))
}

/// Whether a decoded header at `p` describes a block: FREE or USED, a valid order, aligned
/// to its size, inside `[HEADER_SIZE, covered)`.
pub fn block_shape_ok(p: u64, tag: Tag, covered: u64) -> bool {
    let order = u32::from(tag.order);
    (tag.state == state::FREE || tag.state == state::USED)
        && (MIN_ORDER..=MAX_ORDER).contains(&order)
        && p >= HEADER_SIZE
        && p % tag.size() == 0
        && p.checked_add(tag.size()).is_some_and(|end| end <= covered)
        && (tag.state == state::USED || tag.owner == 0)
}
