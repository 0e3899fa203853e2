//! Open and close without the host: the lease word and the per-peer refcount cells.
//!
//! Invariants (the argument is written out in docs/FORMAT.md):
//! * a peer's cell for slot s counts its handles on the object now in s; count > 0 implies
//!   the peer's holder bit is set in that object's lease word;
//! * the cell's lock bit serialises this peer's own threads (in a guest, its processes)
//!   while they flip the holder bit; while locked, the cell's low bits name the owner
//!   ([`LockOwner`]), since the lock is taken only at count 0 or 1 and the unlock stores the
//!   count (0 or 1) again;
//! * a lock whose owner is known dead is stolen by CAS on the exact tagged value (so one
//!   stealer wins) and repaired: the owner was moving the peer between 0 and 1 handles and
//!   its handle died with it, so the count is 0 and the holder bit goes, closing the object
//!   if that left it unheld. A live owner is waited for; an untagged lock is never stolen;
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
/// a handful of atomics, so hitting this means a live owner was preempted for long or that
/// peer's memory was scribbled.
const LOCK_SPINS: u32 = 1 << 24;

/// Who takes a refcount cell lock, and how to tell whether another owner still lives.
///
/// The format knows no processes: the caller names itself with a token (a guest's processes
/// share one peer, so they use their pid; a host process is a peer of its own and uses
/// [`LockOwner::SOLE`]) and says whether a token's owner can still unlock. `alive` must
/// answer false only for an owner that can never touch the region again (a process that
/// exited); a false "dead" would let two users of the peer flip its holder bit at once.
#[derive(Clone, Copy)]
pub struct LockOwner<'a> {
    /// This user's token (bits 0..30 are stored; see [`refcell::locked_by`]).
    pub token: u32,
    /// Whether the owner named by a token found in a locked cell can still unlock it.
    pub alive: &'a dyn Fn(u32) -> bool,
    /// Test seam: called while this user holds a cell lock for an open, its holder bit set,
    /// just before it unlocks, so a test can kill it there. `None` outside tests.
    pub in_lock: Option<&'a dyn Fn()>,
}

impl core::fmt::Debug for LockOwner<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LockOwner")
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

fn always_alive(_token: u32) -> bool {
    true
}

impl LockOwner<'static> {
    /// The only user of its peer (a host process, a single-process guest, a test): its
    /// token is 1 and no owner is ever presumed dead, so a stuck lock stays stuck, which
    /// is all a peer of one process can see (its death reclaims the whole row).
    pub const SOLE: LockOwner<'static> = LockOwner {
        token: 1,
        alive: &always_alive,
        in_lock: None,
    };
}

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

/// Takes one more handle on object (`slot`, `generation`) for peer slot `peer_slot`, as the
/// peer's only user ([`LockOwner::SOLE`]); see [`acquire_as`].
pub fn acquire<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
    generation: Generation,
    allow_unlinked: bool,
) -> Result<(), LeaseError> {
    acquire_as(
        mem,
        layout,
        peer_slot,
        slot,
        generation,
        allow_unlinked,
        &LockOwner::SOLE,
    )
}

/// Takes one more handle on object (`slot`, `generation`) for peer slot `peer_slot`, taking
/// the cell lock (if needed) as `owner`.
///
/// `allow_unlinked`: duplicating an existing handle may take a deleted (unlinked) object;
/// opening by name may not. If a dead owner's lock had to be repaired and that closed the
/// object, a failed open says so with [`LeaseError::GoneClosed`] (ring the host).
pub fn acquire_as<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
    generation: Generation,
    allow_unlinked: bool,
    owner: &LockOwner<'_>,
) -> Result<(), LeaseError> {
    let c = cell(layout, peer_slot, slot)?;
    let mut repaired_closed = false;
    let result = acquire_cell(
        mem,
        layout,
        &c,
        slot,
        generation,
        allow_unlinked,
        owner,
        &mut repaired_closed,
    );
    match result {
        Err(LeaseError::Gone) if repaired_closed => Err(LeaseError::GoneClosed),
        other => other,
    }
}

