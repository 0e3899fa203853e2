//! `vshm-vmm --guest FILE [--vshm SOCKET] [--args TEXT]`: runs a freestanding 64-bit guest
//! (an ELF linked at 1 MiB, or flat code loaded there) on KVM, optionally with the vshm
//! device attached to vshmd's vhost-user socket, streams what it writes to the serial port,
//! and exits with the status it wrote to port 0xF4. `vshm-vmm --kernel bzImage [--initrd FILE] [--cmdline …]`: boots Linux, its
//! console streamed to stdout (docs/VHOST-USER.md; issue 11, in progress).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use vshm_vmm::linux::DEFAULT_CMDLINE;
use vshm_vmm::{Ended, LinuxConfig, RunLimits, Vm, VmConfig, ENTRY};

/// The exit status when `--timeout-secs` ends the run (as timeout(1)).
const TIMED_OUT: u8 = 124;

/// Runs a freestanding guest or a Linux kernel on KVM.
#[derive(Parser, Debug)]
#[command(version)]
#[command(group(ArgGroup::new("what").required(true).args(["guest", "kernel"])))]
struct Args {
    /// A freestanding guest: an ELF executable, or flat 64-bit code loaded and started at
    /// 0x100000; the run ends with the status it writes to port 0xF4.
    #[arg(long, value_name = "FILE")]
    guest: Option<PathBuf>,
    /// Attach the vshm device to vshmd's vhost-user socket (`vshmd --vhost-user PATH`).
    #[arg(long, value_name = "SOCKET", conflicts_with = "kernel")]
    vshm: Option<PathBuf>,
    /// Attach the ivshmem-doorbell device to vshmd's ivshmem socket (`vshmd --socket PATH`),
    /// as QEMU's `-device ivshmem-doorbell` does.
    #[arg(long, value_name = "SOCKET", conflicts_with = "kernel")]
    ivshmem: Option<PathBuf>,
    /// The argument string a --guest finds at 0x7000.
    #[arg(
        long,
        value_name = "TEXT",
        conflicts_with = "kernel",
        default_value = ""
    )]
    args: String,
    /// A Linux kernel (bzImage), started at its 64-bit entry point; its console (COM1)
    /// is streamed to stdout.
    #[arg(long, value_name = "BZIMAGE")]
    kernel: Option<PathBuf>,
    /// The initrd (initramfs) for --kernel, loaded at the top of RAM.
    #[arg(long, value_name = "FILE", conflicts_with = "guest")]
    initrd: Option<PathBuf>,
    /// The kernel command line for --kernel.
    #[arg(long, value_name = "TEXT", conflicts_with = "guest", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest RAM in MiB (4..=1024; default 16 for --guest, 256 for --kernel).
    #[arg(long, value_parser = clap::value_parser!(u64).range(4..=1024))]
    mem_mib: Option<u64>,
    /// Most exits to user space before the run is abandoned (default: 1000000 for
    /// --guest, no limit for --kernel).
    #[arg(long)]
    max_exits: Option<u64>,
    /// End the run after this many seconds, saying so, with exit status 124.
    #[arg(long, value_name = "N")]
    timeout_secs: Option<u64>,
    /// End the run successfully (status 0) as soon as the serial output contains TEXT.
    #[arg(long, value_name = "TEXT")]
    until: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut limits = RunLimits {
        max_exits: args.max_exits,
        timeout: args.timeout_secs.map(Duration::from_secs),
        until: args.until.as_ref().map(|u| u.clone().into_bytes()),
    };
    let vm = if let Some(kernel) = &args.kernel {
        let cfg = LinuxConfig {
            kernel: kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
            mem_size: args.mem_mib.unwrap_or(256) << 20,
        };
        Vm::linux(&cfg)
    } else {
        limits.max_exits = Some(args.max_exits.unwrap_or(10_000_000));
        freestanding(&args)
    };
    let run = vm.and_then(|mut vm| {
        vm.stream_serial(true);
        vm.run_with(&limits)
    });
    let _ = std::io::stdout().flush();
    match run {
        Ok(out) => {
            match out.ended {
                Ended::TimedOut => eprintln!(
                    "vshm-vmm: the guest did not end within {} s (--timeout-secs): {out}",
                    args.timeout_secs.unwrap_or(0)
                ),
                _ => eprintln!("vshm-vmm: the guest ended: {out}"),
            }
            ExitCode::from(match out.ended {
                Ended::ExitPort(s) => s,
                Ended::TimedOut => TIMED_OUT,
                Ended::Halted | Ended::Reset | Ended::Matched => 0,
            })
        }
        Err(e) => {
            eprintln!("vshm-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The --guest VM, loaded and ready to run.
fn freestanding(args: &Args) -> Result<Vm, vshm_vmm::VmmError> {
    let guest = args.guest.clone().unwrap_or_default();
    let unreadable = |e: std::io::Error| {
        vshm_vmm::VmmError::Memory(format!("cannot read the guest {}: {e}", guest.display()))
    };
    let mut file = std::fs::File::open(&guest).map_err(unreadable)?;
    let mut magic = [0u8; 4];
    let elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let vm = Vm::freestanding(&VmConfig {
        mem_size: args.mem_mib.unwrap_or(16) << 20,
        vshm: args.vshm.clone(),
        args: args.args.clone().into_bytes(),
        ivshmem: args.ivshmem.clone(),
    })?;
    let entry = if elf {
        vm.load_elf(&mut file)?
    } else {
        vm.load_flat(&std::fs::read(&guest).map_err(unreadable)?)?;
        ENTRY
    };
    vm.start_at(entry)?;
    Ok(vm)
}
