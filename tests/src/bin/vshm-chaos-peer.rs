//! One honest peer of the chaos and load tests (`tests/tests/chaos.rs`): a separate process,
//! so the test can SIGKILL it at any instruction. Until its deadline it does mixed
//! operations against one vshmd and checks every byte it owns:
//!
//! * sections of its own (`own-PID-N`, unique): create, fill with a tag only it writes,
//!   grow (filling the new part), verify, delete, close;
//! * shared names (`sh0`..`sh7`, non-persistent): create-or-open, open, duplicate, close,
//!   delete — racing every other peer;
//! * the event `tick` (signal, short wait), the mutex `lock` (lock, bump the counter in
//!   section `counter`, unlock) and owner-tagged blocks in section `pool` (tagged like its
//!   sections, verified before each free) — all four made persistent by the test.
//!
//! Usage: `vshm-chaos-peer SOCKET SEED MILLIS [no-blocks]` (`no-blocks`: block operations
//! become shared-name operations; see tests/tests/scribbled_blocks.rs for why). Prints one line last:
//! `done ops=N secs=S errors=KEY:n,...` (and on stderr, the first failure of each kind:
//! `first KEY in OPERATION: ERROR`) where KEY is the failure's status name (or the
//! library error's kind for errors without a status of their own). Exit 0 when the run
//! ended; 3 if any of its own bytes read back wrong (another party wrote them: the test
//! fails); 4 if it lost its connection or was detached (it printed its line first); 1 if it
//! could not start.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vshm::blocks::{AllocOptions, Block};
use vshm::host::HostTransport;
use vshm::{CreateOptions, Error, Namespace, Section, Status};
use vshm_tests::XorShift;

/// Own sections held at once, at most.
const MAX_OWN: usize = 4;
/// Shared handles held at once, at most.
const MAX_SHARED: usize = 8;
/// Blocks held at once, at most.
const MAX_BLOCKS: usize = 16;
/// Shared names every peer races on.
const SHARED: [&str; 8] = ["sh0", "sh1", "sh2", "sh3", "sh4", "sh5", "sh6", "sh7"];

type Ns = Namespace<HostTransport>;

/// Why the run stopped early.
enum Stop {
    /// Own bytes read back wrong: what, where.
    Wrong(String),
    /// The connection is gone (or the peer detached): no later operation can succeed.
    Lost(Error),
}

/// A section only this process writes: its tag fills `[0, len)`. `len` is what this
/// process grew it to and wrote, not the size in the shared entry (a scribbler can change
/// that one; reads past `len` would find zeros, not wrong data).
struct Own<'ns> {
    section: Section<'ns, HostTransport>,
    name: String,
    tag: u64,
    len: u64,
}

/// The key a failure is counted under: the status name, else the error's kind.
fn key(e: &Error) -> String {
    match e {
        Error::Status(s) | Error::Refused { status: s, .. } => s.name().to_owned(),
        Error::Transport(_) => "Transport".into(),
        Error::Region(_) => "Region".into(),
        Error::Timeout(_) => "ReplyTimeout".into(),
        Error::LockTimeout { .. } => "LockTimeout".into(),
        Error::BadResponse(..) => "BadResponse".into(),
        Error::Contended => "Contended".into(),
        Error::Detached => "Detached".into(),
        Error::MailboxBusy(_) => "MailboxBusy".into(),
        Error::Fault(_) => "Fault".into(),
        Error::Entry(_) => "Entry".into(),
        // The error enum is non-exhaustive for callers outside the crate.
        #[allow(unreachable_patterns)]
        _ => "Other".into(),
    }
}

/// `len` bytes of the repeated little-endian `tag`, starting at byte `from` of the pattern.
fn pattern(tag: u64, from: u64, len: usize) -> Vec<u8> {
    let t = tag.to_le_bytes();
    (0..len as u64)
        .map(|i| t[usize::try_from((from + i) % 8).unwrap_or(0)])
        .collect()
}

