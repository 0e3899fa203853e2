//! What every benchmark needs: errors with context, a real vshmd in a private directory,
//! this binary spawned again as a peer in its own process (a role), and timing loops.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use vshm::host::HostTransport;
use vshm::Namespace;

/// Errors are messages with their context.
pub type Result<T> = std::result::Result<T, String>;

/// `.ctx("what")`: any displayable error becomes "what: error".
pub trait Context<T> {
    /// Adds `what` in front of the error.
    fn ctx(self, what: impl std::fmt::Display) -> Result<T>;
}

impl<T, E: std::fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Sample counts: the full run, or the smoke run that only proves every benchmark still
/// runs.
#[derive(Clone, Copy, Debug)]
pub struct Counts {
    /// Samples per measured set.
    pub samples: usize,
    /// Discarded samples before them.
    pub warmup: usize,
}

/// Times `batch` calls of `op` per sample, after `counts.warmup` samples; ns per call.
pub fn measure(counts: Counts, batch: u32, mut op: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(counts.samples);
    for i in 0..counts.warmup + counts.samples {
        let t = Instant::now();
        for _ in 0..batch {
            op()?;
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / f64::from(batch);
        if i >= counts.warmup {
            out.push(ns);
        }
    }
    Ok(out)
}

/// [`measure`] of two operations, sample for sample alternately, so drift on a shared
/// machine hits both alike.
pub fn measure_pair(
    counts: Counts,
    batch: u32,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let one = Counts {
        samples: 1,
        warmup: 0,
    };
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in 0..counts.warmup + counts.samples {
        let x = measure(one, batch, &mut a)?;
        let y = measure(one, batch, &mut b)?;
        if i >= counts.warmup {
            xs.extend(x);
            ys.extend(y);
        }
    }
    Ok((xs, ys))
}

/// A binary beside this one (`vshmd` is built into the same target directory).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().ctx("where is this executable")?;
    let path = exe
        .parent()
        .ok_or("this executable has no directory")?
        .join(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(format!(
            "{} is missing: build it (`cargo build --release -p vshm-backend --bins`, which \
             `cargo xtask bench` does)",
            path.display()
        ))
    }
}

