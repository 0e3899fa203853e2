//! A PCI host bridge with configuration mechanism #1 (ports 0xCF8 address, 0xCFC–0xCFF
//! data) and one bus of up to 32 single-function devices. No rust-vmm crate publishes one
//! (cloud-hypervisor's and Firecracker's live inside their VMMs), and what a guest needs is
//! small: type-0 config spaces with read-only identification, a command register, BARs a
//! guest can size and move, and a capability list.
//!
//! A device sees its BARs' current addresses through [`ConfigSpace::bar_address`] and is told
//! when the guest moves one ([`PciFunction::bar_moved`]), so a BAR backed by KVM memory slots
//! or ioeventfds can follow it.
#![allow(clippy::cast_possible_truncation)] // configuration registers are 8/16/32-bit views of wider values: narrowing is the point.

use std::fmt;

/// The address port of configuration mechanism #1.
pub const CONFIG_ADDRESS: u16 = 0xCF8;
/// The first data port of configuration mechanism #1 (0xCFC–0xCFF).
pub const CONFIG_DATA: u16 = 0xCFC;
/// Devices on the bus.
pub const DEVICES: usize = 32;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const BAR0: usize = 0x10;
const CAPABILITIES: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3C;
const FIRST_CAPABILITY: usize = 0x40;
/// Command register: memory space decoding on.
pub const COMMAND_MEMORY: u16 = 1 << 1;
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Unused.
    None,
    /// 32-bit memory.
    Memory32,
    /// 64-bit memory (takes this BAR and the next), prefetchable or not.
    Memory64 {
        /// The prefetchable bit.
        prefetchable: bool,
    },
    /// The upper half of the previous 64-bit BAR.
    Upper,
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    kind: BarKind,
    size: u64,
}

/// A type-0 configuration space: 256 bytes, the BARs' sizes and kinds.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    bars: [Bar; 6],
    next_capability: usize,
}

impl fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "id",
                &format_args!("{:04x}:{:04x}", self.read16(0), self.read16(2)),
            )
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

/// Why a configuration space could not be built as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciError {
    /// A BAR's size must be a power of two of at least 16 bytes.
    #[error("BAR {bar}: size {size:#x} is not a power of two of at least 16 bytes")]
    BarSize {
        /// Which BAR.
        bar: usize,
        /// Its size.
        size: u64,
    },
    /// A BAR index out of 0..6, or a 64-bit BAR at index 5, or one that overlaps another.
    #[error("BAR {0} is not free for this kind")]
    BarIndex(usize),
    /// A BAR's address is not aligned to its size.
    #[error("BAR {bar}: address {address:#x} is not aligned to its size {size:#x}")]
    BarAlign {
        /// Which BAR.
        bar: usize,
        /// The address.
        address: u64,
        /// Its size.
        size: u64,
    },
    /// The capability list is full.
    #[error("a capability of {0} bytes does not fit in the configuration space")]
    CapabilityFull(usize),
    /// Every device number is taken.
    #[error("the PCI bus has no free device number")]
    BusFull,
}

impl ConfigSpace {
    /// A device's space: its identity, class code (class, subclass, programming interface) and
    /// revision; no BARs, no capabilities, decoding off.
    pub fn new(vendor: u16, device: u16, class: [u8; 3], revision: u8) -> ConfigSpace {
        let mut c = ConfigSpace {
            bytes: [0; 256],
            bars: [Bar {
                kind: BarKind::None,
                size: 0,
            }; 6],
            next_capability: FIRST_CAPABILITY,
        };
        c.bytes[0..2].copy_from_slice(&vendor.to_le_bytes());
        c.bytes[2..4].copy_from_slice(&device.to_le_bytes());
        c.bytes[8] = revision;
        c.bytes[9] = class[2];
        c.bytes[10] = class[1];
        c.bytes[11] = class[0];
        c
    }