/// Reads `[at, at+len)` of a section and compares it with the tag's pattern.
fn verify(
    s: &Section<'_, HostTransport>,
    what: &str,
    tag: u64,
    at: u64,
    len: u64,
) -> Result<Result<(), Stop>, Error> {
    let len = usize::try_from(len).unwrap_or(0);
    let mut buf = vec![0u8; len];
    s.read_at(at, &mut buf)?;
    let want = pattern(tag, at, len);
    if let Some(i) = buf.iter().zip(&want).position(|(a, b)| a != b) {
        return Ok(Err(Stop::Wrong(format!(
            "{what} (tag {tag:#x}): byte {} is {:#04x}, wrote {:#04x}",
            at + i as u64,
            buf[i],
            want[i]
        ))));
    }
    Ok(Ok(()))
}

/// Is this the end of the connection (nothing later can succeed)?
fn lost(e: &Error) -> bool {
    matches!(e, Error::Detached | Error::Transport(_))
}

struct Peer<'ns> {
    ns: &'ns Ns,
    rng: XorShift,
    pid: u32,
    next: u64,
    own: Vec<Own<'ns>>,
    shared: Vec<Section<'ns, HostTransport>>,
    blocks: Vec<(Block, u64)>,
    use_blocks: bool,
    errors: BTreeMap<String, u64>,
    /// The operation running (for the first failure of each kind).
    op: &'static str,
}

/// The operation each value of `step`'s draw stands for.
const OPS: [&str; 20] = [
    "create own",
    "create own",
    "create own",
    "grow own",
    "verify own",
    "verify own",
    "close own",
    "create shared",
    "open shared",
    "close shared",
    "delete shared",
    "duplicate shared",
    "signal",
    "wait",
    "lock",
    "lock",
    "allocate",
    "allocate",
    "free",
    "free",
];

impl<'ns> Peer<'ns> {
    /// One random operation. `Ok(Err(stop))` ends the run.
    fn step(
        &mut self,
        pool: &Section<'ns, HostTransport>,
        counter: &Section<'ns, HostTransport>,
        tick: &vshm::Event<'ns, HostTransport>,
        lock: &vshm::Mutex<'ns, HostTransport>,
    ) -> Result<Result<(), Stop>, Error> {
        let mut op = self.rng.below(20);
        if op >= 16 && !self.use_blocks {
            op -= 9; // 7..=10: the shared-name operations
        }
        self.op = OPS[usize::try_from(op).unwrap_or(0)];
        match op {
            0..=2 => self.create_own(),
            3 => self.grow_own(),
            4 | 5 => self.verify_own(),
            6 => self.drop_own(),
            7 => {
                let name = SHARED[self.rng.index(SHARED.len())];
                let opts = CreateOptions {
                    max_size: 16 << 10,
                    initial_size: 4096,
                    persistent: false,
                };
                let (s, _) = self.ns.create(Some(name), &opts)?;
                self.keep_shared(s);
                Ok(Ok(()))
            }
            8 => {
                let s = self.ns.open(SHARED[self.rng.index(SHARED.len())])?;
                self.keep_shared(s);
                Ok(Ok(()))
            }
            9 => {
                if !self.shared.is_empty() {
                    let i = self.rng.index(self.shared.len());
                    self.shared.swap_remove(i).close()?;
                }
                Ok(Ok(()))
            }
            10 => {
                self.ns.delete(SHARED[self.rng.index(SHARED.len())])?;
                Ok(Ok(()))
            }
            11 => {
                if !self.shared.is_empty() {
                    let i = self.rng.index(self.shared.len());
                    let d = self.shared[i].duplicate()?;
                    self.keep_shared(d);
                }
                Ok(Ok(()))
            }
            12 => tick.signal().map(Ok),
            13 => match tick.wait(Some(Duration::from_millis(10))) {
                Err(Error::Status(Status::Timeout)) => Ok(Ok(())),
                other => other.map(Ok),
            },
            14 | 15 => {
                lock.lock(Some(Duration::from_secs(2)))?;
                let mut v = [0u8; 8];
                let bumped = counter.read_at(0, &mut v).and_then(|()| {
                    let next = u64::from_le_bytes(v).wrapping_add(1);
                    counter.write_at(0, &next.to_le_bytes())
                });
                // Unlock even if the bump failed, then report the first failure.
                let unlocked = lock.unlock();
                bumped.and(unlocked).map(Ok)
            }
            16 | 17 => {
                if self.blocks.len() >= MAX_BLOCKS {
                    return self.free_block(pool);
                }
                let size = 16 + self.rng.below(2000);
                let b = pool.allocate_with(size, 16, AllocOptions { owned: true })?;
                let tag = self.tag();
                let len = usize::try_from(b.size.min(256)).unwrap_or(0);
                pool.write_at(b.offset, &pattern(tag, b.offset, len))?;
                self.blocks.push((b, tag));
                Ok(Ok(()))
            }
            _ => self.free_block(pool),
        }
    }

