//! The name index (docs/FORMAT.md §5a): a host-published open-addressing hash table that
//! maps a name's hash to the object slots that may hold it, so a lookup by name probes a
//! few entries instead of scanning the object table.
//!
//! The index is only a hint. A reader probes from the name's home position, and for each
//! entry whose hash matches it reads the object entry with the ordinary seqlocked snapshot
//! and the ordinary validation ([`crate::object`]): the entry decides, exactly as in the
//! linear scan. What the index adds is *where to stop*: an EMPTY entry ends the probe, and
//! "not found" is answered only if the index's own sequence word was even and unchanged
//! over the whole probe. Every index value read is decoded against `max_objects`, every
//! probe is bounded by the index size, and a probe that is not conclusive (the sequence
//! kept moving, or no EMPTY entry was met: a scribbled index) falls back to the linear scan.
//!
//! The host ([`HostIndex`], std only) keeps a private mirror of the index, writes each
//! change with one atomic store, rebuilds it under the sequence word when tombstones pile
//! up, and heals it from the mirror like the rest of the header.

use core::sync::atomic::{fence, Ordering};

use crate::ids::ObjectSlot;
use crate::layout::{Layout, MAX_OBJECTS_LIMIT};
use crate::shm::{Fault, SharedMemory};

/// Bytes before the first entry: the sequence word (u64) and 56 reserved bytes, one cache
/// line of its own.
pub const INDEX_HEADER_SIZE: u64 = 64;
/// Bytes per entry (one u64, read and written with single atomic accesses).
pub const INDEX_ENTRY_SIZE: u64 = 8;
/// An entry that never held anything since the last rebuild: a probe stops here.
pub const INDEX_EMPTY: u64 = 0;
/// An entry whose name went away: a probe goes on past it; the host may reuse it.
pub const INDEX_TOMBSTONE: u64 = u64::MAX;
/// Fewest entries an index has (a region with very few objects still gets short probes).
pub const MIN_INDEX_SLOTS: u32 = 16;
/// How many times a lookup probes again after the sequence word moved under it (a rebuild
/// or a heal) before it falls back to scanning the object table.
pub const INDEX_TRIES: u32 = 8;
/// Bytes of the reserved part of the index header (after the sequence word).
pub const INDEX_RESERVED_LEN: usize = crate::layout::const_usize(INDEX_HEADER_SIZE - 8);
/// How long a lookup waits (spins) for an odd sequence word to become even, per try.
const ODD_SPINS: u32 = 10_000;

/// Entries in the name index of a table of `max_objects` objects: the next power of two at
/// least `2 × max_objects`, and at least [`MIN_INDEX_SLOTS`]. So the index is at most half
/// full of live names, and the host rebuilds it before live names and tombstones together
/// fill three quarters of it: every probe meets an EMPTY entry.
pub const fn index_slots(max_objects: u32) -> u32 {
    let n = if max_objects > MAX_OBJECTS_LIMIT {
        MAX_OBJECTS_LIMIT
    } else {
        max_objects
    };
    let twice = (n * 2).next_power_of_two();
    if twice < MIN_INDEX_SLOTS {
        MIN_INDEX_SLOTS
    } else {
        twice
    }
}

/// The entry naming object `slot` for a name with hash `hash`:
/// `(hash << 32) | (slot + 1)`.
pub const fn entry(hash: u32, slot: ObjectSlot) -> u64 {
    ((hash as u64) << 32) | (slot.0 as u64 + 1)
}

/// Where the probe for `hash` starts in an index of `slots` entries (a power of two):
/// Fibonacci hashing, the top `log2(slots)` bits of `hash × 0x9E3779B9` (mod 2³²), so every
/// bit of the name hash counts (FNV-1a's low bits depend only on the bytes' low bits).
pub const fn home(hash: u32, slots: u32) -> u32 {
    let bits = slots.trailing_zeros();
    if bits == 0 {
        return 0;
    }
    hash.wrapping_mul(0x9E37_79B9) >> (32 - bits)
}

