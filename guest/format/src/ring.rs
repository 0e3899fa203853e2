//! A lock-free single-producer single-consumer byte ring inside a section: the type for
//! streaming bytes or frames from one peer to another. docs/FORMAT.md §6c is the byte-exact
//! spec; this module is its reference implementation (layout, the pure index logic, the
//! validator, and the producer's and consumer's steps over any [`SharedMemory`]).
//!
//! # The protocol
//!
//! The header holds the capacity (a power of two) and two monotonically increasing byte
//! counts: `head` (bytes the producer has published) and `tail` (bytes the consumer has
//! taken). Byte `i` of the stream lives at data offset `i mod capacity`. The producer copies
//! bytes in, then stores `head`; the consumer loads `head`, copies bytes out, then stores
//! `tail`. Each index has exactly one writer, so there is no read-modify-write and no lock:
//! a dead peer leaves the ring in a state the other side can keep using.
//!
//! # Nothing read is trusted
//!
//! The other side (or any peer that writes the region) can store anything into `head` and
//! `tail`. Every load is validated before it is used: `tail ≤ head`, `head − tail ≤
//! capacity`, the index this side owns still holds what this side stored, and the other
//! side's index never goes back. A state that fails is [`RingError::Corrupt`] with the values
//! read, never an access outside the data area and never a panic. Positions are
//! `index & (capacity − 1)` over the capacity read once at attach (a later scribble of the
//! header's capacity is not read again), and every addition is checked: byte counts never
//! wrap (2^64 bytes is 584 years at 1 GB/s), so an index near 2^64 is corrupt too. A frame's
//! length prefix is checked against the capacity and against the bytes published before
//! anything is copied.

use core::mem::{offset_of, size_of};
use core::sync::atomic::Ordering;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::shm::{bytes_of, read_pod, zeroed, Fault, SharedMemory};
use crate::Status;

#[cfg(test)]
mod tests;

/// `"VSHMRING"`: the ring is ready (stored last by its creator).
pub const MAGIC: u64 = u64::from_le_bytes(*b"VSHMRING");
/// `"RINGINIT"`: a creator claimed the header and is writing it.
pub const MAGIC_INIT: u64 = u64::from_le_bytes(*b"RINGINIT");
/// The ring format version.
pub const VERSION: u32 = 1;
/// A ring's header starts at an offset that is a multiple of this (a cache line).
pub const ALIGN: u64 = 64;
/// The header: a line of configuration, then `head` and `tail`, each alone in 128 bytes
/// (two cache lines: the adjacent-line prefetcher of x86 and the 128-byte lines of some
/// ARM cores would otherwise couple them); the data area follows it.
pub const HEADER_SIZE: u64 = 384;
/// [`HEADER_SIZE`] as the header's u32 field holds it.
const HEADER_SIZE_FIELD: u32 = 384;
/// Smallest capacity (bytes of data).
pub const MIN_CAPACITY: u64 = 64;
/// Largest capacity: 2^47 bytes, as the largest block (`blocks::MAX_ORDER`).
pub const MAX_CAPACITY: u64 = 1 << 47;
/// A frame's length prefix: a little-endian u32 before its payload.
pub const FRAME_PREFIX: u64 = 4;

/// The ring header, at a section offset that is a multiple of [`ALIGN`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct RingHeader {
    /// [`MAGIC`], stored last by the creator; [`MAGIC_INIT`] while it writes the rest.
    pub magic: u64,
    /// [`VERSION`].
    pub version: u32,
    /// [`HEADER_SIZE`]: the data area starts this far after the header.
    pub header_size: u32,
    /// Bytes of data: a power of two in [`MIN_CAPACITY`]..=[`MAX_CAPACITY`].
    pub capacity: u64,
    /// Reserved, 0.
    pub reserved0: [u64; 13],
    /// Bytes published by the producer so far (written by the producer only).
    pub head: u64,
    /// Reserved, 0 (keeps `head` alone on its lines).
    pub reserved1: [u64; 15],
    /// Bytes taken by the consumer so far (written by the consumer only).
    pub tail: u64,
    /// Reserved, 0 (keeps `tail` alone on its lines).
    pub reserved2: [u64; 15],
}

