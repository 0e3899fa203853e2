//! The benchmarks of issue 13, each against its anchor measured in the same run. Every
//! function returns what it measured; nothing here judges a timing (report.rs compares
//! with the goals, and nothing fails on them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vshm::host::HostTransport;
use vshm::{CreateOptions, EventOptions, Namespace};

use crate::harness::{
    attach, measure, measure_pair, spin_until, Context, Counts, Result, Role, Vshmd,
};
use crate::posix;
use crate::stats::{summarize, Summary};

fn sum(mut v: Vec<f64>, what: &str) -> Result<Summary> {
    summarize(&mut v).ok_or_else(|| format!("{what}: no samples"))
}

/// One measured figure against its anchor.
#[derive(Clone, Debug)]
pub struct Pair {
    /// Ours.
    pub ours: Summary,
    /// The anchor.
    pub anchor: Summary,
}

/// P1 and the open-latency scaling series: per table fill level, open+close of an
/// existing section vs shm_open+mmap+munmap+close.
#[derive(Clone, Debug)]
pub struct OpenScaling {
    /// Per level measured: objects in the table, the slot of the section opened, ours vs
    /// anchor, the vshmd options' object count and region size, µs per CREATE while filling.
    pub points: Vec<OpenPoint>,
    /// Levels not measured, and why.
    pub skipped: Vec<(u32, String)>,
}

/// One fill level of [`OpenScaling`].
#[derive(Clone, Debug)]
pub struct OpenPoint {
    /// Objects in the table (the section opened included).
    pub level: u32,
    /// The slot of the section opened.
    pub slot: u32,
    /// Ours vs the anchor.
    pub pair: Pair,
    /// vshmd's `--max-objects`.
    pub max_objects: u32,
    /// vshmd's region size.
    pub region: u64,
    /// The region's header (everything before the heap), bytes.
    pub header: u64,
    /// Mean ns per CREATE while filling the table (None below 2 objects).
    pub fill_create: Option<f64>,
}

/// Starts vshmd for `objects`, the smallest region (64 MiB … 1 GiB) it accepts.
fn vshmd_for_objects(objects: u32) -> Result<(Vshmd, u64)> {
    let mut size: u64 = 64 << 20;
    let mut last = String::new();
    while size <= 1 << 30 {
        let args = [
            "--size".to_owned(),
            format!("{}M", size >> 20),
            "--max-objects".to_owned(),
            objects.to_string(),
        ];
        match Vshmd::start(&args) {
            Ok(d) => return Ok((d, size)),
            Err(e) => last = e,
        }
        size *= 2;
    }
    Err(format!(
        "{objects} objects do not fit a region of at most 1 GiB: {last}"
    ))
}

