//! PCI on bus 0 through configuration mechanism #1: finding a function, reading its BARs
//! (assigned by the VMM, as firmware would; never sized or moved here) and its virtio
//! vendor capabilities (virtio 1.x §4.1.4).

use crate::hw::{Hw, PCI_ADDRESS_PORT, PCI_DATA_PORT};

/// A function on bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Function {
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl Function {
    fn address(self, offset: u8) -> u32 {
        0x8000_0000
            | (u32::from(self.device) << 11)
            | (u32::from(self.function) << 8)
            | u32::from(offset & 0xFC)
    }

    /// The 32-bit configuration register at `offset` (rounded down to 4).
    pub fn read32<H: Hw>(self, hw: &mut H, offset: u8) -> u32 {
        hw.outl(PCI_ADDRESS_PORT, self.address(offset));
        hw.inl(PCI_DATA_PORT)
    }

    /// Writes the 32-bit configuration register at `offset` (rounded down to 4).
    pub fn write32<H: Hw>(self, hw: &mut H, offset: u8, value: u32) {
        hw.outl(PCI_ADDRESS_PORT, self.address(offset));
        hw.outl(PCI_DATA_PORT, value);
    }

    /// The byte at `offset`.
    pub fn read8<H: Hw>(self, hw: &mut H, offset: u8) -> u8 {
        self.read32(hw, offset).to_le_bytes()[usize::from(offset & 3)]
    }

    /// The address BAR `n` (0..6) decodes, reading 64-bit BARs as 64-bit; `None` for an I/O
    /// BAR, a BAR index past the table, or the upper half of a 64-bit BAR.
    pub fn bar<H: Hw>(self, hw: &mut H, n: u8) -> Option<u64> {
        if n > 5 {
            return None;
        }
        let low = self.read32(hw, 0x10 + 4 * n);
        if low & 1 != 0 {
            return None;
        }
        let base = u64::from(low & !0xF);
        match (low >> 1) & 3 {
            0 => Some(base),
            2 if n < 5 => Some(base | u64::from(self.read32(hw, 0x14 + 4 * n)) << 32),
            _ => None,
        }
    }

    /// Sets Memory Space and Bus Master in the command register (the device reads and
    /// writes the rings in guest memory). Writes zeros to the status half, whose bits are
    /// write-one-to-clear.
    pub fn enable<H: Hw>(self, hw: &mut H) {
        let command = self.read32(hw, 0x04) & 0xFFFF;
        self.write32(hw, 0x04, command | 0b110);
    }
}

/// The first function on bus 0 with this vendor and device ID.
pub fn find<H: Hw>(hw: &mut H, vendor: u16, device: u16) -> Option<Function> {
    let want = u32::from(device) << 16 | u32::from(vendor);
    for d in 0..32 {
        let f0 = Function {
            device: d,
            function: 0,
        };
        let id = f0.read32(hw, 0);
        let v = id & 0xFFFF;
        // 0xFFFF: nothing there; 0: a machine that answers reads of empty slots with zeros.
        if v == 0xFFFF || v == 0 {
            continue;
        }
        if id == want {
            return Some(f0);
        }
        // Header type bit 7: a multi-function device.
        if f0.read8(hw, 0x0E) & 0x80 != 0 {
            for f in 1..8 {
                let func = Function {
                    device: d,
                    function: f,
                };
                if func.read32(hw, 0) == want {
                    return Some(func);
                }
            }
        }
    }
    None
}

/// `VIRTIO_PCI_CAP_COMMON_CFG`.
pub const CAP_COMMON_CFG: u8 = 1;
/// `VIRTIO_PCI_CAP_NOTIFY_CFG`.
pub const CAP_NOTIFY_CFG: u8 = 2;
/// `VIRTIO_PCI_CAP_DEVICE_CFG`.
pub const CAP_DEVICE_CFG: u8 = 4;
/// `VIRTIO_PCI_CAP_SHARED_MEMORY_CFG`.
pub const CAP_SHARED_MEMORY_CFG: u8 = 8;

/// A virtio vendor capability (`struct virtio_pci_cap`, or `virtio_pci_cap64` for shared
/// memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioCap {
    /// `cfg_type`.
    pub cfg_type: u8,
    /// `bar`.
    pub bar: u8,
    /// `id` (which shared-memory region).
    pub id: u8,
    /// `offset` in the BAR (with `offset_hi` for shared memory).
    pub offset: u64,
    /// `length` (with `length_hi` for shared memory).
    pub length: u64,
    /// NOTIFY_CFG: `notify_off_multiplier`; else 0.
    pub notify_off_multiplier: u32,
}

/// The function's virtio capabilities, in list order, passed to `each` (at most 48: a list
/// that loops ends there).
pub fn virtio_caps<H: Hw>(hw: &mut H, f: Function, mut each: impl FnMut(VirtioCap)) {
    // Status register bit 4: the function has a capability list.
    if f.read32(hw, 0x04) & (1 << 20) == 0 {
        return;
    }
    let mut at = f.read8(hw, 0x34) & 0xFC;
    let mut seen = 0;
    while at >= 0x40 && seen < 48 {
        seen += 1;
        let head = f.read32(hw, at);
        let [vndr, next, len, cfg_type] = head.to_le_bytes();
        if vndr == 0x09 && len >= 16 {
            let word = field(hw, f, at, 4);
            let mut cap = VirtioCap {
                cfg_type,
                bar: word.to_le_bytes()[0],
                id: word.to_le_bytes()[1],
                offset: u64::from(field(hw, f, at, 8)),
                length: u64::from(field(hw, f, at, 12)),
                notify_off_multiplier: 0,
            };
            if cfg_type == CAP_NOTIFY_CFG && len >= 20 {
                cap.notify_off_multiplier = field(hw, f, at, 16);
            }
            if cfg_type == CAP_SHARED_MEMORY_CFG && len >= 24 {
                cap.offset |= u64::from(field(hw, f, at, 16)) << 32;
                cap.length |= u64::from(field(hw, f, at, 20)) << 32;
            }
            each(cap);
        }
        at = next & 0xFC;
    }
}

/// The capability's dword at `at + k`; 0 past the end of configuration space.
fn field<H: Hw>(hw: &mut H, f: Function, at: u8, k: u8) -> u32 {
    at.checked_add(k).map_or(0, |o| f.read32(hw, o))
}
