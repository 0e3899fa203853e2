//! BENCHMARKS.md, the README's table and the PNG plots from one run's figures. Goals are
//! compared here for the `met?` column only: nothing fails on a timing.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use crate::harness::{Context, Result};
use crate::stats::Summary;

/// What a line's figures are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Latency samples in ns, shown in µs (in ms from 100 ms, in s from 10 s: P6's
    /// transfers).
    Nanos,
    /// Samples in ns per byte, shown as GB/s (min = the fastest sample).
    NanosPerByte,
    /// A single figure in operations per second.
    OpsPerSec,
    /// A single figure, a fraction shown in percent.
    Fraction,
}

/// What a line aims at.
#[derive(Clone, Copy, Debug)]
pub enum Goal {
    /// ours/anchor (medians of time) at most this.
    RatioAtMost(f64),
    /// anchor time / ours time (throughput ratio) at least this.
    ThroughputAtLeast(f64),
    /// The figure (the median, or the single value) at least this.
    AtLeast(f64),
    /// The figure at most this.
    AtMost(f64),
    /// The p99 below this many ns.
    P99Below(f64),
}

/// One row of the table.
#[derive(Clone, Debug)]
pub struct Line {
    /// "P1", "P3", ...
    pub id: String,
    /// What is measured.
    pub what: String,
    /// The unit of `ours` and `anchor`.
    pub unit: Unit,
    /// Ours, if measured.
    pub ours: Option<Summary>,
    /// The anchor's name and figures, if the line has one.
    pub anchor: Option<(String, Summary)>,
    /// The goal.
    pub goal: Goal,
    /// Said under the table for this line (why not measured, a limit found, ...).
    pub note: Option<String>,
}

impl Line {
    /// ours/anchor of the medians as the goal reads it (time ratio, or throughput ratio).
    pub fn ratio(&self) -> Option<f64> {
        let (o, (_, a)) = (self.ours?, self.anchor.as_ref()?);
        match self.goal {
            Goal::ThroughputAtLeast(_) => Some(a.median / o.median),
            _ => Some(o.median / a.median),
        }
    }

    /// Whether the goal is met (None: not measured).
    pub fn met(&self) -> Option<bool> {
        let o = self.ours?;
        Some(match self.goal {
            Goal::RatioAtMost(g) => self.ratio()? <= g,
            Goal::ThroughputAtLeast(g) => self.ratio()? >= g,
            Goal::AtLeast(g) => o.median >= g,
            Goal::AtMost(g) => o.median <= g,
            Goal::P99Below(g) => o.p99 < g,
        })
    }

    fn goal_text(&self) -> String {
        match self.goal {
            Goal::RatioAtMost(g) if g < 1.0 => format!("≤ {g}× (≥ {:.0}× faster)", 1.0 / g),
            Goal::RatioAtMost(g) => format!("≤ {g}×"),
            Goal::ThroughputAtLeast(g) => format!("≥ {g}× throughput"),
            Goal::AtLeast(g) => format!("≥ {}", value(self.unit, g)),
            Goal::AtMost(g) => format!("≤ {}", value(self.unit, g)),
            Goal::P99Below(g) => format!("p99 < {}", value(Unit::Nanos, g)),
        }
    }
}

/// A figure in its unit, for people.
pub fn value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::Nanos => {
            let us = v / 1e3;
            if us < 10.0 {
                format!("{us:.2} µs")
            } else if us < 100.0 {
                format!("{us:.1} µs")
            } else if us < 100_000.0 {
                format!("{us:.0} µs")
            } else if us < 10_000_000.0 {
                format!("{:.1} ms", us / 1e3)
            } else {
                format!("{:.2} s", us / 1e6)
            }
        }
        Unit::NanosPerByte => format!("{:.2} GB/s", 1.0 / v),
        Unit::OpsPerSec => format!("{v:.0} ops/s"),
        Unit::Fraction => format!("{:.2} %", v * 100.0),
    }
}

fn triple(unit: Unit, s: &Summary) -> String {
    match unit {
        Unit::OpsPerSec | Unit::Fraction => value(unit, s.median),
        _ => format!(
            "{} / {} / {}",
            value(unit, s.min),
            value(unit, s.median),
            value(unit, s.p99)
        ),
    }
}

/// The machine and the run, for the head of BENCHMARKS.md.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    /// Lines such as "kernel: 6.1.0".
    pub facts: Vec<(String, String)>,
}