/// Offset of `magic` in the header.
pub const MAGIC_OFF: u64 = offset_of!(RingHeader, magic) as u64;
/// Offset of `capacity` in the header.
pub const CAPACITY_OFF: u64 = offset_of!(RingHeader, capacity) as u64;
/// Offset of `head` in the header.
pub const HEAD_OFF: u64 = offset_of!(RingHeader, head) as u64;
/// Offset of `tail` in the header.
pub const TAIL_OFF: u64 = offset_of!(RingHeader, tail) as u64;

const _: () = assert!(size_of::<RingHeader>() as u64 == HEADER_SIZE);
const _: () = assert!(offset_of!(RingHeader, version) == 8);
const _: () = assert!(offset_of!(RingHeader, header_size) == 12);
const _: () = assert!(CAPACITY_OFF == 16);
const _: () = assert!(HEAD_OFF == 128);
const _: () = assert!(TAIL_OFF == 256);
const _: () = assert!(HEADER_SIZE % ALIGN == 0 && HEADER_SIZE_FIELD as u64 == HEADER_SIZE);
const _: () = assert!(MIN_CAPACITY.is_power_of_two() && MIN_CAPACITY > FRAME_PREFIX);

/// Why a ring operation failed. Each variant carries the values that were wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// An access left the mapping (the ring's area is not inside it).
    Fault(Fault),
    /// The ring's offset is not a multiple of [`ALIGN`].
    Misaligned {
        /// The offset given.
        offset: u64,
    },
    /// The capacity is not a power of two in [`MIN_CAPACITY`]..=[`MAX_CAPACITY`].
    BadCapacity {
        /// The capacity given or found.
        capacity: u64,
    },
    /// Header and data do not fit in the room there is (the section's size after the ring's
    /// offset).
    TooSmall {
        /// Bytes the ring needs ([`HEADER_SIZE`] + capacity).
        need: u64,
        /// Bytes there are.
        room: u64,
    },
    /// No ring here: the magic is not [`MAGIC`] ([`MAGIC_INIT`]: its creator is still
    /// writing the header; 0: nobody created one).
    NotARing {
        /// The magic found.
        magic: u64,
    },
    /// A create found the magic word not zero: a ring (or other data) is already there.
    InUse {
        /// The magic found.
        magic: u64,
    },
    /// The header's version is not [`VERSION`].
    Version {
        /// The version found.
        found: u32,
    },
    /// The header's size field is not [`HEADER_SIZE`].
    HeaderSize {
        /// The size found.
        found: u32,
    },
    /// The indices are not a state the ring can be in: `tail > head`, more than the capacity
    /// published, this side's own index changed behind its back, the other side's went back,
    /// or an addition would pass 2^64. The values read.
    Corrupt {
        /// `head` as read.
        head: u64,
        /// `tail` as read.
        tail: u64,
        /// The capacity (as read at attach).
        capacity: u64,
    },
    /// A frame's length prefix is not possible: longer than `capacity − 4`, longer than what
    /// is published, or the prefix itself is cut short (`len` is `None`: fewer than 4 bytes
    /// published). Producers publish whole frames, so this is corruption (or a byte-stream
    /// writer on a framed ring).
    CorruptFrame {
        /// The length prefix read (`None`: fewer than 4 bytes there).
        len: Option<u32>,
        /// Bytes published and not yet taken.
        available: u64,
        /// The capacity.
        capacity: u64,
    },
    /// A frame to send is longer than the ring can ever hold (`capacity − 4`).
    FrameTooLarge {
        /// The frame's length.
        len: u64,
        /// The longest frame this ring takes.
        max: u64,
    },
    /// The buffer given is shorter than the next frame (which stays in the ring).
    BufferTooSmall {
        /// The frame's length.
        need: u64,
        /// The buffer's length.
        have: u64,
    },
    /// This process already has the producer (or the consumer) of this ring: one of each
    /// per ring is the rule (the library enforces it within a process; between peers it is
    /// a convention, docs/FORMAT.md §6c).
    SideTaken {
        /// The producer's side (else the consumer's).
        producer: bool,
    },
}

