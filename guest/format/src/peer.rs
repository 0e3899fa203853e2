//! The peer table, host-written: validation of an entry ([`PeerError`] says what is wrong
//! with it) and the reads peers make of it.

use core::sync::atomic::Ordering;

use crate::ids::{PeerId, PeerSlot};
use crate::layout::{
    peer_flags, peer_state, Layout, PeerEntry, PEER_ID_OFF, PEER_INCARNATION_OFF, PEER_STATE_OFF,
};
use crate::shm::{Fault, SharedMemory};

/// Why a peer-table entry cannot be believed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerError {
    /// The entry could not be read (slot out of range, region too small).
    Fault(Fault),
    /// A state value this version does not define.
    BadState {
        /// The state found.
        state: u32,
    },
    /// CONNECTED with a peer id outside 1..=65535.
    BadPeerId {
        /// The id found.
        peer_id: u32,
    },
}

impl From<Fault> for PeerError {
    fn from(f: Fault) -> Self {
        PeerError::Fault(f)
    }
}

impl core::fmt::Display for PeerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            PeerError::Fault(x) => write!(f, "{x}"),
            PeerError::BadState { state } => {
                write!(f, "unknown state {state} (0 = ABSENT, 1 = CONNECTED)")
            }
            PeerError::BadPeerId { peer_id } => {
                write!(f, "connected with peer id {peer_id}, outside 1..=65535")
            }
        }
    }
}

/// A connected peer, as the host publishes it in the peer table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Peer table slot.
    pub slot: PeerSlot,
    /// ivshmem peer id.
    pub peer_id: PeerId,
    /// Connections so far in this slot.
    pub incarnation: u64,
    /// Other peers may ring its doorbell directly ([`peer_flags::DOORBELL`]).
    pub doorbell: bool,
}

/// Validates a copy of peer entry `slot`: `Ok(None)` if ABSENT, the peer if CONNECTED with
/// a valid id.
pub fn validate_peer(slot: PeerSlot, e: &PeerEntry) -> Result<Option<PeerInfo>, PeerError> {
    match e.state {
        peer_state::ABSENT => Ok(None),
        peer_state::CONNECTED => match u16::try_from(e.peer_id) {
            Ok(id) if id != 0 => Ok(Some(PeerInfo {
                slot,
                peer_id: PeerId(id),
                incarnation: e.incarnation,
                doorbell: e.flags & peer_flags::DOORBELL != 0,
            })),
            _ => Err(PeerError::BadPeerId { peer_id: e.peer_id }),
        },
        state => Err(PeerError::BadState { state }),
    }
}

/// Copies peer entry `slot` out of the region (unsynchronised: the host may be changing it)
/// and validates the copy.
pub fn read_peer_entry<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: PeerSlot,
) -> Result<Option<PeerInfo>, PeerError> {
    let base = layout.peer_entry(slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(slot.0),
        len: 0,
    })?;
    let e: PeerEntry = crate::shm::read_pod(mem, base)?;
    validate_peer(slot, &e)
}

/// Reads peer slot `slot`: `Ok(None)` if ABSENT, the peer if CONNECTED, else why the entry
/// does not validate ([`validate_peer`]). For a reader that must tell an absent peer from a
/// scribbled entry (a changer waking waiters drops the first, leaves the second to the host).
pub fn read_peer_checked<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: PeerSlot,
) -> Result<Option<PeerInfo>, PeerError> {
    let base = layout.peer_entry(slot).ok_or(Fault::OutOfBounds {
        offset: u64::from(slot.0),
        len: 0,
    })?;
    // One acquire load first: a cheap filter, and it orders the copy below after the host's
    // release of CONNECTED (written last on connect).
    if mem.load_u32(base + PEER_STATE_OFF, Ordering::Acquire)? == peer_state::ABSENT {
        return Ok(None);
    }
    read_peer_entry(mem, layout, slot)
}

/// Reads peer slot `slot`; `None` if absent or if the entry does not validate
/// ([`validate_peer`]: state not a known value, or a peer id outside 1..=65535).
pub fn read_peer<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: PeerSlot,
) -> Option<PeerInfo> {
    read_peer_checked(mem, layout, slot).ok().flatten()
}

/// Whether peer slot `slot` is still held by `peer_id` in incarnation `incarnation`: three
/// atomic loads, for a peer to check it has not been reclaimed before it touches its row.
pub fn peer_still_attached<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: PeerSlot,
    peer_id: PeerId,
    incarnation: u64,
) -> bool {
    let Some(base) = layout.peer_entry(slot) else {
        return false;
    };
    mem.load_u32(base + PEER_STATE_OFF, Ordering::SeqCst) == Ok(peer_state::CONNECTED)
        && mem.load_u32(base + PEER_ID_OFF, Ordering::SeqCst) == Ok(u32::from(peer_id.0))
        && mem.load_u64(base + PEER_INCARNATION_OFF, Ordering::SeqCst) == Ok(incarnation)
}

/// The slot of the connected peer `peer_id` (the host publishes it before the peer learns
/// its id). `None` if absent, or if two entries claim the id (a scribbled table).
pub fn find_peer_slot<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peer_id: PeerId,
) -> Option<PeerSlot> {
    let mut found = None;
    for slot in (0..layout.max_peers).map(PeerSlot) {
        if read_peer(mem, layout, slot).is_some_and(|p| p.peer_id == peer_id) {
            if found.is_some() {
                return None;
            }
            found = Some(slot);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{PeerId, PeerSlot};
    use crate::shm::zeroed;

    #[test]
    fn a_peer_entry_validates_to_its_peer_or_says_which_field_is_wrong() {
        let mut e = zeroed::<PeerEntry>();
        assert_eq!(validate_peer(PeerSlot(3), &e), Ok(None));
        e.state = peer_state::CONNECTED;
        e.peer_id = 9;
        e.incarnation = 2;
        assert_eq!(
            validate_peer(PeerSlot(3), &e),
            Ok(Some(PeerInfo {
                slot: PeerSlot(3),
                peer_id: PeerId(9),
                incarnation: 2,
                doorbell: false,
            }))
        );
        e.flags = peer_flags::DOORBELL;
        assert_eq!(
            validate_peer(PeerSlot(3), &e).map(|p| p.map(|p| p.doorbell)),
            Ok(Some(true))
        );
        e.peer_id = 0;
        assert_eq!(
            validate_peer(PeerSlot(3), &e),
            Err(PeerError::BadPeerId { peer_id: 0 })
        );
        e.peer_id = 70_000;
        assert_eq!(
            validate_peer(PeerSlot(3), &e),
            Err(PeerError::BadPeerId { peer_id: 70_000 })
        );
        e.state = 5;
        assert_eq!(
            validate_peer(PeerSlot(3), &e),
            Err(PeerError::BadState { state: 5 })
        );
        assert_eq!(
            PeerError::BadState { state: 5 }.to_string(),
            "unknown state 5 (0 = ABSENT, 1 = CONNECTED)"
        );
        assert_eq!(
            PeerError::BadPeerId { peer_id: 0 }.to_string(),
            "connected with peer id 0, outside 1..=65535"
        );
    }
}
