//! vshm: the command-line peer. Creates, opens, reads, writes, grows, deletes, lists and
//! holds named sections in a vshm region.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use vshm::format::layout::object_state;
use vshm::format::units::parse_size;
use vshm::host::HostTransport;
use vshm::{CreateOptions, Disposition, Error, Namespace, ObjectInfo, Section, Transport};

/// `--version`: the crate's version and the shared-format version this program speaks.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| vshm::format::version::version_text(env!("CARGO_PKG_VERSION")));

/// vshm command-line peer.
#[derive(Debug, Parser)]
#[command(name = "vshm", version = VERSION.as_str())]
struct Args {
    /// vshmd's ivshmem socket (host processes). Without it, vshm uses the ivshmem PCI
    /// device of the guest it runs in.
    #[arg(long, global = true, env = "VSHM_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Which ivshmem PCI device to use, e.g. 0000:00:03.0 (guests with several).
    #[arg(
        long,
        global = true,
        env = "VSHM_PCI",
        value_name = "BDF",
        conflicts_with = "socket"
    )]
    pci: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a section, or open it if the name exists (STATUS_OBJECT_NAME_EXISTS).
    Create {
        /// Section name (≤ 260 characters, no backslash, case-sensitive).
        name: String,
        /// Bytes to reserve (K/M/G suffixes).
        #[arg(long, value_parser = size_arg)]
        max: u64,
        /// Bytes exposed now [default: --max].
        #[arg(long, value_parser = size_arg)]
        initial: Option<u64>,
        /// Keep it until deleted, not until the last handle closes.
        #[arg(long)]
        persistent: bool,
        /// Keep the handle open until stdin closes or a signal arrives.
        #[arg(long)]
        hold: bool,
        /// With --hold: ignore stdin, release only on SIGTERM/SIGINT/SIGHUP.
        #[arg(long, requires = "hold")]
        until_signal: bool,
    },
    /// Open a section (checks that it exists; the handle closes on exit).
    Open {
        /// Section name.
        name: String,
    },
    /// Write bytes into a section.
    Write {
        /// Section name.
        name: String,
        /// Byte offset inside the section.
        #[arg(long, default_value = "0", value_parser = size_arg)]
        offset: u64,
        /// The bytes to write.
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        data: Option<String>,
        /// A file whose contents to write.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Copy bytes out of a section to stdout.
    Read {
        /// Section name.
        name: String,
        /// Byte offset inside the section.
        #[arg(long, default_value = "0", value_parser = size_arg)]
        offset: u64,
        /// Bytes to read [default: to the end of the section].
        #[arg(long, value_parser = size_arg)]
        len: Option<u64>,
    },
    /// Grow a section's size (up to its max size; it never moves).
    Grow {
        /// Section name.
        name: String,
        /// New size.
        #[arg(value_parser = size_arg)]
        size: u64,
    },
    /// Delete a section: its name goes now, its memory when the last handle closes.
    Delete {
        /// Section name.
        name: String,
    },
    /// List the namespace.
    List {
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Describe one section.
    Info {
        /// Section name.
        name: String,
        /// JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Open handles on sections and keep them until stdin closes or a signal arrives.
    Hold {
        /// Section names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Ignore stdin, release only on SIGTERM/SIGINT/SIGHUP (for background use).
        #[arg(long)]
        until_signal: bool,
    },
    /// Measure this peer's costs on section NAME: a request round trip to vshmd (a grow to
    /// the current size), an open+close of an existing section (no host involved), and
    /// copy bandwidth into and out of the section against a copy in local memory.
    Rtt {
        /// An existing section.
        name: String,
        /// Samples of each.
        #[arg(long, default_value_t = 200)]
        count: u32,
        /// MiB to copy each way (in chunks of the section's size, at most 1 MiB); 0 skips.
        #[arg(long, default_value_t = 16, value_name = "MIB")]
        copy_mib: u64,
    },
    /// The peers attached to the region (this one is marked).
    Peers {
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Named events: create, signal, reset, wait.
    Event {
        #[command(subcommand)]
        command: sync::EventCommand,
    },
    /// Robust named mutexes: create, lock (held until stdin closes or a signal).
    Mutex {
        #[command(subcommand)]
        command: sync::MutexCommand,
    },
    /// Tell the readers of a section that it changed (wakes `wait-change`).
    Notify {
        /// Section name.
        name: String,
    },
    /// Wait until a section is notified (STATUS_TIMEOUT after --timeout).
    WaitChange {
        /// Section name.
        name: String,
        /// Give up after this many milliseconds [default: wait].
        #[arg(long, value_name = "MS")]
        timeout: Option<u64>,
    },
    /// Allocate a block inside a section (grows it as needed); prints the block's offset and size.
    Alloc {
        /// Section name.
        name: String,
        /// Bytes.
        #[arg(value_parser = size_arg)]
        size: u64,
        /// Alignment of the data (a power of two) from the section's start.
        #[arg(long, default_value = "16", value_parser = size_arg)]
        align: u64,
        /// Tag the block with this peer: it is freed once this peer is gone.
        #[arg(long)]
        owned: bool,
        /// Keep this peer attached until stdin closes or a signal arrives.
        #[arg(long)]
        hold: bool,
    },
    /// Free the block whose data is at OFFSET in a section.
    Free {
        /// Section name.
        name: String,
        /// The offset `vshm alloc` printed.
        #[arg(value_parser = size_arg)]
        offset: u64,
    },
    /// Benchmark helper (tests/bench P6, hidden): send bytes over TCP to a `vshm net-recv`
    /// in 1 MiB writes and report the time until the receiver had them all. Needs no vshm
    /// device.
    #[command(hide = true)]
    NetSend {
        /// The receiver, IP:PORT.
        addr: String,
        /// Send this file's bytes (read into memory first).
        #[arg(long, conflicts_with = "mib", required_unless_present = "mib")]
        file: Option<PathBuf>,
        /// Send this many MiB of a pattern.
        #[arg(long)]
        mib: Option<u64>,
    },
    /// Benchmark helper (tests/bench P6, hidden): take one TCP connection on PORT, read it to
    /// its end in 1 MiB reads and report bytes and time. Needs no vshm device.
    #[command(hide = true)]
    NetRecv {
        /// The port to listen on (every address).
        port: u16,
        /// Write what arrives into this file (else it is dropped).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmark helper (tests/bench P6, hidden): create an SPSC ring at offset 0 of section
    /// NAME, take MIB MiB from it in 64 KiB reads and report the time.
    #[command(hide = true)]
    RingRecv {
        /// Section name (its first bytes zero).
        name: String,
        /// MiB to take.
        #[arg(long)]
        mib: u64,
        /// The ring's capacity (a power of two; the section holds it and 384 bytes more).
        #[arg(long, default_value = "1M", value_parser = size_arg)]
        capacity: u64,
    },
    /// Benchmark helper (tests/bench P6, hidden): attach to the ring `vshm ring-recv` created
    /// in section NAME, send MIB MiB in 64 KiB writes and report the time until the receiver
    /// took the last byte.
    #[command(hide = true)]
    RingSend {
        /// Section name.
        name: String,
        /// MiB to send.
        #[arg(long)]
        mib: u64,
    },
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("invalid size {s:?}: {e}"))
}

/// `println!` that does not panic when stdout is gone (`| head`): the command goes on to
/// close its handles instead of dying while holding them.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

// The crate root is this file, so a child module would sit beside it in src/bin/, where
// cargo would take it for another binary: it lives in src/bin/vshm/ instead.
#[path = "vshm/sync.rs"]
mod sync;

#[path = "vshm/net.rs"]
mod net;

#[path = "vshm/ring.rs"]
mod ring;

/// A failure: message and exit code.
struct Failure(String);

/// Adds the operation and the name to an error.
fn ctx<'a>(what: &'static str, name: &'a str) -> impl Fn(Error) -> Failure + 'a {
    move |e| Failure(format!("{e}: {what} {name:?}"))
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure(e.to_string())
    }
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        vshm::format::layout::kind::SECTION => "section",
        vshm::format::layout::kind::EVENT => "event",
        vshm::format::layout::kind::MUTEX => "mutex",
        _ => "unknown",
    }
}

/// `vshm rtt`'s copy readings: `mib` MiB written into the section and read back out of it
/// in chunks (the library's checked, volatile word copies), and the same through a plain
/// copy between two local buffers, each as MB/s (10^6 bytes per second).
fn copy_bandwidth<T: Transport>(
    section: &Section<'_, T>,
    name: &str,
    mib: u64,
) -> Result<(), Failure> {
    let chunk = usize::try_from(section.size().min(1 << 20)).unwrap_or(1 << 20);
    if chunk == 0 {
        return Err(Failure(format!("{name:?} is empty: nothing to copy into")));
    }
    let total = mib.saturating_mul(1 << 20);
    let rounds = total.div_ceil(chunk as u64).max(1);
    let src: Vec<u8> = (0..chunk)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    let mut dst = vec![0u8; chunk];
    let rate = |f: &mut dyn FnMut() -> Result<(), Failure>| -> Result<f64, Failure> {
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            if interrupted() {
                return Err(Failure("interrupted".into()));
            }
            f()?;
        }
        Ok((rounds * chunk as u64) as f64 / t.elapsed().as_secs_f64() / 1e6)
    };
    let into = rate(&mut || section.write_at(0, &src).map_err(ctx("write", name)))?;
    let out_of = rate(&mut || section.read_at(0, &mut dst).map_err(ctx("read", name)))?;
    if dst != src {
        return Err(Failure(format!(
            "{name:?} did not read back what was written"
        )));
    }
    let mut local = vec![0u8; chunk];
    let plain = rate(&mut || {
        local.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut local);
        Ok(())
    })?;
    say!(
        "copy into section      {:.0} MB/s ({} x {} bytes)",
        into,
        rounds,
        chunk
    );
    say!("copy out of section    {out_of:.0} MB/s");
    say!("copy in local memory   {plain:.0} MB/s");
    Ok(())
}

