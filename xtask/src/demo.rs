//! `cargo xtask demo`: vshmd serving a region to two host processes that share a section.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::tools::ensure_tools;
use crate::util::{
    capture, capture_checked, cargo, indent, run_checked, step, target_dir, wait_timeout,
    KillOnDrop, Result, TempDir,
};

/// What peer A writes and peer B reads back.
const MESSAGE: &str = "hello from peer A";
const SECTION: &str = "demo";
/// Time limit for each one-shot command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long vshmd may take to answer on its control socket, and to exit on SIGTERM.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);

/// The built binaries and the paths of one vshmd instance.
#[derive(Debug)]
struct Setup {
    vshm: PathBuf,
    vshmctl: PathBuf,
    socket: PathBuf,
    control: PathBuf,
}

impl Setup {
    /// `vshm --socket <socket> <args>`.
    fn vshm(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.vshm);
        cmd.arg("--socket").arg(&self.socket).args(args);
        cmd
    }

    /// `vshmctl --control <control> <args>`.
    fn vshmctl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.vshmctl);
        cmd.arg("--control").arg(&self.control).args(args);
        cmd
    }
}

pub fn run() -> Result<()> {
    ensure_tools()?;
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

    step(format!(
        "starting vshmd --socket {} --size 64M",
        setup.socket.display()
    ));
    let log = File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let vshmd = Command::new(bin.join("vshmd"))
        .arg("--socket")
        .arg(&setup.socket)
        .args(["--size", "64M"])
        // Plain log lines (tracing-subscriber honours NO_COLOR): they end up in a file.
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot start vshmd: {e}"))?;
    let mut vshmd = KillOnDrop::new(vshmd);

    let result = session(&setup, &mut vshmd);
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

/// Everything after vshmd started; any error leaves `vshmd` to the caller's guard.
fn session(setup: &Setup, vshmd: &mut KillOnDrop) -> Result<()> {
    step("waiting for vshmd's control socket (vshmctl status)");
    wait_until_up(setup, vshmd)?;

    step(format!(
        "peer A: vshm create {SECTION} --max 1M --initial 64K --persistent"
    ));
    let out = capture_checked(
        &mut setup.vshm(&[
            "create",
            SECTION,
            "--max",
            "1M",
            "--initial",
            "64K",
            "--persistent",
        ]),
        COMMAND_TIMEOUT,
    )?;
    print!("{}", indent(&out.stdout_text()));

    step(format!("peer A: vshm write {SECTION} --data {MESSAGE:?}"));
    let out = capture_checked(
        &mut setup.vshm(&["write", SECTION, "--data", MESSAGE]),
        COMMAND_TIMEOUT,
    )?;
    print!("{}", indent(&out.stdout_text()));

    let len = MESSAGE.len().to_string();
    step(format!("peer B: vshm read {SECTION} --len {len}"));
    let out = capture_checked(
        &mut setup.vshm(&["read", SECTION, "--len", &len]),
        COMMAND_TIMEOUT,
    )?;
    if out.stdout != MESSAGE.as_bytes() {
        return Err(format!(
            "peer B read {:?}, expected {MESSAGE:?}",
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    println!(
        "    peer B read {:?}: matches what peer A wrote",
        out.stdout_text()
    );

    step(format!(
        "holder: vshm hold {SECTION} (until its stdin closes)"
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

    step(format!("vshm delete {SECTION}"));
    let out = capture_checked(&mut setup.vshm(&["delete", SECTION]), COMMAND_TIMEOUT)?;
    print!("{}", indent(&out.stdout_text()));
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
fn wait_until_up(setup: &Setup, vshmd: &mut KillOnDrop) -> Result<()> {
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
/// a `PEER CONNECTED PID HANDLES` row `<id> yes <pid> <n>` with n ≥ 1.
fn check_holder_listed(status: &str, pid: u32) -> Result<()> {
    let pid = pid.to_string();
    let listed = status.lines().any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        matches!(cols.as_slice(), [_, "yes", p, handles]
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
