//! The host's side of the name index: a private mirror of what it published, the only
//! thing it ever compares the region with.

use std::vec::Vec;

use core::sync::atomic::Ordering;

use super::{
    entry, free_position, position_of, rewrite, store_entry, INDEX_EMPTY, INDEX_RESERVED_LEN,
    INDEX_TOMBSTONE,
};
use crate::ids::ObjectSlot;
use crate::layout::Layout;
use crate::shm::{Fault, SharedMemory};

/// The host's private copy of the name index and its sequence word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIndex {
    words: Vec<u64>,
    /// Entries not EMPTY (live names and tombstones).
    used: u32,
    /// The sequence value last published (even).
    seq: u64,
    /// The region holds what the mirror says (as far as the host knows: a scribble is
    /// heal's business). False for a mirror built from records over someone else's index
    /// (a takeover that could not adopt it): then the first change publishes the whole
    /// mirror under the sequence word instead of storing one entry into an index laid out
    /// differently.
    in_sync: bool,
}

impl HostIndex {
    /// An empty index for `layout` (what a freshly zeroed header holds: all EMPTY, seq 0).
    pub fn new(layout: &Layout) -> HostIndex {
        HostIndex {
            words: std::vec![INDEX_EMPTY; layout.index_slots as usize],
            used: 0,
            seq: 0,
            in_sync: true,
        }
    }

    /// The index holding exactly `live` (hash, slot) pairs, inserted in the order given,
    /// not yet published (a heal or [`HostIndex::publish`] writes it).
    pub fn build(layout: &Layout, live: impl IntoIterator<Item = (u32, ObjectSlot)>) -> Self {
        let mut ix = HostIndex::new(layout);
        for (hash, slot) in live {
            ix.place(entry(hash, slot), hash);
        }
        ix.in_sync = false;
        ix
    }

    /// The published index of `mem`, if it is a correct index of exactly the `live` (hash,
    /// slot) pairs: every entry EMPTY, TOMBSTONE or one of them, each of them exactly once
    /// and reachable from its home without crossing an EMPTY entry, the sequence word even
    /// and the reserved bytes zero. A new vshmd process taking over (or recovering) adopts
    /// it; otherwise it builds its own and heal rewrites the region's.
    pub fn adopt<M: SharedMemory + ?Sized>(
        mem: &M,
        layout: &Layout,
        live: &[(u32, ObjectSlot)],
    ) -> Option<HostIndex> {
        let seq = mem.load_u64(layout.index_seq(), Ordering::Acquire).ok()?;
        if seq & 1 == 1 {
            return None;
        }
        let mut reserved = [0u8; INDEX_RESERVED_LEN];
        mem.read_bytes(layout.index_seq() + 8, &mut reserved).ok()?;
        if reserved.iter().any(|&b| b != 0) {
            return None;
        }
        let mut words = Vec::with_capacity(layout.index_slots as usize);
        for pos in 0..layout.index_slots {
            words.push(
                mem.load_u64(layout.index_entry(pos)?, Ordering::Acquire)
                    .ok()?,
            );
        }
        let want: std::collections::BTreeMap<u64, u32> =
            live.iter().map(|&(h, s)| (entry(h, s), h)).collect();
        let mut used = 0u32;
        for &w in &words {
            if w == INDEX_EMPTY {
                continue;
            }
            used += 1;
            if w != INDEX_TOMBSTONE && !want.contains_key(&w) {
                return None; // a stale, duplicate or foreign entry
            }
        }
        for (&w, &h) in &want {
            position_of(&words, h, w)?;
        }
        let live_count = u32::try_from(live.len()).ok()?;
        let placed = words
            .iter()
            .filter(|&&w| w != INDEX_EMPTY && w != INDEX_TOMBSTONE)
            .count();
        if placed != live.len() || used > Self::limit(layout.index_slots).max(live_count) {
            return None;
        }
        Some(HostIndex {
            words,
            used,
            seq,
            in_sync: true,
        })
    }

    /// Most entries (live and tombstones) before the host rebuilds: three quarters.
    fn limit(slots: u32) -> u32 {
        slots / 4 * 3
    }

    /// The entries as published.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// The sequence value last published.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Live names indexed.
    pub fn live(&self) -> usize {
        self.words
            .iter()
            .filter(|&&w| w != INDEX_EMPTY && w != INDEX_TOMBSTONE)
            .count()
    }