/// The next position after `pos` (wrapping) in an index of `slots` entries.
const fn next(pos: u32, slots: u32) -> u32 {
    (pos + 1) & (slots - 1)
}

/// What one index entry says, decoded against `max_objects`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexWord {
    /// [`INDEX_EMPTY`]: the end of every probe that reaches it.
    Empty,
    /// [`INDEX_TOMBSTONE`]: a removed name; probes go on.
    Tombstone,
    /// A name with this hash may live in this slot (the entry decides).
    Points {
        /// The name hash.
        hash: u32,
        /// The object slot (below `max_objects`).
        slot: ObjectSlot,
    },
    /// Anything else (a slot number out of range): never written by the host; a probe
    /// treats it as a taken entry that matches nothing.
    Invalid(u64),
}

/// Decodes one entry value read from the region.
pub fn decode(v: u64, max_objects: u32) -> IndexWord {
    match v {
        INDEX_EMPTY => IndexWord::Empty,
        INDEX_TOMBSTONE => IndexWord::Tombstone,
        _ => {
            #[allow(clippy::cast_possible_truncation)] // the two halves of a u64
            let (hash, plus1) = ((v >> 32) as u32, v as u32);
            if plus1 == 0 || plus1 > max_objects {
                IndexWord::Invalid(v)
            } else {
                IndexWord::Points {
                    hash,
                    slot: ObjectSlot(plus1 - 1),
                }
            }
        }
    }
}

/// What a probe of the index concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe<T> {
    /// A candidate the caller's check accepted.
    Found(T),
    /// Reached an EMPTY entry with the sequence word even and unchanged, and no candidate
    /// was busy: the name is not there.
    NotFound,
    /// As `NotFound`, but a candidate's entry was busy (the host kept rewriting it): it may
    /// be the one wanted, look again.
    Busy,
    /// The index could not answer (its sequence word kept moving or stayed odd, or the
    /// probe met no EMPTY entry): scan the table instead.
    Inconclusive,
}

/// What the caller's check made of one candidate slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Candidate<T> {
    /// This is it.
    Match(T),
    /// Not this one (another name, not LIVE, closed, invalid).
    Other,
    /// Its entry was busy: it might be the one.
    Busy,
}

/// Probes the index of a validated `layout` for `hash`, calling `check` on every slot an
/// entry with that hash points to, in probe order. At most [`INDEX_TRIES`] passes of at most
/// `index_slots` entries each; never reads outside the index, whatever its contents.
pub fn probe<M, T, E>(
    mem: &M,
    layout: &Layout,
    hash: u32,
    mut check: impl FnMut(ObjectSlot) -> Result<Candidate<T>, E>,
) -> Result<Probe<T>, E>
where
    M: SharedMemory + ?Sized,
    E: From<Fault>,
{
    let slots = layout.index_slots;
    if !slots.is_power_of_two() {
        return Ok(Probe::Inconclusive);
    }
    let seq_off = layout.index_seq();
    'tries: for _ in 0..INDEX_TRIES {
        let mut s1 = mem.load_u64(seq_off, Ordering::Acquire)?;
        let mut spins = 0;
        while s1 & 1 == 1 {
            spins += 1;
            if spins > ODD_SPINS {
                continue 'tries;
            }
            core::hint::spin_loop();
            s1 = mem.load_u64(seq_off, Ordering::Acquire)?;
        }
        let mut busy = false;
        let mut pos = home(hash, slots);
        let mut ended = false;
        for _ in 0..slots {
            let off = layout.index_entry(pos).ok_or(Fault::OutOfBounds {
                offset: u64::from(pos),
                len: INDEX_ENTRY_SIZE,
            })?;
            match decode(mem.load_u64(off, Ordering::Acquire)?, layout.max_objects) {
                IndexWord::Empty => {
                    ended = true;
                    break;
                }
                IndexWord::Points { hash: h, slot } if h == hash => match check(slot)? {
                    Candidate::Match(found) => return Ok(Probe::Found(found)),
                    Candidate::Busy => busy = true,
                    Candidate::Other => {}
                },
                _ => {}
            }
            pos = next(pos, slots);
        }
        if !ended {
            // Every entry taken: only a scribbled index looks like this.
            return Ok(Probe::Inconclusive);
        }
        fence(Ordering::Acquire);
        if mem.load_u64(seq_off, Ordering::Relaxed)? != s1 {
            continue;
        }
        return Ok(if busy { Probe::Busy } else { Probe::NotFound });
    }
    Ok(Probe::Inconclusive)
}

