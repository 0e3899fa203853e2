//! Events, mutexes and section notifications: the protocol on an object's sync words
//! (`signal_seq`, `waiters`, `sync`, `abandoned` in the entry's lease line, docs/FORMAT.md
//! "Sync words"). Every function is a few atomics on shared memory; none blocks. Sleeping is
//! the caller's business (its transport's wait), and so is waking: a change that finds
//! waiters rings the waiting holders' doorbells directly, or sends the host a WAKE request
//! for those it cannot ring.
//!
//! The wake-up rule, which no function here can enforce alone: a waiter sets its bit in
//! `waiters` (SeqCst) *before* it re-checks its condition, and a changer changes the state
//! (SeqCst) *before* it looks at `waiters`. One of the two sees the other, so a wake-up is
//! never lost; the host clears the bits it rings, and a waiter sets its bit again before
//! every sleep.

use core::sync::atomic::Ordering;

use crate::ids::{ObjectSlot, PeerSlot};
use crate::layout::{
    holder_bit, mutex_word, Layout, OBJ_ABANDONED_OFF, OBJ_SIGNAL_SEQ_OFF, OBJ_SYNC_OFF,
    OBJ_WAITERS_OFF,
};
use crate::shm::{Fault, SharedMemory};

/// Offset of sync word `field` (one of the `OBJ_*_OFF` of the lease line) of object `slot`.
fn word(layout: &Layout, slot: ObjectSlot, field: u64) -> Result<u64, Fault> {
    layout
        .object_entry(slot)
        .map(|base| base + field)
        .ok_or(Fault::OutOfBounds {
            offset: u64::from(slot.0),
            len: 0,
        })
}

/// Host, when it publishes a new object in `slot`: zeroes the sync words the previous
/// object may have left (before the entry is published, like the lease word).
pub fn reset_words<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<(), Fault> {
    for field in [
        OBJ_SIGNAL_SEQ_OFF,
        OBJ_WAITERS_OFF,
        OBJ_SYNC_OFF,
        OBJ_ABANDONED_OFF,
    ] {
        mem.store_u64(word(layout, slot, field)?, 0, Ordering::SeqCst)?;
    }
    Ok(())
}

/// The changes counted on an object so far (signals, notifies, unlocks).
pub fn signal_seq<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<u64, Fault> {
    mem.load_u64(word(layout, slot, OBJ_SIGNAL_SEQ_OFF)?, Ordering::SeqCst)
}

/// The waiters word (bit i = peer slot i asked to be rung).
pub fn waiters<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<u64, Fault> {
    mem.load_u64(word(layout, slot, OBJ_WAITERS_OFF)?, Ordering::SeqCst)
}

/// The `sync` word: an event's 0/1, a mutex's owner word.
pub fn sync_word<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<u64, Fault> {
    mem.load_u64(word(layout, slot, OBJ_SYNC_OFF)?, Ordering::SeqCst)
}

/// Waiter: asks to be rung on the next change of `slot`. Call before re-checking the
/// condition, every time before sleeping.
pub fn register_waiter<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    me: PeerSlot,
) -> Result<(), Fault> {
    mem.fetch_or_u64(word(layout, slot, OBJ_WAITERS_OFF)?, holder_bit(me))?;
    Ok(())
}

/// Host on WAKE, or a changer that rings the waiters itself: takes the waiters word (swaps
/// it to 0) to ring those of its bits that belong to connected holders. Bits it does not ring are dropped: a real waiter sets its bit again
/// before it sleeps again.
pub fn take_waiters<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<u64, Fault> {
    // One fetch-and, not a CAS loop: a peer rewriting the word cannot keep the host here.
    mem.fetch_and_u64(word(layout, slot, OBJ_WAITERS_OFF)?, 0)
}

/// A changer that took the waiters word to ring them itself (FORMAT.md §6a, "Direct
/// rings") puts back the bits it could not ring, for the host to ring on WAKE.
pub fn restore_waiters<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    bits: u64,
) -> Result<(), Fault> {
    mem.fetch_or_u64(word(layout, slot, OBJ_WAITERS_OFF)?, bits)?;
    Ok(())
}

/// CAS attempts [`increment`] makes before it gives up.
const INCREMENT_TRIES: u32 = 1024;

/// Adds 1 to the u64 at `off` (a CAS loop: the `SharedMemory` seam has no fetch-add). The
/// loop is bounded: a CAS fails only when the counter changed, and a counter that keeps
/// changing under us has changed anyway (waiters look for a different value), so after
/// [`INCREMENT_TRIES`] failures it stops, rather than let a peer that rewrites the word
/// keep the caller (the host serving every peer) spinning.
fn increment<M: SharedMemory + ?Sized>(mem: &M, off: u64) -> Result<(), Fault> {
    let mut v = mem.load_u64(off, Ordering::SeqCst)?;
    for _ in 0..INCREMENT_TRIES {
        match mem.cas_u64(off, v, v.wrapping_add(1))? {
            Ok(_) => return Ok(()),
            Err(now) => v = now,
        }
    }
    Ok(())
}

