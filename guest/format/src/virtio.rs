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
/// Most handles one VM may have open at once.
pub const MAX_HANDLES: usize = 4096;
/// Byte of the response holding `map_flags` (the first reserved byte).
pub const RESP_MAP_FLAGS_OFF: usize = 72;
/// `map_flags` bit: the mapping is writable.
pub const MAP_WRITABLE: u32 = 1;
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
}

/// Bytes of the configuration space.
pub const CONFIG_BYTES: usize = 32;

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
        Some(DeviceConfig {
            window_size: le64(0),
            page_size: le64(8),
            region_epoch: le64(24),
        })
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
        };
        let mut b = c.to_bytes();
        assert_eq!(DeviceConfig::from_bytes(&b), Some(c));
        b[16] ^= 0xFF;
        assert_eq!(DeviceConfig::from_bytes(&b), None);
    }

    #[test]
    fn the_pci_id_is_the_modern_virtio_id_of_the_device() {
        assert_eq!(PCI_DEVICE, 0x10FE);
    }
}
