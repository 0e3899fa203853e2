//! Fencing: a peer dropped by force while its process still runs still maps the region, so
//! its slot and the memory of the objects that die with it are held back (`fenced_ranges`)
//! until that process has exited and the daemon calls `unfence`.

use vshm_format::{PeerId, PeerSlot};

use super::reclaim::{Reclaim, Release};
use super::{Arbiter, Backing};

impl<M: Backing> Arbiter<M> {
    /// As [`Arbiter::peer_gone`] for a peer dropped by force whose process still runs (and
    /// still maps the region): its slot and the memory of the objects that die with it are
    /// held back until [`Arbiter::unfence`]. Returns the slot to unfence.
    pub fn peer_gone_fenced(&mut self, peer_id: PeerId) -> (Reclaim, Option<PeerSlot>) {
        let Some(slot) = self.slot_of(peer_id) else {
            return (Reclaim::default(), None);
        };
        let out = self.reclaim_peer(peer_id, slot, Release::HoldFor(slot));
        self.peers[slot.raw() as usize].fenced = true;
        (out, Some(slot))
    }

    /// The fenced peer in `slot` has exited: its slot and held-back memory are free.
    pub fn unfence(&mut self, slot: PeerSlot) {
        if let Some(p) = self.peers.get_mut(slot.raw() as usize) {
            p.fenced = false;
        }
        self.quarantine_forget(slot);
        let (mine, rest): (Vec<_>, Vec<_>) = self
            .fenced_ranges
            .drain(..)
            .partition(|&(s, _, _)| s == slot);
        self.fenced_ranges = rest;
        for (_, offset, len) in mine {
            self.heap.release(offset, len);
            let _ = self.mem.discard(offset, len);
        }
    }
}
