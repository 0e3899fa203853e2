//! The allocator's operations: lock, initialise, allocate, free, grow the arena, rebuild.

use core::sync::atomic::Ordering;

use super::{
    block_shape_ok, decode, encode, hdr, head_off, lock_word, state, BlockError, Me, Peers, Tag,
    BLOCK_HEADER_SIZE, HEADER_SIZE, INCARNATION_MASK, MAGIC, MAGIC_INIT, MAX_ORDER, MIN_ORDER,
    VERSION,
};
use crate::ids::{PeerSlot, RegionOffset};
use crate::shm::{check_range, SharedMemory};

/// Offsets of the free-list links inside a free block.
const NEXT: u64 = 16;
const PREV: u64 = 24;
/// Merge passes a rebuild makes at most (each pass merges at least one level).
const MERGE_PASSES: u32 = MAX_ORDER - MIN_ORDER + 2;

/// An allocator in a section: where the section is in the region, how large it is now and
/// at most. Cheap to make; make one per operation with the section's current size.
#[derive(Debug)]
pub struct Heap<'m, M: SharedMemory + ?Sized> {
    mem: &'m M,
    base: u64,
    size: u64,
    max_size: u64,
    seed: u64,
    /// How far the arena may be tiled ([`Heap::extend_at_most_to`]).
    extend_to: u64,
}

/// The lock, held: every mutation goes through it. Dropping it releases the lock (a CAS from
/// the holder's word to 0, so a lock that was broken meanwhile stays with its breaker).
#[derive(Debug)]
pub struct Guard<'h, 'm, M: SharedMemory + ?Sized> {
    heap: &'h Heap<'m, M>,
    peers: &'h dyn Peers,
    word: u64,
    heap_id: u64,
    covered: u64,
    recovered: bool,
}

impl core::fmt::Debug for dyn Peers + '_ {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Peers")
    }
}

