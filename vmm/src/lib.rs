//! `vshm-vmm`: a minimal KVM VMM on rust-vmm crates (issue 11, in progress). It runs either
//!
//! - a **freestanding 64-bit guest** ([`Vm::new`]): guest RAM from vm-memory, one vCPU put
//!   straight into long mode (identity-mapped page tables and a flat GDT set up by the VMM),
//!   COM1, and an exit port (0xF4, as QEMU's isa-debug-exit) through which the guest ends
//!   the run with a status. With the in-kernel irqchip absent, HLT exits to user space too
//!   and ends the run; or
//! - a **Linux bzImage** ([`Vm::linux`], [`linux`]): loaded by linux-loader, started at its
//!   64-bit entry with a zero page, an in-kernel irqchip and PIT.
//!
//! In both, COM1 is vm-superio's 16550A ([`serial`]); what the guest transmits is the run's
//! serial output, optionally streamed to stdout as it comes. A run ends at the exit port,
//! a HLT (freestanding), a reset (Linux's `reboot=k`), when the serial output contains a
//! given string, or at a deadline (the vCPU is kicked out of KVM_RUN by a signal, so a guest
//! that never exits — a decompressor crunching, a halted kernel — still ends on time).
//!
//! A freestanding guest may have a PCI bus ([`pci`]) with the vshm device
//! ([`vshm_device`]): a virtio-pci function whose virtio half is vshmd's vhost-user device
//! and whose shared-memory window ([`window`]) shows exactly the sections the guest opened.
//! Guest RAM is a memfd (a vhost-user backend maps it through the fd); the first 8 GiB of
//! guest-physical addresses are identity-mapped; ELF guests are loaded by linux-loader; an
//! argument string waits at [`ARGS_ADDR`]. The guest's side of that contract is
//! guest/freestanding/README.md. Still to come: the ivshmem device model.

use std::fmt;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_regs, kvm_segment, kvm_userspace_memory_region,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub mod ivshmem;
pub mod linux;
pub mod pci;
pub mod serial;
pub mod vshm_device;
pub mod window;

use ivshmem::IvshmemPci;
pub use linux::LinuxConfig;
use pci::{Access, PciBus};
use serial::{Com1, Irq};
use vshm_device::{Placement, VshmPci};
use window::Window;

/// Where the freestanding guest's code is loaded and starts.
pub const ENTRY: u64 = 0x10_0000;
/// The serial port's data register the guest writes its output to.
pub const SERIAL_PORT: u16 = serial::COM1;
/// A byte written here ends the run with that status (QEMU's isa-debug-exit port).
pub const EXIT_PORT: u16 = 0xF4;
/// The keyboard controller's command port: 0xFE written here resets the machine (Linux's
/// `reboot=k`, which `panic=-1` ends in).
pub const KBD_COMMAND_PORT: u16 = 0x64;
/// The most RAM a VM gets: it ends below the PCI devices' BARs.
pub const MAX_MEM: u64 = 1 << 30;
/// Where the VMM puts a freestanding guest's argument string (NUL-terminated).
pub const ARGS_ADDR: u64 = 0x7000;
/// The longest argument string, its NUL included.
pub const ARGS_MAX: usize = 4096;
/// Guest-physical addresses below this are identity-mapped (2 MiB pages).
pub const IDENTITY_MAPPED: u64 = 8 << 30;
/// The vshm device's BAR 0 (virtio registers).
pub const VSHM_BAR0: u64 = 0xE000_0000;
/// The vshm device's BAR 4 (the shared-memory window).
pub const VSHM_WINDOW: u64 = 4 << 30;
/// The largest window the layout has room for (up to [`IDENTITY_MAPPED`]).
pub const MAX_WINDOW: u64 = IDENTITY_MAPPED - VSHM_WINDOW;
/// The ivshmem device's BAR 0 (its registers).
pub const IVSHMEM_BAR0: u64 = 0xE000_4000;
/// The ivshmem device's BAR 2 (the region), between RAM and the 32-bit BARs.
pub const IVSHMEM_REGION: u64 = 2 << 30;
/// The largest region the layout has room for at [`IVSHMEM_REGION`].
pub const MAX_IVSHMEM_REGION: u64 = 1 << 30;
/// KVM slot of guest RAM; the window's slots follow, then the ivshmem region's.
const RAM_SLOT: u32 = 0;
const WINDOW_SLOTS: (u32, u32) = (1, 1 + 8192);

