//! Unit tests of `inspect`: regions built in memory the way vshmd builds them, corrupted on
//! purpose, written to files and inspected.

use super::*;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32 as Counter, Ordering};
use vshm_format::layout::{
    holder_bit, kind, object_state, op, peer_state, refcell, Layout, ObjectEntry, PeerEntry,
    FORMAT_VERSION, LEASE_CLOSED, LEASE_KEEP, MB_REQ_SEQ_OFF, MB_RESP_SEQ_OFF, OBJ_LEASE_OFF,
    OBJ_SEQ_OFF,
};
use vshm_format::object::{make_entry, publish, publish_named};
use vshm_format::shm::{bytes_of, zeroed, Fault, RawRegion, SharedMemory};
use vshm_format::{Generation, ObjectSlot, PeerId, PeerSlot, RegionOffset};

const MIB: u64 = 1 << 20;

/// A private temp directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        static N: Counter = Counter::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vshm-inspect-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        Dir(p)
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A region built in a private, writable buffer the way vshmd builds one (published
/// superblock, CLOSED leases on free slots), then written to a file for `inspect`.
struct Region {
    _buf: Vec<u64>,
    mem: RawRegion<'static>,
    layout: Layout,
    /// The name index as vshmd keeps it (entries published LIVE with a name are in it).
    index: std::cell::RefCell<vshm_format::index::HostIndex>,
}

impl Region {
    fn new(size: u64, max_peers: u32, max_objects: u32) -> Region {
        let layout = Layout::compute(size, max_peers, max_objects, 1, 4096).expect("layout");
        let mut buf = vec![0u64; usize::try_from(size / 8).expect("size")];
        let base = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("non-null");
        // SAFETY: the buffer is 8-aligned, `size` bytes long, and lives (it is moved, its
        // heap allocation is not) as long as the Region, which owns it.
        let mem = unsafe { RawRegion::new(base, size) };
        let mut sb = layout.superblock(0x0123_4567_89ab_cdef, [0xab; 16]);
        sb.version = FORMAT_VERSION;
        mem.write_bytes(0, bytes_of(&sb)).expect("superblock");
        for s in 0..max_objects {
            let lease = layout.object_entry(ObjectSlot(s)).expect("slot") + OBJ_LEASE_OFF;
            mem.store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
                .expect("lease");
        }
        Region {
            _buf: buf,
            mem,
            layout,
            index: std::cell::RefCell::new(vshm_format::index::HostIndex::new(&layout)),
        }
    }

    fn connect(&self, slot: u32, id: u32) {
        let mut e = zeroed::<PeerEntry>();
        e.state = peer_state::CONNECTED;
        e.peer_id = id;
        e.incarnation = 1;
        let at = self.layout.peer_entry(PeerSlot(slot)).expect("peer slot");
        self.mem.write_bytes(at, bytes_of(&e)).expect("peer entry");
    }

    /// Heap offset of the `n`th 64 KiB block.
    fn heap(&self, n: u64) -> u64 {
        self.layout.heap_offset + n * 65536
    }

    /// Publishes an object and sets its lease word and the holders' refcount cells.
    #[allow(clippy::too_many_arguments)]
    fn object(
        &self,
        slot: u32,
        generation: u64,
        name: Option<&str>,
        offset: u64,
        max_size: u64,
        persistent: bool,
        lease: u64,
        counts: &[(u32, u32)],
    ) {
        let e = make_entry(
            Generation(generation),
            object_state::LIVE,
            kind::SECTION,
            RegionOffset(offset),
            max_size / 2,
            max_size,
            persistent,
            name,
            PeerId(1),
        );
        self.publish(slot, &e, name);
        self.lease(slot, lease);
        for &(peer, n) in counts {
            self.cell(peer, slot, n);
        }
    }

    /// Publishes an entry the way vshmd does, name index included: a LIVE name enters the
    /// index before the entry is published, a name that stops being LIVE leaves it after.
    /// The name (if any) goes at `slot × 64` in the name area (64 bytes per slot).
    fn publish(&self, slot: u32, e: &ObjectEntry, name: Option<&str>) {
        let mut e = *e;
        if name.is_some() {
            e.name_off = slot * 64;
        }
        let e = &e;
        let at = self.layout.object_entry(ObjectSlot(slot)).expect("slot");
        let old: ObjectEntry = vshm_format::shm::read_pod(&self.mem, at).expect("old entry");
        let mut ix = self.index.borrow_mut();
        let live = |e: &ObjectEntry| e.state == object_state::LIVE && e.name_len > 0;
        if live(e) {
            ix.insert(&self.mem, &self.layout, e.name_hash, ObjectSlot(slot))
                .expect("index");
        }
        match name {
            Some(n) => publish_named(&self.mem, &self.layout, ObjectSlot(slot), e, n.as_bytes()),
            None => publish(&self.mem, &self.layout, ObjectSlot(slot), e),
        }
        .expect("publish");
        if live(&old) && !(live(e) && e.name_hash == old.name_hash) {
            ix.remove(&self.mem, &self.layout, old.name_hash, ObjectSlot(slot))
                .expect("index");
        }
    }

    fn lease(&self, slot: u32, w: u64) {
        let at = self.layout.object_entry(ObjectSlot(slot)).expect("slot") + OBJ_LEASE_OFF;
        self.mem.store_u64(at, w, Ordering::SeqCst).expect("lease");
    }

    fn cell(&self, peer: u32, slot: u32, v: u32) {
        let at = self
            .layout
            .refcount_cell(PeerSlot(peer), ObjectSlot(slot))
            .expect("cell");
        self.mem.store_u32(at, v, Ordering::SeqCst).expect("cell");
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; usize::try_from(self.mem.size()).expect("size")];
        self.mem.read_bytes(0, &mut out).expect("read");
        out
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).expect("write region file");
    }
}