/// P1: open+close of an existing section at each fill level vs shm_open + mmap + munmap +
/// close of an existing POSIX shm object. Each level gets its own vshmd sized to it
/// (`--max-objects` the next power of two), the table filled with persistent events
/// (every kind of object shares the table and the name lookup; events need no heap), and
/// the section opened created last, so a scan from slot 0 meets every other object first.
/// Filling is arbitrated: a level whose fill would not end within what is left of
/// `fill_budget` (extrapolated from the first CREATEs) is skipped, and says so.
pub fn p1_open(counts: Counts, levels: &[u32], fill_budget: Duration) -> Result<OpenScaling> {
    let anchor = posix::ShmObject::create("p1").ctx("P1 anchor object")?;
    let persistent = EventOptions {
        persistent: true,
        ..EventOptions::default()
    };
    let budget_start = Instant::now();
    let mut points = Vec::new();
    let mut skipped = Vec::new();
    for &level in levels {
        let max_objects = level.max(16).next_power_of_two();
        let (d, region) = match vshmd_for_objects(max_objects) {
            Ok(x) => x,
            Err(e) => {
                skipped.push((level, e));
                continue;
            }
        };
        let ns = d.attach()?;
        let header = ns.layout().heap_offset;
        let t = Instant::now();
        let mut filled: u32 = 0;
        let mut gave_up = None;
        while filled + 1 < level {
            let name = format!("fill/{filled:06}");
            let (ev, _) = ns
                .create_event(Some(&name), &persistent)
                .ctx(format!("P1: fill the table, object {filled}"))?;
            ev.close().ctx("close a fill event")?;
            filled += 1;
            if filled == 64 || filled % 1024 == 0 {
                let per = t.elapsed().as_secs_f64() / f64::from(filled);
                let left = f64::from(level - 1 - filled) * per;
                let budget = fill_budget.saturating_sub(budget_start.elapsed());
                if left > budget.as_secs_f64() {
                    gave_up = Some(format!(
                        "not reached: filling the table costs {:.2} ms per CREATE at --max-objects {max_objects} \
                         ({filled} objects in {:.1} s), the other {} would take ~{left:.0} s, beyond the suite's \
                         fill budget ({} s in all)",
                        per * 1e3,
                        t.elapsed().as_secs_f64(),
                        level - 1 - filled,
                        fill_budget.as_secs()
                    ));
                    break;
                }
            }
        }
        if let Some(why) = gave_up {
            eprintln!("    P1 {level:>6} objects: {why}");
            skipped.push((level, why));
            continue;
        }
        let fill_create = (filled > 0).then(|| t.elapsed().as_secs_f64() * 1e9 / f64::from(filled));
        let (target, _) = ns
            .create(Some("p1/target"), &CreateOptions::new(4096))
            .ctx(format!("P1: create the section to open at {level} objects"))?;
        let slot = target.slot().raw();
        let (ours, theirs) = measure_pair(
            counts,
            1,
            || ns.open("p1/target").ctx("open")?.close().ctx("close"),
            || anchor.open_map_close().ctx("shm_open+mmap+munmap+close"),
        )?;
        eprintln!(
            "    P1 {level:>6} objects (slot {slot}, --max-objects {max_objects}, filled in {:.1}s)",
            t.elapsed().as_secs_f64()
        );
        target.close().ctx("close the P1 section")?;
        points.push(OpenPoint {
            level,
            slot,
            pair: Pair {
                ours: sum(ours, "P1")?,
                anchor: sum(theirs, "P1 anchor")?,
            },
            max_objects,
            region,
            header,
            fill_create,
        });
    }
    Ok(OpenScaling { points, skipped })
}

/// P2: create+close (a CREATE request, then the close that destroys it) of a new 4 KiB
/// section vs shm_open(O_CREAT) + ftruncate + mmap + munmap + close + shm_unlink.
pub fn p2_create(counts: Counts, ns: &Namespace<HostTransport>) -> Result<Pair> {
    let mut i: u64 = 0;
    let mut j: u64 = 0;
    let pid = std::process::id();
    let (ours, theirs) = measure_pair(
        counts,
        1,
        || {
            i += 1;
            let (s, _) = ns
                .create(Some(&format!("p2/{i}")), &CreateOptions::new(4096))
                .ctx("create")?;
            s.close().ctx("close")
        },
        || {
            j += 1;
            posix::create_map_unlink(&format!("/vshm-bench-{pid}-p2-{j}"))
                .ctx("shm_open(O_CREAT)+ftruncate+mmap+munmap+close+shm_unlink")
        },
    )?;
    Ok(Pair {
        ours: sum(ours, "P2")?,
        anchor: sum(theirs, "P2 anchor")?,
    })
}

const PATIENCE: Duration = Duration::from_secs(10);