impl RingError {
    /// The NTSTATUS closest to this error: a corrupt ring or header is
    /// STATUS_INVALID_HANDLE (as a corrupt block allocator), a bad argument or a section
    /// that holds something else STATUS_INVALID_PARAMETER, a side already taken
    /// STATUS_ACCESS_DENIED.
    pub fn status(&self) -> Status {
        match self {
            RingError::Fault(_)
            | RingError::NotARing { .. }
            | RingError::Version { .. }
            | RingError::HeaderSize { .. }
            | RingError::Corrupt { .. }
            | RingError::CorruptFrame { .. } => Status::InvalidHandle,
            RingError::Misaligned { .. }
            | RingError::BadCapacity { .. }
            | RingError::TooSmall { .. }
            | RingError::InUse { .. }
            | RingError::FrameTooLarge { .. }
            | RingError::BufferTooSmall { .. } => Status::InvalidParameter,
            RingError::SideTaken { .. } => Status::AccessDenied,
        }
    }
}

impl From<Fault> for RingError {
    fn from(f: Fault) -> Self {
        RingError::Fault(f)
    }
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            RingError::Fault(x) => write!(f, "ring: {x}"),
            RingError::Misaligned { offset } => {
                write!(f, "ring offset {offset:#x} is not a multiple of {ALIGN}")
            }
            RingError::BadCapacity { capacity } => write!(
                f,
                "ring capacity {capacity} is not a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}"
            ),
            RingError::TooSmall { need, room } => {
                write!(f, "a ring of {need} bytes does not fit in {room} bytes")
            }
            RingError::NotARing { magic } => write!(f, "no ring here (magic {magic:#018x})"),
            RingError::InUse { magic } => {
                write!(f, "the ring's place is in use (magic {magic:#018x})")
            }
            RingError::Version { found } => write!(f, "ring version {found} (expected {VERSION})"),
            RingError::HeaderSize { found } => {
                write!(f, "ring header size {found} (expected {HEADER_SIZE})")
            }
            RingError::Corrupt {
                head,
                tail,
                capacity,
            } => write!(
                f,
                "corrupt ring: head {head}, tail {tail}, capacity {capacity}"
            ),
            RingError::CorruptFrame {
                len,
                available,
                capacity,
            } => match len {
                Some(len) => write!(
                    f,
                    "corrupt frame: length {len} with {available} bytes published, capacity {capacity}"
                ),
                None => write!(
                    f,
                    "corrupt frame: {available} bytes published, less than a length prefix"
                ),
            },
            RingError::FrameTooLarge { len, max } => {
                write!(f, "a frame of {len} bytes is longer than this ring's {max}")
            }
            RingError::BufferTooSmall { need, have } => {
                write!(f, "the next frame has {need} bytes, the buffer {have}")
            }
            RingError::SideTaken { producer } => write!(
                f,
                "this process already has the ring's {}",
                if producer { "producer" } else { "consumer" }
            ),
        }
    }
}

/// Bytes published and not yet taken, if `(head, tail)` is a state a ring of `capacity`
/// can be in (`tail ≤ head ≤ tail + capacity`).
pub fn used(head: u64, tail: u64, capacity: u64) -> Result<u64, RingError> {
    match head.checked_sub(tail) {
        Some(n) if n <= capacity => Ok(n),
        _ => Err(RingError::Corrupt {
            head,
            tail,
            capacity,
        }),
    }
}

/// Checks where a ring would lie: `offset` (of its header, in the memory `limit` bounds) a
/// multiple of [`ALIGN`], `capacity` a power of two in range, and header plus data ending
/// at or before `limit`.
pub fn check_geometry(offset: u64, capacity: u64, limit: u64) -> Result<(), RingError> {
    if offset % ALIGN != 0 {
        return Err(RingError::Misaligned { offset });
    }
    if !capacity.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity) {
        return Err(RingError::BadCapacity { capacity });
    }
    let need = HEADER_SIZE + capacity;
    match offset.checked_add(need) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(RingError::TooSmall {
            need,
            room: limit.saturating_sub(offset),
        }),
    }
}

