//! Starts a test guest under QEMU attached to vshmd, and drives it through its command agent
//! on the second serial port.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::lines::{Line, Lines};
use crate::Image;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// QEMU could not be started.
    #[error("starting {qemu}: {source}")]
    Spawn {
        /// The QEMU binary.
        qemu: String,
        /// Cause.
        source: std::io::Error,
    },
    /// QEMU exited.
    #[error("VM {name}: QEMU exited ({status}); console:\n{console}")]
    Exited {
        /// VM name.
        name: String,
        /// Exit status.
        status: String,
        /// Tail of the console log.
        console: String,
    },
    /// Something took too long.
    #[error("VM {name}: timed out after {secs} s waiting for {what}; console:\n{console}")]
    Timeout {
        /// VM name.
        name: String,
        /// Seconds waited.
        secs: u64,
        /// What for.
        what: String,
        /// Tail of the console log.
        console: String,
    },
    /// Agent I/O.
    #[error("VM {name}: agent connection: {source}; console:\n{console}")]
    Agent {
        /// VM name.
        name: String,
        /// Cause.
        source: std::io::Error,
        /// Tail of the console log.
        console: String,
    },
}

/// Accelerator for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's translator (multi-threaded, so guest atomics are host atomics).
    Tcg,
}

/// KVM only where hardware virtualisation is present (kvm_intel/kvm_amd loaded, or vmx/svm
/// in /proc/cpuinfo) and /dev/kvm exists. Elsewhere TCG: a /dev/kvm without them (e.g. PVM)
/// runs unmodified guests far slower than TCG.
pub fn accelerator() -> Accel {
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let hw_module = modules
        .lines()
        .any(|l| l.starts_with("kvm_intel ") || l.starts_with("kvm_amd "));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw_flags = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if (hw_module || hw_flags) && Path::new("/dev/kvm").exists() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// How to start a guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Name (for messages and file names).
    pub name: String,
    /// The image.
    pub image: Image,
    /// vshmd's ivshmem socket.
    pub vshm_socket: PathBuf,
    /// vshmd's `--vectors`.
    pub vectors: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs. At least 2 under TCG: QEMU emits real atomic instructions for a guest's
    /// atomics only when vCPUs run in parallel; a single-vCPU TCG guest executes `lock
    /// cmpxchg` as a load and a store, so its CAS on the shared region races with every
    /// other peer (measured: an event ping-pong between a 1-vCPU guest and a host process
    /// lost a signal in about 4 runs of 10; none lost in 20 runs with 2 vCPUs).
    pub cpus: u32,
    /// Where the console log and the agent socket go.
    pub work_dir: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Whether the guest's init loads the vshm kernel driver (when the image has it). Off:
    /// `vshm_nodriver` on the kernel command line, and guest programs use sysfs.
    pub driver: bool,
    /// Further vshmd sockets, each attached as one more ivshmem-doorbell device (a guest
    /// with several regions); none by default.
    pub extra_sockets: Vec<PathBuf>,
    /// A virtio-net device on a link to exactly one other guest ([`GuestNet::pair`]); none
    /// by default (guests have no network).
    pub net: Option<GuestNet>,
}

/// One end of a point-to-point Ethernet link between two guests: QEMU's `-netdev dgram`
/// over two unix datagram sockets (each QEMU binds its own and sends to the other's), a
/// `virtio-net-pci` device on it, and the address the guest's init gives eth0
/// (`vshm_net=ADDR/PREFIX` on the kernel command line; it loads the image's virtio-net
/// modules for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// This guest's socket (QEMU binds it; removed first if it exists).
    pub local: PathBuf,
    /// The other guest's socket.
    pub remote: PathBuf,
    /// eth0's address with its prefix, e.g. `10.9.0.1/24`.
    pub address: String,
    /// eth0's MAC address (the two ends must differ).
    pub mac: String,
}

