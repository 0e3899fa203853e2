//! Any bytes as a section holding a block allocator: `blocks::stats` and `blocks::verify`
//! never panic and agree. Both say "no allocator" together; both fail together with the
//! same error when the header itself is bad; and when `verify` passes, what it returns is
//! what `stats` published, its counters tile the arena (`in_use + free == arena`) and are
//! self-consistent.
//!
//! Input: a flags byte (bit 0: force the magic and version, so mutations reach the walk;
//! bit 1: place the section at region offset 16 instead of 0), 8 bytes (LE) of claimed
//! section size (which may exceed the memory behind it), then the section's bytes (at
//! most 64 KiB; the memory is exactly that long).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vshm_format::blocks::{self, BlockStats, HEADER_SIZE, MAGIC, VERSION};
use vshm_format::shm::SharedMemory;
use vshm_format::RegionOffset;
use vshm_fuzz::{prefix, Buf};

const MAX_SECTION: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let section_size = u64::from_le_bytes(prefix(rest));
    let content = rest.get(8..).unwrap_or(&[]);
    let content = &content[..content.len().min(MAX_SECTION)];
    let base: u64 = if flags & 2 != 0 { 16 } else { 0 };
    let mut buf = Buf::new(usize::try_from(base).expect("small") + content.len().max(8));
    let mem = buf.region();
    mem.write_bytes(base, content).expect("in bounds");
    if flags & 1 != 0 && mem.size() >= base + 16 {
        mem.write_bytes(base, &MAGIC.to_le_bytes())
            .expect("in bounds");
        mem.write_bytes(base + 8, &VERSION.to_le_bytes())
            .expect("in bounds");
    }
    let at = RegionOffset(base);
    let stats = blocks::stats(&mem, at, section_size);
    let verify = blocks::verify(&mem, at, section_size);
    match (&stats, &verify) {
        (Ok(None), Ok(None)) => {}
        (Ok(Some(s)), Ok(Some(v))) => {
            assert_eq!(s, v, "verify returns what stats published");
            check_verified(v, section_size);
        }
        // verify walks what stats only reads the header of: it may find more wrong.
        (Ok(Some(_)), Err(e)) => {
            let _ = e.to_string();
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "a bad header is bad for both"),
        (s, v) => panic!("stats {s:?} but verify {v:?}"),
    }
});

fn check_verified(v: &BlockStats, section_size: u64) {
    assert_eq!(v.in_use + v.free, v.arena, "the blocks tile the arena");
    assert!(v.arena + HEADER_SIZE <= section_size);
    assert!(v.largest_free <= v.free);
    assert!(v.owned <= v.count);
    assert!(v.count <= v.arena / 32, "a block is at least 32 bytes");
    assert!((0.0..1.0).contains(&v.fragmentation));
}
