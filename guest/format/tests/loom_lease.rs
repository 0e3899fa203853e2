//! A `loom` model of the lease protocol (docs/FORMAT.md §6–§8, §10 DELETE, §11).
//!
//! Run with (it is not built without `--cfg loom`):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=2 \
//!     cargo test -p vshm-format --release --test loom_lease
//! ```
//!
//! The peers run the real `vshm_format::lease::{acquire, release}`; the host runs the real
//! `close_if_unheld` and `object::publish`, in the steps `backend/src/arbiter/reclaim.rs` and
//! `requests.rs` take (create, delete, reap, destroy, sweep, reclaim), re-written here over a
//! private record because the backend crate is not loom-compatible.
//!
//! What the model abstracts (see [`ModelMem`]):
//! * Only the words the lease protocol's safety rests on are loom atomics, explored under
//!   loom's C11 memory model: every object entry's `generation`, `state` and lease word, and
//!   every refcount cell. Loom interleaves threads only at operations on these.
//! * Everything else in the header (the entry's seqlock counter, `kind`..`creator`, the name,
//!   the namespace sequence, the peer table, mailboxes) is plain memory outside loom: each
//!   access is sequentially consistent and atomic with respect to the model's threads, and
//!   creates no happens-before edge. The seqlock and byte copies are not what is checked
//!   here (the lease protocol never reads them).
//! * A volatile byte copy that covers a modelled word whole is a Relaxed load or store of it
//!   (the host zeroes a departed peer's refcount row that way); one that covers part of a
//!   modelled word is a bug in the model and panics.
//! * The heap is not modelled: an object's range is a number in the host's record, and
//!   "memory" is the ghost state below.
//! * A thread that reads its cell locked (another thread of the same peer is flipping its
//!   holder bit) yields to loom, so the bounded spin is explored as a wait, not unrolled.
//! * A process that dies is a thread whose memory operations, from a chosen one on, fail
//!   without effect ([`Dying`]): it stops between two operations, as a killed process does,
//!   and its liveness flag (a loom atomic, set as it stops) is what the other users' liveness
//!   check reads.
//!
//! The checks (ghost state, outside loom, updated right after the real operation returns):
//! * an `acquire` that succeeds never does so on a generation the host already destroyed,
//!   and the object it holds is the one live on its range;
//! * the host never destroys a generation some peer still counts a handle on, and never
//!   destroys one twice;
//! * the host never creates an object on a range that a live object (or a held one) uses;
//! * after every thread finished and released what it held, one host sweep destroys every
//!   object exactly once, leaving the slot FREE with a CLOSED lease word.
#![cfg(loom)]

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering as StdOrdering};
use std::sync::Mutex;

use core::sync::atomic::Ordering;
use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use loom::sync::Arc;
use loom::thread;

use vshm_format::layout::{
    holder_bit, kind, object_state, refcell, Layout, LEASE_CLOSED, LEASE_HOLDERS, LEASE_KEEP,
    OBJ_GENERATION_OFF, OBJ_LEASE_OFF, OBJ_SEQ_OFF, OBJ_STATE_OFF,
};
use vshm_format::lease::{
    acquire_as, close_if_unheld, release_as, LeaseError, LockOwner, Released,
};
use vshm_format::object::{make_entry, publish};
use vshm_format::shm::{check_range, zeroed, Fault, SharedMemory};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};

const PEERS: u32 = 2;
const SLOT: ObjectSlot = ObjectSlot(0);
/// The one heap range objects in the model live on (a new object in the slot reuses it).
const RANGE: u64 = 0x1_0000;

fn layout() -> Layout {
    Layout::compute(1 << 20, PEERS, 1, 1, 4096).expect("minimum layout")
}

/// What the model checks, kept outside loom: it records what the real operations returned.
#[derive(Debug, Default)]
struct Ghost {
    /// (peer slot, generation) for every handle a peer counts (one entry per handle).
    holds: Vec<(u32, u64)>,
    /// Generations the host destroyed.
    destroyed: Vec<u64>,
    /// Generations the host created, with their range.
    created: Vec<(u64, u64)>,
    /// (range, generation) of each object the host has a record for.
    live: Vec<(u64, u64)>,
}

