//! Builds the test guest: the Debian cloud kernel, busybox-static and a static `vshm` in an
//! uncompressed initramfs whose init starts a command agent on the second serial port.
//!
//! Downloads go through `apt-get download` (Debian's mirrors, the only network here) and
//! are cached in the output directory, so a second build is instant.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::Archive;

/// Why the image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A tool failed or is missing.
    #[error("{what} failed: {detail}")]
    Tool {
        /// The step.
        what: String,
        /// Its error output.
        detail: String,
    },
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

/// A built guest.
#[derive(Debug, Clone)]
pub struct Image {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs (newc cpio).
    pub initrd: PathBuf,
    /// The vshm kernel driver (guest/linux-driver) built for the image's kernel, if it could
    /// be built: it is in the initramfs as /lib/modules/vshm.ko and init loads it (unless the
    /// kernel command line says `vshm_nodriver`).
    pub driver: Option<PathBuf>,
}

/// Where `cargo xtask images` builds the guest: images/out (ignored by git).
pub fn out_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("out")
}

impl Image {
    /// The kernel (bzImage) `cargo xtask images` put in [`out_dir`], if it has: for tests that
    /// boot the kernel alone (the VMM's). It is downloaded first, so it can be there without
    /// the initramfs.
    pub fn built_kernel() -> Option<PathBuf> {
        let kernel = out_dir().join("vmlinuz");
        kernel.exists().then_some(kernel)
    }

    /// The image in `dir` if it was built there.
    pub fn existing(dir: &Path) -> Option<Image> {
        let driver = dir.join(DRIVER_FILE);
        let img = Image {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initramfs.cpio"),
            driver: driver.exists().then_some(driver),
        };
        (img.kernel.exists() && img.initrd.exists()).then_some(img)
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_owned(),
        source,
    }
}

fn run(what: &str, cmd: &mut Command) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError::Tool {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            what: what.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The concrete kernel package `linux-image-cloud-amd64` currently depends on.
fn kernel_package() -> Result<String, ImageError> {
    // Fresh package lists first (this runs once, when no kernel is cached): a kernel picked
    // from stale lists may be one whose headers the archive no longer has (seen: a machine's
    // lists named 6.1.0-48, whose headers debian-security answered 404, so the image had
    // no driver). Without root the update fails and the lists there are used.
    let updated = run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    );
    let text = run(
        "apt-cache depends linux-image-cloud-amd64",
        Command::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]),
    )?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| ImageError::Tool {
            what: "finding the cloud kernel package".into(),
            detail: match updated {
                Ok(_) => text.clone(),
                Err(e) => format!("{text}\n(the package lists could not be updated: {e})"),
            },
        })
}

/// The built driver in the output directory.
const DRIVER_FILE: &str = "vshm.ko";
/// The kernel version (`uname -r`) of the downloaded guest kernel, written beside it.
const KERNEL_VERSION_FILE: &str = "kernel.version";

/// The guest kernel's version (`6.1.0-57-cloud-amd64`): the one the cached vmlinuz was
/// downloaded as, never "the latest" (Debian moves it every few weeks).
pub fn kernel_version(out: &Path) -> Result<String, ImageError> {
    let file = out.join(KERNEL_VERSION_FILE);
    if let Ok(v) = std::fs::read_to_string(&file) {
        return Ok(v.trim().to_owned());
    }
    // An image built before the version was recorded: its download is in the cache.
    let cache = out.join("cache");
    std::fs::read_dir(&cache)
        .map_err(io(&cache))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("linux-image-"))
                .map(str::to_owned)
        })
        .next()
        .ok_or_else(|| ImageError::Tool {
            what: "finding the guest kernel's version".into(),
            detail: format!(
                "neither {} nor {}/linux-image-*",
                file.display(),
                cache.display()
            ),
        })
}

/// The files of guest/linux-driver a build needs.
const DRIVER_SOURCES: [&str; 7] = [
    "vshm_dev.c",
    "vshm_reap.c",
    "vshm_internal.h",
    "vshm_format.h",
    "vshm_ioctl.h",
    "Kbuild",
    "Makefile",
];

/// The driver's sources (guest/linux-driver).
fn driver_sources() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("guest")
        .join("linux-driver")
}