impl GuestNet {
    /// The two ends of a link whose sockets are in `dir`: `10.9.0.1/24` and `10.9.0.2/24`.
    pub fn pair(dir: &Path) -> (GuestNet, GuestNet) {
        let (a, b) = (dir.join("net-a.sock"), dir.join("net-b.sock"));
        (
            GuestNet {
                local: a.clone(),
                remote: b.clone(),
                address: "10.9.0.1/24".into(),
                mac: "52:54:00:76:73:01".into(),
            },
            GuestNet {
                local: b,
                remote: a,
                address: "10.9.0.2/24".into(),
                mac: "52:54:00:76:73:02".into(),
            },
        )
    }

    /// The address without its prefix (`10.9.0.1`).
    pub fn ip(&self) -> &str {
        self.address.split('/').next().unwrap_or(&self.address)
    }
}

impl VmConfig {
    /// Defaults: 256 MiB, 2 vCPUs, 2 vectors, the detected accelerator, the driver loaded.
    pub fn new(name: &str, image: &Image, vshm_socket: &Path, work_dir: &Path) -> VmConfig {
        VmConfig {
            name: name.to_owned(),
            image: image.clone(),
            vshm_socket: vshm_socket.to_owned(),
            vectors: 2,
            memory_mib: 256,
            cpus: 2,
            work_dir: work_dir.to_owned(),
            accel: accelerator(),
            driver: true,
            extra_sockets: Vec::new(),
            net: None,
        }
    }

    /// The diagnostic port's socket (the guest's third serial port).
    fn diag_socket(&self) -> PathBuf {
        self.work_dir.join(format!("{}.diag.sock", self.name))
    }

    /// The QEMU command line.
    pub fn qemu_args(&self) -> Vec<String> {
        let console = self.work_dir.join(format!("{}.console.log", self.name));
        let agent = self.work_dir.join(format!("{}.agent.sock", self.name));
        let mut a: Vec<String> = vec![
            // vshmd labels the peer with this (vshmctl status / top).
            "-name".into(),
            self.name.clone(),
            "-M".into(),
            "q35".into(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.max(2).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
        ];
        match self.accel {
            Accel::Kvm => a.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()]),
            Accel::Tcg => a.extend(["-accel".into(), "tcg,thread=multi".into()]),
        }
        a.extend([
            "-kernel".into(),
            self.image.kernel.display().to_string(),
            "-initrd".into(),
            self.image.initrd.display().to_string(),
            "-append".into(),
            self.kernel_command_line(),
            "-serial".into(),
            format!("file:{}", console.display()),
            "-serial".into(),
            format!("unix:{},server=on,wait=off", agent.display()),
            // ttyS2: the diagnostic port (image.rs DIAG), asked when a command times out.
            "-serial".into(),
            format!("unix:{},server=on,wait=off", self.diag_socket().display()),
            "-chardev".into(),
            format!("socket,path={},id=vshm0", self.vshm_socket.display()),
            "-device".into(),
            format!("ivshmem-doorbell,chardev=vshm0,vectors={}", self.vectors),
        ]);
        for (i, socket) in self.extra_sockets.iter().enumerate() {
            let id = format!("vshm{}", i + 1);
            a.extend([
                "-chardev".into(),
                format!("socket,path={},id={id}", socket.display()),
                "-device".into(),
                format!("ivshmem-doorbell,chardev={id},vectors={}", self.vectors),
            ]);
        }
        if let Some(net) = &self.net {
            a.extend([
                "-netdev".into(),
                format!(
                    "dgram,id=net0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
                    net.local.display(),
                    net.remote.display()
                ),
                "-device".into(),
                format!("virtio-net-pci,netdev=net0,mac={}", net.mac),
            ]);
        }
        a
    }

    /// The guest kernel's command line: the console, `vshm_nodriver` without the driver,
    /// `vshm_net=ADDR` with a network.
    pub fn kernel_command_line(&self) -> String {
        // No crypto self-tests at boot (`cryptomgr.notests`): nothing here needs them, and
        // under TCG one of them held a vCPU for minutes (a CI guest never came up: soft
        // lockup in cryptomgr_test, 2026-12-03).
        let mut line = String::from("console=ttyS0 panic=-1 loglevel=4 cryptomgr.notests=1");
        if !self.driver {
            line.push_str(" vshm_nodriver");
        }
        if let Some(net) = &self.net {
            line.push_str(&format!(" vshm_net={}", net.address));
        }
        line
    }
}

