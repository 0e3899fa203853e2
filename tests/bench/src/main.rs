//! `vshm-bench`: the benchmark suite of issue 13, run by `cargo xtask bench` (full, writes
//! BENCHMARKS.md, docs/bench/*.png and the README's table) and `cargo xtask bench --smoke`
//! (tiny counts into a temp dir, CI). Every line is ours against a real anchor measured in
//! the same run; nothing asserts a timing.
//!
//! ```text
//! vshm-bench run --out DIR [--smoke] [--commit ID]   # DIR/BENCHMARKS.md, DIR/docs/bench/*.png,
//!                                                    # DIR/readme-table.md
//! vshm-bench one P2|P3|P4|P5|P6|P7 [--smoke]                    # one line alone, printed
//! vshm-bench role NAME ARGS...                       # a peer process the suite spawns
//! vshm-bench p1 [LEVEL...]                           # P1 alone, printed (default levels
//!                                                    # 1 100 1000 10000); writes nothing
//! ```
//!
//! vshmd is taken from beside this binary (the same target directory).

mod bench;
mod guests;
mod harness;
mod ice;
mod posix;
mod report;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use vshm::host::HostTransport;
use vshm::Namespace;

use harness::{Context, Counts, Result, Vshmd};
use report::{Goal, Line, Plot, Report, Series, Unit};
use stats::{summarize, Summary};

const USAGE: &str = "usage: vshm-bench run --out DIR [--smoke] [--commit ID]\n       \
                     vshm-bench one P2|P3|P4|P5|P6|P7 [--smoke]\n       vshm-bench role NAME ARGS...\n       \
                     vshm-bench p1 [LEVEL...]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("run") => run_cli(&args[1..]),
        Some("role") => role(&args[1..]),
        Some("p1") => p1_cli(&args[1..]),
        Some("one") => one(&args[1..]),
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vshm-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    args.get(i)
        .ok_or_else(|| format!("missing {what}"))?
        .parse()
        .ctx(format!("{what} {:?}", args.get(i)))
}

/// The peer processes the suite spawns (this binary again).
fn role(args: &[String]) -> Result<()> {
    let name = args.first().ok_or("role: missing name")?;
    let rest = &args[1..];
    let s = |i| -> Result<String> { arg(rest, i, "argument") };
    match name.as_str() {
        "event-echo" => bench::event_echo(&s(0)?, arg(rest, 1, "rounds")?),
        "eventfd-echo" => bench::eventfd_echo(
            arg(rest, 0, "fd")?,
            arg(rest, 1, "fd")?,
            arg(rest, 2, "rounds")?,
        ),
        "section-echo" => bench::section_echo(&s(0)?, arg(rest, 1, "rounds")?),
        "ring-consume" => bench::ring_consume(
            &s(0)?,
            arg(rest, 1, "bytes")?,
            arg(rest, 2, "buffer")?,
            arg(rest, 3, "rounds")?,
        ),
        "raw-echo" => bench::raw_echo(arg(rest, 0, "fd")?, arg(rest, 1, "rounds")?),
        "ice-event-echo" => ice::event_echo(&s(0)?, arg(rest, 1, "rounds")?),
        "ice-pubsub-echo" => ice::pubsub_echo(&s(0)?, arg(rest, 1, "rounds")?),
        "hammer" => bench::hammer(&s(0)?, arg(rest, 1, "millis")?),
        "idle" => bench::idle(&s(0)?, arg(rest, 1, "count")?),
        other => Err(format!("unknown role {other}")),
    }
    .map_err(|e| format!("role {name}: {e}"))
}

fn run_cli(args: &[String]) -> Result<()> {
    let mut out = None;
    let mut smoke = false;
    let mut commit = String::from("unknown");
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(it.next().ok_or("--out needs a directory")?)),
            "--smoke" => smoke = true,
            "--commit" => commit = it.next().ok_or("--commit needs an id")?.clone(),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    let out = out.ok_or(USAGE)?;
    run(&out, smoke, &commit)
}

