//! Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/): a few valid
//! structures made by this crate's own builders, and a few invalid ones next to them.
//!
//! `cargo run -p vshm-format --example fuzz_seeds -- fuzz/corpus`
//!
//! The formats are those the targets read (see each target's header comment in
//! fuzz/fuzz_targets/).

use std::fs;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use vshm_format::blocks::{Heap, Me, Peers};
use vshm_format::layout::{
    kind, object_flags, object_state, op, Layout, ObjectEntry, FORMAT_VERSION,
};
use vshm_format::mailbox;
use vshm_format::shm::{bytes_of, zeroed, RawRegion, SharedMemory};
use vshm_format::{name_hash, Generation, ObjectSlot, PeerSlot, RegionOffset};

type Result<T> = std::result::Result<T, String>;

fn main() -> Result<()> {
    let out = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("fuzz/corpus"), PathBuf::from);
    superblocks(&out.join("superblock"))?;
    entries(&out.join("entry"))?;
    requests(&out.join("request"))?;
    blocks(&out.join("blocks"))?;
    lookup(&out.join("lookup"))?;
    arbiter(&out.join("arbiter"))?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(name);
    fs::write(&path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn layouts() -> [Layout; 3] {
    let l = |s, p, o, v, a| Layout::compute(s, p, o, v, a).expect("valid parameters");
    [
        l(1 << 20, 4, 8, 1, 4096),
        l(64 << 20, 32, 1024, 2, 4096),
        l(1 << 30, 62, 65_536, 64, 2 << 20),
    ]
}

/// The `lookup` target's input: the sequence word, then the 16 entries of the small
/// layout's index, for its fixed objects "a" (slot 0), "b" (slot 3) and "c" (slot 7).
fn lookup(dir: &Path) -> Result<()> {
    let l = layouts()[0];
    let mut clean = vec![0u64; l.index_slots as usize];
    for (name, slot) in [("a", 0), ("b", 3), ("c", 7)] {
        let h = name_hash(name.as_bytes());
        let pos = vshm_format::index::free_position(&clean, h).ok_or("index full")?;
        clean[pos as usize] = vshm_format::index::entry(h, ObjectSlot(slot));
    }
    let bytes = |seq: u64, words: &[u64]| -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        for w in words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b
    };
    write(dir, "clean", &bytes(0, &clean))?;
    write(dir, "odd-seq", &bytes(7, &clean))?;
    write(dir, "all-empty", &bytes(2, &vec![0; clean.len()]))?;
    write(
        dir,
        "no-empty",
        &bytes(2, &vec![0x1234_5678_0000_0009; clean.len()]),
    )?;
    let mut swapped = clean.clone();
    swapped.reverse();
    write(dir, "misplaced", &bytes(4, &swapped))?;
    Ok(())
}

fn superblocks(dir: &Path) -> Result<()> {
    for (i, l) in layouts().iter().enumerate() {
        let mut sb = l.superblock(7, [1; 16]);
        write(dir, &format!("unpublished-{i}"), bytes_of(&sb))?;
        sb.version = FORMAT_VERSION;
        write(dir, &format!("valid-{i}"), bytes_of(&sb))?;
        let mut bad = sb;
        bad.object_table_offset += 64;
        write(dir, &format!("moved-object-table-{i}"), bytes_of(&bad))?;
        let mut bad = sb;
        bad.heap_size -= 4096;
        write(dir, &format!("short-heap-{i}"), bytes_of(&bad))?;
        let mut bad = sb;
        bad.index_offset += 64;
        write(dir, &format!("moved-name-index-{i}"), bytes_of(&bad))?;
        let mut bad = sb;
        bad.index_slots /= 2;
        write(dir, &format!("half-name-index-{i}"), bytes_of(&bad))?;
    }
    Ok(())
}

fn entry(
    kind: u32,
    flags: u32,
    name: Option<&str>,
    offset: u64,
    size: u64,
    max: u64,
) -> ObjectEntry {
    let mut e = zeroed::<ObjectEntry>();
    e.seq = 2;
    e.generation = 5;
    e.state = object_state::LIVE;
    e.kind = kind;
    e.flags = flags;
    e.offset = offset;
    e.size = size;
    e.max_size = max;
    e.creator = 1;
    if let Some(n) = name {
        e.name_len = u16::try_from(n.len()).expect("short");
        e.name_hash = name_hash(n.as_bytes());
        e.flags |= object_flags::NAMED;
    }
    e
}