/// 1 MiB, 4 peer slots, 16 object slots; peers 5 (slot 0) and 7 (slot 1); a persistent
/// section nobody holds, a non-persistent one peer 7 holds twice, and an unnamed
/// persistent one peer 5 holds.
fn healthy() -> Region {
    let r = Region::new(MIB, 4, 16);
    r.connect(0, 5);
    r.connect(1, 7);
    r.object(
        0,
        1,
        Some("frames"),
        r.heap(0),
        65536,
        true,
        LEASE_KEEP,
        &[],
    );
    r.object(
        2,
        2,
        Some("pair"),
        r.heap(1),
        8192,
        false,
        holder_bit(PeerSlot(1)),
        &[(1, 2)],
    );
    r.object(
        3,
        3,
        None,
        r.heap(2),
        4096,
        true,
        LEASE_KEEP | holder_bit(PeerSlot(0)),
        &[(0, 1)],
    );
    r
}

fn inspect_region_file(r: &Region, dir: &Dir) -> Report {
    let path = dir.file("region");
    r.write(&path);
    inspect(&path).expect("inspect")
}

/// Whether the report has a finding of `severity` at `where_` whose text contains `what`.
fn has(report: &Report, severity: Severity, where_: &str, what: &str) -> bool {
    report
        .findings
        .iter()
        .any(|f| f.severity == severity && f.where_ == where_ && f.what.contains(what))
}

fn assert_has(report: &Report, severity: Severity, where_: &str, what: &str) {
    assert!(
        has(report, severity, where_, what),
        "no {severity:?} at {where_:?} containing {what:?} in {:#?}",
        report.findings
    );
}

#[test]
fn a_well_formed_region_inspects_clean_with_its_objects_holders_and_heap_use() {
    let dir = Dir::new("healthy");
    let report = inspect_region_file(&healthy(), &dir);
    assert!(report.ok, "{:#?}", report.findings);
    assert_eq!(report.exit_code(), EXIT_OK);
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    let sb = report.superblock.as_ref().expect("superblock");
    assert!(sb.valid && sb.magic_ok);
    assert_eq!(
        (sb.version, sb.region_size, sb.max_peers, sb.max_objects),
        (FORMAT_VERSION, MIB, 4, 16)
    );
    assert_eq!(sb.epoch, 0x0123_4567_89ab_cdef);
    assert_eq!(sb.region_id, "ab".repeat(16));
    let peers: Vec<(u32, u16)> = report.peers.iter().map(|p| (p.slot, p.id)).collect();
    assert_eq!(peers, [(0, 5), (1, 7)]);
    assert_eq!(report.peers[1].handles, 2);
    let objs: Vec<(u32, Option<&str>, &str, u64, bool)> = report
        .objects
        .iter()
        .map(|o| (o.slot, o.name.as_deref(), o.state, o.max_size, o.persistent))
        .collect();
    assert_eq!(
        objs,
        [
            (0, Some("frames"), "LIVE", 65536, true),
            (2, Some("pair"), "LIVE", 8192, false),
            (3, None, "LIVE", 4096, true),
        ]
    );
    assert_eq!(report.objects[1].holders, [7]);
    assert_eq!(report.objects[1].refs_by_peer, [(7, 2)]);
    assert_eq!(report.objects[1].refs, 2);
    assert_eq!(report.objects[2].holders, [5]);
    assert!(report.objects[0].holders.is_empty() && report.objects[0].keep);
    let heap = report.heap.as_ref().expect("heap");
    assert_eq!(heap.objects, 3);
    assert_eq!(heap.reserved, 65536 + 8192 + 4096);
    assert_eq!(heap.free, heap.size - heap.reserved);
}