/// Validates a copy of a header found at `offset`: magic, version, header size and the
/// geometry of [`check_geometry`]. Returns the capacity.
pub fn validate_header(h: &RingHeader, offset: u64, limit: u64) -> Result<u64, RingError> {
    if h.magic != MAGIC {
        return Err(RingError::NotARing { magic: h.magic });
    }
    if h.version != VERSION {
        return Err(RingError::Version { found: h.version });
    }
    if u64::from(h.header_size) != HEADER_SIZE {
        return Err(RingError::HeaderSize {
            found: h.header_size,
        });
    }
    check_geometry(offset, h.capacity, limit)?;
    Ok(h.capacity)
}

/// Where a ring lies, validated: its header's offset in the memory and its capacity. Only
/// [`Ring::create`] and [`Ring::attach`] make one, so every position it computes is inside
/// the data area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    offset: u64,
    capacity: u64,
}

impl Ring {
    /// Creates a ring of `capacity` bytes with its header at `offset`, in memory that ends
    /// (for the ring) at `limit`. The magic word must be 0 (fresh section memory is): it is
    /// claimed with a CAS (0 → [`MAGIC_INIT`]), so of two creators one wins and the other
    /// gets [`RingError::InUse`]; the header is written, then [`MAGIC`] stored last.
    pub fn create<M: SharedMemory + ?Sized>(
        mem: &M,
        offset: u64,
        capacity: u64,
        limit: u64,
    ) -> Result<Ring, RingError> {
        check_geometry(offset, capacity, limit)?;
        if let Err(magic) = mem.cas_u64(offset + MAGIC_OFF, 0, MAGIC_INIT)? {
            return Err(RingError::InUse { magic });
        }
        let mut h: RingHeader = zeroed();
        h.version = VERSION;
        h.header_size = HEADER_SIZE_FIELD;
        h.capacity = capacity;
        // Everything after the magic word (indices 0, reserved 0), then the magic.
        mem.write_bytes(offset + 8, &bytes_of(&h)[8..])?;
        mem.store_u64(offset + MAGIC_OFF, MAGIC, Ordering::SeqCst)?;
        Ok(Ring { offset, capacity })
    }

    /// Attaches to the ring whose header is at `offset` (in memory that ends, for the ring,
    /// at `limit`): loads the magic (acquire), copies the header once and validates the
    /// copy. The capacity is never read again.
    pub fn attach<M: SharedMemory + ?Sized>(
        mem: &M,
        offset: u64,
        limit: u64,
    ) -> Result<Ring, RingError> {
        if offset % ALIGN != 0 {
            return Err(RingError::Misaligned { offset });
        }
        let magic = mem.load_u64(offset + MAGIC_OFF, Ordering::SeqCst)?;
        if magic != MAGIC {
            return Err(RingError::NotARing { magic });
        }
        let h: RingHeader = read_pod(mem, offset)?;
        let capacity = validate_header(&h, offset, limit)?;
        Ok(Ring { offset, capacity })
    }

    /// The header's offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes of data.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The longest frame: `capacity − 4`.
    pub fn max_frame(&self) -> u64 {
        self.capacity - FRAME_PREFIX
    }

    /// The first byte after the ring (header and data).
    pub fn end(&self) -> u64 {
        self.offset + HEADER_SIZE + self.capacity
    }

    /// Where `len` (≤ capacity) bytes of the stream starting at byte `index` lie: one or two
    /// runs `(offset in memory, length)`, the second empty unless they wrap around the end
    /// of the data area.
    pub fn runs(&self, index: u64, len: u64) -> [(u64, u64); 2] {
        let data = self.offset + HEADER_SIZE;
        let len = len.min(self.capacity);
        let pos = index & (self.capacity - 1);
        let first = len.min(self.capacity - pos);
        [(data + pos, first), (data, len - first)]
    }

