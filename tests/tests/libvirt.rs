//! A libvirt domain attaches to vshmd the way docs/GUEST.md §3 tells an operator, with real
//! parts only: vshmd serves packaging/default.toml's region (its socket handed to group
//! `libvirt-qemu`, mode 0660); Debian's libvirt (the embedded QEMU driver,
//! `qemu:///embed?root=DIR`: no libvirtd) defines and starts a domain whose XML holds exactly
//! the `<shmem>` element vshmd printed, and runs QEMU as user `libvirt-qemu`; the project's
//! test guest boots in it (direct kernel boot, TCG) and works through the region with a host
//! process; `virsh destroy` gets its peer reclaimed.
//!
//! It needs root (libvirt runs QEMU as another user only when privileged) and libvirt
//! (`libvirt-clients`, `libvirt-daemon-driver-qemu`; .ci/run installs them). Without them it
//! says why and passes, except in CI (`CI=true`), where it fails.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use vshm_tests::{command, guest_image, wait_for, watchdog, Backend, TempDir};

/// The user (and group) Debian's libvirt runs QEMU as.
const QEMU_USER: &str = "libvirt-qemu";
/// libvirt's QEMU driver (package libvirt-daemon-driver-qemu), which the embedded URI loads.
const QEMU_DRIVER: &str =
    "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so";
const DOMAIN: &str = "vshm-libvirt";

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Whether the test can run here. Where it cannot, CI fails; elsewhere it says why.
fn can_run() -> bool {
    let on_path = |p: &str| {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(p).is_file()))
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let why = if !on_path("virsh") {
        "libvirt is not installed (no virsh): apt-get install libvirt-clients \
         libvirt-daemon-driver-qemu"
    } else if !Path::new(QEMU_DRIVER).exists() {
        "libvirt's QEMU driver is not installed: apt-get install libvirt-daemon-driver-qemu"
    } else if !root {
        "it needs root: only a privileged libvirt runs QEMU as libvirt-qemu, the user the \
         socket is handed to"
    } else {
        return true;
    };
    assert!(
        !in_ci(),
        "CI must run the libvirt test, but {why} (.ci/run installs libvirt and runs as root)"
    );
    eprintln!("libvirt test SKIPPED: {why}");
    false
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(status.success(), "{program} {args:?} exited {status}");
}

/// The `getent DB NAME` entry's fields, if NAME exists.
fn getent(db: &str, name: &str) -> Option<Vec<String>> {
    let out = Command::new("getent").args([db, name]).output().ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(':')
            .map(str::to_owned)
            .collect()
    })
}

/// Creates QEMU's user and group where libvirt's packages did not: libvirt-daemon-system
/// does, the driver package alone does not, and libvirt fails to start a domain whose user
/// does not exist. Returns the group's id.
fn ensure_qemu_user() -> u32 {
    if getent("group", QEMU_USER).is_none() {
        eprintln!("libvirt test: creating group {QEMU_USER} (as libvirt-daemon-system would)");
        run("groupadd", &["--system", QEMU_USER]);
    }
    if getent("passwd", QEMU_USER).is_none() {
        eprintln!("libvirt test: creating user {QEMU_USER} (as libvirt-daemon-system would)");
        run(
            "useradd",
            &[
                "--system",
                "--gid",
                QEMU_USER,
                "--home-dir",
                "/var/lib/libvirt",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                QEMU_USER,
            ],
        );
    }
    getent("group", QEMU_USER)
        .and_then(|g| g.get(2)?.parse().ok())
        .expect("the group's id")
}

/// A `/dev/kvm` for libvirt's mount namespace, where QEMU's user cannot open the host's.
///
/// libvirt 9.0 probes QEMU with CAP_DAC_OVERRIDE, so the probe finds KVM usable; then, at
/// every later look at its capability cache, it asks whether QEMU's user can open /dev/kvm.
/// On a host whose /dev/kvm is root's alone (no udev rule giving it to group kvm, as here)
/// the answer differs, the cache is thrown away and QEMU probed again: ~4 s a time, over a
/// minute for a define and a start. A normal Debian host gives /dev/kvm to group kvm and
/// libvirt-daemon-system puts libvirt-qemu in it; this node stands for that, in a mount
/// namespace of virsh's own (the host's /dev/kvm is untouched). The domain runs under TCG
/// either way (`type='qemu'`).
fn kvm_node(dir: &Path, gid: u32) -> Option<PathBuf> {
    let meta = std::fs::metadata("/dev/kvm").ok()?;
    let usable = Command::new("runuser")
        .args(["-u", QEMU_USER, "--", "test", "-r", "/dev/kvm", "-a", "-w"])
        .arg("/dev/kvm")
        .status()
        .is_ok_and(|s| s.success());
    if usable {
        return None;
    }
    let node = dir.join("kvm");
    let path = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mknod(2) with a valid NUL-terminated path; it creates a device node there.
    let rc = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o660, meta.rdev()) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        node.display(),
        std::io::Error::last_os_error()
    );
    std::os::unix::fs::chown(&node, Some(0), Some(gid)).expect("chown the kvm node");
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o660)).expect("chmod");
    eprintln!(
        "libvirt test: /dev/kvm is not open to {QEMU_USER} here; virsh gets {} as /dev/kvm \
         in its own mount namespace (else libvirt re-probes QEMU at every step)",
        node.display()
    );
    Some(node)
}

