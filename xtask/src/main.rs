//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.
//!
//! - `cargo xtask test`: everything CI runs (`.ci/run` calls exactly this).
//! - `cargo xtask fuzz`: only the `fuzz` step of `test` (FUZZ_SECONDS per target).
//! - `cargo xtask chaos [--long]`: only the `chaos` step of `test`, or its long runs.
//! - `cargo xtask demo`: starts vshmd and shows two host-process peers sharing a section.
//! - `cargo xtask dist [--check]`: the Debian package (and, with --check, installing it).
//! - `cargo xtask bench [--smoke]`: the benchmark suite (tests/bench) into BENCHMARKS.md, or
//!   its smoke run (a CI step).
//!
//! std only, on purpose: this is the first thing built on a fresh machine.

mod bench;
mod ci;
mod demo;
mod demo_vhost;
mod dist;
mod dist_check;
mod images;
mod tools;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  test    everything CI runs, in order, stopping at the first failure:
          rustfmt check, clippy (-D warnings), the freestanding guest's
          own fmt/clippy/unit tests, build the binaries, the benchmarks'
          smoke run, the guest images, cargo test, the Debian package (built, installed, run,
          removed: dist --check), the chaos and load scenarios (short), the loom
          model, then each fuzz target for 10 s
  chaos   only the chaos step: host peers and QEMU guests killed with SIGKILL
          mid-operation, 62 peers at once, a header scribbler beside honest
          peers; each ends with a leak check; prints a summary table.
          --long: the long runs (1000 + 50 kills, 62 x 60 s, 60 s scribbling)
  fuzz    only the fuzz step: each cargo-fuzz target (nightly; installs
          cargo-fuzz if missing) for FUZZ_SECONDS (default 10) seconds
  demo    start vshmd in a temporary directory and let two host-process peers
          (the vshm CLI) share a section; show vshmctl status; shut down cleanly
          --vhost-user: two vshm-vmm VMs (the freestanding guest) and a host
          process share a section through the vshm virtio device; each VM sees
          only what it opened; killing a VMM reclaims its holds
  dist    release binaries, man pages, completions and the Debian package
          target/dist/vshm_<version>_<arch>.deb (packaging/).
          --check: then install it with apt-get, run vshmd from it as user
          vshm, attach a peer, and remove it again (root only)
  bench   the benchmark suite (tests/bench, issue 13): release build, every
          line against its real anchor (POSIX shm, eventfd, shared atomics,
          memcpy, iceoryx2), a few minutes; writes BENCHMARKS.md, docs/bench/*.png
          and README.md's performance table. Never fails on a timing.
          --smoke: every benchmark once with tiny counts (debug build) into a
          temp dir; writes nothing (a CI step)
  images  build the static guest vshm and the test guest (Debian cloud kernel,
          busybox, initramfs) into images/out (cached)
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let task = match args.as_slice() {
        [t] if ["test", "demo", "images", "fuzz", "chaos"].contains(&t.as_str()) => t.as_str(),
        [t, l] if t == "chaos" && l == "--long" => "chaos --long",
        [t, v] if t == "demo" && v == "--vhost-user" => "demo --vhost-user",
        [t] if t == "dist" => "dist",
        [t] if t == "bench" => "bench",
        [t, s] if t == "bench" && s == "--smoke" => "bench --smoke",
        [t, c] if t == "dist" && c == "--check" => "dist --check",
        [h] if h == "help" || h == "-h" || h == "--help" => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        [] => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
        other => {
            eprintln!("xtask: unknown task or arguments: {}\n", other.join(" "));
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match task {
        "test" => ci::run(),
        "images" => images::run(),
        "fuzz" => ci::fuzz(),
        "chaos" => ci::chaos(false),
        "chaos --long" => ci::chaos(true),
        "dist" => dist::build().map(|_| ()),
        "bench" => bench::run(false),
        "bench --smoke" => bench::run(true),
        "dist --check" => dist::build().and_then(|deb| dist_check::check(&deb)),
        "demo --vhost-user" => demo_vhost::run(),
        _ => demo::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask {task}: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
