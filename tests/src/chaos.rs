//! Building blocks of the chaos and load tests (`tests/tests/chaos.rs`): how long to run
//! (`VSHM_CHAOS`), a crew of `vshm-chaos-peer` processes that can be SIGKILLed at random,
//! the tally of what they did and saw, a header scribbler, the leak check every scenario
//! ends with, and the summary row each scenario reports.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Child, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value;
use vshm::host::HostTransport;
use vshm::{CreateOptions, EventOptions, Namespace, Transport};
use vshm_format::layout::{object_state, ObjectEntry, OBJ_LEASE_OFF, OBJ_RESERVED_OFF};
use vshm_format::shm::SharedMemory;
use vshm_format::{ObjectSlot, PeerId, PeerSlot};

use crate::{bin, command, wait_for, Backend, XorShift};

/// The two lengths of every scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Bounded for CI (the default).
    Short,
    /// `VSHM_CHAOS=long`: the runs docs/RELIABILITY.md reports.
    Long,
}

impl Length {
    /// From `VSHM_CHAOS` (`long`, anything else or unset: short).
    pub fn from_env() -> Length {
        match std::env::var("VSHM_CHAOS").as_deref() {
            Ok("long") => Length::Long,
            _ => Length::Short,
        }
    }

    /// `short` or `long`, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Length::Short => "short",
            Length::Long => "long",
        }
    }

    /// `short` in CI, `long` otherwise.
    pub fn pick<T>(self, short: T, long: T) -> T {
        match self {
            Length::Short => short,
            Length::Long => long,
        }
    }
}

/// What a crew's processes did and saw, summed.
#[derive(Debug, Default)]
pub struct Tally {
    /// Operations attempted by runs that reported (killed runs do not).
    pub ops: u64,
    /// Runs that ended and reported.
    pub runs: u64,
    /// Runs ended by SIGKILL.
    pub kills: u64,
    /// Failed operations by status name (or library error kind).
    pub errors: BTreeMap<String, u64>,
    /// Own bytes that read back wrong (exit 3), with the peer's words.
    pub wrong: Vec<String>,
    /// Runs that lost their connection or were detached (exit 4).
    pub lost: Vec<String>,
    /// Runs that failed otherwise (could not start, crashed, bad output).
    pub broken: Vec<String>,
    /// The first failure of each kind a run reported (`first KEY in OP: ERROR`), by kind.
    pub firsts: BTreeMap<String, String>,
}

