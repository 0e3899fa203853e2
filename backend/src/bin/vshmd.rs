//! vshmd: owns a shared region and serves it to QEMU guests and host processes over the
//! ivshmem server protocol, arbitrating every change to the namespace.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vshm_backend::daemon::{Config, Daemon};
use vshm_format::units::parse_size;

/// vshm host backend: shared memory between VMs, with a namespace.
#[derive(Debug, Parser)]
#[command(name = "vshmd", version)]
struct Args {
    /// ivshmem server socket that QEMU (`-chardev socket,path=...`) and `vshm --socket` connect to.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Region size: a power of two, with K/M/G suffix.
    #[arg(long, default_value = "64M", value_parser = size_arg)]
    size: u64,
    /// Control socket for vshmctl [default: <socket>.ctl].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Most peers (VMs and host processes) attached at once, 1..=62.
    #[arg(long, default_value_t = 16)]
    max_peers: u32,
    /// Size of the object table [default: 1024, fewer for regions under 32M so the header
    /// stays within a sixteenth of the region].
    #[arg(long)]
    max_objects: Option<u32>,
    /// Interrupt vectors per peer (the QEMU `vectors=` value).
    #[arg(long, default_value_t = 2)]
    vectors: u32,
    /// Back the region with huge pages (MFD_HUGETLB).
    #[arg(long)]
    hugepages: bool,
    /// mlock the region so it is never swapped.
    #[arg(long)]
    lock: bool,
    /// Permission bits of the control socket, octal (600: only vshmd's user; 660: its group
    /// may monitor too — admin commands stay with vshmd's user and root).
    #[arg(long, default_value = "600", value_parser = mode_arg)]
    control_mode: u32,
    /// Serve Prometheus metrics over HTTP on this loopback address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

fn mode_arg(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| m & !0o777 == 0)
        .ok_or_else(|| format!("invalid mode {s:?}: octal permission bits such as 600 or 660"))
}

/// 1024 objects for regions of 32 MiB and more; for smaller ones, as many as fit in a
/// sixteenth of the region (at least 16).
fn default_max_objects(size: u64) -> u32 {
    let fit = size / 16 / std::mem::size_of::<vshm_format::layout::ObjectEntry>() as u64;
    u32::try_from(fit.clamp(16, 1024)).unwrap_or(1024)
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("invalid size {s:?}: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let control = args.control.clone().unwrap_or_else(|| {
        let mut p = args.socket.clone().into_os_string();
        p.push(".ctl");
        PathBuf::from(p)
    });
    let config = Config {
        socket: args.socket,
        control,
        size: args.size,
        max_peers: args.max_peers,
        max_objects: args
            .max_objects
            .unwrap_or_else(|| default_max_objects(args.size)),
        vectors: args.vectors,
        hugepages: args.hugepages,
        lock: args.lock,
        control_mode: args.control_mode,
        metrics: args.metrics,
    };
    let daemon = match Daemon::new(config.clone()) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("vshmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "vshmd: serving {} bytes on {} (control: {})",
        config.size,
        config.socket.display(),
        config.control.display()
    );
    println!("attach a QEMU VM with:\n  {}", config.qemu_args());
    println!(
        "or in libvirt domain XML (<devices>):\n{}",
        config.libvirt_xml()
    );
    match daemon.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vshmd: {e}");
            ExitCode::FAILURE
        }
    }
}
