//! `vshm-guest`: the freestanding x86-64 guest that drives the vshm virtio device
//! (README.md has the contract with the VMM that runs it). Started in long mode at
//! `_start` (0x100000) with RSP = 0x80000 and interrupts off; runs the commands at 0x7000,
//! printing to the serial port; ends by writing its status to port 0xF4.
#![no_std]
#![no_main]

// The VMs this runs on (KVM under PVM on this project's machines) stop with
// KVM_EXIT_INTERNAL_ERROR at the first SSE instruction, even with CR0/CR4 set up for SSE,
// and the host target has no SSE-free variant on stable Rust: the image is built with
// `RUSTFLAGS="-C target-feature=-sse,-sse2"` (README.md; rustc warns that the x86-64 float
// ABI wants SSE2 — this program has no floating point, and the release build is LTO'd with
// core, so no SSE code is generated). A release build with SSE is refused here.
#[cfg(all(target_feature = "sse", not(debug_assertions)))]
compile_error!(
    "build the guest image without SSE: RUSTFLAGS=\"-C target-feature=-sse,-sse2\" cargo build --release"
);

mod mem;
mod x86;

use vshm_freestanding_guest::commands::{run, End, EXIT_PANIC};
use vshm_freestanding_guest::hw::{Hw, EXIT_PORT};
use vshm_freestanding_guest::line::Line;

/// Where the VMM puts the NUL-terminated command string.
const ARGS: usize = 0x7000;
/// Its largest size, NUL included.
const ARGS_MAX: usize = 4096;

// The entry: .bss zeroed (a flat image has none), the stack at 0x80000, then `guest_main`,
// which never returns. No SSE is set up: the image is built without it (below).
core::arch::global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "cld",
    "mov rsp, 0x80000",
    "lea rdi, [rip + __bss_start]",
    "lea rcx, [rip + __bss_end]",
    "sub rcx, rdi",
    "xor eax, eax",
    "rep stosb",
    "call {main}",
    "2: hlt",
    "jmp 2b",
    main = sym guest_main,
);

extern "C" fn guest_main() -> ! {
    // SAFETY: the contract gives the guest its command string at 0x7000, at most 4096
    // bytes, in identity-mapped RAM nothing else writes while the guest runs.
    let raw = unsafe { core::slice::from_raw_parts(ARGS as *const u8, ARGS_MAX) };
    let len = raw.iter().position(|&b| b == 0).unwrap_or(ARGS_MAX);
    let mut hw = x86::X86;
    match run(&mut hw, &raw[..len]) {
        End::Exit(status) => exit(&mut hw, status),
        End::Spin => loop {
            core::hint::spin_loop();
        },
    }
}

fn exit(hw: &mut x86::X86, status: u8) -> ! {
    hw.outb(EXIT_PORT, status);
    // A VMM that ignores the exit port: stop here.
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut hw = x86::X86;
    let mut l = Line::new();
    l.s("panic");
    if let Some(at) = info.location() {
        l.s(" at ").s(at.file()).s(":").dec(u64::from(at.line()));
    }
    hw.serial(l.finish());
    exit(&mut hw, EXIT_PANIC)
}