#[test]
fn a_bad_superblock_is_an_error_and_no_table_is_decoded() {
    let dir = Dir::new("superblock");
    let r = healthy();
    let mut bytes = r.bytes();
    bytes[0] ^= 0xff;
    let path = dir.file("magic");
    std::fs::write(&path, &bytes).expect("write");
    let report = inspect(&path).expect("inspect");
    assert!(!report.ok);
    assert_eq!(report.exit_code(), EXIT_ERRORS);
    assert_has(&report, Severity::Error, "superblock", "bad magic");
    let sb = report
        .superblock
        .as_ref()
        .expect("raw superblock still shown");
    assert!(!sb.magic_ok && !sb.valid);
    assert!(report.objects.is_empty() && report.peers.is_empty() && report.heap.is_none());

    let mut bytes = r.bytes();
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let report = inspect(&path).expect("inspect");
    assert_has(&report, Severity::Error, "superblock", "not published");

    // A superblock for 1 MiB in a 512 KiB file.
    std::fs::write(&path, &r.bytes()[..1 << 19]).expect("write");
    let report = inspect(&path).expect("inspect");
    assert_has(&report, Severity::Error, "superblock", "are mapped");

    let mut bytes = r.bytes();
    let object_table = r.layout.object_table;
    bytes[72..80].copy_from_slice(&(object_table + 64).to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let report = inspect(&path).expect("inspect");
    assert_has(&report, Severity::Error, "superblock", "object table");
}

#[test]
fn files_too_small_for_a_superblock_are_an_error_not_a_crash() {
    let dir = Dir::new("small");
    for len in [0usize, 1, 255] {
        let path = dir.file(&format!("small{len}"));
        std::fs::write(&path, vec![0x56u8; len]).expect("write");
        let report = inspect(&path).expect("inspect");
        assert!(!report.ok);
        assert_has(&report, Severity::Error, "superblock", "too small");
        assert!(report.superblock.is_none());
    }
}

#[test]
fn files_that_cannot_be_opened_or_mapped_are_inspect_errors_with_exit_code_2() {
    let dir = Dir::new("unreadable");
    let missing = dir.file("missing");
    assert!(matches!(inspect(&missing), Err(InspectError::Open { .. })));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(run(&missing, false, &mut out, &mut err), EXIT_UNREADABLE);
    let msg = String::from_utf8_lossy(&err);
    assert!(
        msg.contains("cannot open") && msg.contains("missing"),
        "{msg}"
    );
    assert!(out.is_empty());
    // A directory opens read-only but cannot be mapped.
    let sub = dir.file("sub");
    std::fs::create_dir(&sub).expect("mkdir");
    match inspect(&sub) {
        Err(InspectError::Map { .. }) => {}
        Ok(r) => assert!(!r.ok, "a directory is no region"),
        Err(e) => panic!("unexpected {e}"),
    }
}

#[test]
fn each_table_inconsistency_is_an_error_naming_its_slot() {
    let dir = Dir::new("corrupt");
    let r = Region::new(MIB, 4, 16);
    r.connect(0, 5);
    r.connect(1, 7);
    r.connect(2, 5); // duplicate id
    r.object(
        0,
        1,
        Some("frames"),
        r.heap(0),
        65536,
        true,
        LEASE_KEEP,
        &[],
    );
    // Peer 5 counts a handle on "pair" but its bit is missing.
    r.object(
        2,
        2,
        Some("pair"),
        r.heap(1),
        8192,
        false,
        holder_bit(PeerSlot(1)),
        &[(1, 1), (0, 1)],
    );
    // Offset beyond the heap.
    let mut e = make_entry(
        Generation(3),
        object_state::LIVE,
        kind::SECTION,
        RegionOffset(MIB),
        0,
        4096,
        false,
        Some("far"),
        PeerId(1),
    );
    r.publish(4, &e, Some("far"));
    r.lease(4, holder_bit(PeerSlot(0)));
    // A backslash in a name (hash updated, so only the rule is broken).
    e = make_entry(
        Generation(4),
        object_state::LIVE,
        kind::SECTION,
        RegionOffset(r.heap(3)),
        0,
        4096,
        false,
        Some("a\\b"),
        PeerId(1),
    );
    r.publish(5, &e, Some("a\\b"));
    // Holder bits of absent peer slot 3.
    r.object(
        6,
        5,
        Some("stray"),
        r.heap(4),
        4096,
        false,
        holder_bit(PeerSlot(1)) | holder_bit(PeerSlot(3)),
        &[(1, 1)],
    );
    // KEEP on a non-persistent object.
    r.object(
        7,
        6,
        Some("kept"),
        r.heap(5),
        4096,
        false,
        LEASE_KEEP | holder_bit(PeerSlot(1)),
        &[(1, 1)],
    );
    // Persistent and LIVE without KEEP.
    r.object(
        8,
        7,
        Some("loose"),
        r.heap(6),
        4096,
        true,
        holder_bit(PeerSlot(1)),
        &[(1, 1)],
    );
    // A free slot whose lease is not CLOSED.
    r.lease(9, 0);
    // Overlaps "frames".
    r.object(
        10,
        8,
        Some("overlap"),
        r.heap(0) + 4096,
        4096,
        true,
        LEASE_KEEP,
        &[],
    );
    // Handles counted on a free slot.
    r.cell(1, 11, 3);
    // Same generation and same LIVE name as slot 0.
    r.object(
        12,
        1,
        Some("frames"),
        r.heap(7),
        4096,
        true,
        LEASE_KEEP,
        &[],
    );
    // Closed but with holder bits.
    r.object(
        13,
        9,
        Some("zombie"),
        r.heap(8),
        4096,
        false,
        LEASE_CLOSED | holder_bit(PeerSlot(1)),
        &[(1, 1)],
    );
    let report = inspect_region_file(&r, &dir);
    assert!(!report.ok);
    assert_eq!(report.exit_code(), EXIT_ERRORS);
    let e = Severity::Error;
    assert_has(&report, e, "peer slot 2", "also connected in peer slot 0");
    assert_has(
        &report,
        e,
        "object slot 2",
        "peer 5 (slot 0) counts 1 handle(s) but",
    );
    assert_has(&report, e, "object slot 4", "ends beyond the heap");
    assert_has(&report, e, "object slot 4", "BadRange");
    assert_has(&report, e, "object slot 5", "contains a backslash");
    assert_has(&report, e, "object slot 5", "BadName");
    assert_has(&report, e, "object slot 6", "peer slots 3 where no peer");
    assert_has(&report, e, "object slot 7", "KEEP is set but");
    assert_has(&report, e, "object slot 8", "KEEP is not set");
    assert_has(&report, e, "object slot 9", "not CLOSED");
    assert_has(&report, e, "object slot 0", "overlaps object slot 10");
    assert_has(&report, e, "object slot 11", "on a free slot");
    assert_has(
        &report,
        e,
        "object slot 12",
        "generation 1 is also object slot 0",
    );
    assert_has(&report, e, "object slot 12", "also LIVE in object slot 0");
    assert_has(
        &report,
        e,
        "object slot 13",
        "CLOSED but still has holder bits",
    );
    // Nothing valid is reported against the healthy slots.
    assert!(!report
        .findings
        .iter()
        .any(|f| f.where_ == "object slot 1" || f.where_ == "object slot 3"));
    // The valid objects are still listed; the invalid ones are not.
    let slots: Vec<u32> = report.objects.iter().map(|o| o.slot).collect();
    assert_eq!(slots, [0, 2, 6, 7, 8, 10, 12, 13]);
    // Errors come first.
    assert_eq!(report.findings[0].severity, Severity::Error);
}

#[test]
fn transient_protocol_states_are_notes_that_keep_the_region_ok() {
    let dir = Dir::new("notes");
    let r = healthy();
    // Closed by its last holder, not reaped yet.
    r.object(
        5,
        9,
        Some("dying"),
        r.heap(5),
        4096,
        false,
        LEASE_CLOSED,
        &[],
    );
    // Peer 5 is flipping its bit on "pair" (its process 4242 holds the cell lock).
    r.cell(0, 2, refcell::locked_by(4242));
    // Peer 7 has posted request 3 (CREATE), answered up to 2.
    let mb = r.layout.mailbox(PeerSlot(1)).expect("mailbox");
    r.mem
        .store_u32(mb + MB_OP_OFF, op::CREATE, Ordering::SeqCst)
        .expect("op");
    r.mem
        .store_u64(mb + MB_REQ_SEQ_OFF, 3, Ordering::SeqCst)
        .expect("req");
    r.mem
        .store_u64(mb + MB_RESP_SEQ_OFF, 2, Ordering::SeqCst)
        .expect("resp");
    // A creator's bit set before its first hold.
    r.object(
        6,
        10,
        Some("fresh"),
        r.heap(6),
        4096,
        false,
        holder_bit(PeerSlot(0)),
        &[],
    );
    let report = inspect_region_file(&r, &dir);
    assert!(report.ok, "{:#?}", report.findings);
    assert_eq!(report.errors + report.warnings, 0, "{:#?}", report.findings);
    let n = Severity::Note;
    assert_has(&report, n, "object slot 5", "awaiting reap");
    assert_has(&report, n, "object slot 2", "transition in progress");
    assert_has(&report, n, "object slot 2", "owner token 4242");
    assert_has(
        &report,
        n,
        "peer slot 1",
        "request 3 (CREATE 1) is not answered",
    );
    assert_has(&report, n, "object slot 6", "counts no handles");
    assert!(report.objects.iter().any(|o| o.slot == 5 && o.closed));
    assert!(report.peers[1].pending);
}

#[test]
fn an_entry_whose_seqlock_stays_odd_is_reported_with_its_unsynchronised_copy() {
    let dir = Dir::new("odd");
    let r = healthy();
    let base = r.layout.object_entry(ObjectSlot(2)).expect("slot");
    r.mem
        .store_u64(base + OBJ_SEQ_OFF, 7, Ordering::SeqCst)
        .expect("seq");
    let report = inspect_region_file(&r, &dir);
    assert!(!report.ok);
    assert_has(&report, Severity::Error, "object slot 2", "stays odd");
    assert_has(&report, Severity::Error, "object slot 2", "LIVE \"pair\"");
}

/// xorshift64*: deterministic pseudo-random bytes without a dependency.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn random_bytes_under_a_valid_superblock_give_errors_not_panics() {
    let dir = Dir::new("fuzz");
    let path = dir.file("random");
    for seed in 0..12u64 {
        let (peers, objects) = if seed % 2 == 0 { (4, 16) } else { (62, 512) };
        let layout = Layout::compute(MIB, peers, objects, 1, 4096).expect("layout");
        let mut bytes = random_bytes(seed, 1 << 20);
        let mut sb = layout.superblock(seed, [0; 16]);
        sb.version = FORMAT_VERSION;
        bytes[..256].copy_from_slice(bytes_of(&sb));
        if seed % 3 == 0 {
            // Mostly-zero tables with scattered random words: more entries get far
            // enough into validation to exercise the later checks.
            let noise = random_bytes(seed + 100, 1 << 20);
            for (i, b) in bytes.iter_mut().enumerate().skip(256) {
                *b = if noise[i] < 16 { *b } else { 0 };
            }
        }
        std::fs::write(&path, &bytes).expect("write");
        let report = inspect(&path).expect("inspect");
        assert!(
            !report.ok,
            "seed {seed}: random tables cannot be consistent"
        );
        assert!(report.superblock.as_ref().is_some_and(|s| s.valid));
        assert!(report.findings.len() <= MAX_FINDINGS);
        let mut text = Vec::new();
        print_human(&report, &mut text).expect("print");
        serde_json::to_string(&report).expect("json");
    }
    // Random superblocks (with the magic and version kept) are rejected, not trusted.
    for seed in 100..200u64 {
        let mut bytes = random_bytes(seed, 1 << 20);
        bytes[..8].copy_from_slice(&vshm_format::layout::MAGIC.to_le_bytes());
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let mem_len = bytes.len() as u64;
        bytes[16..24].copy_from_slice(&mem_len.to_le_bytes());
        std::fs::write(&path, &bytes).expect("write");
        let report = inspect(&path).expect("inspect");
        assert!(!report.ok);
        assert_eq!(report.errors, 1, "{:#?}", report.findings);
    }
}

