//! The C memory functions the compiler calls (copies of requests, zeroed structures): there
//! is no libc here. `rep movsb` / `rep stosb` are one instruction each (instructions are
//! what costs on these VMs), and written in assembly so the compiler cannot turn them back
//! into calls to themselves.

use core::arch::asm;

/// # Safety
/// As C's memcpy: `n` bytes readable at `src`, writable at `dst`, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges of `n` bytes; the direction
    // flag is clear (the System V ABI keeps it clear between calls).
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memmove: `n` bytes readable at `src`, writable at `dst` (they may overlap).
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // `dst` is below `src` or past its end: a forward copy never reads a byte it wrote.
        // SAFETY: as the caller promised, and forward copying is correct for this overlap.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: `dst` lies inside [src, src + n): copy backwards from the last byte, with the
    // direction flag set only for this instruction and cleared again.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _,
             inout("rdi") dst.add(n - 1) => _,
             inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dst
}

/// # Safety
/// As C's memset: `n` bytes writable at `dst`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of `n` bytes; the direction flag is clear.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c.to_le_bytes()[0],
             options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's memcmp: `n` bytes readable at `a` and at `b`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: `i < n`, inside both ranges the caller vouched for. Volatile so the loop is
        // not recognised as a memcmp idiom and turned into a call to itself.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract.
    unsafe { memcmp(a, b, n) }
}