/// The positions of `hash`'s probe path in a private copy of `words` (a power-of-two
/// length), each once, with the word there; empty for any other length.
fn probe_path(words: &[u64], hash: u32) -> impl Iterator<Item = (u32, u64)> + '_ {
    let slots = u32::try_from(words.len())
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(0);
    let start = if slots == 0 { 0 } else { home(hash, slots) };
    (0..slots).filter_map(move |i| {
        let pos = (start + i) & (slots - 1);
        words.get(pos as usize).map(|&w| (pos, w))
    })
}

/// The host's first free position (EMPTY or TOMBSTONE) on the probe path of `hash` in
/// `words` (a power-of-two length); `None` if every entry is taken.
pub fn free_position(words: &[u64], hash: u32) -> Option<u32> {
    probe_path(words, hash)
        .find(|&(_, w)| w == INDEX_EMPTY || w == INDEX_TOMBSTONE)
        .map(|(pos, _)| pos)
}

/// Where `word` (an entry for `hash`) sits in `words`: probes from its home to the first
/// EMPTY entry. `None` if it is not reachable there.
pub fn position_of(words: &[u64], hash: u32, word: u64) -> Option<u32> {
    probe_path(words, hash)
        .take_while(|&(_, w)| w == word || w != INDEX_EMPTY)
        .find(|&(_, w)| w == word)
        .map(|(pos, _)| pos)
}

/// Host: stores one entry (release; no sequence change: inserts and removals never move
/// another entry, FORMAT.md §5a).
pub fn store_entry<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    pos: u32,
    word: u64,
) -> Result<(), Fault> {
    let off = layout.index_entry(pos).ok_or(Fault::OutOfBounds {
        offset: u64::from(pos),
        len: INDEX_ENTRY_SIZE,
    })?;
    mem.store_u64(off, word, Ordering::Release)
}

/// Host: rewrites the whole published index to `words` under its sequence word (odd while
/// writing, then even), zeroing the reserved header bytes; only entries that differ are
/// stored. The sequence moves past both what is published and `floor` (the host's last
/// value), so it never goes back. Returns the new (even) sequence value.
pub fn rewrite<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    words: &[u64],
    floor: u64,
) -> Result<u64, Fault> {
    let seq_off = layout.index_seq();
    let cur = mem.load_u64(seq_off, Ordering::Relaxed)?;
    let odd = cur.max(floor).wrapping_add(1) | 1;
    mem.store_u64(seq_off, odd, Ordering::Relaxed)?;
    fence(Ordering::Release);
    mem.zero(seq_off + 8, INDEX_HEADER_SIZE - 8)?;
    for (pos, &w) in (0..layout.index_slots).zip(words) {
        let off = layout.index_entry(pos).ok_or(Fault::OutOfBounds {
            offset: u64::from(pos),
            len: INDEX_ENTRY_SIZE,
        })?;
        if mem.load_u64(off, Ordering::Relaxed)? != w {
            mem.store_u64(off, w, Ordering::Relaxed)?;
        }
    }
    let even = odd.wrapping_add(1);
    mem.store_u64(seq_off, even, Ordering::Release)?;
    Ok(even)
}

#[cfg(any(feature = "std", test))]
mod host;
#[cfg(any(feature = "std", test))]
pub use host::HostIndex;

#[cfg(test)]
mod tests;
