//! A freestanding guest on this machine's /dev/kvm: put in long mode by the VMM, it writes to
//! the serial port and ends through the exit port. (Real KVM; on these machines it is PVM,
//! about a microsecond per instruction, which a guest this small does not notice.)

use std::process::Command;

use vshm_vmm::{Outcome, Vm};

/// `mov dx, 0x3f8; mov al, 'O'; out dx, al; mov al, 'K'; out dx, al;
///  mov dx, 0xf4; mov al, 7; out dx, al; hlt` in 64-bit mode.
const GUEST: &[u8] = &[
    0x66, 0xBA, 0xF8, 0x03, 0xB0, b'O', 0xEE, 0xB0, b'K', 0xEE, 0x66, 0xBA, 0xF4, 0x00, 0xB0, 0x07,
    0xEE, 0xF4,
];

#[test]
fn a_freestanding_guest_in_long_mode_writes_to_the_serial_port_and_ends_with_its_status() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    let mut vm = Vm::new(16 << 20, GUEST).expect("the VM");
    // A guest too large for its RAM is refused, naming the sizes.
    let e = Vm::new(4 << 20, &vec![0xF4; (3 << 20) + 1]).expect_err("too large");
    assert!(e.to_string().contains("3145729 bytes"), "{e}");
    // RAM that would reach the PCI devices' BARs is refused, naming its size.
    let e = Vm::new(4 << 30, GUEST).expect_err("too much RAM");
    assert!(e.to_string().contains("4294967296 bytes"), "{e}");
    let out: Outcome = vm.run(1000).expect("the run");
    assert_eq!(out.serial, b"OK");
    assert_eq!(out.status, Some(7));
}

#[test]
fn the_binary_runs_a_guest_file_and_exits_with_its_status_or_says_what_is_wrong() {
    let bin = env!("CARGO_BIN_EXE_vshm-vmm");
    let missing = Command::new(bin)
        .args(["--guest", "/nonexistent/guest.bin"])
        .output()
        .expect("run");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("cannot read the guest /nonexistent/guest.bin"),
        "{err}"
    );
    if !vshm_vmm::kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vshm-vmm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("guest.bin");
    std::fs::write(&file, GUEST).expect("write");
    let out = Command::new(bin)
        .arg("--guest")
        .arg(&file)
        .output()
        .expect("run");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"OK");
}

#[test]
fn a_guest_instruction_kvm_cannot_run_ends_the_run_with_an_error_saying_where() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    // `ud2`: undefined everywhere; with no IDT it ends the run (a triple fault on hardware
    // KVM, an emulation failure on PVM), never a hang or a crash of the VMM.
    let mut vm = Vm::new(16 << 20, &[0x0F, 0x0B]).expect("the VM");
    let e = vm.run(1000).expect_err("the guest cannot go on");
    let text = e.to_string();
    assert!(text.contains("the guest stopped"), "{text}");
}
