//! `cargo xtask demo`: vshmd serving a region to two QEMU guests (and a host process) that
//! share a section.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vshm_images::{Image, Vm, VmConfig};

use crate::tools::ensure_tools;
use crate::util::{
    capture, capture_checked, cargo, indent, run_checked, step, target_dir, wait_timeout,
    KillOnDrop, Result, TempDir,
};

/// What guest A writes and guest B reads back.
const MESSAGE: &str = "hello from guest A";
/// How long a guest may take to boot (TCG on a small, busy machine is the slow case).
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// Time limit for one command inside a guest (TCG is slow when the host is busy).
const GUEST_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const SECTION: &str = "demo";
/// Time limit for each one-shot command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long vshmd may take to answer on its control socket, and to exit on SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// The built binaries and the paths of one vshmd instance.
#[derive(Debug)]
pub(crate) struct Setup {
    pub(crate) vshm: PathBuf,
    pub(crate) vshmctl: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) control: PathBuf,
}

impl Setup {
    /// `vshm --socket <socket> <args>`.
    pub(crate) fn vshm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.vshm);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd
    }

    /// `vshmctl --control <control> <args>`.
    pub(crate) fn vshmctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.vshmctl);
        cmd.arg("--control").arg(&self.control).args(args);
        cmd
    }
}

pub fn run() -> Result<()> {
    ensure_tools()?;
    let image = crate::images::build()?;
    step("building vshmd, vshmctl and vshm (cargo build --bins)");
    run_checked(cargo().args(["build", "--bins"]))?;
    let bin = target_dir().join("debug");
    for name in ["vshmd", "vshmctl", "vshm"] {
        if !bin.join(name).is_file() {
            return Err(format!("{} was not built", bin.join(name).display()));
        }
    }

    // Declared first, so it is removed last: after the child guards below kill vshmd.
    let dir = TempDir::new("vshm-demo")?;
    let setup = Setup {
        vshm: bin.join("vshm"),
        vshmctl: bin.join("vshmctl"),
        socket: dir.path().join("vshm.sock"),
        control: dir.path().join("vshm.sock.ctl"),
    };
    let log_path = dir.path().join("vshmd.log");

    let mut vshmd = start_vshmd(&bin, &setup, &[], &log_path)?;

    let result = session(&setup, &mut vshmd, &image, dir.path());
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    match result {
        Ok(()) => {
            step("vshmd's output");
            print!("{}", indent(&log));
            step("demo passed");
            Ok(())
        }
        Err(e) => {
            eprintln!("\nvshmd's output so far:\n{}", indent(&log));
            Err(e)
        }
    }
}

