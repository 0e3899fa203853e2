//! Revocation and quarantine (docs/FORMAT.md §11a): the words that let vshmd hold destroyed
//! memory back until every peer has checked it no longer uses it.
//!
//! Any peer can write any byte of the region, so one can make an object *look* closed while
//! an honest peer still holds it (zero the holder's refcount cell, store CLOSED, ring).
//! vshmd cannot tell that from an honest last close. So it never hands destroyed memory to
//! anyone at once: it bumps `Superblock::revoke_seq`, rings every peer, and keeps the range
//! out of the heap until each peer connected at the destroy has acknowledged (or left, or
//! `Superblock::quarantine_ms` passed). A peer checks every hold it knows it has
//! ([`check_hold`]); one whose object is gone was revoked behind its back: the peer stops
//! using that memory, then acknowledges — by a ring on its own copy of the host's vector-1
//! eventfd carrying [`ack_ring_value`], which no other peer can make for it. The mailbox
//! words ([`acknowledge`], [`acknowledgement`]) are reports for people; vshmd trusts them
//! for nothing.

use core::sync::atomic::Ordering;

use crate::ids::{Generation, ObjectSlot, PeerSlot};
use crate::layout::{
    holder_bit, object_state, refcell, Layout, LEASE_CLOSED, MB_AUDITED_SEQ_OFF, MB_REVOKED_OFF,
    OBJ_LEASE_OFF, SB_REVOKE_SEQ_OFF,
};
use crate::object;
use crate::shm::{Fault, SharedMemory};

/// Bits of an acknowledgement ring's value below the sequence number (FORMAT.md §11a).
const ACK_COUNT_BITS: u32 = 16;

/// The value a peer adds to its own host doorbell eventfd for vector
/// [`crate::layout::VECTOR_WAKE`] to acknowledge `revoke_seq` values up to `seq`: the
/// sequence number above a count of 1. Only this peer holds that eventfd (vshmd gives each
/// peer its own copy of the host's), so vshmd knows whose acknowledgement it is, which
/// a word in shared memory could never tell it.
pub const fn ack_ring_value(seq: u64) -> u64 {
    (seq << ACK_COUNT_BITS) | 1
}

/// Host: the `revoke_seq` a value read from a peer's acknowledgement eventfd vouches for.
/// The eventfd adds up what was written since the last read, so several acknowledgements
/// (or plain rings, which add 1) may arrive as one sum; the average sequence number of the
/// acknowledgements in it is at most the largest, so it never credits more than was
/// acknowledged. 0 when it holds none.
pub const fn acked_by_ring_value(value: u64) -> u64 {
    let count = value & ((1 << ACK_COUNT_BITS) - 1);
    if count == 0 {
        return 0;
    }
    (value >> ACK_COUNT_BITS) / count
}

/// What a peer finds when it checks one of its holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The object is there and the peer's holder bit and refcount cell say it holds it.
    Intact,
    /// The object is there but the peer's holder bit or refcount cell was cleared by
    /// someone else: tampering, not yet a revocation.
    Tampered,
    /// The object this hold was on is gone (its slot is free or holds another generation):
    /// its memory may be handed to someone else once the peer acknowledges.
    Revoked,
}

fn no_slot(slot: ObjectSlot) -> Fault {
    Fault::OutOfBounds {
        offset: u64::from(slot.0),
        len: 0,
    }
}

/// The host's revocation counter (`Superblock::revoke_seq`).
pub fn revoke_seq<M: SharedMemory + ?Sized>(mem: &M) -> Result<u64, Fault> {
    mem.load_u64(SB_REVOKE_SEQ_OFF, Ordering::SeqCst)
}

/// Host: publishes a new revocation counter.
pub fn publish_revoke_seq<M: SharedMemory + ?Sized>(mem: &M, seq: u64) -> Result<(), Fault> {
    mem.store_u64(SB_REVOKE_SEQ_OFF, seq, Ordering::SeqCst)
}

/// Peer: checks its hold on (`slot`, `generation`) as peer slot `peer_slot`.
pub fn check_hold<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    slot: ObjectSlot,
    generation: Generation,
) -> Result<Hold, Fault> {
    let entry = layout.object_entry(slot).ok_or(no_slot(slot))?;
    let cell = layout.refcount_cell(peer_slot, slot).ok_or(no_slot(slot))?;
    let gen_now = object::generation(mem, layout, slot)?;
    let state = object::state(mem, layout, slot)?;
    if gen_now != generation || !(state == object_state::LIVE || state == object_state::UNLINKED) {
        return Ok(Hold::Revoked);
    }
    let lease = mem.load_u64(entry + OBJ_LEASE_OFF, Ordering::SeqCst)?;
    let count = mem.load_u32(cell, Ordering::Acquire)?;
    // A locked cell is mid-transition by another of this peer's threads: not evidence.
    let counted = count & refcell::REF_LOCK != 0 || count & refcell::REF_COUNT > 0;
    if lease & LEASE_CLOSED != 0 || lease & holder_bit(peer_slot) == 0 || !counted {
        return Ok(Hold::Tampered);
    }
    Ok(Hold::Intact)
}