/// Counts one change (signal, notify, unlock) and says whether anyone waits for it, i.e.
/// whether the caller must send WAKE.
fn count_change<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<bool, Fault> {
    increment(mem, word(layout, slot, OBJ_SIGNAL_SEQ_OFF)?)?;
    Ok(waiters(mem, layout, slot)? != 0)
}

/// Section notify: counts a change; `true` if WAKE must follow.
pub fn notify<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<bool, Fault> {
    count_change(mem, layout, slot)
}

/// Event signal: sets the event (SeqCst), counts the signal; `true` if WAKE must follow.
pub fn event_set<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<bool, Fault> {
    mem.store_u64(word(layout, slot, OBJ_SYNC_OFF)?, 1, Ordering::SeqCst)?;
    count_change(mem, layout, slot)
}

/// Event reset: clears the event.
pub fn event_reset<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<(), Fault> {
    mem.store_u64(word(layout, slot, OBJ_SYNC_OFF)?, 0, Ordering::SeqCst)
}

/// Event wait, one try: a manual-reset event is taken if it is set; an auto-reset event is
/// taken by the one waiter that swaps it from 1 to 0.
pub fn event_try_take<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    manual_reset: bool,
) -> Result<bool, Fault> {
    let off = word(layout, slot, OBJ_SYNC_OFF)?;
    if manual_reset {
        Ok(mem.load_u64(off, Ordering::SeqCst)? != 0)
    } else {
        Ok(mem.cas_u64(off, 1, 0)?.is_ok())
    }
}

/// What an attempt to release a mutex found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unlocked {
    /// Released without the host; `true` if WAKE must follow (someone waits to try).
    Released(bool),
    /// The host holds a queue of waiters (HANDOFF): send UNLOCK, the host hands it over.
    ViaHost,
    /// The caller does not hold it (STATUS_MUTANT_NOT_OWNED).
    NotOwner,
}

/// Mutex lock, fast path: takes a free mutex (CAS 0 → `owner`). `false` if it is held (or
/// the host is handing it over to queued waiters): then LOCK through the host.
pub fn mutex_try_lock<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    owner: u64,
) -> Result<bool, Fault> {
    Ok(mem
        .cas_u64(word(layout, slot, OBJ_SYNC_OFF)?, 0, owner)?
        .is_ok())
}

/// Whether `owner` holds the mutex now (HANDOFF ignored).
pub fn mutex_held_by<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    owner: u64,
) -> Result<bool, Fault> {
    Ok(sync_word(mem, layout, slot)? & mutex_word::OWNER == owner)
}

/// A new owner's check: `true` (and cleared) if the previous owner died holding it.
pub fn mutex_take_abandoned<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<bool, Fault> {
    let off = word(layout, slot, OBJ_ABANDONED_OFF)?;
    let mut w = mem.load_u64(off, Ordering::SeqCst)?;
    loop {
        if w == 0 {
            return Ok(false);
        }
        match mem.cas_u64(off, w, 0)? {
            Ok(_) => return Ok(true),
            Err(now) => w = now,
        }
    }
}

/// Mutex unlock, fast path: CAS `owner` → 0 when no HANDOFF is set.
pub fn mutex_unlock<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    owner: u64,
) -> Result<Unlocked, Fault> {
    let off = word(layout, slot, OBJ_SYNC_OFF)?;
    let w = mem.load_u64(off, Ordering::SeqCst)?;
    if w & mutex_word::OWNER != owner {
        return Ok(Unlocked::NotOwner);
    }
    if w & mutex_word::HANDOFF != 0 {
        return Ok(Unlocked::ViaHost);
    }
    match mem.cas_u64(off, owner, 0)? {
        Ok(_) => Ok(Unlocked::Released(count_change(mem, layout, slot)?)),
        // HANDOFF appeared in between (the host queued a waiter): it decides now.
        Err(now) if now & mutex_word::OWNER == owner => Ok(Unlocked::ViaHost),
        Err(_) => Ok(Unlocked::NotOwner),
    }
}

/// Host: sets the mutex word to `new` if it still holds `old`; returns the word found.
pub fn mutex_swap_word<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
    old: u64,
    new: u64,
) -> Result<Result<u64, u64>, Fault> {
    mem.cas_u64(word(layout, slot, OBJ_SYNC_OFF)?, old, new)
}

/// Host: marks a mutex abandoned (its owner died holding it).
pub fn mutex_mark_abandoned<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<(), Fault> {
    mem.store_u64(word(layout, slot, OBJ_ABANDONED_OFF)?, 1, Ordering::SeqCst)
}