    /// Sets the subsystem vendor and id (0x2C, 0x2E).
    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.bytes[0x2C..0x2E].copy_from_slice(&vendor.to_le_bytes());
        self.bytes[0x2E..0x30].copy_from_slice(&id.to_le_bytes());
    }

    /// Declares BAR `bar` of `kind` and `size` at `address` (what firmware would assign).
    pub fn set_bar(
        &mut self,
        bar: usize,
        kind: BarKind,
        size: u64,
        address: u64,
    ) -> Result<(), PciError> {
        let wide = matches!(kind, BarKind::Memory64 { .. });
        if bar >= 6 || (wide && bar == 5) || matches!(kind, BarKind::None | BarKind::Upper) {
            return Err(PciError::BarIndex(bar));
        }
        let taken = |b: usize| !matches!(self.bars[b].kind, BarKind::None);
        if taken(bar) || (wide && taken(bar + 1)) {
            return Err(PciError::BarIndex(bar));
        }
        if size < 16 || !size.is_power_of_two() || (!wide && size > 1 << 31) {
            return Err(PciError::BarSize { bar, size });
        }
        if address % size != 0 || (!wide && address > u64::from(u32::MAX)) {
            return Err(PciError::BarAlign { bar, address, size });
        }
        self.bars[bar] = Bar { kind, size };
        if wide {
            self.bars[bar + 1] = Bar {
                kind: BarKind::Upper,
                size,
            };
        }
        self.store_bar(bar, address);
        Ok(())
    }

    fn bar_flags(kind: BarKind) -> u32 {
        match kind {
            BarKind::Memory64 { prefetchable } => 0x4 | if prefetchable { 0x8 } else { 0 },
            _ => 0,
        }
    }

    fn store_bar(&mut self, bar: usize, address: u64) {
        let kind = self.bars[bar].kind;
        let low = (address as u32 & !0xF) | Self::bar_flags(kind);
        self.write32_raw(BAR0 + 4 * bar, low);
        if matches!(kind, BarKind::Memory64 { .. }) {
            self.write32_raw(BAR0 + 4 * (bar + 1), (address >> 32) as u32);
        }
    }

    /// BAR `bar`'s current address and size, `None` if it is unused or an upper half.
    pub fn bar_address(&self, bar: usize) -> Option<(u64, u64)> {
        let b = self.bars.get(bar)?;
        let low = u64::from(self.read32(BAR0 + 4 * bar) & !0xF);
        match b.kind {
            BarKind::Memory32 => Some((low, b.size)),
            BarKind::Memory64 { .. } => {
                let high = u64::from(self.read32(BAR0 + 4 * (bar + 1)));
                Some(((high << 32) | low, b.size))
            }
            BarKind::None | BarKind::Upper => None,
        }
    }

    /// Where BAR `bar` may back guest memory: its address while memory decoding is on and
    /// it lies below `limit`, clear of RAM (`0..ram_end`) and of the function's other BARs;
    /// `None` otherwise (a BAR being sized reads all ones, a guest may move one anywhere).
    pub fn bar_place(&self, bar: usize, ram_end: u64, limit: u64) -> Option<u64> {
        if !self.memory_enabled() {
            return None;
        }
        let (base, size) = self.bar_address(bar)?;
        let end = base.checked_add(size).filter(|e| *e <= limit)?;
        let overlaps = |a: u64, a_end: u64| base < a_end && a < end;
        if overlaps(0, ram_end) {
            return None;
        }
        let clash = (0..6)
            .filter(|b| *b != bar)
            .filter_map(|b| self.bar_address(b))
            .any(|(b, s)| overlaps(b, b.saturating_add(s)));
        (!clash).then_some(base)
    }

    /// Whether memory decoding is on (command register bit 1).
    pub fn memory_enabled(&self) -> bool {
        self.read16(COMMAND) & COMMAND_MEMORY != 0
    }

    /// Turns memory decoding on, as firmware does after assigning BARs.
    pub fn enable_memory(&mut self) {
        let c = self.read16(COMMAND) | COMMAND_MEMORY;
        self.bytes[COMMAND..COMMAND + 2].copy_from_slice(&c.to_le_bytes());
    }

    /// Appends a capability (its bytes from the one after `cap_next`: `body[0]` is the
    /// capability id) and links it into the list; returns its offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let at = self.next_capability;
        let end = at + len.next_multiple_of(4);
        if end > self.bytes.len() {
            return Err(PciError::CapabilityFull(len));
        }
        self.bytes[at] = id;
        self.bytes[at + 1] = 0;
        self.bytes[at + 2..at + len].copy_from_slice(body);
        // Link: the list pointer or the last capability's next points here.
        let mut link = CAPABILITIES;
        while self.bytes[link] != 0 {
            link = usize::from(self.bytes[link]) + 1;
        }
        self.bytes[link] = at as u8;
        let status = self.read16(STATUS) | STATUS_CAPABILITIES;
        self.bytes[STATUS..STATUS + 2].copy_from_slice(&status.to_le_bytes());
        self.next_capability = end;
        Ok(at)
    }

    fn read16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    /// The aligned 32-bit register at `at` (& !3).
    pub fn read32(&self, at: usize) -> u32 {
        let at = at & 0xFC;
        u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }

    fn write32_raw(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write of `data` at byte `at`: only the command register, the interrupt line
    /// and the BARs are writable (a BAR keeps its size's alignment and kind bits, so writing
    /// all ones and reading back sizes it). Returns the BARs whose address changed, with
    /// their old addresses.
    pub fn write(&mut self, at: usize, data: &[u8]) -> Vec<(usize, u64)> {
        let before: Vec<Option<(u64, u64)>> = (0..6).map(|b| self.bar_address(b)).collect();
        for (i, byte) in data.iter().enumerate() {
            let Some(pos) = at.checked_add(i).filter(|p| *p < 256) else {
                break;
            };
            match pos {
                // Command: I/O, memory, bus master, INTx disable.
                0x04 => self.bytes[pos] = *byte & 0x07,
                0x05 => self.bytes[pos] = *byte & 0x04,
                INTERRUPT_LINE => self.bytes[pos] = *byte,
                0x10..=0x27 => self.write_bar_byte(pos, *byte),
                _ => {}
            }
        }
        (0..6)
            .filter_map(|b| {
                let (old, _) = before[b]?;
                let (new, _) = self.bar_address(b)?;
                (old != new).then_some((b, old))
            })
            .collect()
    }

    fn write_bar_byte(&mut self, pos: usize, byte: u8) {
        let bar = (pos - BAR0) / 4;
        let Bar { kind, size } = self.bars[bar];
        let shift = 8 * ((pos - BAR0) % 4) as u32;
        let mask: u32 = match kind {
            BarKind::None => 0,
            BarKind::Memory32 | BarKind::Memory64 { .. } => !(size as u32).wrapping_sub(1) & !0xF,
            // The upper half keeps the size's bits above 32 clear.
            BarKind::Upper => !((size.wrapping_sub(1) >> 32) as u32),
        };
        let old = self.read32(BAR0 + 4 * bar);
        let byte_mask = 0xFFu32 << shift;
        let mut v = (old & !byte_mask) | (u32::from(byte) << shift);
        v &= mask;
        if !matches!(kind, BarKind::Upper) {
            v |= Self::bar_flags(kind);
        }
        self.write32_raw(BAR0 + 4 * bar, v);
    }
}

