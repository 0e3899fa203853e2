//! `cargo xtask dist --check` (a step of `cargo xtask test`): installs the package on this
//! machine with apt-get, checks its files and the `vshm` user, runs vshmd as that user from
//! the default configuration, attaches a host peer, and removes everything again (package,
//! user, and the libvirt-qemu group if it created it).
//!
//! Needs root (CI runs as root); elsewhere it says why it skipped. Where systemd is PID 1
//! it would start the unit; on these machines it is not, so vshmd is started as the unit
//! would start it (user vshm, its groups, /run/vshm) and the skip is printed.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{capture_checked, describe, step, wait_timeout, KillOnDrop, Result};

const SOCKET: &str = "/run/vshm/default.sock";
const CONTROL: &str = "/run/vshm/default.sock.ctl";

/// Files the package must have put in place.
const INSTALLED: &[&str] = &[
    "/usr/sbin/vshmd",
    "/usr/bin/vshmctl",
    "/usr/bin/vshm",
    "/lib/systemd/system/vshmd@.service",
    "/usr/share/vshm/systemd/lock.conf",
    "/etc/vshm/default.toml",
    "/usr/share/man/man8/vshmd.8.gz",
    "/usr/share/man/man1/vshmctl.1.gz",
    "/usr/share/man/man1/vshm.1.gz",
    "/usr/share/bash-completion/completions/vshmctl",
    "/usr/share/zsh/vendor-completions/_vshm",
    "/usr/share/fish/vendor_completions.d/vshmd.fish",
    "/usr/share/doc/vshm/copyright",
];

/// What the check changed on the machine, undone when dropped (also on failure).
#[derive(Debug, Default)]
struct Cleanup {
    package: bool,
    user: bool,
    group: bool,
    run_dir: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let quiet = |program: &str, args: &[&str]| {
            let mut cmd = Command::new(program);
            cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
            println!("$ {}", describe(&cmd));
            if let Err(e) = capture_checked(&mut cmd, Duration::from_secs(120)) {
                eprintln!("cleanup: {e}");
            }
        };
        if self.package {
            // purge: the conffile /etc/vshm/default.toml goes too.
            quiet("apt-get", &["purge", "-y", "-q", "vshm"]);
        }
        if self.user {
            quiet("userdel", &["vshm"]);
            // adduser --group made a group of the same name.
            if exists("group", "vshm") {
                quiet("groupdel", &["vshm"]);
            }
        }
        if self.group {
            quiet("groupdel", &["libvirt-qemu"]);
        }
        if self.run_dir {
            let _ = fs::remove_dir_all("/run/vshm");
        }
    }
}

/// Whether `getent DATABASE NAME` finds it.
fn exists(database: &str, name: &str) -> bool {
    Command::new("getent")
        .args([database, name])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    println!("$ {}", describe(&cmd));
    Ok(capture_checked(&mut cmd, Duration::from_secs(180))?.stdout_text())
}

fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Installs `deb`, checks it, runs it, removes it.
pub fn check(deb: &Path) -> Result<()> {
    step("installing the package and running vshmd from it");
    if !is_root() {
        println!("==> dist check: SKIPPED: installing a package needs root (CI runs as root)");
        return Ok(());
    }
    if Command::new("dpkg")
        .args(["-s", "vshm"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        // On CI it can only be what an interrupted earlier run left; elsewhere it may be
        // the administrator's, which the check would remove.
        if std::env::var("CI").as_deref() != Ok("true") {
            return Err("package vshm is already installed here: remove it first \
                        (apt-get purge vshm), the check would remove it"
                .into());
        }
        run("apt-get", &["purge", "-y", "-q", "vshm"])?;
    }
    let mut cleanup = Cleanup {
        user: !exists("passwd", "vshm"),
        ..Cleanup::default()
    };
    // Debian's libvirt creates this group; stand in for it so that the default
    // configuration (socket_group = "libvirt-qemu") and the postinst are exercised.
    if !exists("group", "libvirt-qemu") {
        run("groupadd", &["--system", "libvirt-qemu"])?;
        cleanup.group = true;
    }
    let deb_arg = deb
        .canonicalize()
        .map_err(|e| format!("{}: {e}", deb.display()))?;
    cleanup.package = true;
    run(
        "apt-get",
        &[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            &deb_arg.to_string_lossy(),
        ],
    )?;

    for f in INSTALLED {
        if !Path::new(f).exists() {
            return Err(format!("the package did not install {f}"));
        }
    }
    let groups = run("id", &["-nG", "vshm"])?;
    if !groups.split_whitespace().any(|g| g == "libvirt-qemu") {
        return Err(format!(
            "user vshm is not in group libvirt-qemu (groups: {groups})"
        ));
    }
    println!("user vshm exists, groups: {}", groups.trim());
    let version = run("vshmd", &["--version"])?;
    println!("{}", version.trim());

    let man = if Command::new("man").arg("--version").output().is_ok() {
        "--man=yes"
    } else {
        "--man=no"
    };
    run(
        "systemd-analyze",
        &["verify", man, "/lib/systemd/system/vshmd@default.service"],
    )?;

    if Path::new("/run/systemd/system").exists() {
        println!("==> systemd is PID 1 here, but the check runs vshmd directly as well");
    } else {
        println!(
            "==> not starting vshmd@default.service: systemd is not PID 1 on this machine \
             (no /run/systemd/system); running vshmd as the unit would (user vshm, /run/vshm)"
        );
    }
    // What RuntimeDirectory=vshm would do.
    if !Path::new("/run/vshm").exists() {
        cleanup.run_dir = true;
    }
    run(
        "install",
        &["-d", "-o", "vshm", "-g", "vshm", "-m", "0755", "/run/vshm"],
    )?;
    // setpriv execs vshmd itself (no forked child to lose track of); --init-groups gives
    // it vshm's groups, libvirt-qemu among them, as User= does.
    let mut vshmd_cmd = Command::new("setpriv");
    vshmd_cmd
        .args([
            "--reuid=vshm",
            "--regid=vshm",
            "--init-groups",
            "/usr/sbin/vshmd",
            "--config",
            "/etc/vshm/default.toml",
            "--log",
            "stderr",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    println!("$ {}", describe(&vshmd_cmd));
    let mut vshmd = KillOnDrop::new(
        vshmd_cmd
            .spawn()
            .map_err(|e| format!("cannot start vshmd: {e}"))?,
    );
    let started = Instant::now();
    while !Path::new(CONTROL).exists() {
        if let Some(status) = vshmd.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("vshmd exited at start ({status})"));
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err("vshmd did not create its sockets within 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let meta = fs::metadata(SOCKET).map_err(|e| format!("{SOCKET}: {e}"))?;
    let group = run("stat", &["-c", "%U:%G", SOCKET])?;
    if meta.permissions().mode() & 0o777 != 0o660 || group.trim() != "vshm:libvirt-qemu" {
        return Err(format!(
            "{SOCKET} is {} {:o}, expected vshm:libvirt-qemu 660",
            group.trim(),
            meta.permissions().mode() & 0o777
        ));
    }
    println!("{SOCKET}: {} 660", group.trim());

    // A host peer attaches through the socket.
    run(
        "vshm",
        &[
            "--socket",
            SOCKET,
            "create",
            "dist-check",
            "--max",
            "64K",
            "--persistent",
        ],
    )?;
    let status = run("vshmctl", &["--control", CONTROL, "status"])?;
    if !status.contains("dist-check") {
        return Err(format!(
            "vshmctl status does not show the section:\n{status}"
        ));
    }
    print!("{status}");

    // xtask is std only: kill(1) sends the SIGTERM systemd would send.
    let pid = vshmd.id();
    let mut term = Command::new("kill");
    term.args(["-TERM", &pid.to_string()]);
    capture_checked(&mut term, Duration::from_secs(10))?;
    let exited = wait_timeout(&mut vshmd, Duration::from_secs(20))
        .map_err(|e| e.to_string())?
        .ok_or("vshmd did not stop within 20 s of SIGTERM")?;
    if !exited.success() {
        return Err(format!("vshmd exited with {exited} after SIGTERM"));
    }
    if Path::new(SOCKET).exists() {
        return Err(format!("vshmd left {SOCKET} behind"));
    }
    let user_was_ours = cleanup.user;
    drop(cleanup);
    if Path::new("/usr/sbin/vshmd").exists() || (user_was_ours && exists("passwd", "vshm")) {
        return Err("removing the package left /usr/sbin/vshmd or the vshm user".into());
    }
    println!("==> dist check ok: installed, ran as vshm, attached a peer, removed");
    Ok(())
}
