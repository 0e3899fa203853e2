//! Placement of the tables in a region: [`Layout`] computes it from the parameters (host)
//! or validates it from a superblock (everyone else); [`LayoutError`] says which field is
//! at fault and carries its value.

use core::mem::size_of;

use crate::ids::{ObjectSlot, PeerSlot};

use super::{
    const_u32, Mailbox, ObjectEntry, PeerEntry, Superblock, DEFAULT_NAME_BYTES_PER_OBJECT,
    FORMAT_VERSION, HOST_PEER_ID, MAGIC, MAX_NAME_AREA, MAX_OBJECTS_LIMIT, MAX_PEERS_LIMIT,
    MIN_ALIGNMENT, MIN_REGION_SIZE, NAME_GRANULE,
};

/// Why a region or its superblock cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The magic is not [`MAGIC`].
    BadMagic(u64),
    /// The backend has not published the header yet (version 0).
    NotReady,
    /// A version this reader does not understand.
    UnsupportedVersion(u32),
    /// The superblock's region size does not match the mapping (superblock, mapped).
    SizeMismatch(u64, u64),
    /// Region size is not a power of two, or too small.
    BadRegionSize(u64),
    /// max_peers outside 1..=62.
    BadMaxPeers(u32),
    /// max_objects outside 1..=65536.
    BadMaxObjects(u32),
    /// The name index's entry count is not the one `max_objects` gives (value found).
    BadIndexSlots(u32),
    /// The name area's size is not a multiple of 8 or over [`MAX_NAME_AREA`] (value).
    BadNameArea(u64),
    /// Alignment not a power of two ≥ 4096.
    BadAlignment(u64),
    /// vectors outside 1..=64.
    BadVectors(u32),
    /// A table stride differs from this version's structure size (which table, value).
    BadStride(&'static str, u32),
    /// A table is misplaced: out of bounds, misaligned or overlapping (which table, offset).
    BadTable(&'static str, u64),
    /// The region is too small for the header plus one heap page (needed, available).
    TooSmall(u64, u64),
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            LayoutError::BadMagic(m) => write!(f, "bad magic {m:#018x}"),
            LayoutError::NotReady => write!(f, "region header not published yet"),
            LayoutError::UnsupportedVersion(v) => write!(f, "unsupported format version {v}"),
            LayoutError::SizeMismatch(s, m) => {
                write!(f, "superblock says {s} bytes but {m} are mapped")
            }
            LayoutError::BadRegionSize(s) => {
                write!(
                    f,
                    "region size {s} is not a power of two ≥ {MIN_REGION_SIZE}"
                )
            }
            LayoutError::BadMaxPeers(n) => {
                write!(f, "max peers {n} outside 1..={MAX_PEERS_LIMIT}")
            }
            LayoutError::BadMaxObjects(n) => {
                write!(f, "max objects {n} outside 1..={MAX_OBJECTS_LIMIT}")
            }
            LayoutError::BadIndexSlots(n) => {
                write!(f, "name index of {n} entries does not match max objects")
            }
            LayoutError::BadNameArea(n) => write!(
                f,
                "name area of {n} bytes is not a multiple of {NAME_GRANULE} at most {MAX_NAME_AREA}"
            ),
            LayoutError::BadAlignment(a) => write!(f, "alignment {a} is not a power of two ≥ 4096"),
            LayoutError::BadVectors(v) => write!(f, "vectors {v} outside 1..=64"),
            LayoutError::BadStride(t, v) => write!(f, "{t} stride {v} does not match format"),
            LayoutError::BadTable(t, o) => write!(f, "{t} at offset {o:#x} is misplaced"),
            LayoutError::TooSmall(n, a) => {
                write!(
                    f,
                    "region needs at least {n} bytes for its header and heap, has {a}"
                )
            }
        }
    }
}

