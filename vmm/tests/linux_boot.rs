//! The Linux boot path on this machine's /dev/kvm, with the Debian kernel `cargo xtask
//! images` downloads (images/out/vmlinuz).
//!
//! Where KVM is PVM (no vmx/svm: about a microsecond per guest instruction) the kernel
//! cannot boot in useful time, so the test goes as far as the decompressor's first line on
//! the console. Debian builds without CONFIG_X86_VERBOSE_BOOTUP, so its decompressor does
//! not print "Decompressing Linux..." at all (the string is not in the image); the first
//! line it does print is the KASLR warning `nokaslr` asks for, written through COM1 with
//! LSR polling, from `choose_random_location` just before decompression starts. Where KVM
//! is hardware virtualisation the test boots the whole guest image instead, to the first
//! line its init prints.

use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use vshm_images::{Accel, Image};
use vshm_vmm::linux::DEFAULT_CMDLINE;
use vshm_vmm::{Ended, LinuxConfig, Outcome, RunLimits, Vm};

/// The decompressor's first console line with `nokaslr` on the command line.
const DECOMPRESSOR_LINE: &str = "KASLR disabled: 'nokaslr' on cmdline.";
/// The first line the image's init prints (vshm_images::image::INIT).
const INIT_LINE: &str = "vshm-guest: up";
/// How long the decompressor may take to get there on PVM (measured: about 5 s on an idle
/// machine, see vmm/README.md; generous for a loaded CI machine).
const DECOMPRESSOR_BOUND: Duration = Duration::from_secs(120);
/// How long a full boot may take on hardware KVM (a second or two in practice).
const BOOT_BOUND: Duration = Duration::from_secs(120);

/// The kernel, or `None` (with the reason printed) where the test cannot run. Under CI the
/// images step runs before the tests and CI machines have /dev/kvm: there both must exist.
fn kernel() -> Option<PathBuf> {
    let ci = std::env::var_os("CI").is_some();
    if !vshm_vmm::kvm_or_skip() {
        return None;
    }
    match Image::built_kernel() {
        Some(k) => Some(k),
        None => {
            assert!(
                !ci,
                "no kernel in {}: CI runs `cargo xtask images` before the tests",
                vshm_images::out_dir().display()
            );
            eprintln!(
                "skipped: no kernel in {} (run `cargo xtask images`)",
                vshm_images::out_dir().display()
            );
            None
        }
    }
}

/// Runs `cfg` on its own thread until the serial output contains `until` or `bound` passes
/// (the VMM's own deadline), with a watchdog past that: a run that hangs fails the test.
fn run_until(cfg: LinuxConfig, until: &str, bound: Duration) -> Outcome {
    let (tx, rx) = mpsc::channel();
    let limits = RunLimits {
        timeout: Some(bound),
        until: Some(until.as_bytes().to_vec()),
        ..Default::default()
    };
    thread::spawn(move || {
        let out = Vm::linux(&cfg).and_then(|mut vm| vm.run_with(&limits));
        let _ = tx.send(out);
    });
    match rx.recv_timeout(bound + Duration::from_secs(30)) {
        Ok(out) => out.expect("the run"),
        Err(e) => panic!("the VMM did not come back from its run within its deadline: {e}"),
    }
}