impl<'m, M: SharedMemory + ?Sized> Heap<'m, M> {
    /// The allocator of the section at `section` (region offset) of `size` bytes now, at most
    /// `max_size`. `seed` makes the heap id if this call initialises it (the section's
    /// generation is a good one: it tells sections apart).
    pub fn new(
        mem: &'m M,
        section: RegionOffset,
        size: u64,
        max_size: u64,
        seed: u64,
    ) -> Result<Heap<'m, M>, BlockError> {
        if size > max_size {
            return Err(BlockError::BadParameter);
        }
        check_range(mem.size(), section.0, size)?;
        Ok(Heap {
            mem,
            base: section.0,
            size,
            max_size,
            seed,
            extend_to: u64::MAX,
        })
    }

    /// Tiles the arena no further than `limit` bytes, whatever `size` says. The arena never
    /// shrinks, so it must only grow to a size the section really has: pass the size the
    /// host vouched for (a grow reply), not one read from the object entry, which any peer
    /// can scribble for the moment until the host heals it (docs/FORMAT.md §6b).
    #[must_use]
    pub fn extend_at_most_to(mut self, limit: u64) -> Self {
        self.extend_to = limit;
        self
    }

    fn at(&self, off: u64, len: u64) -> Result<u64, BlockError> {
        check_range(self.size, off, len)?;
        // Cannot overflow: [base, base + size) was checked against the mapping in `new`.
        Ok(self.base + off)
    }
    fn load(&self, off: u64) -> Result<u64, BlockError> {
        Ok(self.mem.load_u64(self.at(off, 8)?, Ordering::SeqCst)?)
    }
    fn store(&self, off: u64, v: u64) -> Result<(), BlockError> {
        Ok(self.mem.store_u64(self.at(off, 8)?, v, Ordering::SeqCst)?)
    }
    fn cas(&self, off: u64, cur: u64, new: u64) -> Result<Result<u64, u64>, BlockError> {
        Ok(self.mem.cas_u64(self.at(off, 8)?, cur, new)?)
    }

    /// The smallest section that can hold an allocator with one minimum block.
    fn min_size() -> u64 {
        HEADER_SIZE * 2
    }

    /// One attempt at the lock: `Busy` if a live taker holds it. Breaks the lock of a dead
    /// taker and then rebuilds the lists; initialises a zero section; grows the arena to the
    /// section's size; sweeps the owned blocks of gone peers when the peer table changed.
    pub fn lock<'h>(
        &'h self,
        me: Me,
        peers: &'h dyn Peers,
    ) -> Result<Guard<'h, 'm, M>, BlockError> {
        if self.size < Self::min_size() {
            return Err(self.grow_to(Self::min_size()));
        }
        let magic = self.load(hdr::MAGIC)?;
        match magic {
            MAGIC | MAGIC_INIT => {}
            0 if self.zero_but_lock()? => {}
            _ => return Err(BlockError::NotAHeap),
        }
        let word = lock_word(me);
        let recovered = match self.cas(hdr::LOCK, 0, word)? {
            Ok(_) => false,
            Err(owner) if owner != word && self.taker_gone(owner, me, peers) => {
                if self.cas(hdr::LOCK, owner, word)?.is_err() {
                    return Err(BlockError::Busy { owner });
                }
                true
            }
            Err(owner) => return Err(BlockError::Busy { owner }),
        };
        let mut guard = Guard {
            heap: self,
            peers,
            word,
            heap_id: 0,
            covered: 0,
            recovered,
        };
        guard.prepare()?;
        Ok(guard)
    }

    /// The header bytes are all zero except perhaps the lock (a fresh section, or an
    /// initialiser that died right after taking the lock).
    fn zero_but_lock(&self) -> Result<bool, BlockError> {
        for off in (0..HEADER_SIZE).step_by(8) {
            if off != hdr::LOCK && self.load(off)? != 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether the taker named by lock word `owner` is known gone.
    fn taker_gone(&self, owner: u64, me: Me, peers: &dyn Peers) -> bool {
        let slot_plus_1 = owner & 0xFF;
        if slot_plus_1 == 0 {
            return true; // malformed: nobody
        }
        #[allow(clippy::cast_possible_truncation)] // masked to 8 and 32 bits
        let (slot, token) = (PeerSlot(slot_plus_1 as u32 - 1), (owner >> 32) as u32);
        let inc = (owner >> 8) & INCARNATION_MASK;
        if !peers.attached(slot, inc, INCARNATION_MASK) {
            return true;
        }
        slot == me.slot
            && inc == me.incarnation & INCARNATION_MASK
            && token != me.token
            && !peers.token_alive(token)
    }

    /// `NeedGrow` to `min`, or `NoMemory` past the max size.
    fn grow_to(&self, min: u64) -> BlockError {
        if min > self.max_size {
            BlockError::NoMemory
        } else {
            BlockError::NeedGrow { min_size: min }
        }
    }
}

/// The header word of a block.
fn tag(state: u8, order: u32, owner: u8, lead: u8) -> Tag {
    #[allow(clippy::cast_possible_truncation)] // orders are ≤ 47
    Tag {
        state,
        order: order as u8,
        owner,
        lead,
    }
}

impl<M: SharedMemory + ?Sized> Drop for Guard<'_, '_, M> {
    fn drop(&mut self) {
        let _ = self.heap.cas(hdr::LOCK, self.word, 0);
    }
}

impl<M: SharedMemory + ?Sized> Guard<'_, '_, M> {
    /// Whether taking the lock broke a dead taker's lock (and rebuilt the lists).
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// The heap id (salts the block check values; tells allocators apart).
    pub fn heap_id(&self) -> u64 {
        self.heap_id
    }

    fn prepare(&mut self) -> Result<(), BlockError> {
        let h = self.heap;
        let magic = h.load(hdr::MAGIC)?;
        if magic != MAGIC {
            if magic != 0 && magic != MAGIC_INIT {
                return Err(BlockError::NotAHeap);
            }
            return self.init();
        }
        if h.mem.load_u32(h.at(hdr::VERSION, 4)?, Ordering::SeqCst)? != VERSION {
            return Err(BlockError::BadHeader("unknown version"));
        }
        self.heap_id = h.load(hdr::HEAP_ID)?;
        if self.heap_id == 0 {
            return Err(BlockError::BadHeader("heap id 0"));
        }
        let covered = h.load(hdr::COVERED)?;
        if covered < HEADER_SIZE || covered % (1 << MIN_ORDER) != 0 || covered > h.max_size {
            return Err(BlockError::BadHeader("arena end"));
        }
        if covered > h.size {
            return Err(BlockError::Stale);
        }
        self.covered = covered;
        if self.recovered {
            self.rebuild()?;
            self.add(hdr::RECOVERIES, 1, 0)?;
        }
        self.extend()?;
        if h.load(hdr::OWNED)? != 0 {
            let fp = self.peers.fingerprint();
            if fp != h.load(hdr::PEER_FP)? {
                self.sweep()?;
                // A departure not believed yet: a later operation looks again.
                if self.peers.settled() {
                    h.store(hdr::PEER_FP, fp)?;
                }
            }
        }
        Ok(())
    }

    /// Writes a fresh header (magic last) and tiles the section.
    fn init(&mut self) -> Result<(), BlockError> {
        let h = self.heap;
        h.store(hdr::MAGIC, MAGIC_INIT)?;
        for off in (8..HEADER_SIZE).step_by(8) {
            if off != hdr::LOCK {
                h.store(off, 0)?;
            }
        }
        h.mem
            .store_u32(h.at(hdr::VERSION, 4)?, VERSION, Ordering::SeqCst)?;
        #[allow(clippy::cast_possible_truncation)] // 512
        h.mem.store_u32(
            h.at(hdr::HEADER_SIZE, 4)?,
            HEADER_SIZE as u32,
            Ordering::SeqCst,
        )?;
        self.heap_id = mix(h.seed) | 1;
        h.store(hdr::HEAP_ID, self.heap_id)?;
        h.store(hdr::COVERED, HEADER_SIZE)?;
        self.covered = HEADER_SIZE;
        self.extend()?;
        h.store(hdr::MAGIC, MAGIC)
    }

    fn add(&self, off: u64, plus: u64, minus: u64) -> Result<(), BlockError> {
        let v = self.heap.load(off)?;
        self.heap
            .store(off, v.wrapping_add(plus).wrapping_sub(minus))
    }

    fn write_header(&self, o: u64, t: Tag, word1: u64) -> Result<(), BlockError> {
        self.heap.store(o + 8, word1)?;
        self.heap.store(o, encode(self.heap_id, o, t))
    }

    /// The validated block header at `o`, if it is one.
    fn block_at(&self, o: u64) -> Result<Option<Tag>, BlockError> {
        if o < HEADER_SIZE || o >= self.covered || o % BLOCK_HEADER_SIZE != 0 {
            return Ok(None);
        }
        let w = self.heap.load(o)?;
        Ok(decode(self.heap_id, o, w).filter(|t| block_shape_ok(o, *t, self.covered)))
    }

    fn is_free(&self, o: u64, order: u32) -> Result<bool, BlockError> {
        Ok(self
            .block_at(o)?
            .is_some_and(|t| t.state == state::FREE && u32::from(t.order) == order))
    }

    /// Tiles `[covered, size)` with new free blocks, one at a time: header, then the arena
    /// end (the commit), then the free list.
    fn extend(&mut self) -> Result<(), BlockError> {
        let end = self.heap.size.min(self.heap.extend_to) & !((1 << MIN_ORDER) - 1);
        while self.covered + (1 << MIN_ORDER) <= end {
            let p = self.covered;
            let mut k = p.trailing_zeros().min(MAX_ORDER);
            while p + (1 << k) > end {
                k -= 1;
            }
            self.write_header(p, tag(state::FREE, k, 0, 0), 0)?;
            self.covered = p + (1 << k);
            self.heap.store(hdr::COVERED, self.covered)?;
            self.add(hdr::FREE, 1 << k, 0)?;
            self.insert_or_rebuild(p, k)?;
        }
        Ok(())
    }

    /// Runs `op`; if it finds the lists inconsistent, rebuilds them and runs it once more.
    fn retry<R>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<R, Lists>,
    ) -> Result<R, BlockError> {
        match op(self) {
            Ok(r) => Ok(r),
            Err(Lists::Error(e)) => Err(e),
            Err(Lists::Corrupt) => {
                self.rebuild()?;
                match op(self) {
                    Ok(r) => Ok(r),
                    Err(Lists::Error(e)) => Err(e),
                    Err(Lists::Corrupt) => Err(BlockError::Inconsistent {
                        what: "free lists still inconsistent after a rebuild",
                        at: 0,
                    }),
                }
            }
        }
    }

    /// Lists free block `o` of `order`, whose FREE header is already committed, merging it
    /// with its free buddies. `None` if the lists turned out inconsistent: then they were
    /// rebuilt from the headers, which listed this block (merged) already. Re-running the
    /// insert after the rebuild would list it a second time: its header may by then be a
    /// stale one inside a merged free block, and two allocations would overlap.
    fn insert_or_rebuild(&mut self, o: u64, order: u32) -> Result<Option<(u64, u32)>, BlockError> {
        match self.insert_free(o, order) {
            Ok(r) => Ok(Some(r)),
            Err(Lists::Error(e)) => Err(e),
            Err(Lists::Corrupt) => {
                self.rebuild()?;
                Ok(None)
            }
        }
    }

    /// Pushes free block `o` of `order` on its list.
    fn push(&self, o: u64, order: u32) -> Result<(), Lists> {
        let h = self.heap;
        let head = h.load(head_off(order))?;
        if head != 0 && !self.is_free(head, order)? {
            return Err(Lists::Corrupt);
        }
        h.store(o + NEXT, head)?;
        h.store(o + PREV, 0)?;
        if head != 0 {
            h.store(head + PREV, o)?;
        }
        h.store(head_off(order), o)?;
        Ok(())
    }

    /// Takes free block `o` of `order` off its list, checking its neighbours first.
    fn unlink(&self, o: u64, order: u32) -> Result<(), Lists> {
        let h = self.heap;
        let (next, prev) = (h.load(o + NEXT)?, h.load(o + PREV)?);
        let prev_ok = if prev == 0 {
            h.load(head_off(order))? == o
        } else {
            self.is_free(prev, order)? && h.load(prev + NEXT)? == o
        };
        let next_ok = next == 0 || (self.is_free(next, order)? && h.load(next + PREV)? == o);
        if !prev_ok || !next_ok || next == o {
            return Err(Lists::Corrupt);
        }
        if prev == 0 {
            h.store(head_off(order), next)?;
        } else {
            h.store(prev + NEXT, next)?;
        }
        if next != 0 {
            h.store(next + PREV, prev)?;
        }
        Ok(())
    }

    /// Merges free block `o` of `order` with its free buddies, then lists the result.
    /// Returns the block it ended up in.
    fn insert_free(&self, mut o: u64, mut order: u32) -> Result<(u64, u32), Lists> {
        while order < MAX_ORDER {
            let size = 1u64 << order;
            let buddy = o ^ size;
            let lo = o.min(buddy);
            if lo < HEADER_SIZE || lo + 2 * size > self.covered || !self.is_free(buddy, order)? {
                break;
            }
            self.unlink(buddy, order)?;
            // The merge is this one store. The upper half's header stays as it was (FREE):
            // no walk reads inside a block, and a second free of it reports a double free.
            self.heap.store(
                lo,
                encode(self.heap_id, lo, tag(state::FREE, order + 1, 0, 0)),
            )?;
            o = lo;
            order += 1;
        }
        self.push(o, order)?;
        Ok((o, order))
    }

    /// Allocates a block with at least `size` bytes of data aligned (from the section's
    /// start) to `align`, tagged with `owner` (peer slot, incarnation) if given. Returns the
    /// data's section offset and its usable size.
    pub fn allocate(
        &mut self,
        size: u64,
        align: u64,
        owner: Option<(PeerSlot, u64)>,
    ) -> Result<(u64, u64), BlockError> {
        let (order, lead) = order_for(size, align)?;
        let owner_byte = match owner {
            None => 0,
            Some((s, _)) => u8::try_from(s.0 + 1).map_err(|_| BlockError::BadParameter)?,
        };
        let found = self.retry(|g| {
            let Some(j) =
                (order..=MAX_ORDER).find(|&j| g.heap.load(head_off(j)).is_ok_and(|h| h != 0))
            else {
                return Ok(None);
            };
            let o = g.heap.load(head_off(j))?;
            if !g.is_free(o, j)? {
                return Err(Lists::Corrupt);
            }
            g.unlink(o, j)?;
            Ok(Some((o, j)))
        })?;
        let Some((o, mut j)) = found else {
            return Err(self.need_grow(order)?);
        };
        // Split down: the upper half's header first, then this block's order (the commit).
        while j > order {
            j -= 1;
            let upper = o + (1 << j);
            self.write_header(upper, tag(state::FREE, j, 0, 0), 0)?;
            self.heap
                .store(o, encode(self.heap_id, o, tag(state::FREE, j, 0, 0)))?;
            self.retry(|g| g.push(upper, j))?;
        }
        let lead_log = lead.trailing_zeros();
        #[allow(clippy::cast_possible_truncation)] // ≤ 46
        let lead_byte = lead_log as u8;
        if lead > BLOCK_HEADER_SIZE {
            let at = o + lead - BLOCK_HEADER_SIZE;
            self.heap.store(at + 8, 0)?;
            self.heap.store(
                at,
                encode(self.heap_id, at, tag(state::LEAD, 0, 0, lead_byte)),
            )?;
        }
        let inc = owner.map_or(0, |(_, i)| i);
        self.write_header(o, tag(state::USED, order, owner_byte, lead_byte), inc)?;
        let bsize = 1u64 << order;
        self.add(hdr::IN_USE, bsize, 0)?;
        self.add(hdr::FREE, 0, bsize)?;
        self.add(hdr::BLOCKS, 1, 0)?;
        if owner.is_some() {
            if self.heap.load(hdr::OWNED)? == 0 {
                self.heap.store(hdr::PEER_FP, self.peers.fingerprint())?;
            }
            self.add(hdr::OWNED, 1, 0)?;
        }
        Ok((o + lead, bsize - lead))
    }

    /// How large the section must grow for a block of `order` to fit.
    fn need_grow(&self, order: u32) -> Result<BlockError, BlockError> {
        let size = 1u64 << order;
        let covered = self.covered;
        // The node [a, a + size) that ends past the arena: if its part inside the arena is
        // all free, growing to its end is enough (the new blocks merge with that part).
        let a = covered & !(size - 1);
        let mut tail_free = a >= HEADER_SIZE && a < covered;
        let mut p = a;
        while tail_free && p < covered {
            match self.block_at(p)? {
                Some(t) if t.state == state::FREE => p += t.size(),
                _ => tail_free = false,
            }
        }
        let start = if tail_free {
            a
        } else {
            covered
                .checked_add(size - 1)
                .map(|c| c & !(size - 1))
                .ok_or(BlockError::NoMemory)?
        };
        Ok(self
            .heap
            .grow_to(start.checked_add(size).ok_or(BlockError::NoMemory)?))
    }

    /// Finds the block whose data is at `data`, validating everything before trusting it.
    fn resolve(&self, data: u64) -> Result<(u64, Tag), BlockError> {
        let not = BlockError::NotABlock { offset: data };
        let h = data.checked_sub(BLOCK_HEADER_SIZE).ok_or(not)?;
        if h < HEADER_SIZE || h >= self.covered || h % BLOCK_HEADER_SIZE != 0 {
            return Err(not);
        }
        let w = self.heap.load(h)?;
        let t = decode(self.heap_id, h, w).ok_or(not)?;
        if t.state == state::FREE {
            return Err(BlockError::DoubleFree { offset: data });
        }
        let (o, t) = if t.state == state::LEAD {
            let lead = 1u64
                .checked_shl(u32::from(t.lead))
                .filter(|&l| l > BLOCK_HEADER_SIZE)
                .ok_or(not)?;
            let o = data.checked_sub(lead).ok_or(not)?;
            let bt = self.block_at(o)?.ok_or(not)?;
            if bt.state == state::FREE {
                return Err(BlockError::DoubleFree { offset: data });
            }
            if bt.lead != t.lead || lead >= bt.size() {
                return Err(not);
            }
            (o, bt)
        } else {
            if !block_shape_ok(h, t, self.covered) || t.lead != 4 {
                return Err(not);
            }
            (h, t)
        };
        Ok((o, t))
    }

    /// Frees the block whose data is at `data`. `size`, if given, must be its usable size.
    /// Returns the usable size freed.
    pub fn free(&mut self, data: u64, size: Option<u64>) -> Result<u64, BlockError> {
        let (o, t) = self.resolve(data)?;
        let usable = t.size() - (1u64 << t.lead);
        if size.is_some_and(|s| s != usable) {
            return Err(BlockError::WrongSize { size: usable });
        }
        self.release(o, t)?;
        Ok(usable)
    }

    /// The usable size of the block whose data is at `data` (validated, as free does).
    pub fn block_size(&self, data: u64) -> Result<u64, BlockError> {
        let (_, t) = self.resolve(data)?;
        Ok(t.size() - (1u64 << t.lead))
    }

    /// Marks used block `o` free (the commit), counts it, merges and lists it. Returns the
    /// free block it ended up in, `None` if the lists were rebuilt meanwhile.
    fn release(&mut self, o: u64, t: Tag) -> Result<Option<(u64, u32)>, BlockError> {
        let order = u32::from(t.order);
        self.heap
            .store(o, encode(self.heap_id, o, tag(state::FREE, order, 0, 0)))?;
        self.add(hdr::IN_USE, 0, t.size())?;
        self.add(hdr::FREE, t.size(), 0)?;
        self.add(hdr::BLOCKS, 0, 1)?;
        if t.owner != 0 {
            self.add(hdr::OWNED, 0, 1)?;
        }
        self.insert_or_rebuild(o, order)
    }

    /// Frees the owned blocks whose owner is gone. A walk: only when the peer table changed
    /// and owned blocks exist. Stops quietly at a header that does not validate.
    fn sweep(&mut self) -> Result<(), BlockError> {
        let mut p = HEADER_SIZE;
        while p < self.covered {
            let Some(t) = self.block_at(p)? else {
                return Ok(());
            };
            if t.state == state::USED && t.owner != 0 {
                let inc = self.heap.load(p + 8)?;
                let owner = PeerSlot(u32::from(t.owner) - 1);
                if !self.peers.attached(owner, inc, u64::MAX) {
                    let merged = self.release(p, t)?;
                    self.add(hdr::RECLAIMED, 1, 0)?;
                    // After a rebuild the merges are unknown: walk again from the start
                    // (the block just freed is FREE now, so this ends).
                    p = merged.map_or(HEADER_SIZE, |(lo, k)| lo + (1u64 << k));
                    continue;
                }
            }
            p += t.size();
        }
        Ok(())
    }

    /// Rebuilds the free lists and counters from the blocks (after a broken lock, or when an
    /// operation found the lists inconsistent): merges free buddies, relinks, recounts.
    fn rebuild(&mut self) -> Result<(), BlockError> {
        let h = self.heap;
        for _ in 0..MERGE_PASSES {
            let mut merged = false;
            let mut prev: Option<(u64, u32)> = None;
            let mut p = HEADER_SIZE;
            while p < self.covered {
                let t = self.block_at(p)?.ok_or(BlockError::Corrupt { offset: p })?;
                let k = u32::from(t.order);
                if t.state != state::FREE {
                    prev = None;
                    p += t.size();
                    continue;
                }
                match prev {
                    Some((q, qk))
                        if qk == k
                            && q + t.size() == p
                            && q % (2 * t.size()) == 0
                            && k < MAX_ORDER =>
                    {
                        h.store(q, encode(self.heap_id, q, tag(state::FREE, k + 1, 0, 0)))?;
                        merged = true;
                        prev = Some((q, k + 1));
                    }
                    _ => prev = Some((p, k)),
                }
                p += t.size();
            }
            if !merged {
                break;
            }
        }
        for k in MIN_ORDER..=MAX_ORDER {
            h.store(head_off(k), 0)?;
        }
        let (mut in_use, mut blocks, mut free, mut owned) = (0u64, 0u64, 0u64, 0u64);
        let mut p = HEADER_SIZE;
        while p < self.covered {
            let t = self.block_at(p)?.ok_or(BlockError::Corrupt { offset: p })?;
            if t.state == state::FREE {
                free += t.size();
                match self.push(p, u32::from(t.order)) {
                    Ok(()) => {}
                    Err(Lists::Error(e)) => return Err(e),
                    Err(Lists::Corrupt) => {
                        return Err(BlockError::Inconsistent {
                            what: "free list head changed during a rebuild",
                            at: p,
                        })
                    }
                }
            } else {
                in_use += t.size();
                blocks += 1;
                owned += u64::from(t.owner != 0);
            }
            p += t.size();
        }
        h.store(hdr::IN_USE, in_use)?;
        h.store(hdr::BLOCKS, blocks)?;
        h.store(hdr::FREE, free)?;
        h.store(hdr::OWNED, owned)?;
        Ok(())
    }
}

/// The order of the block for `size` bytes at `align`, and the data's distance from the
/// block's start (16, or `align` when that is larger).
pub fn order_for(size: u64, align: u64) -> Result<(u32, u64), BlockError> {
    if size == 0 || !align.is_power_of_two() {
        return Err(BlockError::BadParameter);
    }
    let lead = align.max(BLOCK_HEADER_SIZE);
    let need = size
        .checked_add(lead)
        .and_then(u64::checked_next_power_of_two)
        .ok_or(BlockError::NoMemory)?;
    let order = need.trailing_zeros().max(MIN_ORDER);
    if order > MAX_ORDER {
        return Err(BlockError::NoMemory);
    }
    Ok((order, lead))
}

/// A list operation's failure: the lists are inconsistent (rebuild and retry), or a fault.
enum Lists {
    Corrupt,
    Error(BlockError),
}

impl From<BlockError> for Lists {
    fn from(e: BlockError) -> Self {
        Lists::Error(e)
    }
}

impl From<crate::shm::Fault> for Lists {
    fn from(f: crate::shm::Fault) -> Self {
        Lists::Error(BlockError::Fault(f))
    }
}

/// splitmix64's finaliser: a heap id from a seed.
fn mix(seed: u64) -> u64 {
    let mut x = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}
