//! A split virtqueue (virtio 1.x §2.7) with one request in flight at a time: the request
//! is always the chain descriptor 0 (device-readable) → descriptor 1 (device-writable).
//! No interrupts: the driver sets `VIRTQ_AVAIL_F_NO_INTERRUPT` and polls the used index.

use crate::hw::Hw;

/// `VIRTQ_DESC_F_NEXT`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_AVAIL_F_NO_INTERRUPT`.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Bytes from the queue's base to each of its parts (each on its own 4 KiB page).
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
/// Bytes of memory a queue occupies from its base.
pub const QUEUE_BYTES: u64 = 0x3000;
/// Largest queue this driver sets up (the rings fit a page each).
pub const MAX_SIZE: u16 = 16;

/// A split virtqueue in guest memory at `base`.
#[derive(Debug)]
pub struct SplitQueue {
    base: u64,
    size: u16,
    /// The driver's next avail index (free-running).
    avail_idx: u16,
    /// The used index up to which the driver consumed (free-running).
    last_used: u16,
}

/// A completed chain: its head and the bytes the device wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor index.
    pub id: u32,
    /// Bytes written into the device-writable buffers.
    pub len: u32,
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two, 1..=[`MAX_SIZE`]) at `base` (4 KiB
    /// aligned, [`QUEUE_BYTES`] long), its rings zeroed and interrupts suppressed.
    pub fn new<H: Hw>(hw: &mut H, base: u64, size: u16) -> SplitQueue {
        let q = SplitQueue {
            base,
            size,
            avail_idx: 0,
            last_used: 0,
        };
        hw.write_bytes(base, &[0u8; 16 * MAX_SIZE as usize]);
        hw.write_bytes(base + AVAIL_OFF, &[0u8; 6 + 2 * MAX_SIZE as usize]);
        hw.write_bytes(base + USED_OFF, &[0u8; 6 + 8 * MAX_SIZE as usize]);
        hw.write16(base + AVAIL_OFF, AVAIL_F_NO_INTERRUPT);
        q
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.base
    }

    /// Guest-physical address of the driver (avail) ring.
    pub fn avail_addr(&self) -> u64 {
        self.base + AVAIL_OFF
    }

    /// Guest-physical address of the device (used) ring.
    pub fn used_addr(&self) -> u64 {
        self.base + USED_OFF
    }

    fn write_desc<H: Hw>(&self, hw: &mut H, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.base + 16 * u64::from(i);
        hw.write64(d, addr);
        hw.write32(d + 8, len);
        hw.write16(d + 12, flags);
        hw.write16(d + 14, next);
    }

    /// Makes the chain `readable` (`len` bytes at the address) → `writable` available to
    /// the device. The caller notifies the device afterwards.
    pub fn post<H: Hw>(&mut self, hw: &mut H, readable: (u64, u32), writable: (u64, u32)) {
        self.write_desc(hw, 0, readable.0, readable.1, DESC_F_NEXT, 1);
        self.write_desc(hw, 1, writable.0, writable.1, DESC_F_WRITE, 0);
        let slot = self.avail_idx % self.size;
        hw.write16(self.avail_addr() + 4 + 2 * u64::from(slot), 0);
        // The descriptors and the ring entry before the index that publishes them.
        hw.fence();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        hw.write16(self.avail_addr() + 2, self.avail_idx);
        // The index before the notify that follows.
        hw.fence();
    }

    /// The next completed chain, if the device has used one.
    pub fn poll<H: Hw>(&mut self, hw: &mut H) -> Option<Used> {
        let used_idx = hw.read16(self.used_addr() + 2);
        if used_idx == self.last_used {
            return None;
        }
        // The index before the element it publishes.
        hw.fence();
        let e = self.used_addr() + 4 + 8 * u64::from(self.last_used % self.size);
        let used = Used {
            id: hw.read32(e),
            len: hw.read32(e + 4),
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some(used)
    }
}