#[test]
fn the_images_kernel_reaches_its_decompressors_first_console_line_on_pvm_or_its_init_on_hardware_kvm(
) {
    let Some(kernel) = kernel() else { return };
    if vshm_images::accelerator() == Accel::Kvm {
        let Some(image) = Image::existing(&vshm_images::out_dir()) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs `cargo xtask images` before the tests"
            );
            eprintln!("skipped: no initramfs next to the kernel (run `cargo xtask images`)");
            return;
        };
        let mut cfg = LinuxConfig::new(image.kernel, 512 << 20);
        cfg.initrd = Some(image.initrd);
        let out = run_until(cfg, INIT_LINE, BOOT_BOUND);
        assert_eq!(
            out.ended,
            Ended::Matched,
            "{out}\n{}",
            String::from_utf8_lossy(&out.serial)
        );
        eprintln!("hardware KVM: the guest's init spoke after {out}");
        return;
    }
    eprintln!(
        "no vmx/svm here (PVM): a full boot is skipped, the decompressor's first line is awaited"
    );
    let mut cfg = LinuxConfig::new(kernel, 256 << 20);
    cfg.cmdline = format!("{DEFAULT_CMDLINE} nokaslr");
    let out = run_until(cfg, DECOMPRESSOR_LINE, DECOMPRESSOR_BOUND);
    assert_eq!(
        out.ended,
        Ended::Matched,
        "{out}\n{}",
        String::from_utf8_lossy(&out.serial)
    );
    // The decompressor set up COM1 itself (divisor, line control) and polled LSR before
    // each byte: each of those is an exit.
    assert!(
        out.exits > out.serial.len() as u64,
        "{out}: fewer exits than bytes"
    );
    eprintln!("PVM: the decompressor spoke after {out}");
}

#[test]
fn the_binary_boots_a_kernel_or_says_what_is_wrong() {
    let bin = env!("CARGO_BIN_EXE_vshm-vmm");
    let run = |args: &[&str]| Command::new(bin).args(args).output().expect("run");
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // Exactly one of --guest and --kernel.
    let none = run(&[]);
    assert_eq!(none.status.code(), Some(2), "{}", stderr(&none));
    let both = run(&["--guest", "g", "--kernel", "k"]);
    assert_eq!(both.status.code(), Some(2), "{}", stderr(&both));
    assert!(
        stderr(&both).contains("cannot be used with"),
        "{}",
        stderr(&both)
    );
    let initrd_alone = run(&["--guest", "g", "--initrd", "i"]);
    assert_eq!(
        initrd_alone.status.code(),
        Some(2),
        "{}",
        stderr(&initrd_alone)
    );

    let missing = run(&["--kernel", "/nonexistent/bzImage"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("cannot read the kernel /nonexistent/bzImage"),
        "{}",
        stderr(&missing)
    );
    let not_bz = run(&["--kernel", bin]);
    assert_eq!(not_bz.status.code(), Some(1));
    assert!(
        stderr(&not_bz).contains("is not a bzImage"),
        "{}",
        stderr(&not_bz)
    );

    let Some(kernel) = kernel() else { return };
    let kernel = kernel.to_str().expect("a UTF-8 path");
    let long = "x".repeat(5000);
    let too_long = run(&["--kernel", kernel, "--cmdline", &long]);
    assert_eq!(too_long.status.code(), Some(1));
    assert!(
        stderr(&too_long).contains("command line is 5000 bytes; this kernel accepts at most 2047"),
        "{}",
        stderr(&too_long)
    );
    // --until ends the run successfully once the console shows the text, which the binary
    // streamed to stdout as it came.
    let cmdline = format!("{DEFAULT_CMDLINE} nokaslr");
    let until = run(&[
        "--kernel",
        kernel,
        "--cmdline",
        &cmdline,
        "--until",
        DECOMPRESSOR_LINE,
        "--timeout-secs",
        "120",
    ]);
    assert_eq!(until.status.code(), Some(0), "{}", stderr(&until));
    assert!(
        String::from_utf8_lossy(&until.stdout).contains(DECOMPRESSOR_LINE),
        "{:?}",
        String::from_utf8_lossy(&until.stdout)
    );
    assert!(
        stderr(&until).contains("printed the awaited text"),
        "{}",
        stderr(&until)
    );
    // A run that does not end in time says so and exits 124.
    let timed_out = run(&["--kernel", kernel, "--timeout-secs", "1"]);
    assert_eq!(timed_out.status.code(), Some(124), "{}", stderr(&timed_out));
    assert!(
        stderr(&timed_out).contains("did not end within 1 s"),
        "{}",
        stderr(&timed_out)
    );
}
