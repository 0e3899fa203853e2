//! The guest's first serial port, COM1 at 0x3F8–0x3FF: vm-superio's 16550A model, so a
//! guest that polls the line status register before each byte (the Linux decompressor,
//! earlyprintk, the 8250 console driver) sees a transmitter that is always ready. What the
//! guest transmits is collected (a run's `serial` bytes) and, if asked, written to stdout as
//! it comes.

use std::fmt;
use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// The first port of COM1.
pub const COM1: u16 = 0x3F8;
/// How many ports COM1 decodes (0x3F8..0x400).
pub const COM1_PORTS: u16 = 8;
/// COM1's interrupt line (ISA IRQ 4).
pub const COM1_IRQ: u32 = 4;

/// Raises the serial interrupt: an eventfd registered as KVM irqfd on [`COM1_IRQ`] when the
/// VM has an in-kernel irqchip, nothing otherwise (a freestanding guest polls).
#[derive(Debug)]
pub struct Irq(Option<EventFd>);

impl Irq {
    /// No interrupt line.
    pub fn none() -> Irq {
        Irq(None)
    }

    /// The interrupt is signalled on `fd`.
    pub fn eventfd(fd: EventFd) -> Irq {
        Irq(Some(fd))
    }
}

impl Trigger for Irq {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// Where the transmitted bytes go: kept, and streamed to stdout if `live`.
#[derive(Debug, Default)]
pub struct Console {
    /// Everything the guest transmitted.
    pub bytes: Vec<u8>,
    /// Also write each byte to stdout as it comes.
    pub live: bool,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes.extend_from_slice(buf);
        if self.live {
            // A closed stdout must not stop the guest: the bytes are kept regardless.
            let mut out = io::stdout().lock();
            let _ = out.write_all(buf).and_then(|()| out.flush());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1 as the VMM's port I/O sees it.
pub struct Com1 {
    uart: Serial<Irq, vm_superio::serial::NoEvents, Console>,
}

impl fmt::Debug for Com1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Com1")
            .field("transmitted", &self.uart.writer().bytes.len())
            .finish_non_exhaustive()
    }
}

impl Com1 {
    /// A 16550A raising `irq`, its output streamed to stdout if `live`.
    pub fn new(irq: Irq, live: bool) -> Com1 {
        Com1 {
            uart: Serial::new(
                irq,
                Console {
                    bytes: Vec::new(),
                    live,
                },
            ),
        }
    }

    /// Whether `port` is one of COM1's.
    pub fn decodes(port: u16) -> bool {
        (COM1..COM1 + COM1_PORTS).contains(&port)
    }

    /// The offset of `port` from [`COM1`] (`port` must be one [`Com1::decodes`]).
    fn offset(port: u16) -> u8 {
        u8::try_from(port.wrapping_sub(COM1)).unwrap_or(u8::MAX)
    }

    /// An `out` to `port`: each byte goes to the register it addresses (a wider access covers
    /// the following registers, as on the ISA bus).
    pub fn port_write(&mut self, port: u16, data: &[u8]) {
        for (p, b) in (0u16..).map(|i| port.wrapping_add(i)).zip(data) {
            if Self::decodes(p) {
                // The only errors are the interrupt's eventfd or the writer failing; the
                // writer never does, and a lost interrupt is not worth stopping the guest.
                let _ = self.uart.write(Self::offset(p), *b);
            }
        }
    }

    /// An `in` from `port`.
    pub fn port_read(&mut self, port: u16, data: &mut [u8]) {
        for (p, b) in (0u16..).map(|i| port.wrapping_add(i)).zip(data.iter_mut()) {
            *b = if Self::decodes(p) {
                self.uart.read(Self::offset(p))
            } else {
                0xFF
            };
        }
    }

    /// Streams the transmitted bytes to stdout as they come, or stops.
    pub fn set_live(&mut self, live: bool) {
        self.uart.writer_mut().live = live;
    }

    /// Everything transmitted so far.
    pub fn output(&self) -> &[u8] {
        &self.uart.writer().bytes
    }

    /// Takes the transmitted bytes, leaving none.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.uart.writer_mut().bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_the_data_register_are_collected_and_the_transmitter_reads_as_empty() {
        let mut com = Com1::new(Irq::none(), false);
        com.port_write(COM1, b"H");
        com.port_write(COM1, b"i");
        assert_eq!(com.output(), b"Hi");
        let mut lsr = [0u8];
        com.port_read(COM1 + 5, &mut lsr);
        // THRE and TEMT: the Linux decompressor waits for THRE before each byte.
        assert_eq!(lsr[0] & 0x60, 0x60, "LSR {:#x}", lsr[0]);
        assert_eq!(com.take_output(), b"Hi");
        assert!(com.output().is_empty());
    }

    #[test]
    fn the_divisor_latch_takes_writes_to_the_data_port_while_dlab_is_set() {
        let mut com = Com1::new(Irq::none(), false);
        // LCR: DLAB on, divisor 1 (115200 baud), DLAB off, 8N1 — what earlyprintk does.
        com.port_write(COM1 + 3, &[0x83]);
        com.port_write(COM1, &[1]);
        com.port_write(COM1 + 1, &[0]);
        com.port_write(COM1 + 3, &[0x03]);
        assert!(com.output().is_empty());
        com.port_write(COM1, b"x");
        assert_eq!(com.output(), b"x");
        let mut other = [0u8; 2];
        com.port_read(COM1 + COM1_PORTS, &mut other);
        assert_eq!(
            other,
            [0xFF, 0xFF],
            "ports past COM1 read as a floating bus"
        );
    }
}
