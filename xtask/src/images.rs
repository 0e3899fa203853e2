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
    step("building the static guest vshm (crt-static, release)");
    let target_dir = workspace_root().join("target").join("guest");
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", "vshm", "--bin", "vshm"])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C debuginfo=0 -C strip=symbols",
        );
    run_checked(&mut cmd)?;
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/vshm"))
}

/// Builds (or refreshes) the guest image.
pub fn build() -> Result<Image> {
    let vshm = build_guest_vshm()?;
    step(format!(
        "building the guest image in {}",
        out_dir().display()
    ));
    let image = vshm_images::build(&out_dir(), &vshm, &mut |msg| println!("    {msg}"))
        .map_err(|e| e.to_string())?;
    println!(
        "    kernel {}\n    initrd {}",
        image.kernel.display(),
        image.initrd.display()
    );
    Ok(image)
}

/// `cargo xtask images`.
pub fn run() -> Result<()> {
    crate::tools::ensure_tools()?;
    build().map(|_| ())
}
