//! `cargo xtask test`: everything CI runs, in order, stopping at the first failure.

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
        // The integration tests spawn the built vshmd/vshm/vshmctl from target/debug.
        cargo_step("build", &["build", "--workspace", "--bins"]),
        cargo_step(
            "images",
            &["run", "--quiet", "--package", "xtask", "--", "images"],
        ),
        cargo_step("test", &["test", "--workspace"]),
        loom_step(),
    ]
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
        run_checked(&mut step.command)
            .map_err(|e| format!("step {n}/{total} `{}` failed: {e}", step.name))?;
        println!(
            "==> [{n}/{total}] {} ok ({:.1}s)",
            step.name,
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "\n==> all {total} steps passed ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
