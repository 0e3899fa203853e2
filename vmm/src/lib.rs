//! `vshm-vmm`: a minimal KVM VMM on rust-vmm crates (issue 11, in progress). This first
//! step runs a freestanding 64-bit guest: guest RAM from vm-memory, one vCPU put straight
//! into long mode (identity-mapped page tables and a flat GDT set up by the VMM), a serial
//! port that collects what the guest writes to 0x3F8, and an exit port (0xF4, as QEMU's
//! isa-debug-exit) through which the guest ends the run with a status. With the in-kernel
//! irqchip absent, HLT exits to user space too and ends the run.
//!
//! Still to come (docs/VHOST-USER.md): the PCI host bridge, the virtio-pci frontend of the
//! vshm device with its shared-memory BAR, the ivshmem device model, bzImage boot.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Where the guest's code is loaded and starts.
pub const ENTRY: u64 = 0x10_0000;
/// The serial port's data register the guest writes its output to.
pub const SERIAL_PORT: u16 = 0x3F8;
/// A byte written here ends the run with that status (QEMU's isa-debug-exit port).
pub const EXIT_PORT: u16 = 0xF4;

const GDT: u64 = 0x500;
const PML4: u64 = 0x9000;
const PDPT: u64 = 0xA000;
const PD: u64 = 0xB000;
const STACK_TOP: u64 = 0x8_0000;

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

/// A VM with one vCPU in long mode and `mem_size` bytes of RAM from address 0.
pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("mem", &self.mem.last_addr())
            .finish_non_exhaustive()
    }
}

fn failed(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

fn mem_err(e: impl fmt::Display) -> VmmError {
    VmmError::Memory(e.to_string())
}

impl Vm {
    /// Creates the VM and loads `image` (flat 64-bit code) at [`ENTRY`], where it starts.
    pub fn new(mem_size: u64, image: &[u8]) -> Result<Vm, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::NoKvm)?;
        let vm = kvm.create_vm().map_err(failed("create the VM"))?;
        let len = usize::try_from(mem_size).map_err(mem_err)?;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), len)]).map_err(mem_err)?;
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host = mem.get_host_address(region.start_addr()).map_err(mem_err)? as u64;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
            };
            // SAFETY: the region is mapped for as long as `mem` lives, which outlives the VM
            // (both are fields of the returned `Vm`, `mem` dropped last).
            unsafe { vm.set_user_memory_region(r) }.map_err(failed("map guest memory"))?;
        }
        let max = mem_size.saturating_sub(ENTRY);
        if image.len() as u64 > max {
            return Err(VmmError::TooLarge {
                len: image.len(),
                max,
            });
        }
        mem.write_slice(image, GuestAddress(ENTRY))
            .map_err(mem_err)?;
        let vcpu = vm.create_vcpu(0).map_err(failed("create the vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(failed("read the supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(failed("set CPUID"))?;
        let this = Vm {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            mem,
        };
        this.long_mode()?;
        Ok(this)
    }

    /// Identity-maps the first GiB with 2 MiB pages, loads a flat GDT and puts the vCPU in
    /// 64-bit mode at [`ENTRY`].
    fn long_mode(&self) -> Result<(), VmmError> {
        let m = &self.mem;
        m.write_obj(PDPT | 0x3, GuestAddress(PML4))
            .map_err(mem_err)?;
        m.write_obj(PD | 0x3, GuestAddress(PDPT)).map_err(mem_err)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            m.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
                .map_err(mem_err)?;
        }
        let gdt: [u64; 3] = [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
        for (i, e) in gdt.iter().enumerate() {
            m.write_obj(*e, GuestAddress(GDT + 8 * i as u64))
                .map_err(mem_err)?;
        }
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
        sregs.gdt.limit = u16::try_from(gdt.len() * 8 - 1).unwrap_or(u16::MAX);
        sregs.cr3 = PML4;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.cr0 |= 1 | (1 << 31); // PE, PG
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        self.vcpu.set_sregs(&sregs).map_err(failed("set sregs"))?;
        let regs = kvm_regs {
            rip: ENTRY,
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
                VcpuExit::IoOut(SERIAL_PORT, data) => out.serial.extend_from_slice(data),
                VcpuExit::IoOut(EXIT_PORT, data) => {
                    out.status = Some(data.first().copied().unwrap_or(0));
                    return Ok(out);
                }
                VcpuExit::IoOut(_, _) | VcpuExit::IoIn(_, _) => {}
                VcpuExit::Hlt => return Ok(out),
                other => return Err(VmmError::Stopped(format!("{other:?}"))),
            }
        }
        Err(VmmError::TooLong(max_exits))
    }
}