#[test]
fn inspect_never_writes_the_file_and_its_view_refuses_writes() {
    let dir = Dir::new("readonly");
    let path = dir.file("region");
    let r = healthy();
    // Findings that a writer would "repair" if it could.
    r.lease(9, 0);
    r.write(&path);
    let before = std::fs::read(&path).expect("read");
    let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    let report = inspect(&path).expect("inspect");
    assert!(!report.ok);
    assert_eq!(std::fs::read(&path).expect("read"), before);
    assert_eq!(
        std::fs::metadata(&path).and_then(|m| m.modified()).ok(),
        mtime
    );

    let file = File::open(&path).expect("open");
    let map = Mapping::read_only(&file, before.len()).expect("map");
    let view = map.region();
    let lease = r.layout.object_entry(ObjectSlot(9)).expect("slot") + OBJ_LEASE_OFF;
    assert_eq!(view.load_u64(lease, Ordering::SeqCst), Ok(0));
    assert!(view
        .store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
        .is_err());
    assert!(view.cas_u64(lease, 0, LEASE_CLOSED).is_err());
    assert!(view.fetch_or_u64(lease, LEASE_CLOSED).is_err());
    assert!(view.fetch_and_u64(lease, 0).is_err());
    assert!(view.cas_u32(0, 0, 1).is_err());
    assert!(view.store_u32(8, 0, Ordering::SeqCst).is_err());
    assert!(view.write_bytes(0, b"x").is_err());
    assert!(view.zero(0, 1).is_err());
    assert_eq!(
        view.load_u64(view.size() - 4, Ordering::Relaxed),
        Err(Fault::OutOfBounds {
            offset: view.size() - 4,
            len: 8
        })
    );
    assert_eq!(
        view.load_u32(2, Ordering::Relaxed),
        Err(Fault::Misaligned { offset: 2 })
    );
    assert!(view.read_bytes(u64::MAX, &mut [0; 2]).is_err());
    drop(map);
    assert_eq!(std::fs::read(&path).expect("read"), before);
}

