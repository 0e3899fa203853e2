//! `vshmctl inspect`: decode a region from its raw bytes, read-only, and check it against the
//! format (docs/FORMAT.md), for when vshmd cannot be asked.
//!
//! The file (vshmd's memfd through `/proc/PID/fd/N`, an ivshmem-plain backing file, a copy) is
//! opened read-only and mapped `PROT_READ`: nothing here can write it. Everything in it is
//! treated as untrusted input, exactly as a peer treats shared memory: the superblock is
//! validated with [`Layout::from_superblock`] before any table is walked, entries are copied
//! out and validated with [`object::validate`], every access is bounds-checked, and anything
//! that disagrees with the format is reported as a [`Finding`] instead of believed. Only the
//! header is read, never the heap, so inspecting does not fault in section memory.
//!
//! A live region keeps changing while it is read: a finding may describe a state that only
//! lasted a moment (a peer between two steps of an open), which is why the protocol's
//! transient states are notes, not errors.
//!
//! Exit codes for the command: [`EXIT_OK`] (no errors), [`EXIT_ERRORS`] (errors found),
//! [`EXIT_UNREADABLE`] (the file could not be opened or mapped).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, Ordering};

use crate::text::{human_bytes, printable};

use serde::Serialize;
use vshm_control::superblock::{summarize, SuperblockSummary};
use vshm_format::layout::{
    holder_bit, kind, object_flags, object_state, op, peer_state, refcell, Layout, ObjectEntry,
    PeerEntry, Request, Superblock, LEASE_CLOSED, LEASE_HOLDERS, LEASE_KEEP, MAX_NAME_BYTES,
    MAX_NAME_CHARS, MB_LOCK_OFF, MB_REQ_SEQ_OFF, MB_RESP_SEQ_OFF, OBJ_LEASE_OFF, OBJ_SEQ_OFF,
};
use vshm_format::object::{self, EntryError, ObjectInfo};
use vshm_format::shm::{check_range, read_pod, Fault, SharedMemory};

/// Exit code: the region decoded without errors (warnings and notes allowed).
pub const EXIT_OK: u8 = 0;
/// Exit code: the region has at least one error finding.
pub const EXIT_ERRORS: u8 = 1;
/// Exit code: the file could not be opened, sized or mapped.
pub const EXIT_UNREADABLE: u8 = 2;

/// Findings listed in a report (the most severe first); more are counted, not listed.
const MAX_FINDINGS: usize = 1000;
/// Findings collected before the most severe are picked (bounds memory on garbage input).
const MAX_COLLECTED: usize = 100_000;
/// Overlapping pairs reported before the overlap scan stops (n² pairs otherwise).
const MAX_OVERLAPS: usize = 100;
/// Times an odd seqlock counter is re-read (yielding in between) before the entry is
/// reported as stuck mid-publication.
const SEQ_WAIT_TRIES: u32 = 100;
/// Offset of the request's `op` in a mailbox.
const MB_OP_OFF: u64 = std::mem::offset_of!(Request, op) as u64;
/// Size of the superblock.
const SUPERBLOCK_SIZE: u64 = size_of::<Superblock>() as u64;

/// Why a file could not be inspected at all (exit code [`EXIT_UNREADABLE`]).
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// open(2) failed.
    #[error("cannot open {}: {source}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// fstat(2) failed.
    #[error("cannot stat {}: {source}", .path.display())]
    Stat {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The file is larger than the address space.
    #[error("{} is {size} bytes, too large to map", .path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// mmap(2) failed.
    #[error("cannot map {} read-only: {source}", .path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The region breaks the format: something is corrupt (or the reader is wrong).
    Error,
    /// Unexpected but harmless, or a state the host repairs by itself.
    Warning,
    /// A normal but noteworthy state (a request pending, an object awaiting reap).
    Note,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        }
    }
}

/// One thing the inspector noticed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Error, warning or note.
    pub severity: Severity,
    /// Where: "superblock", "peer slot 2", "object slot 3", "heap".
    #[serde(rename = "where")]
    pub where_: String,
    /// What, in words.
    pub what: String,
}

/// A connected peer, from the peer table.
#[derive(Clone, Debug, Serialize)]
pub struct PeerRow {
    /// Peer slot.
    pub slot: u32,
    /// ivshmem peer id.
    pub id: u16,
    /// Connections so far in this slot.
    pub incarnation: u64,
    /// Handles it counts in its refcount row (over valid objects).
    pub handles: u64,
    /// Its mailbox's request sequence.
    pub req_seq: u64,
    /// Its mailbox's response sequence.
    pub resp_seq: u64,
    /// A request is posted and not answered (`req_seq != resp_seq`).
    pub pending: bool,
}

/// A valid (LIVE or UNLINKED) object.
#[derive(Clone, Debug, Serialize)]
pub struct ObjectRow {
    /// Object slot.
    pub slot: u32,
    /// Name (`None` for unnamed).
    pub name: Option<String>,
    /// "LIVE" or "UNLINKED".
    pub state: &'static str,
    /// "section", "event" or "mutex".
    pub kind: &'static str,
    /// Generation.
    pub generation: u64,
    /// Region offset of its memory.
    pub offset: u64,
    /// Current size.
    pub size: u64,
    /// Reserved size.
    pub max_size: u64,
    /// Persistent.
    pub persistent: bool,
    /// Creator's peer id (0 = the host).
    pub creator: u32,
    /// The lease word, hex.
    pub lease: String,
    /// CLOSED is set: dead, awaiting reap.
    pub closed: bool,
    /// KEEP is set.
    pub keep: bool,
    /// Peer ids whose holder bit is set (connected peers only; other bits are findings).
    pub holders: Vec<u16>,
    /// Total handles counted by connected peers.
    pub refs: u64,
    /// (peer id, handles) for each connected peer counting some, as in `vshmctl status`.
    pub refs_by_peer: Vec<(u16, u32)>,
}