/// P3, ours: an event round trip between this peer and a peer in another process
/// (signal `p3/ping`, wait `p3/pong`; the role `event-echo` waits and signals back).
pub fn p3_events(counts: Counts, ns: &Namespace<HostTransport>, socket: &str) -> Result<Vec<f64>> {
    let auto = EventOptions::default();
    let (ping, _) = ns
        .create_event(Some("p3/ping"), &auto)
        .ctx("create p3/ping")?;
    let (pong, _) = ns
        .create_event(Some("p3/pong"), &auto)
        .ctx("create p3/pong")?;
    let rounds = counts.warmup + counts.samples;
    let child = Role::spawn("event-echo", &[socket.to_owned(), rounds.to_string()])?;
    let samples = measure(counts, 1, || {
        ping.signal().ctx("signal ping")?;
        pong.wait(Some(PATIENCE)).ctx("wait pong")
    })?;
    child.finish()?;
    ping.close().ctx("close ping")?;
    pong.close().ctx("close pong")?;
    Ok(samples)
}

/// The child half of [`p3_events`].
pub fn event_echo(socket: &str, rounds: usize) -> Result<()> {
    let ns = attach(socket.as_ref())?;
    let ping = ns.open_event("p3/ping").ctx("open p3/ping")?;
    let pong = ns.open_event("p3/pong").ctx("open p3/pong")?;
    crate::harness::say_ready()?;
    for _ in 0..rounds {
        ping.wait(Some(PATIENCE)).ctx("wait ping")?;
        pong.signal().ctx("signal pong")?;
    }
    crate::harness::wait_eof()
}

/// P3's first anchor: eventfd ping-pong between two processes (write one, block in read
/// of the other).
pub fn p3_eventfd(counts: Counts) -> Result<Vec<f64>> {
    let a = posix::Inheritable::eventfd().ctx("eventfd")?;
    let b = posix::Inheritable::eventfd().ctx("eventfd")?;
    let rounds = counts.warmup + counts.samples;
    let child = Role::spawn(
        "eventfd-echo",
        &[a.raw().to_string(), b.raw().to_string(), rounds.to_string()],
    )?;
    let samples = measure(counts, 1, || {
        posix::efd_post(a.raw()).ctx("eventfd write")?;
        posix::efd_take(b.raw()).ctx("eventfd read").map(|_| ())
    })?;
    child.finish()?;
    Ok(samples)
}

/// The child half of [`p3_eventfd`].
pub fn eventfd_echo(a: i32, b: i32, rounds: usize) -> Result<()> {
    crate::harness::say_ready()?;
    for _ in 0..rounds {
        posix::efd_take(a).ctx("eventfd read")?;
        posix::efd_post(b).ctx("eventfd write")?;
    }
    crate::harness::wait_eof()
}

/// The two words of a polling ping-pong, 64 bytes apart (own cache lines).
fn ping_pong_words(base: *mut u8) -> Result<(&'static AtomicU64, &'static AtomicU64)> {
    if base.is_null() || base.align_offset(64) != 0 {
        return Err(format!("ping-pong words at {base:p}: not 64-byte aligned"));
    }
    // SAFETY: the caller's mapping is at least 128 bytes, aligned (checked above), lives
    // until the process exits (the section or memfd is held for the whole run), and the
    // words are only ever accessed atomically.
    unsafe {
        Ok((
            &*base.cast::<AtomicU64>(),
            &*base.add(64).cast::<AtomicU64>(),
        ))
    }
}

fn ping_pong(counts: Counts, ping: &AtomicU64, pong: &AtomicU64) -> Result<Vec<f64>> {
    let mut seq: u64 = 0;
    measure(counts, 1, || {
        seq += 1;
        ping.store(seq, Ordering::Release);
        spin_until(PATIENCE, || pong.load(Ordering::Acquire) == seq)
    })
}

fn echo_words(ping: &AtomicU64, pong: &AtomicU64, rounds: usize) -> Result<()> {
    for seq in 1..=rounds as u64 {
        spin_until(PATIENCE, || ping.load(Ordering::Acquire) == seq)?;
        pong.store(seq, Ordering::Release);
    }
    Ok(())
}

