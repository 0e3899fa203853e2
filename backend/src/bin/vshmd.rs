//! vshmd: owns shared regions (one, or several from a config file, each on its own thread)
//! and serves them to QEMU guests and host processes over the ivshmem server protocol,
//! arbitrating every change to each namespace.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use vshm_backend::config::{self, Options};
use vshm_backend::daemon::{regions, Config};
use vshm_backend::logging::{self, LogTarget};
use vshm_backend::notify::notify;
use vshm_format::units::parse_size;

/// `--version`: the crate's version and the shared-format version this program speaks.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| vshm_format::version::version_text(env!("CARGO_PKG_VERSION")));

/// vshm host backend: shared memory between VMs, with a namespace.
///
/// Settings come from the options, from a configuration file (`--config`, docs/CONFIG.md),
/// or both: an option overrides the same key of the file's `[region]`. A file may describe
/// several regions (`[[region]]`), each served on its own thread; options that set a
/// region's key are then refused.
#[derive(Debug, Parser)]
#[command(name = "vshmd", version = VERSION.as_str())]
struct Args {
    /// Configuration file (TOML): the region, further sockets, per-VM policies.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// ivshmem server socket that QEMU (`-chardev socket,path=...`) and `vshm --socket` connect to
    /// [required unless --config gives region.socket].
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    socket: Option<PathBuf>,
    /// Region size: a power of two, with K/M/G suffix [default: 64M].
    #[arg(long, value_parser = size_arg)]
    size: Option<u64>,
    /// Control socket for vshmctl [default: <socket>.ctl].
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Most peers (VMs and host processes) attached at once, 1..=62 [default: 16].
    #[arg(long)]
    max_peers: Option<u32>,
    /// Size of the object table [default: 1024, fewer for regions under 8M so the header
    /// stays within about a sixteenth of the region].
    #[arg(long)]
    max_objects: Option<u32>,
    /// Size of the name area that holds every object's name (K/M suffix allowed): a multiple
    /// of 8, each name taking its length rounded up to 8 bytes; a CREATE whose name does not
    /// fit is refused [default: 64 bytes per object].
    #[arg(long, value_parser = size_arg, value_name = "BYTES")]
    name_bytes: Option<u64>,
    /// Interrupt vectors per peer (the QEMU `vectors=` value) [default: 2].
    #[arg(long)]
    vectors: Option<u32>,
    /// Back the region with huge pages (MFD_HUGETLB).
    #[arg(long)]
    hugepages: bool,
    /// mlock the region so it is never swapped.
    #[arg(long)]
    lock: bool,
    /// Permission bits of the control socket, octal (600: only vshmd's user; 660: its group
    /// may monitor too — admin commands stay with vshmd's user and root) [default: 600].
    #[arg(long, value_parser = mode_arg)]
    control_mode: Option<u32>,
    /// Serve Prometheus metrics over HTTP on this loopback address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Longest time (ms) the memory of a destroyed section waits in quarantine for peers
    /// that do not acknowledge its destruction (docs/FORMAT.md §11a), at most 600000; 0
    /// turns the quarantine off [default: 2000].
    #[arg(long, value_name = "MS")]
    quarantine_ms: Option<u32>,
    /// How long (µs) the event loop keeps looking for the next event after a peer rang,
    /// before it sleeps: a burst of requests then finds vshmd running instead of waking a
    /// sleeping CPU (BENCHMARKS.md P2); at most 1000, 0 sleeps at once. It costs at most
    /// this much CPU per doorbell [default: 50].
    #[arg(long, value_name = "US")]
    linger_us: Option<u32>,
    /// Take the region(s) over from the vshmd running with the same settings, keeping every
    /// VM attached (docs/OPERATIONS.md): it hands over its memory, sockets and peers, and
    /// exits. If the takeover fails, the running vshmd serves on and this one exits 1.
    #[arg(long, conflicts_with = "fd_store")]
    takeover: bool,
    /// Keep the region(s) in systemd's file-descriptor store with a journal of their state,
    /// so that after a crash systemd starts vshmd again with every VM still attached
    /// (docs/OPERATIONS.md). Needs systemd and FileDescriptorStoreMax= in the unit.
    #[arg(long)]
    fd_store: bool,
    /// Also serve the region to VMs through the vshm virtio device over vhost-user on this
    /// socket (docs/VHOST-USER.md): a VM attached this way sees only the sections it opened.
    /// One region only.
    #[arg(long, value_name = "PATH")]
    vhost_user: Option<std::path::PathBuf>,
    /// The size of each vhost-user VM's shared-memory window (K/M/G) [default: 256M].
    #[arg(long, value_parser = size_arg, requires = "vhost_user")]
    vhost_user_window: Option<u64>,
    /// Where to log: `journal` (systemd's, with fields), `stderr` (plain lines), or `auto`:
    /// the journal when systemd started vshmd ($JOURNAL_STREAM), stderr otherwise.
    #[arg(long, value_enum, default_value_t = LogTarget::Auto)]
    log: LogTarget,
}