/// Heap use by the valid objects.
#[derive(Clone, Debug, Serialize)]
pub struct HeapUsage {
    /// Heap offset.
    pub offset: u64,
    /// Heap size.
    pub size: u64,
    /// Allocation granularity.
    pub alignment: u64,
    /// Valid objects.
    pub objects: usize,
    /// Bytes they reserve (each max_size rounded up to the alignment).
    pub reserved: u64,
    /// Heap bytes not reserved (0 if over-committed).
    pub free: u64,
}

/// Everything `inspect` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The file inspected.
    pub path: String,
    /// Its size.
    pub file_size: u64,
    /// The superblock, if the file holds one.
    pub superblock: Option<SuperblockSummary>,
    /// Connected peers (valid entries).
    pub peers: Vec<PeerRow>,
    /// Valid objects.
    pub objects: Vec<ObjectRow>,
    /// Heap use (when the superblock is valid).
    pub heap: Option<HeapUsage>,
    /// Findings, errors first, at most 1000.
    pub findings: Vec<Finding>,
    /// Error findings (all of them, listed or not).
    pub errors: usize,
    /// Warning findings.
    pub warnings: usize,
    /// Notes.
    pub notes: usize,
    /// Findings counted but not listed (beyond 1000).
    pub findings_omitted: usize,
    /// No errors.
    pub ok: bool,
}

impl Report {
    fn new(path: String, file_size: u64) -> Report {
        Report {
            path,
            file_size,
            superblock: None,
            peers: Vec::new(),
            objects: Vec::new(),
            heap: None,
            findings: Vec::new(),
            errors: 0,
            warnings: 0,
            notes: 0,
            findings_omitted: 0,
            ok: true,
        }
    }

    fn add(&mut self, severity: Severity, where_: impl Into<String>, what: impl Into<String>) {
        match severity {
            Severity::Error => self.errors += 1,
            Severity::Warning => self.warnings += 1,
            Severity::Note => self.notes += 1,
        }
        if self.findings.len() < MAX_COLLECTED {
            self.findings.push(Finding {
                severity,
                where_: where_.into(),
                what: what.into(),
            });
        } else {
            self.findings_omitted += 1;
        }
    }

    fn error(&mut self, where_: impl Into<String>, what: impl Into<String>) {
        self.add(Severity::Error, where_, what);
    }

    fn warning(&mut self, where_: impl Into<String>, what: impl Into<String>) {
        self.add(Severity::Warning, where_, what);
    }

    fn note(&mut self, where_: impl Into<String>, what: impl Into<String>) {
        self.add(Severity::Note, where_, what);
    }

    fn finish(mut self) -> Report {
        let rank = |s: Severity| match s {
            Severity::Error => 0,
            Severity::Warning => 1,
            Severity::Note => 2,
        };
        // Stable: within a severity, findings stay in walk order (by slot).
        self.findings.sort_by_key(|f| rank(f.severity));
        if self.findings.len() > MAX_FINDINGS {
            self.findings_omitted += self.findings.len() - MAX_FINDINGS;
            self.findings.truncate(MAX_FINDINGS);
        }
        self.ok = self.errors == 0;
        self
    }

    /// The command's exit code: [`EXIT_OK`] or [`EXIT_ERRORS`].
    pub fn exit_code(&self) -> u8 {
        if self.ok {
            EXIT_OK
        } else {
            EXIT_ERRORS
        }
    }
}

/// Opens `path` read-only, maps it `PROT_READ` and decodes and checks the region in it.
///
/// `Err` only when the file cannot be read at all; everything wrong *inside* the file,
/// including a file too small for a superblock, is a finding in the report.
pub fn inspect(path: &Path) -> Result<Report, InspectError> {
    let file = File::open(path).map_err(|source| InspectError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| InspectError::Stat {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let shown = path.display().to_string();
    if size < SUPERBLOCK_SIZE {
        let mut report = Report::new(shown, size);
        report.error(
            "superblock",
            format!(
                "the file is {size} bytes, too small for the {SUPERBLOCK_SIZE}-byte superblock"
            ),
        );
        return Ok(report.finish());
    }
    let len = usize::try_from(size).map_err(|_| InspectError::TooLarge {
        path: path.to_path_buf(),
        size,
    })?;
    let map = Mapping::read_only(&file, len).map_err(|source| InspectError::Map {
        path: path.to_path_buf(),
        source,
    })?;
    drop(file);
    let mut report = inspect_region(&ReadOnlyRegion { map: &map });
    report.path = shown;
    Ok(report)
}

/// Prints the report as JSON (`json`) or text to `out`, or the reason the file could not be
/// read to `err`, and returns the exit code: what `vshmctl inspect` does.
pub fn run(path: &Path, json: bool, out: &mut impl Write, err: &mut impl Write) -> u8 {
    let report = match inspect(path) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "vshmctl: {e}");
            return EXIT_UNREADABLE;
        }
    };
    let written = if json {
        serde_json::to_string_pretty(&report)
            .map_err(io::Error::other)
            .and_then(|s| writeln!(out, "{s}"))
    } else {
        print_human(&report, out)
    };
    if let Err(e) = written {
        let _ = writeln!(err, "vshmctl: cannot write the report: {e}");
    }
    report.exit_code()
}

/// A read-only shared mapping of a whole file, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn read_only(file: &File, len: usize) -> io::Result<Mapping> {
        // SAFETY: a new mapping at an address the kernel picks (so it replaces nothing of
        // ours), PROT_READ only, of a descriptor that is open for this call; the result is
        // checked for MAP_FAILED before use. The memory is only ever read through raw
        // pointers (atomic loads and volatile reads), never through references to plain
        // data, so other processes writing it is fine. A file that shrinks while mapped
        // would make reads beyond its end fault (SIGBUS); vshmd's memfd is sealed against
        // shrinking (F_SEAL_SHRINK).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        NonNull::new(p.cast::<u8>())
            .map(|base| Mapping { base, len })
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range mmap returned in `read_only`; every ReadOnlyRegion
        // borrows the Mapping, so none outlives this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// [`SharedMemory`] over a read-only mapping: loads and copies are bounds- and
