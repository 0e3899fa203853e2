//! `cargo xtask demo --vhost-user`: vshmd serving its namespace to two `vshm-vmm` VMs through
//! the vshm virtio device (docs/VHOST-USER.md) and to a host process through the ivshmem
//! socket. Each VM runs the freestanding guest built from the no_std core
//! (guest/freestanding) and sees only the sections it opened.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::demo::{start_vshmd, wait_until_up, Setup};
use crate::util::{
    capture_checked, cargo, indent, run_checked, step, target_dir, KillOnDrop, Result, TempDir,
};

const SECTION: &str = "demo";
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// A freestanding guest's whole run (about a microsecond per instruction on PVM).
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds the freestanding guest (its own cargo workspace: panic=abort, a linker script, no
/// SSE).
pub fn guest_elf() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    vshm_images::freestanding::build(Path::new(&cargo), &target_dir().join("freestanding"))
}

/// A VMM running the guest, its lines on a channel.
struct Guest {
    name: &'static str,
    child: KillOnDrop,
    lines: mpsc::Receiver<String>,
}

impl Guest {
    fn start(
        name: &'static str,
        vmm: &Path,
        elf: &Path,
        socket: &Path,
        args: &str,
    ) -> Result<Guest> {
        step(format!(
            "{name}: vshm-vmm --guest vshm-guest --vshm {} --args '{args}'",
            socket.display()
        ));
        let mut child = Command::new(vmm)
            .arg("--guest")
            .arg(elf)
            .arg("--vshm")
            .arg(socket)
            .arg("--args")
            .arg(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start vshm-vmm: {e}"))?;
        let out = child.stdout.take().ok_or("vshm-vmm has no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out)
                .lines()
                .map_while(std::result::Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Guest {
            name,
            child: KillOnDrop::new(child),
            lines,
        })
    }

    /// Prints the guest's lines until one starts with `prefix`; that line.
    fn until(&mut self, prefix: &str) -> Result<String> {
        let deadline = Instant::now() + GUEST_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).map_err(|_| {
                format!(
                    "{}: no line starting {prefix:?} within {GUEST_TIMEOUT:?}",
                    self.name
                )
            })?;
            println!("    {}| {line}", self.name);
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }

    /// Prints the rest of its lines and its exit; fails unless it exited 0.
    fn finish(mut self) -> Result<()> {
        while let Ok(line) = self.lines.recv_timeout(GUEST_TIMEOUT) {
            println!("    {}| {line}", self.name);
        }
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{}'s guest ended with {status}", self.name))
        }
    }
}

pub fn run() -> Result<()> {
    step("building vshmd, vshmctl, vshm and vshm-vmm (cargo build --bins)");
    run_checked(cargo().args(["build", "--bins"]))?;
    step("building the freestanding guest (guest/freestanding)");
    let elf = guest_elf()?;
    let bin = target_dir().join("debug");
    let dir = TempDir::new("vshm-demo-vhost")?;
    let setup = Setup {
        vshm: bin.join("vshm"),
        vshmctl: bin.join("vshmctl"),
        socket: dir.path().join("vshm.sock"),
        control: dir.path().join("vshm.sock.ctl"),
    };
    let vhost = dir.path().join("vshm-vu.sock");
    let log_path = dir.path().join("vshmd.log");
    let mut vshmd = start_vshmd(
        &bin,
        &setup,
        &["--vhost-user".as_ref(), vhost.as_os_str()],
        &log_path,
    )?;
    wait_until_up(&setup, &mut vshmd)?;
    let result = session(&setup, &bin.join("vshm-vmm"), &elf, &vhost);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    step("vshmd's output");
    print!("{}", indent(&log));
    result?;
    step("demo passed");
    Ok(())
}

fn session(setup: &Setup, vmm: &Path, elf: &Path, vhost: &Path) -> Result<()> {
    let mut a = Guest::start(
        "vm-a",
        vmm,
        elf,
        vhost,
        &format!("create {SECTION} 65536; fill {SECTION} 0x41; spin"),
    )?;
    let made = a.until(&format!("vshm-guest: fill {SECTION}"))?;
    if !made.contains("ok") {
        return Err(format!("vm-a could not fill the section: {made}"));
    }
    step(format!(
        "the host reads what vm-a wrote: vshm read {SECTION} --len 16"
    ));
    let read = capture_checked(
        &mut setup.vshm(&["read", SECTION, "--len", "16"]),
        COMMAND_TIMEOUT,
    )?;
    let text = read.stdout_text();
    println!("{}", indent(&text).trim_end());
    if text != "A".repeat(16) {
        return Err(format!("the host read {text:?}, expected 16 'A's"));
    }
    let b = Guest::start(
        "vm-b",
        vmm,
        elf,
        vhost,
        &format!("peek 0 16; open {SECTION} ro; check {SECTION} 0x41; close {SECTION}; peek 0 16"),
    )?;
    b.finish()?;
    step("vshmctl status: the VMs are peers of the region, VIA vhost-user");
    let status = capture_checked(&mut setup.vshmctl(&["status"]), COMMAND_TIMEOUT)?;
    println!("{}", indent(&status.stdout_text()).trim_end());
    step("killing vm-a's VMM: vshmd reclaims its holds");
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = capture_checked(&mut setup.vshm(&["list"]), COMMAND_TIMEOUT)?.stdout_text();
        if !list.contains(SECTION) {
            println!("    {SECTION} is gone: its last holder was vm-a");
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{SECTION} was not reclaimed after vm-a was killed:\n{list}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