/// A device on the bus.
pub trait PciFunction: Send {
    /// Its configuration space.
    fn config(&self) -> &ConfigSpace;
    /// Its configuration space, for the bus to apply guest writes.
    fn config_mut(&mut self) -> &mut ConfigSpace;
    /// The guest moved BAR `bar` from `old` (its new address is in the config space).
    fn bar_moved(&mut self, _bar: usize, _old: u64) {}
    /// The guest wrote the configuration space (after [`PciFunction::bar_moved`], if a BAR
    /// moved): a device whose BARs are backed by KVM slots or ioeventfds re-checks where they
    /// are and whether decoding is on.
    fn config_written(&mut self) {}
    /// A read of `data.len()` bytes at `offset` into BAR `bar`.
    fn mmio_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write at `offset` into BAR `bar`.
    fn mmio_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The bus: the host bridge at device 0 and the devices added after it.
pub struct PciBus {
    address: u32,
    bridge: ConfigSpace,
    devices: Vec<Box<dyn PciFunction>>,
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciBus")
            .field("devices", &(self.devices.len() + 1))
            .finish_non_exhaustive()
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with only the host bridge (class 06/00, vendor 1AF4: the project's own).
    pub fn new() -> PciBus {
        PciBus {
            address: 0,
            bridge: ConfigSpace::new(0x1AF4, 0x0FF0, [0x06, 0x00, 0x00], 0),
            devices: Vec::new(),
        }
    }

    /// Adds a device at the next device number (1, 2, …) and returns that number.
    pub fn add(&mut self, device: Box<dyn PciFunction>) -> Result<u8, PciError> {
        if self.devices.len() + 1 >= DEVICES {
            return Err(PciError::BusFull);
        }
        self.devices.push(device);
        Ok(self.devices.len() as u8)
    }

    /// Device `n` (1-based as [`PciBus::add`] returned it).
    pub fn device_mut(&mut self, n: u8) -> Option<&mut (dyn PciFunction + 'static)> {
        let i = usize::from(n).checked_sub(1)?;
        self.devices.get_mut(i).map(|d| &mut **d)
    }

    /// The register the address latch names: `None` when disabled, another bus, another
    /// function or a device number nobody holds.
    fn selected(&self) -> Option<(usize, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xFF != 0 || (a >> 8) & 0x7 != 0 {
            return None;
        }
        let dev = ((a >> 11) & 0x1F) as usize;
        (dev <= self.devices.len()).then_some((dev, (a & 0xFC) as usize))
    }

    fn space(&self, dev: usize) -> &ConfigSpace {
        match dev {
            0 => &self.bridge,
            n => self.devices[n - 1].config(),
        }
    }

    /// Whether `port` is one of the bus's.
    pub fn owns_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_ADDRESS + 4).contains(&port)
            || (CONFIG_DATA..CONFIG_DATA + 4).contains(&port)
    }