/// alignment-checked like [`vshm_format::shm::RawRegion`]'s; every store, compare-and-swap
/// and fetch-op is refused with a [`Fault`] (the view has no writable byte), so no code path
/// can write the region even by mistake.
struct ReadOnlyRegion<'a> {
    map: &'a Mapping,
}

impl ReadOnlyRegion<'_> {
    fn ptr(&self, offset: u64, len: u64, align: u64) -> Result<*const u8, Fault> {
        check_range(self.size(), offset, len)?;
        if offset % align != 0 {
            return Err(Fault::Misaligned { offset });
        }
        let at = usize::try_from(offset).map_err(|_| Fault::OutOfBounds { offset, len })?;
        // SAFETY: offset + len ≤ the mapping's length (checked above), so the pointer stays
        // inside the live mapping.
        Ok(unsafe { self.map.base.as_ptr().add(at) })
    }

    fn load32(&self, offset: u64) -> Result<u32, Fault> {
        let p = self.ptr(offset, 4, 4)?;
        // SAFETY: p is in bounds and 4-aligned in a mapping that lives as long as `self`.
        // A shared reference to an atomic asserts only that the memory is readable, and a
        // Relaxed atomic load of at most the target's word size is documented to work on
        // read-only memory (core::sync::atomic, "Atomic accesses to read-only memory").
        Ok(unsafe { &*p.cast::<AtomicU32>() }.load(Ordering::Relaxed))
    }

    #[cfg(target_pointer_width = "64")]
    fn load64(&self, offset: u64) -> Result<u64, Fault> {
        let p = self.ptr(offset, 8, 8)?;
        // SAFETY: as in load32, with 8-byte alignment checked; 8 bytes is the word size here.
        Ok(unsafe { &*p.cast::<std::sync::atomic::AtomicU64>() }.load(Ordering::Relaxed))
    }

    /// Where an 8-byte Relaxed load is not guaranteed to work on read-only memory: two
    /// 4-byte loads (a value being written at the same time may be torn; fine for a report).
    #[cfg(not(target_pointer_width = "64"))]
    fn load64(&self, offset: u64) -> Result<u64, Fault> {
        self.ptr(offset, 8, 8)?;
        let lo = self.load32(offset)?;
        let hi = self.load32(offset + 4)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }
}

/// Orders a Relaxed load as the caller asked (acquire or stronger via a fence after it).
fn order_after_load(order: Ordering) {
    match order {
        Ordering::Relaxed => {}
        Ordering::SeqCst => fence(Ordering::SeqCst),
        _ => fence(Ordering::Acquire),
    }
}

fn read_only(offset: u64, len: u64) -> Fault {
    Fault::OutOfBounds { offset, len }
}

impl SharedMemory for ReadOnlyRegion<'_> {
    fn size(&self) -> u64 {
        self.map.len as u64
    }
    fn load_u32(&self, offset: u64, order: Ordering) -> Result<u32, Fault> {
        let v = self.load32(offset)?;
        order_after_load(order);
        Ok(v)
    }
    fn load_u64(&self, offset: u64, order: Ordering) -> Result<u64, Fault> {
        let v = self.load64(offset)?;
        order_after_load(order);
        Ok(v)
    }
    fn store_u32(&self, offset: u64, _: u32, _: Ordering) -> Result<(), Fault> {
        Err(read_only(offset, 4))
    }
    fn store_u64(&self, offset: u64, _: u64, _: Ordering) -> Result<(), Fault> {
        Err(read_only(offset, 8))
    }
    fn cas_u32(&self, offset: u64, _: u32, _: u32) -> Result<Result<u32, u32>, Fault> {
        Err(read_only(offset, 4))
    }
    fn cas_u64(&self, offset: u64, _: u64, _: u64) -> Result<Result<u64, u64>, Fault> {
        Err(read_only(offset, 8))
    }
    fn fetch_and_u64(&self, offset: u64, _: u64) -> Result<u64, Fault> {
        Err(read_only(offset, 8))
    }
    fn fetch_or_u64(&self, offset: u64, _: u64) -> Result<u64, Fault> {
        Err(read_only(offset, 8))
    }
    fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let src = self.ptr(offset, buf.len() as u64, 1)?;
        for (i, b) in buf.iter_mut().enumerate() {
            // SAFETY: src + i is inside the range checked by `ptr`.
            *b = unsafe { src.add(i).read_volatile() };
        }
        Ok(())
    }
    fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<(), Fault> {
        Err(read_only(offset, data.len() as u64))
    }
    fn zero(&self, offset: u64, len: u64) -> Result<(), Fault> {
        Err(read_only(offset, len))
    }
}

/// What an object slot turned out to hold.
#[derive(Clone, Copy)]
enum SlotView {
    /// A FREE entry.
    Free,
    /// Unreadable or invalid (already a finding).
    Invalid,
    /// A valid object: index into the object list.
    Object(usize),
}

/// A valid object with the raw values the checks need.
struct Obj {
    row: ObjectRow,
    state: u32,
    lease: u64,
}

