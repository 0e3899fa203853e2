//! Open and close without the host: the lease word and the per-peer refcount cells.
//!
//! Invariants (the argument is written out in docs/FORMAT.md):
//! * a peer's cell for slot s counts its handles on the object now in s; count > 0 implies
//!   the peer's holder bit is set in that object's lease word;
//! * the cell's lock bit serialises this peer's own threads while they flip the holder bit;
//! * `LEASE_CLOSED` is set once, by CAS, only when the word has no holders and no KEEP; after
//!   that nobody can set a holder bit (every setter CASes against a word without CLOSED);
//! * a new hold is valid only if the slot's generation and state still match *after* the
//!   holder bit is set (SeqCst on both sides: the host writes generation/state, then frees).

use core::sync::atomic::Ordering;

use crate::ids::{Generation, ObjectSlot, PeerSlot};
use crate::layout::{
    holder_bit, object_state, refcell, Layout, LEASE_CLOSED, LEASE_HOLDERS, LEASE_KEEP,
    OBJ_LEASE_OFF,
};
use crate::object;
use crate::shm::{Fault, SharedMemory};
use crate::Status;

/// Spins before a lock holder is presumed stuck. A peer's own threads hold the cell lock for
/// a handful of atomics, so hitting this means that peer's memory was scribbled.
const LOCK_SPINS: u32 = 1 << 24;

/// CAS attempts on a lease word before giving up: every failure means another party changed
/// the word, so only a word being rewritten on purpose exhausts this.
pub const CAS_TRIES: u32 = 1 << 16;

/// What closing a handle requires of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// Other handles remain (this peer's or others').
    Held,
    /// This was the object's last hold: it is now closed and the host must be rung so it
    /// destroys the object and returns the memory.
    LastHold,
}

/// Errors from the lease protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseError {
    /// The object is gone or changed (closed, destroyed, slot reused).
    Gone,
    /// As `Gone`, and giving back the hold closed the object this peer briefly held: ring
    /// the host so it reaps it now rather than at its next sweep.
    GoneClosed,
    /// This peer holds no handle on that object.
    NotHeld,
    /// Handle count would overflow.
    TooManyHandles,
    /// A lock bit stayed set: this peer's cell was scribbled.
    Stuck,
    /// The access failed.
    Fault(Fault),
}

impl From<Fault> for LeaseError {
    fn from(f: Fault) -> Self {
        LeaseError::Fault(f)
    }
}

impl LeaseError {
    /// The NTSTATUS a caller reports for this error.
    pub fn status(self) -> Status {
        match self {
            LeaseError::Gone | LeaseError::GoneClosed => Status::ObjectNameNotFound,
            LeaseError::NotHeld | LeaseError::Stuck | LeaseError::Fault(_) => Status::InvalidHandle,
            LeaseError::TooManyHandles => Status::QuotaExceeded,
        }
    }
}

/// Offsets used by one peer on one slot.
#[derive(Clone, Copy, Debug)]
struct Cell {
    cell: u64,
    lease: u64,
    bit: u64,
}

fn cell(layout: &Layout, peer_slot: PeerSlot, slot: ObjectSlot) -> Result<Cell, Fault> {
    let cell = layout
        .refcount_cell(peer_slot, slot)
        .ok_or(Fault::OutOfBounds {
            offset: u64::from(slot.0),
            len: 4,
        })?;
    let entry = layout.object_entry(slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(slot.0),
        len: 8,
    })?;
    Ok(Cell {
        cell,
        lease: entry + OBJ_LEASE_OFF,
        bit: holder_bit(peer_slot),
    })
}