/// Builds guest/linux-driver into `out/vshm.ko` against the headers of exactly the guest
/// kernel's version (`linux-headers-<version>`), installing them with apt-get when missing.
fn build_driver(out: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
    let version = kernel_version(out)?;
    let kdir = PathBuf::from(format!("/usr/src/linux-headers-{version}"));
    if !kdir.join("Makefile").exists() {
        let package = format!("linux-headers-{version}");
        progress(&format!(
            "installing {package} (apt-get) for the vshm driver"
        ));
        run(
            &format!("apt-get install {package}"),
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", &package])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    // Build in a copy under out/ (the source tree stays clean); a file is copied only when
    // it changed, so make rebuilds only then.
    let build = out.join("driver-build");
    std::fs::create_dir_all(&build).map_err(io(&build))?;
    let src = driver_sources();
    for name in DRIVER_SOURCES {
        let from = src.join(name);
        let to = build.join(name);
        let bytes = std::fs::read(&from).map_err(io(&from))?;
        if std::fs::read(&to).ok().as_deref() != Some(&bytes[..]) {
            std::fs::write(&to, &bytes).map_err(io(&to))?;
        }
    }
    progress(&format!("building vshm.ko against {}", kdir.display()));
    run(
        "make (vshm.ko)",
        Command::new("make")
            .arg("-s")
            .arg(format!("KDIR={}", kdir.display()))
            .current_dir(&build),
    )?;
    let ko = out.join(DRIVER_FILE);
    std::fs::copy(build.join("vshm.ko"), &ko).map_err(io(&ko))?;
    Ok(ko)
}

/// Downloads `package` into `dir` and extracts `member` (a path inside the package, e.g.
/// `./bin/busybox`) into `dir/root`. Returns the extracted path.
fn fetch_member(dir: &Path, package: &str, member: &str) -> Result<PathBuf, ImageError> {
    fetch_members(dir, package, &[member])?;
    Ok(dir.join("root").join(member.trim_start_matches("./")))
}

/// Downloads `package` into `dir` (once) and extracts `members` (paths inside the package)
/// into `dir/root`, in one pass over the package.
fn fetch_members(dir: &Path, package: &str, members: &[&str]) -> Result<(), ImageError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let debs = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    if debs(dir).is_empty() {
        run(
            &format!("apt-get download {package}"),
            Command::new("apt-get")
                .arg("download")
                .arg(package)
                .current_dir(dir),
        )?;
    }
    let deb = debs(dir)
        .into_iter()
        .next()
        .ok_or_else(|| ImageError::Tool {
            what: format!("apt-get download {package}"),
            detail: "no .deb appeared".into(),
        })?;
    let root = dir.join("root");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let quoted: Vec<String> = members.iter().map(|m| format!("'{m}'")).collect();
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' {}",
        deb.display(),
        root.display(),
        quoted.join(" ")
    );
    run(
        &format!("extracting {} from {}", members.join(", "), deb.display()),
        Command::new("sh").args(["-c", &script]),
    )?;
    Ok(())
}

