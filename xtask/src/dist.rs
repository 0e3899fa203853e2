//! `cargo xtask dist`: release binaries, their man pages and completions, and a Debian
//! package `target/dist/vshm_<version>_<arch>.deb` with them, the systemd unit, the
//! default configuration and the maintainer scripts (packaging/).
//!
//! The package is a staged tree packed by `dpkg-deb --build`: dpkg-deb is on every Debian
//! machine, where cargo-deb would be one more tool to build or download, and the tree is
//! short enough to state here in full.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::util::{capture_checked, cargo, run_checked, step, target_dir, workspace_root, Result};

/// The cargo profile of the packaged binaries (Cargo.toml: release without debug info).
const PROFILE: &str = "packaged";

/// Binaries: (name, where it is installed, man section).
const BINARIES: &[(&str, &str, &str)] = &[
    ("vshmd", "usr/sbin", "8"),
    ("vshmctl", "usr/bin", "1"),
    ("vshm", "usr/bin", "1"),
];

/// Files copied from the repository: (source, destination in the package, mode).
const FILES: &[(&str, &str, u32)] = &[
    (
        "packaging/systemd/vshmd@.service",
        "lib/systemd/system/vshmd@.service",
        0o644,
    ),
    (
        "packaging/systemd/lock.conf",
        "usr/share/vshm/systemd/lock.conf",
        0o644,
    ),
    ("packaging/default.toml", "etc/vshm/default.toml", 0o644),
    ("packaging/debian/postinst", "DEBIAN/postinst", 0o755),
    ("packaging/debian/prerm", "DEBIAN/prerm", 0o755),
    ("packaging/debian/postrm", "DEBIAN/postrm", 0o755),
    (
        "packaging/debian/copyright",
        "usr/share/doc/vshm/copyright",
        0o644,
    ),
    ("README.md", "usr/share/doc/vshm/README.md", 0o644),
    ("docs/CONFIG.md", "usr/share/doc/vshm/CONFIG.md", 0o644),
    ("docs/GUEST.md", "usr/share/doc/vshm/GUEST.md", 0o644),
    ("docs/MONITOR.md", "usr/share/doc/vshm/MONITOR.md", 0o644),
    ("docs/SECURITY.md", "usr/share/doc/vshm/SECURITY.md", 0o644),
    (
        "docs/vshm.example.toml",
        "usr/share/doc/vshm/vshm.example.toml",
        0o644,
    ),
];

/// Configuration files dpkg keeps the administrator's edits of.
const CONFFILES: &[&str] = &["/etc/vshm/default.toml"];

/// Where the package and its pieces go.
pub fn dist_dir() -> PathBuf {
    target_dir().join("dist")
}

/// Builds everything and returns the package's path.
pub fn build() -> Result<PathBuf> {
    step(format!("building the release binaries (profile {PROFILE})"));
    let mut build = cargo();
    build.args(["build", "--profile", PROFILE, "--bins"]);
    for p in ["vshm-backend", "vshm-monitor", "vshm"] {
        build.args(["--package", p]);
    }
    run_checked(&mut build)?;

    let version = env!("CARGO_PKG_VERSION");
    let arch = dpkg_architecture()?;
    let dist = dist_dir();
    let stage = dist.join("stage");
    let docs = dist.join("docs");
    for dir in [&stage, &docs] {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(|e| format!("clearing {}: {e}", dir.display()))?;
        }
    }

    step("man pages and completions (each binary's --generate-docs)");
    let built = target_dir().join(PROFILE);
    for (name, dest, section) in BINARIES {
        let binary = built.join(name);
        run_checked(Command::new(&binary).arg("--generate-docs").arg(&docs))?;
        install(&binary, &stage.join(dest).join(name), 0o755)?;
        let page = format!("{name}.{section}");
        install(
            &docs.join("man").join(&page),
            &stage.join(format!("usr/share/man/man{section}/{page}")),
            0o644,
        )?;
        let completions = docs.join("completions");
        for (from, to) in [
            (
                format!("bash/{name}"),
                format!("usr/share/bash-completion/completions/{name}"),
            ),
            (
                format!("zsh/_{name}"),
                format!("usr/share/zsh/vendor-completions/_{name}"),
            ),
            (
                format!("fish/{name}.fish"),
                format!("usr/share/fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            install(&completions.join(from), &stage.join(to), 0o644)?;
        }
    }
    // Debian policy: man pages compressed, reproducibly (-n: no name or time stamp).
    let man = stage.join("usr/share/man");
    let mut gzip = Command::new("gzip");
    gzip.args(["-9", "-n"]);
    for (name, _, section) in BINARIES {
        gzip.arg(man.join(format!("man{section}/{name}.{section}")));
    }
    run_checked(&mut gzip)?;

    step("staging the package tree");
    let root = workspace_root();
    for (from, to, mode) in FILES {
        install(&root.join(from), &stage.join(to), *mode)?;
    }
    let conffiles: String = CONFFILES.iter().map(|c| format!("{c}\n")).collect();
    write(&stage.join("DEBIAN/conffiles"), &conffiles, 0o644)?;
    let control = fs::read_to_string(root.join("packaging/debian/control.in"))
        .map_err(|e| format!("reading packaging/debian/control.in: {e}"))?
        .replace("@VERSION@", version)
        .replace("@ARCH@", &arch)
        .replace("@SIZE@", &installed_size_kib(&stage)?.to_string());
    write(&stage.join("DEBIAN/control"), &control, 0o644)?;

    let deb = dist.join(format!("vshm_{version}_{arch}.deb"));
    step(format!("dpkg-deb --build -> {}", deb.display()));
    // --root-owner-group: every file root:root whoever builds it (no fakeroot needed).
    run_checked(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    // The package holds it all; the staging copies would only take disk space.
    let _ = fs::remove_dir_all(&stage);
    println!("built {}", deb.display());
    Ok(deb)
}

/// This machine's Debian architecture (amd64 here).
fn dpkg_architecture() -> Result<String> {
    let out = capture_checked(
        Command::new("dpkg").arg("--print-architecture"),
        Duration::from_secs(30),
    )?;
    Ok(out.stdout_text().trim().to_owned())
}

/// Copies `from` to `to` (creating its directory) with permission bits `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    fs::copy(from, to)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", to.display()))
}

/// Writes `text` to `to` with permission bits `mode`.
fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    fs::write(to, text).map_err(|e| format!("writing {}: {e}", to.display()))?;
    fs::set_permissions(to, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", to.display()))
}

/// The control file's Installed-Size: KiB of everything but DEBIAN/.
fn installed_size_kib(stage: &Path) -> Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> std::io::Result<()> {
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            if meta.is_dir() {
                if entry.file_name() != "DEBIAN" {
                    walk(&entry.path(), total)?;
                }
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(stage, &mut total).map_err(|e| format!("sizing {}: {e}", stage.display()))?;
    Ok(total)
}