/// An `entry` target input: the entry, the selector byte, then the name area's bytes.
fn entry_input(e: &ObjectEntry, selector: u8, area: &[u8]) -> Vec<u8> {
    let mut v = bytes_of(e).to_vec();
    v.push(selector);
    v.extend_from_slice(area);
    v
}

fn entries(dir: &Path) -> Result<()> {
    let heap = layouts()[0].heap_offset;
    let section = entry(kind::SECTION, 0, Some("seg"), heap, 4096, 8192);
    let event = entry(kind::EVENT, object_flags::MANUAL_RESET, None, 0, 0, 0);
    let mutex = entry(
        kind::MUTEX,
        object_flags::PERSISTENT,
        Some("Global\\m"),
        0,
        0,
        0,
    );
    write(dir, "section", &entry_input(&section, 0, b"seg"))?;
    write(dir, "event", &entry_input(&event, 0, b""))?;
    write(
        dir,
        "mutex-backslash",
        &entry_input(&mutex, 0, b"Global\\m"),
    )?;
    let mutex = entry(kind::MUTEX, object_flags::PERSISTENT, Some("mü"), 0, 0, 0);
    write(dir, "mutex", &entry_input(&mutex, 0, "mü".as_bytes()))?;
    let mut bad = section;
    bad.name_hash ^= 1;
    write(dir, "bad-hash", &entry_input(&bad, 0, b"seg"))?;
    let mut bad = section;
    bad.offset = (1 << 20) - 4096;
    write(dir, "beyond-heap", &entry_input(&bad, 0, b"seg"))?;
    let mut bad = section;
    bad.name_off = 0xFFFF_FFF8;
    write(dir, "name-outside-area", &entry_input(&bad, 0, b"seg"))?;
    let mut bad = section;
    bad.name_off = 8;
    write(
        dir,
        "name-elsewhere",
        &entry_input(&bad, 0, b"seg\0\0\0\0\0seg"),
    )?;
    let mut busy = section;
    busy.seq = 3;
    write(dir, "seq-odd", &entry_input(&busy, 0, b"seg"))?;
    write(dir, "free", bytes_of(&zeroed::<ObjectEntry>()))?;
    Ok(())
}

fn requests(dir: &Path) -> Result<()> {
    let s = ObjectSlot(1);
    let g = Generation(3);
    let reqs = [
        (
            "create-section",
            mailbox::create_request(Some("seg"), kind::SECTION, 8192, 4096, true),
        ),
        (
            "create-event",
            mailbox::create_sync_request(Some("ev"), kind::EVENT, false, true),
        ),
        (
            "create-mutex",
            mailbox::create_sync_request(None, kind::MUTEX, false, false),
        ),
        ("delete", mailbox::delete_request(s, g)),
        ("grow", mailbox::grow_request(s, g, 8192)),
        ("wake", mailbox::wake_request(s, g)),
        ("lock", mailbox::mutex_request(op::LOCK, s, g, 42)),
        ("cancel", mailbox::mutex_request(op::CANCEL, s, g, 42)),
        (
            "too-big",
            mailbox::create_request(None, kind::SECTION, 1 << 40, 0, false),
        ),
    ];
    for (name, r) in reqs {
        write(dir, name, bytes_of(&r))?;
    }
    let mut bad = mailbox::create_request(Some("seg"), kind::SECTION, 8192, 4096, true);
    bad.name[1] = 0xFF;
    write(dir, "bad-utf8", bytes_of(&bad))?;
    Ok(())
}

struct AllAlive;

impl Peers for AllAlive {
    fn incarnation(&self, _: PeerSlot) -> Option<u64> {
        Some(1)
    }
    fn token_alive(&self, _: u32) -> bool {
        true
    }
    fn fingerprint(&self) -> u64 {
        1
    }
}

/// A blocks input: flags, claimed section size, section bytes.
fn blocks_input(flags: u8, size: u64, section: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(section);
    v
}