/// P1 alone (open+close of an existing section at each fill level, full sample counts),
/// printed as one line per level: to compare a change to the lookup without the whole
/// suite (and without touching BENCHMARKS.md).
fn p1_cli(args: &[String]) -> Result<()> {
    let mut levels = Vec::new();
    for a in args {
        levels.push(
            a.parse::<u32>()
                .map_err(|e| format!("level {a:?}: {e}\n{USAGE}"))?,
        );
    }
    if levels.is_empty() {
        levels = vec![1, 100, 1000, 10_000];
    }
    let counts = Counts {
        samples: 2000,
        warmup: 200,
    };
    let open = bench::p1_open(counts, &levels, Duration::from_secs(600))?;
    println!("objects  slot  ours min / median / p99  anchor median");
    for p in &open.points {
        println!(
            "{:>7} {:>5}  {} / {} / {}  {}",
            p.level,
            p.slot,
            report::value(Unit::Nanos, p.pair.ours.min),
            report::value(Unit::Nanos, p.pair.ours.median),
            report::value(Unit::Nanos, p.pair.ours.p99),
            report::value(Unit::Nanos, p.pair.anchor.median),
        );
    }
    for (level, why) in &open.skipped {
        println!("{level:>7} skipped: {why}");
    }
    Ok(())
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn machine(commit: &str, smoke: bool) -> Vec<(String, String)> {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map_or("unknown".into(), |s| s.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .map_or(String::new(), |l| {
            l.split_whitespace().skip(1).collect::<Vec<_>>().join(" ")
        });
    let virt = if cpuinfo.contains(" hypervisor") {
        "a virtual machine (cpuinfo: hypervisor)"
    } else {
        "bare metal (no hypervisor flag)"
    };
    vec![
        ("date".into(), utc_now()),
        ("commit".into(), commit.to_owned()),
        (
            "machine".into(),
            format!(
                "{} ({virt}), {cores} cores, {mem} RAM",
                std::env::consts::ARCH
            ),
        ),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
        ("CPU".into(), cpu),
        (
            "clock source".into(),
            read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
                .trim()
                .to_owned(),
        ),
        (
            "load average at start".into(),
            read("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        ),
        (
            "mode".into(),
            if smoke {
                "smoke (tiny counts)".into()
            } else {
                "full".into()
            },
        ),
    ]
}

/// Now as `YYYY-MM-DD HH:MM UTC` (civil-from-days, no date crate).
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn summary(mut v: Vec<f64>, what: &str) -> Result<Summary> {
    summarize(&mut v).ok_or_else(|| format!("{what}: no samples"))
}

/// A single figure as a summary (P7's ops/s, P8's fraction).
fn single(v: f64) -> Summary {
    Summary {
        n: 1,
        min: v,
        median: v,
        p99: v,
    }
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

fn run(out: &Path, smoke: bool, commit: &str) -> Result<()> {
    let counts = if smoke {
        Counts {
            samples: 20,
            warmup: 5,
        }
    } else {
        Counts {
            samples: 2000,
            warmup: 200,
        }
    };
    let few = Counts {
        samples: if smoke { 10 } else { 500 },
        warmup: if smoke { 2 } else { 50 },
    };
    let mut lines = Vec::new();
    let mut sections = Vec::new();
    let mut plots = Vec::new();
    let facts = machine(commit, smoke);

    // P1 and the open-latency scaling.
    let p1_levels: &[u32] = if smoke {
        &[1, 100]
    } else {
        &[1, 100, 1000, 10_000]
    };
    let scale_levels: &[u32] = if smoke {
        &[10, 100]
    } else {
        &[10, 100, 1000, 10_000, 65_536]
    };
    let mut levels: Vec<u32> = p1_levels.iter().chain(scale_levels).copied().collect();
    levels.sort_unstable();
    levels.dedup();
    step(&format!("P1: open+close at {levels:?} objects"));
    let fill_budget = Duration::from_secs(if smoke { 30 } else { 150 });
    let open = bench::p1_open(counts, &levels, fill_budget)?;
    for &level in p1_levels {
        let line = |ours, anchor, note| Line {
            id: format!("P1 @{level}"),
            what: format!("open+close of an existing section, {level} objects in the table"),
            unit: Unit::Nanos,
            ours,
            anchor,
            goal: Goal::RatioAtMost(0.1),
            note,
        };
        if let Some(p) = open.points.iter().find(|p| p.level == level) {
            lines.push(line(
                Some(p.pair.ours),
                Some(("shm_open+mmap+munmap+close".into(), p.pair.anchor)),
                None,
            ));
        } else if let Some((_, why)) = open.skipped.iter().find(|(l, _)| *l == level) {
            lines.push(line(None, None, Some(why.clone())));
        }
    }
    let mut scaling = String::from(
        "## Open latency vs objects in the table\n\n![open latency vs objects](docs/bench/open-vs-objects.png)\n\n\
         Each level has its own vshmd with `--max-objects` the next power of two (at least 16); the table is filled \
         with persistent events (CREATE requests, timed: the fill column) and the section opened is created last, so \
         the name lookup meets every other object first.\n\n\
         | objects | --max-objects | region | header | slot opened | ours min / median / p99 | shm_open+mmap+munmap+close median | ratio | CREATE while filling, mean |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for p in &open.points {
        scaling.push_str(&format!(
            "| {} | {} | {} MiB | {:.2} % | {} | {} / {} / {} | {} | {:.3}× | {} |\n",
            p.level,
            p.max_objects,
            p.region >> 20,
            p.header as f64 / p.region as f64 * 100.0,
            p.slot,
            report::value(Unit::Nanos, p.pair.ours.min),
            report::value(Unit::Nanos, p.pair.ours.median),
            report::value(Unit::Nanos, p.pair.ours.p99),
            report::value(Unit::Nanos, p.pair.anchor.median),
            p.pair.ours.median / p.pair.anchor.median,
            p.fill_create
                .map_or("—".into(), |v| report::value(Unit::Nanos, v)),
        ));
    }
    for (level, why) in &open.skipped {
        scaling.push_str(&format!("\n**{level} objects**: {why}.\n"));
    }
    sections.push(scaling);
    plots.push(Plot {
        file: "open-vs-objects.png".into(),
        title: "P1: open+close of an existing section vs objects in the table".into(),
        x_label: "objects in the table (log)".into(),
        x_log: true,
        series: vec![
            Series {
                name: "vshm open+close, median".into(),
                points: open
                    .points
                    .iter()
                    .map(|p| (f64::from(p.level), p.pair.ours.median))
                    .collect(),
            },
            Series {
                name: "vshm open+close, p99".into(),
                points: open
                    .points
                    .iter()
                    .map(|p| (f64::from(p.level), p.pair.ours.p99))
                    .collect(),
            },
            Series {
                name: "shm_open+mmap+munmap+close, median".into(),
                points: open
                    .points
                    .iter()
                    .map(|p| (f64::from(p.level), p.pair.anchor.median))
                    .collect(),
            },
        ],
    });

    // The default configuration: P8, P2, P3, P4.
    step("P8: header of the default configuration");
    let d = Vshmd::start(&[])?;
    let socket = d.socket.to_string_lossy().into_owned();
    let ns = d.attach()?;
    let layout = *ns.layout();
    let header = layout.heap_offset as f64 / layout.region_size as f64;
    let p2 = p2_line(counts, &ns)?;
    let p3 = p3_lines(counts, &ns, &socket)?;
    let p4 = p4_lines(counts, &ns, &socket)?;
    drop(ns);
    drop(d);
    lines.push(p2);
    lines.extend(p3);
    lines.extend(p4);

    lines.extend(p5_lines(smoke)?);
    lines.extend(p6_lines(smoke)?);

    // P7 and the latency-vs-peers scaling, on a region with 62 peer slots.
    let d = Vshmd::start(&["--max-peers".into(), "62".into()])?;
    let socket = d.socket.to_string_lossy().into_owned();
    let hammer_peers: &[usize] = if smoke {
        &[2, 62]
    } else {
        &[1, 2, 4, 8, 16, 32, 62]
    };
    let millis = if smoke { 20 } else { 1000 };
    let mut p7 = Vec::new();
    for &n in hammer_peers {
        step(&format!("P7: {n} peers hammering vshmd for {millis} ms"));
        let (rate, lat) = bench::p7_hammer(&socket, n, millis)?;
        p7.push((n, rate, summary(lat, "P7")?));
    }
    let pair_peers: &[usize] = if smoke {
        &[2, 62]
    } else {
        &[2, 4, 8, 16, 32, 62]
    };
    let mut p3_scale = Vec::new();
    for &n in pair_peers {
        step(&format!("P3 with {n} peers attached"));
        p3_scale.push((
            n,
            summary(bench::p3_with_peers(few, &d, n)?, "P3 vs peers")?,
        ));
    }
    let p7_layout = {
        let ns = d.attach()?;
        *ns.layout()
    };
    drop(d);
    if let Some((n, rate, lat)) = p7.iter().find(|(n, _, _)| *n == 62) {
        lines.push(Line {
            id: "P7".into(),
            what: format!("arbitrated requests (no-op grow) from {n} peers in {n} processes, all at once, ops/s"),
            unit: Unit::OpsPerSec,
            ours: Some(single(*rate)),
            anchor: None,
            goal: Goal::AtLeast(100_000.0),
            note: None,
        });
        lines.push(Line {
            id: "P7".into(),
            what: format!("latency of those requests ({} samples)", lat.n),
            unit: Unit::Nanos,
            ours: Some(*lat),
            anchor: None,
            goal: Goal::P99Below(50_000.0),
            note: None,
        });
    }
    lines.push(Line {
        id: "P8".into(),
        what: format!(
            "header of the default configuration ({} MiB, {} peers, {} objects) as a fraction of the region",
            layout.region_size >> 20, layout.max_peers, layout.max_objects
        ),
        unit: Unit::Fraction,
        ours: Some(single(header)),
        anchor: None,
        goal: Goal::AtMost(0.01),
        note: Some(format!(
            "{} KiB before the heap (superblock + peer table {} KiB, object table {} KiB, refcount rows {} KiB, \
             mailboxes {} KiB, name index {} KiB, name area {} KiB, alignment to the heap {} KiB); with 62 peers \
             it is {:.2} % of {} MiB{}",
            layout.heap_offset >> 10,
            layout.object_table >> 10,
            (layout.refcount_table - layout.object_table) >> 10,
            (layout.mailbox_table - layout.refcount_table) >> 10,
            (layout.index_table - layout.mailbox_table) >> 10,
            (layout.name_area - layout.index_table) >> 10,
            layout.name_area_size >> 10,
            (layout.heap_offset - layout.name_area - layout.name_area_size) >> 10,
            p7_layout.heap_offset as f64 / p7_layout.region_size as f64 * 100.0,
            p7_layout.region_size >> 20,
            open.points.last().map_or(String::new(), |p| format!(
                "; at --max-objects {} {:.2} % of {} MiB",
                p.max_objects,
                p.header as f64 / p.region as f64 * 100.0,
                p.region >> 20
            )),
        )),
    });
    let mut peers_md = String::from(
        "## Latency vs peers\n\n![latency vs peers](docs/bench/latency-vs-peers.png)\n\n\
         P7: every peer a process of its own sending no-op requests (grow to the current size) as fast as it can, \
         all at once, against one vshmd thread. P3: the event round trip of two peers with the rest of the peers attached and idle.\n\n\
         | peers | P7 ops/s | P7 p50 | P7 p99 |\n|---|---|---|---|\n",
    );
    for (n, rate, lat) in &p7 {
        peers_md.push_str(&format!(
            "| {n} | {rate:.0} | {} | {} |\n",
            report::value(Unit::Nanos, lat.median),
            report::value(Unit::Nanos, lat.p99)
        ));
    }
    peers_md.push_str("\n| peers attached | P3 event round trip min / median / p99 |\n|---|---|\n");
    for (n, s) in &p3_scale {
        peers_md.push_str(&format!(
            "| {n} | {} / {} / {} |\n",
            report::value(Unit::Nanos, s.min),
            report::value(Unit::Nanos, s.median),
            report::value(Unit::Nanos, s.p99)
        ));
    }
    sections.push(peers_md);
    plots.push(Plot {
        file: "latency-vs-peers.png".into(),
        title: "P3 event round trip and P7 request latency vs peers".into(),
        x_label: "peers".into(),
        x_log: false,
        series: vec![
            Series {
                name: "P3 event round trip, median".into(),
                points: p3_scale
                    .iter()
                    .map(|(n, s)| (*n as f64, s.median))
                    .collect(),
            },
            Series {
                name: "P3 event round trip, p99".into(),
                points: p3_scale.iter().map(|(n, s)| (*n as f64, s.p99)).collect(),
            },
            Series {
                name: "P7 request, p50 (all peers hammering)".into(),
                points: p7.iter().map(|(n, _, s)| (*n as f64, s.median)).collect(),
            },
            Series {
                name: "P7 request, p99 (all peers hammering)".into(),
                points: p7.iter().map(|(n, _, s)| (*n as f64, s.p99)).collect(),
            },
        ],
    });

    let mut facts = facts;
    facts.push((
        "load average at end".into(),
        read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    ));
    let r = Report {
        machine: report::Machine { facts },
        lines,
        sections,
        plots,
        smoke,
    };
    let pngs = out.join("docs/bench");
    std::fs::create_dir_all(&pngs).ctx(format!("create {}", pngs.display()))?;
    for p in &r.plots {
        report::draw(&pngs, p)?;
    }
    let md = out.join("BENCHMARKS.md");
    std::fs::write(&md, report::markdown(&r)).ctx(format!("write {}", md.display()))?;
    let table = out.join("readme-table.md");
    std::fs::write(&table, report::readme_table(&r)).ctx(format!("write {}", table.display()))?;
    eprintln!("==> wrote {}", md.display());
    Ok(())
}

/// P5: the SPSC ring between two peer processes through a real vshmd, against memcpy.
fn p5_lines(smoke: bool) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    step("P5: SPSC ring streaming between two processes, and memcpy");
    let bytes = if smoke { 1 << 20 } else { 64 << 20 };
    let mem_counts = Counts {
        samples: if smoke { 5 } else { 100 },
        warmup: 2,
    };
    let memcpy = summary(bench::p5_memcpy(mem_counts, bytes)?, "P5 memcpy")?;
    let stream = if smoke { 4 << 20 } else { 256 << 20 };
    let ring_counts = Counts {
        samples: if smoke { 3 } else { 20 },
        warmup: if smoke { 1 } else { 2 },
    };
    let d = Vshmd::start(&[])?;
    let ns = d.attach()?;
    let wakes = d.wake_requests()?;
    let ring = summary(
        bench::p5_ring(ring_counts, stream, &ns, &d.socket.to_string_lossy())?,
        "P5 ring",
    )?;
    let wakes = d.wake_requests()?.saturating_sub(wakes);
    drop(ns);
    drop(d);
    let chunks = (ring_counts.warmup + ring_counts.samples) * stream / bench::P5_CHUNK;
    lines.push(Line {
        id: "P5".into(),
        what: format!(
            "SPSC ring streaming throughput, producer and consumer processes, {} MiB a sample \
             through a {} KiB ring",
            stream >> 20,
            bench::P5_CAPACITY >> 10
        ),
        unit: Unit::NanosPerByte,
        note: Some(format!(
            "two peers of one vshmd in two processes (the suite and its role `ring-consume`), \
             the library's blocking `write_all`/`read_blocking` in 64 KiB calls from a {} MiB \
             source to a {} MiB destination (as the anchor's {} MiB memcpy, beyond the caches \
             in the full run); timed until the consumer has taken the last byte, every byte \
             checked after the last round. vshmd answered {wakes} WAKE requests for the \
             {chunks} chunks of 64 KiB each side moved (warm-up included)",
            stream.min(64 << 20) >> 20,
            stream.min(64 << 20) >> 20,
            bytes >> 20
        )),
        ours: Some(ring),
        anchor: Some(("single-thread memcpy".into(), memcpy)),
        goal: Goal::ThroughputAtLeast(0.8),
    });
    Ok(lines)
}

/// P6: two QEMU guests (tests/bench/src/guests.rs), or a line saying why not.
fn p6_lines(smoke: bool) -> Result<Vec<Line>> {
    step("P6: two QEMU guests (section vs TCP over virtio-net, request vs ping)");
    let outcome = if smoke {
        guests::p6(1, 1, 10, 1)?
    } else {
        guests::p6(16, 5, 200, 64)?
    };
    let g = match outcome {
        guests::Outcome::Ran(g) => g,
        guests::Outcome::NotRun(why) => {
            eprintln!("    P6 {why}");
            return Ok(vec![Line {
                id: "P6".into(),
                what: "two QEMU guests".into(),
                unit: Unit::Nanos,
                ours: None,
                anchor: None,
                goal: Goal::RatioAtMost(1.0),
                note: Some(why),
            }]);
        }
    };
    let accel = g.accel;
    let mib = g.mib;
    let ns_per_byte = |mb_s: f64| single(1e3 / mb_s);
    let cli = summary(g.cli.clone(), "P6 CLI")?;
    let tcp = summary(g.tcp.clone(), "P6 TCP")?;
    let agent = summary(g.agent.clone(), "P6 agent")?;
    let tool = summary(g.tcp_tool.clone(), "P6 TCP tool")?;
    let in_process = (mib << 20) as f64 * (1e3 / g.copy_in + 1e3 / g.copy_out);
    let (n, min, median, p99) = g.rtt;
    let mut lines = vec![Line {
        id: "P6".into(),
        what: format!(
            "{mib} MiB guest → guest through a section, CLI (`vshm write --file` in one, \
             `vshm read` in the other), end to end ({accel})"
        ),
        unit: Unit::Nanos,
        ours: Some(cli),
        anchor: Some((
            "TCP over virtio-net between the same guests (`vshm net-send --file` → \
             `vshm net-recv`, 1 MiB buffers), end to end"
                .into(),
            tcp,
        )),
        goal: Goal::RatioAtMost(1.0),
        note: Some(format!(
            "{accel} guests (2 vCPUs, 256 MiB each) on one vshmd, linked by QEMU `-netdev dgram` \
             (unix sockets) and virtio-net; {} transfers of each kind of {mib} MiB from \
             /dev/urandom (checksums compared), each timed by the harness around the guests' \
             agent commands: the section's two (write in A, read to a tmpfs file in B), TCP's \
             one (the sender returns once the receiver, which writes to a tmpfs file, closed). \
             An agent command alone costs {} (median of `true`). The TCP sender's own time, \
             connect to close: {} median ({:.1} MB/s)",
            g.cli.len(),
            report::value(Unit::Nanos, agent.median),
            report::value(Unit::Nanos, tool.median),
            (mib << 20) as f64 / tool.median * 1e3
        )),
    }];
    for (what, rate) in [("into", g.copy_in), ("out of", g.copy_out)] {
        lines.push(Line {
            id: "P6".into(),
            what: format!(
                "in a guest: copy {what} a section in process (the library, `vshm rtt --copy-mib \
                 {}`, chunks of 1 MiB) ({accel})",
                g.copy_mib
            ),
            unit: Unit::NanosPerByte,
            ours: Some(ns_per_byte(rate)),
            anchor: Some((
                "the guest's memcpy between two local buffers".into(),
                ns_per_byte(g.copy_local),
            )),
            goal: Goal::ThroughputAtLeast(0.8),
            note: None,
        });
    }
    let ring: Vec<f64> = g.ring.iter().map(|mb_s| 1e3 / mb_s).collect();
    lines.push(Line {
        id: "P6".into(),
        what: format!(
            "guest → guest through the SPSC ring of a section, in process (`vshm ring-send` → \
             `vshm ring-recv`, {} KiB ring, {} MiB) ({accel})",
            bench::P5_CAPACITY >> 10,
            g.ring_mib
        ),
        unit: Unit::NanosPerByte,
        ours: Some(summary(ring, "P6 ring")?),
        anchor: Some((
            "the guest's memcpy between two local buffers".into(),
            ns_per_byte(g.copy_local),
        )),
        goal: Goal::ThroughputAtLeast(0.8),
        note: Some(format!(
            "the sender's time from its first 64 KiB write until the receiver (the other guest, \
             which created the ring) has taken the last byte; the receiver checks the last MiB. \
             Over the guest transport a waiting side sleeps on the section's notifications: the \
             other guest rings its doorbell directly (FORMAT.md §6a), an interrupt in it; vshmd \
             answered {} WAKE requests for the {} chunks of 64 KiB each side moved",
            g.ring_wakes,
            g.ring.len() as u64 * (g.ring_mib << 20) / bench::P5_CHUNK as u64
        )),
    });
    lines.push(Line {
        id: "P6".into(),
        what: format!("{mib} MiB guest → guest through a section, CLI, end to end ({accel})"),
        unit: Unit::Nanos,
        ours: Some(cli),
        anchor: Some((
            format!(
                "the same {mib} MiB in process: copied into the section in one guest and out in \
                 the other at the rates above"
            ),
            single(in_process),
        )),
        goal: Goal::RatioAtMost(2.0),
        note: Some(format!(
            "what the CLI's time is made of besides the copies, medians through the agent: an \
             agent command alone {}, `vshm --version` (the process, no device) {}, a `vshm` \
             command that moves no data (`vshm open`: start, attach, open, close) {}, `cat` of the {mib} MiB file to another tmpfs file {}; the \
             CLI path is two agent commands, two `vshm` starts, the file read into memory in A \
             and written to a file in B",
            report::value(Unit::Nanos, agent.median),
            report::value(Unit::Nanos, summary(g.exec_floor.clone(), "P6 exec")?.median),
            report::value(
                Unit::Nanos,
                summary(g.cli_floor.clone(), "P6 CLI floor")?.median
            ),
            report::value(
                Unit::Nanos,
                summary(g.file_copy.clone(), "P6 file copy")?.median
            ),
        )),
    });
    lines.push(Line {
        id: "P6".into(),
        what: format!(
            "guest → host request round trip (a GROW to the same size, `vshm rtt`) ({accel})"
        ),
        unit: Unit::Nanos,
        ours: Some(Summary {
            n,
            min,
            median,
            p99,
        }),
        anchor: Some((
            "ping between the two guests over virtio-net (busybox, 0.2 s apart)".into(),
            summary(g.ping.clone(), "P6 ping")?,
        )),
        goal: Goal::RatioAtMost(1.0),
        note: None,
    });
    Ok(lines)
}

/// `vshm-bench one P2|P3|P4|P5|P6|P7 [--smoke]`: one line's measurement alone, its rows printed (for
/// working on it; writes nothing).
/// P2: create+close of a new section through `ns` against the POSIX create-map-unlink.
fn p2_line(counts: Counts, ns: &Namespace<HostTransport>) -> Result<Line> {
    step("P2: create+close");
    let p2 = bench::p2_create(counts, ns)?;
    Ok(Line {
        id: "P2".into(),
        what: "create+close of a new 4 KiB section (arbitrated)".into(),
        unit: Unit::Nanos,
        ours: Some(p2.ours),
        anchor: Some((
            "shm_open(O_CREAT)+ftruncate+mmap+munmap+close+shm_unlink".into(),
            p2.anchor,
        )),
        goal: Goal::RatioAtMost(1.0),
        note: None,
    })
}

/// What P3 compares (the anchors sleep at every wait, ours looks first).
const P3_NOTE: &str = "ours: a waiter looks at the event 512 times, then its transport spins up to 5 µs, \
                       before it sleeps (FORMAT.md §6a), so while both processes have a core a round trip \
                       never sleeps; the eventfd and iceoryx2 anchors sleep in the kernel at every wait, \
                       and waking a sleeping vCPU of this VM costs tens of µs: their medians moved between \
                       2 and 62 µs from run to run on 2026-12-02 while ours stayed at 0.38–0.42 µs (our p99 \
                       is the rounds that did sleep)";

/// P3: the event round trip through `ns` (a peer of vshmd at `socket`) against eventfd
/// and iceoryx2's event ping-pong.
fn p3_lines(counts: Counts, ns: &Namespace<HostTransport>, socket: &str) -> Result<Vec<Line>> {
    step("P3: event round trip (vshm, eventfd, iceoryx2)");
    let ours = summary(bench::p3_events(counts, ns, socket)?, "P3")?;
    let efd = summary(bench::p3_eventfd(counts)?, "P3 eventfd")?;
    let ice = summary(ice::event_ping_pong(counts)?, "P3 iceoryx2")?;
    let mut lines = ratio_lines(
        "P3",
        "event round trip between two peers (signal + wait, each way)",
        ours,
        [
            ("eventfd ping-pong", efd, 1.15),
            ("iceoryx2 event ping-pong", ice, 1.0),
        ],
    );
    for l in &mut lines {
        l.note = Some(P3_NOTE.into());
    }
    Ok(lines)
}

/// P4: the polling ping-pong through a section against shared atomics and iceoryx2's
/// publish-subscribe ping-pong.
fn p4_lines(counts: Counts, ns: &Namespace<HostTransport>, socket: &str) -> Result<Vec<Line>> {
    step("P4: polling ping-pong (vshm section, raw shared atomics, iceoryx2)");
    let ours = summary(bench::p4_section(counts, ns, socket)?, "P4")?;
    let raw = summary(bench::p4_raw(counts)?, "P4 raw")?;
    let ice = summary(ice::pubsub_ping_pong(counts)?, "P4 iceoryx2")?;
    Ok(ratio_lines(
        "P4",
        "polling ping-pong through a section",
        ours,
        [
            ("shared-atomic ping-pong (memfd)", raw, 1.2),
            ("iceoryx2 publish-subscribe ping-pong", ice, 1.0),
        ],
    ))
}

/// One latency line per anchor: ours against each, with the ratio its goal allows.
fn ratio_lines<const N: usize>(
    id: &str,
    what: &str,
    ours: Summary,
    anchors: [(&str, Summary, f64); N],
) -> Vec<Line> {
    anchors
        .into_iter()
        .map(|(anchor, a, goal)| Line {
            id: id.into(),
            what: what.into(),
            unit: Unit::Nanos,
            ours: Some(ours),
            anchor: Some((anchor.into(), a)),
            goal: Goal::RatioAtMost(goal),
            note: None,
        })
        .collect()
}

fn one(args: &[String]) -> Result<()> {
    let smoke = args.iter().any(|a| a == "--smoke");
    let lines = match args.first().map(String::as_str) {
        Some("P5") => p5_lines(smoke)?,
        Some("P6") => p6_lines(smoke)?,
        Some(id @ ("P2" | "P3" | "P4")) => {
            let counts = Counts {
                samples: if smoke { 20 } else { 2000 },
                warmup: if smoke { 5 } else { 200 },
            };
            let d = Vshmd::start(&[])?;
            let socket = d.socket.to_string_lossy().into_owned();
            let ns = d.attach()?;
            match id {
                "P2" => vec![p2_line(counts, &ns)?],
                "P3" => p3_lines(counts, &ns, &socket)?,
                _ => p4_lines(counts, &ns, &socket)?,
            }
        }
        Some("P7") => {
            let d = Vshmd::start(&["--max-peers".into(), "62".into()])?;
            let socket = d.socket.to_string_lossy().into_owned();
            let millis = if smoke { 20 } else { 1000 };
            for n in [2, 62] {
                step(&format!("P7: {n} peers hammering vshmd for {millis} ms"));
                let (rate, lat) = bench::p7_hammer(&socket, n, millis)?;
                let lat = summary(lat, "P7")?;
                println!(
                    "P7 {n} peers: {rate:.0} ops/s, latency {} / {} / {}",
                    report::value(Unit::Nanos, lat.min),
                    report::value(Unit::Nanos, lat.median),
                    report::value(Unit::Nanos, lat.p99)
                );
            }
            return Ok(());
        }
        other => {
            return Err(format!(
                "one: which line? {other:?} (P2, P3, P4, P5, P6 or P7)"
            ))
        }
    };
    print!("{}", report::table(&lines));
    for l in &lines {
        if let Some(n) = &l.note {
            println!("* {} {}: {n}", l.id, l.what);
        }
    }
    Ok(())
}
