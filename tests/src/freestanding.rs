//! The freestanding guest (guest/freestanding, `vshm-guest`): built once per test process
//! from its own workspace into `<workspace target>/freestanding`, as the ELF the VMM loads
//! and as a flat image (`objcopy -O binary`) for a VMM that loads flat code.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace's target directory (`target/debug/deps/<test>` → `target`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .expect("the test executable lives in <target>/<profile>/deps")
        .to_path_buf()
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace root")
}

/// Builds the guest (release, without SSE: see guest/freestanding/README.md) and returns
/// the path of its ELF. Once per test process.
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let target = target_dir().join("freestanding");
        let manifest = root().join("guest/freestanding/Cargo.toml");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--quiet", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .current_dir(root().join("guest/freestanding"))
            // Only these flags (not the ones of whatever cargo runs the tests).
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env("RUSTFLAGS", "-C target-feature=-sse,-sse2")
            .output()
            .expect("run cargo to build guest/freestanding");
        assert!(
            out.status.success(),
            "building guest/freestanding failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let elf = target.join("release/vshm-guest");
        assert!(elf.exists(), "{} is missing after the build", elf.display());
        elf
    })
    .clone()
}

/// The guest as a flat image for 0x100000 (`objcopy -O binary` of [`guest_elf`]; binutils,
/// which the C toolchain cargo links with brings). Once per test process.
pub fn guest_flat() -> PathBuf {
    static FLAT: OnceLock<PathBuf> = OnceLock::new();
    FLAT.get_or_init(|| {
        let elf = guest_elf();
        let flat = elf.with_extension("bin");
        let out = Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&elf)
            .arg(&flat)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run objcopy ({e}): install binutils (apt-get install binutils)")
            });
        assert!(
            out.status.success(),
            "objcopy -O binary {} failed: {}",
            elf.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        flat
    })
    .clone()
}
