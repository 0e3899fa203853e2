//! `vshm-vmm --guest FILE`: runs a freestanding 64-bit guest (an ELF linked at 1 MiB, or flat
//! code loaded there) on KVM, optionally with the vshm device attached to vshmd's
//! vhost-user socket, streams what it writes to the serial port, and exits with the status
//! it wrote to port 0xF4 (docs/VHOST-USER.md, guest/freestanding/README.md).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vshm_vmm::{Vm, VmConfig, ENTRY};

/// Runs a freestanding guest on KVM.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The guest: an ELF executable, or flat 64-bit code loaded and started at 0x100000.
    #[arg(long, value_name = "FILE")]
    guest: PathBuf,
    /// Guest RAM in MiB (16..=1024).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(16..=1024))]
    mem_mib: u64,
    /// Attach the vshm device: vshmd's vhost-user socket (`vshmd --vhost-user PATH`).
    #[arg(long, value_name = "SOCKET")]
    vshm: Option<PathBuf>,
    /// The argument string the guest finds at 0x7000.
    #[arg(long, default_value = "")]
    args: String,
    /// Most exits to user space before the run is abandoned.
    #[arg(long, default_value_t = 10_000_000)]
    max_exits: u64,
}

fn run(args: &Args) -> Result<vshm_vmm::Outcome, String> {
    let mut file = std::fs::File::open(&args.guest)
        .map_err(|e| format!("cannot read the guest {}: {e}", args.guest.display()))?;
    let mut magic = [0u8; 4];
    let elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let mut vm = Vm::create(&VmConfig {
        mem_size: args.mem_mib << 20,
        vshm: args.vshm.clone(),
        args: args.args.clone().into_bytes(),
    })
    .map_err(|e| e.to_string())?;
    let entry = if elf {
        vm.load_elf(&mut file).map_err(|e| e.to_string())?
    } else {
        let image = std::fs::read(&args.guest)
            .map_err(|e| format!("cannot read the guest {}: {e}", args.guest.display()))?;
        vm.load_flat(&image).map_err(|e| e.to_string())?;
        ENTRY
    };
    vm.start_at(entry).map_err(|e| e.to_string())?;
    vm.echo_serial(Box::new(std::io::stdout()));
    vm.run(args.max_exits).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(out) => {
            eprintln!("vshm-vmm: the guest ended: {out}");
            ExitCode::from(out.status.unwrap_or(0))
        }
        Err(e) => {
            eprintln!("vshm-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
