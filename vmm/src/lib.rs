//! `vshm-vmm`: a minimal KVM VMM on rust-vmm crates (issue 11). It runs a freestanding
//! 64-bit guest: guest RAM from vm-memory (a memfd, so a vhost-user backend can map it), one
//! vCPU put straight into long mode (identity-mapped page tables for the first 8 GiB and a
//! flat GDT set up by the VMM), a flat image or an ELF (linux-loader) at 1 MiB, a serial port
//! that collects what the guest writes to 0x3F8, an exit port (0xF4, as QEMU's
//! isa-debug-exit) through which the guest ends the run with a status, and a PCI bus
//! ([`pci`]) with, when asked, the vshm device ([`vshm_device`]) whose virtio half is vshmd's
//! vhost-user device and whose shared-memory window ([`window`]) shows exactly the sections
//! the guest opened. Without the in-kernel irqchip, HLT exits to user space and ends the run.
//!
//! The guest's contract (where things are) is in guest/freestanding/README.md.

pub mod pci;
pub mod vshm_device;
pub mod window;

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_fpu, kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use pci::{Access, PciBus};
use vshm_device::{Placement, VshmPci};
use window::Window;

/// Where a flat guest's code is loaded and starts; an ELF guest is linked here.
pub const ENTRY: u64 = 0x10_0000;
/// The serial port's data register the guest writes its output to.
pub const SERIAL_PORT: u16 = 0x3F8;
/// The serial port's line status register: always "transmitter empty" here.
pub const SERIAL_LSR: u16 = 0x3FD;
/// A byte written here ends the run with that status (QEMU's isa-debug-exit port).
pub const EXIT_PORT: u16 = 0xF4;
/// Where the VMM puts the guest's argument string (NUL-terminated).
pub const ARGS_ADDR: u64 = 0x7000;
/// The longest argument string, its NUL included.
pub const ARGS_MAX: usize = 4096;
/// Guest-physical addresses below this are identity-mapped for the guest.
pub const IDENTITY_MAPPED: u64 = 8 << 30;
/// The least guest RAM (page tables, arguments, stack and a 1 MiB image).
pub const MIN_RAM: u64 = 4 << 20;
/// The most guest RAM: it must end below the PCI devices' BARs.
pub const MAX_RAM: u64 = 2 << 30;
/// The vshm device's BAR 0 (virtio registers).
pub const VSHM_BAR0: u64 = 0xE000_0000;
/// The vshm device's BAR 4 (the shared-memory window).
pub const VSHM_WINDOW: u64 = 4 << 30;
/// The largest window the layout has room for (up to [`IDENTITY_MAPPED`]).
pub const MAX_WINDOW: u64 = IDENTITY_MAPPED - VSHM_WINDOW;

const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xA000;
const PD: u64 = 0xB000;
const STACK_TOP: u64 = 0x8_0000;
/// KVM slot of guest RAM; the window's slots follow.
const RAM_SLOT: u32 = 0;
const WINDOW_SLOTS: (u32, u32) = (1, 1 + 8192);

/// Why the VMM could not run a guest.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is missing or not usable.
    #[error("cannot use /dev/kvm ({0}); the VMM needs KVM (a Linux host with /dev/kvm readable and writable)")]
    NoKvm(kvm_ioctls::Error),
    /// A KVM call failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Guest RAM out of range.
    #[error(
        "guest RAM of {0} bytes: it must be {MIN_RAM}..={MAX_RAM} bytes (below the PCI devices)"
    )]
    RamSize(u64),
    /// The guest image does not fit.
    #[error("the guest image is {len} bytes; at most {max} fit at {ENTRY:#x}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// What fits.
        max: u64,
    },
    /// An ELF guest linux-loader refused.
    #[error("the guest is not a loadable ELF: {0}")]
    Elf(String),
    /// The argument string is too long or holds a NUL.
    #[error("the guest's arguments are {len} bytes (at most {} without NUL bytes)", ARGS_MAX - 1)]
    Args {
        /// Their length.
        len: usize,
    },
    /// The vshm device.
    #[error(transparent)]
    Device(#[from] vshm_device::DeviceError),
    /// The guest stopped in a way the VMM does not handle.
    #[error("the guest stopped: {0}")]
    Stopped(String),
    /// The guest ran more exits than allowed.
    #[error("the guest did not end within {0} exits")]
    TooLong(u64),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What the guest wrote to the serial port.
    pub serial: Vec<u8>,
    /// The status written to [`EXIT_PORT`], or `None` if it halted.
    pub status: Option<u8>,
    /// Exits to user space the run took.
    pub exits: u64,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "exit status {s}")?,
            None => write!(f, "halted")?,
        }
        write!(f, " after {} exits", self.exits)
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Bytes of RAM from address 0.
    pub mem_size: u64,
    /// vshmd's vhost-user socket: attach the vshm device.
    pub vshm: Option<PathBuf>,
    /// The argument string put at [`ARGS_ADDR`].
    pub args: Vec<u8>,
}

