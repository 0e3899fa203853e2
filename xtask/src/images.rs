//! `cargo xtask images`: the static guest `vshm` and the bootable test guest.

use std::path::PathBuf;

use vshm_images::Image;

use crate::util::{cargo, run_checked, step, workspace_root, Result};

/// Where the guest image is built (ignored by git).
pub fn out_dir() -> PathBuf {
    workspace_root().join("images").join("out")
}

/// Builds `vshm` as a static binary for the guest, in its own target dir so the host
/// build's flags are untouched.
pub fn build_guest_vshm() -> Result<PathBuf> {
    step("building the static guest vshm (crt-static, not PIE, release)");
    let (mut cmd, artifacts) = guest_build(&["-p", "vshm", "--bin", "vshm"]);
    run_checked(&mut cmd)?;
    Ok(artifacts.join("vshm"))
}

/// `cargo build --release ARGS` for the guest: static (crt-static) and not
/// position-independent (relocation-model=static: loaded at the same address every time,
/// so a TCG guest reuses its translations from one start to the next instead of translating
/// a static-PIE binary that ASLR moved again — BENCHMARKS.md P6), in its own target dir so
/// the host build's flags are untouched; and the directory the artifacts land in.
fn guest_build(args: &[&str]) -> (std::process::Command, PathBuf) {
    let target_dir = workspace_root().join("target").join("guest");
    let mut cmd = cargo();
    cmd.args(["build", "--release"])
        .args(args)
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C relocation-model=static -C debuginfo=0 \
             -C strip=symbols",
        );
    (cmd, target_dir.join("x86_64-unknown-linux-gnu/release"))
}

/// Builds the C API as a static library for the guest (same flags and target dir as the
/// guest `vshm`, so they share their dependencies' builds) and links the guest C example
/// (guest/capi/examples/guest.c) against it, static, with the system compiler.
pub fn build_guest_c_example() -> Result<PathBuf> {
    step("building the guest C example (libvshm_capi.a, cc -static)");
    let root = workspace_root();
    let (mut cmd, artifacts) = guest_build(&["-p", "vshm-capi", "--lib"]);
    run_checked(&mut cmd)?;
    let lib = artifacts.join("libvshm_capi.a");
    let program = out_dir().join("vshm-c-example");
    std::fs::create_dir_all(out_dir()).map_err(|e| format!("{}: {e}", out_dir().display()))?;
    let mut cc = std::process::Command::new("cc");
    cc.args([
        "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-std=c11", "-o",
    ])
    .arg(&program)
    .arg(root.join("guest/capi/examples/guest.c"))
    .arg("-I")
    .arg(root.join("guest/capi/include"))
    .arg(&lib)
    .args(["-lpthread", "-ldl", "-lm"]);
    run_checked(&mut cc)?;
    Ok(program)
}

/// Builds (or refreshes) the guest image.
pub fn build() -> Result<Image> {
    let vshm = build_guest_vshm()?;
    let c_example = build_guest_c_example()?;
    step(format!(
        "building the guest image in {}",
        out_dir().display()
    ));
    let image = vshm_images::build(&out_dir(), &vshm, &[&c_example], &mut |msg| {
        println!("    {msg}")
    })
    .map_err(|e| e.to_string())?;
    println!(
        "    kernel {}\n    initrd {}",
        image.kernel.display(),
        image.initrd.display()
    );
    Ok(image)
}

/// `cargo xtask images`. Under CI (`CI` set) an image without the kernel driver is an
/// error: the driver's tests would only say SKIPPED, and a compile error in the driver
/// would go unnoticed.
pub fn run() -> Result<()> {
    crate::tools::ensure_tools()?;
    let image = build()?;
    if image.driver.is_none() && std::env::var_os("CI").is_some() {
        return Err(
            "the guest image has no vshm.ko (see the WARNING above): under CI the \
                    driver must build"
                .into(),
        );
    }
    Ok(())
}