fn blocks(dir: &Path) -> Result<()> {
    const LEN: usize = 8192;
    const SIZE: u64 = LEN as u64;
    let mut buf = vec![0u64; LEN / 8];
    let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
    // SAFETY: `buf` is 8-aligned, SIZE bytes long and lives until the end of this function,
    // after the last use of `mem`.
    let mem = unsafe { RawRegion::new(base, SIZE) };
    let snapshot = |mem: &RawRegion<'_>| {
        let mut b = vec![0u8; LEN];
        mem.read_bytes(0, &mut b).expect("in bounds");
        b
    };
    let heap = Heap::new(&mem, RegionOffset(0), SIZE, SIZE, 9).map_err(|e| e.to_string())?;
    let me = Me {
        slot: PeerSlot(0),
        incarnation: 1,
        token: 1,
    };
    let mut data = Vec::new();
    {
        let mut g = heap.lock(me, &AllAlive).map_err(|e| e.to_string())?;
        for (size, align) in [(40, 16), (200, 64), (1000, 16)] {
            let owner = (size == 200).then_some((PeerSlot(0), 1));
            data.push(g.allocate(size, align, owner).map_err(|e| e.to_string())?.0);
        }
    }
    let full = snapshot(&mem);
    write(dir, "three-blocks", &blocks_input(0, SIZE, &full))?;
    {
        let mut g = heap.lock(me, &AllAlive).map_err(|e| e.to_string())?;
        g.free(data[1], None).map_err(|e| e.to_string())?;
    }
    let freed = snapshot(&mem);
    write(dir, "one-freed", &blocks_input(0, SIZE, &freed))?;
    write(dir, "claims-more", &blocks_input(2, 1 << 20, &freed))?;
    let mut corrupt = freed.clone();
    corrupt[512 + 3] ^= 0x40;
    write(dir, "corrupt-header", &blocks_input(0, SIZE, &corrupt))?;
    write(dir, "no-heap", &blocks_input(0, SIZE, &[0; 64]))?;
    write(dir, "forced-magic", &blocks_input(1, 4096, &[0; 1024]))?;
    Ok(())
}

/// Step sequences for the arbiter target (opcodes: see `step` in fuzz_targets/arbiter.rs).
fn arbiter(dir: &Path) -> Result<()> {
    let create_section = [2, 0, 0x10, 0x10, 0, 16];
    let create_event = [2, 1, 0x01, 0x01, 0];
    let create_mutex = [2, 0, 0x21, 0x02, 0];
    let lock = [2, 1, 0x05, 0x00, 0];
    let unlock = [2, 1, 0x06, 0x00, 0];
    let acquire = [7, 0, 0x00, 0];
    let release = [7, 0, 0x10, 0];
    let delete = [2, 0, 0x02, 0x00, 0];
    let mut seqs: Vec<(&str, Vec<u8>)> = vec![
        ("create", create_section.to_vec()),
        (
            "create-hold-release-sweep",
            [&create_section[..], &acquire, &release, &delete, &[5]].concat(),
        ),
        (
            "mutex-lock-unlock",
            [&create_mutex[..], &lock, &unlock, &[9]].concat(),
        ),
        (
            "event-peer-leaves",
            [&create_event[..], &[7, 1, 0x00, 0], &[8, 2], &[8, 1], &[5]].concat(),
        ),
        (
            "raw-request",
            [
                &[3, 0, 48][..],
                &bytes_of(&mailbox::create_request(
                    None,
                    kind::SECTION,
                    4096,
                    0,
                    false,
                ))[..48],
            ]
            .concat(),
        ),
    ];
    // Scribbles over the superblock, a peer entry and an object entry, then heal.
    let mut scribbles = create_section.to_vec();
    scribbles.extend_from_slice(&[0, 16, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
    scribbles.extend_from_slice(&[1, 0x00, 0x01, 2, 0, 0, 0, 0, 0, 0, 0]);
    scribbles.extend_from_slice(&[1, 0x18, 0x02, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0]);
    scribbles.extend_from_slice(&[4, 0, 6, 5]);
    seqs.push(("scribble-heal", scribbles));
    for (name, bytes) in seqs {
        write(dir, name, &bytes)?;
    }
    Ok(())
}