const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xA000;
const PD: u64 = 0xB000;
const STACK_TOP: u64 = 0x8_0000;
/// The code and data selectors: 0x10 and 0x18, Linux's `__BOOT_CS` and `__BOOT_DS`, which
/// its 64-bit boot protocol requires (a freestanding guest does not care).
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
/// Null, unused, 64-bit code ([`CODE_SELECTOR`]), flat data ([`DATA_SELECTOR`]).
const GDT_ENTRIES: [u64; 4] = [0, 0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
/// Where KVM puts the TSS it needs on Intel (the three pages below the BIOS ROM, as QEMU and
/// Firecracker do).
const TSS_ADDRESS: usize = 0xFFFB_D000;

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
    /// The guest image does not fit.
    #[error("the guest image is {len} bytes; at most {max} fit at {ENTRY:#x}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// What fits.
        max: u64,
    },
    /// Guest RAM outside what the VMM supports.
    #[error("{size} bytes of guest RAM: the VMM maps at most {MAX_MEM} (1 GiB) and needs at least 2 MiB")]
    BadMemorySize {
        /// The size asked for.
        size: u64,
    },
    /// A kernel or initrd file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    ReadFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel is not a bzImage this VMM can start.
    #[error("{} is not a bzImage this VMM can boot: {reason}", path.display())]
    NotBzImage {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The initrd does not fit in RAM above the kernel.
    #[error("the initrd {} is {size} bytes; only {max} fit in RAM above the kernel (give more --mem-mib)", path.display())]
    InitrdTooLarge {
        /// The file.
        path: std::path::PathBuf,
        /// Its size.
        size: u64,
        /// The room there is.
        max: u64,
    },
    /// RAM too small for the kernel.
    #[error("the kernel needs {need} bytes of RAM, the VM has {have} (give more --mem-mib)")]
    MemoryTooSmall {
        /// What the kernel needs (up to the end of its decompression buffer).
        need: u64,
        /// The VM's RAM.
        have: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length.
        len: u64,
        /// The kernel's `cmdline_size`.
        max: u64,
    },
    /// The command line is not one linux-loader accepts.
    #[error("the kernel command line {cmdline:?} is invalid: {reason}")]
    BadCmdline {
        /// The command line.
        cmdline: String,
        /// Why.
        reason: String,
    },
    /// The guest stopped in a way the VMM does not handle.
    #[error("the guest stopped: {0}")]
    Stopped(String),
    /// The guest ran more exits than allowed.
    #[error("the guest did not end within {0} exits")]
    TooLong(u64),
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
    /// The ivshmem device.
    #[error(transparent)]
    Ivshmem(#[from] ivshmem::IvshmemError),
}

/// A freestanding guest's machine.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Bytes of RAM from address 0.
    pub mem_size: u64,
    /// vshmd's vhost-user socket: attach the vshm device.
    pub vshm: Option<PathBuf>,
    /// The argument string put at [`ARGS_ADDR`].
    pub args: Vec<u8>,
    /// vshmd's ivshmem socket: attach the ivshmem-doorbell device.
    pub ivshmem: Option<PathBuf>,
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The guest wrote this status to [`EXIT_PORT`].
    ExitPort(u8),
    /// The guest halted (only without the in-kernel irqchip: the freestanding mode).
    Halted,
    /// The guest reset the machine through the keyboard controller.
    Reset,
    /// The serial output came to contain [`RunLimits::until`].
    Matched,
    /// [`RunLimits::timeout`] passed first.
    TimedOut,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What the guest wrote to the serial port.
    pub serial: Vec<u8>,
    /// The status written to [`EXIT_PORT`], or `None` if the run ended otherwise.
    pub status: Option<u8>,
    /// Why the run ended.
    pub ended: Ended,
    /// Exits to user space the run took.
    pub exits: u64,
    /// The vCPU's RIP when the run ended.
    pub rip: u64,
    /// How long the run took.
    pub elapsed: Duration,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ended {
            Ended::ExitPort(s) => write!(f, "exit status {s}")?,
            Ended::Halted => write!(f, "halted")?,
            Ended::Reset => write!(f, "reset the machine")?,
            Ended::Matched => write!(f, "printed the awaited text")?,
            Ended::TimedOut => write!(f, "timed out")?,
        }
        write!(
            f,
            " after {:.1} s, {} exits, {} serial bytes, RIP {:#x}",
            self.elapsed.as_secs_f64(),
            self.exits,
            self.serial.len(),
            self.rip
        )
    }
}