impl Ghost {
    fn range_of(&self, generation: u64) -> u64 {
        self.created
            .iter()
            .find(|&&(g, _)| g == generation)
            .map(|&(_, r)| r)
            .expect("a created generation")
    }
    /// A peer's acquire on `generation` returned Ok.
    fn peer_holds(&mut self, peer: u32, generation: u64) {
        assert!(
            !self.destroyed.contains(&generation),
            "peer {peer} opened generation {generation}, which the host had destroyed"
        );
        let range = self.range_of(generation);
        assert!(
            self.live.contains(&(range, generation)),
            "peer {peer} holds generation {generation}, not the live object on range {range:#x}"
        );
        self.holds.push((peer, generation));
    }
    /// A peer is about to release a handle on `generation`.
    fn peer_drops(&mut self, peer: u32, generation: u64) {
        let at = self
            .holds
            .iter()
            .position(|&h| h == (peer, generation))
            .expect("dropping a handle the peer holds");
        self.holds.swap_remove(at);
    }
    fn host_creates(&mut self, generation: u64, range: u64) {
        assert!(
            !self.live.iter().any(|&(r, _)| r == range),
            "generation {generation} created on range {range:#x}, which a live object uses"
        );
        assert!(
            !self
                .holds
                .iter()
                .any(|&(_, g)| self.created.contains(&(g, range))),
            "generation {generation} created on range {range:#x}, which a peer still holds"
        );
        self.created.push((generation, range));
        self.live.push((range, generation));
    }
    fn host_destroys(&mut self, generation: u64) {
        assert!(
            !self.destroyed.contains(&generation),
            "generation {generation} destroyed twice"
        );
        assert!(
            !self.holds.iter().any(|&(_, g)| g == generation),
            "generation {generation} destroyed while a peer holds it: {:?}",
            self.holds
        );
        self.destroyed.push(generation);
        self.live.retain(|&(_, g)| g != generation);
    }
}

/// A [`SharedMemory`] for loom. See the module documentation for what it abstracts.
struct ModelMem {
    layout: Layout,
    /// `(offset, word)`: the entries' generation and lease words.
    words64: Vec<(u64, AtomicU64)>,
    /// `(offset, word)`: the entries' state words and every refcount cell.
    words32: Vec<(u64, AtomicU32)>,
    /// The rest of the header, `[0, heap_offset)`, outside loom.
    plain: Mutex<Vec<u8>>,
    ghost: Mutex<Ghost>,
}

impl std::fmt::Debug for ModelMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModelMem")
    }
}

impl ModelMem {
    /// A region as the host leaves it at initialisation: zero, every lease word CLOSED.
    fn new() -> ModelMem {
        let layout = layout();
        let mut words64 = Vec::new();
        let mut words32 = Vec::new();
        for s in 0..layout.max_objects {
            let base = layout.object_entry(ObjectSlot(s)).expect("slot");
            words64.push((base + OBJ_GENERATION_OFF, AtomicU64::new(0)));
            words64.push((base + OBJ_LEASE_OFF, AtomicU64::new(LEASE_CLOSED)));
            words32.push((base + OBJ_STATE_OFF, AtomicU32::new(object_state::FREE)));
            for p in 0..layout.max_peers {
                let cell = layout
                    .refcount_cell(PeerSlot(p), ObjectSlot(s))
                    .expect("cell");
                words32.push((cell, AtomicU32::new(0)));
            }
        }
        let header = usize::try_from(layout.heap_offset).expect("small header");
        ModelMem {
            layout,
            words64,
            words32,
            plain: Mutex::new(vec![0; header]),
            ghost: Mutex::new(Ghost::default()),
        }
    }

    fn ghost(&self) -> std::sync::MutexGuard<'_, Ghost> {
        self.ghost.lock().expect("ghost")
    }

    fn word64(&self, offset: u64) -> Option<&AtomicU64> {
        self.words64
            .iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, w)| w)
    }

    fn word32(&self, offset: u64) -> Option<&AtomicU32> {
        self.words32
            .iter()
            .find(|(o, _)| *o == offset)
            .map(|(_, w)| w)
    }

    fn is_cell(&self, offset: u64) -> bool {
        offset >= self.layout.refcount_table && offset < self.layout.mailbox_table
    }

    /// The plain bytes `[offset, offset+len)`, checked against the header and alignment.
    fn plain_range(&self, offset: u64, len: u64, align: u64) -> Result<(usize, usize), Fault> {
        check_range(self.layout.heap_offset, offset, len)?;
        if offset % align != 0 {
            return Err(Fault::Misaligned { offset });
        }
        let start = usize::try_from(offset).map_err(|_| Fault::OutOfBounds { offset, len })?;
        let end = usize::try_from(offset + len).map_err(|_| Fault::OutOfBounds { offset, len })?;
        Ok((start, end))
    }

    fn plain_load(&self, offset: u64, len: u64) -> Result<u64, Fault> {
        let (start, end) = self.plain_range(offset, len, len)?;
        let plain = self.plain.lock().expect("plain");
        let mut bytes = [0u8; 8];
        bytes[..end - start].copy_from_slice(&plain[start..end]);
        Ok(u64::from_le_bytes(bytes))
    }

    fn plain_store(&self, offset: u64, len: u64, value: u64) -> Result<(), Fault> {
        let (start, end) = self.plain_range(offset, len, len)?;
        let mut plain = self.plain.lock().expect("plain");
        plain[start..end].copy_from_slice(&value.to_le_bytes()[..end - start]);
        Ok(())
    }

    /// The modelled words overlapping `[offset, offset+len)`: (word offset, width).
    fn modelled_in(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len);
        let w64 = self.words64.iter().map(|(o, _)| (*o, 8));
        let w32 = self.words32.iter().map(|(o, _)| (*o, 4));
        w64.chain(w32)
            .filter(|&(o, w)| o < end && o + w > offset)
            .collect()
    }
}

