//! A stock QEMU attaches to vshmd as an ivshmem-doorbell peer: the handshake is accepted,
//! the region appears as BAR2, and killing QEMU reclaims its peer. (Booting guests that use
//! the region is the job of the VM scenario tests.)

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use vshm_tests::{command, kill9, wait_for, watchdog, Backend};

fn qemu() -> &'static Path {
    let p = Path::new("/usr/bin/qemu-system-x86_64");
    assert!(
        p.exists(),
        "qemu-system-x86_64 is missing: install qemu-system-x86 (.ci/run does)"
    );
    p
}

/// Sends one HMP command and returns what QEMU printed before the next prompt.
fn hmp(monitor: &Path, cmd: &str) -> String {
    let mut s = UnixStream::connect(monitor).expect("monitor");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_until_prompt = |s: &mut UnixStream, out: &mut Vec<u8>| loop {
        let n = s.read(&mut buf).expect("read monitor");
        assert!(n > 0, "monitor closed");
        out.extend_from_slice(&buf[..n]);
        if out.ends_with(b"(qemu) ") {
            break;
        }
    };
    read_until_prompt(&mut s, &mut out);
    out.clear();
    s.write_all(format!("{cmd}\n").as_bytes())
        .expect("write monitor");
    read_until_prompt(&mut s, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_stock_qemu_attaches_sees_the_region_as_bar2_and_is_reclaimed_when_killed() {
    watchdog(Duration::from_secs(60), || {
        let b = Backend::start(&["--size", "16M"]);
        let monitor = b.dir().join("qemu.mon");
        let mut vm = command(qemu())
            .args([
                "-M",
                "q35",
                "-accel",
                "tcg",
                "-display",
                "none",
                "-nodefaults",
                "-S",
            ])
            .arg("-chardev")
            .arg(format!("socket,path={},id=vshm0", b.socket.display()))
            .args(["-device", "ivshmem-doorbell,chardev=vshm0,vectors=2"])
            .arg("-monitor")
            .arg(format!("unix:{},server,nowait", monitor.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu");
        let qemu_pid = u64::from(vm.id());
        assert!(
            wait_for(Duration::from_secs(20), || {
                b.status()["peers"].as_array().is_some_and(|p| {
                    p.iter()
                        .any(|p| p["connected"] == true && p["pid"].as_u64() == Some(qemu_pid))
                })
            }),
            "QEMU (pid {qemu_pid}) completed the ivshmem handshake: {}",
            b.status()
        );
        assert!(wait_for(Duration::from_secs(10), || monitor.exists()));
        let pci = hmp(&monitor, "info pci");
        assert!(pci.contains("1af4:1110"), "an ivshmem device: {pci}");
        let bar2 = pci
            .lines()
            .find(|l| l.trim_start().starts_with("BAR2:"))
            .expect("BAR2 listed");
        // "BAR2: ... at 0x<start> [0x<end>]": QEMU prints start + size - 1 (wrapping while the
        // BAR is unassigned), so the size is end - start + 1.
        let hex = |t: &str| u64::from_str_radix(t.trim_start_matches("0x"), 16).expect("hex");
        let start = bar2
            .split(" at ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("start");
        let end = bar2
            .split('[')
            .nth(1)
            .and_then(|r| r.split(']').next())
            .expect("end");
        let size = hex(end).wrapping_sub(hex(start)).wrapping_add(1);
        assert_eq!(size, 16 << 20, "BAR2 is the 16 MiB region: {bar2}");
        // A host peer works alongside, and QEMU's death is reclaimed.
        assert!(b
            .vshm(&["create", "beside-qemu", "--max", "4K", "--persistent"])
            .status
            .success());
        kill9(&mut vm);
        assert!(
            wait_for(Duration::from_secs(1), || {
                b.status()["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().all(|p| p["connected"] == false))
            }),
            "QEMU's peer reclaimed within 1 s"
        );
        assert!(b.vshm(&["open", "beside-qemu"]).status.success());
    });
}
