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
//!
//! This module holds the report types and the command; `map` is the read-only file mapping
//! (a [`vshm_format::shm::RawRegion::read_only`] view, so bounds checking is the format
//! crate's), `walk` reads the tables and `check` cross-checks them, both reporting what the
//! format's validators say is wrong rather than re-checking, and `print` renders the text.
//!
//! [`Layout::from_superblock`]: vshm_format::layout::Layout::from_superblock
//! [`object::validate`]: vshm_format::object::validate

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use vshm_control::superblock::SuperblockSummary;
use vshm_format::layout::{Request, Superblock};

mod check;
mod index;
mod map;
mod print;
#[cfg(test)]
mod tests;
mod walk;

use map::Mapping;
pub use print::print_human;
pub use walk::inspect_region;

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
    /// An event's or mutex's sync words (docs/FORMAT.md §6a); absent for sections.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncRow>,
}

/// The sync words of an event or mutex, as found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncRow {
    /// Changes counted (signals, unlocks).
    pub signals: u64,
    /// Peer slots whose waiter bit is set.
    pub waiter_slots: Vec<u32>,
    /// Event: whether it is signalled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signaled: Option<bool>,
    /// Mutex: the owner's peer slot, if held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_slot: Option<u32>,
    /// Mutex: the owner's thread token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_token: Option<u32>,
    /// Mutex: HANDOFF set (vshmd holds a queue of lockers).
    pub handoff: bool,
    /// Mutex: its last owner died holding it (the next owner is told so).
    pub abandoned: bool,
}

/// What the name index holds (FORMAT.md §5a).
#[derive(Clone, Debug, Serialize)]
pub struct IndexUsage {
    /// Its offset.
    pub offset: u64,
    /// Entries.
    pub slots: u32,
    /// Its sequence word.
    pub seq: u64,
    /// Entries pointing to an object slot.
    pub entries: u32,
    /// Tombstones.
    pub tombstones: u32,
    /// The longest probe a lookup of an indexed name makes (entries read).
    pub longest_probe: u32,
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
    /// The name index (when the superblock is valid).
    pub index: Option<IndexUsage>,
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
            index: None,
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
    let mut report = inspect_region(&map.region());
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