    /// Loads `head` (SeqCst: see [`Producer::publish`]).
    pub fn load_head<M: SharedMemory + ?Sized>(&self, mem: &M) -> Result<u64, RingError> {
        Ok(mem.load_u64(self.offset + HEAD_OFF, Ordering::SeqCst)?)
    }

    /// Loads `tail` (SeqCst).
    pub fn load_tail<M: SharedMemory + ?Sized>(&self, mem: &M) -> Result<u64, RingError> {
        Ok(mem.load_u64(self.offset + TAIL_OFF, Ordering::SeqCst)?)
    }

    fn corrupt(&self, head: u64, tail: u64) -> RingError {
        RingError::Corrupt {
            head,
            tail,
            capacity: self.capacity,
        }
    }

    /// Copies `data` (≤ capacity) into the data area at stream index `index`.
    fn copy_in<M: SharedMemory + ?Sized>(
        &self,
        mem: &M,
        index: u64,
        data: &[u8],
    ) -> Result<(), RingError> {
        let [(a, n), (b, _)] = self.runs(index, data.len() as u64);
        let split = usize::try_from(n).unwrap_or(data.len()).min(data.len());
        mem.write_bytes(a, &data[..split])?;
        if split < data.len() {
            mem.write_bytes(b, &data[split..])?;
        }
        Ok(())
    }

    /// Copies `buf.len()` (≤ capacity) bytes at stream index `index` out of the data area.
    fn copy_out<M: SharedMemory + ?Sized>(
        &self,
        mem: &M,
        index: u64,
        buf: &mut [u8],
    ) -> Result<(), RingError> {
        let [(a, n), (b, _)] = self.runs(index, buf.len() as u64);
        let split = usize::try_from(n).unwrap_or(buf.len()).min(buf.len());
        let (first, second) = buf.split_at_mut(split);
        mem.read_bytes(a, first)?;
        if !second.is_empty() {
            mem.read_bytes(b, second)?;
        }
        Ok(())
    }
}

/// The producer's side: the one party that stores `head`. Keeps its own copy of `head` and
/// the last `tail` it saw, so a write that fits in the room it already knows of does not
/// touch the consumer's cache line.
#[derive(Debug)]
pub struct Producer {
    ring: Ring,
    head: u64,
    tail: u64,
}

impl Producer {
    /// Takes the producer's side of `ring`: reads both indices and validates them.
    pub fn new<M: SharedMemory + ?Sized>(mem: &M, ring: Ring) -> Result<Producer, RingError> {
        let head = ring.load_head(mem)?;
        let tail = ring.load_tail(mem)?;
        used(head, tail, ring.capacity)?;
        Ok(Producer { ring, head, tail })
    }

    /// The ring.
    pub fn ring(&self) -> Ring {
        self.ring
    }

    /// Bytes published so far (this side's `head`).
    pub fn head(&self) -> u64 {
        self.head
    }

    /// Loads both indices and checks them: `head` must still be what this side stored, `tail`
    /// must not have gone back or past `head`. Returns the free room.
    pub fn free<M: SharedMemory + ?Sized>(&mut self, mem: &M) -> Result<u64, RingError> {
        let head = self.ring.load_head(mem)?;
        let tail = self.ring.load_tail(mem)?;
        if head != self.head || tail < self.tail {
            return Err(self.ring.corrupt(head, tail));
        }
        let n = used(head, tail, self.ring.capacity)?;
        self.tail = tail;
        Ok(self.ring.capacity - n)
    }

    /// The room for `want` bytes: the room known from the last `tail` seen if it is enough
    /// (checking only this side's own index), else [`Producer::free`].
    fn room<M: SharedMemory + ?Sized>(&mut self, mem: &M, want: u64) -> Result<u64, RingError> {
        // Invariant: tail ≤ head ≤ tail + capacity (validated when they were read).
        let known = self.ring.capacity - (self.head - self.tail);
        if known >= want {
            let head = self.ring.load_head(mem)?;
            if head != self.head {
                return Err(self.ring.corrupt(head, self.tail));
            }
            return Ok(known);
        }
        self.free(mem)
    }