/// Decodes and checks a region held in any [`SharedMemory`] (the mapped file, or a buffer).
/// Never writes through `mem`.
pub fn inspect_region<M: SharedMemory + ?Sized>(mem: &M) -> Report {
    let mut r = Report::new(String::new(), mem.size());
    let sb: Superblock = match read_pod(mem, 0) {
        Ok(sb) => sb,
        Err(f) => {
            r.error("superblock", format!("cannot read the superblock: {f}"));
            return r.finish();
        }
    };
    let mut summary = summarize(&sb);
    let layout = match Layout::from_superblock(&sb, mem.size()) {
        Ok(l) => l,
        Err(e) => {
            r.error(
                "superblock",
                format!("{e}; the tables cannot be located, nothing else was decoded"),
            );
            r.superblock = Some(summary);
            return r.finish();
        }
    };
    summary.valid = true;
    r.superblock = Some(summary);
    check_superblock_extras(&sb, &mut r);

    let peers = walk_peers(mem, &layout, &mut r);
    let (slots, mut objs) = walk_objects(mem, &layout, &mut r);
    let connected: u64 = peers
        .iter()
        .flatten()
        .fold(0, |m, p| m | holder_bit(p.slot));
    for o in &objs {
        check_lease(o, connected, &mut r);
    }
    let handles = walk_refcounts(mem, &layout, &peers, &slots, &mut objs, &mut r);
    check_overlaps(&objs, &mut r);
    check_identities(&objs, &mut r);
    for o in &mut objs {
        o.row.holders = (0..layout.max_peers)
            .filter(|&i| o.lease & LEASE_HOLDERS & holder_bit(i) != 0)
            .filter_map(|i| peers.get(i as usize).and_then(Option::as_ref).map(|p| p.id))
            .collect();
        o.row.refs = o.row.refs_by_peer.iter().map(|x| u64::from(x.1)).sum();
    }
    let mut rows = Vec::new();
    for (p, n) in peers.into_iter().zip(handles) {
        if let Some(mut p) = p {
            p.handles = n;
            rows.push(p);
        }
    }
    walk_mailboxes(mem, &layout, &mut rows, &mut r);
    r.peers = rows;
    r.heap = Some(heap_usage(&layout, &objs));
    r.objects = objs.into_iter().map(|o| o.row).collect();
    r.finish()
}

fn check_superblock_extras(sb: &Superblock, r: &mut Report) {
    if sb.flags != 0 {
        r.warning(
            "superblock",
            format!("reserved flags are {:#x}, not 0", sb.flags),
        );
    }
    if sb.host_peer_id != 0 {
        r.warning(
            "superblock",
            format!("host_peer_id is {}, not 0", sb.host_peer_id),
        );
    }
    if sb.reserved.iter().any(|&b| b != 0) {
        r.warning("superblock", "reserved bytes 144..256 are not all zero");
    }
}

/// The peer table: one entry per slot, `Some` for a connected peer with a valid id.
fn walk_peers<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    r: &mut Report,
) -> Vec<Option<PeerRow>> {
    let mut peers: Vec<Option<PeerRow>> = Vec::new();
    let mut by_id: HashMap<u16, u32> = HashMap::new();
    for slot in 0..layout.max_peers {
        let at = format!("peer slot {slot}");
        let entry: Option<PeerEntry> = layout.peer_entry(slot).and_then(|o| read_pod(mem, o).ok());
        let Some(e) = entry else {
            r.error(at, "the entry cannot be read");
            peers.push(None);
            continue;
        };
        let row = match e.state {
            peer_state::ABSENT => None,
            peer_state::CONNECTED => match u16::try_from(e.peer_id) {
                Ok(id) if id != 0 => Some(PeerRow {
                    slot,
                    id,
                    incarnation: e.incarnation,
                    handles: 0,
                    req_seq: 0,
                    resp_seq: 0,
                    pending: false,
                }),
                _ => {
                    r.error(
                        &at,
                        format!(
                            "connected with peer id {}, outside 1..=65535; treated as absent",
                            e.peer_id
                        ),
                    );
                    None
                }
            },
            other => {
                r.error(
                    &at,
                    format!("unknown state {other} (0 = ABSENT, 1 = CONNECTED); treated as absent"),
                );
                None
            }
        };
        if let Some(p) = &row {
            if p.incarnation == 0 {
                r.warning(&at, "connected with incarnation 0 (the host counts from 1)");
            }
            if let Some(first) = by_id.insert(p.id, slot) {
                r.error(
                    &at,
                    format!(
                        "peer id {} is also connected in peer slot {first}: a client with that \
                         id finds no slot",
                        p.id
                    ),
                );
            }
        }
        peers.push(row);
    }
    peers
}

/// The object table: a view of every slot and the list of valid objects.
fn walk_objects<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    r: &mut Report,
) -> (Vec<SlotView>, Vec<Obj>) {
    let mut slots = Vec::new();
    let mut objs = Vec::new();
    for slot in 0..layout.max_objects {
        let view = match read_slot(mem, layout, slot, r) {
            Some((entry, lease)) => match object::validate(layout, slot, &entry) {
                Ok(None) => {
                    check_free(&entry, lease, slot, r);
                    SlotView::Free
                }
                Ok(Some(info)) => {
                    objs.push(object_row(&info, lease, r));
                    SlotView::Object(objs.len() - 1)
                }
                Err(err) => {
                    r.error(
                        format!("object slot {slot}"),
                        format!(
                            "invalid entry: {} [{err:?}]",
                            why_invalid(layout, &entry, err)
                        ),
                    );
                    SlotView::Invalid
                }
            },
            None => SlotView::Invalid,
        };
        slots.push(view);
    }
    (slots, objs)
}

/// A consistent copy of one entry and its lease word, or `None` (with a finding).
fn read_slot<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    slot: u32,
    r: &mut Report,
) -> Option<(ObjectEntry, u64)> {
    let at = format!("object slot {slot}");
    let Some(base) = layout.object_entry(slot) else {
        r.error(at, "outside the object table");
        return None;
    };
    let lease = match mem.load_u64(base + OBJ_LEASE_OFF, Ordering::SeqCst) {
        Ok(w) => w,
        Err(f) => {
            r.error(at, format!("cannot read the lease word: {f}"));
            return None;
        }
    };
    // An odd counter that stays odd is a host stopped mid-publication; object::snapshot
    // would spin on it, so wait a little here and describe the torn copy instead.
    let mut settled = false;
    let mut seq = 0;
    for _ in 0..SEQ_WAIT_TRIES {
        match mem.load_u64(base + OBJ_SEQ_OFF, Ordering::Acquire) {
            Ok(s) if s & 1 == 0 => {
                settled = true;
                break;
            }
            Ok(s) => seq = s,
            Err(f) => {
                r.error(at, format!("cannot read the seqlock counter: {f}"));
                return None;
            }
        }
        std::thread::yield_now();
    }
    if !settled {
        let copy = match read_pod::<ObjectEntry, M>(mem, base) {
            Ok(e) => match object::validate(layout, slot, &e) {
                Ok(None) => "FREE".to_string(),
                Ok(Some(info)) => format!(
                    "{} {} generation {}",
                    state_name(info.state),
                    shown_name(info.name()),
                    info.generation
                ),
                Err(err) => format!("invalid: {}", why_invalid(layout, &e, err)),
            },
            Err(f) => format!("unreadable: {f}"),
        };
        r.error(
            at,
            format!(
                "seqlock counter {seq} stays odd: the host is stuck in the middle of publishing \
                 this entry; unsynchronised copy: {copy}"
            ),
        );
        return None;
    }
    match object::snapshot(mem, layout, slot, true) {
        Ok(e) => Some((e, lease)),
        Err(EntryError::Busy) => {
            r.warning(
                at,
                "the entry kept changing while it was read (the host is publishing it)",
            );
            None
        }
        Err(e) => {
            r.error(at, format!("cannot read the entry: {e}"));
            None
        }
    }
}

