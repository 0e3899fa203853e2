//! The Rust mirror of the vshm driver's ABI (guest/src/driver.rs) matches its C header
//! (guest/linux-driver/vshm_ioctl.h): a C program compiled with the system compiler prints
//! the header's sizes and ioctl numbers. Skipped, with a message, without a C compiler.

use std::path::Path;
use std::process::Command;

use vshm::driver::{
    VshmEvents, VshmInfo, VshmRing, VSHM_ABI_VERSION, VSHM_IOC_INFO, VSHM_IOC_KICK, VSHM_IOC_RING,
    VSHM_MAX_VECTORS,
};
use vshm_tests::TempDir;

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include "vshm_ioctl.h"
int main(void) {
    printf("%d %d %zu %zu %zu %lu %lu %lu %zu %zu %zu\n", VSHM_ABI_VERSION, VSHM_MAX_VECTORS,
           sizeof(struct vshm_info), sizeof(struct vshm_ring), sizeof(struct vshm_events),
           (unsigned long)VSHM_IOC_INFO, (unsigned long)VSHM_IOC_RING,
           (unsigned long)VSHM_IOC_KICK, offsetof(struct vshm_info, region_size),
           offsetof(struct vshm_info, vectors), offsetof(struct vshm_events, counts));
    return 0;
}
"#;

#[test]
fn the_rust_mirror_matches_vshm_ioctl_h() {
    let dir = TempDir::new("driver-abi");
    let src = dir.path().join("abi.c");
    let exe = dir.path().join("abi");
    std::fs::write(&src, PROGRAM).expect("write");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/linux-driver");
    let cc = match Command::new("cc")
        .arg("-I")
        .arg(&include)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: no C compiler (cc: {e})");
            return;
        }
    };
    assert!(
        cc.status.success(),
        "{}",
        String::from_utf8_lossy(&cc.stderr)
    );
    let out = Command::new(&exe).output().expect("run");
    let got: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|t| t.parse().expect("number"))
        .collect();
    let size = |n: usize| n as u64;
    let want = vec![
        u64::from(VSHM_ABI_VERSION),
        size(VSHM_MAX_VECTORS),
        size(std::mem::size_of::<VshmInfo>()),
        size(std::mem::size_of::<VshmRing>()),
        size(std::mem::size_of::<VshmEvents>()),
        VSHM_IOC_INFO,
        VSHM_IOC_RING,
        VSHM_IOC_KICK,
        size(std::mem::offset_of!(VshmInfo, region_size)),
        size(std::mem::offset_of!(VshmInfo, vectors)),
        size(std::mem::offset_of!(VshmEvents, counts)),
    ];
    assert_eq!(got, want, "C header vs Rust mirror");
}
