//! What the numbers in the namespace are: newtypes for peer ids, peer slots, object slots,
//! generations and region offsets, so that the compiler catches a slot passed where an id
//! belongs (as rust-vmm's `GuestAddress` does for guest addresses).
//!
//! The shared layouts (`layout.rs`) keep their plain fixed-width fields: they are the wire
//! format. These types are for the APIs around them. Each is `repr(transparent)` over the
//! field's width, so converting is free.

use core::fmt;

/// An ivshmem peer id: the number QEMU and the ivshmem socket protocol use for a connection
/// (0 is the host). It counts up over the server's life and is not an index into anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PeerId(pub u16);

impl PeerId {
    /// The host (vshmd) is peer 0 on every region.
    pub const HOST: PeerId = PeerId(0);

    /// The id as the wire carries it.
    pub const fn raw(self) -> u16 {
        self.0
    }
}

/// A peer's place in the header, `0..max_peers`: the index of its peer-table entry, its
/// refcount row, its mailbox and its holder bit in every lease word. The host assigns it and
/// publishes the id that holds it in the peer table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct PeerSlot(pub u32);

impl PeerSlot {
    /// The slot as a table index.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

/// An object's place in the object table, `0..max_objects`. A slot is reused after its
/// object is destroyed: only (slot, [`Generation`]) names one object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct ObjectSlot(pub u32);

impl ObjectSlot {
    /// The slot as a table index.
    pub const fn raw(self) -> u32 {
        self.0
    }
}

/// An object's generation: unique over the region's life (never 0 for a live object), so a
/// handle to a destroyed object is told apart from the next object in the same slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The value as the wire carries it.
    pub const fn raw(self) -> u64 {
        self.0
    }
}

/// A byte offset from the start of the region: a place, not a length (as rust-vmm's
/// `GuestAddress`). Every peer maps the region at its own address, so the shared format
/// stores offsets, never pointers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct RegionOffset(pub u64);

impl RegionOffset {
    /// The offset as the wire carries it.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + len`, or `None` on overflow.
    pub const fn checked_add(self, len: u64) -> Option<RegionOffset> {
        match self.0.checked_add(len) {
            Some(end) => Some(RegionOffset(end)),
            None => None,
        }
    }
}

macro_rules! display_as_number {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    )*};
}
display_as_number!(PeerId, PeerSlot, ObjectSlot, Generation);

impl fmt::Display for RegionOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_their_numbers_and_offsets_in_hex() {
        use std::string::ToString;
        assert_eq!(PeerId(7).to_string(), "7");
        assert_eq!(PeerSlot(3).to_string(), "3");
        assert_eq!(ObjectSlot(12).to_string(), "12");
        assert_eq!(Generation(99).to_string(), "99");
        assert_eq!(RegionOffset(0x1000).to_string(), "0x1000");
    }

    #[test]
    fn an_offset_that_would_overflow_is_refused() {
        assert_eq!(RegionOffset(u64::MAX).checked_add(1), None);
        assert_eq!(RegionOffset(8).checked_add(8), Some(RegionOffset(16)));
    }

    #[test]
    fn newtypes_cost_nothing() {
        assert_eq!(core::mem::size_of::<PeerId>(), 2);
        assert_eq!(core::mem::size_of::<PeerSlot>(), 4);
        assert_eq!(core::mem::size_of::<ObjectSlot>(), 4);
        assert_eq!(core::mem::size_of::<Generation>(), 8);
        assert_eq!(core::mem::size_of::<RegionOffset>(), 8);
    }
}