fn mailbox(layout: &Layout, peer_slot: PeerSlot) -> Result<u64, Fault> {
    layout.mailbox(peer_slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(peer_slot.0),
        len: 0,
    })
}

/// Peer: records that it has checked its holds up to `seq` and found `newly_revoked` more
/// revoked handles. `audited_seq` only moves forward (several threads may audit at once),
/// except from a value above the current `revoke_seq`: a scribble, or this peer's own
/// acknowledgement of a scribbled `revoke_seq`, which vshmd counts as nothing and which
/// would otherwise refuse every honest acknowledgement after it.
pub fn acknowledge<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
    seq: u64,
    newly_revoked: u64,
) -> Result<(), Fault> {
    let base = mailbox(layout, peer_slot)?;
    if newly_revoked > 0 {
        update(mem, base + MB_REVOKED_OFF, |n| {
            Some(n.wrapping_add(newly_revoked))
        })?;
    }
    let published = revoke_seq(mem)?;
    update(mem, base + MB_AUDITED_SEQ_OFF, |cur| {
        (cur < seq || (cur > published && cur != seq)).then_some(seq)
    })
}

/// CASes `f(current)` into the word at `off` until it sticks or `f` declines. Bounded: each
/// failure means another thread of this peer (or a scribbler) moved the word.
fn update<M: SharedMemory + ?Sized>(
    mem: &M,
    off: u64,
    f: impl Fn(u64) -> Option<u64>,
) -> Result<(), Fault> {
    let mut cur = mem.load_u64(off, Ordering::Acquire)?;
    for _ in 0..64 {
        let Some(new) = f(cur) else {
            return Ok(());
        };
        match mem.cas_u64(off, cur, new)? {
            Ok(_) => return Ok(()),
            Err(now) => cur = now,
        }
    }
    Ok(())
}

/// Host: a peer's acknowledgement words, (`audited_seq`, `revoked_handles`). Peer-written:
/// a hint the host uses only to release quarantine early and to report.
pub fn acknowledgement<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_slot: PeerSlot,
) -> Result<(u64, u64), Fault> {
    let base = mailbox(layout, peer_slot)?;
    Ok((
        mem.load_u64(base + MB_AUDITED_SEQ_OFF, Ordering::Acquire)?,
        mem.load_u64(base + MB_REVOKED_OFF, Ordering::Acquire)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::tests::with_region;

    #[test]
    fn an_acknowledgement_of_a_scribbled_counter_does_not_block_the_honest_ones_after_it() {
        with_region(|m, l| {
            let p = PeerSlot(1);
            // A peer scribbled revoke_seq far ahead; this peer audited and acknowledged it.
            publish_revoke_seq(m, 1 << 40).expect("scribble");
            acknowledge(m, l, p, 1 << 40, 0).expect("ack");
            // vshmd heals the counter back and announces a real destroy.
            publish_revoke_seq(m, 3).expect("heal");
            acknowledge(m, l, p, 3, 0).expect("ack");
            assert_eq!(acknowledgement(m, l, p), Ok((3, 0)), "vshmd must see 3");
        });
    }

    #[test]
    fn an_older_audit_finishing_late_never_lowers_the_acknowledgement() {
        with_region(|m, l| {
            let p = PeerSlot(0);
            publish_revoke_seq(m, 6).expect("publish");
            acknowledge(m, l, p, 6, 0).expect("newer");
            acknowledge(m, l, p, 5, 0).expect("older");
            assert_eq!(acknowledgement(m, l, p), Ok((6, 0)));
        });
    }

    #[test]
    fn an_acknowledgement_ring_vouches_for_its_sequence_and_a_sum_of_rings_for_no_more_than_the_largest(
    ) {
        assert_eq!(acked_by_ring_value(ack_ring_value(41)), 41);
        assert_eq!(acked_by_ring_value(0), 0);
        // Plain rings (QEMU's doorbell writes add 1) vouch for nothing.
        assert_eq!(acked_by_ring_value(3), 0);
        // Two acknowledgements read as one sum, and a plain ring with them.
        let sum = ack_ring_value(10) + ack_ring_value(14);
        assert_eq!(acked_by_ring_value(sum), 12);
        assert!(acked_by_ring_value(sum + 1) <= 14);
    }
}
