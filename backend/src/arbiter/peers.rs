//! Peer slots: giving a new peer id a slot (the free, unfenced one freed longest ago) and
//! publishing its peer entry, finding a connected peer's slot, clearing a slot's refcount
//! row and mailbox, and the process (pid, label) behind a peer for the monitor.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use vshm_format::layout::holder_bit;
use vshm_format::layout::{peer_flags, peer_state, PeerEntry, PEER_STATE_OFF};
use vshm_format::object::bump_namespace_seq;
use vshm_format::shm::{bytes_of, zeroed, Fault};
use vshm_format::{ObjectSlot, PeerId, PeerSlot};

use super::{Arbiter, Backing, PeerRecord};

/// Why a peer could not be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// All slots are taken.
    #[error("all {0} peer slots are in use")]
    Full(u32),
    /// Id 0 (the host) or an id already connected.
    #[error("peer id {0} is the host's or already connected")]
    BadId(PeerId),
    /// The region could not be written.
    #[error("cannot write the peer table: {0}")]
    Fault(Fault),
}

impl From<Fault> for ConnectError {
    fn from(f: Fault) -> Self {
        ConnectError::Fault(f)
    }
}

impl<M: Backing> Arbiter<M> {
    /// Records who a connected peer is (from SO_PEERCRED and /proc), for the monitor.
    pub fn set_peer_process(&mut self, peer_id: PeerId, pid: Option<i32>, label: Option<String>) {
        if let Some(s) = self.slot_of(peer_id) {
            let rec = &mut self.peers[s.raw() as usize];
            rec.pid = pid;
            rec.label = label;
        }
    }

    /// The slot of connected peer `peer_id`.
    pub(super) fn slot_of(&self, peer_id: PeerId) -> Option<PeerSlot> {
        self.peer_slots()
            .find(|(_, p)| p.connected && p.id == peer_id)
            .map(|(s, _)| s)
    }

    /// Peer slots with their records.
    pub(super) fn peer_slots(&self) -> impl Iterator<Item = (PeerSlot, &PeerRecord)> + '_ {
        (0..self.layout.max_peers)
            .map(PeerSlot)
            .zip(self.peers.iter())
    }

    pub(super) fn connected_mask(&self) -> u64 {
        self.peer_slots()
            .filter(|(_, p)| p.connected)
            .fold(0, |m, (i, _)| m | holder_bit(i))
    }

    /// A peer id was handed out to a client of the ivshmem socket: give it a free slot,
    /// clear that slot's refcount row and mailbox, publish the peer entry (with
    /// `peer_flags::DOORBELL`: every other client has its eventfds). Must run before the
    /// peer learns its id.
    pub fn peer_connected(&mut self, peer_id: PeerId) -> Result<PeerSlot, ConnectError> {
        self.publish_peer(peer_id, true)
    }

    /// [`Arbiter::peer_connected`]; `doorbell`: other peers can ring it directly (false for
    /// a peer vshmd stands in for).
    pub(super) fn publish_peer(
        &mut self,
        peer_id: PeerId,
        doorbell: bool,
    ) -> Result<PeerSlot, ConnectError> {
        if peer_id == PeerId::HOST || self.slot_of(peer_id).is_some() {
            return Err(ConnectError::BadId(peer_id));
        }
        // The free slot freed longest ago: a reclaimed peer that has not noticed yet (its
        // process still running) checks its slot's incarnation before touching it, and
        // reusing its slot last leaves it the most time to notice.
        let s = self
            .peer_slots()
            .filter(|(_, p)| !p.connected && !p.fenced)
            .min_by_key(|(_, p)| p.freed)
            .map(|(s, _)| s)
            .ok_or(ConnectError::Full(self.layout.max_peers))?;
        let slot = s.raw() as usize;
        self.clear_peer_memory(s)?;
        self.forget_seen(s);
        let incarnation = self.peers[slot].incarnation + 1;
        let mut e = zeroed::<PeerEntry>();
        e.peer_id = u32::from(peer_id.raw());
        e.incarnation = incarnation;
        e.flags = if doorbell { peer_flags::DOORBELL } else { 0 };
        let base = self
            .layout
            .peer_entry(s)
            .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })?;
        self.mem.write_bytes(base, bytes_of(&e))?;
        self.mem.store_u32(
            base + PEER_STATE_OFF,
            peer_state::CONNECTED,
            Ordering::Release,
        )?;
        // Only now, with the entry published, is the slot taken.
        let rec = &mut self.peers[slot];
        rec.id = peer_id;
        rec.connected = true;
        rec.incarnation = incarnation;
        rec.last_seq = 0;
        rec.acked = 0;
        rec.since = Some(SystemTime::now());
        rec.pid = None;
        rec.label = None;
        rec.grant = None;
        rec.denials = 0;
        rec.denial_log = None;
        rec.reply = None;
        rec.rings_due = 0;
        bump_namespace_seq(&self.mem)?;
        Ok(s)
    }

    pub(super) fn clear_peer_memory(&self, slot: PeerSlot) -> Result<(), Fault> {
        let row = self
            .layout
            .refcount_cell(slot, ObjectSlot(0))
            .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })?;
        self.mem
            .zero(row, u64::from(self.layout.refcount_row_size))?;
        let mb = self
            .layout
            .mailbox(slot)
            .ok_or(Fault::OutOfBounds { offset: 0, len: 0 })?;
        self.mem.zero(
            mb,
            std::mem::size_of::<vshm_format::layout::Mailbox>() as u64,
        )
    }
}
