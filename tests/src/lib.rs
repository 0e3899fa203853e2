//! Harness for vshm's end-to-end tests: a real vshmd in a private temp dir, real `vshm` and
//! `vshmctl` processes, in-process peers over real sockets, and a watchdog so a hang fails
//! instead of stalling CI. Every child dies with the test process (PR_SET_PDEATHSIG).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use vshm::host::HostTransport;
use vshm::Namespace;
use vshm_control::{request, ControlRequest};

pub mod chaos;
pub mod freestanding;
pub mod supervisor;
pub mod vhost_frontend;

/// Path of a workspace binary (built by `cargo build --bins`, which `cargo xtask test` does).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, or run \
         `cargo xtask test`)",
        path.display()
    );
    path
}

/// A command whose process is killed if the test process dies.
pub fn command(program: &Path) -> Command {
    let mut c = Command::new(program);
    // SAFETY: prctl in the forked child before exec; async-signal-safe, touches no memory
    // of the parent.
    unsafe {
        c.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    c
}

/// Runs `body` on a thread and fails the test if it takes longer than `limit`.
pub fn watchdog<F: FnOnce() + Send + 'static>(limit: Duration, body: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        body();
        let _ = tx.send(());
    });
    match rx.recv_timeout(limit) {
        Ok(()) => handle.join().expect("test body"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            // The body panicked: re-raise its panic here.
            if let Err(p) = handle.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: test did not finish within {limit:?}")
        }
    }
}

