//! [`Hw`] on the real machine: `in`/`out` instructions and volatile accesses to identity-
//! mapped guest-physical addresses (the contract in README.md: everything below 8 GiB is
//! mapped, writable). The only hardware `unsafe` of the guest.

use core::arch::asm;
use core::sync::atomic::{fence, Ordering};

use vshm_freestanding_guest::hw::Hw;

/// The machine (one vCPU, interrupts off, ring 0).
#[derive(Debug)]
pub struct X86;

// An x86-64 guest: addresses are 64 bits, as pointers are.
#[allow(clippy::cast_possible_truncation)]
fn ptr<T>(addr: u64) -> *mut T {
    addr as usize as *mut T
}

impl Hw for X86 {
    fn outb(&mut self, port: u16, value: u8) {
        // SAFETY: port output in ring 0; the ports the guest uses (serial, PCI config, exit)
        // have no effect on memory this program relies on.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
        };
    }

    fn outl(&mut self, port: u16, value: u32) {
        // SAFETY: as `outb`.
        unsafe {
            asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
        };
    }

    fn inl(&mut self, port: u16) -> u32 {
        let v: u32;
        // SAFETY: port input in ring 0 (the PCI configuration data register).
        unsafe {
            asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
        };
        v
    }

    fn read8(&mut self, addr: u64) -> u8 {
        // SAFETY: identity-mapped guest-physical memory or MMIO the device's BARs decode;
        // the driver only passes such addresses (rings, buffers, BAR registers, the window).
        unsafe { ptr::<u8>(addr).read_volatile() }
    }

    fn read16(&mut self, addr: u64) -> u16 {
        // SAFETY: as `read8`; the driver's 16-bit registers and ring fields are aligned.
        unsafe { ptr::<u16>(addr).read_volatile() }
    }

    fn read32(&mut self, addr: u64) -> u32 {
        // SAFETY: as `read16`.
        unsafe { ptr::<u32>(addr).read_volatile() }
    }

    fn read64(&mut self, addr: u64) -> u64 {
        // SAFETY: as `read16` (callers pass 8-byte aligned addresses).
        unsafe { ptr::<u64>(addr).read_volatile() }
    }

    fn write8(&mut self, addr: u64, value: u8) {
        // SAFETY: as `read8`; nothing this program holds a reference to lives there (the
        // rings, buffers and window are outside the image and the stack).
        unsafe { ptr::<u8>(addr).write_volatile(value) }
    }

    fn write16(&mut self, addr: u64, value: u16) {
        // SAFETY: as `write8`, aligned.
        unsafe { ptr::<u16>(addr).write_volatile(value) }
    }

    fn write32(&mut self, addr: u64, value: u32) {
        // SAFETY: as `write16`.
        unsafe { ptr::<u32>(addr).write_volatile(value) }
    }

    fn write64(&mut self, addr: u64, value: u64) {
        // SAFETY: as `write16`.
        unsafe { ptr::<u64>(addr).write_volatile(value) }
    }

    fn write_bytes(&mut self, addr: u64, src: &[u8]) {
        // SAFETY: guest RAM reserved for the driver's buffers (0x200000..0x400000), not
        // overlapping `src` (which lives on the stack or in the image).
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), ptr::<u8>(addr), src.len()) };
        fence(Ordering::SeqCst);
    }

    fn read_bytes(&mut self, addr: u64, dst: &mut [u8]) {
        fence(Ordering::SeqCst);
        // SAFETY: as `write_bytes`, the other way.
        unsafe {
            core::ptr::copy_nonoverlapping(
                ptr::<u8>(addr).cast_const(),
                dst.as_mut_ptr(),
                dst.len(),
            )
        };
    }

    fn fence(&mut self) {
        fence(Ordering::SeqCst);
    }
}