/// Output of a command run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status.
    pub status: i32,
    /// stdout and stderr, interleaved, trailing newlines trimmed.
    pub text: String,
}

impl Output {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// A guest whose QEMU runs but whose agent has not answered yet.
#[derive(Debug)]
pub struct Starting {
    name: String,
    child: Option<Child>,
    agent: PathBuf,
    console: PathBuf,
    started: Instant,
}

impl Starting {
    fn exited(&mut self) -> Option<VmError> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        Some(VmError::Exited {
            name: self.name.clone(),
            status: status.to_string(),
            console: tail(&self.console),
        })
    }

    fn timeout(&self, what: &str, limit: Duration) -> VmError {
        VmError::Timeout {
            name: self.name.clone(),
            secs: limit.as_secs(),
            what: what.into(),
            console: tail(&self.console),
        }
    }

    /// Waits until the guest's agent says it is ready (`timeout` counts from the start).
    pub fn wait_ready(mut self, timeout: Duration) -> Result<Vm, VmError> {
        let stream = loop {
            if let Some(e) = self.exited() {
                return Err(e);
            }
            if let Ok(s) = UnixStream::connect(&self.agent) {
                break s;
            }
            if self.started.elapsed() > timeout {
                return Err(self.timeout("QEMU's agent socket", timeout));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let name = self.name.clone();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|source| VmError::Agent {
                name: name.clone(),
                source,
                console: tail(&self.console),
            })?;
        let child = self
            .child
            .take()
            .ok_or_else(|| self.timeout("QEMU", timeout))?;
        let mut vm = Vm {
            name,
            child,
            agent: Lines::new(stream),
            console: self.console.clone(),
            next_id: 1,
        };
        loop {
            if let Some(line) = vm.read_line()? {
                if line.contains("@@READY") {
                    return Ok(vm);
                }
            }
            if let Ok(Some(status)) = vm.child.try_wait() {
                return Err(VmError::Exited {
                    name: vm.name.clone(),
                    status: status.to_string(),
                    console: tail(&vm.console),
                });
            }
            if self.started.elapsed() > timeout {
                return Err(self.timeout("the guest's command agent", timeout));
            }
        }
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running guest.
#[derive(Debug)]
pub struct Vm {
    name: String,
    child: Child,
    agent: Lines<UnixStream>,
    console: PathBuf,
    next_id: u64,
}

/// The last lines of a guest's console log, and QEMU's own messages (its `.qemu.log` beside
/// the console log), for error reports.
fn tail(console: &Path) -> String {
    let last = |p: &Path| {
        let text = std::fs::read_to_string(p).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    let qemu_log = console
        .to_string_lossy()
        .replace(".console.log", ".qemu.log");
    let qemu = last(Path::new(&qemu_log));
    if qemu.is_empty() {
        last(console)
    } else {
        format!("{}\n[qemu] {qemu}", last(console))
    }
}

impl Vm {
    /// Starts QEMU and waits (up to `boot_timeout`) until the guest's agent answers.
    pub fn boot(cfg: &VmConfig, boot_timeout: Duration) -> Result<Vm, VmError> {
        Vm::start(cfg)?.wait_ready(boot_timeout)
    }

    /// Starts QEMU without waiting for the guest. QEMU is killed if the *thread* that
    /// called this exits (PR_SET_PDEATHSIG), so start VMs from a thread that outlives them.
    pub fn start(cfg: &VmConfig) -> Result<Starting, VmError> {
        let qemu = "qemu-system-x86_64";
        let agent = cfg.work_dir.join(format!("{}.agent.sock", cfg.name));
        let _ = std::fs::remove_file(&agent);
        if let Some(net) = &cfg.net {
            // QEMU binds its end of the link and fails if the file is there.
            let _ = std::fs::remove_file(&net.local);
        }
        let mut cmd = Command::new(qemu);
        let stderr_log = cfg.work_dir.join(format!("{}.qemu.log", cfg.name));
        let stderr = std::fs::File::create(&stderr_log).map_err(|source| VmError::Spawn {
            qemu: qemu.into(),
            source,
        })?;
        cmd.args(cfg.qemu_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: prctl in the child between fork and exec; async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| VmError::Spawn {
            qemu: qemu.into(),
            source,
        })?;
        Ok(Starting {
            name: cfg.name.clone(),
            child: Some(child),
            agent,
            console: cfg.work_dir.join(format!("{}.console.log", cfg.name)),
            started: Instant::now(),
        })
    }

    /// One whole line from the agent, or `None` if none arrived within the socket timeout.
    fn read_line(&mut self) -> Result<Option<String>, VmError> {
        match self.agent.next_line() {
            Ok(Line::Whole(line)) => Ok(Some(line)),
            Ok(Line::Nothing) => Ok(None),
            Ok(Line::Closed) => Err(VmError::Exited {
                name: self.name.clone(),
                status: "agent closed".into(),
                console: tail(&self.console),
            }),
            Err(source) => Err(VmError::Agent {
                name: self.name.clone(),
                source,
                console: tail(&self.console),
            }),
        }
    }

    /// Runs `command` with the guest's `sh` and returns its output and status.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<Output, VmError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = format!("{id} {}\n", command.replace('\n', " "));
        self.agent
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|source| VmError::Agent {
                name: self.name.clone(),
                source,
                console: tail(&self.console),
            })?;
        let start = Instant::now();
        let end = format!("@@END {id} ");
        let mut text = Vec::new();
        loop {
            if let Some(l) = self.read_line()? {
                if let Some(rc) = l.strip_prefix(&end) {
                    let status = rc.trim().parse().unwrap_or(-1);
                    return Ok(Output {
                        status,
                        text: text.join("\n").trim_end().to_owned(),
                    });
                }
                if l != "@@READY" {
                    text.push(l);
                }
            }
            if start.elapsed() > timeout {
                return Err(VmError::Timeout {
                    name: self.name.clone(),
                    secs: timeout.as_secs(),
                    what: format!("`{command}`"),
                    console: format!(
                        "{}\n--- what the agent said since the command ({} lines, then {:?} \
                         without a newline):\n{}\n--- where the guest's processes are \
                         (diagnostic port):\n{}",
                        tail(&self.console),
                        text.len(),
                        self.agent.partial(),
                        text.join("\n"),
                        self.diagnose()
                    ),
                });
            }
        }
    }

    /// Asks the guest's diagnostic port (image.rs `DIAG`) where every process is. It answers
    /// while the agent is busy with a command that does not return; silence means the guest
    /// as a whole is stuck (or its kernel is). Waits at most 10 s.
    pub fn diagnose(&self) -> String {
        let path = self
            .console
            .to_string_lossy()
            .replace(".console.log", ".diag.sock");
        let Ok(mut stream) = UnixStream::connect(&path) else {
            return format!("(cannot connect to {path})");
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        if stream.write_all(b"dump\n").is_err() {
            return "(the diagnostic port took no input)".into();
        }
        let mut reader = Lines::new(stream);
        let mut text = String::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            match reader.next_line() {
                Ok(Line::Whole(line)) if line.contains("@@DIAG-END") => return text,
                Ok(Line::Whole(line)) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                Ok(Line::Nothing) => {}
                Ok(Line::Closed) | Err(_) => break,
            }
        }
        format!("{text}(no complete answer within 10 s: the guest itself may be stuck)")
    }

    /// Starts `vshm ARGS --until-signal` in the background (e.g. `hold NAME` or
    /// `create NAME --max 1M --hold`) and waits until it holds its handles; `tag` names it
    /// for [`Vm::release`]. Returns the command's output so far.
    pub fn hold(
        &mut self,
        tag: &str,
        vshm_args: &str,
        timeout: Duration,
    ) -> Result<Output, VmError> {
        // If it never says it holds: where it is stuck (a flake seen once, issue 12's note).
        let stalled = format!(
            "p=$(cat /tmp/{tag}.pid); echo \"--- vshm (pid $p) stalled: \
             $(cut -d' ' -f3 /proc/$p/stat 2>/dev/null) in $(cat /proc/$p/wchan 2>/dev/null)\"; \
             cat /proc/$p/stack 2>/dev/null; for t in /proc/$p/task/*; do \
             echo \"thread $t: $(cat $t/wchan 2>/dev/null) syscall $(cat $t/syscall 2>/dev/null)\"; \
             done; dmesg | tail -5"
        );
        self.run(
            &format!(
                "vshm {vshm_args} --until-signal > /tmp/{tag}.out 2>&1 & echo $! > /tmp/{tag}.pid; \
                 i=0; while ! grep -q holding /tmp/{tag}.out; do \
                 i=$((i+1)); if [ $i -gt 300 ]; then cat /tmp/{tag}.out; {stalled}; exit 1; fi; \
                 sleep 0.05; done; cat /tmp/{tag}.out"
            ),
            timeout,
        )
    }

    /// Stops a background holder started by [`Vm::hold`] with SIGTERM (it closes its
    /// handles) and waits until it has exited.
    pub fn release(&mut self, tag: &str, timeout: Duration) -> Result<Output, VmError> {
        self.run(
            &format!(
                "p=$(cat /tmp/{tag}.pid); kill $p; \
                 while kill -0 $p 2>/dev/null; do sleep 0.05; done; cat /tmp/{tag}.out"
            ),
            timeout,
        )
    }

    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The console log so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// SIGKILLs QEMU (a VM dying without warning) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        let image = Image {
            kernel: "/k".into(),
            initrd: "/i".into(),
            driver: None,
        };
        VmConfig::new("a", &image, Path::new("/s"), Path::new("/w"))
    }