fn narrow(v: u64) -> u32 {
    u32::try_from(v).expect("a 4-byte value")
}

impl SharedMemory for ModelMem {
    fn size(&self) -> u64 {
        self.layout.region_size
    }
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault> {
        let Some(w) = self.word32(offset) else {
            return self.plain_load(offset, 4).map(narrow);
        };
        let v = w.load(order);
        if v & refcell::REF_LOCK != 0 && self.is_cell(offset) {
            // Another thread of this peer holds the cell lock: let loom run it.
            thread::yield_now();
        }
        Ok(v)
    }
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault> {
        match self.word64(offset) {
            Some(w) => Ok(w.load(order)),
            None => {
                let v = self.plain_load(offset, 8)?;
                let seq = self.layout.object_entry(SLOT).expect("slot") + OBJ_SEQ_OFF;
                if offset == seq && v & 1 == 1 {
                    // A seqlock reader waiting for the host to finish publishing.
                    thread::yield_now();
                }
                Ok(v)
            }
        }
    }
    fn store_u32(&self, offset: u64, value: u32, order: Ordering) -> Result<(), Fault> {
        match self.word32(offset) {
            Some(w) => {
                w.store(value, order);
                Ok(())
            }
            None => self.plain_store(offset, 4, u64::from(value)),
        }
    }
    fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<(), Fault> {
        match self.word64(offset) {
            Some(w) => {
                w.store(value, order);
                Ok(())
            }
            None => self.plain_store(offset, 8, value),
        }
    }
    fn cas_u32(&self, offset: u64, current: u32, new: u32) -> Result<Result<u32, u32>, Fault> {
        match self.word32(offset) {
            Some(w) => Ok(w.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)),
            None => {
                let v = narrow(self.plain_load(offset, 4)?);
                if v != current {
                    return Ok(Err(v));
                }
                self.plain_store(offset, 4, u64::from(new))?;
                Ok(Ok(v))
            }
        }
    }
    fn cas_u64(&self, offset: u64, current: u64, new: u64) -> Result<Result<u64, u64>, Fault> {
        match self.word64(offset) {
            Some(w) => Ok(w.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)),
            None => {
                let v = self.plain_load(offset, 8)?;
                if v != current {
                    return Ok(Err(v));
                }
                self.plain_store(offset, 8, new)?;
                Ok(Ok(v))
            }
        }
    }
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, Fault> {
        match self.word64(offset) {
            Some(w) => Ok(w.fetch_and(mask, Ordering::SeqCst)),
            None => {
                let v = self.plain_load(offset, 8)?;
                self.plain_store(offset, 8, v & mask)?;
                Ok(v)
            }
        }
    }
    fn fetch_or_u64(&self, offset: u64, bits: u64) -> Result<u64, Fault> {
        match self.word64(offset) {
            Some(w) => Ok(w.fetch_or(bits, Ordering::SeqCst)),
            None => {
                let v = self.plain_load(offset, 8)?;
                self.plain_store(offset, 8, v | bits)?;
                Ok(v)
            }
        }
    }
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let len = buf.len() as u64;
        let (start, end) = self.plain_range(offset, len, 1)?;
        buf.copy_from_slice(&self.plain.lock().expect("plain")[start..end]);
        // Modelled words inside the copy: a volatile read of each is a Relaxed load.
        for (o, width) in self.modelled_in(offset, len) {
            let v = if width == 8 {
                self.word64(o).expect("word").load(Ordering::Relaxed)
            } else {
                u64::from(self.word32(o).expect("word").load(Ordering::Relaxed))
            };
            let bytes = v.to_le_bytes();
            for i in 0..width {
                if let Some(at) = (o + i).checked_sub(offset).filter(|&at| at < len) {
                    buf[usize::try_from(at).expect("in buf")] =
                        bytes[usize::try_from(i).expect("< 8")];
                }
            }
        }
        Ok(())
    }
    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        let len = data.len() as u64;
        let (start, end) = self.plain_range(offset, len, 1)?;
        self.plain.lock().expect("plain")[start..end].copy_from_slice(data);
        // Modelled words inside the copy: a volatile write of each is a Relaxed store.
        for (o, width) in self.modelled_in(offset, len) {
            assert!(
                o >= offset && o + width <= offset + len,
                "model: a byte copy covers part of the modelled word at {o:#x}"
            );
            let at = usize::try_from(o - offset).expect("in data");
            let mut bytes = [0u8; 8];
            bytes[..usize::try_from(width).expect("< 8")]
                .copy_from_slice(&data[at..at + usize::try_from(width).expect("< 8")]);
            let v = u64::from_le_bytes(bytes);
            if width == 8 {
                self.word64(o).expect("word").store(v, Ordering::Relaxed);
            } else {
                self.word32(o)
                    .expect("word")
                    .store(narrow(v), Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// A user of a peer that dies: its `die_at`-th memory operation after it takes a refcount
/// cell lock (counted afresh at each lock it takes), and every one after, fails without
/// effect, and `dead` is set as it stops.
struct Dying<'a> {
    mem: &'a ModelMem,
    dead: &'a AtomicBool,
    die_at: u32,
    /// Operations since it last took a cell lock (None: not holding one yet).
    since_lock: Cell<Option<u32>>,
}

impl Dying<'_> {
    /// Whether this operation happens; false from the moment of death on.
    fn lives(&self) -> bool {
        if self.dead.load(Ordering::SeqCst) {
            return false;
        }
        if let Some(n) = self.since_lock.get() {
            if n >= self.die_at {
                self.dead.store(true, Ordering::SeqCst);
                return false;
            }
            self.since_lock.set(Some(n + 1));
        }
        true
    }
}

const DIED: Fault = Fault::OutOfBounds { offset: 0, len: 0 };

impl SharedMemory for Dying<'_> {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.load_u32(offset, order)
    }
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.load_u64(offset, order)
    }
    fn store_u32(&self, offset: u64, value: u32, order: Ordering) -> Result<(), Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.store_u32(offset, value, order)
    }
    fn store_u64(&self, offset: u64, value: u64, order: Ordering) -> Result<(), Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.store_u64(offset, value, order)
    }
    fn cas_u32(&self, offset: u64, current: u32, new: u32) -> Result<Result<u32, u32>, Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        let r = self.mem.cas_u32(offset, current, new)?;
        if r.is_ok() && self.mem.is_cell(offset) && refcell::lock_owner(new).is_some() {
            self.since_lock.set(Some(0));
        }
        Ok(r)
    }
    fn cas_u64(&self, offset: u64, current: u64, new: u64) -> Result<Result<u64, u64>, Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.cas_u64(offset, current, new)
    }
    fn fetch_and_u64(&self, offset: u64, mask: u64) -> Result<u64, Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.fetch_and_u64(offset, mask)
    }
    fn fetch_or_u64(&self, offset: u64, bits: u64) -> Result<u64, Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.fetch_or_u64(offset, bits)
    }
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.read_bytes(offset, buf)
    }
    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        if !self.lives() {
            return Err(DIED);
        }
        self.mem.write_bytes(offset, data)
    }
}