/// Takes one more handle on object (`slot`, `generation`) for peer slot `peer_slot`.
///
/// `allow_unlinked`: duplicating an existing handle may take a deleted (unlinked) object;
/// opening by name may not.
pub fn acquire<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
    generation: Generation,
    allow_unlinked: bool,
) -> Result<(), LeaseError> {
    let c = cell(layout, peer_slot, slot)?;
    loop {
        let v = load_unlocked(mem, c.cell)?;
        let n = v & refcell::REF_COUNT;
        if n > 0 {
            // Already a holder: our bit is set, the object cannot die under us.
            if n == refcell::REF_COUNT {
                return Err(LeaseError::TooManyHandles);
            }
            if mem.cas_u32(c.cell, v, v + 1)?.is_err() {
                continue;
            }
            if holds_expected(mem, layout, slot, generation, allow_unlinked)? {
                return Ok(());
            }
            // The caller named another object than the one we hold in this slot (or a
            // deleted one, for an open by name): undo through the ordinary close path, which
            // handles a concurrent close by another of our threads.
            return Err(match release(mem, layout, peer_slot, slot)? {
                Released::LastHold => LeaseError::GoneClosed,
                Released::Held => LeaseError::Gone,
            });
        }
        if mem.cas_u32(c.cell, v, refcell::REF_LOCK)?.is_err() {
            continue;
        }
        // We own this peer's transition for the slot.
        let result = take_holder_bit(mem, layout, &c, slot, generation, allow_unlinked);
        let after = if result.is_ok() { 1 } else { 0 };
        mem.store_u32(c.cell, after, Ordering::Release)?;
        return result;
    }
}

/// Loads a refcount cell, waiting while another thread of this peer holds its lock.
fn load_unlocked<M: SharedMemory + ?Sized>(mem: &M, cell: u64) -> Result<u32, LeaseError> {
    for _ in 0..LOCK_SPINS {
        let v = mem.load_u32(cell, Ordering::Acquire)?;
        if v & refcell::REF_LOCK == 0 {
            return Ok(v);
        }
        core::hint::spin_loop();
    }
    Err(LeaseError::Stuck)
}

fn take_holder_bit<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    c: &Cell,
    slot: ObjectSlot,
    generation: Generation,
    allow_unlinked: bool,
) -> Result<(), LeaseError> {
    let mut w = mem.load_u64(c.lease, Ordering::SeqCst)?;
    let mut tries = 0u32;
    loop {
        if w & LEASE_CLOSED != 0 {
            return Err(LeaseError::Gone);
        }
        match mem.cas_u64(c.lease, w, w | c.bit)? {
            Ok(_) => break,
            Err(cur) => w = cur,
        }
        tries += 1;
        if tries > CAS_TRIES {
            return Err(LeaseError::Stuck);
        }
    }
    // Dekker with the host: the bit is visible before we look at generation/state, and the
    // host changes generation/state before it frees. One of us sees the other.
    if holds_expected(mem, layout, slot, generation, allow_unlinked)? {
        return Ok(());
    }
    // Wrong object: give the bit back, closing whatever it was if we were its last holder.
    Err(if drop_holder_bit(mem, c)? {
        LeaseError::GoneClosed
    } else {
        LeaseError::Gone
    })
}

/// Whether `slot` still holds object `generation` in an acceptable state.
fn holds_expected<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    generation: Generation,
    allow_unlinked: bool,
) -> Result<bool, Fault> {
    let gen_now = object::generation(mem, layout, slot)?;
    let state_now = object::state(mem, layout, slot)?;
    let state_ok =
        state_now == object_state::LIVE || (allow_unlinked && state_now == object_state::UNLINKED);
    Ok(gen_now == generation && state_ok)
}

/// Clears this peer's holder bit; closes the object if that left it with no holders and no
/// KEEP. Returns whether this call closed it.
fn drop_holder_bit<M: SharedMemory + ?Sized>(mem: &M, c: &Cell) -> Result<bool, Fault> {
    let prev = mem.fetch_and_u64(c.lease, !c.bit)?;
    close_if_unheld(mem, c.lease, prev & !c.bit)
}

/// CASes `LEASE_CLOSED` into a lease word that has no holders and no KEEP. Shared with the
/// host (delete, reclaim, sweep). Returns whether this call closed it. Bounded: a word that
/// keeps changing under [`CAS_TRIES`] attempts is left to the host's next sweep, so a peer
/// rewriting it cannot trap anyone in this loop.
pub fn close_if_unheld<M: SharedMemory + ?Sized>(
    mem: &M,
    lease_off: u64,
    mut w: u64,
) -> Result<bool, Fault> {
    for _ in 0..CAS_TRIES {
        if w & (LEASE_HOLDERS | LEASE_KEEP | LEASE_CLOSED) != 0 {
            return Ok(false);
        }
        match mem.cas_u64(lease_off, w, w | LEASE_CLOSED)? {
            Ok(_) => return Ok(true),
            Err(cur) => w = cur,
        }
    }
    Ok(false)
}

