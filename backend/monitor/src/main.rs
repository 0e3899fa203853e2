//! vshmctl: watch and administer a running vshmd from the host.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use vshm_control::{request, watch, ControlError, ControlRequest};
use vshm_monitor::text;

/// `--version`: the crate's version and the shared-format version this program speaks.
static VERSION: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| vshm_format::version::version_text(env!("CARGO_PKG_VERSION")));

/// vshm host monitor.
#[derive(Debug, Parser)]
#[command(name = "vshmctl", version = VERSION.as_str())]
struct Args {
    /// vshmd's control socket (default: $VSHM_CONTROL, else /tmp/vshm.sock.ctl).
    #[arg(
        long,
        value_name = "PATH",
        env = "VSHM_CONTROL",
        default_value = "/tmp/vshm.sock.ctl"
    )]
    control: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Region, peers and sections.
    Status {
        /// Print the JSON document (field names: docs/MONITOR.md).
        #[arg(long)]
        json: bool,
    },
    /// Stream events (peers coming and going, sections created, opened, closed, grown,
    /// deleted, destroyed, reclaims, refusals) until interrupted.
    Watch {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the Prometheus metrics once (what `vshmd --metrics ADDR` serves).
    Metrics,
    /// Delete a section as the host: its name goes now, its memory at the last close.
    Delete {
        /// Section name.
        name: String,
    },
    /// Drop a peer's connection (a wedged VM or process) and reclaim what it held.
    Disconnect {
        /// Peer id (see `vshmctl status`).
        peer: u16,
    },
    /// Header and authoritative state as JSON, for bug reports.
    Dump,
    /// Decode and check the region straight from its memory, read-only (works when vshmd
    /// is wedged): exit 0 if consistent, 1 if errors were found, 2 if the file is unreadable.
    Inspect {
        /// The region: vshmd's memfd (/proc/PID/fd/N, the link reads "/memfd:vshm"), an
        /// ivshmem-plain backing file, or a copy.
        #[arg(long, value_name = "PATH")]
        memfd: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live view: region, rates, peers and sections (s/r sort by size/refs, q quits).
    Top {
        /// Refresh interval in milliseconds.
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
    },
}

fn run(args: &Args) -> Result<(), ControlError> {
    let ctl = &args.control;
    let out = std::io::stdout();
    if !matches!(args.command, Command::Status { .. }) {
        // Every other command asks for the status first, only to compare format versions;
        // if that fails, the command itself reports why.
        if let Ok(doc) = request(ctl, &ControlRequest::Status) {
            warn_on_format_mismatch(&doc);
        }
    }
    match &args.command {
        Command::Status { json } => {
            let doc = request(ctl, &ControlRequest::Status)?;
            warn_on_format_mismatch(&doc);
            if *json {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                print!("{}", text::status(&doc));
            }
        }
        Command::Watch { json } => {
            watch(ctl, |event| {
                let line = if *json {
                    event.to_string()
                } else {
                    text::event(&event)
                };
                let mut o = out.lock();
                // Stop when whoever reads us goes away.
                writeln!(o, "{line}").and_then(|()| o.flush()).is_ok()
            })?;
        }
        Command::Metrics => {
            let doc = request(ctl, &ControlRequest::Metrics)?;
            print!("{}", doc.as_str().unwrap_or_default());
        }
        Command::Delete { name } => {
            request(ctl, &ControlRequest::Delete { name: name.clone() })?;
            println!("deleted {name:?}");
        }
        Command::Disconnect { peer } => {
            request(ctl, &ControlRequest::Disconnect { peer: *peer })?;
            println!("disconnected peer {peer}");
        }
        Command::Top { interval_ms } => {
            let interval = std::time::Duration::from_millis(*interval_ms);
            vshm_monitor::top::run(ctl, interval).map_err(|error| ControlError::Refused {
                error,
                status: None,
            })?;
        }
        // Needs no vshmd: handled in main, which owns the exit code.
        Command::Inspect { .. } => {}
        Command::Dump => {
            let doc = request(ctl, &ControlRequest::Dump)?;
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
    }
    Ok(())
}

/// Warns on stderr when vshmd speaks another shared-format version (once per run: every
/// command looks at one status document).
fn warn_on_format_mismatch(status: &serde_json::Value) {
    if let Some(warning) = vshm_monitor::version::format_mismatch(status) {
        eprintln!("vshmctl: {warning}");
    }
}

fn main() -> ExitCode {
    // Die quietly when stdout goes away (`| head`), like other command-line tools, instead
    // of panicking on EPIPE. (A vshm that dies this way has its handles reclaimed by vshmd.)
    // SAFETY: resetting a signal disposition to its default before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    // `cargo xtask dist` asks for the man page and completions this way.
    if let Some(code) = vshm_clidoc::generate_if_asked(Args::command, "1") {
        return code;
    }
    let args = Args::parse();
    if let Command::Inspect { memfd, json } = &args.command {
        let code = vshm_monitor::inspect::run(
            memfd,
            *json,
            &mut std::io::stdout().lock(),
            &mut std::io::stderr().lock(),
        );
        return ExitCode::from(code);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vshmctl: {e}");
            ExitCode::FAILURE
        }
    }
}