/// The host's private record of the object in [`SLOT`] (backend `ObjectRecord`).
#[derive(Debug, Clone, Copy)]
struct Record {
    generation: u64,
    persistent: bool,
    unlinked: bool,
    range: u64,
}

/// The host's side, step for step as `backend/src/arbiter` does it, for one object slot.
#[derive(Debug)]
struct Host {
    record: Option<Record>,
    /// Bit i: peer slot i is connected.
    connected: u64,
    destroyed: u32,
}

impl Host {
    fn new() -> Host {
        Host {
            record: None,
            connected: (1 << PEERS) - 1,
            destroyed: 0,
        }
    }

    fn lease(mem: &ModelMem) -> u64 {
        mem.layout.object_entry(SLOT).expect("slot") + OBJ_LEASE_OFF
    }

    fn publish(mem: &ModelMem, r: &Record, state: u32, creator: PeerSlot) {
        let creator = PeerId(u16::try_from(creator.0 + 1).expect("small"));
        let e = make_entry(
            Generation(r.generation),
            state,
            kind::SECTION,
            RegionOffset(mem.layout.heap_offset + r.range),
            4096,
            4096,
            r.persistent,
            Some("x"),
            creator,
        );
        publish(mem, &mem.layout, SLOT, &e).expect("publish");
    }