/// When a run ends besides the guest ending it.
#[derive(Debug, Clone, Default)]
pub struct RunLimits {
    /// Most exits to user space (past it: [`VmmError::TooLong`]).
    pub max_exits: Option<u64>,
    /// Longest run (past it: [`Ended::TimedOut`]).
    pub timeout: Option<Duration>,
    /// End as soon as the serial output contains this ([`Ended::Matched`]).
    pub until: Option<Vec<u8>>,
}

/// A VM with one vCPU in long mode and `mem_size` bytes of RAM from address 0.
pub struct Vm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    com1: Com1,
    bus: PciBus,
    vshm_window: Option<Arc<Mutex<Window>>>,
    ivshmem_id: Option<u16>,
    /// Whether the in-kernel irqchip exists (then HLT does not exit to user space).
    irqchip: bool,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("mem", &self.mem.last_addr())
            .field("com1", &self.com1)
            .field("irqchip", &self.irqchip)
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

/// Whether /dev/kvm can be opened for reading and writing (what the VMM needs).
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// For tests: whether a test that needs KVM can run here. Where /dev/kvm is not usable it
/// says so and returns false, except under CI (`CI` set), whose machines have /dev/kvm: there
/// it panics, so a test that must run cannot silently skip.
pub fn kvm_or_skip() -> bool {
    if kvm_usable() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI machines have /dev/kvm: this test must run there"
    );
    eprintln!("skipped: /dev/kvm is not usable here");
    false
}