/// The guest kernel's virtio-net driver and what it needs, in load order: Debian's cloud
/// kernel builds them as modules (`CONFIG_VIRTIO_PCI=m`, `CONFIG_VIRTIO_NET=m`), and its
/// initramfs-less boot here loads none of them by itself.
const NET_MODULES: [&str; 8] = [
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
    "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
    "kernel/drivers/virtio/virtio_pci.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];

/// Where the virtio-net modules are kept in the output directory (and in the image, under
/// /lib/modules/net/).
const NET_DIR: &str = "net-modules";

/// Extracts [`NET_MODULES`] of the guest kernel `version` from its package (cached in
/// `out/cache/linux-image-<version>`) into `out/net-modules/`, once. Returns their paths in
/// load order.
fn net_modules(out: &Path, version: &str) -> Result<Vec<PathBuf>, ImageError> {
    let dir = out.join(NET_DIR);
    let paths: Vec<PathBuf> = NET_MODULES
        .iter()
        .map(|m| dir.join(m.rsplit('/').next().unwrap_or(m)))
        .collect();
    if paths.iter().all(|p| p.exists()) {
        return Ok(paths);
    }
    let package = format!("linux-image-{version}");
    let cache = out.join("cache").join(&package);
    let members: Vec<String> = NET_MODULES
        .iter()
        .map(|m| format!("./lib/modules/{version}/{m}"))
        .collect();
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    fetch_members(&cache, &package, &refs)?;
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    for (member, to) in members.iter().zip(&paths) {
        let from = cache.join("root").join(member.trim_start_matches("./"));
        std::fs::copy(&from, to).map_err(io(&from))?;
    }
    Ok(paths)
}

/// The guest's /init: mounts, installs busybox applets, loads the vshm driver (unless the
/// kernel command line says `vshm_nodriver`), brings up eth0 if the kernel command line
/// says `vshm_net=ADDR/PREFIX`, then serves the agent forever.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run
echo "vshm-guest: up, kernel $(uname -r)"
if grep -qw vshm_nodriver /proc/cmdline; then
    echo "vshm-guest: vshm driver not loaded (vshm_nodriver on the kernel command line)"
elif [ ! -e /lib/modules/vshm.ko ]; then
    echo "vshm-guest: vshm driver not loaded (no /lib/modules/vshm.ko in this image)"
elif insmod /lib/modules/vshm.ko; then
    echo "vshm-guest: vshm driver loaded: $(ls /dev | grep '^vshm' | tr '\n' ' ')"
else
    echo "vshm-guest: vshm driver FAILED to load"
fi
# Networking only when asked (`vshm_net=ADDR/PREFIX` on the kernel command line: a guest
# with a virtio-net device, e.g. the benchmark's TCP anchor): the virtio-net modules, then
# eth0 up with that address. The outcome is in /run/vshm-net.
net=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^vshm_net=//p')
if [ -n "$net" ]; then
    ok=1
    for m in $(cat /lib/modules/net/order 2>/dev/null); do
        insmod /lib/modules/net/$m || ok=0
    done
    i=0
    while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
    if [ $ok = 1 ] && ip link set lo up && ip link set eth0 up && ip addr add "$net" dev eth0; then
        echo "up eth0 $net" > /run/vshm-net
    else
        echo "failed: modules $(cat /lib/modules/net/order 2>/dev/null | tr '\n' ' '), $(ls /sys/class/net | tr '\n' ' ')" > /run/vshm-net
    fi
    echo "vshm-guest: network: $(cat /run/vshm-net)"
fi
# The diagnostic port (third serial port) answers beside the agent, which runs one command
# at a time and cannot say where a stuck one waits.
( while true; do
    stty -F /dev/ttyS2 raw -echo 2>/dev/null
    sh /diag.sh < /dev/ttyS2 > /dev/ttyS2 2>&1
    sleep 1
done ) &
while true; do
    stty -F /dev/ttyS1 raw -echo 2>/dev/null
    sh /agent.sh < /dev/ttyS1 > /dev/ttyS1 2>&1
    sleep 1
done
"#;

/// The diagnostic port's script: for any input line, where every user process (and every
/// kernel thread in uninterruptible sleep) is — state, wait channel, each thread's syscall,
/// kernel stack — and the kernel log's tail, then `@@DIAG-END`. The host asks when a
/// command times out (`Vm::run`), to tell a stuck command from a stuck guest.
pub const DIAG: &str = r#"while IFS= read -r line; do
    echo "--- guest uptime $(cut -d' ' -f1 /proc/uptime) s, load $(cat /proc/loadavg)"
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        cmd=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
        st=$(sed 's/.*) //' $d/stat 2>/dev/null | cut -d' ' -f1)
        [ -z "$cmd" ] && [ "$st" != D ] && continue
        echo "pid $p [$st] in $(cat $d/wchan 2>/dev/null): $cmd"
        for t in $d/task/*; do
            [ "${t##*/}" = "$p" ] && continue
            echo "  thread ${t##*/} [$(sed 's/.*) //' $t/stat | cut -d' ' -f1)] in $(cat $t/wchan 2>/dev/null), syscall $(cut -d' ' -f1 $t/syscall 2>/dev/null)"
        done
        sed 's/^/    /' $d/stack 2>/dev/null
    done
    echo "--- dmesg"
    dmesg | tail -20
    echo "@@DIAG-END"
done
"#;

