//! `cargo xtask test`: everything CI runs, in order, stopping at the first failure.

use std::process::Command;
use std::time::Instant;

use crate::tools::ensure_tools;
use crate::util::{cargo, describe, run_checked, Result};

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
    ]
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