    /// Stores `head` = `new` (SeqCst: release for the bytes copied in before it; sequentially
    /// consistent so that a waiter's "register, then look at the index" and this side's
    /// "store the index, then look at the waiters" cannot both miss, docs/FORMAT.md §6a).
    fn publish<M: SharedMemory + ?Sized>(&mut self, mem: &M, new: u64) -> Result<(), RingError> {
        mem.store_u64(self.ring.offset + HEAD_OFF, new, Ordering::SeqCst)?;
        self.head = new;
        Ok(())
    }

    /// Writes as much of `data` as there is room for and publishes it; returns how much (0:
    /// the ring is full). Never blocks.
    pub fn write<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        data: &[u8],
    ) -> Result<usize, RingError> {
        if data.is_empty() {
            return Ok(0);
        }
        let room = self.room(mem, data.len() as u64)?;
        let n = usize::try_from(room).map_or(data.len(), |r| r.min(data.len()));
        if n == 0 {
            return Ok(0);
        }
        let new = self
            .head
            .checked_add(n as u64)
            .ok_or(self.ring.corrupt(self.head, self.tail))?;
        self.ring.copy_in(mem, self.head, &data[..n])?;
        self.publish(mem, new)?;
        Ok(n)
    }

    /// Sends one frame (a u32 length, then the bytes; both may wrap around the end) if
    /// there is room for all of it; `Ok(false)`: not now. Published at once: the consumer
    /// never sees part of a frame. A frame longer than `capacity − 4` can never be sent:
    /// [`RingError::FrameTooLarge`].
    pub fn send_frame<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        frame: &[u8],
    ) -> Result<bool, RingError> {
        let len = frame.len() as u64;
        let max = self.ring.max_frame();
        let prefix = match u32::try_from(len) {
            Ok(p) if len <= max => p,
            _ => return Err(RingError::FrameTooLarge { len, max }),
        };
        let need = FRAME_PREFIX + len;
        if self.room(mem, need)? < need {
            return Ok(false);
        }
        let corrupt = self.ring.corrupt(self.head, self.tail);
        let body = self.head.checked_add(FRAME_PREFIX).ok_or(corrupt)?;
        let new = self.head.checked_add(need).ok_or(corrupt)?;
        self.ring.copy_in(mem, self.head, &prefix.to_le_bytes())?;
        self.ring.copy_in(mem, body, frame)?;
        self.publish(mem, new)?;
        Ok(true)
    }
}

/// The consumer's side: the one party that stores `tail`. Keeps its own copy of `tail`
/// and the last `head` it saw.
#[derive(Debug)]
pub struct Consumer {
    ring: Ring,
    tail: u64,
    head: u64,
}

impl Consumer {
    /// Takes the consumer's side of `ring`: reads both indices and validates them.
    pub fn new<M: SharedMemory + ?Sized>(mem: &M, ring: Ring) -> Result<Consumer, RingError> {
        let head = ring.load_head(mem)?;
        let tail = ring.load_tail(mem)?;
        used(head, tail, ring.capacity)?;
        Ok(Consumer { ring, tail, head })
    }

    /// The ring.
    pub fn ring(&self) -> Ring {
        self.ring
    }

    /// Bytes taken so far (this side's `tail`).
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Loads both indices and checks them: `tail` must still be what this side stored,
    /// `head` must not have gone back, nor more than the capacity ahead. Returns the bytes
    /// published and not yet taken.
    pub fn available<M: SharedMemory + ?Sized>(&mut self, mem: &M) -> Result<u64, RingError> {
        let head = self.ring.load_head(mem)?;
        let tail = self.ring.load_tail(mem)?;
        if tail != self.tail || head < self.head {
            return Err(self.ring.corrupt(head, tail));
        }
        let n = used(head, tail, self.ring.capacity)?;
        self.head = head;
        Ok(n)
    }