#[allow(clippy::too_many_arguments)] // the lease coordinates plus the repair report
fn acquire_cell<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    c: &Cell,
    slot: ObjectSlot,
    generation: Generation,
    allow_unlinked: bool,
    owner: &LockOwner<'_>,
    repaired_closed: &mut bool,
) -> Result<(), LeaseError> {
    loop {
        let v = load_unlocked(mem, c, owner, repaired_closed)?;
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
            return Err(match release_cell(mem, c, owner, repaired_closed)? {
                Released::LastHold => LeaseError::GoneClosed,
                Released::Held => LeaseError::Gone,
            });
        }
        if mem
            .cas_u32(c.cell, v, refcell::locked_by(owner.token))?
            .is_err()
        {
            continue;
        }
        // We own this peer's transition for the slot.
        let result = take_holder_bit(mem, layout, c, slot, generation, allow_unlinked);
        if let (Ok(()), Some(hook)) = (&result, owner.in_lock) {
            hook();
        }
        let after = if result.is_ok() { 1 } else { 0 };
        mem.store_u32(c.cell, after, Ordering::Release)?;
        return result;
    }
}

/// Loads a refcount cell, waiting while another user of this peer holds its lock and
/// taking the lock over from one that died holding it ([`steal`]). Asks about the owner's
/// life at the first sight of the lock and then after 2, 4, 8, … spins, so a dead owner is
/// noticed at once and a live one costs a few liveness checks, not one per spin.
fn load_unlocked<M: SharedMemory + ?Sized>(
    mem: &M,
    c: &Cell,
    owner: &LockOwner<'_>,
    repaired_closed: &mut bool,
) -> Result<u32, LeaseError> {
    let mut spins = 0u32;
    while spins < LOCK_SPINS {
        let v = mem.load_u32(c.cell, Ordering::Acquire)?;
        let Some(tag) = refcell::lock_owner(v) else {
            return Ok(v);
        };
        if (spins == 0 || spins.is_power_of_two()) && tag != 0 && !(owner.alive)(tag) {
            if steal(mem, c, v, owner)? {
                *repaired_closed = true;
            }
            // Whether we stole it or another stealer did, look again from the start.
            spins = 0;
            continue;
        }
        core::hint::spin_loop();
        spins += 1;
    }
    Err(LeaseError::Stuck)
}

/// Takes over the cell lock `locked` (a value naming an owner found dead) and finishes that
/// owner's transition. Returns whether the repair closed the object (ring the host).
///
/// The owner took the lock at count 0 (to open) or 1 (to close its peer's last handle), and
/// nobody else of this peer could change the count meanwhile; its handle died with it. So
/// the peer holds nothing here: count 0, holder bit cleared, and the object closed if that
/// left it unheld — exactly what the owner's close would have done, and what an open that
/// backs out does. Done under the lock (re-tagged to us) so that no other user of the peer
/// flips the bit meanwhile; a second stealer's CAS on the dead owner's value fails.
fn steal<M: SharedMemory + ?Sized>(
    mem: &M,
    c: &Cell,
    locked: u32,
    owner: &LockOwner<'_>,
) -> Result<bool, Fault> {
    if mem
        .cas_u32(c.cell, locked, refcell::locked_by(owner.token))?
        .is_err()
    {
        return Ok(false);
    }
    let closed = drop_holder_bit(mem, c);
    mem.store_u32(c.cell, 0, Ordering::Release)?;
    closed
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

/// Closes one handle of peer slot `peer_slot` on `slot`, as the peer's only user
/// ([`LockOwner::SOLE`]); see [`release_as`].
pub fn release<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
) -> Result<Released, LeaseError> {
    release_as(mem, layout, peer_slot, slot, &LockOwner::SOLE)
}

/// Closes one handle of peer slot `peer_slot` on `slot`, taking the cell lock (if needed) as
/// `owner`.
///
/// A caller that really holds a handle never finds a dead owner's lock (that owner's
/// transition was at the peer's count 0 or at its last handle); if one is found anyway,
/// it is repaired, and the close that follows reports what the count then says
/// (`NotHeld`); an object that repair closed is reaped by the host's next sweep.
pub fn release_as<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
    owner: &LockOwner<'_>,
) -> Result<Released, LeaseError> {
    let c = cell(layout, peer_slot, slot)?;
    let mut repaired_closed = false;
    release_cell(mem, &c, owner, &mut repaired_closed)
}

fn release_cell<M: SharedMemory + ?Sized>(
    mem: &M,
    c: &Cell,
    owner: &LockOwner<'_>,
    repaired_closed: &mut bool,
) -> Result<Released, LeaseError> {
    loop {
        let v = load_unlocked(mem, c, owner, repaired_closed)?;
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
        if mem
            .cas_u32(c.cell, v, refcell::locked_by(owner.token))?
            .is_err()
        {
            continue;
        }
        let closed = drop_holder_bit(mem, c);
        mem.store_u32(c.cell, 0, Ordering::Release)?;
        return Ok(if closed? {
            Released::LastHold
        } else {
            Released::Held
        });
    }
}