/// Starts `bin/vshmd --socket <setup.socket> --size 64M <extra>`, its output to `log_path`
/// (plain lines: tracing-subscriber honours NO_COLOR); killed when the guard drops.
pub(crate) fn start_vshmd(
    bin: &Path,
    setup: &Setup,
    extra: &[&std::ffi::OsStr],
    log_path: &Path,
) -> Result<KillOnDrop> {
    let shown: String = extra
        .iter()
        .map(|a| format!(" {}", a.to_string_lossy()))
        .collect();
    step(format!(
        "starting vshmd --socket {} --size 64M{shown}",
        setup.socket.display()
    ));
    let log = File::create(log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let vshmd = Command::new(bin.join("vshmd"))
        .arg("--socket")
        .arg(&setup.socket)
        .args(["--size", "64M"])
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start vshmd: {e}"))?;
    Ok(KillOnDrop::new(vshmd))
}

/// Runs `cmd` in a guest, prints its output, and fails unless it exits 0.
fn in_guest(vm: &mut Vm, cmd: &str) -> Result<String> {
    step(format!("{}: {cmd}", vm.name()));
    let out = vm
        .run(cmd, GUEST_COMMAND_TIMEOUT)
        .map_err(|e| e.to_string())?;
    if !out.text.is_empty() {
        println!("{}", indent(&out.text).trim_end());
    }
    if !out.success() {
        return Err(format!("`{cmd}` in {} exited {}", vm.name(), out.status));
    }
    Ok(out.text)
}

/// Everything after vshmd started; any error leaves `vshmd` to the caller's guard (and the
/// guests to theirs).
fn session(
    setup: &Setup,
    vshmd: &mut KillOnDrop,
    image: &Image,
    dir: &std::path::Path,
) -> Result<()> {
    step("waiting for vshmd's control socket (vshmctl status)");
    wait_until_up(setup, vshmd)?;

    let accel = vshm_images::accelerator();
    step(format!("booting guests vm-a and vm-b ({accel:?})"));
    let started = Instant::now();
    // Both boot at once; QEMU is tied to this thread (PR_SET_PDEATHSIG).
    let starting = ["vm-a", "vm-b"]
        .iter()
        .map(|name| Vm::start(&VmConfig::new(name, image, &setup.socket, dir)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut vms = Vec::new();
    for s in starting {
        vms.push(s.wait_ready(BOOT_TIMEOUT).map_err(|e| e.to_string())?);
    }
    println!(
        "    both guests up after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut b = vms.pop().ok_or("no vm-b")?;
    let mut a = vms.pop().ok_or("no vm-a")?;
    in_guest(&mut a, "vshm peers")?;

    in_guest(
        &mut a,
        &format!("vshm create {SECTION} --max 1M --initial 64K --persistent"),
    )?;
    in_guest(&mut a, &format!("vshm write {SECTION} --data '{MESSAGE}'"))?;
    let read = in_guest(
        &mut b,
        &format!("vshm read {SECTION} --len {}", MESSAGE.len()),
    )?;
    if read != MESSAGE {
        return Err(format!("vm-b read {read:?}, expected {MESSAGE:?}"));
    }
    println!("    vm-b read what vm-a wrote, through vshmd's region");

    // Events share the namespace: vm-b waits (in the background), vm-a signals.
    in_guest(&mut a, "vshm event create frame-ready --persistent")?;
    in_guest(
        &mut b,
        "vshm event wait frame-ready --timeout 30000 > /tmp/wait.out 2>&1 & echo $! > /tmp/wait.pid",
    )?;
    in_guest(&mut a, "vshm event signal frame-ready")?;
    let woke = in_guest(
        &mut b,
        "p=$(cat /tmp/wait.pid); while kill -0 $p 2>/dev/null; do sleep 0.05; done; cat /tmp/wait.out",
    )?;
    if !woke.contains("was signalled") {
        return Err(format!(
            "vm-b's wait said {woke:?}, expected \"... was signalled\""
        ));
    }
    println!("    vm-b woke on vm-a's event, through vshmd");
    in_guest(&mut b, "vshm list")?;
    step(format!(
        "vm-b keeps a handle open: vshm hold {SECTION} (in the background)"
    ));
    let held = b
        .hold("demo", &format!("hold {SECTION}"), GUEST_COMMAND_TIMEOUT)
        .map_err(|e| e.to_string())?;
    if !held.success() {
        return Err(format!("vm-b could not hold {SECTION}: {}", held.text));
    }

    step(format!(
        "a host process holds it too: vshm hold {SECTION} (until its stdin closes)"
    ));
    let holder = setup
        .vshm(&["hold", SECTION])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start vshm hold: {e}"))?;
    let mut holder = KillOnDrop::new(holder);
    let first = first_line(&mut holder, DAEMON_TIMEOUT)?;
    print!("{}", indent(&first));
    if !first.starts_with("holding") {
        return Err(format!(
            "vshm hold said {first:?}, expected \"holding ...\""
        ));
    }

    step("vshmctl status");
    let out = capture_checked(&mut setup.vshmctl(&["status"]), COMMAND_TIMEOUT)?;
    let status = out.stdout_text();
    print!("{}", indent(&status));
    check_holder_listed(&status, holder.id())?;

    step("releasing the holder (closing its stdin)");
    drop(holder.stdin.take());
    let exit = wait_timeout(&mut holder, DAEMON_TIMEOUT)
        .map_err(|e| format!("waiting for vshm hold: {e}"))?
        .ok_or("vshm hold did not exit after its stdin closed")?;
    if !exit.success() {
        return Err(format!("vshm hold failed ({exit})"));
    }

    step("vm-b releases its handle (SIGTERM to its vshm hold)");
    b.release("demo", GUEST_COMMAND_TIMEOUT)
        .map_err(|e| e.to_string())?;
    in_guest(&mut b, &format!("vshm delete {SECTION}"))?;
    let out = capture_checked(&mut setup.vshm(&["list", "--json"]), COMMAND_TIMEOUT)?;
    if out
        .stdout_text()
        .contains(&format!("\"name\":\"{SECTION}\""))
    {
        return Err(format!(
            "{SECTION:?} is still listed after delete: {}",
            out.stdout_text().trim()
        ));
    }
    println!("    {SECTION:?} is gone from the namespace");

    step("stopping the guests");
    drop(a);
    drop(b);

    step("stopping vshmd (SIGTERM)");
    sigterm(vshmd.id())?;
    let exit = wait_timeout(vshmd, DAEMON_TIMEOUT)
        .map_err(|e| format!("waiting for vshmd: {e}"))?
        .ok_or_else(|| format!("vshmd did not exit within {DAEMON_TIMEOUT:?} of SIGTERM"))?;
    if !exit.success() {
        return Err(format!("vshmd exited with {exit} on SIGTERM, expected 0"));
    }
    for path in [&setup.socket, &setup.control] {
        if path.exists() {
            return Err(format!("vshmd exited but left {} behind", path.display()));
        }
    }
    println!("    vshmd exited 0 and removed its sockets");
    Ok(())
}

/// Polls `vshmctl status --json` until it answers; fails if vshmd exits or the time is up.
pub(crate) fn wait_until_up(setup: &Setup, vshmd: &mut KillOnDrop) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = vshmd
            .try_wait()
            .map_err(|e| format!("waiting for vshmd: {e}"))?
        {
            return Err(format!("vshmd exited during startup ({status})"));
        }
        let out = capture(&mut setup.vshmctl(&["status", "--json"]), COMMAND_TIMEOUT)?;
        if out.status.success() {
            println!(
                "    vshmd answered after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        if started.elapsed() >= DAEMON_TIMEOUT {
            return Err(format!(
                "vshmd's control socket {} did not answer within {}s; last vshmctl error: {}",
                setup.control.display(),
                DAEMON_TIMEOUT.as_secs(),
                out.stderr_text().trim()
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The first line `child` prints on stdout, waiting at most `timeout`.
fn first_line(child: &mut KillOnDrop, timeout: Duration) -> Result<String> {
    let stdout = child.stdout.take().ok_or("child has no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    // The thread keeps reading (and discarding) after the first line, so the child never
    // blocks on a full pipe; it ends when the child exits.
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    match rx.recv_timeout(timeout) {
        Ok(line) if line.is_empty() => {
            let status = child.try_wait().ok().flatten();
            Err(format!(
                "it closed stdout without printing anything (exit: {status:?})"
            ))
        }
        Ok(line) => Ok(line),
        Err(_) => Err(format!("no output within {}s", timeout.as_secs())),
    }
}

/// The human status table must show the holder as a connected peer with a handle open:
/// a `PEER LABEL PID CONNECTED SINCE HANDLES HELD` row `<id> <label> <pid> yes <t> <n> ...`
/// with n ≥ 1.
fn check_holder_listed(status: &str, pid: u32) -> Result<()> {
    let pid = pid.to_string();
    let listed = status.lines().any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        matches!(cols.as_slice(), [_, _, p, "yes", _, handles, ..]
            if *p == pid && handles.parse::<u64>().is_ok_and(|h| h >= 1))
    });
    if listed {
        println!("    the holder (pid {pid}) is a connected peer with an open handle");
        Ok(())
    } else {
        Err(format!(
            "vshmctl status does not list the holder (pid {pid}) as a connected peer with a handle"
        ))
    }
}

/// Sends SIGTERM with the shell's `kill` builtin (no libc dependency).
fn sigterm(pid: u32) -> Result<()> {
    run_checked(
        Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh"])
            .arg(pid.to_string()),
    )
}