    fn tag(&mut self) -> u64 {
        self.next += 1;
        (u64::from(self.pid) << 32) | self.next
    }

    fn keep_shared(&mut self, s: Section<'ns, HostTransport>) {
        if self.shared.len() >= MAX_SHARED {
            let i = self.rng.index(self.shared.len());
            // Over the cap: close one at random instead (a failed close is counted next time
            // the library meets it; it cannot be retried on a consumed handle).
            if let Err(e) = self.shared.swap_remove(i).close() {
                *self.errors.entry(key(&e)).or_default() += 1;
            }
        }
        self.shared.push(s);
    }

    fn create_own(&mut self) -> Result<Result<(), Stop>, Error> {
        if self.own.len() >= MAX_OWN {
            return self.drop_own();
        }
        let tag = self.tag();
        let name = format!("own-{}-{}", self.pid, tag & 0xFFFF_FFFF);
        let max = 4096 * (1 + self.rng.below(16));
        let opts = CreateOptions {
            max_size: max,
            initial_size: 4096,
            persistent: false,
        };
        let (section, _) = self.ns.create(Some(&name), &opts)?;
        section.write_at(0, &pattern(tag, 0, 4096))?;
        self.own.push(Own {
            section,
            name,
            tag,
            len: 4096,
        });
        Ok(Ok(()))
    }

    fn grow_own(&mut self) -> Result<Result<(), Stop>, Error> {
        let Some(o) = self.pick_own() else {
            return Ok(Ok(()));
        };
        let o = &mut self.own[o];
        let old = o.len;
        let new = (old + 4096).min(o.section.max_size());
        if new > old {
            o.section.grow(new)?;
            let len = usize::try_from(new - old).unwrap_or(0);
            o.section.write_at(old, &pattern(o.tag, old, len))?;
            o.len = new;
        }
        Ok(Ok(()))
    }

    fn verify_own(&mut self) -> Result<Result<(), Stop>, Error> {
        let Some(i) = self.pick_own() else {
            return Ok(Ok(()));
        };
        let o = &self.own[i];
        verify(&o.section, &o.name, o.tag, 0, o.len)
    }

    /// Verifies one own section, then deletes or just closes it.
    fn drop_own(&mut self) -> Result<Result<(), Stop>, Error> {
        let Some(i) = self.pick_own() else {
            return Ok(Ok(()));
        };
        let o = self.own.swap_remove(i);
        let checked = verify(&o.section, &o.name, o.tag, 0, o.len);
        let deleted = if self.rng.below(2) == 0 {
            o.section.delete()
        } else {
            Ok(())
        };
        let closed = o.section.close();
        let checked = checked?;
        deleted.and(closed)?;
        Ok(checked)
    }

    fn pick_own(&mut self) -> Option<usize> {
        (!self.own.is_empty()).then(|| self.rng.index(self.own.len()))
    }

    fn free_block(
        &mut self,
        pool: &Section<'ns, HostTransport>,
    ) -> Result<Result<(), Stop>, Error> {
        if self.blocks.is_empty() {
            return Ok(Ok(()));
        }
        let i = self.rng.index(self.blocks.len());
        let (b, tag) = self.blocks.swap_remove(i);
        let checked = verify(pool, "block in pool", tag, b.offset, b.size.min(256));
        let freed = pool.free(b);
        let checked = checked?;
        freed?;
        Ok(checked)
    }