/// A VM with one vCPU in long mode and RAM from address 0.
pub struct Vm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    bus: PciBus,
    vshm_window: Option<Arc<Mutex<Window>>>,
    echo: Option<Box<dyn Write + Send>>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("mem", &self.mem.last_addr())
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

fn failed(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn mem_err(e: impl fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

/// Guest RAM in a memfd (a vhost-user backend maps it through the fd).
fn ram(size: u64) -> Result<GuestMemoryMmap, VmmError> {
    let len = usize::try_from(size).map_err(mem_err)?;
    // SAFETY: memfd_create with a NUL-terminated name; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"vshm-vmm-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(mem_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(mem_err)?;
    GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(mem_err)
}

impl Vm {
    /// Creates the VM and loads `image` (flat 64-bit code) at [`ENTRY`], where it starts.
    pub fn new(mem_size: u64, image: &[u8]) -> Result<Vm, VmmError> {
        let vm = Vm::create(&VmConfig {
            mem_size,
            vshm: None,
            args: Vec::new(),
        })?;
        vm.load_flat(image)?;
        vm.start_at(ENTRY)?;
        Ok(vm)
    }

    /// Creates the VM with its RAM, vCPU, page tables, arguments and devices; load an image
    /// and [`Vm::start_at`] its entry next.
    pub fn create(config: &VmConfig) -> Result<Vm, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(failed("create the VM"))?);
        if config.mem_size < MIN_RAM || config.mem_size > MAX_RAM {
            return Err(VmmError::RamSize(config.mem_size));
        }
        let mem = ram(config.mem_size)?;
        for region in mem.iter() {
            let host = mem.get_host_address(region.start_addr()).map_err(mem_err)? as u64;
            let r = kvm_userspace_memory_region {
                slot: RAM_SLOT,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is mapped for as long as `mem` lives, which outlives the VM
            // (both are fields of the returned `Vm`; the VM fd is closed when the last Arc
            // of it, held by the devices also owned by `Vm`, goes).
            unsafe { vm.set_user_memory_region(r) }.map_err(failed("map guest memory"))?;
        }
        if config.args.len() >= ARGS_MAX || config.args.contains(&0) {
            return Err(VmmError::Args {
                len: config.args.len(),
            });
        }
        let mut args = config.args.clone();
        args.push(0);
        mem.write_slice(&args, GuestAddress(ARGS_ADDR))
            .map_err(mem_err)?;
        let vcpu = vm.create_vcpu(0).map_err(failed("create the vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(failed("read the supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(failed("set CPUID"))?;
        let mut bus = PciBus::new();
        let vshm_window = match &config.vshm {
            Some(path) => {
                let dev = VshmPci::connect(
                    path,
                    Arc::clone(&vm),
                    mem.clone(),
                    Placement {
                        bar0: VSHM_BAR0,
                        bar4: VSHM_WINDOW,
                        slots: WINDOW_SLOTS,
                        ram_end: config.mem_size,
                        max_window: MAX_WINDOW,
                    },
                )?;
                let window = dev.window();
                bus.add(Box::new(dev))
                    .map_err(vshm_device::DeviceError::from)?;
                Some(window)
            }
            None => None,
        };
        let this = Vm {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            mem,
            bus,
            vshm_window,
            echo: None,
        };
        this.page_tables()?;
        Ok(this)
    }

    /// The PCI bus (a test can act as the guest's driver through it).
    pub fn pci(&mut self) -> &mut PciBus {
        &mut self.bus
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Also writes the guest's serial output to `sink` as it comes.
    pub fn echo_serial(&mut self, sink: Box<dyn Write + Send>) {
        self.echo = Some(sink);
    }

    /// The vshm device's window mappings: (window offset, length, writable).
    pub fn vshm_mappings(&self) -> Vec<(u64, u64, bool)> {
        self.vshm_window.as_ref().map_or_else(Vec::new, |w| {
            w.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .mappings()
        })
    }

    /// Where the vshm device's window is placed (`None`: nowhere the guest reaches).
    pub fn vshm_window_base(&self) -> Option<u64> {
        self.vshm_window.as_ref().and_then(|w| {
            w.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .base()
        })
    }

    /// Loads flat code at [`ENTRY`].
    pub fn load_flat(&self, image: &[u8]) -> Result<(), VmmError> {
        let max = self
            .mem
            .last_addr()
            .0
            .saturating_add(1)
            .saturating_sub(ENTRY);
        if image.len() as u64 > max {
            return Err(VmmError::TooLarge {
                len: image.len(),
                max,
            });
        }
        self.mem
            .write_slice(image, GuestAddress(ENTRY))
            .map_err(mem_err)
    }

    /// Loads an ELF executable (linux-loader) and returns its entry point.
    pub fn load_elf(&self, file: &mut File) -> Result<u64, VmmError> {
        let r = Elf::load(&self.mem, None, file, Some(GuestAddress(ENTRY)))
            .map_err(|e| VmmError::Elf(e.to_string()))?;
        Ok(r.kernel_load.0)
    }

    /// Identity-maps the first [`IDENTITY_MAPPED`] bytes with 2 MiB pages and writes a flat
    /// GDT.
    fn page_tables(&self) -> Result<(), VmmError> {
        let m = &self.mem;
        m.write_obj(PDPT | 0x3, GuestAddress(PML4))
            .map_err(mem_err)?;
        for gib in 0..IDENTITY_MAPPED >> 30 {
            let pd = PD + gib * 0x1000;
            m.write_obj(pd | 0x3, GuestAddress(PDPT + gib * 8))
                .map_err(mem_err)?;
            for i in 0..512u64 {
                // Present, writable, 2 MiB page.
                let addr = (gib << 30) | (i << 21);
                m.write_obj(addr | 0x83, GuestAddress(pd + i * 8))
                    .map_err(mem_err)?;
            }
        }
        let gdt: [u64; 3] = [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
        for (i, e) in gdt.iter().enumerate() {
            m.write_obj(*e, GuestAddress(GDT + 8 * i as u64))
                .map_err(mem_err)?;
        }
        Ok(())
    }

    /// Puts the vCPU in 64-bit mode at `entry` with the stack below 0x80000.
    pub fn start_at(&self, entry: u64) -> Result<(), VmmError> {
        let mut sregs = self.vcpu.get_sregs().map_err(failed("read sregs"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector: 8,
            type_: 0xB,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 16,
            type_: 0x3,
            l: 0,
            db: 1,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr3 = PML4;
        // PAE; OSFXSR and OSXMMEXCPT: SSE is part of x86-64, compilers use it freely. (Not
        // on PVM, as on these test machines: there KVM's instruction emulator runs every
        // guest instruction and has no SSE arithmetic, so the freestanding guest is built
        // without SSE; an SSE instruction ends the run with a KVM internal error naming it.)
        sregs.cr4 |= (1 << 5) | (1 << 9) | (1 << 10);
        // PE, MP, ET, NE, WP, PG, as a booted kernel runs; caching on (CD and NW clear: the
        // reset value has them set, and some KVMs emulate rather than run with them), no
        // x87 emulation (EM) and no lazy-FPU trap (TS).
        sregs.cr0 = 0x8005_0033;
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        self.vcpu.set_sregs(&sregs).map_err(failed("set sregs"))?;
        // The x87/SSE state a CPU has after reset (as Firecracker and QEMU set it): KVM's
        // initial one is all zeros on some hosts, and SSE faults with it.
        let fpu = kvm_fpu {
            fcw: 0x37F,
            mxcsr: 0x1F80,
            ..Default::default()
        };
        self.vcpu
            .set_fpu(&fpu)
            .map_err(failed("set the FPU state"))?;
        let regs = kvm_regs {
            rip: entry,
            rsp: STACK_TOP,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(failed("set regs"))
    }

    /// Runs the guest until it writes [`EXIT_PORT`] or halts, at most `max_exits` exits to
    /// user space.
    pub fn run(&mut self, max_exits: u64) -> Result<Outcome, VmmError> {
        let mut out = Outcome {
            serial: Vec::new(),
            status: None,
            exits: 0,
        };
        while out.exits < max_exits {
            out.exits += 1;
            match self.vcpu.run().map_err(failed("run the vCPU"))? {
                VcpuExit::IoOut(SERIAL_PORT, data) => {
                    out.serial.extend_from_slice(data);
                    if let Some(echo) = &mut self.echo {
                        let _ = echo.write_all(data);
                        let _ = echo.flush();
                    }
                }
                VcpuExit::IoOut(EXIT_PORT, data) => {
                    out.status = Some(data.first().copied().unwrap_or(0));
                    return Ok(out);
                }
                VcpuExit::IoIn(SERIAL_LSR, data) => data.fill(0x60),
                VcpuExit::IoOut(port, data) if PciBus::owns_port(port) => {
                    self.bus.pio_write(port, data);
                }
                VcpuExit::IoIn(port, data) if PciBus::owns_port(port) => {
                    self.bus.pio_read(port, data);
                }
                VcpuExit::IoOut(_, _) => {}
                VcpuExit::IoIn(_, data) => data.fill(0xFF),
                VcpuExit::MmioRead(addr, data) => {
                    if !self.bus.mmio(addr, Access::Read(data)) {
                        data.fill(0xFF);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.bus.mmio(addr, Access::Write(data));
                }
                VcpuExit::Hlt => return Ok(out),
                VcpuExit::InternalError => {
                    // SAFETY: after an internal-error exit the union's `internal` member is the
                    // one KVM filled.
                    let i = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal };
                    let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
                    return Err(VmmError::Stopped(format!(
                        "KVM internal error (suberror {}, data {:x?}) at rip {rip:#x}",
                        i.suberror,
                        &i.data[..usize::try_from(i.ndata).unwrap_or(0).min(i.data.len())]
                    )));
                }
                other => {
                    let what = format!("{other:?}");
                    let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
                    return Err(VmmError::Stopped(format!("{what} at rip {rip:#x}")));
                }
            }
        }
        Err(VmmError::TooLong(max_exits))
    }
}
