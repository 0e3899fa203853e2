//! What the driver needs from the machine, as a trait: port I/O (the serial port, PCI
//! configuration mechanism #1, the exit port) and volatile accesses to guest-physical
//! addresses (MMIO, the rings, the window). The guest binary implements it on the real
//! x86 machine (src/x86.rs, the only `unsafe` outside src/mem.rs); the tests implement it
//! with a simulated device.

/// The serial port's data register (a 16550A's THR).
pub const SERIAL_PORT: u16 = 0x3F8;
/// A status byte written here ends the run (QEMU's isa-debug-exit port, vshm-vmm's too).
pub const EXIT_PORT: u16 = 0xF4;
/// PCI configuration mechanism #1: the address register.
pub const PCI_ADDRESS_PORT: u16 = 0xCF8;
/// PCI configuration mechanism #1: the data register.
pub const PCI_DATA_PORT: u16 = 0xCFC;

/// Port I/O and guest-physical memory. Addresses are guest-physical (identity-mapped).
pub trait Hw {
    /// `out dx, al`.
    fn outb(&mut self, port: u16, value: u8);
    /// `out dx, eax`.
    fn outl(&mut self, port: u16, value: u32);
    /// `in eax, dx`.
    fn inl(&mut self, port: u16) -> u32;
    /// A volatile 8-bit read.
    fn read8(&mut self, addr: u64) -> u8;
    /// A volatile 16-bit read.
    fn read16(&mut self, addr: u64) -> u16;
    /// A volatile 32-bit read.
    fn read32(&mut self, addr: u64) -> u32;
    /// A volatile 64-bit read (8-byte aligned).
    fn read64(&mut self, addr: u64) -> u64;
    /// A volatile 8-bit write.
    fn write8(&mut self, addr: u64, value: u8);
    /// A volatile 16-bit write.
    fn write16(&mut self, addr: u64, value: u16);
    /// A volatile 32-bit write.
    fn write32(&mut self, addr: u64, value: u32);
    /// A volatile 64-bit write (8-byte aligned).
    fn write64(&mut self, addr: u64, value: u64);
    /// Copies `src` to guest RAM at `addr` (a buffer the device reads after a notify).
    fn write_bytes(&mut self, addr: u64, src: &[u8]);
    /// Copies guest RAM at `addr` into `dst` (a buffer the device wrote).
    fn read_bytes(&mut self, addr: u64, dst: &mut [u8]);
    /// A full memory barrier (ring updates before the notify, the used index before the
    /// used element).
    fn fence(&mut self);

    /// Writes bytes to the serial port.
    fn serial(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.outb(SERIAL_PORT, b);
        }
    }
}