/// Polls `cond` every 10 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh private directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates it.
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vshm-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // VSHM_KEEP_TMP=1 keeps logs and sockets for a post-mortem.
        if std::env::var_os("VSHM_KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A running vshmd.
#[derive(Debug)]
pub struct Backend {
    child: Child,
    /// Its ivshmem socket.
    pub socket: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
    dir: TempDir,
    /// The arguments and environment it was started with (a takeover repeats them).
    args: Vec<std::ffi::OsString>,
    env: Vec<(String, String)>,
}

impl Backend {
    /// Starts vshmd with `extra` arguments and waits until its control socket answers.
    pub fn start(extra: &[&str]) -> Backend {
        Backend::start_with_env(extra, &[])
    }

    /// [`Backend::start`] with extra environment variables for vshmd (test knobs such as
    /// `VSHMD_TEST_MAX_PEER_ID`).
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Backend {
        let dir = TempDir::new("vshmd");
        let socket = dir.path().join("vshm.sock");
        let mut args: Vec<std::ffi::OsString> = vec!["--socket".into(), socket.clone().into()];
        args.extend(extra.iter().map(Into::into));
        Backend::spawn(dir, socket, &args, env)
    }

    /// [`Backend::start`] also serving the vshm virtio device (`--vhost-user`) on a socket in
    /// the backend's own directory; that socket's path. vshmd creates it once it serves.
    pub fn start_with_vhost_user(extra: &[&str]) -> (Backend, PathBuf) {
        let dir = TempDir::new("vshmd");
        let socket = dir.path().join("vshm.sock");
        let vhost = dir.path().join("vhost.sock");
        let mut args: Vec<std::ffi::OsString> = vec![
            "--socket".into(),
            socket.clone().into(),
            "--vhost-user".into(),
            vhost.clone().into(),
        ];
        args.extend(extra.iter().map(Into::into));
        (Backend::spawn(dir, socket, &args, &[]), vhost)
    }

    /// Starts vshmd with `--config FILE` (then `extra`), FILE holding `toml` with every
    /// `{dir}` replaced by the backend's temp dir. The file's sockets must live there and
    /// its main socket be `{dir}/vshm.sock` (with the default control socket), unless
    /// `extra` overrides them.
    pub fn start_with_config(toml: &str, extra: &[&str]) -> Backend {
        let dir = TempDir::new("vshmd");
        let file = write_config(&dir, toml);
        let socket = dir.path().join("vshm.sock");
        let mut args: Vec<std::ffi::OsString> = vec!["--config".into(), file.into()];
        args.extend(extra.iter().map(Into::into));
        Backend::spawn(dir, socket, &args, &[])
    }

    /// [`Backend::start_with_config`] (no extra arguments), also returning the banner
    /// vshmd printed on stdout once it served: the QEMU arguments and the libvirt
    /// `<shmem>` element that attach a VM, as an operator sees them.
    pub fn start_with_config_banner(toml: &str) -> (Backend, String) {
        use std::io::BufRead;
        let dir = TempDir::new("vshmd");
        let file = write_config(&dir, toml);
        let socket = dir.path().join("vshm.sock");
        let args: Vec<std::ffi::OsString> = vec!["--config".into(), file.into()];
        let mut b = Backend::spawn_with_stdout(dir, socket, &args, &[], Stdio::piped());
        let out = b.child.stdout.take().expect("vshmd's stdout");
        let mut lines = std::io::BufReader::new(out);
        let mut banner = String::new();
        // The banner ends with the libvirt element (vshmd prints it all at once).
        while !banner.contains("</shmem>") {
            let n = lines.read_line(&mut banner).expect("read vshmd's stdout");
            assert!(
                n > 0,
                "vshmd closed stdout before its banner ended:\n{banner}"
            );
        }
        // Whatever else it prints goes nowhere, as with the other backends; reading it keeps
        // a full pipe from blocking vshmd.
        std::thread::spawn(move || std::io::copy(&mut lines, &mut std::io::sink()));
        (b, banner)
    }

    fn spawn(
        dir: TempDir,
        socket: PathBuf,
        args: &[std::ffi::OsString],
        env: &[(&str, &str)],
    ) -> Backend {
        Backend::spawn_with_stdout(dir, socket, args, env, Stdio::null())
    }

    fn spawn_with_stdout(
        dir: TempDir,
        socket: PathBuf,
        args: &[std::ffi::OsString],
        env: &[(&str, &str)],
        stdout: Stdio,
    ) -> Backend {
        let control = dir.path().join("vshm.sock.ctl");
        let child = command(&bin("vshmd"))
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("VSHM_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(stdout)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vshmd");
        let mut b = Backend {
            child,
            socket,
            control,
            dir,
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let mut exited = None;
        let up = wait_for(Duration::from_secs(10), || {
            exited = b.child.try_wait().ok().flatten();
            exited.is_some() || request(&b.control, &ControlRequest::Status).is_ok()
        });
        assert!(
            exited.is_none(),
            "vshmd {args:?} exited at start: {exited:?}"
        );
        assert!(up, "vshmd did not come up within 10 s");
        b
    }

    /// Restarts vshmd gracefully (`vshmd --takeover`, docs/OPERATIONS.md): starts `program`
    /// (the vshmd binary, or a copy of it elsewhere: an upgrade) with the arguments this
    /// one was started with, waits until the running one has exited 0 and the new one
    /// answers on the control socket, and from then on stands for the new one.
    pub fn take_over_with(&mut self, program: &Path) {
        let mut new = command(program)
            .args(&self.args)
            .arg("--takeover")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "RUST_LOG",
                std::env::var("VSHM_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn vshmd --takeover");
        let mut old_status = None;
        let mut new_status = None;
        let done = wait_for(Duration::from_secs(20), || {
            old_status = old_status.or_else(|| self.child.try_wait().ok().flatten());
            new_status = new_status.or_else(|| new.try_wait().ok().flatten());
            old_status.is_some() || new_status.is_some()
        });
        assert!(done, "neither vshmd exited within 20 s of the takeover");
        assert!(
            new_status.is_none(),
            "vshmd --takeover exited: {new_status:?}"
        );
        let old_status = old_status.expect("the old vshmd exited");
        assert!(
            old_status.success(),
            "the old vshmd exited {old_status} on handing over"
        );
        self.child = new;
        let pid = self.child.id();
        let up = wait_for(Duration::from_secs(10), || {
            request(&self.control, &ControlRequest::Status)
                .is_ok_and(|s| s["vshmd"]["pid"].as_u64() == Some(u64::from(pid)))
        });
        assert!(up, "the new vshmd does not answer on the control socket");
    }

    /// [`Backend::take_over_with`] the vshmd binary itself.
    pub fn take_over(&mut self) {
        self.take_over_with(&bin("vshmd"));
    }

    /// Runs `vshmd --takeover` with `args` (not this backend's: a test of a takeover that
    /// must fail) to completion.
    pub fn take_over_output(&self, args: &[&std::ffi::OsStr]) -> Output {
        command(&bin("vshmd"))
            .args(args)
            .arg("--takeover")
            .stdin(Stdio::null())
            .output()
            .expect("run vshmd --takeover")
    }

    /// An in-process peer connected through another of the region's sockets.
    pub fn connect_to(&self, socket: &Path) -> Namespace<HostTransport> {
        let t = HostTransport::connect(socket).expect("connect to vshmd");
        Namespace::attach(t).expect("attach")
    }

    /// vshmd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The temp dir the sockets live in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The status document.
    pub fn status(&self) -> Value {
        request(&self.control, &ControlRequest::Status).expect("vshmctl status")
    }

    /// The section called `name` in the status document, if any (live, not deleted).
    pub fn section(&self, name: &str) -> Option<Value> {
        self.status()["sections"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name && s["deleted"] == false)
            .cloned()
    }

    /// The status document's entry for the peer whose process is `pid`.
    pub fn peer_of_pid(&self, pid: u32) -> Option<Value> {
        self.status()["peers"]
            .as_array()?
            .iter()
            .find(|p| p["pid"].as_u64() == Some(u64::from(pid)))
            .cloned()
    }

    /// Runs `vshm --socket S args...` to completion.
    pub fn vshm(&self, args: &[&str]) -> Output {
        command(&bin("vshm"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vshm")
    }

    /// Starts `vshm --socket S args...` with stdin piped (for `hold` and `create --hold`)
    /// and waits until it prints its first line (the handles are held by then).
    pub fn vshm_holding(&self, args: &[&str]) -> Child {
        use std::io::BufRead;
        let mut child = command(&bin("vshm"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vshm");
        let out = child.stdout.take().expect("stdout");
        let mut lines = std::io::BufReader::new(out).lines();
        loop {
            let line = lines
                .next()
                .expect("vshm exited before holding")
                .expect("read stdout");
            if line.contains("holding") {
                break;
            }
        }
        child
    }

    /// Runs vshmctl with `args` against this backend.
    pub fn vshmctl(&self, args: &[&str]) -> Output {
        command(&bin("vshmctl"))
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("run vshmctl")
    }

    /// An in-process peer.
    pub fn connect(&self) -> Namespace<HostTransport> {
        let t = HostTransport::connect(&self.socket).expect("connect to vshmd");
        Namespace::attach(t).expect("attach")
    }

    /// Bytes of host memory the region's memfd holds (st_blocks × 512), found through
    /// /proc/<vshmd>/fd the way an operator would.
    pub fn memfd_resident(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("proc fd dir");
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            if target.to_string_lossy().starts_with("/memfd:vshm") {
                let meta = std::fs::metadata(fd.path()).expect("stat memfd");
                return meta.blocks() * 512;
            }
        }
        panic!("vshmd has no memfd:vshm open");
    }

    /// The path of the region's memfd through /proc (`/proc/PID/fd/N`), for `vshmctl
    /// inspect --memfd`.
    pub fn memfd_path(&self) -> String {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid())).expect("proc fd dir");
        for fd in fds.flatten() {
            let target = std::fs::read_link(fd.path()).unwrap_or_default();
            if target.to_string_lossy().starts_with("/memfd:vshm") {
                return fd.path().display().to_string();
            }
        }
        panic!("vshmd has no memfd:vshm open");
    }

    /// vshmd's exit status if it has exited (crashed: tests never stop it this way).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        self.child.wait().expect("wait vshmd")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `toml` (every `{dir}` replaced by `dir`) to `dir/vshm.toml`; returns its path.
pub fn write_config(dir: &TempDir, toml: &str) -> PathBuf {
    let file = dir.path().join("vshm.toml");
    let text = toml.replace("{dir}", &dir.path().display().to_string());
    std::fs::write(&file, text).expect("write the config file");
    file
}

/// Runs vshmd with `args` to completion (for configurations it must refuse: it exits
/// before serving anything).
pub fn vshmd_output(args: &[&std::ffi::OsStr]) -> Output {
    command(&bin("vshmd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vshmd")
}

/// A shared mapping of a region's fd, the way a peer (or QEMU's BAR) maps it.
pub fn map(file: &std::fs::File) -> vshm::host::Mapping {
    let len = file.metadata().expect("stat").len();
    vshm::host::Mapping::new(file, len).expect("mmap")
}

/// SIGKILLs a child and reaps it.
pub fn kill9(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Closes a holder's stdin and waits for it to exit successfully.
pub fn release(mut child: Child) {
    drop(child.stdin.take());
    let status = child.wait().expect("wait holder");
    assert!(status.success(), "holder exited with {status}");
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Boots one guest per name, attached to `b`, concurrently (all started from the calling
/// thread: QEMU dies with the thread that started it), and waits until each agent answers.
pub fn boot_guests(b: &Backend, names: &[&str]) -> Vec<vshm_images::Vm> {
    boot_guests_on(&b.socket, b.dir(), names)
}

/// [`boot_guests`] attached to the vshmd serving `socket`, logs and disks in `dir`.
pub fn boot_guests_on(socket: &Path, dir: &Path, names: &[&str]) -> Vec<vshm_images::Vm> {
    const BOOT: Duration = Duration::from_secs(180);
    let image = guest_image();
    let starting: Vec<_> = names
        .iter()
        .map(|n| {
            let cfg = vshm_images::VmConfig::new(n, &image, socket, dir);
            vshm_images::Vm::start(&cfg).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    starting
        .into_iter()
        .map(|s| s.wait_ready(BOOT).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// One test of a binary at a time, even if the harness runs them in parallel: for tests that
/// measure load, or boot several TCG guests that would starve each other on 2 vCPUs.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A small deterministic generator for stress tests (xorshift64): the same seed gives the
/// same run.
#[derive(Debug, Clone)]
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value in `0..n` (`n` = 0 is taken as 1).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// An index in `0..n` (`n` = 0 is taken as 1).
    pub fn index(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap_or(0)
    }
}

/// The test guest built by `cargo xtask images` (images/out).
pub fn guest_image() -> vshm_images::Image {
    let dir = vshm_images::out_dir();
    vshm_images::Image::existing(&dir).unwrap_or_else(|| {
        panic!(
            "no guest image in {}: run `cargo xtask images` (cargo xtask test does)",
            dir.display()
        )
    })
}

/// Runs a shell command in a guest; fails the test with the guest's output if it fails.
pub fn guest_ok(vm: &mut vshm_images::Vm, cmd: &str) -> String {
    let out = guest_sh(vm, cmd);
    assert!(
        out.success(),
        "{}: `{cmd}` exited {}:\n{}",
        vm.name(),
        out.status,
        out.text
    );
    out.text
}

/// Runs a shell command in a guest (60 s bound) and returns its output, whatever its status.
pub fn guest_sh(vm: &mut vshm_images::Vm, cmd: &str) -> vshm_images::Output {
    vm.run(cmd, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Starts `vshm ARGS --until-signal` in the background in a guest and waits until it holds
/// its handles. `tag` names it for [`guest_release`].
pub fn guest_hold(vm: &mut vshm_images::Vm, tag: &str, vshm_args: &str) {
    let out = vm
        .hold(tag, vshm_args, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.success(),
        "{}: hold {vshm_args} failed:\n{}",
        vm.name(),
        out.text
    );
}

/// Stops a background holder in a guest and waits until it has exited.
pub fn guest_release(vm: &mut vshm_images::Vm, tag: &str) {
    let out = vm
        .release(tag, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.success(),
        "{}: release {tag} failed:\n{}",
        vm.name(),
        out.text
    );
}

/// The guest's own peer id, from `vshm peers --json`.
pub fn guest_peer_id(vm: &mut vshm_images::Vm) -> u64 {
    let text = guest_ok(vm, "vshm peers --json");
    let peers: Value = serde_json::from_str(&text).expect("peers json");
    peers
        .as_array()
        .and_then(|a| a.iter().find(|p| p["self"] == true))
        .and_then(|p| p["id"].as_u64())
        .expect("own peer id")
}

/// Reads one ivshmem server message (an i64 and at most one fd) the way QEMU does; `None`
/// at the end of the stream. For tests that speak the protocol by hand.
pub fn recv_msg(sock: &std::os::unix::net::UnixStream) -> Option<(i64, Option<std::fs::File>)> {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut buf = [0u8; 8];
    let mut space = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: 8,
    };
    // SAFETY: a zeroed msghdr is valid; we point it at live local buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = space.as_mut_ptr().cast();
    msg.msg_controllen = space.len();
    // SAFETY: recvmsg writes into the buffers described by msg, all alive and sized.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n <= 0 {
        return None;
    }
    let mut got = usize::try_from(n).ok()?;
    while got < 8 {
        let m = (&*sock).read(&mut buf[got..]).ok()?;
        if m == 0 {
            return None;
        }
        got += m;
    }
    let mut file = None;
    // SAFETY: CMSG_* walk the control buffer the kernel filled, bounded by controllen; the
    // fd it carries is new and ours.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if !cmsg.is_null()
            && (*cmsg).cmsg_level == libc::SOL_SOCKET
            && (*cmsg).cmsg_type == libc::SCM_RIGHTS
        {
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>());
            file = Some(std::fs::File::from_raw_fd(fd));
        }
    }
    Some((i64::from_le_bytes(buf), file))
}
