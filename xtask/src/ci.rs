//! `cargo xtask test`: everything CI runs, in order, stopping at the first failure; and
//! `cargo xtask fuzz`, its `fuzz` step alone; and `cargo xtask chaos [--long]`, its `chaos`
//! step alone (or the long runs docs/RELIABILITY.md reports).

use std::process::Command;
use std::time::Instant;

use crate::tools::ensure_tools;
use crate::util::{cargo, describe, run_checked, target_dir, Result};

/// One CI step: a name for messages and the command that runs it.
#[derive(Debug)]
struct Step {
    name: &'static str,
    command: Command,
}

fn cargo_step(name: &'static str, args: &[&str]) -> Step {
    let mut command = cargo();
    command.args(args);
    Step { name, command }
}

/// The steps, in order. The guest image is built before the tests, which boot it under QEMU.
fn steps() -> Vec<Step> {
    vec![
        cargo_step("fmt", &["fmt", "--all", "--", "--check"]),
        cargo_step(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        freestanding_step(),
        // The integration tests spawn the built vshmd/vshm/vshmctl from target/debug.
        cargo_step("build", &["build", "--workspace", "--bins"]),
        cargo_step(
            "images",
            &["run", "--quiet", "--package", "xtask", "--", "images"],
        ),
        // Every benchmark once, tiny counts, from that debug build (tests/bench), P6 in two
        // guests of the image just built; fails only if a benchmark errors, never on a timing.
        cargo_step(
            "bench-smoke",
            &[
                "run",
                "--quiet",
                "--package",
                "xtask",
                "--",
                "bench",
                "--smoke",
            ],
        ),
        cargo_step("test", &["test", "--workspace"]),
        // The Debian package: built (release), installed, run as user vshm, removed.
        cargo_step(
            "dist",
            &[
                "run",
                "--quiet",
                "--package",
                "xtask",
                "--",
                "dist",
                "--check",
            ],
        ),
        // The chaos and load scenarios (tests/tests/chaos.rs, ignored in plain `cargo test`),
        // short, one at a time, with their summary table.
        cargo_step(
            "chaos",
            &["run", "--quiet", "--package", "xtask", "--", "chaos"],
        ),
        loom_step(),
        fuzz_step(),
    ]
}

/// The freestanding guest (guest/freestanding, its own workspace, so the workspace steps
/// miss it): formatting, clippy, and its unit tests against a simulated device. Its image
/// is built (release, without SSE) by the tests that run it (tests/src/freestanding.rs).
fn freestanding_step() -> Step {
    let script = "set -eu\n\
                  cargo fmt -- --check\n\
                  cargo clippy --all-targets -- -D warnings\n\
                  cargo test --quiet\n";
    let mut command = Command::new("bash");
    command
        .args(["-c", script])
        .current_dir(crate::util::workspace_root().join("guest/freestanding"))
        .env("CARGO_TARGET_DIR", target_dir().join("freestanding"));
    Step {
        name: "freestanding",
        command,
    }
}

/// Seconds each fuzz target runs in the `fuzz` step (FUZZ_SECONDS overrides).
const FUZZ_SECONDS: &str = "10";
/// The cargo-fuzz targets (fuzz/Cargo.toml), run in this order.
const FUZZ_TARGETS: &[&str] = &[
    "superblock",
    "entry",
    "request",
    "blocks",
    "lookup",
    "arbiter",
];

/// Every fuzz target for a short fixed time, from its committed seeds, with the nightly
/// toolchain and debug assertions (overflow checks). One shell command so the step shows
/// as one; it installs cargo-fuzz first if `cargo fuzz` does not work. Machines of this
/// project's kind ship nightly; where it is missing and cannot be installed, the step says
/// loudly that it was skipped rather than failing the whole run on a missing tool. New inputs go to a
/// scratch corpus under the target directory, so the committed seeds stay as they are.
fn fuzz_step() -> Step {
    let seconds = std::env::var("FUZZ_SECONDS").unwrap_or_else(|_| FUZZ_SECONDS.to_owned());
    let scratch = target_dir().join("fuzz-corpus");
    let mut script = String::from(
        "set -eu\n\
         if ! cargo +nightly --version >/dev/null 2>&1; then\n\
         echo '==> the fuzz step needs the nightly toolchain: rustup toolchain install nightly --profile minimal'\n\
         if ! rustup toolchain install nightly --profile minimal; then\n\
         echo '==> fuzz: SKIPPED: no nightly toolchain on this machine and none could be installed; the fuzz targets did not run' >&2; exit 0\n\
         fi\n\
         fi\n\
         if ! cargo fuzz --version >/dev/null 2>&1; then\n\
         echo '==> installing cargo-fuzz (cargo install cargo-fuzz --locked)'\n\
         cargo install cargo-fuzz --locked\n\
         fi\n",
    );
    for t in FUZZ_TARGETS {
        let dir = scratch.join(t);
        script.push_str(&format!(
            "mkdir -p '{dir}'\n\
             cargo +nightly fuzz run --debug-assertions {t} '{dir}' fuzz/corpus/{t} -- \
             -max_total_time={seconds} -rss_limit_mb=2048\n",
            dir = dir.display()
        ));
    }
    let mut command = Command::new("bash");
    command
        .args(["-c", &script])
        .current_dir(crate::util::workspace_root())
        // The cargo running xtask sets these for its own toolchain; rustup must pick nightly.
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    Step {
        name: "fuzz",
        command,
    }
}

/// Preemptions loom explores per execution in the `loom` step: 3 runs the five scenarios
/// in about 15 s (2 in under 2 s, 5 takes minutes per scenario). Set LOOM_MAX_PREEMPTIONS
/// to override.
const LOOM_PREEMPTIONS: &str = "3";

/// The loom model of the lease protocol (guest/format/tests/loom_lease.rs). `--cfg loom`
/// changes every crate's flags, so it builds in its own target directory and leaves the
/// normal build's cache alone.
fn loom_step() -> Step {
    let mut step = cargo_step(
        "loom",
        &[
            "test",
            "--package",
            "vshm-format",
            "--release",
            "--test",
            "loom_lease",
        ],
    );
    step.command
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", target_dir().join("loom"));
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_none() {
        step.command.env("LOOM_MAX_PREEMPTIONS", LOOM_PREEMPTIONS);
    }
    step
}

/// `cargo xtask chaos [--long]`: builds what the scenarios run (the binaries, the guest
/// image; cached), runs tests/tests/chaos.rs one test at a time with `VSHM_CHAOS` set
/// (`short` for CI, `long` for the runs docs/RELIABILITY.md reports) and prints the rows
/// the scenarios wrote (`VSHM_CHAOS_SUMMARY`) as one table.
pub fn chaos(long: bool) -> Result<()> {
    let length = if long { "long" } else { "short" };
    let started = Instant::now();
    run_checked(cargo().args(["build", "--workspace", "--bins"]))?;
    crate::images::build()?;
    let summary = target_dir().join(format!("chaos-{length}.md"));
    let _ = std::fs::remove_file(&summary);
    let mut test = cargo();
    test.args([
        "test",
        "--package",
        "vshm-tests",
        "--test",
        "chaos",
        "--",
        "--ignored",
        "--test-threads=1",
    ])
    .env("VSHM_CHAOS", length)
    .env("VSHM_CHAOS_SUMMARY", &summary);
    println!("==> chaos ({length}): {}", describe(&test));
    let result = run_checked(&mut test);
    let rows = std::fs::read_to_string(&summary).unwrap_or_default();
    println!(
        "\n==> chaos ({length}) summary, {:.1}s in all:\n\n\
         | scenario | length | time | kills | peer runs | ops | ops/s | failures by status | notes |\n\
         |---|---|---|---|---|---|---|---|---|\n{rows}",
        started.elapsed().as_secs_f64()
    );
    result
}

/// `cargo xtask fuzz`: the `fuzz` step alone.
pub fn fuzz() -> Result<()> {
    let mut step = fuzz_step();
    println!("==> fuzz: {}", describe(&step.command));
    let t = Instant::now();
    run_checked(&mut step.command)?;
    println!("==> fuzz ok ({:.1}s)", t.elapsed().as_secs_f64());
    Ok(())
}

/// What `df` says is free where the build writes: a linker that dies of SIGBUS, or a
/// step that fails for no reason of its own, is often a disk that filled (one CI run
/// lost its test step that way), so every step's line says how much room is left.
fn disk_free() -> String {
    let dir = target_dir();
    let probe = if dir.exists() {
        dir
    } else {
        crate::util::workspace_root()
    };
    let output = Command::new("df").args(["-Ph"]).arg(&probe).output();
    let avail = output.ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        // POSIX `df -P`: a header line, then "fs size used avail capacity mount".
        text.lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
    });
    match avail {
        Some(a) => format!("{a} free on the build's disk"),
        None => "free disk space unknown (df failed)".to_owned(),
    }
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    ensure_tools()?;
    let mut steps = steps();
    let total = steps.len();
    for (i, step) in steps.iter_mut().enumerate() {
        let n = i + 1;
        let what = describe(&step.command);
        println!("\n==> [{n}/{total}] {}: {what}", step.name);
        let t = Instant::now();
        run_checked(&mut step.command).map_err(|e| {
            format!(
                "step {n}/{total} `{}` failed: {e} ({})",
                step.name,
                disk_free()
            )
        })?;
        println!(
            "==> [{n}/{total}] {} ok ({:.1}s, {})",
            step.name,
            t.elapsed().as_secs_f64(),
            disk_free()
        );
    }
    println!(
        "\n==> all {total} steps passed ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