impl Tally {
    /// Adds one finished run's output (`done ops=N secs=S errors=K:n,...`).
    fn add_output(&mut self, out: &std::process::Output) {
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        for line in err.lines() {
            if let Some((k, _)) = line.strip_prefix("first ").and_then(|r| r.split_once(' ')) {
                self.firsts
                    .entry(k.to_owned())
                    .or_insert_with(|| line.to_owned());
            }
        }
        match out.status.code() {
            Some(0) | Some(3) | Some(4) => {}
            _ => {
                self.broken.push(format!("exit {}: {err}", out.status));
                return;
            }
        }
        let Some(line) = text.lines().rev().find(|l| l.starts_with("done ")) else {
            self.broken
                .push(format!("no summary line ({}): {err}", out.status));
            return;
        };
        self.runs += 1;
        for field in line.split_whitespace() {
            if let Some(n) = field.strip_prefix("ops=") {
                self.ops += n.parse::<u64>().unwrap_or(0);
            } else if let Some(list) = field.strip_prefix("errors=") {
                for pair in list.split(',').filter(|p| !p.is_empty()) {
                    let (k, n) = pair.rsplit_once(':').unwrap_or((pair, "0"));
                    *self.errors.entry(k.to_owned()).or_default() += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
        match out.status.code() {
            Some(3) => self.wrong.push(err),
            Some(4) => self.lost.push(err),
            _ => {}
        }
    }

    /// Failure kinds seen that are not in `expected`, with their counts.
    pub fn unexpected(&self, expected: &[&str]) -> Vec<(String, u64)> {
        self.errors
            .iter()
            .filter(|(k, _)| !expected.contains(&k.as_str()))
            .map(|(k, n)| (k.clone(), *n))
            .collect()
    }

    /// `K n, K n` (or `none`).
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        let parts: Vec<String> = self
            .errors
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        parts.join(", ")
    }

    /// Fails the test on wrong data, lost connections, broken runs or unexpected failures.
    pub fn assert_honest(&self, expected: &[&str]) {
        assert!(
            self.wrong.is_empty(),
            "honest peers read wrong data: {:?}",
            self.wrong
        );
        assert!(
            self.lost.is_empty(),
            "honest peers lost their namespace: {:?}",
            self.lost
        );
        assert!(
            self.broken.is_empty(),
            "peer runs failed: {:?}",
            self.broken
        );
        let unexpected = self.unexpected(expected);
        let first: Vec<&String> = unexpected
            .iter()
            .filter_map(|(k, _)| self.firsts.get(k))
            .collect();
        assert!(
            unexpected.is_empty(),
            "failures outside {expected:?}: {unexpected:?} (first: {first:?}; all: {:?})",
            self.errors
        );
    }
}

/// Failures a racing honest peer may legitimately see: a shared name someone else deleted
/// or is deleting, a full table/heap/pool, a mutex or event wait that timed out, a race lost
/// too often.
pub const RACING: &[&str] = &[
    "STATUS_OBJECT_NAME_NOT_FOUND",
    "STATUS_DELETE_PENDING",
    "STATUS_INSUFFICIENT_RESOURCES",
    "STATUS_NO_MEMORY",
    "STATUS_TIMEOUT",
    "Contended",
];

/// `vshm-chaos-peer` processes against one vshmd.
#[derive(Debug)]
pub struct Crew {
    socket: std::path::PathBuf,
    children: Vec<Child>,
    rng: XorShift,
    blocks: bool,
    /// What the finished and killed runs add up to.
    pub tally: Tally,
}

impl Crew {
    /// An empty crew for `b`; `seed` fixes every run's seed and every random choice.
    pub fn new(b: &Backend, seed: u64) -> Crew {
        Crew::on_socket(b.socket.clone(), seed)
    }

    /// An empty crew for the vshmd serving `socket`.
    pub fn on_socket(socket: std::path::PathBuf, seed: u64) -> Crew {
        Crew {
            socket,
            children: Vec::new(),
            rng: XorShift(seed | 1),
            blocks: true,
            tally: Tally::default(),
        }
    }

    /// Runs started from now on do no block operations (`vshm-chaos-peer ... no-blocks`).
    pub fn without_blocks(mut self) -> Crew {
        self.blocks = false;
        self
    }

    /// The crew's random generator (for the chaos loop's choices).
    pub fn rng(&mut self) -> &mut XorShift {
        &mut self.rng
    }

    /// Processes running (or finished but not reaped yet).
    pub fn len(&self) -> usize {
        self.children.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Starts one run of `millis` milliseconds.
    pub fn spawn(&mut self, millis: u64) {
        let seed = self.rng.next_u64();
        let child = command(&bin("vshm-chaos-peer"))
            .arg(&self.socket)
            .arg(seed.to_string())
            .arg(millis.to_string())
            .args((!self.blocks).then_some("no-blocks"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vshm-chaos-peer");
        self.children.push(child);
    }

    /// Collects the runs that ended on their own; returns how many.
    pub fn reap(&mut self) -> usize {
        let mut done = 0;
        let mut i = 0;
        while i < self.children.len() {
            if matches!(self.children[i].try_wait(), Ok(Some(_))) {
                let child = self.children.swap_remove(i);
                let out = child.wait_with_output().expect("collect a peer's output");
                self.tally.add_output(&out);
                done += 1;
            } else {
                i += 1;
            }
        }
        done
    }

    /// SIGKILLs one running process chosen at random; false if none was running (the
    /// chosen one had just ended on its own: it is collected instead).
    pub fn kill_random(&mut self) -> bool {
        if self.children.is_empty() {
            return false;
        }
        let i = self.rng.index(self.children.len());
        let mut child = self.children.swap_remove(i);
        let _ = child.kill();
        let out = child.wait_with_output().expect("reap a killed peer");
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() == Some(libc::SIGKILL) {
            self.tally.kills += 1;
            true
        } else {
            self.tally.add_output(&out);
            false
        }
    }

    /// Waits (polling, so a hang is the watchdog's) until every run has ended by itself.
    pub fn wait_all(&mut self) {
        while !self.children.is_empty() {
            self.reap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Crew {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Keeps `n` peer runs of 0.5–3 s going on a thread of its own until `stop` is set, then
/// lets them finish; the thread returns the tally. (Its children die with that thread, which
/// outlives them.)
pub fn background_crew(
    mut crew: Crew,
    n: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Tally> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            crew.reap();
            while crew.len() < n {
                let ms = 500 + crew.rng().below(2500);
                crew.spawn(ms);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        crew.wait_all();
        std::mem::take(&mut crew.tally)
    })
}

/// Creates the persistent objects every `vshm-chaos-peer` opens: section `pool` (blocks),
/// section `counter`, event `tick`, mutex `lock`. The creating peer disconnects.
pub fn create_shared_objects(b: &Backend) {
    create_shared_objects_in(&b.connect());
}

/// [`create_shared_objects`] through `ns` (which may stay connected).
pub fn create_shared_objects_in(ns: &vshm::Namespace<vshm::host::HostTransport>) {
    let keep = |max| CreateOptions {
        max_size: max,
        initial_size: 64 << 10,
        persistent: true,
    };
    ns.create(Some("pool"), &keep(4 << 20)).expect("pool");
    ns.create(Some("counter"), &keep(64 << 10))
        .expect("counter");
    let opts = EventOptions {
        manual_reset: false,
        persistent: true,
    };
    ns.create_event(Some("tick"), &opts).expect("tick");
    ns.create_mutex(Some("lock"), true).expect("lock");
}

/// What the leak check found (every figure must be 0 or it failed already), and the
/// daemon's counters at the end.
#[derive(Debug)]
pub struct Leaks {
    /// vshmd's counters at the end.
    pub counters: Value,
    /// Problems `vshmctl inspect` reported as warnings (errors fail the check).
    pub inspect_warnings: u64,
}

/// The check every scenario ends with, once all its peers are gone: vshmd still runs; the
/// mutex is free and the pool's allocator whole (dead peers' blocks reclaimed); after the
/// persistent objects are deleted, no object, no connected peer, no reserved heap byte and
/// one free extent are left; `vshmctl inspect` finds no error in the region.
pub fn assert_no_leaks(b: &mut Backend) -> Leaks {
    assert!(
        b.exited().is_none(),
        "vshmd died during the run: {:?}",
        b.exited()
    );
    let ns = b.connect();
    let lock = b.section("lock").expect("lock in status");
    assert!(lock["owner"].is_null(), "mutex still owned: {lock}");
    assert_eq!(lock["queued"], 0, "peers still queued on the mutex: {lock}");
    let pool = ns.open("pool").expect("open pool");
    // An allocator operation reclaims blocks tagged by dead peers once they have looked
    // gone for two heal periods (a scribbled peer table must not free a live peer's).
    let reclaimed = || {
        let blk = pool
            .allocate_with(64, 16, vshm::blocks::AllocOptions { owned: true })
            .expect("allocate after the run");
        pool.free(blk).expect("free");
        pool.block_stats()
            .expect("block stats")
            .is_some_and(|st| (st.in_use, st.count) == (0, 0))
    };
    let _ = crate::wait_for(Duration::from_secs(5), reclaimed);
    let stats = pool
        .block_stats()
        .expect("block stats")
        .expect("pool has an allocator");
    assert_eq!(
        (stats.in_use, stats.count),
        (0, 0),
        "every block freed or reclaimed: {stats:?}"
    );
    drop(pool);
    for name in ["pool", "counter", "tick", "lock"] {
        ns.delete(name)
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }
    drop(ns);
    let heap = b.status()["region"]["heap_size"]
        .as_u64()
        .expect("heap size");
    let clean = |st: &Value| {
        st["sections"].as_array().is_some_and(Vec::is_empty)
            && st["peers"]
                .as_array()
                .is_some_and(|p| p.iter().all(|p| p["connected"] == false))
            && st["region"]["free"].as_u64() == Some(heap)
            && st["region"]["free_extents"].as_u64() == Some(1)
    };
    assert!(
        wait_for(Duration::from_secs(10), || clean(&b.status())),
        "objects, peers or heap bytes leaked: {}",
        b.status()
    );
    let out = b.vshmctl(&["inspect", "--json", "--memfd", &b.memfd_path()]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspect --json: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && report["ok"] == true && report["errors"] == 0,
        "vshmctl inspect found problems: {report}"
    );
    assert_eq!(
        report["heap"]["objects"], 0,
        "inspect sees no object: {report}"
    );
    let st = b.status();
    assert!(b.exited().is_none(), "vshmd died at the end of the run");
    Leaks {
        counters: st["counters"].clone(),
        inspect_warnings: report["warnings"].as_u64().unwrap_or(0),
    }
}

/// Which parts of the region the scribbler writes. The host-written header parts are healed
/// by vshmd (FORMAT.md §11); the peer-written words of other peers (lease and sync words of
/// live objects, other peers' refcount cells) are an open attack until freed memory is
/// quarantined (issue 9: "a destroy that no honest close explains"), so they are a separate
/// switch, off in [`Targets::HEALED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Targets {
    /// The superblock (256 bytes).
    pub superblock: bool,
    /// Any peer-table entry, connected or not.
    pub peer_table: bool,
    /// Host-written bytes of LIVE and UNLINKED entries: head (seqlock, generation, state,
    /// kind, offset, sizes, flags, name length and hash, creator), reserved bytes, name.
    pub live_entries: bool,
    /// The same bytes of FREE entries (anything but the canonical FREE image is erased).
    pub free_entries: bool,
    /// The scribbler's own refcount row and mailbox (then a doorbell now and then).
    pub own_rows: bool,
    /// Lease and sync words of any entry and other peers' refcount cells.
    pub peer_words: bool,
}

impl Targets {
    /// Everything vshmd heals, plus the scribbler's own peer-writable memory.
    pub const HEALED: Targets = Targets {
        superblock: true,
        peer_table: true,
        live_entries: true,
        free_entries: true,
        own_rows: true,
        peer_words: false,
    };
}

/// A hostile peer: attached like any other, it writes random bytes over the header.
#[allow(missing_debug_implementations)] // holds a Namespace, which has no Debug
pub struct Scribbler {
    ns: Namespace<HostTransport>,
    own: PeerSlot,
    rng: XorShift,
    targets: Targets,
    /// Scribbles done, by target.
    pub counts: BTreeMap<&'static str, u64>,
}

impl Scribbler {
    /// Attaches to `b`.
    pub fn attach(b: &Backend, seed: u64, targets: Targets) -> Scribbler {
        let ns = b.connect();
        let me = ns.peer_id();
        let own = ns
            .peers()
            .find(|p| p.peer_id == me)
            .map(|p| p.slot)
            .expect("the scribbler's own peer slot");
        Scribbler {
            ns,
            own,
            rng: XorShift(seed | 1),
            targets,
            counts: BTreeMap::new(),
        }
    }

    /// Scribbles done in all.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    fn junk(&mut self, len: u64) -> Vec<u8> {
        (0..len)
            .map(|_| self.rng.next_u64().to_le_bytes()[0])
            .collect()
    }

    /// `len` random bytes at a random place inside `[start, start + span)`.
    fn scribble_in(&mut self, start: u64, span: u64, max_len: u64) {
        let len = 1 + self.rng.below(max_len.min(span));
        let at = start + self.rng.below(span - len + 1);
        let junk = self.junk(len);
        // A write can only fail out of bounds, which the ranges above never are.
        self.ns
            .transport()
            .region()
            .write_bytes(at, &junk)
            .expect("scribble inside the region");
    }

    /// Host-written bytes of object entry `slot`: its head, its reserved bytes, or its
    /// name's bytes in the name area (FORMAT.md §5b; the head's reference, if sane).
    fn scribble_entry(&mut self, slot: ObjectSlot) {
        let l = *self.ns.layout();
        let base = l.object_entry(slot).expect("slot in the table");
        match self.rng.below(3) {
            0 => self.scribble_in(base, OBJ_LEASE_OFF, 64),
            1 => {
                // Bytes 104..128: the reserved bytes after the sync words.
                let size = std::mem::size_of::<ObjectEntry>() as u64;
                self.scribble_in(base + OBJ_RESERVED_OFF, size - OBJ_RESERVED_OFF, 64);
            }
            _ => {
                let mem = self.ns.transport().region();
                let name = vshm_format::object::snapshot(&mem, &l, slot, false)
                    .ok()
                    .and_then(|e| {
                        let at = vshm_format::object::check_name_ref(&l, e.name_off, e.name_len);
                        Some((at.ok()??, u64::from(e.name_len)))
                    });
                match name {
                    Some((at, len)) => self.scribble_in(at, len, 64),
                    None if l.name_area_size > 0 => {
                        self.scribble_in(l.name_area, l.name_area_size, 64);
                    }
                    None => self.scribble_in(base, OBJ_LEASE_OFF, 64),
                }
            }
        }
    }

    /// An object slot in `state` class (`live`: LIVE or UNLINKED), if any, at random.
    fn pick_slot(&mut self, live: bool) -> Option<ObjectSlot> {
        let l = *self.ns.layout();
        let mem = self.ns.transport().region();
        let slots: Vec<ObjectSlot> = (0..l.max_objects)
            .map(ObjectSlot)
            .filter(|s| {
                let st = vshm_format::object::state(&mem, &l, *s).unwrap_or(object_state::FREE);
                (st != object_state::FREE) == live
            })
            .collect();
        (!slots.is_empty()).then(|| slots[self.rng.index(slots.len())])
    }

    /// One scribble on one enabled target chosen at random.
    pub fn scribble(&mut self) {
        let t = self.targets;
        let mut enabled: Vec<&'static str> = Vec::new();
        for (on, name) in [
            (t.superblock, "superblock"),
            (t.peer_table, "peer table"),
            (t.live_entries, "live entry"),
            (t.free_entries, "free entry"),
            (t.own_rows, "own row"),
            (t.peer_words, "peer word"),
        ] {
            if on {
                enabled.push(name);
            }
        }
        if enabled.is_empty() {
            return;
        }
        let target = enabled[self.rng.index(enabled.len())];
        let l = *self.ns.layout();
        match target {
            "superblock" => self.scribble_in(0, 256, 64),
            "peer table" => {
                let slot =
                    PeerSlot(u32::try_from(self.rng.below(u64::from(l.max_peers))).unwrap_or(0));
                let base = l.peer_entry(slot).expect("peer slot");
                self.scribble_in(base, 64, 64);
            }
            "live entry" => match self.pick_slot(true) {
                Some(s) => self.scribble_entry(s),
                None => return,
            },
            "free entry" => match self.pick_slot(false) {
                Some(s) => self.scribble_entry(s),
                None => return,
            },
            "own row" => {
                if self.rng.below(2) == 0 {
                    let row = l
                        .refcount_cell(self.own, ObjectSlot(0))
                        .expect("own refcount row");
                    self.scribble_in(row, u64::from(l.refcount_row_size), 64);
                } else {
                    let mb = l.mailbox(self.own).expect("own mailbox");
                    self.scribble_in(mb, 1280, 64);
                    // vshmd reads the mailbox only when rung.
                    let _ = self.ns.transport().ring(PeerId::HOST, 0);
                }
            }
            _ => {
                if self.rng.below(2) == 0 {
                    let Some(s) = self.pick_slot(true) else {
                        return;
                    };
                    let base = l.object_entry(s).expect("slot");
                    let word = OBJ_LEASE_OFF + 8 * self.rng.below(5);
                    let v = self.rng.next_u64();
                    let _ =
                        self.ns
                            .transport()
                            .region()
                            .store_u64(base + word, v, Ordering::SeqCst);
                } else {
                    let peer = PeerSlot(
                        u32::try_from(self.rng.below(u64::from(l.max_peers))).unwrap_or(0),
                    );
                    let row = l.refcount_cell(peer, ObjectSlot(0)).expect("row");
                    self.scribble_in(row, u64::from(l.refcount_row_size), 16);
                }
            }
        }
        *self.counts.entry(target).or_default() += 1;
    }

    /// `target n, target n`.
    pub fn counts_text(&self) -> String {
        let parts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        parts.join(", ")
    }
}

/// One scenario's figures for the summary: printed, and appended as a Markdown table row
/// to the file `VSHM_CHAOS_SUMMARY` names (`cargo xtask chaos` prints it under a header
/// with the same columns: scenario, length, time, kills, peer runs, ops, ops/s, failures by
/// status, notes).
#[derive(Debug, Default)]
pub struct Row {
    /// Scenario name.
    pub scenario: String,
    /// short or long.
    pub length: &'static str,
    /// Wall time of the scenario.
    pub secs: f64,
    /// SIGKILLs.
    pub kills: u64,
    /// Peer runs that ended and reported.
    pub runs: u64,
    /// Operations those runs attempted.
    pub ops: u64,
    /// Failures by status.
    pub failures: String,
    /// Anything else worth a column (scribbles, heals, repairs...).
    pub notes: String,
}

impl Row {
    /// Prints the row and appends it to `VSHM_CHAOS_SUMMARY`, if set.
    pub fn report(&self) {
        let mut line = String::new();
        #[allow(clippy::cast_precision_loss)] // a rate for people
        let rate = if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        };
        let _ = writeln!(
            line,
            "| {} | {} | {:.1} s | {} | {} | {} | {:.0} | {} | {} |",
            self.scenario,
            self.length,
            self.secs,
            self.kills,
            self.runs,
            self.ops,
            rate,
            self.failures,
            self.notes
        );
        print!("chaos: {line}");
        if let Some(path) = std::env::var_os("VSHM_CHAOS_SUMMARY") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("open the chaos summary file");
            f.write_all(line.as_bytes())
                .expect("append to the chaos summary");
        }
    }
}

/// The counters the notes column reports: heals, repairs, reclaims, abandoned mutexes.
pub fn counter_notes(leaks: &Leaks) -> String {
    let c = &leaks.counters;
    format!(
        "heals {}, repairs {}, reclaims {}, abandoned {}; leaks 0 (objects, bytes, peers, blocks), inspect errors 0, warnings {}",
        c["heals"], c["repairs"], c["reclaims"], c["abandoned"], leaks.inspect_warnings
    )
}

/// Time since `t`, in seconds.
pub fn secs_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}