    /// CREATE (§10) in the free slot: the lease word first, then the entry.
    fn create(&mut self, mem: &ModelMem, generation: u64, creator: PeerSlot, persistent: bool) {
        assert!(self.record.is_none(), "the model's slot is free");
        let r = Record {
            generation,
            persistent,
            unlinked: false,
            range: RANGE,
        };
        mem.ghost().host_creates(generation, r.range);
        let keep = if persistent { LEASE_KEEP } else { 0 };
        mem.store_u64(
            Self::lease(mem),
            holder_bit(creator) | keep,
            Ordering::SeqCst,
        )
        .expect("lease");
        Self::publish(mem, &r, object_state::LIVE, creator);
        self.record = Some(r);
    }

    /// DELETE (§10): publish UNLINKED, clear KEEP, close if unheld, reap.
    fn delete(&mut self, mem: &ModelMem) {
        let Some(r) = self.record.as_mut() else {
            return;
        };
        if r.unlinked {
            return;
        }
        r.unlinked = true;
        let r = *r;
        Self::publish(mem, &r, object_state::UNLINKED, PeerSlot(0));
        let lease = Self::lease(mem);
        let prev = mem.fetch_and_u64(lease, !LEASE_KEEP).expect("lease");
        close_if_unheld(mem, lease, prev & !LEASE_KEEP).expect("close");
        self.reap(mem);
    }

    fn cell_count(mem: &ModelMem, peer: u32) -> u32 {
        let cell = mem
            .layout
            .refcount_cell(PeerSlot(peer), SLOT)
            .expect("cell");
        // A locked cell's low bits are its owner's token: it counts no handle (yet).
        refcell::count(mem.load_u32(cell, Ordering::Acquire).expect("cell")).unwrap_or(0)
    }

    /// Reap (§11): destroy a CLOSED word unless a connected peer counts handles or the
    /// record keeps it; repair the word then.
    fn reap(&mut self, mem: &ModelMem) -> bool {
        let lease = Self::lease(mem);
        let w = mem.load_u64(lease, Ordering::SeqCst).expect("lease");
        if w & LEASE_CLOSED == 0 {
            return false;
        }
        let Some(r) = self.record else {
            return false;
        };
        let keep = r.persistent && !r.unlinked;
        let mut holders = 0;
        for p in 0..PEERS {
            if self.connected & (1 << p) != 0 && Self::cell_count(mem, p) > 0 {
                holders |= holder_bit(PeerSlot(p));
            }
        }
        if holders != 0 || keep {
            let keep_bit = if keep { LEASE_KEEP } else { 0 };
            mem.store_u64(lease, holders | keep_bit, Ordering::SeqCst)
                .expect("repair");
            panic!("the host repaired a lease word closed while held: {w:#x} -> {holders:#x}");
        }
        self.destroy(mem, r);
        true
    }

    /// Destroy (§11): FREE entry, CLOSED word, range back to the heap.
    fn destroy(&mut self, mem: &ModelMem, r: Record) {
        mem.ghost().host_destroys(r.generation);
        publish(mem, &mem.layout, SLOT, &zeroed()).expect("publish");
        mem.store_u64(Self::lease(mem), LEASE_CLOSED, Ordering::SeqCst)
            .expect("lease");
        self.record = None;
        self.destroyed += 1;
    }

    /// Sweep (§11) of the one slot.
    fn sweep(&mut self, mem: &ModelMem) {
        let Some(r) = self.record else {
            return;
        };
        let keep = r.persistent && !r.unlinked;
        let lease = Self::lease(mem);
        let w = mem.load_u64(lease, Ordering::SeqCst).expect("lease");
        let stray = w & LEASE_HOLDERS & !self.connected;
        if stray != 0 {
            mem.fetch_and_u64(lease, !stray).expect("lease");
        }
        if w & LEASE_CLOSED == 0 && keep != (w & LEASE_KEEP != 0) {
            if keep {
                mem.fetch_or_u64(lease, LEASE_KEEP).expect("lease");
            } else {
                mem.fetch_and_u64(lease, !LEASE_KEEP).expect("lease");
            }
        }
        let now = mem.load_u64(lease, Ordering::SeqCst).expect("lease");
        close_if_unheld(mem, lease, now).expect("close");
        self.reap(mem);
    }