/// The command agent: each input line is `ID COMMAND`; it answers with the command's output
/// (stdout and stderr) followed by `@@END ID EXIT_STATUS`. Until the first command it says
/// `@@READY` once a second.
pub const AGENT: &str = r#"# Announce ourselves every second until the first command arrives (output on the serial
# port is lost while no one is connected to QEMU's end). The announcer runs beside the
# reader: a read with a timeout could cut a command line in half and lose it.
rm -f /tmp/agent-busy
( while [ ! -e /tmp/agent-busy ]; do echo "@@READY"; sleep 1; done ) &
while IFS= read -r line; do
    touch /tmp/agent-busy
    id=${line%% *}
    cmd=${line#* }
    out=$(sh -c "$cmd" 2>&1 < /dev/null)
    rc=$?
    printf '%s\n@@END %s %s\n' "$out" "$id" "$rc"
done
"#;

/// Builds (or reuses) the image in `out`, with the static `vshm` at `vshm` and each of
/// `programs` (static binaries) as `/bin/<its file name>`. `progress` receives one line
/// per step.
pub fn build(
    out: &Path,
    vshm: &Path,
    programs: &[&Path],
    progress: &mut dyn FnMut(&str),
) -> Result<Image, ImageError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let kernel = out.join("vmlinuz");
    if !kernel.exists() {
        let package = kernel_package()?;
        progress(&format!("downloading the guest kernel ({package})"));
        let dir = out.join("cache").join(&package);
        fetch_member(&dir, &package, "./boot/")?;
        let boot = dir.join("root/boot");
        let vmlinuz = std::fs::read_dir(&boot)
            .map_err(io(&boot))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .ok_or_else(|| ImageError::Tool {
                what: format!("finding vmlinuz in {package}"),
                detail: boot.display().to_string(),
            })?;
        std::fs::copy(&vmlinuz, &kernel).map_err(io(&kernel))?;
        let version = package.trim_start_matches("linux-image-");
        let file = out.join(KERNEL_VERSION_FILE);
        std::fs::write(&file, format!("{version}\n")).map_err(io(&file))?;
    } else {
        progress("guest kernel: cached");
    }
    let driver = match build_driver(out, progress) {
        Ok(ko) => Some(ko),
        Err(e) => {
            let _ = std::fs::remove_file(out.join(DRIVER_FILE));
            progress(&format!(
                "WARNING: the vshm kernel driver is not in this image (its tests will be \
                 skipped): {e}"
            ));
            None
        }
    };
    let busybox = out.join("busybox");
    if !busybox.exists() {
        progress("downloading busybox-static");
        let got = fetch_member(
            &out.join("cache/busybox"),
            "busybox-static",
            "./bin/busybox",
        )?;
        std::fs::copy(&got, &busybox).map_err(io(&busybox))?;
    } else {
        progress("busybox: cached");
    }
    progress(
        "packing the initramfs (busybox, vshm, the C example, vshm.ko, virtio-net, init, agent)",
    );
    let read = |p: &Path| std::fs::read(p).map_err(io(p));
    let mut a = Archive::new();
    let w = |r: std::io::Result<()>| r.map_err(io(out));
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "root",
        "usr",
        "usr/bin",
        "usr/sbin",
        "lib",
        "lib/modules",
    ] {
        w(a.dir(d))?;
    }
    w(a.char_device("dev/console", 5, 1))?;
    w(a.char_device("dev/null", 1, 3))?;
    w(a.file("bin/busybox", 0o755, &read(&busybox)?))?;
    w(a.symlink("bin/sh", "busybox"))?;
    w(a.file("bin/vshm", 0o755, &read(vshm)?))?;
    for program in programs {
        let name = program
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ImageError::Tool {
                what: "adding a program to the image".into(),
                detail: format!("{} has no file name", program.display()),
            })?;
        w(a.file(&format!("bin/{name}"), 0o755, &read(program)?))?;
    }
    if let Some(ko) = &driver {
        w(a.file("lib/modules/vshm.ko", 0o644, &read(ko)?))?;
    }
    // The virtio-net modules (init loads them only for `vshm_net=`); an image without them
    // still boots, and says so in /run/vshm-net when asked for a network.
    match kernel_version(out).and_then(|v| net_modules(out, &v)) {
        Ok(modules) => {
            w(a.dir("lib/modules/net"))?;
            let mut order = String::new();
            for m in &modules {
                let name = m.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                w(a.file(&format!("lib/modules/net/{name}"), 0o644, &read(m)?))?;
                order.push_str(name);
                order.push('\n');
            }
            w(a.file("lib/modules/net/order", 0o644, order.as_bytes()))?;
        }
        Err(e) => progress(&format!(
            "WARNING: no virtio-net modules in this image (guests cannot have a network): {e}"
        )),
    }
    w(a.file("init", 0o755, INIT.as_bytes()))?;
    w(a.file("agent.sh", 0o755, AGENT.as_bytes()))?;
    w(a.file("diag.sh", 0o755, DIAG.as_bytes()))?;
    let bytes = a.finish().map_err(io(out))?;
    let initrd = out.join("initramfs.cpio");
    let tmp = out.join("initramfs.cpio.tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &initrd).map_err(io(&initrd))?;
    Ok(Image {
        kernel,
        initrd,
        driver,
    })
}