/// Where everything is, computed from the parameters (host) or validated from a superblock
/// (everyone else). All offsets are region offsets; every accessor does checked arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Whole region size.
    pub region_size: u64,
    /// Client peer slots.
    pub max_peers: u32,
    /// Object slots.
    pub max_objects: u32,
    /// Vectors per peer.
    pub vectors: u32,
    /// Heap granularity.
    pub alignment: u64,
    /// Peer table offset.
    pub peer_table: u64,
    /// Object table offset.
    pub object_table: u64,
    /// Refcount rows offset.
    pub refcount_table: u64,
    /// Refcount row stride.
    pub refcount_row_size: u32,
    /// Mailboxes offset.
    pub mailbox_table: u64,
    /// Name index offset (its sequence word, then its entries).
    pub index_table: u64,
    /// Name index entries (a power of two, at least twice `max_objects`).
    pub index_slots: u32,
    /// Name area offset (version 4; 64-byte aligned).
    pub name_area: u64,
    /// Name area size in bytes (a multiple of [`NAME_GRANULE`]).
    pub name_area_size: u64,
    /// Heap offset.
    pub heap_offset: u64,
    /// Heap size.
    pub heap_size: u64,
}

const fn round_up(v: u64, align: u64) -> Option<u64> {
    match v.checked_add(align - 1) {
        Some(x) => Some(x & !(align - 1)),
        None => None,
    }
}

/// The name area a table of `max_objects` objects gets unless configured otherwise:
/// [`DEFAULT_NAME_BYTES_PER_OBJECT`] bytes per object (objects above the limit count as the
/// limit).
pub const fn default_name_area(max_objects: u32) -> u64 {
    let n = if max_objects > MAX_OBJECTS_LIMIT {
        MAX_OBJECTS_LIMIT
    } else {
        max_objects
    };
    n as u64 * DEFAULT_NAME_BYTES_PER_OBJECT
}

impl Layout {
    /// Computes the layout the host publishes, with the default name area
    /// ([`default_name_area`]). Fails with the parameter at fault.
    pub fn compute(
        region_size: u64,
        max_peers: u32,
        max_objects: u32,
        vectors: u32,
        alignment: u64,
    ) -> Result<Layout, LayoutError> {
        Layout::compute_with_names(
            region_size,
            max_peers,
            max_objects,
            vectors,
            alignment,
            default_name_area(max_objects),
        )
    }

    /// Computes the layout the host publishes with a name area of `name_area_size` bytes
    /// (a multiple of [`NAME_GRANULE`], at most [`MAX_NAME_AREA`]). Fails with the
    /// parameter at fault.
    pub fn compute_with_names(
        region_size: u64,
        max_peers: u32,
        max_objects: u32,
        vectors: u32,
        alignment: u64,
        name_area_size: u64,
    ) -> Result<Layout, LayoutError> {
        if !region_size.is_power_of_two() || region_size < MIN_REGION_SIZE {
            return Err(LayoutError::BadRegionSize(region_size));
        }
        if max_peers == 0 || max_peers > MAX_PEERS_LIMIT {
            return Err(LayoutError::BadMaxPeers(max_peers));
        }
        if max_objects == 0 || max_objects > MAX_OBJECTS_LIMIT {
            return Err(LayoutError::BadMaxObjects(max_objects));
        }
        if vectors == 0 || vectors > 64 {
            return Err(LayoutError::BadVectors(vectors));
        }
        if !alignment.is_power_of_two() || alignment < MIN_ALIGNMENT {
            return Err(LayoutError::BadAlignment(alignment));
        }
        if name_area_size % NAME_GRANULE != 0 || name_area_size > MAX_NAME_AREA {
            return Err(LayoutError::BadNameArea(name_area_size));
        }
        // With the limits above nothing here can overflow a u64; the arithmetic is
        // checked anyway so a future limit change cannot silently wrap.
        let too_big = LayoutError::TooSmall(u64::MAX, region_size);
        let peer_table = size_of::<Superblock>() as u64;
        let object_table = peer_table
            .checked_add(u64::from(max_peers) * size_of::<PeerEntry>() as u64)
            .and_then(|v| round_up(v, 64))
            .ok_or(too_big)?;
        let refcount_table = object_table
            .checked_add(u64::from(max_objects) * size_of::<ObjectEntry>() as u64)
            .ok_or(too_big)?;
        let row = round_up(u64::from(max_objects) * 4, 64).ok_or(too_big)?;
        let refcount_row_size = u32::try_from(row).map_err(|_| too_big)?;
        let mailbox_table = refcount_table
            .checked_add(u64::from(max_peers) * row)
            .and_then(|v| round_up(v, 64))
            .ok_or(too_big)?;
        let index_table = mailbox_table
            .checked_add(u64::from(max_peers) * size_of::<Mailbox>() as u64)
            .and_then(|v| round_up(v, 64))
            .ok_or(too_big)?;
        let index_slots = crate::index::index_slots(max_objects);
        let name_area = index_table
            .checked_add(crate::index::INDEX_HEADER_SIZE)
            .and_then(|v| v.checked_add(u64::from(index_slots) * crate::index::INDEX_ENTRY_SIZE))
            .and_then(|v| round_up(v, 64))
            .ok_or(too_big)?;
        let header_end = name_area.checked_add(name_area_size).ok_or(too_big)?;
        let heap_offset = round_up(header_end, alignment).ok_or(too_big)?;
        let needed = heap_offset.checked_add(alignment).ok_or(too_big)?;
        if needed > region_size {
            return Err(LayoutError::TooSmall(needed, region_size));
        }
        Ok(Layout {
            region_size,
            max_peers,
            max_objects,
            vectors,
            alignment,
            peer_table,
            object_table,
            refcount_table,
            refcount_row_size,
            mailbox_table,
            index_table,
            index_slots,
            name_area,
            name_area_size,
            heap_offset,
            heap_size: region_size - heap_offset,
        })
    }