#[test]
fn a_flood_of_findings_lists_the_errors_first_and_counts_the_rest() {
    let mut r = Report::new("x".into(), 0);
    for i in 0..1500 {
        r.note(format!("object slot {i}"), "n");
    }
    for i in 0..5 {
        r.error(format!("object slot {i}"), "e");
    }
    let r = r.finish();
    assert_eq!(r.findings.len(), MAX_FINDINGS);
    assert!(r.findings[..5]
        .iter()
        .all(|f| f.severity == Severity::Error));
    assert_eq!(r.findings[5].severity, Severity::Note);
    assert_eq!((r.errors, r.notes, r.findings_omitted), (5, 1500, 505));
    assert!(!r.ok);
}

#[test]
fn the_text_and_json_renderings_show_tables_findings_and_a_where_field() {
    let dir = Dir::new("render");
    let r = healthy();
    r.lease(9, 0);
    // A name with a terminal escape in it is shown escaped.
    r.object(
        4,
        4,
        Some("evil\u{1b}[2J"),
        r.heap(4),
        4096,
        true,
        LEASE_KEEP,
        &[],
    );
    let report = inspect_region_file(&r, &dir);
    let mut text = Vec::new();
    print_human(&report, &mut text).expect("print");
    let text = String::from_utf8(text).expect("utf8");
    assert!(text.contains("PEERS (2 connected)"), "{text}");
    assert!(text.contains("OBJECTS (4)"), "{text}");
    assert!(
        text.contains("frames") && text.contains("<unnamed>"),
        "{text}"
    );
    assert!(text.contains("7:2"), "{text}");
    assert!(
        text.contains("error    object slot 9: free slot's lease word"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "control characters escaped: {text}"
    );
    assert!(text.contains("ERRORS:"), "{text}");
    let doc: serde_json::Value = serde_json::to_value(&report).expect("json");
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["findings"][0]["where"], "object slot 9");
    assert_eq!(doc["findings"][0]["severity"], "error");
    assert_eq!(doc["objects"][1]["refs_by_peer"][0][0], 7);
    assert_eq!(doc["superblock"]["region_id"], "ab".repeat(16));

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let path = dir.file("region");
    assert_eq!(run(&path, true, &mut out, &mut err), EXIT_ERRORS);
    let doc: serde_json::Value = serde_json::from_slice(&out).expect("json output");
    assert_eq!(doc["errors"], 1);
    assert!(err.is_empty());
}