/// One scaling figure: x and (series name, figures).
#[derive(Clone, Debug)]
pub struct Series {
    /// Its legend.
    pub name: String,
    /// (x, y in ns).
    pub points: Vec<(f64, f64)>,
}

/// A plot: a title, axes, series; written as PNG.
#[derive(Clone, Debug)]
pub struct Plot {
    /// File name under docs/bench/.
    pub file: String,
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Whether x is logarithmic.
    pub x_log: bool,
    /// The series (y in ns, shown in µs on a log axis).
    pub series: Vec<Series>,
}

/// Draws `plot` into `dir/plot.file`.
pub fn draw(dir: &Path, plot: &Plot) -> Result<()> {
    let _ =
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    let path = dir.join(&plot.file);
    let root = BitMapBackend::new(&path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).ctx("plot")?;
    let pts = plot.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y / 1e3);
        y1 = y1.max(y / 1e3);
    }
    if x0 > x1 {
        return Err(format!("plot {}: no points", plot.file));
    }
    let (x0, x1) = if plot.x_log {
        (x0 / 1.5, x1 * 1.5)
    } else {
        (0.0, x1 + 2.0)
    };
    let (y0, y1) = (y0 / 2.0, y1 * 2.0);
    let mut b = ChartBuilder::on(&root);
    b.caption(&plot.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(plot.x_label.as_str())
                .y_desc("µs (log)")
                .label_style(("sans-serif", 14))
                .draw()
                .ctx("plot mesh")?;
            for (i, s) in plot.series.iter().enumerate() {
                let c = colors[i % colors.len()];
                let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x, y / 1e3)).collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                    .ctx("plot line")?
                    .label(s.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
                chart
                    .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, c.filled())))
                    .ctx("plot points")?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .ctx("plot legend")?;
        }};
    }
    if plot.x_log {
        body!(b
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .ctx("plot axes")?);
    } else {
        body!(b
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .ctx("plot axes")?);
    }
    root.present().ctx(format!("write {}", path.display()))?;
    Ok(())
}

