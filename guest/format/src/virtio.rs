//! The vshm virtio device (docs/VHOST-USER.md): the numbers its backend (vshmd's vhost-user
//! device), its frontends (the VMM) and its drivers (the freestanding guest, the library's
//! request transport) agree on. Requests and responses are the mailbox's [`Request`] and
//! [`Response`](crate::layout::Response) with the meanings §5 gives them.
//!
//! [`Request`]: crate::layout::Request

use crate::layout::{Request, FORMAT_VERSION, MAX_NAME_BYTES};

/// Virtio device ID (0xBE, in the range QEMU leaves for experiments; §1).
pub const DEVICE_ID: u32 = 190;
/// PCI vendor of a virtio device.
pub const PCI_VENDOR: u16 = 0x1AF4;
/// PCI device ID of the modern virtio-pci function (0x1040 + [`DEVICE_ID`]).
pub const PCI_DEVICE: u16 = 0x10FE;
const _: () = assert!(PCI_DEVICE as u32 == 0x1040 + DEVICE_ID);
/// The request queue's index.
pub const REQUEST_QUEUE: u16 = 0;
/// The event queue's index.
pub const EVENT_QUEUE: u16 = 1;
/// The shared-memory region id of the window (the `id` of the SHARED_MEMORY_CFG capability).
pub const WINDOW_SHMID: u8 = 0;

/// Device feature bit: events on queue 1.
pub const VSHM_F_EVENTQ: u64 = 1 << 0;
/// Device feature bit: OPEN/CREATE accept [`OPEN_READ_ONLY`].
pub const VSHM_F_READ_ONLY: u64 = 1 << 1;
/// `VIRTIO_F_VERSION_1`.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Request flag (bit 8 of `flags`): map the section read-only.
pub const OPEN_READ_ONLY: u32 = 1 << 8;
/// Operation: open an object by name (§5.1).
pub const OP_OPEN: u32 = 8;
/// Operation: close a handle (`size` = the window offset its open returned).
pub const OP_CLOSE: u32 = 9;
/// Operation: signal an event, or notify a section (§5.1).
pub const OP_SIGNAL: u32 = 10;
/// Operation: reset an event.
pub const OP_RESET: u32 = 11;
/// Operation: wait for an event or a section's next change (`size` = timeout in ms, 0 =
/// none); answered when it happens or STATUS_TIMEOUT.
pub const OP_WAIT: u32 = 12;
/// Operation: the names this VM may open, as [`ListRecord`]s in the chain's writable bytes
/// past the response (§5.3).
pub const OP_LIST: u32 = 13;
/// Operation: who is attached to the namespace (§5.1), what the block allocator inside a
/// section needs to tell a departed owner: the reply is a [`PeersReply`].
pub const OP_PEERS: u32 = 14;
/// Byte of a PEERS response where `le64 incarnation[size]` starts, one per peer slot (0:
/// nobody attached there).
pub const RESP_PEERS_OFF: usize = 96;
/// Most peer slots a PEERS reply describes.
pub const PEERS_MAX: usize = crate::layout::MAX_PEERS_LIMIT as usize;
const _: () =
    assert!(RESP_PEERS_OFF + 8 * PEERS_MAX <= core::mem::size_of::<crate::layout::Response>());

/// A PEERS reply: the VM's own peer slot and incarnation (`slot`, `generation`), and the
/// incarnation of whoever is attached in each slot (`size` of them, from byte
/// [`RESP_PEERS_OFF`]), as vshmd knows them (not as a header shows them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeersReply {
    /// The VM's own peer slot.
    pub me: crate::PeerSlot,
    /// The VM's own incarnation.
    pub incarnation: u64,
    /// How many slots `slots` describes.
    pub count: usize,
    /// Incarnation attached in each slot, 0 for none.
    pub slots: [u64; PEERS_MAX],
}

