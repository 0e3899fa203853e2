//! The part of systemd a crash restart needs, played by the test (PID 1 here is not
//! systemd): the `$NOTIFY_SOCKET` datagram socket with its fd store — `FDSTORE=1` keeps the
//! fds a message carries under its `FDNAME=`, `FDSTOREREMOVE=1` drops a name, a stored fd
//! that hangs up (POLLHUP/POLLERR) is dropped as systemd drops it — and a restart that
//! passes the stored fds back at 3.. with `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`,
//! as systemd does for `Restart=on-failure` with `FileDescriptorStoreMax=`.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vshm::host::HostTransport;
use vshm::Namespace;
use vshm_control::{request, ControlRequest};

use crate::{bin, command, wait_for, TempDir};

/// What the fake systemd holds for the service.
#[derive(Debug, Default)]
struct Held {
    /// Stored fds by name, in the order they came.
    store: Vec<(String, OwnedFd)>,
    /// READY=1 messages seen.
    ready: u32,
    /// Every message, for failure reports.
    log: Vec<String>,
    /// Stop reading the notify socket (a busy service manager).
    paused: bool,
}

/// vshmd run with `--fd-store` under a fake systemd.
#[derive(Debug)]
pub struct Supervised {
    child: Child,
    held: Arc<Mutex<Held>>,
    /// The notify socket (`$NOTIFY_SOCKET`), non-blocking.
    listener: Arc<UnixDatagram>,
    notify: PathBuf,
    args: Vec<std::ffi::OsString>,
    /// Its ivshmem socket.
    pub socket: PathBuf,
    /// Its control socket.
    pub control: PathBuf,
    dir: TempDir,
}

/// fcntl(2) F_DUPFD_QUERY (Linux 6.10): whether two fds share one open file description.
const F_DUPFD_QUERY: libc::c_int = 1027;