/// Why a goal is missed, as found by measuring (profiles of this suite's runs), keyed by
/// line id. Shown only for lines that miss their goal in the run being written; a format
/// change that fixes one makes its line disappear by itself.
const FINDINGS: &[(&str, &str)] = &[
    (
        "P1",
        "not the lookup: since the name index (format 3, FORMAT.md §5a) open+close is flat from 1 to \
         10 000 objects (it grew ~47 ns per object before: 471 µs at 10 000). What an open+close \
         still does: an index probe and one seqlocked copy of the 128-byte entry and its name, \
         validated; two CASes on the lease word and the refcount cell each way; a second copy of \
         the entry's head after the hold (validated, its generation compared); the quarantine \
         audit's record of the hold (a map under a mutex, guest/src/audit.rs) and the revocation \
         check. Removed on 2026-12-02 (callgrind, `vshm-bench p1 1`: 7 880 → 5 480 instructions \
         per open; wall clock 1.96 → 1.41–1.50 µs median in an A/B on one machine): the second \
         read and validation of the name after the hold, a redundant head snapshot for a slot the \
         index's hash already picked, an environment lookup per open (a test hook), a character \
         count for short names, a second look at the peer entry. Removed on 2026-12-03: the 1 KiB \
         name buffer that `ObjectInfo` carried by value through the lookup and the hold (cleared \
         and moved ~13 times an open: memcpy and memset were 44 % of its instructions); the open \
         path now carries `ObjectHead`, the entry without its name, as the caller has the name \
         (callgrind: 5 430 → 3 160 instructions per open; A/B alternating five times on one \
         machine: min 0.62–0.64 → 0.42–0.44 µs, median 0.68 → 0.45–0.48 µs when the anchor sat \
         at 2.2–2.3 µs). What remains is spread thin: the index probe, the seqlocked copies and \
         their validation, the four CASes, the audit's map and the revocation check. The anchor \
         moves more with the machine than ours: 1.7 µs on a quiet run of one machine, 2.2–5.4 µs \
         on another, 10 µs while builds shared the cores",
    ),
    (
        "P2",
        "the round trip, not the table any more: a create is a CREATE request (post, ring, vshmd \
         allocates the range and the name, publishes entry and index, answers, rings back) and the \
         close a ring with the slot in the close hint (FORMAT.md §9), so two trips through vshmd \
         where the anchor makes a few syscalls on tmpfs. Removed on the way (2026-12-02): a \
         whole-table sweep per close (now the hinted slot), the whole header compared per doorbell \
         (now 1 024 entries, round robin), two info log lines per object (created/destroyed are \
         debug now), and above all the wake-up of vshmd's sleeping vCPU for every request: \
         vshmd now keeps looking for the next event for `--linger-us` (50 µs) after a ring, which \
         took the median from 43–60 µs to 5.9 µs on this machine (a quiet VM's idle vCPU costs \
         tens of µs to wake; the anchor has no second process to wake)",
    ),
    (
        "P3",
        "when both sides have a core a round trip never sleeps: a waiter looks at its event 512 \
         times before it asks to be rung, and a signal that finds it asleep rings its doorbell \
         directly (FORMAT.md §6a, direct rings: no request to vshmd). When a side has to sleep (a \
         run queue shared with builds on these 2 cores), each direction is an eventfd write, the \
         waiter's `vshm-bells` thread and a condition variable: two wake-ups where the anchor has \
         one. The p99 is this machine's load (load average in the head)",
    ),
    (
        "P4",
        "nothing of ours runs between the two sides: the words are plain shared memory in the \
         section, so the ping-pong equals the anchor when both processes have a core (1.02× on a \
         quiet run, 2026-12-02). With another load on these 2 cores both spinners share one and \
         each round trip waits for the scheduler (254 µs median in a run beside a CI build)",
    ),
    (
        "P5",
        "not the copies: one thread's volatile word copies into and out of a 1 MiB ring run at \
         7.7–8.4 GB/s (≥ its memcpy). Not the waking any more either: a side that sleeps is rung \
         by the other side's doorbell directly (FORMAT.md §6a, direct rings: this run's note \
         counts the WAKE requests vshmd still answered), where before every wake-up was a \
         synchronous WAKE request (15.5–19.8 k a run, vshmd at 12 % of the samples): 0.39–0.64× \
         in three quiet runs since, against 0.2–0.41× before. What remains is that the two sides need two cores at \
         once, and this VM has two for both processes, vshmd and the rest: spinning longer \
         before sleeping made it worse (16 384 looks: 0.16×, the spinner takes the core its peer \
         needs), as did a pure-spin two-thread ring of vshm-format with no waking at all \
         (0.1–1.3 GB/s), and the ring's size is not it (1, 4 and 16 MiB rings with 64 KiB–1 MiB \
         calls, no size consistently ahead). Not measured on a machine with more cores",
    ),
    (
        "P6",
        "measured in TCG guests (no KVM here) on this 2-core VM, 2026-12-02. *The ring between \
         two guests*: direct doorbells took it from 0.18× to 0.3–0.5× (a sleeping side is rung \
         through the ivshmem doorbell, an MMIO write in the other guest, instead of a guest → host \
         request and an interrupt); what remains is P5's two-cores problem four times over (two \
         guests of 2 vCPUs each, TCG threads, on 2 host cores). *The CLI path* (9× the in-process \
         copies, from 11.8×; end to end 0.18 s, from 1.25 s, against 1.1 s for TCP, on \
         2026-12-02; 0.23–0.62 s on 2026-12-03, when the guests copied at half the speed): the \
         guest `vshm` is now built non-PIE, so a start costs ~19 ms instead of 155–340 ms (TCG reuses \
         its translations when the binary sits at the same address); the rest is two agent \
         commands (~11 ms each), two starts, and the 16 MiB file read from tmpfs in A and written \
         to tmpfs in B (`cat` of it: ~54 ms) — file work the in-process copies do not do; see \
         the line's note for this run's figures",
    ),
    (
        "P7",
        "vshmd lingers after a ring (`--linger-us`, see P2), which took 62 peers from 59 k to \
         119 k ops/s on 2026-12-02; on 2026-12-03 the same code made 60–99 k in four runs on this \
         VM (whose host CPU changed between runs: AMD EPYC in one, Intel Xeon in the next), 45 k \
         while another build ran. The latency goal is met up to a few peers (p99 ~50–100 µs at \
         1–2 peers in the table below) but not at 62: vshmd's own work per request is small (under 1 % of its samples in \
         a `perf record` of `vshm-bench one P7`, 2026-12-02), and 62 peer processes and vshmd \
         share 2 cores, so both figures are the run queue: a peer waits for a core before it can \
         post and again before it sees its answer",
    ),
    (
        "P8",
        "the header is the object table (128 bytes per entry since format 4, 1 280 before), the refcount \
         rows (4 bytes per object per peer), the name area (64 bytes per object unless --name-bytes says \
         otherwise), the mailboxes (2 KiB per peer) and the name index (16 bytes per object): 308 KiB for \
         the default configuration (breakdown in the note above, from the layout vshmd published)",
    ),
];