impl PeersReply {
    /// Reads one out of a response; `None` if it does not add up (more slots than a region
    /// has, its own slot outside them or not showing itself).
    pub fn read(resp: &crate::layout::Response) -> Option<PeersReply> {
        let b = crate::shm::bytes_of(resp);
        let count = usize::try_from(resp.size)
            .ok()
            .filter(|&c| c <= PEERS_MAX)?;
        let mut slots = [0u64; PEERS_MAX];
        for (i, s) in slots.iter_mut().enumerate().take(count) {
            let at = RESP_PEERS_OFF + 8 * i;
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            *s = u64::from_le_bytes(w);
        }
        let me = usize::try_from(resp.slot).ok().filter(|&m| m < count)?;
        if slots[me] != resp.generation || resp.generation == 0 {
            return None;
        }
        Some(PeersReply {
            me: crate::PeerSlot(resp.slot),
            incarnation: resp.generation,
            count,
            slots,
        })
    }

    /// Writes it into a response.
    pub fn write(&self, resp: &mut crate::layout::Response) {
        resp.slot = self.me.raw();
        resp.generation = self.incarnation;
        resp.size = self.count as u64;
        let b = crate::shm::bytes_of_mut(resp);
        for (i, s) in self
            .slots
            .iter()
            .enumerate()
            .take(self.count.min(PEERS_MAX))
        {
            let at = RESP_PEERS_OFF + 8 * i;
            b[at..at + 8].copy_from_slice(&s.to_le_bytes());
        }
    }

    /// The incarnation attached in `slot`, `None` if nobody is.
    pub fn incarnation_of(&self, slot: crate::PeerSlot) -> Option<u64> {
        let i = usize::try_from(slot.raw())
            .ok()
            .filter(|&i| i < self.count)?;
        Some(self.slots[i]).filter(|&inc| inc != 0)
    }
}

/// Most handles one VM may have open at once.
pub const MAX_HANDLES: usize = 4096;
/// Byte of the response holding `map_flags` (the first reserved byte).
pub const RESP_MAP_FLAGS_OFF: usize = 72;
/// `map_flags` bit: the mapping is writable.
pub const MAP_WRITABLE: u32 = 1;
/// Byte of an OPEN/CREATE response holding `le32 kind` (`crate::layout::kind`) of the
/// object the handle is on.
pub const RESP_KIND_OFF: usize = 76;
/// Byte of an OPEN/CREATE response holding `le32 object_flags`
/// (`crate::layout::object_flags`: PERSISTENT, NAMED, MANUAL_RESET).
pub const RESP_OBJECT_FLAGS_OFF: usize = 80;
/// Byte of an OPEN/CREATE response holding `le64 change_count`: the object's `signal_seq`
/// when the handle was made (what a later WAIT with [`WAIT_SINCE`] compares against).
pub const RESP_CHANGE_COUNT_OFF: usize = 88;
/// Request flag (bit 9 of `flags`) of WAIT: `max_size` is the change count the driver has
/// seen; a WAIT on a section whose count differs already completes at once (no change
/// between two WAITs is lost).
pub const WAIT_SINCE: u32 = 1 << 9;

/// Request flag (bit 10 of `flags`) of LOCK: do not queue; a mutex another thread owns is
/// STATUS_TIMEOUT at once.
pub const LOCK_TRY: u32 = 1 << 10;

/// The handle fields an OPEN/CREATE response carries past the mailbox's (§5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandleFields {
    /// `map_flags` ([`MAP_WRITABLE`]).
    pub map_flags: u32,
    /// The object's kind.
    pub kind: u32,
    /// The object's flags.
    pub object_flags: u32,
    /// The object's change count at the open.
    pub change_count: u64,
}

impl HandleFields {
    /// Reads them out of a response.
    pub fn read(resp: &crate::layout::Response) -> HandleFields {
        let b = crate::shm::bytes_of(resp);
        let le32 = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(w)
        };
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[RESP_CHANGE_COUNT_OFF..RESP_CHANGE_COUNT_OFF + 8]);
        HandleFields {
            map_flags: le32(RESP_MAP_FLAGS_OFF),
            kind: le32(RESP_KIND_OFF),
            object_flags: le32(RESP_OBJECT_FLAGS_OFF),
            change_count: u64::from_le_bytes(w),
        }
    }

    /// Writes them into a response.
    pub fn write(&self, resp: &mut crate::layout::Response) {
        let b = crate::shm::bytes_of_mut(resp);
        b[RESP_MAP_FLAGS_OFF..RESP_MAP_FLAGS_OFF + 4]
            .copy_from_slice(&self.map_flags.to_le_bytes());
        b[RESP_KIND_OFF..RESP_KIND_OFF + 4].copy_from_slice(&self.kind.to_le_bytes());
        b[RESP_OBJECT_FLAGS_OFF..RESP_OBJECT_FLAGS_OFF + 4]
            .copy_from_slice(&self.object_flags.to_le_bytes());
        b[RESP_CHANGE_COUNT_OFF..RESP_CHANGE_COUNT_OFF + 8]
            .copy_from_slice(&self.change_count.to_le_bytes());
    }
}
const _: () = assert!(RESP_CHANGE_COUNT_OFF + 8 <= core::mem::size_of::<crate::layout::Response>());
const _: () =
    assert!(core::mem::offset_of!(crate::layout::Response, reserved) == RESP_MAP_FLAGS_OFF);