    /// A port read. Absent devices read as all ones, as on real hardware.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        data.fill(0xFF);
        if !(CONFIG_DATA..CONFIG_DATA + 4).contains(&port) {
            return;
        }
        let Some((dev, reg)) = self.selected() else {
            return;
        };
        let word = self.space(dev).read32(reg).to_le_bytes();
        let start = usize::from(port - CONFIG_DATA);
        for (i, d) in data.iter_mut().enumerate() {
            if let Some(b) = word.get(start + i) {
                *d = *b;
            }
        }
    }

    /// A port write.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            return;
        }
        if !(CONFIG_DATA..CONFIG_DATA + 4).contains(&port) {
            return;
        }
        let Some((dev, reg)) = self.selected() else {
            return;
        };
        let at = reg + usize::from(port - CONFIG_DATA);
        let len = data.len().min(4 - usize::from(port - CONFIG_DATA));
        if dev == 0 {
            self.bridge.write(at, &data[..len]);
            return;
        }
        let d = &mut self.devices[dev - 1];
        for (bar, old) in d.config_mut().write(at, &data[..len]) {
            d.bar_moved(bar, old);
        }
        d.config_written();
    }

    /// An MMIO access at `addr` that falls in a device's BAR (memory decoding on): the device
    /// handles it and this returns true.
    pub fn mmio(&mut self, addr: u64, access: Access<'_>) -> bool {
        for d in &mut self.devices {
            if !d.config().memory_enabled() {
                continue;
            }
            let hit = (0..6).find_map(|bar| {
                let (base, size) = d.config().bar_address(bar)?;
                let off = addr.checked_sub(base)?;
                (off < size).then_some((bar, off))
            });
            if let Some((bar, off)) = hit {
                match access {
                    Access::Read(data) => d.mmio_read(bar, off, data),
                    Access::Write(data) => d.mmio_write(bar, off, data),
                }
                return true;
            }
        }
        false
    }
}