fn state_name(state: u32) -> &'static str {
    match state {
        object_state::LIVE => "LIVE",
        object_state::UNLINKED => "UNLINKED",
        object_state::FREE => "FREE",
        _ => "?",
    }
}

fn kind_name(k: u32) -> &'static str {
    match k {
        kind::SECTION => "section",
        kind::EVENT => "event",
        kind::MUTEX => "mutex",
        _ => "?",
    }
}

/// A name for messages: quoted, control characters escaped.
fn shown_name(name: Option<&str>) -> String {
    name.map_or_else(|| "<unnamed>".to_string(), |n| format!("{n:?}"))
}

fn object_row(info: &ObjectInfo, lease: u64, r: &mut Report) -> Obj {
    if info.kind != kind::SECTION {
        r.warning(
            format!("object slot {}", info.slot),
            format!(
                "kind {} is reserved in format version 1; the host never creates it",
                kind_name(info.kind)
            ),
        );
    }
    Obj {
        row: ObjectRow {
            slot: info.slot,
            name: info.name().map(str::to_string),
            state: state_name(info.state),
            kind: kind_name(info.kind),
            generation: info.generation,
            offset: info.offset,
            size: info.size,
            max_size: info.max_size,
            persistent: info.persistent(),
            creator: info.creator,
            lease: format!("{lease:#018x}"),
            closed: lease & LEASE_CLOSED != 0,
            keep: lease & LEASE_KEEP != 0,
            holders: Vec::new(),
            refs: 0,
            refs_by_peer: Vec::new(),
        },
        state: info.state,
        lease,
    }
}

/// A FREE entry is all zero except `seq` and its lease word, which is exactly CLOSED.
fn check_free(e: &ObjectEntry, lease: u64, slot: u32, r: &mut Report) {
    let at = format!("object slot {slot}");
    if lease != LEASE_CLOSED {
        r.error(
            &at,
            format!("free slot's lease word is {lease:#018x}, not CLOSED ({LEASE_CLOSED:#018x})"),
        );
    }
    let leftovers = e.generation != 0
        || e.kind != 0
        || e.offset != 0
        || e.size != 0
        || e.max_size != 0
        || e.flags != 0
        || e.name_len != 0
        || e.name_hash != 0
        || e.creator != 0;
    if leftovers {
        r.warning(
            at,
            format!(
                "free entry is not zeroed (generation {}, kind {}, offset {:#x}, max_size {}, \
                 flags {:#x}, name_len {})",
                e.generation, e.kind, e.offset, e.max_size, e.flags, e.name_len
            ),
        );
    }
}

/// Explains an [`EntryError`] from the copy it was found in.
fn why_invalid(layout: &Layout, e: &ObjectEntry, err: EntryError) -> String {
    match err {
        EntryError::BadState(s) => format!("state {s} is not FREE (0), LIVE (1) or UNLINKED (2)"),
        EntryError::BadKind(k) => format!("kind {k} is not SECTION (1), EVENT (2) or MUTEX (3)"),
        EntryError::BadRange(o, s, m) => {
            if m == 0 {
                "max_size is 0".to_string()
            } else if s > m {
                format!("size {s} exceeds max_size {m}")
            } else if o % layout.alignment != 0 {
                format!(
                    "offset {o:#x} is not a multiple of the alignment {}",
                    layout.alignment
                )
            } else {
                match o.checked_add(m) {
                    None => format!("offset {o:#x} + max_size {m} overflows"),
                    Some(end) if o < layout.heap_offset => format!(
                        "range [{o:#x}, {end:#x}) starts before the heap at {:#x}",
                        layout.heap_offset
                    ),
                    Some(end) => format!(
                        "range [{o:#x}, {end:#x}) ends beyond the heap (region end {:#x})",
                        layout.region_size
                    ),
                }
            }
        }
        EntryError::BadFlags(f) => {
            let unknown = f & !(object_flags::NAMED | object_flags::PERSISTENT);
            if unknown != 0 {
                format!("flags {f:#x} have unknown bits {unknown:#x}")
            } else {
                format!(
                    "NAMED is {} but name_len is {}",
                    if f & object_flags::NAMED != 0 {
                        "set"
                    } else {
                        "clear"
                    },
                    e.name_len
                )
            }
        }
        EntryError::BadName(len) => why_bad_name(e, len),
        EntryError::Busy | EntryError::Fault(_) => err.to_string(),
    }
}

fn why_bad_name(e: &ObjectEntry, len: u32) -> String {
    let Some(bytes) = usize::try_from(len)
        .ok()
        .filter(|&n| n <= MAX_NAME_BYTES)
        .map(|n| &e.name[..n])
    else {
        return format!("name_len {len} exceeds {MAX_NAME_BYTES} bytes");
    };
    let Ok(name) = std::str::from_utf8(bytes) else {
        return format!("name of {len} bytes is not valid UTF-8");
    };
    if name.contains('\\') {
        format!("name {name:?} contains a backslash")
    } else if name.contains('\0') {
        format!("name {name:?} contains a NUL")
    } else if name.chars().count() > MAX_NAME_CHARS {
        format!("name is longer than {MAX_NAME_CHARS} characters")
    } else if vshm_format::name_hash(bytes) != e.name_hash {
        format!(
            "name_hash {:#010x} is not the FNV-1a hash {:#010x} of the name {name:?}",
            e.name_hash,
            vshm_format::name_hash(bytes)
        )
    } else {
        format!("name {name:?} is invalid")
    }
}