/// Bytes of a request a driver places in the chain's readable buffers.
pub const REQUEST_BYTES: usize = core::mem::size_of::<Request>();

/// The device's configuration space (§4), decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Bytes of shared-memory region 0.
    pub window_size: u64,
    /// Granularity of window offsets and mappings.
    pub page_size: u64,
    /// `backend_epoch`.
    pub region_epoch: u64,
    /// How long destroyed memory stays in quarantine (FORMAT.md §11a), in ms: how long a
    /// CREATE refused only because of it is worth retrying.
    pub quarantine_ms: u32,
}

/// Bytes of the configuration space.
pub const CONFIG_BYTES: usize = 40;

impl DeviceConfig {
    /// The config-space bytes (little-endian, §4).
    pub fn to_bytes(&self) -> [u8; CONFIG_BYTES] {
        let mut b = [0u8; CONFIG_BYTES];
        b[0..8].copy_from_slice(&self.window_size.to_le_bytes());
        b[8..16].copy_from_slice(&self.page_size.to_le_bytes());
        b[16..20].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let max_name = u32::try_from(MAX_NAME_BYTES).unwrap_or(u32::MAX);
        b[20..24].copy_from_slice(&max_name.to_le_bytes());
        b[24..32].copy_from_slice(&self.region_epoch.to_le_bytes());
        b[32..36].copy_from_slice(&self.quarantine_ms.to_le_bytes());
        b
    }

    /// Reads the config-space bytes; `None` when the format version is not this one's.
    pub fn from_bytes(b: &[u8; CONFIG_BYTES]) -> Option<DeviceConfig> {
        let le64 = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let mut v = [0u8; 4];
        v.copy_from_slice(&b[16..20]);
        if u32::from_le_bytes(v) != FORMAT_VERSION {
            return None;
        }
        let mut q = [0u8; 4];
        q.copy_from_slice(&b[32..36]);
        Some(DeviceConfig {
            window_size: le64(0),
            page_size: le64(8),
            region_epoch: le64(24),
            quarantine_ms: u32::from_le_bytes(q),
        })
    }
}

/// Bytes of a LIST record's fixed part (`le16 name_len; u8 kind; u8 flags`), before the
/// name bytes (§5.3).
pub const LIST_RECORD_HEAD: usize = 4;
/// LIST record flag: the object is persistent.
pub const LIST_PERSISTENT: u8 = 1;
/// LIST record flag: the object is an event that stays signalled until reset.
pub const LIST_MANUAL_RESET: u8 = 2;

/// One LIST record, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListRecord<'a> {
    /// `vshm_format::layout::kind`.
    pub kind: u8,
    /// [`LIST_PERSISTENT`], [`LIST_MANUAL_RESET`].
    pub flags: u8,
    /// The name (UTF-8 as the device wrote it; checked by the reader).
    pub name: &'a [u8],
}