    /// Reclaim of a departed peer (§8 "Peer death", `reclaim_peer`).
    fn reclaim(&mut self, mem: &ModelMem, peer: PeerSlot) {
        self.connected &= !holder_bit(peer);
        let mut dead = false;
        if self.record.is_some() {
            let lease = Self::lease(mem);
            let bit = holder_bit(peer);
            let prev = mem.fetch_and_u64(lease, !bit).expect("lease");
            dead = close_if_unheld(mem, lease, prev & !bit).expect("close")
                || prev & LEASE_CLOSED != 0;
        }
        let row = mem.layout.refcount_cell(peer, ObjectSlot(0)).expect("row");
        mem.zero(row, u64::from(mem.layout.refcount_row_size))
            .expect("row");
        if dead {
            self.reap(mem);
        }
    }
}

/// A peer's open of (SLOT, `generation`): the real `acquire`, then the ghost's check.
/// Returns whether it now holds a handle.
fn open(mem: &ModelMem, peer: u32, generation: u64, allow_unlinked: bool) -> bool {
    open_as(mem, peer, generation, allow_unlinked, &LockOwner::SOLE)
}

/// [`open`] by the user `owner` of the peer.
fn open_as(
    mem: &ModelMem,
    peer: u32,
    generation: u64,
    allow_unlinked: bool,
    owner: &LockOwner<'_>,
) -> bool {
    match acquire_as(
        mem,
        &mem.layout,
        PeerSlot(peer),
        SLOT,
        Generation(generation),
        allow_unlinked,
        owner,
    ) {
        Ok(()) => {
            mem.ghost().peer_holds(peer, generation);
            true
        }
        Err(LeaseError::Gone | LeaseError::GoneClosed) => false,
        Err(e) => panic!("peer {peer}: acquire of generation {generation} failed: {e:?}"),
    }
}

/// A peer's close of one handle on (SLOT, `generation`).
fn close(mem: &ModelMem, peer: u32, generation: u64) -> Released {
    close_as(mem, peer, generation, &LockOwner::SOLE)
}

/// [`close`] by the user `owner` of the peer.
fn close_as(mem: &ModelMem, peer: u32, generation: u64, owner: &LockOwner<'_>) -> Released {
    mem.ghost().peer_drops(peer, generation);
    release_as(mem, &mem.layout, PeerSlot(peer), SLOT, owner)
        .unwrap_or_else(|e| panic!("peer {peer}: release failed: {e:?}"))
}

/// After the threads joined and every handle was closed: the host's sweep destroys what is
/// left, every created generation was destroyed exactly once, and the slot is FREE/CLOSED.
fn settle(mem: &ModelMem, host: &mut Host) {
    host.sweep(mem);
    assert!(host.record.is_none(), "an object outlived all its handles");
    let g = mem.ghost();
    assert!(g.holds.is_empty(), "handles left: {:?}", g.holds);
    let mut created: Vec<u64> = g.created.iter().map(|&(gen, _)| gen).collect();
    let mut destroyed = g.destroyed.clone();
    created.sort_unstable();
    destroyed.sort_unstable();
    assert_eq!(created, destroyed, "each object destroyed exactly once");
    drop(g);
    let base = mem.layout.object_entry(SLOT).expect("slot");
    assert_eq!(
        mem.load_u64(base + OBJ_LEASE_OFF, Ordering::SeqCst),
        Ok(LEASE_CLOSED)
    );
    assert_eq!(
        mem.load_u32(base + OBJ_STATE_OFF, Ordering::SeqCst),
        Ok(object_state::FREE)
    );
    for p in 0..PEERS {
        assert_eq!(Host::cell_count(mem, p), 0, "peer {p} still counts handles");
    }
}

/// Runs `f` under loom (LOOM_MAX_PREEMPTIONS, 2 if unset) and reports how many executions
/// it explored.
fn check<F>(name: &str, f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    check_at_most(name, usize::MAX, f);
}