fn slot_list(bits: u64) -> String {
    (0..64u32)
        .filter(|i| bits & (1u64 << i) != 0)
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The lease word of a valid object against its entry and the peer table.
fn check_lease(o: &Obj, connected: u64, r: &mut Report) {
    let at = format!("object slot {}", o.row.slot);
    let w = o.lease;
    let holders = w & LEASE_HOLDERS;
    let keep = w & LEASE_KEEP != 0;
    let closed = w & LEASE_CLOSED != 0;
    if closed {
        if holders != 0 || keep {
            r.error(
                &at,
                format!(
                    "lease word {w:#018x} is CLOSED but still has holder bits or KEEP (nobody \
                     sets bits on a closed word)"
                ),
            );
        } else {
            r.note(&at, "closed by its last holder, awaiting reap by the host");
        }
    }
    let stray = holders & !connected;
    if stray != 0 {
        r.error(
            &at,
            format!(
                "lease word {w:#018x} has holder bits of peer slots {} where no peer is connected",
                slot_list(stray)
            ),
        );
    }
    if keep && !o.row.persistent {
        r.error(&at, "KEEP is set but the object is not persistent");
    }
    if keep && o.row.persistent && o.state == object_state::UNLINKED {
        r.warning(
            &at,
            "KEEP is still set on a deleted object (the host clears it right after unlinking)",
        );
    }
    if o.row.persistent && o.state == object_state::LIVE && !keep {
        r.error(&at, "persistent and LIVE but KEEP is not set");
    }
    if !closed && !keep && holders == 0 {
        r.note(
            &at,
            "no holders and no KEEP but not closed: the host closes and reaps it at its next sweep",
        );
    }
}

/// The refcount rows: per-object handle counts, and each against the lease word. Returns
/// the handles counted by each peer slot.
fn walk_refcounts<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    peers: &[Option<PeerRow>],
    slots: &[SlotView],
    objs: &mut [Obj],
    r: &mut Report,
) -> Vec<u64> {
    let mut handles = vec![0u64; peers.len()];
    for (p, peer) in (0..layout.max_peers).zip(peers) {
        let mut absent_nonzero = 0u32;
        let mut first_nonzero = None;
        for (s, view) in (0..layout.max_objects).zip(slots) {
            let Some(off) = layout.refcount_cell(p, s) else {
                continue;
            };
            let v = match mem.load_u32(off, Ordering::Acquire) {
                Ok(v) => v,
                Err(f) => {
                    r.error(
                        format!("peer slot {p}"),
                        format!("cannot read the refcount cell for object slot {s}: {f}"),
                    );
                    break;
                }
            };
            let Some(peer) = peer else {
                if v != 0 {
                    absent_nonzero += 1;
                    first_nonzero.get_or_insert(s);
                }
                continue;
            };
            let at = || format!("object slot {s}");
            let n = v & refcell::REF_COUNT;
            let locked = v & refcell::REF_LOCK != 0;
            if locked {
                r.note(
                    at(),
                    format!(
                        "peer {} (slot {p}) holds its refcount lock: a transition in progress \
                         (stuck if it stays)",
                        peer.id
                    ),
                );
            }
            match *view {
                SlotView::Free if n > 0 => {
                    r.error(
                        at(),
                        format!(
                            "peer {} (slot {p}) counts {n} handle(s) on a free slot",
                            peer.id
                        ),
                    );
                }
                SlotView::Object(i) => {
                    let Some(o) = objs.get_mut(i) else {
                        continue;
                    };
                    let bit = o.lease & holder_bit(p) != 0;
                    if n > 0 {
                        o.row.refs_by_peer.push((peer.id, n));
                        if let Some(h) = handles.get_mut(p as usize) {
                            *h += u64::from(n);
                        }
                        if !bit {
                            r.error(
                                at(),
                                format!(
                                    "peer {} (slot {p}) counts {n} handle(s) but its holder bit \
                                     is not set in the lease word {:#018x}",
                                    peer.id, o.lease
                                ),
                            );
                        }
                    } else if bit && !locked && o.lease & LEASE_CLOSED == 0 {
                        r.note(
                            at(),
                            format!(
                                "peer {} (slot {p}) has its holder bit set but counts no handles \
                                 (a creator yet to take its hold, or an open in progress)",
                                peer.id
                            ),
                        );
                    }
                }
                _ => {}
            }
        }
        if let Some(first) = first_nonzero {
            r.warning(
                format!("peer slot {p}"),
                format!(
                    "no peer is connected but {absent_nonzero} refcount cell(s) are not zero \
                     (first: object slot {first}); the host zeroes a row when its peer leaves"
                ),
            );
        }
    }
    handles
}

/// Two valid objects whose `[offset, offset + max_size)` ranges overlap.
fn check_overlaps(objs: &[Obj], r: &mut Report) {
    let mut ranges: Vec<(u64, u64, u32)> = objs
        .iter()
        .map(|o| {
            let end = o.row.offset.saturating_add(o.row.max_size);
            (o.row.offset, end, o.row.slot)
        })
        .collect();
    ranges.sort_unstable();
    let mut reported = 0;
    for (i, &(start, end, slot)) in ranges.iter().enumerate() {
        for &(start2, end2, slot2) in &ranges[i + 1..] {
            if start2 >= end {
                break;
            }
            if reported == MAX_OVERLAPS {
                r.error("heap", "more overlapping objects; stopped listing them");
                return;
            }
            reported += 1;
            r.error(
                format!("object slot {slot}"),
                format!(
                    "range [{start:#x}, {end:#x}) overlaps object slot {slot2} \
                     [{start2:#x}, {end2:#x})"
                ),
            );
        }
    }
}

