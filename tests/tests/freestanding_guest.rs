//! The freestanding guest (guest/freestanding), built from the no_std core, on the VMM
//! (`vshm-vmm`, real KVM). With no vshm device on the VMM's PCI bus it must say so and end
//! with status 2.

use std::process::Command;
use std::time::Instant;

use vshm_tests::bin;
use vshm_tests::freestanding::{guest_elf, guest_flat};

#[test]
fn the_guest_image_is_a_static_executable_at_1_mib_without_sse() {
    let elf = std::fs::read(guest_elf()).expect("read the ELF");
    assert_eq!(&elf[..4], b"\x7fELF");
    // ELF64, little-endian, ET_EXEC, x86-64, entry 0x100000.
    assert_eq!((elf[4], elf[5]), (2, 1));
    assert_eq!(u16::from_le_bytes([elf[16], elf[17]]), 2, "ET_EXEC");
    assert_eq!(u16::from_le_bytes([elf[18], elf[19]]), 0x3E, "x86-64");
    let entry = u64::from_le_bytes(elf[24..32].try_into().expect("8 bytes"));
    assert_eq!(entry, 0x10_0000);
    // The flat image starts with `_start` (cli; cld).
    let flat = std::fs::read(guest_flat()).expect("read the flat image");
    assert_eq!(&flat[..2], &[0xFA, 0xFC]);
    // No SSE instruction (they stop the VMs this runs on): no xmm register in the code.
    if let Ok(out) = Command::new("objdump").arg("-d").arg(guest_elf()).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert!(!text.contains("xmm"), "the guest uses SSE");
    }
}

#[test]
fn with_no_vshm_device_the_guest_says_so_and_exits_2() {
    if !vshm_vmm::kvm_or_skip() {
        return;
    }
    let flat = guest_flat();
    let started = Instant::now();
    let out = Command::new(bin("vshm-vmm"))
        .arg("--guest")
        .arg(&flat)
        .output()
        .expect("run vshm-vmm");
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        stdout,
        "vshm-guest: no vshm device found (no PCI function 0x1af4:0x10fe on bus 0)\n"
    );
    eprintln!(
        "the guest ({} bytes flat) ran in {took:?}: {}",
        std::fs::metadata(&flat).map(|m| m.len()).unwrap_or(0),
        stderr.trim()
    );
}