/// Host: counts a change it made itself (a handoff) without looking at waiters.
pub fn host_count_change<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: ObjectSlot,
) -> Result<(), Fault> {
    increment(mem, word(layout, slot, OBJ_SIGNAL_SEQ_OFF)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::layout::mutex_word::{owner, HANDOFF};
    use crate::shm::RawRegion;
    use core::ptr::NonNull;

    const SIZE: usize = 1 << 20;

    /// Runs `f` over a 1 MiB zeroed region laid out for 4 peers and 8 objects.
    pub(crate) fn with_region(f: impl FnOnce(&RawRegion<'_>, &Layout)) {
        let mut buf = vec![0u64; SIZE / 8];
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: buf outlives the region (dropped after f returns); 8-aligned; SIZE bytes.
        let mem = unsafe { RawRegion::new(base, SIZE as u64) };
        let layout = Layout::compute(SIZE as u64, 4, 8, 2, 4096).expect("layout");
        f(&mem, &layout);
    }

    #[test]
    fn an_auto_reset_event_is_taken_by_exactly_one_waiter() {
        with_region(|m, l| {
            let s = ObjectSlot(1);
            assert!(!event_try_take(m, l, s, false).expect("try"));
            assert!(!event_set(m, l, s).expect("set"), "nobody waits: no WAKE");
            assert!(event_try_take(m, l, s, false).expect("first"));
            assert!(!event_try_take(m, l, s, false).expect("second"));
            assert_eq!(signal_seq(m, l, s), Ok(1));
        });
    }

    #[test]
    fn a_manual_reset_event_stays_set_until_reset() {
        with_region(|m, l| {
            let s = ObjectSlot(2);
            event_set(m, l, s).expect("set");
            assert!(event_try_take(m, l, s, true).expect("first"));
            assert!(event_try_take(m, l, s, true).expect("second"));
            event_reset(m, l, s).expect("reset");
            assert!(!event_try_take(m, l, s, true).expect("after reset"));
        });
    }

    #[test]
    fn a_change_after_a_registered_waiter_asks_for_a_wake_and_the_host_takes_the_bits() {
        with_region(|m, l| {
            let s = ObjectSlot(0);
            register_waiter(m, l, s, PeerSlot(3)).expect("register");
            assert!(notify(m, l, s).expect("notify"), "a waiter is registered");
            assert_eq!(take_waiters(m, l, s), Ok(1 << 3));
            assert_eq!(waiters(m, l, s), Ok(0));
            assert!(!notify(m, l, s).expect("notify"));
        });
    }

    #[test]
    fn a_mutex_is_held_by_one_owner_and_only_the_owner_releases_it() {
        with_region(|m, l| {
            let s = ObjectSlot(4);
            let a = owner(PeerSlot(0), 77);
            let b = owner(PeerSlot(1), 88);
            assert!(mutex_try_lock(m, l, s, a).expect("a locks"));
            assert!(!mutex_try_lock(m, l, s, b).expect("b is refused"));
            assert_eq!(mutex_unlock(m, l, s, b), Ok(Unlocked::NotOwner));
            assert_eq!(mutex_unlock(m, l, s, a), Ok(Unlocked::Released(false)));
            assert!(mutex_try_lock(m, l, s, b).expect("b locks"));
            assert!(mutex_held_by(m, l, s, b).expect("held"));
        });
    }

    #[test]
    fn a_mutex_with_queued_waiters_is_released_through_the_host() {
        with_region(|m, l| {
            let s = ObjectSlot(5);
            let a = owner(PeerSlot(2), 5);
            assert!(mutex_try_lock(m, l, s, a).expect("lock"));
            assert_eq!(mutex_swap_word(m, l, s, a, a | HANDOFF), Ok(Ok(a)));
            assert!(!mutex_try_lock(m, l, s, owner(PeerSlot(0), 1)).expect("queued first"));
            assert_eq!(mutex_unlock(m, l, s, a), Ok(Unlocked::ViaHost));
            assert!(mutex_held_by(m, l, s, a).expect("still a's until the host acts"));
        });
    }

    #[test]
    fn abandonment_is_reported_once_to_the_next_owner() {
        with_region(|m, l| {
            let s = ObjectSlot(6);
            mutex_mark_abandoned(m, l, s).expect("mark");
            assert!(mutex_take_abandoned(m, l, s).expect("first"));
            assert!(!mutex_take_abandoned(m, l, s).expect("second"));
        });
    }

    #[test]
    fn owner_words_name_their_slot_and_token() {
        let w = owner(PeerSlot(61), u32::MAX);
        assert_eq!(mutex_word::slot(w), Some(PeerSlot(61)));
        assert_eq!(mutex_word::token(w), u32::MAX);
        assert_eq!(mutex_word::slot(0), None);
        assert_eq!(
            mutex_word::slot(63),
            None,
            "slot byte beyond 62 peers is malformed"
        );
        assert_eq!(w & HANDOFF, 0);
    }

    #[test]
    fn reset_clears_every_sync_word() {
        with_region(|m, l| {
            let s = ObjectSlot(7);
            event_set(m, l, s).expect("set");
            register_waiter(m, l, s, PeerSlot(1)).expect("wait");
            mutex_mark_abandoned(m, l, s).expect("mark");
            reset_words(m, l, s).expect("reset");
            assert_eq!(signal_seq(m, l, s), Ok(0));
            assert_eq!(waiters(m, l, s), Ok(0));
            assert_eq!(sync_word(m, l, s), Ok(0));
            assert!(!mutex_take_abandoned(m, l, s).expect("clear"));
        });
    }
}