/// P4, ours: a polling ping-pong through two words of a section (`p4/poll`) held by
/// this peer and by a peer in another process (role `section-echo`).
pub fn p4_section(counts: Counts, ns: &Namespace<HostTransport>, socket: &str) -> Result<Vec<f64>> {
    let (s, _) = ns
        .create(Some("p4/poll"), &CreateOptions::new(4096))
        .ctx("create p4/poll")?;
    let (ping, pong) = ping_pong_words(s.as_ptr())?;
    ping.store(0, Ordering::Relaxed);
    pong.store(0, Ordering::Relaxed);
    let rounds = counts.warmup + counts.samples;
    let child = Role::spawn("section-echo", &[socket.to_owned(), rounds.to_string()])?;
    let samples = ping_pong(counts, ping, pong)?;
    child.finish()?;
    s.close().ctx("close p4/poll")?;
    Ok(samples)
}

/// The child half of [`p4_section`].
pub fn section_echo(socket: &str, rounds: usize) -> Result<()> {
    let ns = attach(socket.as_ref())?;
    let s = ns.open("p4/poll").ctx("open p4/poll")?;
    let (ping, pong) = ping_pong_words(s.as_ptr())?;
    crate::harness::say_ready()?;
    echo_words(ping, pong, rounds)?;
    crate::harness::wait_eof()?;
    s.close().ctx("close p4/poll")
}

/// P4's first anchor: the same ping-pong through a plain shared mapping of a memfd.
pub fn p4_raw(counts: Counts) -> Result<Vec<f64>> {
    let fd = posix::Inheritable::memfd().ctx("memfd")?;
    let m = posix::Mapping::new(fd.raw(), posix::PAGE).ctx("mmap memfd")?;
    let (ping, pong) = (m.word(0), m.word(8));
    let rounds = counts.warmup + counts.samples;
    let child = Role::spawn("raw-echo", &[fd.raw().to_string(), rounds.to_string()])?;
    let samples = ping_pong(counts, ping, pong)?;
    child.finish()?;
    Ok(samples)
}

/// The child half of [`p4_raw`].
pub fn raw_echo(fd: i32, rounds: usize) -> Result<()> {
    let m = posix::Mapping::new(fd, posix::PAGE).ctx("mmap memfd")?;
    crate::harness::say_ready()?;
    echo_words(m.word(0), m.word(8), rounds)?;
    crate::harness::wait_eof()
}

/// P5's anchor: single-thread memcpy of `bytes` (beyond the caches), ns per byte.
pub fn p5_memcpy(counts: Counts, bytes: usize) -> Result<Vec<f64>> {
    let src = vec![0x5au8; bytes];
    let mut dst = vec![0u8; bytes];
    let per_copy = measure(counts, 1, || {
        posix::copy(&mut dst, &src);
        Ok(())
    })?;
    Ok(per_copy.into_iter().map(|ns| ns / bytes as f64).collect())
}

/// P5's ring: its capacity (1 MiB: room for 16 chunks in flight, and within a core's L2
/// with the chunks either side copies through).
pub const P5_CAPACITY: u64 = 1 << 20;
/// P5: bytes per `write_all` / `read_blocking` call on each side.
pub const P5_CHUNK: usize = 64 << 10;
/// P5: the producer's source and the consumer's destination, beyond the caches as the
/// memcpy anchor's (the stream cycles through them).
const P5_BUFFER: usize = 64 << 20;

/// P5's stream bytes: a pattern whose period (251) is prime to every power of two, so a
/// byte out of place shows.
fn p5_pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect()
}