    #[test]
    fn a_guest_has_no_network_unless_asked() {
        let args = config().qemu_args();
        assert!(!args
            .iter()
            .any(|a| a.contains("netdev") || a.contains("virtio-net")));
        assert!(!config().kernel_command_line().contains("vshm_net"));
    }

    #[test]
    fn the_two_ends_of_a_link_point_at_each_other_with_their_own_address_and_mac() {
        let (a, b) = GuestNet::pair(Path::new("/w"));
        assert_eq!(
            (a.local.clone(), a.remote.clone()),
            (b.remote.clone(), b.local.clone())
        );
        assert_ne!(a.address, b.address);
        assert_ne!(a.mac, b.mac);
        assert_eq!(a.ip(), "10.9.0.1");
        let mut cfg = config();
        cfg.net = Some(a.clone());
        let args = cfg.qemu_args();
        let netdev = args
            .iter()
            .position(|x| x == "-netdev")
            .map(|i| args[i + 1].clone())
            .expect("-netdev");
        assert!(netdev.starts_with("dgram,id=net0,"), "{netdev}");
        assert!(netdev.contains("local.path=/w/net-a.sock"), "{netdev}");
        assert!(netdev.contains("remote.path=/w/net-b.sock"), "{netdev}");
        assert!(args
            .iter()
            .any(|x| x == &format!("virtio-net-pci,netdev=net0,mac={}", a.mac)));
        let append = args
            .iter()
            .position(|x| x == "-append")
            .map(|i| args[i + 1].clone())
            .expect("-append");
        assert!(append.ends_with(" vshm_net=10.9.0.1/24"), "{append}");
    }
}
