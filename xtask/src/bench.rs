//! `cargo xtask bench [--smoke]`: the benchmark suite of issue 13 (tests/bench, the
//! `vshm-bench` binary). The full run builds release binaries, measures (a few minutes),
//! and writes BENCHMARKS.md, docs/bench/*.png and the README's performance table (between
//! `<!-- bench:begin -->` and `<!-- bench:end -->`); it also builds the guest image
//! (`cargo xtask images`, cached) for P6's two QEMU guests. The smoke run (a CI step, after
//! the image step) runs every benchmark once with tiny counts from the debug build into a
//! temp dir, P6 with 1 MiB in the image that is there (or a line saying it did not run),
//! writes nothing into the repository, and fails only if a benchmark fails — never on a
//! timing.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::{
    capture, cargo, describe, run_checked, step, target_dir, workspace_root, Result, TempDir,
};

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

/// The commit measured: the short id, `-dirty` if the tree has changes.
fn commit() -> String {
    let root = workspace_root();
    let git = |args: &[&str]| {
        capture(
            Command::new("git").args(args).current_dir(&root),
            Duration::from_secs(30),
        )
        .ok()
        .filter(|o| o.status.success())
        .map(|o| o.stdout_text().trim().to_owned())
    };
    let id = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if !s.is_empty() => format!("{id}-dirty"),
        _ => id,
    }
}

/// `readme` with the text between the bench markers replaced by `table`.
fn splice(readme: &str, table: &str) -> Result<String> {
    let b = readme
        .find(BEGIN)
        .ok_or_else(|| format!("README.md has no {BEGIN} marker"))?;
    let e = readme
        .find(END)
        .filter(|&e| e > b)
        .ok_or_else(|| format!("README.md has no {END} marker after {BEGIN}"))?;
    Ok(format!(
        "{}{BEGIN}\n{}{}",
        &readme[..b],
        table.trim_end().to_owned() + "\n",
        &readme[e..]
    ))
}

pub fn run(smoke: bool) -> Result<()> {
    let started = Instant::now();
    let root = workspace_root();
    // P6 needs QEMU (and the image its tools): on a fresh machine the full run installs
    // them as `cargo xtask images` would (before, it said "P6 not run: starting
    // qemu-system-x86_64: No such file"). The smoke run is a CI step after the tools step.
    if !smoke {
        crate::tools::ensure_tools()?;
    }
    // The smoke run uses the debug build CI's build step made already; the full run wants
    // release figures.
    let profile = if smoke { "debug" } else { "release" };
    let mut build = cargo();
    build.args([
        "build",
        "--package",
        "vshm-bench",
        "--package",
        "vshm-backend",
        "--bins",
    ]);
    if !smoke {
        build.arg("--release");
    }
    step(describe(&build));
    run_checked(&mut build)?;
    // P6 boots two guests of the test image. The full run builds it (cached: the guest
    // `vshm` and the initramfs are refreshed, nothing is downloaded twice); the smoke run
    // uses the image that is there (CI builds it in the step before) and P6 says "not
    // run" without one.
    if !smoke {
        if let Err(e) = crate::images::build() {
            println!(
                "WARNING: the guest image could not be built, P6 will say why it did not run: {e}"
            );
        }
    }
    let out = TempDir::new("vshm-bench-out")?;
    let mut cmd = Command::new(target_dir().join(profile).join("vshm-bench"));
    cmd.arg("run")
        .arg("--out")
        .arg(out.path())
        .arg("--commit")
        .arg(commit())
        .current_dir(&root);
    if smoke {
        cmd.arg("--smoke");
    }
    step(describe(&cmd));
    run_checked(&mut cmd)?;
    let table = fs::read_to_string(out.path().join("readme-table.md"))
        .map_err(|e| format!("the suite wrote no readme-table.md: {e}"))?;
    let readme_path = root.join("README.md");
    let readme = fs::read_to_string(&readme_path).map_err(|e| format!("read README.md: {e}"))?;
    let new_readme = splice(&readme, &table)?;
    if smoke {
        println!(
            "==> bench --smoke ok ({:.1}s); nothing written into the repository",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    fs::copy(out.path().join("BENCHMARKS.md"), root.join("BENCHMARKS.md"))
        .map_err(|e| format!("copy BENCHMARKS.md: {e}"))?;
    let pngs = root.join("docs/bench");
    fs::create_dir_all(&pngs).map_err(|e| format!("create docs/bench: {e}"))?;
    copy_pngs(&out.path().join("docs/bench"), &pngs)?;
    fs::write(&readme_path, new_readme).map_err(|e| format!("write README.md: {e}"))?;
    println!(
        "==> bench ok ({:.1}s): BENCHMARKS.md, docs/bench/*.png and README.md's performance table",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn copy_pngs(from: &Path, to: &Path) -> Result<()> {
    let entries = fs::read_dir(from).map_err(|e| format!("read {}: {e}", from.display()))?;
    for entry in entries {
        let p = entry
            .map_err(|e| format!("read {}: {e}", from.display()))?
            .path();
        if p.extension().is_some_and(|x| x == "png") {
            if let Some(name) = p.file_name() {
                fs::copy(&p, to.join(name)).map_err(|e| format!("copy {}: {e}", p.display()))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_between_the_markers() {
        let readme = format!("a\n{BEGIN}\nold\n{END}\nb\n");
        let out = splice(&readme, "| new |\n").expect("splice");
        assert_eq!(out, format!("a\n{BEGIN}\n| new |\n{END}\nb\n"));
        assert!(splice("no markers", "x").is_err());
    }
}