    /// Validates a superblock copied out of a region of `mapped_size` bytes. The result is
    /// the layout the superblock would have been computed from: a superblock that merely
    /// claims sane-looking but inconsistent offsets is rejected.
    pub fn from_superblock(sb: &Superblock, mapped_size: u64) -> Result<Layout, LayoutError> {
        if sb.magic != MAGIC {
            return Err(LayoutError::BadMagic(sb.magic));
        }
        if sb.version == 0 {
            return Err(LayoutError::NotReady);
        }
        if sb.version != FORMAT_VERSION {
            return Err(LayoutError::UnsupportedVersion(sb.version));
        }
        if sb.region_size != mapped_size {
            return Err(LayoutError::SizeMismatch(sb.region_size, mapped_size));
        }
        if sb.peer_entry_size as usize != size_of::<PeerEntry>() {
            return Err(LayoutError::BadStride("peer table", sb.peer_entry_size));
        }
        if sb.object_entry_size as usize != size_of::<ObjectEntry>() {
            return Err(LayoutError::BadStride("object table", sb.object_entry_size));
        }
        if sb.mailbox_size as usize != size_of::<Mailbox>() {
            return Err(LayoutError::BadStride("mailbox table", sb.mailbox_size));
        }
        if u64::from(sb.index_entry_size) != crate::index::INDEX_ENTRY_SIZE {
            return Err(LayoutError::BadStride("name index", sb.index_entry_size));
        }
        let l = Layout::compute_with_names(
            sb.region_size,
            sb.max_peers,
            sb.max_objects,
            sb.vectors,
            sb.alignment,
            sb.name_area_size,
        )?;
        let checks: [(&'static str, u64, u64); 7] = [
            ("peer table", sb.peer_table_offset, l.peer_table),
            ("object table", sb.object_table_offset, l.object_table),
            ("refcount table", sb.refcount_table_offset, l.refcount_table),
            ("mailbox table", sb.mailbox_table_offset, l.mailbox_table),
            ("name index", sb.index_offset, l.index_table),
            ("name area", sb.name_area_offset, l.name_area),
            ("heap", sb.heap_offset, l.heap_offset),
        ];
        for (what, got, want) in checks {
            if got != want {
                return Err(LayoutError::BadTable(what, got));
            }
        }
        if sb.refcount_row_size != l.refcount_row_size {
            return Err(LayoutError::BadStride(
                "refcount rows",
                sb.refcount_row_size,
            ));
        }
        if sb.index_slots != l.index_slots {
            return Err(LayoutError::BadIndexSlots(sb.index_slots));
        }
        if sb.heap_size != l.heap_size {
            return Err(LayoutError::BadTable("heap size", sb.heap_size));
        }
        Ok(l)
    }

    /// The superblock describing this layout, with version 0 (unpublished).
    pub fn superblock(&self, backend_epoch: u64, region_id: [u8; 16]) -> Superblock {
        Superblock {
            magic: MAGIC,
            version: 0,
            flags: 0,
            region_size: self.region_size,
            backend_epoch,
            region_id,
            max_peers: self.max_peers,
            max_objects: self.max_objects,
            host_peer_id: u32::from(HOST_PEER_ID),
            vectors: self.vectors,
            peer_table_offset: self.peer_table,
            object_table_offset: self.object_table,
            refcount_table_offset: self.refcount_table,
            mailbox_table_offset: self.mailbox_table,
            heap_offset: self.heap_offset,
            heap_size: self.heap_size,
            alignment: self.alignment,
            peer_entry_size: const_u32(size_of::<PeerEntry>()),
            object_entry_size: const_u32(size_of::<ObjectEntry>()),
            refcount_row_size: self.refcount_row_size,
            mailbox_size: const_u32(size_of::<Mailbox>()),
            namespace_seq: 0,
            revoke_seq: 0,
            quarantine_ms: 0,
            reserved0: 0,
            index_offset: self.index_table,
            index_slots: self.index_slots,
            index_entry_size: const_u32(super::const_usize(crate::index::INDEX_ENTRY_SIZE)),
            name_area_offset: self.name_area,
            name_area_size: self.name_area_size,
            reserved: [0; 64],
        }
    }

    /// Offset of peer entry `slot`, or `None` if out of range.
    pub fn peer_entry(&self, slot: PeerSlot) -> Option<u64> {
        let slot = slot.0;
        (slot < self.max_peers)
            .then(|| self.peer_table + u64::from(slot) * size_of::<PeerEntry>() as u64)
    }

    /// Offset of object entry `slot`, or `None` if out of range.
    pub fn object_entry(&self, slot: ObjectSlot) -> Option<u64> {
        let slot = slot.0;
        (slot < self.max_objects)
            .then(|| self.object_table + u64::from(slot) * size_of::<ObjectEntry>() as u64)
    }

    /// Offset of the refcount cell of peer slot `peer` for object `slot`.
    pub fn refcount_cell(&self, peer: PeerSlot, slot: ObjectSlot) -> Option<u64> {
        let (peer, slot) = (peer.0, slot.0);
        (peer < self.max_peers && slot < self.max_objects).then(|| {
            self.refcount_table
                + u64::from(peer) * u64::from(self.refcount_row_size)
                + u64::from(slot) * 4
        })
    }

    /// Offset of peer slot `peer`'s mailbox.
    pub fn mailbox(&self, peer: PeerSlot) -> Option<u64> {
        let peer = peer.0;
        (peer < self.max_peers)
            .then(|| self.mailbox_table + u64::from(peer) * size_of::<Mailbox>() as u64)
    }

    /// Offset of the name index's sequence word (its first 8 bytes).
    pub fn index_seq(&self) -> u64 {
        self.index_table
    }

    /// Offset of name-index entry `pos`, or `None` if out of range.
    pub fn index_entry(&self, pos: u32) -> Option<u64> {
        (pos < self.index_slots).then(|| {
            self.index_table
                + crate::index::INDEX_HEADER_SIZE
                + u64::from(pos) * crate::index::INDEX_ENTRY_SIZE
        })
    }

    /// The vector wake-ups go out on (FORMAT.md §6a, §14): [`crate::layout::VECTOR_WAKE`],
    /// or the control vector if the region has only one.
    pub fn wake_vector(&self) -> u16 {
        if self.vectors > 1 {
            crate::layout::VECTOR_WAKE
        } else {
            crate::layout::VECTOR_CONTROL
        }
    }

    /// The bytes a reader accepts a name reference in: the name area and the alignment
    /// padding after it, up to the heap. Wider than `name_area_size` on purpose: a peer may
    /// scribble `name_area_size` smaller without moving the heap (the padding absorbs it),
    /// and a reader that took the superblock then must still find every name (the host only
    /// ever places names inside `name_area_size`).
    pub fn name_span(&self) -> u64 {
        self.heap_offset.saturating_sub(self.name_area)
    }

    /// Region offset of the name bytes `[name_off, name_off + len)`, or `None` if that
    /// range is not inside [`Layout::name_span`] (checked arithmetic).
    pub fn name_bytes(&self, name_off: u32, len: u64) -> Option<u64> {
        let end = u64::from(name_off).checked_add(len)?;
        (end <= self.name_span()).then(|| self.name_area + u64::from(name_off))
    }

    /// Whether `[offset, offset+len)` lies inside the heap, with checked arithmetic.
    pub fn heap_contains(&self, offset: u64, len: u64) -> bool {
        match offset.checked_add(len) {
            Some(end) => offset >= self.heap_offset && end <= self.region_size,
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ObjectSlot, PeerSlot};

    fn default_layout() -> Layout {
        Layout::compute(64 << 20, 32, 1024, 2, 4096).expect("valid parameters")
    }

    #[test]
    fn computed_tables_are_ordered_aligned_and_inside_the_region() {
        let l = default_layout();
        assert_eq!(l.peer_table, 256);
        assert!(l.object_table >= l.peer_table + 32 * 64);
        assert_eq!(l.object_table % 64, 0);
        assert!(l.refcount_table >= l.object_table + 1024 * 128);
        assert!(l.mailbox_table >= l.refcount_table + 32 * 4096);
        assert_eq!(l.mailbox_table % 64, 0);
        assert_eq!(l.heap_offset % 4096, 0);
        assert!(l.index_table >= l.mailbox_table + 32 * 2048);
        assert_eq!(l.index_table % 64, 0);
        assert_eq!(l.index_slots, 2048);
        assert!(l.name_area >= l.index_table + 64 + 2048 * 8);
        assert_eq!(l.name_area % 64, 0);
        assert_eq!(l.name_area_size, 1024 * 64);
        assert!(l.heap_offset >= l.name_area + l.name_area_size);
        assert_eq!(l.heap_offset + l.heap_size, 64 << 20);
    }

    #[test]
    fn superblock_round_trips_through_validation() {
        let l = default_layout();
        let mut sb = l.superblock(7, [1; 16]);
        assert_eq!(
            Layout::from_superblock(&sb, 64 << 20),
            Err(LayoutError::NotReady)
        );
        sb.version = FORMAT_VERSION;
        assert_eq!(Layout::from_superblock(&sb, 64 << 20), Ok(l));
    }

    #[test]
    fn corrupt_superblocks_are_rejected_with_the_field_at_fault() {
        let l = default_layout();
        let good = {
            let mut sb = l.superblock(7, [1; 16]);
            sb.version = FORMAT_VERSION;
            sb
        };
        let size = 64 << 20;
        let mut sb = good;
        sb.magic ^= 1;
        assert!(matches!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadMagic(_))
        ));
        let mut sb = good;
        sb.version = 99;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::UnsupportedVersion(99))
        );
        assert_eq!(
            Layout::from_superblock(&good, size / 2),
            Err(LayoutError::SizeMismatch(size, size / 2))
        );
        let mut sb = good;
        sb.max_peers = 63;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadMaxPeers(63))
        );
        let mut sb = good;
        sb.max_objects = u32::MAX;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadMaxObjects(u32::MAX))
        );
        let mut sb = good;
        sb.heap_offset = size - 16;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadTable("heap", size - 16))
        );
        let mut sb = good;
        sb.object_table_offset = 8;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadTable("object table", 8))
        );
        let mut sb = good;
        sb.object_entry_size = 64;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadStride("object table", 64))
        );
        let mut sb = good;
        sb.index_offset += 64;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadTable("name index", l.index_table + 64))
        );
        let mut sb = good;
        sb.index_slots /= 2;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadIndexSlots(1024))
        );
        let mut sb = good;
        sb.index_entry_size = 4;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadStride("name index", 4))
        );
        let mut sb = good;
        sb.alignment = 4095;
        assert_eq!(
            Layout::from_superblock(&sb, size),
            Err(LayoutError::BadAlignment(4095))
        );
    }

    #[test]
    fn the_worked_examples_of_format_md_section_2_hold() {
        // (region, peers, objects) → (object, refcount, row, mailbox, index, index slots,
        // name area, name area size, heap offset, heap size): the table in docs/FORMAT.md §2.
        type Params = (u64, u32, u32);
        type Placed = (u64, u64, u32, u64, u64, u32, u64, u64, u64, u64);
        let rows: [(Params, Placed); 5] = [
            (
                (64 << 20, 16, 1024),
                (
                    0x500, 0x2_0500, 4096, 0x3_0500, 0x3_8500, 2048, 0x3_c540, 65_536, 0x4_d000,
                    66_793_472,
                ),
            ),
            (
                (64 << 20, 32, 1024),
                (
                    0x900, 0x2_0900, 4096, 0x4_0900, 0x5_0900, 2048, 0x5_4940, 65_536, 0x6_5000,
                    66_695_168,
                ),
            ),
            (
                (1 << 20, 4, 16),
                (
                    0x200, 0xa00, 64, 0xb00, 0x2b00, 32, 0x2c40, 1024, 0x4000, 1_032_192,
                ),
            ),
            (
                (1 << 30, 32, 65_536),
                (
                    0x900,
                    0x80_0900,
                    262_144,
                    0x100_0900,
                    0x101_0900,
                    131_072,
                    0x111_0940,
                    4_194_304,
                    0x151_1000,
                    1_051_652_096,
                ),
            ),
            (
                (1 << 30, 16, 65_536),
                (
                    0x500,
                    0x80_0500,
                    262_144,
                    0xc0_0500,
                    0xc0_8500,
                    131_072,
                    0xd0_8540,
                    4_194_304,
                    0x110_9000,
                    1_055_879_168,
                ),
            ),
        ];
        for ((size, peers, objects), want) in rows {
            let l = Layout::compute(size, peers, objects, 1, 4096).expect("layout");
            assert_eq!(
                (
                    l.object_table,
                    l.refcount_table,
                    l.refcount_row_size,
                    l.mailbox_table,
                    l.index_table,
                    l.index_slots,
                    l.name_area,
                    l.name_area_size,
                    l.heap_offset,
                    l.heap_size
                ),
                want,
                "{size} bytes, {peers} peers, {objects} objects"
            );
        }
    }

    #[test]
    fn the_default_header_is_under_one_percent_of_the_default_region() {
        let l = Layout::compute(64 << 20, 16, 1024, 1, 4096).expect("layout");
        assert!(l.heap_offset * 100 <= l.region_size, "{:#x}", l.heap_offset);
    }

    #[test]
    fn a_configured_name_area_is_placed_and_a_bad_size_is_refused_with_its_value() {
        let l = Layout::compute_with_names(64 << 20, 16, 1024, 1, 4096, 1 << 20).expect("ok");
        assert_eq!(l.name_area_size, 1 << 20);
        assert!(l.heap_offset >= l.name_area + (1 << 20));
        let none = Layout::compute_with_names(64 << 20, 16, 1024, 1, 4096, 0).expect("ok");
        assert_eq!(none.name_area_size, 0);
        assert_eq!(
            Layout::compute_with_names(64 << 20, 16, 1024, 1, 4096, 12),
            Err(LayoutError::BadNameArea(12))
        );
        assert_eq!(
            Layout::compute_with_names(64 << 20, 16, 1024, 1, 4096, MAX_NAME_AREA + 8),
            Err(LayoutError::BadNameArea(MAX_NAME_AREA + 8))
        );
        let mut sb = l.superblock(1, [0; 16]);
        sb.version = FORMAT_VERSION;
        assert_eq!(Layout::from_superblock(&sb, 64 << 20), Ok(l));
        sb.name_area_offset += 64;
        assert_eq!(
            Layout::from_superblock(&sb, 64 << 20),
            Err(LayoutError::BadTable("name area", l.name_area + 64))
        );
        let mut sb = l.superblock(1, [0; 16]);
        sb.version = FORMAT_VERSION;
        sb.name_area_size = 7;
        assert_eq!(
            Layout::from_superblock(&sb, 64 << 20),
            Err(LayoutError::BadNameArea(7))
        );
    }

    #[test]
    fn region_sizes_must_be_powers_of_two_and_fit_the_header() {
        assert_eq!(
            Layout::compute(3 << 20, 4, 16, 1, 4096),
            Err(LayoutError::BadRegionSize(3 << 20))
        );
        assert!(matches!(
            Layout::compute(1 << 20, 62, 65_536, 1, 4096),
            Err(LayoutError::TooSmall(_, _))
        ));
        assert!(Layout::compute(1 << 20, 4, 16, 1, 4096).is_ok());
    }

    #[test]
    fn table_accessors_refuse_out_of_range_indices() {
        let l = default_layout();
        assert!(l.object_entry(ObjectSlot(1023)).is_some());
        assert_eq!(l.object_entry(ObjectSlot(1024)), None);
        assert_eq!(l.peer_entry(PeerSlot(32)), None);
        assert_eq!(l.refcount_cell(PeerSlot(0), ObjectSlot(1024)), None);
        assert_eq!(l.mailbox(PeerSlot(32)), None);
        assert_eq!(l.index_entry(2047), Some(l.index_table + 64 + 2047 * 8));
        assert_eq!(l.index_entry(2048), None);
        assert!(!l.heap_contains(u64::MAX, 2));
        assert!(!l.heap_contains(0, 1));
        assert!(l.heap_contains(l.heap_offset, l.heap_size));
        assert!(!l.heap_contains(l.heap_offset, l.heap_size + 1));
    }
}