/// Text arriving from a reader thread, searched for markers.
struct Incoming {
    rx: Receiver<Vec<u8>>,
    seen: String,
}

impl Incoming {
    fn new(mut from: impl Read + Send + 'static) -> Incoming {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Incoming {
            rx,
            seen: String::new(),
        }
    }

    /// The text before the next `marker` (consumed with it), waiting at most `limit`;
    /// `None` on a timeout or if the stream ended, with what arrived kept in `seen`.
    fn until(&mut self, marker: &str, limit: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(i) = self.seen.find(marker) {
                let before = self.seen[..i].to_owned();
                self.seen.drain(..i + marker.len());
                return Some(before);
            }
            let left = limit.checked_sub(start.elapsed())?;
            match self.rx.recv_timeout(left) {
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}

/// One virsh process, fed commands on stdin: the embedded driver lives as long as it does,
/// and a second session would probe QEMU again (and it found the running domain gone when
/// tried by hand).
struct Virsh {
    child: Child,
    stdin: ChildStdin,
    out: Incoming,
    n: u32,
}

impl Virsh {
    fn start(root: &Path, kvm: Option<&Path>) -> Virsh {
        let uri = format!("qemu:///embed?root={}", root.display());
        // stderr into stdout, so that an error is read before the marker that follows it.
        let mut cmd = match kvm {
            Some(node) => {
                let mut c = command(Path::new("unshare"));
                c.args(["--mount", "--", "sh", "-c"])
                    .arg("mount --bind \"$1\" /dev/kvm && exec virsh -q -c \"$2\" 2>&1")
                    .arg("sh")
                    .arg(node);
                c
            }
            None => {
                let mut c = command(Path::new("sh"));
                c.args(["-c", "exec virsh -q -c \"$1\" 2>&1", "sh"]);
                c
            }
        };
        let mut child = cmd
            .arg(&uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn virsh");
        let stdin = child.stdin.take().expect("virsh stdin");
        let out = Incoming::new(child.stdout.take().expect("virsh stdout"));
        Virsh {
            child,
            stdin,
            out,
            n: 0,
        }
    }

    /// Runs one virsh command and returns what it printed; fails on an `error:` line.
    fn ok(&mut self, cmd: &str, limit: Duration) -> String {
        self.n += 1;
        // virsh echoes the command line it reads, so the marker as printed must differ from
        // the command that prints it.
        writeln!(self.stdin, "{cmd}\necho '@@virsh' '{}'", self.n).expect("write to virsh");
        let marker = format!("@@virsh {}", self.n);
        let out = self.out.until(&marker, limit).unwrap_or_else(|| {
            panic!(
                "virsh `{cmd}`: no answer within {limit:?} (or virsh exited); it printed:\n{}",
                self.out.seen
            )
        });
        assert!(!out.contains("error:"), "virsh `{cmd}` failed:\n{out}");
        out
    }

    fn quit(mut self) {
        writeln!(self.stdin, "quit").expect("write to virsh");
        drop(self.stdin);
        let status = self.child.wait().expect("wait virsh");
        assert!(status.success(), "virsh exited {status}");
    }
}

/// Kills the domain's QEMU if the test ends with it running (libvirt daemonizes QEMU: it
/// outlives virsh and the test process).
struct QemuGuard(PathBuf);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(&self.0).ok();
        if let Some(pid) = pid.and_then(|p| p.trim().parse::<libc::pid_t>().ok()) {
            // SAFETY: kill(2) on the pid libvirt recorded for this test's own domain.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The test guest's command agent, on its second serial port (a UNIX socket here): a line
/// `ID COMMAND` in, the output and `@@END ID STATUS` out (images/src/image.rs).
struct Agent {
    stream: UnixStream,
    input: Incoming,
    console: PathBuf,
    n: u32,
}

impl Agent {
    fn connect(socket: &Path, console: &Path, limit: Duration) -> Agent {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > limit => {
                    panic!("the guest's agent socket {}: {e}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut agent = Agent {
            input: Incoming::new(stream.try_clone().expect("clone the agent socket")),
            stream,
            console: console.to_owned(),
            n: 0,
        };
        if agent.input.until("@@READY", limit).is_none() {
            panic!(
                "the guest's agent did not answer within {limit:?}; console:\n{}",
                agent.console_tail()
            );
        }
        agent
    }

    fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Runs `cmd` with the guest's sh; fails the test unless it exits 0. Returns its output.
    fn ok(&mut self, cmd: &str) -> String {
        const LIMIT: Duration = Duration::from_secs(60);
        self.n += 1;
        writeln!(self.stream, "{} {cmd}", self.n).expect("write to the agent");
        let end = format!("@@END {} ", self.n);
        let out = self.input.until(&end, LIMIT);
        let status = out
            .as_ref()
            .and_then(|_| self.input.until("\n", LIMIT))
            .unwrap_or_else(|| {
                panic!(
                    "guest: `{cmd}` did not finish within {LIMIT:?}; console:\n{}",
                    self.console_tail()
                )
            });
        let out: String = out
            .unwrap_or_default()
            .lines()
            .filter(|l| l.trim() != "@@READY")
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(status.trim(), "0", "guest: `{cmd}` failed:\n{out}");
        out.trim().to_owned()
    }
}

/// The domain: direct kernel boot of the test guest under TCG, the console on the first
/// serial port (a file), the agent on the second (a socket), and `shmem` as vshmd printed it.
fn domain_xml(vm: &Path, shmem: &str) -> String {
    let p = |f: &str| vm.join(f).display().to_string();
    // 2 vCPUs: under TCG only parallel vCPUs make a guest's atomics real atomics (VmConfig).
    format!(
        "<domain type='qemu'>
  <name>{DOMAIN}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 cryptomgr.notests=1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{agent}'/><target port='1'/></serial>
    <memballoon model='none'/>
{shmem}
  </devices>
</domain>
",
        kernel = p("vmlinuz"),
        initrd = p("initramfs.cpio"),
        console = p("console.log"),
        agent = p("agent.sock"),
    )
}

#[test]
fn a_libvirt_domain_attaches_with_the_shmem_element_vshmd_prints_works_through_the_region_and_is_reclaimed_on_destroy(
) {
    if !can_run() {
        return;
    }
    watchdog(Duration::from_secs(150), || {
        let started = Instant::now();
        let gid = ensure_qemu_user();

        // 1. vshmd serves the packaged default region, its socket moved to a temp dir.
        let packaged = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/default.toml"
        ))
        .expect("packaging/default.toml");
        let socket_line = "socket = \"/run/vshm/default.sock\"";
        assert!(packaged.contains(socket_line), "{packaged}");
        let toml = packaged.replace(socket_line, "socket = \"{dir}/vshm.sock\"");
        let (b, banner) = Backend::start_with_config_banner(&toml);
        let meta = std::fs::metadata(&b.socket).expect("stat the socket");
        assert_eq!(meta.gid(), gid, "the socket is group {QEMU_USER}'s");
        assert_eq!(meta.mode() & 0o777, 0o660, "the socket is 0660");
        let from = banner
            .find("<shmem")
            .expect("the banner has a <shmem> element");
        let to = banner.find("</shmem>").expect("</shmem>") + "</shmem>".len();
        let shmem = &banner[from..to];
        assert!(
            shmem.contains(&format!("<server path='{}'/>", b.socket.display())),
            "{shmem}"
        );

        // 2. The domain, in an embedded driver rooted in a temp dir.
        let work = TempDir::new("libvirt");
        let root = work.path().join("root");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir root/etc");
        // Without it libvirt hands QEMU's output and file-backed serial ports to virtlogd,
        // and `start` fails: "Failed to connect socket to '/run/libvirt/virtlogd-sock'".
        std::fs::write(root.join("etc/qemu.conf"), "stdio_handler = \"file\"\n")
            .expect("write qemu.conf");
        // QEMU (as libvirt-qemu) creates the agent socket here. libvirt hands the kernel
        // and initrd to QEMU's user for the VM's life: copies, not the built image.
        let vm = work.path().join("vm");
        std::fs::create_dir(&vm).expect("mkdir vm");
        let uid = getent("passwd", QEMU_USER)
            .and_then(|u| u[2].parse().ok())
            .expect("uid");
        std::os::unix::fs::chown(&vm, Some(uid), Some(gid)).expect("chown vm");
        let image = guest_image();
        std::fs::copy(&image.kernel, vm.join("vmlinuz")).expect("copy the kernel");
        std::fs::copy(&image.initrd, vm.join("initramfs.cpio")).expect("copy the initrd");
        let xml = work.path().join("domain.xml");
        std::fs::write(&xml, domain_xml(&vm, shmem)).expect("write the domain XML");

        let kvm = kvm_node(work.path(), gid);
        let mut virsh = Virsh::start(&root, kvm.as_deref());
        let pid_file = root.join(format!("run/qemu/{DOMAIN}.pid"));
        let _qemu = QemuGuard(pid_file.clone());
        virsh.ok(
            &format!("define {}", xml.display()),
            Duration::from_secs(90),
        );
        virsh.ok(&format!("start {DOMAIN}"), Duration::from_secs(60));
        let qemu_pid: u32 = std::fs::read_to_string(&pid_file)
            .expect("libvirt's pid file for the domain")
            .trim()
            .parse()
            .expect("a pid");
        let cmdline = std::fs::read(format!("/proc/{qemu_pid}/cmdline")).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("ivshmem-doorbell"),
            "libvirt's QEMU has an ivshmem-doorbell device"
        );
        let status = std::fs::read_to_string(format!("/proc/{qemu_pid}/status"))
            .expect("QEMU's /proc status");
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:")
                    && l.split_whitespace().nth(1) == Some(&uid.to_string())),
            "QEMU runs as {QEMU_USER}:\n{status}"
        );

        // 3. vshmd counts QEMU as a peer, labelled with the domain's name; the guest works
        // through the region with a host process, both ways.
        assert!(
            wait_for(Duration::from_secs(20), || b
                .peer_of_pid(qemu_pid)
                .is_some_and(|p| p["connected"] == true)),
            "QEMU (pid {qemu_pid}) is a connected peer: {}",
            b.status()
        );
        let peer = b.peer_of_pid(qemu_pid).expect("QEMU's peer");
        assert_eq!(peer["label"], DOMAIN, "{peer}");
        let mut agent = Agent::connect(
            &vm.join("agent.sock"),
            &vm.join("console.log"),
            Duration::from_secs(90),
        );
        let peers: serde_json::Value =
            serde_json::from_str(&agent.ok("vshm peers --json")).expect("peers json");
        let own = peers
            .as_array()
            .and_then(|a| a.iter().find(|p| p["self"] == true))
            .expect("the guest's own peer");
        assert_eq!(own["id"], peer["id"], "the guest is QEMU's peer");

        let from_guest = format!("written-in-a-libvirt-guest-{}", std::process::id());
        agent.ok("vshm create from-libvirt --max 64K --persistent");
        agent.ok(&format!("vshm write from-libvirt --data {from_guest}"));
        let ns = b.connect();
        let section = ns
            .open("from-libvirt")
            .expect("the host opens the guest's section");
        let mut got = vec![0u8; from_guest.len()];
        section.read_at(0, &mut got).expect("read");
        assert_eq!(
            String::from_utf8_lossy(&got),
            from_guest,
            "the host reads the guest's bytes"
        );
        let from_host = b"answered-by-the-host";
        section.write_at(4096, from_host).expect("write");
        assert_eq!(
            agent.ok(&format!(
                "vshm read from-libvirt --offset 4096 --len {}",
                from_host.len()
            )),
            String::from_utf8_lossy(from_host),
            "the guest reads the host's bytes"
        );

        // 4. `virsh destroy` kills QEMU; vshmd reclaims its peer. The section is persistent:
        // its bytes stay for the host.
        virsh.ok(&format!("destroy {DOMAIN}"), Duration::from_secs(60));
        assert!(
            wait_for(Duration::from_secs(30), || b
                .peer_of_pid(qemu_pid)
                .is_none_or(|p| p["connected"] == false)),
            "vshmd reclaims the destroyed domain's peer: {}",
            b.status()
        );
        let state = virsh.ok(&format!("domstate {DOMAIN}"), Duration::from_secs(30));
        assert!(state.contains("shut off"), "{state}");
        virsh.quit();
        section
            .read_at(0, &mut got)
            .expect("read after the destroy");
        assert_eq!(String::from_utf8_lossy(&got), from_guest);
        eprintln!(
            "libvirt test: done in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    });
}