    /// Verifies and releases everything still held; the first wrong byte wins.
    fn finish(&mut self, pool: &Section<'ns, HostTransport>) -> Result<(), Stop> {
        while !self.own.is_empty() {
            self.count(|p| p.drop_own())?;
        }
        while !self.blocks.is_empty() {
            self.count(|p| p.free_block(pool))?;
        }
        for s in self.shared.drain(..) {
            if let Err(e) = s.close() {
                *self.errors.entry(key(&e)).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Runs one operation, counting its failure; stops on wrong data or a lost connection.
    fn count(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<Result<(), Stop>, Error>,
    ) -> Result<(), Stop> {
        match op(self) {
            Ok(r) => r,
            Err(e) => {
                let n = self.errors.entry(key(&e)).or_default();
                if *n == 0 {
                    // The first of each kind, with the operation, for the test's report.
                    eprintln!("first {} in {}: {e}", key(&e), self.op);
                }
                *n += 1;
                if lost(&e) {
                    Err(Stop::Lost(e))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// `open` until it succeeds or 1 s has passed (four heal periods); the last result.
fn settled<T>(mut open: impl FnMut() -> Result<T, vshm::Error>) -> Result<T, vshm::Error> {
    let start = Instant::now();
    loop {
        match open() {
            Err(_) if start.elapsed() < Duration::from_secs(1) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn run(socket: &Path, seed: u64, millis: u64, use_blocks: bool) -> Result<ExitCode, String> {
    let started = Instant::now();
    let t = HostTransport::connect(socket).map_err(|e| format!("connect: {e}"))?;
    let ns = Namespace::attach(t).map_err(|e| format!("attach: {e}"))?;
    // The shared objects exist for the whole run, but a scribbler may have spoiled one's
    // entry for the moment (vshmd heals it within 200 ms): look again for a while.
    let pool = settled(|| ns.open("pool")).map_err(|e| format!("open pool: {e}"))?;
    let counter = settled(|| ns.open("counter")).map_err(|e| format!("open counter: {e}"))?;
    let tick = settled(|| ns.open_event("tick")).map_err(|e| format!("open tick: {e}"))?;
    let lock = settled(|| ns.open_mutex("lock")).map_err(|e| format!("open lock: {e}"))?;
    let mut p = Peer {
        ns: &ns,
        rng: XorShift(seed | 1),
        pid: std::process::id(),
        next: 0,
        own: Vec::new(),
        shared: Vec::new(),
        blocks: Vec::new(),
        use_blocks,
        errors: BTreeMap::new(),
        op: "attach",
    };
    let end = started + Duration::from_millis(millis);
    let mut ops = 0u64;
    let mut outcome = Ok(());
    while outcome.is_ok() && Instant::now() < end {
        ops += 1;
        outcome = p.count(|p| p.step(&pool, &counter, &tick, &lock));
    }
    if outcome.is_ok() {
        p.op = "final release";
        outcome = p.finish(&pool);
    }
    let errors: Vec<String> = p.errors.iter().map(|(k, n)| format!("{k}:{n}")).collect();
    println!(
        "done ops={ops} secs={:.3} errors={}",
        started.elapsed().as_secs_f64(),
        errors.join(",")
    );
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(Stop::Wrong(w)) => {
            eprintln!("vshm-chaos-peer: WRONG DATA: {w}");
            Ok(ExitCode::from(3))
        }
        Err(Stop::Lost(e)) => {
            eprintln!("vshm-chaos-peer: lost the namespace: {e}");
            Ok(ExitCode::from(4))
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (Some(socket), Some(seed), Some(millis)) = (
        args.get(1),
        args.get(2).and_then(|s| s.parse().ok()),
        args.get(3).and_then(|s| s.parse().ok()),
    ) else {
        eprintln!("usage: vshm-chaos-peer SOCKET SEED MILLIS [no-blocks]");
        return ExitCode::from(2);
    };
    let use_blocks = args.get(4).map(String::as_str) != Some("no-blocks");
    match run(Path::new(socket), seed, millis, use_blocks) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vshm-chaos-peer: {e}");
            ExitCode::FAILURE
        }
    }
}