/// [`check`] with the preemption bound capped at `cap` (a scenario whose state space at the
/// CI bound takes minutes).
fn check_at_most<F>(name: &str, cap: usize, f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let runs = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&runs);
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.preemption_bound = builder.preemption_bound.map(|b| b.min(cap));
    let bound = builder.preemption_bound;
    let started = std::time::Instant::now();
    builder.check(move || {
        counted.fetch_add(1, StdOrdering::Relaxed);
        f();
    });
    println!(
        "{name}: {} executions, preemption bound {bound:?}, {:.2}s",
        runs.load(StdOrdering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}

/// (a) Two peers open and close the same object while the host sweeps: destroyed exactly
/// once, and only after both closed.
#[test]
fn a_two_peers_open_and_close_while_the_host_sweeps() {
    check("a", || {
        let mem = Arc::new(ModelMem::new());
        let mut host = Host::new();
        host.create(&mem, 1, PeerSlot(0), false);
        assert!(open(&mem, 0, 1, false), "the creator's first hold");
        let m0 = Arc::clone(&mem);
        let p0 = thread::spawn(move || {
            // A second handle (fast path), then both closed.
            let second = open(&m0, 0, 1, false);
            if second {
                close(&m0, 0, 1);
            }
            close(&m0, 0, 1)
        });
        let m1 = Arc::clone(&mem);
        let p1 = thread::spawn(move || {
            if open(&m1, 1, 1, false) {
                close(&m1, 1, 1);
            }
        });
        let mh = Arc::clone(&mem);
        let h = thread::spawn(move || {
            host.sweep(&mh);
            host
        });
        p0.join().expect("peer 0");
        p1.join().expect("peer 1");
        let mut host = h.join().expect("host");
        settle(&mem, &mut host);
    });
}

/// (b) A peer opens (with generation 1 from an earlier lookup) while the only holder closes
/// the last handle, the host reaps and creates generation 2 in the same slot on the same
/// range: the open holds generation 1 before it is closed (and the destroy waits) or fails.
#[test]
fn b_an_open_races_the_last_close_and_the_reuse_of_the_slot() {
    check("b", || {
        let mem = Arc::new(ModelMem::new());
        let mut host = Host::new();
        host.create(&mem, 1, PeerSlot(0), false);
        assert!(open(&mem, 0, 1, false));
        let m0 = Arc::clone(&mem);
        let p0 = thread::spawn(move || close(&m0, 0, 1));
        let m1 = Arc::clone(&mem);
        let p1 = thread::spawn(move || {
            if open(&m1, 1, 1, false) {
                close(&m1, 1, 1);
            }
        });
        let mh = Arc::clone(&mem);
        let h = thread::spawn(move || {
            host.sweep(&mh);
            if host.record.is_none() {
                // Peer 0 creates a new object; it lands in the freed slot and range.
                host.create(&mh, 2, PeerSlot(0), false);
            }
            host
        });
        p0.join().expect("peer 0");
        p1.join().expect("peer 1");
        let mut host = h.join().expect("host");
        if host.record.is_some_and(|r| r.generation == 2) {
            // The creator takes its hold and closes it (or finds it already closed).
            if open(&mem, 0, 2, false) {
                close(&mem, 0, 2);
            }
        }
        settle(&mem, &mut host);
    });
}

/// (c) DELETE of a persistent object races the close of its last handle and an open by
/// name (with the generation from an earlier lookup).
#[test]
fn c_delete_races_the_last_close_of_a_persistent_object() {
    check("c", || {
        let mem = Arc::new(ModelMem::new());
        let mut host = Host::new();
        host.create(&mem, 1, PeerSlot(0), true);
        assert!(open(&mem, 0, 1, false));
        let m0 = Arc::clone(&mem);
        let p0 = thread::spawn(move || close(&m0, 0, 1));
        let m1 = Arc::clone(&mem);
        let p1 = thread::spawn(move || {
            if open(&m1, 1, 1, false) {
                close(&m1, 1, 1);
            }
        });
        let mh = Arc::clone(&mem);
        let h = thread::spawn(move || {
            host.delete(&mh);
            host
        });
        p0.join().expect("peer 0");
        p1.join().expect("peer 1");
        let mut host = h.join().expect("host");
        settle(&mem, &mut host);
    });
}

/// (d) The host reclaims a departed peer (the only holder) while another peer opens; the
/// freed slot is then reused for a new object created by the opener.
#[test]
fn d_reclaim_of_a_departed_peer_races_an_open() {
    check("d", || {
        let mem = Arc::new(ModelMem::new());
        let mut host = Host::new();
        host.create(&mem, 1, PeerSlot(0), false);
        assert!(open(&mem, 0, 1, false));
        // Peer 0 is gone: its handle goes with it.
        mem.ghost().peer_drops(0, 1);
        let m1 = Arc::clone(&mem);
        let p1 = thread::spawn(move || {
            if open(&m1, 1, 1, false) {
                close(&m1, 1, 1);
            }
        });
        let mh = Arc::clone(&mem);
        let h = thread::spawn(move || {
            host.reclaim(&mh, PeerSlot(0));
            if host.record.is_none() {
                host.create(&mh, 2, PeerSlot(1), false);
            }
            host
        });
        p1.join().expect("peer 1");
        let mut host = h.join().expect("host");
        if host.record.is_some_and(|r| r.generation == 2) && open(&mem, 1, 2, false) {
            close(&mem, 1, 2);
        }
        settle(&mem, &mut host);
    });
}

/// (e) Two threads of one peer: one closes the peer's last handle while the other opens
/// the object again by name (generation from an earlier lookup), and the host sweeps. The cell lock serialises them (invariant A).
#[test]
fn e_two_threads_of_one_peer_close_and_reopen() {
    check("e", || {
        let mem = Arc::new(ModelMem::new());
        let mut host = Host::new();
        host.create(&mem, 1, PeerSlot(0), false);
        assert!(open(&mem, 0, 1, false));
        let ma = Arc::clone(&mem);
        let a = thread::spawn(move || close(&ma, 0, 1));
        let mb = Arc::clone(&mem);
        let b = thread::spawn(move || {
            if open(&mb, 0, 1, false) {
                close(&mb, 0, 1);
            }
        });
        let mh = Arc::clone(&mem);
        let h = thread::spawn(move || {
            host.sweep(&mh);
            host
        });
        a.join().expect("thread a");
        b.join().expect("thread b");
        let mut host = h.join().expect("host");
        settle(&mem, &mut host);
    });
}

/// The preemption bound scenario (f) is explored with at most.
const F_CAP: usize = 2;

/// (f) Two processes of one peer (a guest's, sharing peer slot 0): process 7 opens and
/// closes the object and is killed at each point of its transitions in turn (the `k`-th
/// operation after it takes the cell lock), while process 8 opens and closes it, the only
/// other holder (peer 1) closes its handle and the host sweeps. Whoever finds the dead
/// owner's lock steals and repairs it; afterwards a third process of the peer opens and
/// closes (stealing if nobody did). No hold on a destroyed generation, nothing destroyed
/// twice or while held, and at the end the peer counts nothing. Explored with at most 2
/// preemptions: at 3 each death point takes about a minute (run by hand with
/// `LOOM_MAX_PREEMPTIONS=3` and [`F_CAP`] raised; it passed for the first two points).
#[test]
fn f_a_process_dies_holding_the_cell_lock_and_another_steals_it() {
    for k in 0..5u32 {
        check_at_most(&format!("f (dies at {k})"), F_CAP, move || {
            let mem = Arc::new(ModelMem::new());
            let dead = Arc::new(AtomicBool::new(false));
            let mut host = Host::new();
            host.create(&mem, 1, PeerSlot(1), false);
            assert!(open(&mem, 1, 1, false), "peer 1 holds");
            let (md, dd) = (Arc::clone(&mem), Arc::clone(&dead));
            let d = thread::spawn(move || {
                let dying = Dying {
                    mem: &md,
                    dead: &dd,
                    die_at: k,
                    since_lock: Cell::new(None),
                };
                let me = LockOwner {
                    token: 7,
                    alive: &|_| true,
                    in_lock: None,
                };
                let held = acquire_as(
                    &dying,
                    &md.layout,
                    PeerSlot(0),
                    SLOT,
                    Generation(1),
                    false,
                    &me,
                );
                if held.is_ok() {
                    md.ghost().peer_holds(0, 1);
                    // Whether it closes or dies first, its handle ends here.
                    md.ghost().peer_drops(0, 1);
                    let _ = release_as(&dying, &md.layout, PeerSlot(0), SLOT, &me);
                }
            });
            let (ms, ds) = (Arc::clone(&mem), Arc::clone(&dead));
            let st = thread::spawn(move || {
                let alive = |t: u32| t != 7 || !ds.load(Ordering::SeqCst);
                let me = LockOwner {
                    token: 8,
                    alive: &alive,
                    in_lock: None,
                };
                if open_as(&ms, 0, 1, false, &me) {
                    close_as(&ms, 0, 1, &me);
                }
            });
            let mh = Arc::clone(&mem);
            let h = thread::spawn(move || {
                close(&mh, 1, 1);
                host.sweep(&mh);
                host
            });
            d.join().expect("process 7");
            st.join().expect("process 8");
            let mut host = h.join().expect("host");
            let alive = |t: u32| t != 7 || !dead.load(Ordering::SeqCst);
            let me = LockOwner {
                token: 9,
                alive: &alive,
                in_lock: None,
            };
            if open_as(&mem, 0, 1, false, &me) {
                close_as(&mem, 0, 1, &me);
            }
            settle(&mem, &mut host);
        });
    }
}