    /// Puts `word` in the mirror only; returns its position.
    fn place(&mut self, word: u64, hash: u32) -> Option<u32> {
        let pos = free_position(&self.words, hash)?;
        let cell = self.words.get_mut(pos as usize)?;
        if *cell == INDEX_EMPTY {
            self.used += 1;
        }
        *cell = word;
        Some(pos)
    }

    /// A name with `hash` now lives in `slot`: adds the entry (one atomic store), first
    /// rebuilding the index if live names and tombstones would fill three quarters of it.
    /// Called before the object entry is published LIVE (FORMAT.md §5a).
    pub fn insert<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        layout: &Layout,
        hash: u32,
        slot: ObjectSlot,
    ) -> Result<(), Fault> {
        let word = entry(hash, slot);
        if position_of(&self.words, hash, word).is_some() {
            return Ok(());
        }
        if self.used >= Self::limit(layout.index_slots) {
            self.rebuild(mem, layout)?;
        }
        let pos = self.place(word, hash).ok_or(Fault::OutOfBounds {
            offset: u64::from(slot.0),
            len: 0,
        })?;
        if self.in_sync {
            store_entry(mem, layout, pos, word)
        } else {
            self.publish(mem, layout)
        }
    }

    /// The name with `hash` in `slot` is gone (unlinked or destroyed): its entry becomes a
    /// TOMBSTONE (one atomic store; nothing moves). Called after the object entry stopped
    /// being LIVE. Returns whether there was an entry.
    pub fn remove<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        layout: &Layout,
        hash: u32,
        slot: ObjectSlot,
    ) -> Result<bool, Fault> {
        let Some(pos) = position_of(&self.words, hash, entry(hash, slot)) else {
            return Ok(false);
        };
        if let Some(cell) = self.words.get_mut(pos as usize) {
            *cell = INDEX_TOMBSTONE;
        }
        if self.in_sync {
            store_entry(mem, layout, pos, INDEX_TOMBSTONE)?;
        } else {
            self.publish(mem, layout)?;
        }
        Ok(true)
    }

    /// Drops the tombstones: re-inserts the live entries into an empty mirror and publishes
    /// the result under the sequence word.
    pub fn rebuild<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        layout: &Layout,
    ) -> Result<(), Fault> {
        let live: Vec<u64> = self
            .words
            .iter()
            .copied()
            .filter(|&w| w != INDEX_EMPTY && w != INDEX_TOMBSTONE)
            .collect();
        self.words.fill(INDEX_EMPTY);
        self.used = 0;
        for w in live {
            #[allow(clippy::cast_possible_truncation)] // the high half of a u64
            self.place(w, (w >> 32) as u32);
        }
        self.publish(mem, layout)
    }

    /// Writes the whole mirror into the region under the sequence word.
    pub fn publish<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        layout: &Layout,
    ) -> Result<(), Fault> {
        self.seq = rewrite(mem, layout, &self.words, self.seq)?;
        self.in_sync = true;
        Ok(())
    }

    /// Compares the published index (sequence word, reserved bytes, entries) with the
    /// mirror and, if anything differs, rewrites it under the sequence word. Returns the
    /// first differing position (`None` for the header) if it rewrote, `Ok(None)` if clean.
    pub fn heal<M: SharedMemory + ?Sized>(
        &mut self,
        mem: &M,
        layout: &Layout,
    ) -> Result<Option<Option<u32>>, Fault> {
        let seq = mem.load_u64(layout.index_seq(), Ordering::Acquire)?;
        let mut reserved = [0u8; INDEX_RESERVED_LEN];
        mem.read_bytes(layout.index_seq() + 8, &mut reserved)?;
        // One volatile copy of all entries, compared with the mirror (a torn copy of an
        // entry being scribbled only differs, and then the index is rewritten anyway).
        let start = layout.index_entry(0).ok_or(Fault::OutOfBounds {
            offset: layout.index_table,
            len: 0,
        })?;
        let mut copy = std::vec![0u8; self.words.len() * 8];
        mem.read_bytes(start, &mut copy)?;
        let first = (0u32..)
            .zip(copy.chunks_exact(8).zip(&self.words))
            .find(|(_, (b, &w))| **b != w.to_le_bytes())
            .map(|(pos, _)| pos);
        let header_ok = seq == self.seq && reserved.iter().all(|&b| b == 0);
        if header_ok && first.is_none() {
            return Ok(None);
        }
        self.publish(mem, layout)?;
        Ok(Some(first))
    }
}