/// P5, ours: SPSC ring streaming throughput between two peers in two processes, through a
/// real vshmd: this process creates the section `p5/ring` with a ring of [`P5_CAPACITY`]
/// at offset 0 and produces; the role `ring-consume` (another process, its own peer)
/// attaches and consumes. Each sample streams `bytes` from a [`P5_BUFFER`]-byte source to
/// the consumer's [`P5_BUFFER`]-byte destination in [`P5_CHUNK`] calls of the library's
/// blocking `write_all` / `read_blocking`, timed from the first write until the consumer
/// has taken the last byte (the producer sees `tail` reach `head`). The consumer checks
/// every byte of its destination after the last round. ns per byte, as [`p5_memcpy`].
pub fn p5_ring(
    counts: Counts,
    bytes: usize,
    ns: &Namespace<HostTransport>,
    socket: &str,
) -> Result<Vec<f64>> {
    let buffer = bytes.min(P5_BUFFER);
    if buffer == 0 || bytes % buffer != 0 {
        return Err(format!("P5: {bytes} bytes is not a multiple of {buffer}"));
    }
    let (s, _) = ns
        .create(
            Some("p5/ring"),
            &CreateOptions::new(P5_CAPACITY + vshm::format::ring::HEADER_SIZE),
        )
        .ctx("create p5/ring")?;
    let ring = vshm::Ring::create_in(&s, 0, P5_CAPACITY).ctx("create the P5 ring")?;
    let src = p5_pattern(buffer);
    let rounds = counts.warmup + counts.samples;
    let child = Role::spawn(
        "ring-consume",
        &[
            socket.to_owned(),
            bytes.to_string(),
            buffer.to_string(),
            rounds.to_string(),
        ],
    )?;
    let mut producer = ring.producer().ctx("the P5 ring's producer")?;
    let samples = measure(counts, 1, || {
        let mut sent = 0;
        while sent < bytes {
            let at = sent % buffer;
            let n = P5_CHUNK.min(buffer - at).min(bytes - sent);
            producer
                .write_all(&src[at..at + n], Some(PATIENCE))
                .ctx("P5 write")?;
            sent += n;
        }
        let started = Instant::now();
        while producer.free().ctx("P5 free")? < P5_CAPACITY {
            if started.elapsed() > PATIENCE {
                return Err("P5: the consumer stopped taking".into());
            }
            std::hint::spin_loop();
        }
        Ok(())
    })?;
    role_verdict(child, "ring-consume")?;
    drop(producer);
    s.close().ctx("close p5/ring")?;
    Ok(samples.into_iter().map(|ns| ns / bytes as f64).collect())
}

/// Reads a role's verdict line (`ok` or `error: ...`) and lets it finish.
fn role_verdict(mut role: Role, what: &str) -> Result<()> {
    let line = role.line()?;
    role.finish()?;
    match line.strip_prefix("error: ") {
        None if line == "ok" => Ok(()),
        Some(e) => Err(format!("{what}: {e}")),
        None => Err(format!("{what} said {line:?}")),
    }
}

/// The consumer half of [`p5_ring`]: takes `rounds` × `bytes` into a `buffer`-byte
/// destination, then checks it against the pattern and says `ok` (or `error: ...`).
pub fn ring_consume(socket: &str, bytes: usize, buffer: usize, rounds: usize) -> Result<()> {
    let ns = attach(socket.as_ref())?;
    let s = ns.open("p5/ring").ctx("open p5/ring")?;
    let ring = vshm::Ring::attach(&s, 0).ctx("attach the P5 ring")?;
    let mut consumer = ring.consumer().ctx("the P5 ring's consumer")?;
    let mut dst = vec![0u8; buffer];
    crate::harness::say_ready()?;
    for _ in 0..rounds {
        let mut got = 0;
        while got < bytes {
            let at = got % buffer;
            let n = P5_CHUNK.min(buffer - at).min(bytes - got);
            got += consumer
                .read_blocking(&mut dst[at..at + n], Some(PATIENCE))
                .ctx("P5 read")?;
        }
    }
    let verdict = if dst == p5_pattern(buffer) {
        "ok".to_owned()
    } else {
        let at = dst
            .iter()
            .zip(p5_pattern(buffer))
            .position(|(a, b)| *a != b)
            .unwrap_or(0);
        format!("error: byte {at} of the last round is not what was sent")
    };
    println!("{verdict}");
    std::io::Write::flush(&mut std::io::stdout()).ctx("stdout")?;
    crate::harness::wait_eof()?;
    drop(consumer);
    s.close().ctx("close p5/ring")
}