fn failed(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

pub(crate) fn mem_err(e: impl fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

/// Guest RAM of `mem_size` bytes from address 0, in a memfd (a vhost-user backend maps it
/// through the fd).
fn guest_ram(mem_size: u64) -> Result<GuestMemoryMmap, VmmError> {
    if !(2 << 20..=MAX_MEM).contains(&mem_size) {
        return Err(VmmError::BadMemorySize { size: mem_size });
    }
    let len = usize::try_from(mem_size).map_err(mem_err)?;
    // SAFETY: memfd_create with a NUL-terminated name; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"vshm-vmm-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(mem_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_size).map_err(mem_err)?;
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
        let vm = Vm::freestanding(&VmConfig {
            mem_size,
            vshm: None,
            args: Vec::new(),
            ivshmem: None,
        })?;
        vm.load_flat(image)?;
        vm.start_at(ENTRY)?;
        Ok(vm)
    }

    /// Creates a VM for a freestanding guest, with its arguments and devices; load an image
    /// ([`Vm::load_flat`], [`Vm::load_elf`]) and [`Vm::start_at`] its entry next.
    pub fn freestanding(config: &VmConfig) -> Result<Vm, VmmError> {
        let mem = guest_ram(config.mem_size)?;
        if config.args.len() >= ARGS_MAX || config.args.contains(&0) {
            return Err(VmmError::Args {
                len: config.args.len(),
            });
        }
        let mut args = config.args.clone();
        args.push(0);
        mem.write_slice(&args, GuestAddress(ARGS_ADDR))
            .map_err(mem_err)?;
        // No in-kernel irqchip: the freestanding guest polls and reports through ports, and
        // without the irqchip its HLT exits to user space, so a guest that halts ends the run
        // instead of sleeping in the kernel for an interrupt that never comes.
        let mut this = Vm::create(mem, false)?;
        if let Some(path) = &config.vshm {
            let dev = VshmPci::connect(
                path,
                Arc::clone(&this._vm),
                this.mem.clone(),
                Placement {
                    bar0: VSHM_BAR0,
                    bar4: VSHM_WINDOW,
                    slots: WINDOW_SLOTS,
                    ram_end: config.mem_size,
                    max_window: MAX_WINDOW,
                },
            )?;
            this.vshm_window = Some(dev.window());
            this.bus
                .add(Box::new(dev))
                .map_err(vshm_device::DeviceError::from)?;
        }
        if let Some(path) = &config.ivshmem {
            let dev = IvshmemPci::connect(
                path,
                Arc::clone(&this._vm),
                ivshmem::Placement {
                    bar0: IVSHMEM_BAR0,
                    bar2: IVSHMEM_REGION,
                    max_region: MAX_IVSHMEM_REGION,
                    slot: WINDOW_SLOTS.1,
                    ram_end: config.mem_size,
                },
            )?;
            this.ivshmem_id = Some(dev.peer_id());
            this.bus
                .add(Box::new(dev))
                .map_err(ivshmem::IvshmemError::from)?;
        }
        Ok(this)
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

    /// Puts the vCPU in 64-bit mode at `entry`, the stack below 0x80000.
    pub fn start_at(&self, entry: u64) -> Result<(), VmmError> {
        self.long_mode(entry, 0)
    }

    /// The PCI bus (a test can act as the guest's driver through it).
    pub fn pci(&mut self) -> &mut PciBus {
        &mut self.bus
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The vshm device's window mappings: (window offset, length, writable).
    pub fn vshm_mappings(&self) -> Vec<(u64, u64, bool)> {
        self.vshm_window.as_ref().map_or_else(Vec::new, |w| {
            w.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .mappings()
        })
    }

    /// The ivshmem device's peer id in vshmd's region (its IVPosition), if attached.
    pub fn ivshmem_peer_id(&self) -> Option<u16> {
        self.ivshmem_id
    }

    /// Where the vshm device's window is placed (`None`: nowhere the guest reaches).
    pub fn vshm_window_base(&self) -> Option<u64> {
        self.vshm_window.as_ref().and_then(|w| {
            w.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .base()
        })
    }

    /// Creates the VM and loads the kernel, command line and initrd of `cfg`, ready to run
    /// from the kernel's 64-bit entry point.
    pub fn linux(cfg: &LinuxConfig) -> Result<Vm, VmmError> {
        let mem = guest_ram(cfg.mem_size)?;
        let loaded = linux::load(&mem, cfg)?;
        let this = Vm::create(mem, true)?;
        this.long_mode(loaded.entry, loaded.zero_page)?;
        Ok(this)
    }

    fn create(mem: GuestMemoryMmap, irqchip: bool) -> Result<Vm, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = Arc::new(kvm.create_vm().map_err(failed("create the VM"))?);
        for (slot, region) in (RAM_SLOT..).zip(mem.iter()) {
            let host = mem.get_host_address(region.start_addr()).map_err(mem_err)? as u64;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is mapped for as long as `mem` lives, which outlives the VM
            // (the guest memory's regions are reference-counted; the devices holding the VM
            // fd are owned by the `Vm` too).
            unsafe { vm.set_user_memory_region(r) }.map_err(failed("map guest memory"))?;
        }
        let irq = if irqchip {
            // A kernel needs interrupts (the timer above all): the in-kernel PIC, IOAPIC and
            // local APIC, and the PIT (with port 0x61's speaker bits answered in the kernel).
            vm.set_tss_address(TSS_ADDRESS)
                .map_err(failed("set the TSS address"))?;
            vm.create_irq_chip()
                .map_err(failed("create the in-kernel irqchip"))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit).map_err(failed("create the PIT"))?;
            let fd = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmmError::Stopped(format!("cannot create an eventfd: {e}")))?;
            vm.register_irqfd(&fd, serial::COM1_IRQ)
                .map_err(failed("wire COM1's interrupt"))?;
            Irq::eventfd(fd)
        } else {
            Irq::none()
        };
        let vcpu = vm.create_vcpu(0).map_err(failed("create the vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(failed("read the supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(failed("set CPUID"))?;
        if irqchip {
            set_lint(&vcpu)?;
        }
        let this = Vm {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            mem,
            com1: Com1::new(irq, false),
            bus: PciBus::new(),
            vshm_window: None,
            ivshmem_id: None,
            irqchip,
        };
        this.page_tables()?;
        Ok(this)
    }

    /// Streams what the guest transmits on COM1 to stdout as it comes (it is collected in
    /// [`Outcome::serial`] either way).
    pub fn stream_serial(&mut self, live: bool) {
        self.com1.set_live(live);
    }

    /// Identity-maps the first [`IDENTITY_MAPPED`] bytes with 2 MiB pages (eight page
    /// directories from 0xB000) and writes a flat GDT.
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
        // Null, unused, 64-bit code (0x10), flat data (0x18).
        for (i, e) in GDT_ENTRIES.iter().enumerate() {
            m.write_obj(*e, GuestAddress(GDT + 8 * i as u64))
                .map_err(mem_err)?;
        }
        Ok(())
    }

    /// Puts the vCPU in 64-bit mode at `entry`, interrupts off, with RSI = `rsi` (the zero
    /// page for Linux), on the page tables and GDT of [`Vm::page_tables`].
    fn long_mode(&self, entry: u64, rsi: u64) -> Result<(), VmmError> {
        let mut sregs = self.vcpu.get_sregs().map_err(failed("read sregs"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xFFFF_FFFF,
            selector: CODE_SELECTOR,
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
            selector: DATA_SELECTOR,
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
        sregs.gdt.limit = u16::try_from(GDT_ENTRIES.len() * 8 - 1).unwrap_or(u16::MAX);
        sregs.cr3 = PML4;
        // PAE; OSFXSR and OSXMMEXCPT: SSE is part of x86-64, compilers use it freely. (Not
        // on PVM, as on these test machines: there KVM's instruction emulator runs every
        // guest instruction and has no SSE arithmetic, so the freestanding guest is built
        // without SSE; an SSE instruction ends the run with a KVM internal error naming it.)
        sregs.cr4 |= (1 << 5) | (1 << 9) | (1 << 10);
        // PE, MP, ET, NE, WP, PG, as a booted kernel runs: caching on (the reset value has
        // CD and NW set), no x87 emulation (EM), no lazy-FPU trap (TS).
        sregs.cr0 = 0x8005_0033;
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        self.vcpu.set_sregs(&sregs).map_err(failed("set sregs"))?;
        // The x87/SSE state a CPU has after reset (as Firecracker and QEMU set it).
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
            rsi,
            rsp: STACK_TOP,
            rflags: 2, // IF clear
            ..Default::default()
        };
        self.vcpu.set_regs(&regs).map_err(failed("set regs"))
    }

    /// Runs the guest until it writes [`EXIT_PORT`] or halts, at most `max_exits` exits to
    /// user space.
    pub fn run(&mut self, max_exits: u64) -> Result<Outcome, VmmError> {
        self.run_with(&RunLimits {
            max_exits: Some(max_exits),
            ..Default::default()
        })
    }

    /// Runs the guest until it ends the run or one of `limits` does.
    pub fn run_with(&mut self, limits: &RunLimits) -> Result<Outcome, VmmError> {
        let start = Instant::now();
        let kicker = limits.timeout.map(Kicker::start).transpose()?;
        let mut exits = 0u64;
        let until = limits.until.as_deref().filter(|u| !u.is_empty());
        let mut searched = 0usize;
        // Every exit on stderr, with the time since the start (for measuring how far a guest
        // gets; see vmm/README.md).
        let trace = std::env::var_os("VSHM_VMM_TRACE_EXITS").is_some();
        let ended = loop {
            if kicker.as_ref().is_some_and(Kicker::fired) {
                break Ended::TimedOut;
            }
            if let Some(max) = limits.max_exits {
                if exits >= max {
                    return Err(VmmError::TooLong(max));
                }
            }
            let exit = match self.vcpu.run() {
                Ok(exit) => exit,
                // The kicker's signal: look at the deadline again.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => return Err(failed("run the vCPU")(e)),
            };
            exits += 1;
            if trace {
                eprintln!("exit {exits} at {:?}: {exit:?}", start.elapsed());
            }
            match exit {
                VcpuExit::IoOut(EXIT_PORT, data) => {
                    break Ended::ExitPort(data.first().copied().unwrap_or(0))
                }
                VcpuExit::IoOut(KBD_COMMAND_PORT, [0xFE, ..]) => break Ended::Reset,
                VcpuExit::IoOut(port, data) if Com1::decodes(port) => {
                    self.com1.port_write(port, data);
                    if let Some(u) = until {
                        let out = self.com1.output();
                        // Only the new bytes and the tail before them can complete a match.
                        let from = searched.saturating_sub(u.len() - 1);
                        if out[from..].windows(u.len()).any(|w| w == u) {
                            break Ended::Matched;
                        }
                        searched = out.len();
                    }
                }
                VcpuExit::IoOut(port, data) if PciBus::owns_port(port) => {
                    self.bus.pio_write(port, data);
                }
                VcpuExit::IoIn(port, data) if PciBus::owns_port(port) => {
                    self.bus.pio_read(port, data);
                }
                VcpuExit::IoIn(port, data) => self.com1.port_read(port, data),
                VcpuExit::IoOut(_, _) => {}
                // A device's BAR, or nothing: reads see a floating bus, writes are dropped.
                VcpuExit::MmioRead(addr, data) => {
                    if !self.bus.mmio(addr, Access::Read(data)) {
                        data.fill(0xFF);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    self.bus.mmio(addr, Access::Write(data));
                }
                VcpuExit::Hlt => break Ended::Halted,
                VcpuExit::InternalError => {
                    return Err(VmmError::Stopped(self.internal_error(exits, start)))
                }
                other => {
                    let what = format!("{other:?}");
                    let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
                    return Err(VmmError::Stopped(format!("{what} at rip {rip:#x}")));
                }
            }
        };
        drop(kicker);
        let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
        Ok(Outcome {
            serial: self.com1.take_output(),
            status: match ended {
                Ended::ExitPort(s) => Some(s),
                _ => None,
            },
            ended,
            exits,
            rip,
            elapsed: start.elapsed(),
        })
    }
}

impl Vm {
    /// Describes a KVM internal error: its sub-error and data, where the vCPU was, and when.
    fn internal_error(&mut self, exits: u64, start: Instant) -> String {
        let rip = self.vcpu.get_regs().map_or(0, |r| r.rip);
        let run = self.vcpu.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union's
        // field the kernel filled.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = usize::try_from(internal.ndata)
            .unwrap_or(0)
            .min(internal.data.len());
        format!(
            "KVM internal error (suberror {}, data {:x?}) at RIP {rip:#x} after {exits} exits, {:.1} s",
            internal.suberror,
            &internal.data[..n],
            start.elapsed().as_secs_f64()
        )
    }
}

/// Sets the local APIC's LINT0 to ExtINT (the PIC's interrupts) and LINT1 to NMI, as a PC
/// BIOS leaves them: Linux expects "virtual wire" mode when it finds no MP table.
fn set_lint(vcpu: &VcpuFd) -> Result<(), VmmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const EXTINT: u32 = 7;
    const NMI: u32 = 4;
    let mut lapic = vcpu.get_lapic().map_err(failed("read the local APIC"))?;
    for (reg, mode) in [(APIC_LVT0, EXTINT), (APIC_LVT1, NMI)] {
        let bytes = lapic.regs.get_mut(reg..reg + 4).ok_or_else(|| {
            VmmError::Memory("the local APIC state is shorter than expected".into())
        })?;
        let mut raw = [0u8; 4];
        for (d, s) in raw.iter_mut().zip(bytes.iter()) {
            *d = *s as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (d, s) in bytes.iter_mut().zip(v.to_le_bytes()) {
            *d = s as libc::c_char;
        }
    }
    vcpu.set_lapic(&lapic).map_err(failed("set the local APIC"))
}

/// The signal that kicks the vCPU thread out of KVM_RUN (its handler does nothing: the
/// interrupted ioctl returning EINTR is the point).
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Ends a run at its deadline: a thread that, once the deadline passes, marks it passed and
/// signals the vCPU's thread until the run loop has seen it (a signal that arrives between
/// the loop's check and KVM_RUN would be lost, hence the repeats).
struct Kicker {
    fired: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Kicker {
    fn start(timeout: Duration) -> Result<Kicker, VmmError> {
        static HANDLER: OnceLock<Result<(), String>> = OnceLock::new();
        HANDLER
            .get_or_init(|| {
                vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(|e| VmmError::Stopped(format!("cannot install the kick signal: {e}")))?;
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let fired = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicBool::new(false));
        let (f, d) = (fired.clone(), done.clone());
        let deadline = Instant::now() + timeout;
        let thread = std::thread::Builder::new()
            .name("vcpu-kicker".into())
            .spawn(move || {
                while !d.load(Ordering::Acquire) {
                    let now = Instant::now();
                    if now < deadline {
                        std::thread::park_timeout(deadline - now);
                        continue;
                    }
                    f.store(true, Ordering::Release);
                    // SAFETY: `target` is the thread running the vCPU loop, alive until it has
                    // set `done` and joined this thread (Kicker's drop); the signal has a
                    // handler (installed above), so it only interrupts a blocking call.
                    unsafe { libc::pthread_kill(target, kick_signal()) };
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .map_err(|e| VmmError::Stopped(format!("cannot start the kicker thread: {e}")))?;
        Ok(Kicker {
            fired,
            done,
            thread: Some(thread),
        })
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