#[test]
fn invalid_entries_are_described_from_the_values_the_format_errors_carry() {
    let dir = Dir::new("why");
    let r = Region::new(MIB, 4, 16);
    r.connect(0, 5);
    r.connect(1, 70_000);
    let far = make_entry(
        Generation(3),
        object_state::LIVE,
        kind::SECTION,
        RegionOffset(MIB),
        0,
        4096,
        false,
        Some("far"),
        PeerId(1),
    );
    r.publish(4, &far, Some("far"));
    let slash = make_entry(
        Generation(4),
        object_state::LIVE,
        kind::SECTION,
        RegionOffset(r.heap(3)),
        0,
        4096,
        false,
        Some("a\\b"),
        PeerId(1),
    );
    r.publish(5, &slash, Some("a\\b"));
    let mut hash = make_entry(
        Generation(5),
        object_state::LIVE,
        kind::SECTION,
        RegionOffset(r.heap(4)),
        0,
        4096,
        false,
        Some("h"),
        PeerId(1),
    );
    hash.name_hash = 7;
    r.publish(6, &hash, Some("h"));
    let mut outside = make_entry(
        Generation(6),
        object_state::LIVE,
        kind::SECTION,
        RegionOffset(r.heap(5)),
        0,
        4096,
        false,
        Some("o"),
        PeerId(1),
    );
    // Past the name area (16 × 64 = 1024 bytes) and the padding after it: at the heap.
    let span = r.layout.name_span();
    outside.name_off = u32::try_from(span).expect("small");
    publish(&r.mem, &r.layout, ObjectSlot(7), &outside).expect("publish");
    let report = inspect_region_file(&r, &dir);
    let what = |at: &str| -> Vec<&str> {
        report
            .findings
            .iter()
            .filter(|f| f.where_ == at)
            .map(|f| f.what.as_str())
            .collect()
    };
    assert_eq!(
        what("object slot 4"),
        [
            "invalid entry: range [0x100000, 0x101000) ends beyond the heap (region end \
          0x100000) [BadRange(1048576, 0, 4096)]"
        ]
    );
    assert_eq!(
        what("object slot 5"),
        ["invalid entry: name \"a\\\\b\" contains a backslash [BadName(3)]"]
    );
    assert_eq!(
        what("object slot 6"),
        [format!(
            "invalid entry: name_hash 0x00000007 is not the FNV-1a hash {:#010x} of the name \
             \"h\" [BadName(1)]",
            vshm_format::name_hash(b"h")
        )
        .as_str()]
    );
    assert_eq!(
        what("object slot 7"),
        [format!(
            "invalid entry: name [{span:#x}, +1) is outside the name area of {span} bytes \
             [BadName(1)]"
        )
        .as_str()]
    );
    assert_eq!(
        what("peer slot 1"),
        ["connected with peer id 70000, outside 1..=65535; treated as absent"]
    );
}