/// Generations are unique and never 0; no two LIVE objects share a name.
fn check_identities(objs: &[Obj], r: &mut Report) {
    let mut generations: HashMap<u64, u32> = HashMap::new();
    let mut names: HashMap<&str, u32> = HashMap::new();
    for o in objs {
        let at = format!("object slot {}", o.row.slot);
        if o.row.generation == 0 {
            r.error(&at, "generation 0 on an object (0 marks a free slot)");
        } else if let Some(other) = generations.insert(o.row.generation, o.row.slot) {
            r.error(
                &at,
                format!(
                    "generation {} is also object slot {other}'s (generations are unique)",
                    o.row.generation
                ),
            );
        }
        if o.state == object_state::LIVE {
            if let Some(name) = o.row.name.as_deref() {
                if let Some(other) = names.insert(name, o.row.slot) {
                    r.error(
                        &at,
                        format!(
                            "name {name:?} is also LIVE in object slot {other} (names are unique \
                             among LIVE objects)"
                        ),
                    );
                }
            }
        }
    }
}

/// Connected peers' mailboxes: a request posted and not answered is a note.
fn walk_mailboxes<M: SharedMemory + ?Sized>(
    mem: &M,
    layout: &Layout,
    rows: &mut [PeerRow],
    r: &mut Report,
) {
    for p in rows {
        let at = format!("peer slot {}", p.slot);
        let Some(base) = layout.mailbox(p.slot) else {
            continue;
        };
        let read = (|| {
            Ok::<_, Fault>((
                mem.load_u64(base + MB_REQ_SEQ_OFF, Ordering::Acquire)?,
                mem.load_u64(base + MB_RESP_SEQ_OFF, Ordering::Acquire)?,
                mem.load_u32(base + MB_LOCK_OFF, Ordering::Acquire)?,
                mem.load_u32(base + MB_OP_OFF, Ordering::Relaxed)?,
            ))
        })();
        let (req, resp, lock, opcode) = match read {
            Ok(x) => x,
            Err(f) => {
                r.error(at, format!("cannot read the mailbox: {f}"));
                continue;
            }
        };
        p.req_seq = req;
        p.resp_seq = resp;
        p.pending = req != resp;
        if p.pending {
            let op_name = match opcode {
                op::CREATE => "CREATE",
                op::DELETE => "DELETE",
                op::GROW => "GROW",
                _ => "unknown op",
            };
            r.note(
                at,
                format!(
                    "peer {}: request {req} ({op_name} {opcode}) is not answered (resp_seq \
                     {resp}{}); if this stays, the host is not serving requests",
                    p.id,
                    if lock != 0 { ", mailbox locked" } else { "" }
                ),
            );
        }
    }
}

fn heap_usage(layout: &Layout, objs: &[Obj]) -> HeapUsage {
    let align = layout.alignment;
    let reserved = objs.iter().fold(0u64, |sum, o| {
        let rounded = o
            .row
            .max_size
            .checked_add(align - 1)
            .map_or(u64::MAX, |v| v & !(align - 1));
        sum.saturating_add(rounded)
    });
    HeapUsage {
        offset: layout.heap_offset,
        size: layout.heap_size,
        alignment: align,
        objects: objs.len(),
        reserved,
        free: layout.heap_size.saturating_sub(reserved),
    }
}

/// A name cell for the text table: control characters escaped, cut to `width` characters.
fn name_cell(name: Option<&str>, width: usize) -> String {
    let Some(name) = name else {
        return "<unnamed>".to_string();
    };
    let escaped = printable(name);
    if escaped.chars().count() > width {
        let mut cut: String = escaped.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        escaped
    }
}

