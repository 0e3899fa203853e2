//! The Rust mirror of the vshm driver's ABI (guest/src/driver.rs) matches its C header
//! (guest/linux-driver/vshm_ioctl.h), and the format constants the driver's per-process
//! cleanup uses (guest/linux-driver/vshm_format.h) match the vshm-format crate: a C program
//! compiled with the system compiler prints each value. Skipped, with a message, without a
//! C compiler.

use std::mem::{offset_of, size_of};
use std::path::Path;
use std::process::Command;

use vshm::driver::{
    holds_len, VshmEvents, VshmHold, VshmInfo, VshmRing, VshmTrack, VSHM_ABI_VERSION,
    VSHM_INFO_TRACK, VSHM_IOC_INFO, VSHM_IOC_KICK, VSHM_IOC_RING, VSHM_IOC_TRACK,
    VSHM_KERNEL_TOKEN, VSHM_MAX_VECTORS,
};
use vshm::format::layout::{
    mutex_word, op, peer_state, refcell, Mailbox, Request, CLOSED_HINT_MANY, LEASE_CLOSED,
    LEASE_KEEP, MB_AUDITED_SEQ_OFF, MB_CLOSED_HINT_OFF, MB_LOCK_OFF, MB_REQ_SEQ_OFF,
    MB_RESPONSE_OFF, MB_RESP_SEQ_OFF, PEER_ID_OFF, PEER_INCARNATION_OFF, PEER_STATE_OFF,
    VECTOR_CONTROL,
};
use vshm::format::lease::CAS_TRIES;
use vshm_tests::TempDir;

fn n(v: usize) -> u64 {
    v as u64
}

/// (C expression, the Rust value it must equal).
fn checks() -> Vec<(&'static str, u64)> {
    vec![
        ("VSHM_ABI_VERSION", u64::from(VSHM_ABI_VERSION)),
        ("VSHM_MAX_VECTORS", n(VSHM_MAX_VECTORS)),
        ("VSHM_INFO_TRACK", u64::from(VSHM_INFO_TRACK)),
        ("sizeof(struct vshm_info)", n(size_of::<VshmInfo>())),
        ("sizeof(struct vshm_ring)", n(size_of::<VshmRing>())),
        ("sizeof(struct vshm_events)", n(size_of::<VshmEvents>())),
        ("sizeof(struct vshm_track)", n(size_of::<VshmTrack>())),
        ("sizeof(struct vshm_hold)", n(size_of::<VshmHold>())),
        ("VSHM_IOC_INFO", VSHM_IOC_INFO),
        ("VSHM_IOC_RING", VSHM_IOC_RING),
        ("VSHM_IOC_KICK", VSHM_IOC_KICK),
        ("VSHM_IOC_TRACK", VSHM_IOC_TRACK),
        ("VSHM_KERNEL_TOKEN", u64::from(VSHM_KERNEL_TOKEN)),
        ("vshm_holds_len(1000)", holds_len(1000)),
        ("vshm_holds_len(65536)", holds_len(65536)),
        (
            "offsetof(struct vshm_info, region_size)",
            n(offset_of!(VshmInfo, region_size)),
        ),
        (
            "offsetof(struct vshm_info, vectors)",
            n(offset_of!(VshmInfo, vectors)),
        ),
        (
            "offsetof(struct vshm_events, counts)",
            n(offset_of!(VshmEvents, counts)),
        ),
        (
            "offsetof(struct vshm_track, incarnation)",
            n(offset_of!(VshmTrack, incarnation)),
        ),
        (
            "offsetof(struct vshm_track, mailbox)",
            n(offset_of!(VshmTrack, mailbox)),
        ),
        (
            "offsetof(struct vshm_track, object_stride)",
            n(offset_of!(VshmTrack, object_stride)),
        ),
        (
            "offsetof(struct vshm_track, sync_off)",
            n(offset_of!(VshmTrack, sync_off)),
        ),
        (
            "offsetof(struct vshm_hold, count)",
            n(offset_of!(VshmHold, count)),
        ),
        (
            "offsetof(struct vshm_hold, owner)",
            n(offset_of!(VshmHold, owner)),
        ),
        // vshm_format.h
        ("VSHM_REF_LOCK", u64::from(refcell::REF_LOCK)),
        ("VSHM_REF_COUNT", u64::from(refcell::REF_COUNT)),
        ("VSHM_LEASE_CLOSED", LEASE_CLOSED),
        ("VSHM_LEASE_KEEP", LEASE_KEEP),
        ("VSHM_CAS_TRIES", u64::from(CAS_TRIES)),
        ("VSHM_MUTEX_OWNER", mutex_word::OWNER),
        ("VSHM_PEER_STATE_OFF", PEER_STATE_OFF),
        ("VSHM_PEER_ID_OFF", PEER_ID_OFF),
        ("VSHM_PEER_INCARNATION_OFF", PEER_INCARNATION_OFF),
        ("VSHM_PEER_CONNECTED", u64::from(peer_state::CONNECTED)),
        ("VSHM_MAILBOX_SIZE", n(size_of::<Mailbox>())),
        ("VSHM_MB_REQ_SEQ_OFF", MB_REQ_SEQ_OFF),
        ("VSHM_MB_LOCK_OFF", MB_LOCK_OFF),
        ("VSHM_MB_OP_OFF", n(offset_of!(Request, op))),
        ("VSHM_MB_SLOT_OFF", n(offset_of!(Request, slot))),
        ("VSHM_MB_GENERATION_OFF", n(offset_of!(Request, generation))),
        ("VSHM_MB_SIZE_OFF", n(offset_of!(Request, size))),
        ("VSHM_MB_MAX_SIZE_OFF", n(offset_of!(Request, max_size))),
        ("VSHM_MB_BODY_END", MB_AUDITED_SEQ_OFF),
        ("VSHM_MB_RESP_SEQ_OFF", MB_RESP_SEQ_OFF),
        ("VSHM_MB_STATUS_OFF", MB_RESPONSE_OFF + 8),
        ("VSHM_MB_CLOSED_HINT_OFF", MB_CLOSED_HINT_OFF),
        ("VSHM_CLOSED_HINT_MANY", CLOSED_HINT_MANY),
        ("VSHM_OP_UNLOCK", u64::from(op::UNLOCK)),
        ("VSHM_VECTOR_CONTROL", u64::from(VECTOR_CONTROL)),
    ]
}

#[test]
fn the_rust_mirror_matches_vshm_ioctl_h_and_vshm_format_h() {
    let checks = checks();
    let mut program = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"vshm_ioctl.h\"\n\
         #include \"vshm_format.h\"\nint main(void) {\n",
    );
    for (expr, _) in &checks {
        program.push_str(&format!(
            "    printf(\"%llu\\n\", (unsigned long long)({expr}));\n"
        ));
    }
    program.push_str("    return 0;\n}\n");
    let dir = TempDir::new("driver-abi");
    let src = dir.path().join("abi.c");
    let exe = dir.path().join("abi");
    std::fs::write(&src, &program).expect("write");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/linux-driver");
    let cc = match Command::new("cc")
        .arg("-Wall")
        .arg("-Werror")
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
        .lines()
        .map(|t| t.parse().expect("number"))
        .collect();
    assert_eq!(got.len(), checks.len(), "one value per check");
    for ((expr, want), got) in checks.iter().zip(got) {
        assert_eq!(got, *want, "C `{expr}` vs the Rust value");
    }
}