#[test]
fn events_and_mutexes_show_their_sync_words_and_a_mutex_held_by_a_gone_peer_is_flagged() {
    use vshm_format::layout::{mutex_word, object_flags};
    use vshm_format::sync;
    let dir = Dir::new("sync");
    let r = healthy();
    let sync_object = |slot: u32, generation: u64, name: &str, k: u32, flags: u32| {
        let mut e = make_entry(
            Generation(generation),
            object_state::LIVE,
            k,
            RegionOffset(0),
            0,
            0,
            true,
            Some(name),
            PeerId(5),
        );
        e.max_size = 0;
        e.flags |= flags;
        r.publish(slot, &e, Some(name));
        r.lease(slot, LEASE_KEEP);
    };
    sync_object(5, 4, "tick", kind::EVENT, object_flags::MANUAL_RESET);
    sync_object(6, 5, "lock", kind::MUTEX, 0);
    sync::event_set(&r.mem, &r.layout, ObjectSlot(5)).expect("signal");
    sync::register_waiter(&r.mem, &r.layout, ObjectSlot(5), PeerSlot(1)).expect("wait");
    // Held by peer slot 3, which is not connected.
    let owner = mutex_word::owner(PeerSlot(3), 4242);
    assert!(sync::mutex_try_lock(&r.mem, &r.layout, ObjectSlot(6), owner).expect("lock"));

    let report = inspect_region_file(&r, &dir);
    let event = report
        .objects
        .iter()
        .find(|o| o.name.as_deref() == Some("tick"))
        .expect("event row");
    let es = event.sync.as_ref().expect("event sync words");
    assert_eq!(
        (es.signals, es.signaled, es.waiter_slots.clone()),
        (1, Some(true), vec![1])
    );
    let mutex = report
        .objects
        .iter()
        .find(|o| o.name.as_deref() == Some("lock"))
        .expect("mutex row");
    let ms = mutex.sync.as_ref().expect("mutex sync words");
    assert_eq!((ms.owner_slot, ms.owner_token), (Some(3), Some(4242)));
    assert_has(
        &report,
        Severity::Warning,
        "object slot 6",
        "names peer slot 3, which is not connected",
    );
    assert!(
        report
            .objects
            .iter()
            .filter(|o| o.kind == "section")
            .all(|o| o.sync.is_none()),
        "sections carry no sync row"
    );
    let mut text = Vec::new();
    print_human(&report, &mut text).expect("render");
    let text = String::from_utf8(text).expect("utf8");
    assert!(text.contains("EVENTS AND MUTEXES (2)"), "{text}");
    assert!(text.contains("held by peer slot 3 (token 4242)"), "{text}");
    assert!(text.contains("signalled"), "{text}");
}