fn mode_arg(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| m & !0o777 == 0)
        .ok_or_else(|| format!("invalid mode {s:?}: octal permission bits such as 600 or 660"))
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("invalid size {s:?}: {e}"))
}

fn main() -> ExitCode {
    // `cargo xtask dist` asks for the man page and completions this way.
    if let Some(code) = vshm_clidoc::generate_if_asked(Args::command, "8") {
        return code;
    }
    let args = Args::parse();
    logging::init(args.log);
    let options = Options {
        config: args.config,
        socket: args.socket,
        size: args.size,
        control: args.control,
        max_peers: args.max_peers,
        max_objects: args.max_objects,
        name_bytes: args.name_bytes,
        vectors: args.vectors,
        hugepages: args.hugepages,
        lock: args.lock,
        control_mode: args.control_mode,
        metrics: args.metrics,
        quarantine_ms: args.quarantine_ms,
        linger_us: args.linger_us,
    };
    // Everything is checked before anything is created.
    let configs = match config::resolve(&options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vshmd: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before any socket exists (a signal during startup then stops vshmd cleanly) and
    // before any thread (they inherit the mask: only the main thread sees signals).
    let signals = match regions::block_signals() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vshmd: cannot set up signal handling: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    let daemons = if args.fd_store {
        // Before any thread: the variables are unset as the fds are taken.
        let listen = match vshm_backend::fdstore::ListenFds::from_env() {
            Ok(l) => l,
            Err(e) => {
                eprintln!("vshmd: {e}");
                return ExitCode::FAILURE;
            }
        };
        match regions::start_kept(configs.clone(), listen) {
            Ok(kept) => {
                for ((d, t), config) in kept.iter().zip(&configs) {
                    match t {
                        Some(t) => println!(
                            "vshmd: recovered region {} from systemd's fd store ({} peer(s) attached)",
                            d.name(),
                            t.peers
                        ),
                        None => banner(config, configs.len() > 1),
                    }
                }
                kept.into_iter().map(|(d, _)| d).collect()
            }
            Err(e) => {
                eprintln!("vshmd: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else if args.takeover {
        match regions::take_over(configs.clone()) {
            Ok((taken, partial)) => {
                for (d, t) in &taken {
                    println!(
                        "vshmd: took region {} over from pid {} ({} peer(s) attached)",
                        d.name(),
                        t.from_pid,
                        t.peers
                    );
                }
                if let Some(e) = partial {
                    eprintln!("vshmd: {e}; the running vshmd keeps serving the rest");
                    failed = true;
                }
                taken.into_iter().map(|(d, _)| d).collect()
            }
            Err(e) => {
                eprintln!("vshmd: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        // All or nothing: a region that cannot start takes the ones before it down again.
        match regions::start(configs.clone()) {
            Ok(d) => {
                for config in &configs {
                    banner(config, configs.len() > 1);
                }
                d
            }
            Err(e) => {
                eprintln!("vshmd: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let mut daemons = daemons;
    if let Some(path) = &args.vhost_user {
        let window = args
            .vhost_user_window
            .unwrap_or(vshm_backend::vhost_user::DEFAULT_WINDOW);
        let served = match daemons.as_mut_slice() {
            [one] => one
                .serve_vhost_user(path, window)
                .map_err(|e| e.to_string()),
            _ => Err(format!(
                "--vhost-user serves one region; this configuration has {}",
                daemons.len()
            )),
        };
        if let Err(e) = served {
            eprintln!("vshmd: {e}");
            return ExitCode::FAILURE;
        }
    }
    // Every region's sockets listen now (connections wait in their backlogs until the
    // loops below take them), so units ordered after vshmd may start their VMs.
    let sockets: Vec<String> = configs
        .iter()
        .map(|c| c.socket.display().to_string())
        .collect();
    notify(&format!(
        "READY=1\nSTATUS=serving {} region(s) on {}",
        configs.len(),
        sockets.join(", ")
    ));
    match regions::run(daemons, &signals) {
        Ok(()) if !failed => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(failures) => {
            for e in failures {
                eprintln!("vshmd: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// How to attach a VM to one region (with its name when vshmd serves several).
fn banner(config: &Config, named: bool) {
    let region = if named {
        format!("region {}: ", config.name)
    } else {
        String::new()
    };
    println!(
        "vshmd: {region}serving {} bytes on {} (control: {})",
        config.size,
        config.socket.display(),
        config.control.display()
    );
    for l in &config.listen {
        println!(
            "  also listening on {} (socket {}, policy {})",
            l.path.display(),
            l.name,
            l.policy
        );
    }
    println!("attach a QEMU VM with:\n  {}", config.qemu_args());
    println!(
        "or in libvirt domain XML (<devices>):\n{}",
        config.libvirt_xml()
    );
}