impl ListRecord<'_> {
    /// Bytes the record takes.
    pub fn len(&self) -> usize {
        LIST_RECORD_HEAD + self.name.len()
    }

    /// Never: a record has its head.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the record at the start of `out`; `None` if it does not fit (or the name is
    /// longer than a u16 counts).
    pub fn write(&self, out: &mut [u8]) -> Option<usize> {
        let n = u16::try_from(self.name.len()).ok()?;
        let b = out.get_mut(..self.len())?;
        b[0..2].copy_from_slice(&n.to_le_bytes());
        b[2] = self.kind;
        b[3] = self.flags;
        b[LIST_RECORD_HEAD..].copy_from_slice(self.name);
        Some(self.len())
    }

    /// Reads the records packed in `bytes` (stops at the first that does not fit).
    pub fn parse(bytes: &[u8]) -> impl Iterator<Item = ListRecord<'_>> {
        let mut at = 0usize;
        core::iter::from_fn(move || {
            let head = bytes.get(at..at + LIST_RECORD_HEAD)?;
            let n = usize::from(u16::from_le_bytes([head[0], head[1]]));
            let name = bytes.get(at + LIST_RECORD_HEAD..at + LIST_RECORD_HEAD + n)?;
            let r = ListRecord {
                kind: head[2],
                flags: head[3],
                name,
            };
            at += r.len();
            Some(r)
        })
    }
}

/// Event type: a held object's name was deleted (by anyone).
pub const EVENT_DELETED: u32 = 1;
/// Event type: a held section grew or was notified; `value` = its change count.
pub const EVENT_CHANGED: u32 = 2;
/// Event type: a held event was signalled; `value` = its signal count.
pub const EVENT_SIGNALLED: u32 = 3;

/// One event on the event queue (§6), as the device writes it (little-endian).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VirtioVshmEvent {
    /// [`EVENT_DELETED`], [`EVENT_CHANGED`], [`EVENT_SIGNALLED`].
    pub kind: u32,
    /// The object's slot.
    pub slot: u32,
    /// The object's generation.
    pub generation: u64,
    /// CHANGED: the section's change count; SIGNALLED: the event's; DELETED: 0.
    pub value: u64,
}

/// Bytes of one event.
pub const EVENT_BYTES: usize = 24;
const _: () = assert!(core::mem::size_of::<VirtioVshmEvent>() == EVENT_BYTES);
const _: () = assert!(core::mem::offset_of!(VirtioVshmEvent, generation) == 8);
const _: () = assert!(core::mem::offset_of!(VirtioVshmEvent, value) == 16);

impl VirtioVshmEvent {
    /// The event's bytes (little-endian, whatever the host's byte order).
    pub fn to_bytes(&self) -> [u8; EVENT_BYTES] {
        let mut b = [0u8; EVENT_BYTES];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.slot.to_le_bytes());
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.value.to_le_bytes());
        b
    }

    /// Reads an event's bytes.
    pub fn from_bytes(b: &[u8; EVENT_BYTES]) -> VirtioVshmEvent {
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let le64 = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        VirtioVshmEvent {
            kind: le32(0),
            slot: le32(4),
            generation: le64(8),
            value: le64(16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_space_reads_back_what_was_written_and_refuses_another_format() {
        let c = DeviceConfig {
            window_size: 256 << 20,
            page_size: 4096,
            region_epoch: 7,
            quarantine_ms: 1500,
        };
        let mut b = c.to_bytes();
        assert_eq!(DeviceConfig::from_bytes(&b), Some(c));
        b[16] ^= 0xFF;
        assert_eq!(DeviceConfig::from_bytes(&b), None);
    }

    #[test]
    fn an_event_and_list_records_read_back_what_was_written() {
        let e = VirtioVshmEvent {
            kind: EVENT_SIGNALLED,
            slot: 3,
            generation: 0x1122_3344_5566_7788,
            value: 9,
        };
        let b = e.to_bytes();
        assert_eq!(&b[0..4], &[3, 0, 0, 0]);
        assert_eq!(VirtioVshmEvent::from_bytes(&b), e);
        let mut out = [0u8; 32];
        let a = ListRecord {
            kind: 1,
            flags: LIST_PERSISTENT,
            name: b"web/a",
        };
        let n = a.write(&mut out).expect("fits");
        let m = ListRecord {
            kind: 2,
            flags: 0,
            name: b"ev",
        }
        .write(&mut out[n..])
        .expect("fits");
        assert!(a.write(&mut out[..8]).is_none(), "too small");
        let read: Vec<_> = ListRecord::parse(&out[..n + m]).collect();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0], a);
        assert_eq!(read[1].name, b"ev");
    }

    #[test]
    fn the_pci_id_is_the_modern_virtio_id_of_the_device() {
        assert_eq!(PCI_DEVICE, 0x10FE);
    }
}
