//! The superblock as a document: the raw values found in a region's first 256 bytes, for
//! `vshmctl inspect` and vshmd's `dump` (both print it; field names are part of the JSON
//! interface documented in docs/MONITOR.md).

use serde::Serialize;
use vshm_format::layout::{Superblock, MAGIC};

/// The superblock as found (raw values, whether or not they validated).
#[derive(Clone, Debug, Serialize)]
pub struct SuperblockSummary {
    /// The magic, hex.
    pub magic: String,
    /// Whether the magic is `"VSHMAREA"`.
    pub magic_ok: bool,
    /// Format version (0: header not published yet).
    pub version: u32,
    /// Superblock flags (reserved, 0).
    pub flags: u32,
    /// Region size the superblock claims.
    pub region_size: u64,
    /// Backend epoch.
    pub epoch: u64,
    /// Region id, hex.
    pub region_id: String,
    /// Client peer slots.
    pub max_peers: u32,
    /// Object slots.
    pub max_objects: u32,
    /// Vectors per peer.
    pub vectors: u32,
    /// Heap granularity.
    pub alignment: u64,
    /// The host's peer id (0).
    pub host_peer_id: u32,
    /// Peer table offset.
    pub peer_table_offset: u64,
    /// Object table offset.
    pub object_table_offset: u64,
    /// Refcount rows offset.
    pub refcount_table_offset: u64,
    /// Mailboxes offset.
    pub mailbox_table_offset: u64,
    /// Name index offset (format version 3 and later).
    pub index_offset: u64,
    /// Name index entries.
    pub index_slots: u32,
    /// Name area offset (format version 4).
    pub name_area_offset: u64,
    /// Name area size in bytes.
    pub name_area_size: u64,
    /// Heap offset.
    pub heap_offset: u64,
    /// Heap size.
    pub heap_size: u64,
    /// Namespace sequence number.
    pub namespace_seq: u64,
    /// Whether the superblock passed [`vshm_format::layout::Layout::from_superblock`] (the tables were walked).
    pub valid: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The superblock's fields as found (`valid` is left false: the caller validates).
pub fn summarize(sb: &Superblock) -> SuperblockSummary {
    SuperblockSummary {
        magic: format!("{:#018x}", sb.magic),
        magic_ok: sb.magic == MAGIC,
        version: sb.version,
        flags: sb.flags,
        region_size: sb.region_size,
        epoch: sb.backend_epoch,
        region_id: hex(&sb.region_id),
        max_peers: sb.max_peers,
        max_objects: sb.max_objects,
        vectors: sb.vectors,
        alignment: sb.alignment,
        host_peer_id: sb.host_peer_id,
        peer_table_offset: sb.peer_table_offset,
        object_table_offset: sb.object_table_offset,
        refcount_table_offset: sb.refcount_table_offset,
        mailbox_table_offset: sb.mailbox_table_offset,
        index_offset: sb.index_offset,
        index_slots: sb.index_slots,
        name_area_offset: sb.name_area_offset,
        name_area_size: sb.name_area_size,
        heap_offset: sb.heap_offset,
        heap_size: sb.heap_size,
        namespace_seq: sb.namespace_seq,
        valid: false,
    }
}