/// Reads every datagram waiting on the notify socket (non-blocking) into `h`. Only ever
/// called with the lock held, so no message is ever between the socket and the store: a
/// restart that drains first sees everything the dead service sent, as systemd does — it
/// reads the notify socket at a higher priority than SIGCHLD (manager.c), so an FDSTORE
/// sent just before a crash is stored before the restart. (A thread that had received a
/// datagram but not yet stored it let a restart miss a connection vshmd had stored before
/// its handshake: the client, attached, was cut off by the new vshmd.)
fn drain(socket: &UnixDatagram, h: &mut Held) {
    loop {
        let mut buf = [0u8; 4096];
        let mut fds = [-1; 16];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points at `buf`, live and of its stated length; `fds` has room
        // for 16 fds and recv_with_fds writes only there.
        let Ok((n, got)) = (unsafe { socket.recv_with_fds(&mut iov, &mut fds) }) else {
            // EAGAIN: nothing more waits.
            return;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let received: Vec<OwnedFd> = fds[..got]
            .iter()
            .map(|&fd| {
                // Close-on-exec, as systemd receives them (MSG_CMSG_CLOEXEC; recv_with_fds
                // passes no flags): otherwise every vshmd or QEMU another test of this
                // process starts would hold copies of this one's connections.
                // SAFETY: fcntl with integer arguments on an fd the kernel just installed.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                // SAFETY: the kernel just installed this fd for this process; nothing else
                // owns it.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .collect();
        let lines: Vec<&str> = text.lines().collect();
        let name = lines
            .iter()
            .find_map(|l| l.strip_prefix("FDNAME="))
            .unwrap_or("stored")
            .to_owned();
        if lines.contains(&"FDSTORE=1") {
            for fd in received {
                // As systemd does (service_add_fd_store: same_fd, F_DUPFD_QUERY): an fd
                // that is a dup of one stored already is suppressed, whatever its name.
                let dup = h.store.iter().any(|(_, s)| {
                    // SAFETY: fcntl on two fds this process owns, integer arguments.
                    unsafe { libc::fcntl(s.as_raw_fd(), F_DUPFD_QUERY, fd.as_raw_fd()) == 1 }
                });
                if dup {
                    h.log.push(format!("suppressed duplicate fd {name}"));
                    continue;
                }
                h.store.push((name.clone(), fd));
            }
        } else if lines.contains(&"FDSTOREREMOVE=1") {
            h.store.retain(|(n, _)| *n != name);
        }
        if lines.contains(&"READY=1") {
            h.ready += 1;
        }
        h.log.push(text);
    }
}

/// The service manager's reader: drains the socket whenever it is readable, unless paused.
/// Ends once the [`Supervised`] that started it is gone (it holds the other reference).
fn receive(socket: Arc<UnixDatagram>, held: Arc<Mutex<Held>>) {
    while Arc::strong_count(&held) > 1 {
        let mut p = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd for an fd the Arc keeps open; 5 ms timeout.
        unsafe { libc::poll(&mut p, 1, 5) };
        let Ok(mut h) = held.lock() else { return };
        if !h.paused {
            drain(&socket, &mut h);
        }
    }
}

impl Supervised {
    /// Starts `vshmd --fd-store --socket <dir>/vshm.sock extra…` and waits for READY=1.
    pub fn start(extra: &[&str]) -> Supervised {
        Self::start_in(TempDir::new("supervised"), None, extra)
    }

    /// Starts `vshmd --fd-store --config <dir>/vshm.toml` with `toml` (`{dir}` replaced by
    /// the temp dir); `socket` and `control` are then those of its first region if it uses
    /// `{dir}/vshm.sock`.
    pub fn start_config(toml: &str) -> Supervised {
        let dir = TempDir::new("supervised");
        let path = dir.path().join("vshm.toml");
        let text = toml.replace("{dir}", dir.path().to_str().expect("utf-8 dir"));
        std::fs::write(&path, text).expect("write the config");
        Self::start_in(dir, Some(path), &[])
    }

    fn start_in(dir: TempDir, config: Option<PathBuf>, extra: &[&str]) -> Supervised {
        let socket = dir.path().join("vshm.sock");
        let notify = dir.path().join("notify");
        let listener = UnixDatagram::bind(&notify).expect("bind the notify socket");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking notify socket");
        let listener = Arc::new(listener);
        let held = Arc::new(Mutex::new(Held::default()));
        let (l, h) = (Arc::clone(&listener), Arc::clone(&held));
        std::thread::spawn(move || receive(l, h));
        let mut args: Vec<std::ffi::OsString> = match &config {
            None => vec![
                "--fd-store".into(),
                "--socket".into(),
                socket.clone().into(),
            ],
            Some(c) => vec!["--fd-store".into(), "--config".into(), c.clone().into()],
        };
        args.extend(extra.iter().map(Into::into));
        let child = Self::spawn(&args, &notify, Vec::new());
        let control = dir.path().join("vshm.sock.ctl");
        let mut s = Supervised {
            child,
            held,
            listener,
            notify,
            args,
            socket,
            control,
            dir,
        };
        s.await_ready(1);
        s
    }

    fn spawn(
        args: &[std::ffi::OsString],
        notify: &PathBuf,
        passed: Vec<(String, OwnedFd)>,
    ) -> Child {
        let names: Vec<&str> = passed.iter().map(|(n, _)| n.as_str()).collect();
        let mut c = command(&PathBuf::from("/bin/sh"));
        // LISTEN_PID must be vshmd's own pid: the shell's, which exec keeps.
        c.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(std::env::var_os("VSHM_VSHMD").map_or_else(|| bin("vshmd"), PathBuf::from))
            .args(args)
            .env("NOTIFY_SOCKET", notify)
            .env(
                "RUST_LOG",
                std::env::var("VSHM_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if passed.is_empty() {
            c.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        } else {
            c.env("LISTEN_FDS", passed.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        let raw: Vec<i32> = passed.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let count = i32::try_from(raw.len()).expect("fd count");
        // Above every source and every target, so the first pass clobbers nothing.
        let high = raw.iter().copied().max().unwrap_or(0).max(3 + count) + 1;
        // SAFETY: runs in the forked child before exec and calls only fcntl and dup2,
        // which are async-signal-safe, on fds this process owns; `raw` was allocated
        // before the fork and is only read.
        unsafe {
            c.pre_exec(move || {
                // First every fd out of the way of 3..3+count, then each into place: one
                // loop doing both would overwrite a source that sits at a lower target.
                // (dup2 clears close-on-exec on the copy.) No allocation after fork: the
                // high copies are found again by number (high + i).
                for (i, &fd) in (0..).zip(raw.iter()) {
                    if libc::dup2(fd, high + i) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for i in 0..count {
                    if libc::dup2(high + i, 3 + i) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(high + i);
                }
                Ok(())
            });
        }
        let child = c.spawn().expect("spawn vshmd");
        drop(passed);
        child
    }

    fn await_ready(&mut self, count: u32) {
        let mut exited = None;
        let up = wait_for(Duration::from_secs(20), || {
            exited = self.child.try_wait().ok().flatten();
            exited.is_some() || self.held.lock().is_ok_and(|h| h.ready >= count)
        });
        let log = self
            .held
            .lock()
            .map(|h| h.log.join(" | "))
            .unwrap_or_default();
        assert!(
            exited.is_none(),
            "vshmd exited at start: {exited:?}; notifications: {log}"
        );
        assert!(up, "no READY=1 within 20 s; notifications: {log}");
    }

    /// Kills vshmd with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts vshmd again as systemd would after a crash: the stored fds (minus those that
    /// hung up) passed back, then waits for READY=1.
    pub fn restart(&mut self) {
        if let Err(e) = self.try_restart() {
            panic!("vshmd did not come back: {e}");
        }
    }

    /// As [`Supervised::restart`], but says why vshmd did not come up instead of panicking
    /// (its exit status and the notifications seen).
    pub fn try_restart(&mut self) -> Result<(), String> {
        // systemd reads what the dead service sent before it handles the death, keeps its
        // store across the restart (so do we: our copies) and drops what hung up.
        let passed: Vec<(String, OwnedFd)> = {
            let mut h = self.held.lock().expect("held");
            drain(&self.listener, &mut h);
            let store = std::mem::take(&mut h.store);
            let mut keep = Vec::new();
            for (name, fd) in store {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: 0,
                    revents: 0,
                };
                // SAFETY: one pollfd for an fd we own; zero timeout.
                unsafe { libc::poll(&mut p, 1, 0) };
                if p.revents & (libc::POLLHUP | libc::POLLERR) == 0 {
                    keep.push((name, fd));
                }
            }
            for (name, fd) in &keep {
                h.store.push((name.clone(), fd.try_clone().expect("dup")));
            }
            keep
        };
        let ready_before = self.held.lock().map(|h| h.ready).unwrap_or(0);
        self.child = Self::spawn(&self.args, &self.notify, passed);
        let mut exited = None;
        let up = wait_for(Duration::from_secs(20), || {
            exited = self.child.try_wait().ok().flatten();
            exited.is_some() || self.held.lock().is_ok_and(|h| h.ready > ready_before)
        });
        match (exited, up) {
            (None, true) => Ok(()),
            (e, _) => Err(format!("vshmd did not come up (exit: {e:?})")),
        }
    }

    /// Names of the fds in the store now.
    pub fn stored(&self) -> Vec<String> {
        self.held
            .lock()
            .map(|h| h.store.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    /// Stored names and how many fds each.
    pub fn stored_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for n in self.stored() {
            *m.entry(n).or_default() += 1;
        }
        m
    }

    /// The fd names of the newest whole journal of `region` in the store now (None: none
    /// whole), read as vshmd reads it (fdstore.rs: header, FNV-1a over names and state).
    pub fn journal_names(&self, region: &str) -> Option<Vec<String>> {
        use std::os::unix::fs::FileExt;
        let h = self.held.lock().ok()?;
        let mut best: Option<(u64, Vec<String>)> = None;
        for j in ["journal.0", "journal.1"] {
            let want = format!("{region}/{j}");
            let Some((_, fd)) = h.store.iter().find(|(n, _)| *n == want) else {
                continue;
            };
            let f = std::fs::File::from(fd.try_clone().ok()?);
            let mut hd = [0u8; 64];
            if f.read_exact_at(&mut hd, 0).is_err() || &hd[..8] != b"VSHMJRNL" {
                continue;
            }
            let word = |at: usize| u64::from_le_bytes(hd[at..at + 8].try_into().unwrap_or([0; 8]));
            let (seq, sum) = (word(16), word(40));
            let (Ok(nl), Ok(sl)) = (usize::try_from(word(24)), usize::try_from(word(32))) else {
                continue;
            };
            if seq == 0 || nl > 1 << 30 || sl > 1 << 30 {
                continue;
            }
            let mut body = vec![0u8; nl + sl];
            if f.read_exact_at(&mut body, 64).is_err() {
                continue;
            }
            let mut x: u64 = 0xcbf2_9ce4_8422_2325;
            for &b in &body {
                x ^= u64::from(b);
                x = x.wrapping_mul(0x0100_0000_01b3);
            }
            if x != sum || word(16) != seq {
                continue;
            }
            let Ok(names) = serde_json::from_slice::<Vec<String>>(&body[..nl]) else {
                continue;
            };
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                best = Some((seq, names));
            }
        }
        best.map(|(_, n)| n)
    }

    /// Stops (true) or resumes reading the notify socket, as a busy PID 1 would. It reads
    /// what is queued before it stops: the socket holds 10 datagrams (net.unix.max_dgram_qlen)
    /// and vshmd holds a client's handshake until its connection is stored, so what an
    /// earlier step sent and the reader thread had not yet taken (a loaded machine) could
    /// fill the queue and hold the next client's handshake past its deadline (it was cut
    /// off: a CI flake of the test below).
    pub fn pause_store(&self, paused: bool) {
        if let Ok(mut h) = self.held.lock() {
            if paused {
                drain(&self.listener, &mut h);
            }
            h.paused = paused;
        }
    }

    /// Every notification seen (and fds suppressed as duplicates).
    pub fn log(&self) -> Vec<String> {
        self.held.lock().map(|h| h.log.clone()).unwrap_or_default()
    }

    /// vshmd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `vshmctl status` as JSON.
    pub fn status(&self) -> Value {
        request(&self.control, &ControlRequest::Status).expect("vshmctl status")
    }

    /// An in-process peer.
    pub fn connect(&self) -> Namespace<HostTransport> {
        let t = HostTransport::connect(&self.socket).expect("connect to vshmd");
        Namespace::attach(t).expect("attach")
    }

    /// Its temp dir.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