/// P7 at one peer count: each peer, in its own process, sends no-op arbitrated requests
/// (grow of a section to its size: mailbox, doorbell, the arbiter, the answer) for
/// `millis`; all start together. Returns (ops/s over all peers, per-request latencies).
pub fn p7_hammer(socket: &str, peers: usize, millis: u64) -> Result<(f64, Vec<f64>)> {
    let mut roles = Vec::with_capacity(peers);
    for _ in 0..peers {
        roles.push(Role::spawn(
            "hammer",
            &[socket.to_owned(), millis.to_string()],
        )?);
    }
    for r in &mut roles {
        r.go()?;
    }
    let mut ops: u64 = 0;
    let mut longest: f64 = 0.0;
    let mut latencies = Vec::new();
    for mut r in roles {
        let done = r.line()?;
        let mut f = done.split_whitespace();
        let (Some("done"), Some(n), Some(ns)) = (f.next(), f.next(), f.next()) else {
            return Err(format!("hammer said {done:?}"));
        };
        ops += n.parse::<u64>().ctx("hammer ops")?;
        longest = longest.max(ns.parse::<f64>().ctx("hammer time")?);
        let lat = r.line()?;
        for v in lat.split_whitespace() {
            latencies.push(v.parse::<f64>().ctx("hammer latency")?);
        }
        r.finish()?;
    }
    if longest <= 0.0 {
        return Err("hammer: no time passed".into());
    }
    Ok((ops as f64 / (longest / 1e9), latencies))
}

/// The child half of [`p7_hammer`]: create-or-open the persistent section `p7/s`, wait
/// for go, then grow it to its size for `millis`; print `done OPS NS` and the latencies.
pub fn hammer(socket: &str, millis: u64) -> Result<()> {
    let ns = attach(socket.as_ref())?;
    let opts = CreateOptions {
        persistent: true,
        ..CreateOptions::new(4096)
    };
    let (s, _) = ns.create(Some("p7/s"), &opts).ctx("create-or-open p7/s")?;
    let size = s.size();
    if !crate::harness::ready_then_wait_go()? {
        return Ok(());
    }
    let mut lat = Vec::new();
    let limit = Duration::from_millis(millis);
    let started = Instant::now();
    while started.elapsed() < limit {
        let t = Instant::now();
        s.grow(size).ctx("grow p7/s")?;
        lat.push(t.elapsed().as_secs_f64() * 1e9);
    }
    let elapsed = started.elapsed().as_secs_f64() * 1e9;
    let mut out = format!("done {} {elapsed:.0}\n", lat.len());
    for v in &lat {
        out.push_str(&format!("{v:.0} "));
    }
    out.push('\n');
    std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes()).ctx("stdout")?;
    std::io::Write::flush(&mut std::io::stdout()).ctx("stdout")?;
    crate::harness::wait_eof()?;
    s.close().ctx("close p7/s")
}

/// Idle peers: `count` attached namespaces in one process, until stdin closes (P3 vs the
/// number of peers).
pub fn idle(socket: &str, count: usize) -> Result<()> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        held.push(attach(socket.as_ref())?);
    }
    crate::harness::ready_then_wait_eof()
}

/// P3 with `peers` attached in all: the pair plus `peers - 2` idle ones in another
/// process.
pub fn p3_with_peers(counts: Counts, d: &Vshmd, peers: usize) -> Result<Vec<f64>> {
    let socket = d.socket.to_string_lossy().into_owned();
    let idle = if peers > 2 {
        Some(Role::spawn(
            "idle",
            &[socket.clone(), (peers - 2).to_string()],
        )?)
    } else {
        None
    };
    let ns = d.attach()?;
    let samples = p3_events(counts, &ns, &socket)?;
    drop(ns);
    if let Some(r) = idle {
        r.finish()?;
    }
    Ok(samples)
}
