//! The freestanding test guest (guest/freestanding, `vshm-guest`): built from its own cargo
//! workspace, the one way every user does it (the tests, `cargo xtask demo --vhost-user`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The flags the guest is built with: no SSE, because on PVM (these test machines) KVM's
/// instruction emulator runs every guest instruction and has no SSE arithmetic
/// (guest/freestanding/README.md).
pub const RUSTFLAGS: &str = "-C target-feature=-sse,-sse2";

/// Builds the guest (release) into `target_dir` with `cargo` and returns its ELF's path.
pub fn build(cargo: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("images/ is not inside the workspace")?;
    let dir = root.join("guest/freestanding");
    let out = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(&dir)
        // Only these flags (not the ones of whatever cargo runs us).
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", RUSTFLAGS)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} to build guest/freestanding: {e}",
                cargo.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "building guest/freestanding failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let elf = target_dir.join("release/vshm-guest");
    if elf.is_file() {
        Ok(elf)
    } else {
        Err(format!("{} is missing after the build", elf.display()))
    }
}
