//! `vshm-vmm --guest FILE`: runs a freestanding 64-bit guest (flat code loaded at 1 MiB)
//! on KVM, prints what it wrote to the serial port, and exits with the status it wrote to
//! port 0xF4 (docs/VHOST-USER.md; issue 11, in progress).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vshm_vmm::Vm;

/// Runs a freestanding guest on KVM.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// The guest: flat 64-bit code, loaded and started at 0x100000.
    #[arg(long, value_name = "FILE")]
    guest: PathBuf,
    /// Guest RAM in MiB (4..=1024).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(4..=1024))]
    mem_mib: u64,
    /// Most exits to user space before the run is abandoned.
    #[arg(long, default_value_t = 1_000_000)]
    max_exits: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let image = match std::fs::read(&args.guest) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "vshm-vmm: cannot read the guest {}: {e}",
                args.guest.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let run = Vm::new(args.mem_mib << 20, &image).and_then(|mut vm| vm.run(args.max_exits));
    match run {
        Ok(out) => {
            let _ = std::io::stdout().write_all(&out.serial);
            eprintln!("vshm-vmm: the guest ended: {out}");
            ExitCode::from(out.status.unwrap_or(0))
        }
        Err(e) => {
            eprintln!("vshm-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}