/// The report as text: region summary, peer and object tables, findings.
pub fn print_human(report: &Report, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "{}: {} ({} bytes)",
        printable(&report.path),
        human_bytes(report.file_size),
        report.file_size
    )?;
    if let Some(sb) = &report.superblock {
        writeln!(
            out,
            "superblock  magic {} ({}), version {}, region {} ({} bytes), epoch {:#018x}",
            sb.magic,
            if sb.magic_ok { "ok" } else { "BAD" },
            sb.version,
            human_bytes(sb.region_size),
            sb.region_size,
            sb.epoch
        )?;
        writeln!(
            out,
            "            region id {}, {} peer slots, {} object slots, {} vectors, alignment {}, \
             namespace seq {}",
            sb.region_id, sb.max_peers, sb.max_objects, sb.vectors, sb.alignment, sb.namespace_seq
        )?;
        writeln!(
            out,
            "            heap at {:#x}, {}{}",
            sb.heap_offset,
            human_bytes(sb.heap_size),
            if sb.valid {
                ""
            } else {
                " (superblock invalid: tables not decoded)"
            }
        )?;
    }
    if let Some(h) = &report.heap {
        #[allow(clippy::cast_precision_loss)] // a percentage for people
        let pct = if h.size == 0 {
            0.0
        } else {
            h.reserved as f64 * 100.0 / h.size as f64
        };
        writeln!(
            out,
            "heap        {} object(s) reserve {} of {} ({pct:.1}%), {} free",
            h.objects,
            human_bytes(h.reserved),
            human_bytes(h.size),
            human_bytes(h.free)
        )?;
    }
    if report.superblock.as_ref().is_some_and(|s| s.valid) {
        writeln!(out, "\nPEERS ({} connected)", report.peers.len())?;
        if !report.peers.is_empty() {
            writeln!(out, "SLOT  ID     INCARNATION  HANDLES  MAILBOX")?;
        }
        for p in &report.peers {
            let mailbox = if p.pending {
                format!("pending request {} (answered {})", p.req_seq, p.resp_seq)
            } else {
                format!("idle (seq {})", p.req_seq)
            };
            writeln!(
                out,
                "{:<5} {:<6} {:<12} {:<8} {}",
                p.slot, p.id, p.incarnation, p.handles, mailbox
            )?;
        }
        writeln!(out, "\nOBJECTS ({})", report.objects.len())?;
        if !report.objects.is_empty() {
            writeln!(
                out,
                "SLOT  NAME                             STATE     GEN     OFFSET       SIZE        \
                 MAX         PERSIST  LEASE               HANDLES (peer:n)"
            )?;
        }
        for o in &report.objects {
            let state = if o.closed {
                format!("{}*", o.state)
            } else {
                o.state.to_string()
            };
            let handles: Vec<String> = o
                .refs_by_peer
                .iter()
                .map(|(id, n)| format!("{id}:{n}"))
                .collect();
            writeln!(
                out,
                "{:<5} {:<32} {:<9} {:<7} {:<12} {:<11} {:<11} {:<8} {:<19} {}",
                o.slot,
                name_cell(o.name.as_deref(), 32),
                state,
                o.generation,
                format!("{:#x}", o.offset),
                human_bytes(o.size),
                human_bytes(o.max_size),
                if o.persistent { "yes" } else { "no" },
                o.lease,
                if handles.is_empty() {
                    "-".to_string()
                } else {
                    handles.join(" ")
                }
            )?;
        }
        if report.objects.iter().any(|o| o.closed) {
            writeln!(out, "(* closed, awaiting reap)")?;
        }
    }
    writeln!(
        out,
        "\nFINDINGS: {} error(s), {} warning(s), {} note(s)",
        report.errors, report.warnings, report.notes
    )?;
    for f in &report.findings {
        writeln!(
            out,
            "  {:<8} {}: {}",
            f.severity.label(),
            f.where_,
            printable(&f.what)
        )?;
    }
    if report.findings_omitted > 0 {
        writeln!(out, "  ... and {} more", report.findings_omitted)?;
    }
    writeln!(
        out,
        "\n{}",
        if report.ok {
            "OK: the region is consistent with the format"
        } else {
            "ERRORS: the region is inconsistent with the format"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32 as Counter;
    use vshm_format::layout::{PeerEntry, FORMAT_VERSION, OBJ_SEQ_OFF};
    use vshm_format::object::{make_entry, publish};
    use vshm_format::shm::{bytes_of, zeroed, RawRegion};

    const MIB: u64 = 1 << 20;

    /// A private temp directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            static N: Counter = Counter::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("vshm-inspect-{tag}-{}-{n}", std::process::id()));
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
                let lease = layout.object_entry(s).expect("slot") + OBJ_LEASE_OFF;
                mem.store_u64(lease, LEASE_CLOSED, Ordering::SeqCst)
                    .expect("lease");
            }
            Region {
                _buf: buf,
                mem,
                layout,
            }
        }

        fn connect(&self, slot: u32, id: u32) {
            let mut e = zeroed::<PeerEntry>();
            e.state = peer_state::CONNECTED;
            e.peer_id = id;
            e.incarnation = 1;
            let at = self.layout.peer_entry(slot).expect("peer slot");
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
                generation,
                object_state::LIVE,
                kind::SECTION,
                offset,
                max_size / 2,
                max_size,
                persistent,
                name,
                1,
            );
            self.publish(slot, &e);
            self.lease(slot, lease);
            for &(peer, n) in counts {
                self.cell(peer, slot, n);
            }
        }

        fn publish(&self, slot: u32, e: &ObjectEntry) {
            publish(&self.mem, &self.layout, slot, e).expect("publish");
        }

        fn lease(&self, slot: u32, w: u64) {
            let at = self.layout.object_entry(slot).expect("slot") + OBJ_LEASE_OFF;
            self.mem.store_u64(at, w, Ordering::SeqCst).expect("lease");
        }

        fn cell(&self, peer: u32, slot: u32, v: u32) {
            let at = self.layout.refcount_cell(peer, slot).expect("cell");
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
            holder_bit(1),
            &[(1, 2)],
        );
        r.object(
            3,
            3,
            None,
            r.heap(2),
            4096,
            true,
            LEASE_KEEP | holder_bit(0),
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
            (1, MIB, 4, 16)
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
            holder_bit(1),
            &[(1, 1), (0, 1)],
        );
        // Offset beyond the heap.
        let mut e = make_entry(
            3,
            object_state::LIVE,
            kind::SECTION,
            MIB,
            0,
            4096,
            false,
            Some("far"),
            1,
        );
        r.publish(4, &e);
        r.lease(4, holder_bit(0));
        // A backslash in a name (hash updated, so only the rule is broken).
        e = make_entry(
            4,
            object_state::LIVE,
            kind::SECTION,
            r.heap(3),
            0,
            4096,
            false,
            Some("a\\b"),
            1,
        );
        r.publish(5, &e);
        // Holder bits of absent peer slot 3.
        r.object(
            6,
            5,
            Some("stray"),
            r.heap(4),
            4096,
            false,
            holder_bit(1) | holder_bit(3),
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
            LEASE_KEEP | holder_bit(1),
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
            holder_bit(1),
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
            LEASE_CLOSED | holder_bit(1),
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
        // Peer 5 is flipping its bit on "pair".
        r.cell(0, 2, refcell::REF_LOCK);
        // Peer 7 has posted request 3 (CREATE), answered up to 2.
        let mb = r.layout.mailbox(1).expect("mailbox");
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
            holder_bit(0),
            &[],
        );
        let report = inspect_region_file(&r, &dir);
        assert!(report.ok, "{:#?}", report.findings);
        assert_eq!(report.errors + report.warnings, 0, "{:#?}", report.findings);
        let n = Severity::Note;
        assert_has(&report, n, "object slot 5", "awaiting reap");
        assert_has(&report, n, "object slot 2", "transition in progress");
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
        let base = r.layout.object_entry(2).expect("slot");
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
        let view = ReadOnlyRegion { map: &map };
        let lease = r.layout.object_entry(9).expect("slot") + OBJ_LEASE_OFF;
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
}