fn holders<T: Transport>(ns: &Namespace<T>, info: &ObjectInfo) -> Vec<u16> {
    ns.holders(info.slot).map(|p| p.peer_id.raw()).collect()
}

fn info_json<T: Transport>(ns: &Namespace<T>, info: &ObjectInfo) -> Value {
    json!({
        "name": info.name(),
        "kind": kind_name(info.kind),
        "slot": info.slot.raw(),
        "generation": info.generation.raw(),
        "offset": info.offset.raw(),
        "size": info.size,
        "max_size": info.max_size,
        "persistent": info.persistent(),
        "deleted": info.state == object_state::UNLINKED,
        "creator": info.creator,
        "holders": holders(ns, info),
    })
}

/// Blocks until SIGINT/SIGTERM/SIGHUP arrives or, unless `until_signal`, stdin reaches EOF.
fn wait_for_release(until_signal: bool) -> Result<(), Failure> {
    let set = block_release_signals();
    // SAFETY: signalfd gets a valid, initialised set; the result is checked below.
    let sfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
    if sfd < 0 {
        return Err(Failure(format!(
            "signalfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: sfd is a fresh fd we own.
    let sfd = unsafe { std::fs::File::from_raw_fd(sfd) };
    let stdin = std::io::stdin();
    let mut buf = [0u8; 4096];
    loop {
        // poll ignores a negative fd: with until_signal only the signals count.
        let stdin_fd = if until_signal { -1 } else { stdin.as_raw_fd() };
        let mut fds = [
            libc::pollfd {
                fd: stdin_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: sfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: fds is a valid array of 2 pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            return Ok(());
        }
        if fds[0].revents != 0 {
            match stdin.lock().read(&mut buf) {
                Ok(0) | Err(_) => return Ok(()),
                Ok(_) => {}
            }
        }
    }
}

fn run(args: Args) -> Result<(), Failure> {
    // Termination signals are held back for every command (before any thread exists, so
    // all threads inherit the mask): a vshm that dies while it holds handles leaks them in
    // a guest, where all processes share one peer. `hold` waits for them on a signalfd;
    // long loops poll `interrupted()`.
    block_release_signals();
    // The network benchmark helpers need no region.
    match &args.command {
        Command::NetSend { addr, file, mib } => return net::send(addr, file.as_ref(), *mib),
        Command::NetRecv { port, out } => return net::recv(*port, out.as_ref()),
        _ => {}
    }
    match &args.socket {
        Some(socket) => {
            let transport = HostTransport::connect(socket).map_err(|e| Failure(e.to_string()))?;
            execute(Namespace::attach(transport)?, args.command)
        }
        None => {
            // The vshm driver when it is loaded (/dev/vshm*), else sysfs.
            let transport =
                vshm::driver::GuestTransport::open(args.pci.as_deref()).map_err(|e| {
                    Failure(format!(
                        "{e} (host processes pass --socket or set VSHM_SOCKET)"
                    ))
                })?;
            execute(Namespace::attach(transport)?, args.command)
        }
    }
}

fn execute<T: Transport>(ns: Namespace<T>, command: Command) -> Result<(), Failure> {
    let out = std::io::stdout();
    match command {
        Command::Create {
            name,
            max,
            initial,
            persistent,
            hold,
            until_signal,
        } => {
            let opts = CreateOptions {
                max_size: max,
                initial_size: initial.unwrap_or(max),
                persistent,
            };
            let (section, disposition) = ns
                .create(Some(&name), &opts)
                .map_err(ctx("create", &name))?;
            if disposition == Disposition::Opened && section.max_size() != max {
                eprintln!(
                    "note: {name:?} already exists with max size {}; --max, --initial and \
                     --persistent apply only when creating",
                    section.max_size()
                );
            }
            let verb = match disposition {
                Disposition::Created => "created",
                Disposition::Opened => "opened existing",
            };
            say!(
                "{}: {verb} {name:?} (slot {}, size {} of max {})",
                disposition.status().name(),
                section.slot(),
                section.size(),
                section.max_size()
            );
            if hold {
                say!("holding; close stdin or send SIGTERM to release");
                let _ = out.lock().flush();
                wait_for_release(until_signal)?;
            } else if !persistent && disposition == Disposition::Created {
                eprintln!(
                    "note: {name:?} is not persistent and this was its only handle: it is \
                     destroyed as vshm exits (use --persistent, --hold or `vshm hold`)"
                );
            }
            section.close()?;
        }
        Command::Open { name } => {
            let section = ns.open(&name).map_err(ctx("open", &name))?;
            say!(
                "{}: opened {name:?} (slot {}, size {} of max {})",
                vshm::Status::Success.name(),
                section.slot(),
                section.size(),
                section.max_size()
            );
            section.close()?;
        }
        Command::Write {
            name,
            offset,
            data,
            file,
        } => {
            let bytes = match (data, file) {
                (Some(d), _) => d.into_bytes(),
                (None, Some(f)) => std::fs::read(&f)
                    .map_err(|e| Failure(format!("cannot read {}: {e}", f.display())))?,
                (None, None) => Vec::new(),
            };
            let section = ns.open(&name).map_err(ctx("open", &name))?;
            section.write_at(offset, &bytes).map_err(|e| {
                Failure(format!(
                    "{e}: writing {} bytes at offset {offset} into {name:?} of size {}",
                    bytes.len(),
                    section.size()
                ))
            })?;
            section.close()?;
        }
        Command::Read { name, offset, len } => {
            let section = ns.open(&name).map_err(ctx("open", &name))?;
            let size = section.size();
            let len = match len {
                Some(l) => l,
                None => size.checked_sub(offset).ok_or_else(|| {
                    Failure(format!(
                        "{}: offset {offset} is past the end of {name:?} (size {size})",
                        vshm::Status::InvalidParameter
                    ))
                })?,
            };
            // Check the range before touching anything, then stream it in chunks: a bad
            // --len must not allocate, and a big section must not be buffered whole.
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(Failure(format!(
                    "{}: {len} bytes at offset {offset} do not fit in {name:?} (size {size})",
                    vshm::Status::InvalidParameter
                )));
            }
            let mut buf = vec![0u8; 64 * 1024];
            let mut done = 0u64;
            let mut o = out.lock();
            while done < len {
                if interrupted() {
                    return Err(Failure("interrupted".into()));
                }
                let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(buf.len());
                section.read_at(offset + done, &mut buf[..n]).map_err(|e| {
                    Failure(format!(
                        "{e}: reading at offset {} of {name:?}",
                        offset + done
                    ))
                })?;
                o.write_all(&buf[..n])
                    .map_err(|e| Failure(format!("stdout: {e}")))?;
                done += n as u64;
            }
            drop(o);
            section.close()?;
        }
        Command::Grow { name, size } => {
            let section = ns.open(&name).map_err(ctx("open", &name))?;
            section.grow(size).map_err(ctx("grow", &name))?;
            say!(
                "{}: {name:?} is now {} bytes",
                vshm::Status::Success.name(),
                section.size()
            );
            section.close()?;
        }
        Command::Delete { name } => {
            ns.delete(&name).map_err(ctx("delete", &name))?;
            say!("{}: deleted {name:?}", vshm::Status::Success.name());
        }
        Command::List { json } => {
            let objects: Vec<ObjectInfo> = ns.objects().collect();
            if json {
                let arr: Vec<Value> = objects.iter().map(|o| info_json(&ns, o)).collect();
                say!("{}", Value::Array(arr));
            } else {
                say!(
                    "{:<32} {:>12} {:>12} {:<10} {:<8} HOLDERS",
                    "NAME",
                    "SIZE",
                    "MAX",
                    "PERSISTENT",
                    "STATE"
                );
                for o in &objects {
                    let h: Vec<String> = holders(&ns, o).iter().map(u16::to_string).collect();
                    say!(
                        "{:<32} {:>12} {:>12} {:<10} {:<8} {}",
                        o.name().unwrap_or("<unnamed>"),
                        o.size,
                        o.max_size,
                        if o.persistent() { "yes" } else { "no" },
                        if o.state == object_state::UNLINKED {
                            "deleted"
                        } else {
                            "live"
                        },
                        h.join(",")
                    );
                }
            }
        }
        Command::Info { name, json } => {
            let info = ns.info(&name).map_err(ctx("info", &name))?;
            let doc = info_json(&ns, &info);
            if json {
                say!("{doc}");
            } else {
                say!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            }
        }
        Command::Rtt {
            name,
            count,
            copy_mib,
        } => {
            let section = ns.open(&name).map_err(ctx("open", &name))?;
            let size = section.size();
            let mut rtt = Vec::new();
            let mut local = Vec::new();
            for _ in 0..count.max(1) {
                if interrupted() {
                    break;
                }
                let t = std::time::Instant::now();
                section.grow(size).map_err(ctx("grow", &name))?;
                rtt.push(t.elapsed());
                let t = std::time::Instant::now();
                ns.open(&name).map_err(ctx("open", &name))?.close()?;
                local.push(t.elapsed());
            }
            for (what, mut v) in [("request round trip", rtt), ("open+close, no host", local)] {
                v.sort();
                let at = |q: usize| v[(v.len() - 1) * q / 100].as_secs_f64() * 1e6;
                say!(
                    "{what:<22} n={} min={:.1}us median={:.1}us p99={:.1}us max={:.1}us",
                    v.len(),
                    at(0),
                    at(50),
                    at(99),
                    at(100)
                );
            }
            if copy_mib > 0 {
                copy_bandwidth(&section, &name, copy_mib)?;
            }
            section.close()?;
        }
        Command::Peers { json } => {
            let me = ns.peer_id();
            let peers: Vec<_> = ns.peers().collect();
            if json {
                let arr: Vec<Value> = peers
                    .iter()
                    .map(|p| json!({ "id": p.peer_id.raw(), "incarnation": p.incarnation, "self": p.peer_id == me }))
                    .collect();
                say!("{}", Value::Array(arr));
            } else {
                for p in peers {
                    say!(
                        "{}{}",
                        p.peer_id,
                        if p.peer_id == me { " (this peer)" } else { "" }
                    );
                }
            }
        }
        Command::Event { command } => sync::event(&ns, command)?,
        Command::Mutex { command } => sync::mutex(&ns, command)?,
        Command::Notify { name } => sync::notify(&ns, &name)?,
        Command::WaitChange { name, timeout } => sync::wait_change(&ns, &name, timeout)?,
        Command::Hold {
            names,
            until_signal,
        } => {
            let mut held = Vec::new();
            for name in &names {
                held.push(
                    ns.open(name)
                        .map_err(|e| Failure(format!("{e}: open {name:?}")))?,
                );
            }
            say!(
                "holding {} handle(s); close stdin or send SIGTERM to release",
                held.len()
            );
            let _ = out.lock().flush();
            wait_for_release(until_signal)?;
            for h in held {
                h.close()?;
            }
        }
        Command::Alloc {
            name,
            size,
            align,
            owned,
            hold,
        } => {
            let section = ns.open(&name).map_err(ctx("open", &name))?;
            let opts = vshm::blocks::AllocOptions { owned };
            let b = section
                .allocate_with(size, align, opts)
                .map_err(ctx("alloc in", &name))?;
            say!("{} {}", b.offset, b.size);
            if hold {
                say!("holding; close stdin or send SIGTERM to release");
                let _ = out.lock().flush();
                wait_for_release(false)?;
            }
            section.close()?;
        }
        Command::NetSend { .. } | Command::NetRecv { .. } => {
            return Err(Failure("net-send and net-recv need no region".into()));
        }
        Command::RingRecv {
            name,
            mib,
            capacity,
        } => ring::recv(&ns, &name, mib, capacity)?,
        Command::RingSend { name, mib } => ring::send(&ns, &name, mib)?,
        Command::Free { name, offset } => {
            let section = ns.open(&name).map_err(ctx("open", &name))?;
            section.free_at(offset).map_err(ctx("free in", &name))?;
            section.close()?;
        }
    }
    Ok(())
}

/// Whether a held-back SIGINT/SIGTERM/SIGHUP is pending (a long command should stop).
fn interrupted() -> bool {
    // SAFETY: sigpending fills a local set that sigemptyset initialised; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigpending(&mut set) != 0 {
            return false;
        }
        [libc::SIGINT, libc::SIGTERM, libc::SIGHUP]
            .iter()
            .any(|&sig| libc::sigismember(&set, sig) == 1)
    }
}

/// Blocks SIGINT/SIGTERM/SIGHUP for this thread and the threads it creates later (so a
/// signalfd receives them) and returns the set.
fn block_release_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local that sigemptyset initialises; pthread_sigmask
    // gets a valid set and a null old-set pointer.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): a closed stdout is an EPIPE error, so vshm
    // still closes its handles. In a guest all processes share one peer and nothing would
    // reclaim a dead process's handles.
    // `cargo xtask dist` asks for the man page and completions this way.
    if let Some(code) = vshm_clidoc::generate_if_asked(Args::command, "1") {
        return code;
    }
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("vshm: {msg}");
            ExitCode::FAILURE
        }
    }
}