/// This peer's handle count on `slot` (0 while the cell is locked: its bits are a token).
pub fn handles<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
) -> Result<u32, Fault> {
    let c = cell(layout, peer_slot, slot)?;
    Ok(refcell::count(mem.load_u32(c.cell, Ordering::Acquire)?).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};
    use crate::layout::{object_state, ObjectEntry, OBJ_GENERATION_OFF, OBJ_STATE_OFF};
    use crate::object::{make_entry, publish_named};
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
            let mut e: ObjectEntry = make_entry(
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
            e.name_off = slot.0 * 8;
            publish_named(&self.mem, &self.layout, slot, &e, b"x").expect("publish");
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

    /// Runs `f` on its own thread and fails the test if it takes longer than `secs`: a lock
    /// that is never given up must fail the test, not hang it.
    fn with_watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(secs))
            .expect("the test finished before its watchdog")
    }

    /// A token the tests' liveness checks call dead.
    const DEAD: u32 = 77;

    fn dead_is_dead(token: u32) -> bool {
        token != DEAD
    }

    impl Fixture {
        fn cell(&self, peer: PeerSlot, slot: ObjectSlot) -> u64 {
            self.layout.refcount_cell(peer, slot).expect("cell")
        }
        fn cell_value(&self, peer: PeerSlot, slot: ObjectSlot) -> u32 {
            self.mem
                .load_u32(self.cell(peer, slot), Ordering::SeqCst)
                .expect("cell")
        }
        /// A user of `peer` died holding its cell lock for `slot` with its holder bit set.
        fn die_holding_the_lock(&self, peer: PeerSlot, slot: ObjectSlot) {
            self.mem
                .store_u32(
                    self.cell(peer, slot),
                    refcell::locked_by(DEAD),
                    Ordering::SeqCst,
                )
                .expect("lock");
            let lease = self.layout.object_entry(slot).expect("slot") + OBJ_LEASE_OFF;
            self.mem.fetch_or_u64(lease, holder_bit(peer)).expect("bit");
        }
    }

    #[test]
    fn a_dead_owners_lock_is_stolen_and_its_holder_bit_dropped_when_others_still_hold() {
        with_watchdog(30, || {
            let f = fixture();
            f.create(ObjectSlot(0), Generation(4), PeerSlot(0), false);
            acquire(
                &f.mem,
                &f.layout,
                PeerSlot(0),
                ObjectSlot(0),
                Generation(4),
                false,
            )
            .expect("the creator holds");
            // A process of peer 1 died in the middle of its first open.
            f.die_holding_the_lock(PeerSlot(1), ObjectSlot(0));
            let me = LockOwner {
                token: 8,
                alive: &dead_is_dead,
                in_lock: None,
            };
            acquire_as(
                &f.mem,
                &f.layout,
                PeerSlot(1),
                ObjectSlot(0),
                Generation(4),
                false,
                &me,
            )
            .expect("another process of peer 1 opens");
            assert_eq!(
                f.cell_value(PeerSlot(1), ObjectSlot(0)),
                1,
                "only our handle counts"
            );
            assert_eq!(
                release_as(&f.mem, &f.layout, PeerSlot(1), ObjectSlot(0), &me),
                Ok(Released::Held)
            );
            assert_eq!(
                f.lease(ObjectSlot(0)),
                holder_bit(PeerSlot(0)),
                "the dead owner's bit went with our close"
            );
        });
    }

    #[test]
    fn a_dead_owners_lock_on_the_last_hold_is_stolen_and_the_object_closed_and_reported() {
        with_watchdog(30, || {
            let f = fixture();
            f.create(ObjectSlot(1), Generation(6), PeerSlot(1), false);
            // The only holder's process died while closing the peer's last handle.
            f.die_holding_the_lock(PeerSlot(1), ObjectSlot(1));
            let me = LockOwner {
                token: 8,
                alive: &dead_is_dead,
                in_lock: None,
            };
            assert_eq!(
                acquire_as(
                    &f.mem,
                    &f.layout,
                    PeerSlot(1),
                    ObjectSlot(1),
                    Generation(6),
                    false,
                    &me
                ),
                Err(LeaseError::GoneClosed),
                "the repair closed it: the caller must ring the host"
            );
            assert_eq!(f.lease(ObjectSlot(1)), LEASE_CLOSED);
            assert_eq!(f.cell_value(PeerSlot(1), ObjectSlot(1)), 0);
        });
    }

    #[test]
    fn a_live_owners_lock_is_waited_for_and_never_stolen() {
        with_watchdog(120, || {
            let f = fixture();
            f.create(ObjectSlot(2), Generation(2), PeerSlot(1), false);
            f.die_holding_the_lock(PeerSlot(1), ObjectSlot(2));
            let asked = core::cell::Cell::new(0u32);
            let alive = |_: u32| {
                asked.set(asked.get() + 1);
                true
            };
            let me = LockOwner {
                token: 8,
                alive: &alive,
                in_lock: None,
            };
            assert_eq!(
                release_as(&f.mem, &f.layout, PeerSlot(1), ObjectSlot(2), &me),
                Err(LeaseError::Stuck)
            );
            assert_eq!(
                f.cell_value(PeerSlot(1), ObjectSlot(2)),
                refcell::locked_by(DEAD),
                "the owner still has its lock"
            );
            assert_eq!(f.lease(ObjectSlot(2)), holder_bit(PeerSlot(1)));
            assert!(
                asked.get() <= 26,
                "liveness is asked at powers of two, not per spin: {}",
                asked.get()
            );
        });
    }

    #[test]
    fn an_untagged_lock_is_never_stolen() {
        with_watchdog(120, || {
            let f = fixture();
            f.create(ObjectSlot(3), Generation(2), PeerSlot(1), false);
            let cell = f.cell(PeerSlot(1), ObjectSlot(3));
            f.mem
                .store_u32(cell, refcell::REF_LOCK, Ordering::SeqCst)
                .expect("scribble");
            let me = LockOwner {
                token: 8,
                alive: &|_| false,
                in_lock: None,
            };
            assert_eq!(
                release_as(&f.mem, &f.layout, PeerSlot(1), ObjectSlot(3), &me),
                Err(LeaseError::Stuck)
            );
            assert_eq!(f.cell_value(PeerSlot(1), ObjectSlot(3)), refcell::REF_LOCK);
        });
    }

    #[test]
    fn of_two_stealers_of_one_dead_lock_exactly_one_repairs() {
        with_watchdog(30, || {
            let f = fixture();
            f.create(ObjectSlot(4), Generation(9), PeerSlot(2), false);
            f.die_holding_the_lock(PeerSlot(2), ObjectSlot(4));
            let c = cell(&f.layout, PeerSlot(2), ObjectSlot(4)).expect("cell");
            let dead = refcell::locked_by(DEAD);
            let a = LockOwner {
                token: 8,
                alive: &dead_is_dead,
                in_lock: None,
            };
            let b = LockOwner {
                token: 9,
                alive: &dead_is_dead,
                in_lock: None,
            };
            // Both saw the dead owner's value; the first CAS wins and repairs.
            assert_eq!(
                steal(&f.mem, &c, dead, &a),
                Ok(true),
                "a repaired and closed"
            );
            assert_eq!(steal(&f.mem, &c, dead, &b), Ok(false), "b's CAS lost");
            assert_eq!(f.cell_value(PeerSlot(2), ObjectSlot(4)), 0);
            assert_eq!(f.lease(ObjectSlot(4)), LEASE_CLOSED);
        });
    }

    #[test]
    fn two_users_of_one_peer_racing_to_steal_one_dead_lock_report_its_close_once() {
        with_watchdog(60, || {
            for round in 0..200u64 {
                let f = std::sync::Arc::new(fixture());
                let generation = Generation(round + 1);
                f.create(ObjectSlot(5), generation, PeerSlot(3), false);
                f.die_holding_the_lock(PeerSlot(3), ObjectSlot(5));
                let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
                let racers: Vec<_> = [8u32, 9]
                    .into_iter()
                    .map(|token| {
                        let (f, barrier) = (f.clone(), barrier.clone());
                        std::thread::spawn(move || {
                            let me = LockOwner {
                                token,
                                alive: &dead_is_dead,
                                in_lock: None,
                            };
                            barrier.wait();
                            acquire_as(
                                &f.mem,
                                &f.layout,
                                PeerSlot(3),
                                ObjectSlot(5),
                                generation,
                                false,
                                &me,
                            )
                        })
                    })
                    .collect();
                let mut results: Vec<_> = racers
                    .into_iter()
                    .map(|r| r.join().expect("racer"))
                    .collect();
                results.sort_by_key(|r| format!("{r:?}"));
                assert_eq!(
                    results,
                    [Err(LeaseError::Gone), Err(LeaseError::GoneClosed)],
                    "round {round}"
                );
                assert_eq!(f.lease(ObjectSlot(5)), LEASE_CLOSED);
                assert_eq!(f.cell_value(PeerSlot(3), ObjectSlot(5)), 0);
            }
        });
    }
}
