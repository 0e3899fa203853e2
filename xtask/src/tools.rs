//! The system tools the tasks need, and installing the missing ones on Debian.
//!
//! `.ci/run` installs the same packages before calling `cargo xtask test`; this check
//! makes a local run fail early with a useful message instead of halfway through.

use std::process::{Command, Stdio};

use crate::util::{cargo, describe, run_checked, step, Result};

/// A program we run, how to check it works, and the Debian package that provides it.
#[derive(Debug)]
struct Tool {
    /// A program on PATH, or the absolute path of a file that must exist (a library).
    program: &'static str,
    /// Arguments for a harmless run that exits 0 when the tool works.
    probe: &'static [&'static str],
    package: &'static str,
    why: &'static str,
}

/// Tools installed with apt-get when missing. The Rust toolchain is checked separately
/// (it comes from rustup, not apt).
const APT_TOOLS: &[Tool] = &[
    Tool {
        program: "qemu-system-x86_64",
        probe: &["--version"],
        package: "qemu-system-x86",
        why: "a stock QEMU attaches to vshmd in the tests",
    },
    Tool {
        program: "tmux",
        probe: &["-V"],
        package: "tmux",
        why: "`vshmctl top` is tested in a real terminal",
    },
    Tool {
        program: "systemd-analyze",
        probe: &["--version"],
        package: "systemd",
        why: "`systemd-analyze verify` checks vshmd@.service (PID 1 need not be systemd)",
    },
    Tool {
        program: "virsh",
        probe: &["--version"],
        package: "libvirt-clients",
        why: "a libvirt domain attaches in the tests (tests/tests/libvirt.rs)",
    },
    Tool {
        program: "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so",
        probe: &[],
        package: "libvirt-daemon-driver-qemu",
        why: "libvirt's QEMU driver, which virsh loads for `qemu:///embed` (no libvirtd)",
    },
    Tool {
        program: "objcopy",
        probe: &["--version"],
        package: "binutils",
        why: "the freestanding guest's flat image (objcopy -O binary; tests/src/freestanding.rs)",
    },
    Tool {
        program: "pkg-config",
        probe: &["--version"],
        package: "pkg-config",
        why: "the C API's example is compiled with pkg-config's flags (tests/tests/capi.rs)",
    },
    Tool {
        program: "make",
        probe: &["--version"],
        package: "make",
        why: "the vshm guest driver is built with Kbuild (`cargo xtask images`; its kernel \
              headers, whose version is the guest kernel's, are installed by that step)",
    },
    // (and keep PACKAGES in .ci/run in step)
];

/// Checks that everything the tasks need is there; as root with apt-get, installs
/// missing Debian packages, otherwise says what to install.
pub fn ensure_tools() -> Result<()> {
    step("checking tools");
    check_cargo()?;

    let missing: Vec<&Tool> = APT_TOOLS.iter().filter(|t| !works(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let list = missing
        .iter()
        .map(|t| format!("  {} (Debian package {}): {}", t.program, t.package, t.why))
        .collect::<Vec<_>>()
        .join("\n");
    if !(is_root() && on_path("apt-get")) {
        return Err(format!(
            "missing tools:\n{list}\ninstall them with: sudo apt-get install {}",
            packages.join(" ")
        ));
    }
    println!("missing tools:\n{list}\ninstalling with apt-get");
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]);
    let mut install = Command::new("apt-get");
    install
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&packages);
    for cmd in [&mut update, &mut install] {
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        println!("$ {}", describe(cmd));
        run_checked(cmd)?;
    }
    let still: Vec<&str> = missing
        .iter()
        .filter(|t| !works(t))
        .map(|t| t.program)
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "still missing after apt-get install: {}",
            still.join(", ")
        ))
    }
}

/// The Rust toolchain: `cargo --version` must work (with the cargo that runs us).
fn check_cargo() -> Result<()> {
    let out = cargo()
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo: {e} (install Rust with rustup)"))?;
    if !out.status.success() {
        return Err(format!(
            "`cargo --version` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    Ok(())
}

fn works(tool: &Tool) -> bool {
    if tool.program.starts_with('/') && tool.probe.is_empty() {
        return std::path::Path::new(tool.program).exists();
    }
    Command::new(tool.program)
        .args(tool.probe)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Effective uid 0, read from /proc (no libc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