    /// The bytes known to be there for `want`: from the last `head` seen if enough (checking
    /// only this side's own index), else [`Consumer::available`].
    fn ready<M: SharedMemory + ?Sized>(&mut self, mem: &M, want: u64) -> Result<u64, RingError> {
        // Invariant: tail ≤ head ≤ tail + capacity (validated when they were read).
        let known = self.head - self.tail;
        if known >= want {
            let tail = self.ring.load_tail(mem)?;
            if tail != self.tail {
                return Err(self.ring.corrupt(self.head, tail));
            }
            return Ok(known);
        }
        self.available(mem)
    }

    /// Stores `tail` = `new` (SeqCst: release for the bytes copied out before it, so the
    /// producer cannot overwrite them early; sequentially consistent for waking, as
    /// [`Producer::publish`]).
    fn take<M: SharedMemory + ?Sized>(&mut self, mem: &M, new: u64) -> Result<(), RingError> {
        mem.store_u64(self.ring.offset + TAIL_OFF, new, Ordering::SeqCst)?;
        self.tail = new;
        Ok(())
    }

    /// Copies up to `buf.len()` published bytes out and takes them; returns how many (0: the
    /// ring is empty). Never blocks.
    pub fn read<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<usize, RingError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let ready = self.ready(mem, buf.len() as u64)?;
        let n = usize::try_from(ready).map_or(buf.len(), |r| r.min(buf.len()));
        if n == 0 {
            return Ok(0);
        }
        let new = self
            .tail
            .checked_add(n as u64)
            .ok_or(self.ring.corrupt(self.head, self.tail))?;
        self.ring.copy_out(mem, self.tail, &mut buf[..n])?;
        self.take(mem, new)?;
        Ok(n)
    }

    /// The length of the next frame, if one is there (checked: at most `capacity − 4`, and
    /// published whole).
    pub fn peek_frame<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
    ) -> Result<Option<u64>, RingError> {
        let available = self.ready(mem, FRAME_PREFIX)?;
        let capacity = self.ring.capacity;
        if available == 0 {
            return Ok(None);
        }
        if available < FRAME_PREFIX {
            return Err(RingError::CorruptFrame {
                len: None,
                available,
                capacity,
            });
        }
        let mut prefix = [0u8; 4];
        self.ring.copy_out(mem, self.tail, &mut prefix)?;
        let len = u32::from_le_bytes(prefix);
        let bad = RingError::CorruptFrame {
            len: Some(len),
            available,
            capacity,
        };
        let need = FRAME_PREFIX + u64::from(len);
        if u64::from(len) > self.ring.max_frame() {
            return Err(bad);
        }
        // The frame was published whole; a longer length than what is there is a forgery
        // (or bytes written with `write`), unless `head` moved on since we looked.
        if need > available && need > self.available(mem)? {
            return Err(RingError::CorruptFrame {
                len: Some(len),
                available: self.head - self.tail,
                capacity,
            });
        }
        Ok(Some(u64::from(len)))
    }

    /// Receives the next frame into `buf`; returns its length, or `None` if no frame is
    /// there. A `buf` shorter than the frame: [`RingError::BufferTooSmall`], and the frame
    /// stays. Never blocks.
    pub fn recv_frame<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        buf: &mut [u8],
    ) -> Result<Option<usize>, RingError> {
        let Some(len) = self.peek_frame(mem)? else {
            return Ok(None);
        };
        let have = buf.len() as u64;
        let n = match usize::try_from(len) {
            Ok(n) if len <= have => n,
            _ => return Err(RingError::BufferTooSmall { need: len, have }),
        };
        let corrupt = self.ring.corrupt(self.head, self.tail);
        let body = self.tail.checked_add(FRAME_PREFIX).ok_or(corrupt)?;
        let new = body.checked_add(len).ok_or(corrupt)?;
        self.ring.copy_out(mem, body, &mut buf[..n])?;
        self.take(mem, new)?;
        Ok(Some(n))
    }
}
