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

/// Builds the guest (release, without SSE: see guest/freestanding/README.md) and returns
/// the path of its ELF. Once per test process.
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        vshm_images::freestanding::build(Path::new(&cargo), &target_dir().join("freestanding"))
            .unwrap_or_else(|e| panic!("{e}"))
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