#[test]
fn a_name_index_that_hides_a_live_name_or_names_no_slot_is_reported() {
    let dir = Dir::new("index");
    let r = healthy();
    let report = inspect_region_file(&r, &dir);
    let ix = report.index.as_ref().expect("index decoded");
    assert_eq!((ix.slots, ix.entries, ix.tombstones), (32, 2, 0));
    assert!(ix.longest_probe >= 1);
    // Scribble: the entry of "frames" becomes EMPTY, another becomes a slot out of range.
    let words = r.index.borrow().words().to_vec();
    let frames = words
        .iter()
        .position(|&w| w != 0 && w & 0xFFFF_FFFF == 1)
        .expect("frames (slot 0) is indexed");
    let empty = words.iter().position(|&w| w == 0).expect("an empty entry");
    let at = |p: usize| {
        r.layout
            .index_entry(u32::try_from(p).expect("pos"))
            .expect("entry")
    };
    r.mem
        .store_u64(at(frames), 0, Ordering::SeqCst)
        .expect("scribble");
    r.mem
        .store_u64(at(empty), 0x1234_0000_0000_0099, Ordering::SeqCst)
        .expect("scribble");
    let report = inspect_region_file(&r, &dir);
    assert!(!report.ok);
    assert_has(
        &report,
        Severity::Error,
        "object slot 0",
        "LIVE object \"frames\" is not reachable in the name index",
    );
    assert_has(
        &report,
        Severity::Error,
        &format!("name index entry {empty}"),
        "names no object slot",
    );
}

#[test]
fn two_entries_whose_names_share_granules_of_the_name_area_are_an_error() {
    let dir = Dir::new("name-overlap");
    let r = healthy();
    // "frames" is LIVE in slot 0 with its name at 0; an UNLINKED entry claims the same
    // bytes (a scribbled reference: the host gives each name its own granules).
    let mut twin = make_entry(
        Generation(9),
        object_state::UNLINKED,
        kind::SECTION,
        RegionOffset(r.heap(5)),
        0,
        4096,
        false,
        Some("frames"),
        PeerId(1),
    );
    twin.name_off = 0;
    publish_named(&r.mem, &r.layout, ObjectSlot(5), &twin, b"frames").expect("publish");
    let report = inspect_region_file(&r, &dir);
    assert_has(
        &report,
        Severity::Error,
        "object slot 0",
        "name [0x0, 0x8) overlaps object slot 5's name [0x0, 0x8)",
    );
    // A healthy region has none.
    let clean = inspect_region_file(&healthy(), &dir);
    assert!(
        !has(&clean, Severity::Error, "object slot 0", "overlaps"),
        "{:?}",
        clean.findings
    );
}
