//! The packaging files are what systemd accepts: `systemd-analyze verify` (offline; PID 1
//! need not be systemd) on vshmd@.service with the `--lock` drop-in, and the default
//! configuration the package installs is one vshmd accepts.

use std::path::Path;
use std::process::Command;

use vshm_backend::config::{resolve_text, Options};
use vshm_tests::{bin, stderr, TempDir};

fn packaging() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging"))
}

#[test]
fn the_unit_and_its_lock_drop_in_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // CI installs systemd (.ci/run); a developer's machine may not have it.
        println!("SKIPPED: systemd-analyze is not installed (Debian package systemd)");
        return;
    }
    let dir = TempDir::new("unit");
    let unit = std::fs::read_to_string(packaging().join("systemd/vshmd@.service"))
        .expect("read vshmd@.service");
    assert!(unit.contains("ExecStart=/usr/sbin/vshmd "), "{unit}");
    // verify insists that ExecStart's program exists: point it at the one just built.
    let unit = unit.replace("/usr/sbin/vshmd", &bin("vshmd").to_string_lossy());
    std::fs::write(dir.path().join("vshmd@.service"), unit).expect("write unit");
    let drop_in = dir.path().join("vshmd@default.service.d");
    std::fs::create_dir(&drop_in).expect("drop-in dir");
    std::fs::copy(
        packaging().join("systemd/lock.conf"),
        drop_in.join("lock.conf"),
    )
    .expect("copy lock.conf");
    // --man=no: the man page exists only once the package is installed.
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("vshmd@default.service"))
        .output()
        .expect("run systemd-analyze");
    // verify exits 0 on unknown keys and misspelt values: any message is a failure.
    assert!(
        out.status.success() && stderr(&out).trim().is_empty(),
        "systemd-analyze verify: {}\n{}",
        out.status,
        stderr(&out)
    );
}

#[test]
fn the_default_configuration_is_one_vshmd_accepts() {
    let path = packaging().join("default.toml");
    let text = std::fs::read_to_string(&path).expect("read default.toml");
    let libvirt = "socket_group = \"libvirt-qemu\"";
    assert!(text.contains(libvirt), "{text}");
    // libvirt-qemu may not exist here: every other key is judged with group root.
    let text = text.replace(libvirt, "socket_group = \"root\"");
    let configs = resolve_text(&Options::default(), &path, &text).expect("valid");
    let [config] = configs.as_slice() else {
        panic!("one region expected: {configs:?}")
    };
    assert_eq!(config.socket, Path::new("/run/vshm/default.sock"));
    assert_eq!(config.control, Path::new("/run/vshm/default.sock.ctl"));
}