/// A command whose process dies with this one (PR_SET_PDEATHSIG).
pub fn command(program: &Path) -> Command {
    let mut c = Command::new(program);
    // SAFETY: prctl in the forked child before exec: async-signal-safe, and it touches no
    // memory of the parent.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

/// A private directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> Result<TempDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vshm-bench-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).ctx(format!("create {}", p.display()))?;
        Ok(TempDir(p))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running vshmd on a socket in its own temp dir; stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Vshmd {
    child: Child,
    /// Its ivshmem socket.
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Vshmd {
    /// Starts vshmd with `args` after `--socket` and waits until a peer can attach.
    pub fn start(args: &[String]) -> Result<Vshmd> {
        let dir = TempDir::new("vshmd")?;
        let socket = dir.path().join("vshm.sock");
        let program = sibling("vshmd")?;
        let log = std::fs::File::create(dir.path().join("vshmd.log")).ctx("vshmd log")?;
        let child = command(&program)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .ctx(format!("start {}", program.display()))?;
        let mut d = Vshmd {
            child,
            socket,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if d.socket.exists() && HostTransport::connect(&d.socket).is_ok() {
                return Ok(d);
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                let log =
                    std::fs::read_to_string(d._dir.path().join("vshmd.log")).unwrap_or_default();
                return Err(format!("vshmd {args:?} exited ({status}): {log}"));
            }
            if started.elapsed() > Duration::from_secs(20) {
                return Err(format!("vshmd {args:?} did not serve within 20 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A new peer (its own connection, its own peer id), attached.
    pub fn attach(&self) -> Result<Namespace<HostTransport>> {
        attach(&self.socket)
    }

    /// WAKE requests this vshmd has answered so far (`vshm_requests_total{op="wake"}` of
    /// its metrics, over its control socket `SOCKET.ctl`).
    pub fn wake_requests(&self) -> Result<u64> {
        let control = PathBuf::from(format!("{}.ctl", self.socket.display()));
        let metrics = vshm_control::request(&control, &vshm_control::ControlRequest::Metrics)
            .ctx(format!("vshmd metrics from {}", control.display()))?;
        let text = metrics.as_str().ok_or("vshmd metrics: not text")?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("vshm_requests_total{op=\"wake\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }
}

impl Drop for Vshmd {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Attaches a peer to the vshmd at `socket`, retrying for a few seconds while every peer
/// slot is taken (peers of the previous round may still be being reclaimed).
pub fn attach(socket: &Path) -> Result<Namespace<HostTransport>> {
    let started = Instant::now();
    loop {
        let tried = HostTransport::connect(socket)
            .map_err(|e| e.to_string())
            .and_then(|t| Namespace::attach(t).map_err(|e| e.to_string()));
        match tried {
            Ok(ns) => return Ok(ns),
            Err(e) if started.elapsed() > Duration::from_secs(10) => {
                return Err(format!("attach to {}: {e}", socket.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// This binary again, as a peer in its own process: `vshm-bench role NAME ARGS...`. It
/// says `ready` on stdout once set up; its stdin is how the parent says go (a line) and
/// stop (EOF).
#[derive(Debug)]
pub struct Role {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    name: String,
}

impl Role {
    /// Spawns the role and waits for its `ready`. Non-CLOEXEC fds (eventfds, memfds) are
    /// inherited, so their numbers can be passed in `args`.
    pub fn spawn(name: &str, args: &[String]) -> Result<Role> {
        let exe = std::env::current_exe().ctx("where is this executable")?;
        let mut child = command(&exe)
            .arg("role")
            .arg(name)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .ctx(format!("spawn role {name}"))?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().ok_or("role without stdout")?);
        let mut role = Role {
            child,
            stdin,
            stdout,
            name: name.to_owned(),
        };
        let line = role.line()?;
        if line != "ready" {
            return Err(format!("role {name}: expected `ready`, got {line:?}"));
        }
        Ok(role)
    }

    /// The next line it printed (an error if it ended).
    pub fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        let n = self
            .stdout
            .read_line(&mut s)
            .ctx(format!("read role {}", self.name))?;
        if n == 0 {
            let status = self.child.wait().ctx("wait for role")?;
            return Err(format!("role {} ended ({status})", self.name));
        }
        Ok(s.trim_end().to_owned())
    }

    /// Says go (one line on its stdin).
    pub fn go(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().ok_or("role stdin already closed")?;
        stdin
            .write_all(b"go\n")
            .and_then(|()| stdin.flush())
            .ctx(format!("tell role {} to go", self.name))
    }

    /// Closes its stdin (stop) and waits for it to exit 0.
    pub fn finish(mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait().ctx("wait for role")?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("role {} failed ({status})", self.name))
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// In a role: say `ready` (once set up).
pub fn say_ready() -> Result<()> {
    println!("ready");
    std::io::stdout().flush().ctx("stdout")
}

/// In a role: say `ready` and wait for the parent's go line (or EOF: returns false).
pub fn ready_then_wait_go() -> Result<bool> {
    say_ready()?;
    let mut s = String::new();
    let n = std::io::stdin().read_line(&mut s).ctx("stdin")?;
    Ok(n > 0)
}

/// In a role: say `ready`, then block until the parent closes stdin.
pub fn ready_then_wait_eof() -> Result<()> {
    println!("ready");
    std::io::stdout().flush().ctx("stdout")?;
    wait_eof()
}

/// In a role: block until the parent closes stdin (keeping what the role holds alive).
pub fn wait_eof() -> Result<()> {
    let mut sink = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink).ctx("stdin")?;
    Ok(())
}

/// Spins until `done()` holds, yielding the CPU now and then (two cores, shared with
/// others: a spinning peer must not starve the one it waits for); an error after `limit`.
pub fn spin_until(limit: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let mut spins: u32 = 0;
    let mut started: Option<Instant> = None;
    while !done() {
        spins = spins.wrapping_add(1);
        if spins % 4096 == 0 {
            let t = *started.get_or_insert_with(Instant::now);
            if t.elapsed() > limit {
                return Err(format!("nothing came within {limit:?}"));
            }
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    Ok(())
}