/// Closes one handle of peer slot `peer_slot` on `slot`.
pub fn release<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
) -> Result<Released, LeaseError> {
    let c = cell(layout, peer_slot, slot)?;
    loop {
        let v = load_unlocked(mem, c.cell)?;
        let n = v & refcell::REF_COUNT;
        if n == 0 {
            return Err(LeaseError::NotHeld);
        }
        if n > 1 {
            if mem.cas_u32(c.cell, v, v - 1)?.is_ok() {
                return Ok(Released::Held);
            }
            continue;
        }
        if mem.cas_u32(c.cell, v, refcell::REF_LOCK)?.is_err() {
            continue;
        }
        let closed = drop_holder_bit(mem, &c);
        mem.store_u32(c.cell, 0, Ordering::Release)?;
        return Ok(if closed? {
            Released::LastHold
        } else {
            Released::Held
        });
    }
}

/// This peer's handle count on `slot` (lock bit masked off).
pub fn handles<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
) -> Result<u32, Fault> {
    let c = cell(layout, peer_slot, slot)?;
    Ok(mem.load_u32(c.cell, Ordering::Acquire)? & refcell::REF_COUNT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};
    use crate::layout::{object_state, ObjectEntry, OBJ_GENERATION_OFF, OBJ_STATE_OFF};
    use crate::object::{make_entry, publish};
    use crate::shm::{RawRegion, SharedMemory};
    use core::ptr::NonNull;

    const SIZE: usize = 1 << 20;

    /// A 1 MiB, 8-aligned buffer holding a region with 4 peers and 8 objects.
    struct Fixture {
        _buf: Vec<u64>,
        mem: RawRegion<'static>,
        layout: Layout,
    }

    fn fixture() -> Fixture {
        let mut buf = vec![0u64; SIZE / 8];
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: buf lives in the fixture as long as mem; 8-aligned, SIZE bytes.
        let mem = unsafe { RawRegion::new(base, SIZE as u64) };
        let layout = Layout::compute(SIZE as u64, 4, 8, 1, 4096).expect("layout");
        for slot in 0..8 {
            let lease = layout.object_entry(ObjectSlot(slot)).expect("slot") + OBJ_LEASE_OFF;
            mem.store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
                .expect("free lease");
        }
        Fixture {
            _buf: buf,
            mem,
            layout,
        }
    }

    impl Fixture {
        /// What the host does on create: lease first, then the entry.
        fn create(
            &self,
            slot: ObjectSlot,
            generation: Generation,
            creator_slot: PeerSlot,
            persistent: bool,
        ) {
            let lease = self.layout.object_entry(slot).expect("slot") + OBJ_LEASE_OFF;
            let keep = if persistent { LEASE_KEEP } else { 0 };
            self.mem
                .store_u64(lease, holder_bit(creator_slot) | keep, Ordering::SeqCst)
                .expect("lease");
            let off = self.layout.heap_offset;
            let e: ObjectEntry = make_entry(
                generation,
                object_state::LIVE,
                1,
                RegionOffset(off),
                4096,
                4096,
                persistent,
                Some("x"),
                PeerId(1),
            );
            publish(&self.mem, &self.layout, slot, &e).expect("publish");
        }
        fn lease(&self, slot: ObjectSlot) -> u64 {
            let lease = self.layout.object_entry(slot).expect("slot") + OBJ_LEASE_OFF;
            self.mem.load_u64(lease, Ordering::SeqCst).expect("lease")
        }
    }

    #[test]
    fn the_last_close_closes_the_object_and_no_one_can_open_it_after() {
        let f = fixture();
        f.create(ObjectSlot(0), Generation(7), PeerSlot(0), false);
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(0),
            ObjectSlot(0),
            Generation(7),
            false,
        )
        .expect("creator takes its hold");
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(1),
            ObjectSlot(0),
            Generation(7),
            false,
        )
        .expect("peer 1 opens");
        assert_eq!(f.lease(ObjectSlot(0)) & LEASE_HOLDERS, 0b11);
        assert_eq!(
            release(&f.mem, &f.layout, PeerSlot(0), ObjectSlot(0)),
            Ok(Released::Held)
        );
        assert_eq!(
            release(&f.mem, &f.layout, PeerSlot(1), ObjectSlot(0)),
            Ok(Released::LastHold)
        );
        assert_eq!(f.lease(ObjectSlot(0)), LEASE_CLOSED);
        assert_eq!(
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(2),
                ObjectSlot(0),
                Generation(7),
                false
            ),
            Err(LeaseError::Gone)
        );
        assert_eq!(
            handles(&f.mem, &f.layout, PeerSlot(2), ObjectSlot(0)),
            Ok(0),
            "a failed open leaves no count"
        );
        assert_eq!(
            release(&f.mem, &f.layout, PeerSlot(1), ObjectSlot(0)),
            Err(LeaseError::NotHeld)
        );
    }

    #[test]
    fn a_persistent_object_outlives_its_handles() {
        let f = fixture();
        f.create(ObjectSlot(1), Generation(3), PeerSlot(2), true);
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(2),
            ObjectSlot(1),
            Generation(3),
            false,
        )
        .expect("hold");
        assert_eq!(
            release(&f.mem, &f.layout, PeerSlot(2), ObjectSlot(1)),
            Ok(Released::Held)
        );
        assert_eq!(f.lease(ObjectSlot(1)), LEASE_KEEP);
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(3),
            ObjectSlot(1),
            Generation(3),
            false,
        )
        .expect("reopen after all closed");
    }

    #[test]
    fn a_hold_on_a_stale_generation_is_refused_and_leaves_the_new_object_alone() {
        let f = fixture();
        f.create(ObjectSlot(2), Generation(10), PeerSlot(0), false);
        // The opener looked up generation 9 (a previous object in this slot).
        assert_eq!(
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(1),
                ObjectSlot(2),
                Generation(9),
                false
            ),
            Err(LeaseError::Gone)
        );
        assert_eq!(
            f.lease(ObjectSlot(2)),
            holder_bit(PeerSlot(0)),
            "the creator's hold is untouched"
        );
        assert_eq!(
            handles(&f.mem, &f.layout, PeerSlot(1), ObjectSlot(2)),
            Ok(0)
        );
    }

    #[test]
    fn unlinked_objects_can_be_duplicated_but_not_opened_by_name() {
        let f = fixture();
        f.create(ObjectSlot(3), Generation(5), PeerSlot(0), false);
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(0),
            ObjectSlot(3),
            Generation(5),
            false,
        )
        .expect("hold");
        let base = f.layout.object_entry(ObjectSlot(3)).expect("slot");
        f.mem
            .store_u32(
                base + OBJ_STATE_OFF,
                object_state::UNLINKED,
                Ordering::SeqCst,
            )
            .expect("unlink");
        assert_eq!(
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(1),
                ObjectSlot(3),
                Generation(5),
                false
            ),
            Err(LeaseError::Gone)
        );
        assert_eq!(
            f.lease(ObjectSlot(3)),
            holder_bit(PeerSlot(0)),
            "the refused opener gave its bit back"
        );
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(1),
            ObjectSlot(3),
            Generation(5),
            true,
        )
        .expect("duplicate a deleted section");
        assert_eq!(
            f.lease(ObjectSlot(3)),
            holder_bit(PeerSlot(0)) | holder_bit(PeerSlot(1))
        );
    }

    #[test]
    fn a_refused_opener_that_was_the_only_holder_closes_the_object() {
        let f = fixture();
        // A non-persistent object whose creator already let go, then the slot's generation
        // changed under a stale opener: nobody holds it, so the opener closes it.
        f.create(ObjectSlot(4), Generation(20), PeerSlot(0), false);
        let lease = f.layout.object_entry(ObjectSlot(4)).expect("slot") + OBJ_LEASE_OFF;
        f.mem
            .store_u64(lease, 0, Ordering::SeqCst)
            .expect("no holders");
        let base = f.layout.object_entry(ObjectSlot(4)).expect("slot");
        f.mem
            .store_u64(base + OBJ_GENERATION_OFF, 21, Ordering::SeqCst)
            .expect("new generation");
        assert_eq!(
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(1),
                ObjectSlot(4),
                Generation(20),
                false
            ),
            Err(LeaseError::GoneClosed)
        );
        assert_eq!(f.lease(ObjectSlot(4)), LEASE_CLOSED);
    }

    #[test]
    fn repeated_opens_by_one_peer_count_handles_without_touching_the_lease() {
        let f = fixture();
        f.create(ObjectSlot(5), Generation(1), PeerSlot(0), false);
        for _ in 0..5 {
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(0),
                ObjectSlot(5),
                Generation(1),
                false,
            )
            .expect("hold");
        }
        assert_eq!(
            handles(&f.mem, &f.layout, PeerSlot(0), ObjectSlot(5)),
            Ok(5)
        );
        for _ in 0..4 {
            assert_eq!(
                release(&f.mem, &f.layout, PeerSlot(0), ObjectSlot(5)),
                Ok(Released::Held)
            );
        }
        assert_eq!(f.lease(ObjectSlot(5)), holder_bit(PeerSlot(0)));
        assert_eq!(
            release(&f.mem, &f.layout, PeerSlot(0), ObjectSlot(5)),
            Ok(Released::LastHold)
        );
    }

    #[test]
    fn a_stale_open_of_a_slot_this_peer_already_holds_leaves_its_hold_intact() {
        let f = fixture();
        f.create(ObjectSlot(7), Generation(31), PeerSlot(0), false);
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(0),
            ObjectSlot(7),
            Generation(31),
            false,
        )
        .expect("hold the current object");
        assert_eq!(
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(0),
                ObjectSlot(7),
                Generation(30),
                false
            ),
            Err(LeaseError::Gone)
        );
        assert_eq!(
            handles(&f.mem, &f.layout, PeerSlot(0), ObjectSlot(7)),
            Ok(1)
        );
        assert_eq!(f.lease(ObjectSlot(7)), holder_bit(PeerSlot(0)));
        // An open by name must not hand out a deleted object, even one we already hold.
        let base = f.layout.object_entry(ObjectSlot(7)).expect("slot");
        f.mem
            .store_u32(
                base + OBJ_STATE_OFF,
                object_state::UNLINKED,
                Ordering::SeqCst,
            )
            .expect("unlink");
        assert_eq!(
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(0),
                ObjectSlot(7),
                Generation(31),
                false
            ),
            Err(LeaseError::Gone)
        );
        acquire(
            &f.mem,
            &f.layout,
            PeerSlot(0),
            ObjectSlot(7),
            Generation(31),
            true,
        )
        .expect("duplicate is fine");
        assert_eq!(
            handles(&f.mem, &f.layout, PeerSlot(0), ObjectSlot(7)),
            Ok(2)
        );
    }

    #[test]
    fn closing_gives_up_on_a_lease_word_that_never_stops_changing() {
        // A word with a holder is never closed; an unheld one is closed at once.
        let f = fixture();
        let lease = f.layout.object_entry(ObjectSlot(0)).expect("slot") + OBJ_LEASE_OFF;
        f.mem
            .store_u64(lease, holder_bit(PeerSlot(1)), Ordering::SeqCst)
            .expect("held");
        assert_eq!(
            close_if_unheld(&f.mem, lease, 0),
            Ok(false),
            "stale expectation, real holder"
        );
        f.mem.store_u64(lease, 0, Ordering::SeqCst).expect("unheld");
        assert_eq!(close_if_unheld(&f.mem, lease, 0), Ok(true));
    }

    #[test]
    fn a_scribbled_lock_bit_is_reported_not_spun_on_forever() {
        let f = fixture();
        f.create(ObjectSlot(6), Generation(1), PeerSlot(0), false);
        let cell = f
            .layout
            .refcount_cell(PeerSlot(0), ObjectSlot(6))
            .expect("cell");
        f.mem
            .store_u32(cell, refcell::REF_LOCK, Ordering::SeqCst)
            .expect("scribble");
        assert_eq!(
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(0),
                ObjectSlot(6),
                Generation(1),
                false
            ),
            Err(LeaseError::Stuck)
        );
    }
}