/// Everything the report needs.
#[derive(Clone, Debug)]
pub struct Report {
    /// Machine facts.
    pub machine: Machine,
    /// The table.
    pub lines: Vec<Line>,
    /// Extra sections (markdown), after the table.
    pub sections: Vec<String>,
    /// The plots (file names under docs/bench/).
    pub plots: Vec<Plot>,
    /// Smoke run.
    pub smoke: bool,
}

/// The full table (BENCHMARKS.md).
pub fn table(lines: &[Line]) -> String {
    let mut s = String::from(
        "| line | what | ours min / median / p99 | anchor | anchor min / median / p99 | ratio (medians) | goal | met? |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for l in lines {
        let ours = l
            .ours
            .as_ref()
            .map_or("not measured".into(), |o| triple(l.unit, o));
        let (an, af) = l
            .anchor
            .as_ref()
            .map_or(("—".into(), "—".into()), |(n, a)| {
                (n.clone(), triple(l.unit, a))
            });
        let ratio = l.ratio().map_or("—".into(), |r| format!("{r:.3}×"));
        let met = match l.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {ours} | {an} | {af} | {ratio} | {} | {met} |",
            l.id,
            l.what,
            l.goal_text()
        );
    }
    s
}

/// The README's short table (between the bench markers).
pub fn readme_table(r: &Report) -> String {
    let mut s = String::from(
        "| line | ours (median) | anchor (median) | ratio | goal | met? |\n|---|---|---|---|---|---|\n",
    );
    for l in &r.lines {
        let ours = l
            .ours
            .as_ref()
            .map_or("—".into(), |o| value(l.unit, o.median));
        let anchor = l.anchor.as_ref().map_or("—".into(), |(n, a)| {
            format!("{} ({n})", value(l.unit, a.median))
        });
        let ratio = l.ratio().map_or("—".into(), |r| format!("{r:.2}×"));
        let met = match l.met() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "—",
        };
        let _ = writeln!(
            s,
            "| {} {} | {ours} | {anchor} | {ratio} | {} | {met} |",
            l.id,
            l.what,
            l.goal_text()
        );
    }
    let when = r
        .machine
        .facts
        .iter()
        .find(|(k, _)| k == "date")
        .map_or(String::new(), |(_, v)| v.clone());
    let _ = write!(
        s,
        "\nGenerated by `cargo xtask bench` ({when}); every figure, the machine and the anchors \
         are in [BENCHMARKS.md](BENCHMARKS.md).\n"
    );
    s
}

/// BENCHMARKS.md.
pub fn markdown(r: &Report) -> String {
    let mut s = String::from(
        "# vshm benchmarks\n\n\
         Generated by `cargo xtask bench` (tests/bench, `vshm-bench`): every line is measured \
         against a real anchor in the same run — POSIX calls through libc, eventfd, a plain \
         shared mapping, memcpy, the real `iceoryx2` crate. Latencies are min / median / p99 \
         (nearest rank) over the samples, after a warm-up; a ratio is ours / anchor of the \
         medians (for throughput, anchor time / ours). These are readings of one run on one \
         machine, not guarantees; nothing here is asserted in CI, which runs the suite once \
         in a tiny smoke mode (`cargo xtask bench --smoke`).\n\n",
    );
    if r.smoke {
        s.push_str("**Smoke run: tiny sample counts, the figures mean nothing.**\n\n");
    }
    s.push_str("| | |\n|---|---|\n");
    for (k, v) in &r.machine.facts {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push_str("\n## Results\n\n");
    s.push_str(&table(&r.lines));
    let notes: Vec<&Line> = r.lines.iter().filter(|l| l.note.is_some()).collect();
    if !notes.is_empty() {
        s.push('\n');
        for l in notes {
            let _ = writeln!(
                s,
                "* {} {}: {}",
                l.id,
                l.what,
                l.note.as_deref().unwrap_or("")
            );
        }
    }
    let missed: Vec<&Line> = r.lines.iter().filter(|l| l.met() == Some(false)).collect();
    if !missed.is_empty() {
        s.push_str("\n## Why goals are missed\n\n");
        for l in missed {
            let why = FINDINGS
                .iter()
                .find(|(id, _)| l.id.starts_with(id))
                .map_or("not profiled yet", |(_, w)| w);
            let _ = writeln!(s, "* {} {}: {why}", l.id, l.what);
        }
    }
    for sec in &r.sections {
        s.push('\n');
        s.push_str(sec);
    }
    s
}