/// An MMIO access.
#[derive(Debug)]
pub enum Access<'a> {
    /// A read into the buffer.
    Read(&'a mut [u8]),
    /// A write of the bytes.
    Write(&'a [u8]),
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev {
        config: ConfigSpace,
        moved: Vec<(usize, u64)>,
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciFunction for Dev {
        fn config(&self) -> &ConfigSpace {
            &self.config
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.config
        }
        fn bar_moved(&mut self, bar: usize, old: u64) {
            self.moved.push((bar, old));
        }
        fn mmio_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn mmio_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
    }

    fn bus() -> PciBus {
        let mut c = ConfigSpace::new(0x1AF4, 0x10FE, [0xFF, 0x00, 0x00], 1);
        c.set_bar(0, BarKind::Memory32, 0x4000, 0xE000_0000)
            .expect("test setup");
        c.set_bar(
            4,
            BarKind::Memory64 { prefetchable: true },
            1 << 28,
            1 << 32,
        )
        .expect("test setup");
        c.add_capability(0x09, &[16, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("test setup");
        c.add_capability(0x09, &[16, 8, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect("test setup");
        c.enable_memory();
        let mut b = PciBus::new();
        let n = b
            .add(Box::new(Dev {
                config: c,
                moved: vec![],
                writes: vec![],
            }))
            .expect("test setup");
        assert_eq!(n, 1);
        b
    }

    fn read(b: &mut PciBus, dev: u32, reg: u32) -> u32 {
        b.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | (dev << 11) | reg).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        b.pio_read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    fn write(b: &mut PciBus, dev: u32, reg: u32, v: u32) {
        b.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000 | (dev << 11) | reg).to_le_bytes(),
        );
        b.pio_write(CONFIG_DATA, &v.to_le_bytes());
    }

    #[test]
    fn a_guest_finds_the_bridge_and_the_device_and_absent_slots_read_all_ones() {
        let mut b = bus();
        assert_eq!(read(&mut b, 0, 0), 0x0FF0_1AF4);
        assert_eq!(read(&mut b, 0, 8) >> 16, 0x0600);
        assert_eq!(read(&mut b, 1, 0), 0x10FE_1AF4);
        assert_eq!(read(&mut b, 2, 0), 0xFFFF_FFFF);
        assert_eq!(read(&mut b, 31, 0), 0xFFFF_FFFF);
        // Another function of a present device is absent too.
        b.pio_write(
            CONFIG_ADDRESS,
            &(0x8000_0000u32 | (1 << 11) | (1 << 8)).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        b.pio_read(CONFIG_DATA, &mut d);
        assert_eq!(d, [0xFF; 4]);
        // Byte and word reads at an offset into the data window.
        b.pio_write(CONFIG_ADDRESS, &(0x8000_0000u32 | (1 << 11)).to_le_bytes());
        let mut w = [0u8; 2];
        b.pio_read(CONFIG_DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x10FE);
    }

    #[test]
    fn the_capability_list_links_every_capability_in_order() {
        let mut b = bus();
        assert_ne!(read(&mut b, 1, 4) & (1 << 20), 0, "status: capabilities");
        let first = read(&mut b, 1, 0x34) & 0xFF;
        assert_eq!(first, 0x40);
        let cap = read(&mut b, 1, first);
        assert_eq!(cap & 0xFF, 0x09);
        let second = (cap >> 8) & 0xFF;
        assert_eq!(read(&mut b, 1, second) >> 24, 8, "cfg_type of the second");
        assert_eq!(
            (read(&mut b, 1, second) >> 8) & 0xFF,
            0,
            "the end of the list"
        );
    }

    #[test]
    fn bars_are_sized_by_writing_ones_and_moved_by_writing_an_address() {
        let mut b = bus();
        assert_eq!(read(&mut b, 1, 0x10), 0xE000_0000);
        assert_eq!(
            read(&mut b, 1, 0x20),
            0xC,
            "64-bit prefetchable, low half 0"
        );
        assert_eq!(read(&mut b, 1, 0x24), 1);
        write(&mut b, 1, 0x10, 0xFFFF_FFFF);
        assert_eq!(read(&mut b, 1, 0x10), !(0x4000 - 1), "size 16 KiB");
        write(&mut b, 1, 0x10, 0xE010_0000);
        write(&mut b, 1, 0x20, 0xFFFF_FFFF);
        write(&mut b, 1, 0x24, 0xFFFF_FFFF);
        assert_eq!(read(&mut b, 1, 0x20), !((1u32 << 28) - 1) | 0xC);
        assert_eq!(read(&mut b, 1, 0x24), 0xFFFF_FFFF);
        write(&mut b, 1, 0x20, 0x2000_0000);
        write(&mut b, 1, 0x24, 2);
        let d = b.device_mut(1).expect("test setup");
        assert_eq!(d.config().bar_address(0), Some((0xE010_0000, 0x4000)));
        assert_eq!(d.config().bar_address(4), Some((0x2_2000_0000, 1 << 28)));
        // Unused BARs stay zero whatever is written.
        write(&mut b, 1, 0x14, 0xFFFF_FFFF);
        assert_eq!(read(&mut b, 1, 0x14), 0);
        // Identification is read-only.
        write(&mut b, 1, 0, 0);
        assert_eq!(read(&mut b, 1, 0), 0x10FE_1AF4);
    }

    #[test]
    fn the_device_is_told_when_a_bar_moves_and_mmio_follows_it() {
        let mut b = bus();
        let mut d = [0u8; 4];
        assert!(b.mmio(0xE000_0010, Access::Read(&mut d)));
        assert_eq!(d, [0x10; 4]);
        write(&mut b, 1, 0x10, 0xE010_0000);
        assert!(!b.mmio(0xE000_0010, Access::Read(&mut d)));
        assert!(b.mmio(0xE010_0004, Access::Write(&[1, 2])));
        // Memory decoding off: no BAR answers.
        write(&mut b, 1, 4, 0);
        assert!(!b.mmio(0xE010_0004, Access::Read(&mut d)));
        let dev = b.device_mut(1).expect("test setup");
        assert!(!dev.config().memory_enabled());
    }

    #[test]
    fn bad_bars_are_refused_with_their_values() {
        let mut c = ConfigSpace::new(1, 2, [0, 0, 0], 0);
        assert_eq!(
            c.set_bar(0, BarKind::Memory32, 0x3000, 0),
            Err(PciError::BarSize {
                bar: 0,
                size: 0x3000
            })
        );
        assert_eq!(
            c.set_bar(0, BarKind::Memory32, 0x1000, 0x800),
            Err(PciError::BarAlign {
                bar: 0,
                address: 0x800,
                size: 0x1000
            })
        );
        assert_eq!(
            c.set_bar(
                5,
                BarKind::Memory64 {
                    prefetchable: false
                },
                0x1000,
                0
            ),
            Err(PciError::BarIndex(5))
        );
        c.set_bar(
            2,
            BarKind::Memory64 {
                prefetchable: false,
            },
            0x1000,
            0,
        )
        .expect("test setup");
        assert_eq!(
            c.set_bar(3, BarKind::Memory32, 0x1000, 0),
            Err(PciError::BarIndex(3))
        );
    }
}
