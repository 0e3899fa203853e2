//! `vshmctl top`: a live terminal view of a running vshmd.
//!
//! Three layers, so that everything but the terminal itself is testable:
//! - [`App`], a pure model: the last status document, the counters of the one before, the
//!   rates computed from both, the last refresh error and the sort order;
//! - [`render`], a pure function drawing an [`App`] into a ratatui [`Frame`];
//! - [`run`], the thin shell: terminal setup and restore, the event loop, status requests.
//!
//! The status document comes from vshmd (docs/MONITOR.md names its fields); nothing in it is
//! trusted to be there or well-typed: a missing or odd field renders as `-`.

use crate::text::human_bytes;
use std::io::{self, IsTerminal, Stdout};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use ratatui::crossterm::{cursor, execute};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Gauge, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use serde_json::Value;

use vshm_control::{request, ControlRequest};

/// How the sections table is ordered (largest first either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortBy {
    /// By current size, then name.
    #[default]
    Size,
    /// By total handles, then size, then name.
    Refs,
}

/// Counter totals of one status document and when it arrived.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    pid: Option<u64>,
    requests: Option<u64>,
    doorbells: Option<u64>,
}

impl Sample {
    fn of(doc: &Value, at: Instant) -> Sample {
        Sample {
            at,
            pid: doc["vshmd"]["pid"].as_u64(),
            requests: doc["counters"]["requests"].as_u64(),
            doorbells: doc["counters"]["doorbells"].as_u64(),
        }
    }
}

/// Per-second rates between the two last status documents (`None`: not known yet, or not
/// comparable, e.g. vshmd restarted in between).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Rates {
    /// Control and namespace requests answered per second.
    pub requests: Option<f64>,
    /// Doorbells rung per second.
    pub doorbells: Option<f64>,
}

/// `(new - old) / seconds`, when both totals are there and did not go backwards.
fn rate(old: Option<u64>, new: Option<u64>, secs: f64) -> Option<f64> {
    let delta = new?.checked_sub(old?)?;
    #[allow(clippy::cast_precision_loss)] // a rate for people
    (secs > 0.0).then(|| delta as f64 / secs)
}

/// The model behind the view: pure, fed with status documents and keys.
#[derive(Debug)]
pub struct App {
    control: PathBuf,
    doc: Option<Value>,
    last: Option<Sample>,
    rates: Rates,
    error: Option<String>,
    sort: SortBy,
    quit: bool,
}

impl App {
    /// A model with no document yet, showing `control` in its footer.
    pub fn new(control: &Path) -> App {
        App {
            control: control.to_owned(),
            doc: None,
            last: None,
            rates: Rates::default(),
            error: None,
            sort: SortBy::default(),
            quit: false,
        }
    }

    /// Takes a fresh status document that arrived at `now`: the rates are the counters'
    /// differences from the previous document over the time between them. Clears any error.
    pub fn update(&mut self, doc: Value, now: Instant) {
        let sample = Sample::of(&doc, now);
        self.rates = match self.last {
            // A different vshmd (or one without a pid) counts from zero again.
            Some(prev) if prev.pid == sample.pid && prev.pid.is_some() => {
                let secs = now.saturating_duration_since(prev.at).as_secs_f64();
                Rates {
                    requests: rate(prev.requests, sample.requests, secs),
                    doorbells: rate(prev.doorbells, sample.doorbells, secs),
                }
            }
            _ => Rates::default(),
        };
        self.last = Some(sample);
        self.doc = Some(doc);
        self.error = None;
    }

    /// A refresh failed: shows `error` (the last document stays on screen until the next
    /// refresh succeeds).
    pub fn fail(&mut self, error: impl Into<String>) {
        self.error = Some(error.into());
    }

    /// Handles a key: `s`/`r` choose the sort order, `q`, Esc and Ctrl-C quit.
    pub fn on_key(&mut self, key: KeyEvent) {
        match key.code {
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                self.quit = true;
            }
            KeyCode::Char('q') | KeyCode::Esc => self.quit = true,
            KeyCode::Char('s') => self.sort = SortBy::Size,
            KeyCode::Char('r') => self.sort = SortBy::Refs,
            _ => {}
        }
    }

    /// Whether a quit key was pressed.
    pub fn should_quit(&self) -> bool {
        self.quit
    }

    /// The sort order.
    pub fn sort(&self) -> SortBy {
        self.sort
    }

    /// The rates from the last two documents.
    pub fn rates(&self) -> Rates {
        self.rates
    }

    /// The last refresh error, if the last refresh failed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The sections of the last document, in display order.
    fn sections(&self) -> Vec<&Value> {
        let mut sections: Vec<&Value> = self
            .doc
            .as_ref()
            .and_then(|d| d["sections"].as_array())
            .into_iter()
            .flatten()
            .collect();
        let size = |s: &Value| s["size"].as_u64().unwrap_or(0);
        let refs = |s: &Value| s["refs"].as_u64().unwrap_or(0);
        let name = |s: &Value| s["name"].as_str().unwrap_or("").to_owned();
        match self.sort {
            SortBy::Size => {
                sections.sort_by(|a, b| size(b).cmp(&size(a)).then_with(|| name(a).cmp(&name(b))))
            }
            SortBy::Refs => sections.sort_by(|a, b| {
                refs(b)
                    .cmp(&refs(a))
                    .then_with(|| size(b).cmp(&size(a)))
                    .then_with(|| name(a).cmp(&name(b)))
            }),
        }
        sections
    }
}

// ---- formatting: every field may be missing ----

/// A duration for people: `42s`, `3m 07s`, `2h 05m`, `4d 03h`.
fn span_of(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {:02}h", s / 86400, s % 86400 / 3600),
    }
}

const NONE: &str = "-";

fn num(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| NONE.to_owned(), |n| n.to_string())
}

fn int(v: &Value) -> String {
    v.as_i64()
        .map_or_else(|| NONE.to_owned(), |n| n.to_string())
}

fn bytes(v: &Value) -> String {
    v.as_u64().map_or_else(|| NONE.to_owned(), human_bytes)
}

fn yes_no(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "yes",
        Some(false) => "no",
        None => NONE,
    }
}

fn per_sec(r: Option<f64>) -> String {
    r.map_or_else(|| format!("{NONE}/s"), |r| format!("{r:.1}/s"))
}

fn section_name(s: &Value) -> String {
    let mut name = match &s["name"] {
        Value::String(n) => n.clone(),
        Value::Null => "<unnamed>".to_owned(),
        other => other.to_string(),
    };
    if s["deleted"].as_bool() == Some(true) {
        name.push_str(" (deleted)");
    }
    name
}

fn refs_by_peer(s: &Value) -> String {
    let pairs: Vec<String> = s["refs_by_peer"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|pair| format!("{}:{}", num(&pair[0]), num(&pair[1])))
        .collect();
    if pairs.is_empty() {
        NONE.to_owned()
    } else {
        pairs.join(" ")
    }
}

fn rows_height(rows: usize) -> u16 {
    // borders + header + rows
    u16::try_from(rows.saturating_add(3)).unwrap_or(u16::MAX)
}

// ---- rendering ----

/// Draws the whole view of `app` into `frame`.
pub fn render(frame: &mut Frame, app: &App) {
    let null = Value::Null;
    let doc = app.doc.as_ref().unwrap_or(&null);
    let peers = doc["peers"].as_array().map_or(0, Vec::len);
    let area = frame.area();
    // Peers get up to a third of the screen, sections the rest.
    let peers_height = rows_height(peers).min(area.height / 3).max(3);
    let [header, peers_area, sections_area, footer] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Length(peers_height),
        Constraint::Min(3),
        Constraint::Length(2),
    ])
    .areas(area);
    render_header(frame, header, app, doc);
    render_peers(frame, peers_area, doc);
    render_sections(frame, sections_area, app);
    render_footer(frame, footer, app);
}

fn render_header(frame: &mut Frame, area: Rect, app: &App, doc: &Value) {
    let d = &doc["vshmd"];
    let r = &doc["region"];
    let c = &doc["counters"];
    let mut title = format!(" vshmd pid {} ", num(&d["pid"]));
    if let Some(up) = d["uptime_secs"].as_u64() {
        title.push_str(&format!("· up {} ", span_of(up)));
    }
    if app.doc.is_none() {
        title.push_str("· waiting for the first status ");
    } else if app.error.is_some() {
        title.push_str("· stale ");
    }
    let block = Block::default().borders(Borders::ALL).title(title);
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [top, gauge, bottom, _] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(inner);

    let fragmentation = r["fragmentation"]
        .as_f64()
        .map_or_else(|| NONE.to_owned(), |f| format!("{:.1}%", f * 100.0));
    let line = format!(
        "region {}   heap {}   resident {}   largest free {}   free extents {}   fragmentation {}",
        bytes(&r["size"]),
        bytes(&r["heap_size"]),
        bytes(&r["resident"]),
        bytes(&r["largest_free"]),
        num(&r["free_extents"]),
        fragmentation,
    );
    frame.render_widget(Paragraph::new(line), top);

    let used = r["used"].as_u64();
    let heap = r["heap_size"].as_u64().filter(|&h| h > 0);
    #[allow(clippy::cast_precision_loss)] // a ratio for people
    let ratio = match (used, heap) {
        (Some(u), Some(h)) => (u as f64 / h as f64).clamp(0.0, 1.0),
        _ => 0.0,
    };
    let label = format!(
        "heap used {} / free {} ({})",
        bytes(&r["used"]),
        bytes(&r["free"]),
        if used.is_some() && heap.is_some() {
            format!("{:.1}%", ratio * 100.0)
        } else {
            NONE.to_owned()
        },
    );
    let gauge_widget = Gauge::default()
        .gauge_style(Style::new().fg(Color::Green).bg(Color::DarkGray))
        .ratio(if ratio.is_finite() { ratio } else { 0.0 })
        .label(label);
    frame.render_widget(gauge_widget, gauge);

    let rates = app.rates;
    let line = format!(
        "requests {} ({})   doorbells {} ({})   created {}   destroyed {}   failed {}",
        num(&c["requests"]),
        per_sec(rates.requests),
        num(&c["doorbells"]),
        per_sec(rates.doorbells),
        num(&c["created"]),
        num(&c["destroyed"]),
        num(&c["failed_requests"]),
    );
    frame.render_widget(Paragraph::new(line), bottom);
}

fn header_row<'a>(cells: impl IntoIterator<Item = &'a str>) -> Row<'a> {
    Row::new(cells.into_iter().map(Cell::from))
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED))
}

fn render_peers(frame: &mut Frame, area: Rect, doc: &Value) {
    let peers: &[Value] = doc["peers"].as_array().map_or(&[], Vec::as_slice);
    let rows = peers.iter().map(|p| {
        let label = p["label"].as_str().unwrap_or(NONE).to_owned();
        let style = if p["connected"].as_bool() == Some(true) {
            Style::new()
        } else {
            Style::new().fg(Color::DarkGray)
        };
        Row::new([
            num(&p["id"]),
            label,
            int(&p["pid"]),
            yes_no(&p["connected"]).to_owned(),
            num(&p["handles"]),
            bytes(&p["bytes_held"]),
        ])
        .style(style)
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(5),
            Constraint::Min(16),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(11),
        ],
    )
    .header(header_row([
        "ID",
        "LABEL",
        "PID",
        "CONNECTED",
        "HANDLES",
        "BYTES HELD",
    ]))
    .block(
        Block::default()
            .borders(Borders::ALL)
            .title(format!(" peers ({}) ", peers.len())),
    );
    frame.render_widget(table, area);
}

fn render_sections(frame: &mut Frame, area: Rect, app: &App) {
    let sections = app.sections();
    let rows = sections.iter().map(|s| {
        let style = if s["deleted"].as_bool() == Some(true) {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        };
        Row::new([
            section_name(s),
            bytes(&s["size"]),
            bytes(&s["max_size"]),
            num(&s["refs"]),
            yes_no(&s["persistent"]).to_owned(),
            refs_by_peer(s),
            s["age_secs"]
                .as_u64()
                .map_or_else(|| NONE.to_owned(), span_of),
        ])
        .style(style)
    });
    let (size, refs) = match app.sort {
        SortBy::Size => ("SIZE ▼", "REFS"),
        SortBy::Refs => ("SIZE", "REFS ▼"),
    };
    let table = Table::new(
        rows,
        [
            Constraint::Min(24),
            Constraint::Length(11),
            Constraint::Length(11),
            Constraint::Length(7),
            Constraint::Length(10),
            Constraint::Length(24),
            Constraint::Length(8),
        ],
    )
    .header(header_row([
        "NAME",
        size,
        "MAX",
        refs,
        "PERSISTENT",
        "REFS BY PEER",
        "AGE",
    ]))
    .block(Block::default().borders(Borders::ALL).title(format!(
        " sections ({}) · sorted by {} ",
        sections.len(),
        match app.sort {
            SortBy::Size => "size",
            SortBy::Refs => "refs",
        }
    )));
    frame.render_widget(table, area);
}

fn render_footer(frame: &mut Frame, area: Rect, app: &App) {
    let key = Style::new().add_modifier(Modifier::BOLD);
    let keys = Line::from(vec![
        Span::styled("q", key),
        Span::raw(" quit  "),
        Span::styled("s", key),
        Span::raw(" sort by size  "),
        Span::styled("r", key),
        Span::raw(" sort by refs   control "),
        Span::raw(app.control.display().to_string()),
    ]);
    let status = match &app.error {
        Some(e) => Line::from(Span::styled(
            format!("refresh failed (retrying): {e}"),
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        )),
        None => Line::default(),
    };
    frame.render_widget(Paragraph::new(vec![keys, status]), area);
}

// ---- the terminal ----

/// Whether the terminal is in raw mode on the alternate screen (so the panic hook and the
/// guard restore it exactly once).
static ACTIVE: AtomicBool = AtomicBool::new(false);

fn restore_terminal() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = disable_raw_mode();
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
    }
}

/// Restores the terminal when dropped: on return, on error and while unwinding a panic.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> io::Result<Screen> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            // Leave the alternate screen before the panic message is printed.
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
        });
        enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        let restore_on_error = |e: io::Error| {
            restore_terminal();
            e
        };
        execute!(io::stdout(), EnterAlternateScreen, cursor::Hide).map_err(restore_on_error)?;
        let terminal =
            Terminal::new(CrosstermBackend::new(io::stdout())).map_err(restore_on_error)?;
        Ok(Screen { terminal })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Runs the live view against vshmd's control socket `control`, refreshing every `interval`,
/// until `q`, Esc or Ctrl-C. A failed refresh is shown and retried, never fatal; only a
/// terminal that cannot be set up or drawn on is.
pub fn run(control: &Path, interval: Duration) -> Result<(), String> {
    // Keys come from stdin, else /dev/tty (crossterm's choice); the screen must be stdout.
    if !io::stdout().is_terminal() {
        return Err("top needs a terminal (use `vshmctl status` or `watch` otherwise)".into());
    }
    let interval = interval.max(Duration::from_millis(10));
    let mut screen = Screen::enter().map_err(|e| format!("cannot set up the terminal: {e}"))?;
    let mut app = App::new(control);
    let mut next_refresh = Instant::now();
    let mut dirty = true;
    while !app.should_quit() {
        if Instant::now() >= next_refresh {
            match request(control, &ControlRequest::Status) {
                Ok(doc) => app.update(doc, Instant::now()),
                Err(e) => app.fail(e.to_string()),
            }
            next_refresh = Instant::now() + interval;
            dirty = true;
        }
        if dirty {
            screen
                .terminal
                .draw(|frame| render(frame, &app))
                .map_err(|e| format!("cannot draw: {e}"))?;
            dirty = false;
        }
        let timeout = next_refresh.saturating_duration_since(Instant::now());
        if event::poll(timeout).map_err(|e| format!("reading the terminal: {e}"))? {
            match event::read().map_err(|e| format!("reading the terminal: {e}"))? {
                Event::Key(key) if key.kind == KeyEventKind::Press => {
                    app.on_key(key);
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
    drop(screen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::buffer::Buffer;
    use serde_json::json;

    fn doc(requests: u64, doorbells: u64) -> Value {
        json!({
            "vshmd": { "pid": 4242, "socket": "/tmp/vshm.sock", "control": "/tmp/vshm.sock.ctl",
                       "uptime_secs": 3725 },
            "region": { "size": 16777216u64, "heap_size": 16515072u64, "used": 1114112u64,
                        "free": 15400960u64, "largest_free": 15400960u64, "free_extents": 1,
                        "fragmentation": 0.0, "resident": 65536, "max_peers": 64,
                        "max_objects": 256, "epoch": 1 },
            "peers": [
                { "id": 1, "slot": 0, "connected": true, "label": "guest-alpha", "pid": 1001,
                  "connected_since": 1, "handles": 3, "bytes_held": 1114112u64, "incarnation": 1 },
                { "id": 2, "slot": 1, "connected": false, "label": "guest-beta", "pid": null,
                  "connected_since": null, "handles": 0, "bytes_held": 0, "incarnation": 1 }
            ],
            "sections": [
                { "name": "big-frames", "slot": 0, "generation": 1, "kind": "section",
                  "offset": 0, "size": 1048576, "max_size": 1048576, "persistent": true,
                  "deleted": false, "refs": 1, "refs_by_peer": [[1, 1]], "creator": 1,
                  "created": 1, "age_secs": 75 },
                { "name": "busy-ring", "slot": 1, "generation": 2, "kind": "section",
                  "offset": 1048576, "size": 65536, "max_size": 65536, "persistent": false,
                  "deleted": false, "refs": 5, "refs_by_peer": [[1, 2], [3, 3]], "creator": 1,
                  "created": 1, "age_secs": 5 },
                { "name": null, "slot": 2, "generation": 3, "kind": "section",
                  "offset": 1114112, "size": 4096, "max_size": 4096, "persistent": false,
                  "deleted": true, "refs": 0, "refs_by_peer": [], "creator": 0,
                  "created": 1, "age_secs": 1 }
            ],
            "counters": { "requests": requests, "failed_requests": 0, "created": 7,
                          "destroyed": 4, "deleted": 1, "grown": 0, "reclaims": 0,
                          "repairs": 0, "doorbells": doorbells, "denials": 0, "events": 0 }
        })
    }

    fn draw(app: &App) -> Buffer {
        let mut terminal = Terminal::new(TestBackend::new(120, 40)).expect("test terminal");
        terminal.draw(|f| render(f, app)).expect("draw");
        terminal.backend().buffer().clone()
    }

    fn lines(buf: &Buffer) -> Vec<String> {
        (0..buf.area.height)
            .map(|y| (0..buf.area.width).map(|x| buf[(x, y)].symbol()).collect())
            .collect()
    }

    fn screen(app: &App) -> String {
        lines(&draw(app)).join("\n")
    }

    fn row_of(screen: &[String], needle: &str) -> usize {
        screen
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} is not on screen:\n{}", screen.join("\n")))
    }

    fn app_with(doc: Value) -> App {
        let mut app = App::new(Path::new("/run/test/vshm.sock.ctl"));
        app.update(doc, Instant::now());
        app
    }

    #[test]
    fn the_view_shows_section_names_peer_labels_and_the_header() {
        let s = screen(&app_with(doc(10, 0)));
        for needle in [
            "big-frames",
            "busy-ring",
            "<unnamed> (deleted)",
            "guest-alpha",
            "guest-beta",
            "1001",
            "vshmd pid 4242",
            "up 1h 02m",
            "region 16.0 MiB",
            "heap used 1.1 MiB / free 14.7 MiB",
            "1:2 3:3",
            "1m 15s",
            "created 7",
            "destroyed 4",
            "/run/test/vshm.sock.ctl",
        ] {
            assert!(s.contains(needle), "{needle:?} missing from:\n{s}");
        }
    }

    #[test]
    fn rates_are_the_counter_differences_over_the_time_between_documents() {
        let mut app = App::new(Path::new("ctl"));
        let t0 = Instant::now();
        app.update(doc(100, 10), t0);
        assert_eq!(app.rates(), Rates::default(), "no rate from one document");
        assert!(screen(&app).contains("requests 100 (-/s)"));
        app.update(doc(300, 15), t0 + Duration::from_secs(1));
        assert_eq!(app.rates().requests, Some(200.0));
        assert_eq!(app.rates().doorbells, Some(5.0));
        let s = screen(&app);
        assert!(s.contains("requests 300 (200.0/s)"), "{s}");
        assert!(s.contains("doorbells 15 (5.0/s)"), "{s}");
        app.update(doc(400, 15), t0 + Duration::from_millis(1500));
        assert_eq!(app.rates().requests, Some(200.0), "100 requests in 0.5 s");
    }

    #[test]
    fn counters_going_backwards_or_another_vshmd_give_no_rate() {
        let mut app = App::new(Path::new("ctl"));
        let t0 = Instant::now();
        app.update(doc(300, 10), t0);
        app.update(doc(5, 1), t0 + Duration::from_secs(1));
        assert_eq!(app.rates(), Rates::default());
        let mut other = doc(50, 2);
        other["vshmd"]["pid"] = json!(9999);
        app.update(other, t0 + Duration::from_secs(2));
        assert_eq!(app.rates(), Rates::default());
    }

    #[test]
    fn sorting_by_refs_instead_of_size_changes_the_row_order() {
        let mut app = app_with(doc(0, 0));
        assert_eq!(app.sort(), SortBy::Size);
        let by_size = lines(&draw(&app));
        assert!(row_of(&by_size, "big-frames") < row_of(&by_size, "busy-ring"));
        assert!(row_of(&by_size, "busy-ring") < row_of(&by_size, "<unnamed>"));
        assert!(by_size.iter().any(|l| l.contains("sorted by size")));

        app.on_key(KeyEvent::from(KeyCode::Char('r')));
        assert_eq!(app.sort(), SortBy::Refs);
        let by_refs = lines(&draw(&app));
        assert!(row_of(&by_refs, "busy-ring") < row_of(&by_refs, "big-frames"));
        assert!(by_refs.iter().any(|l| l.contains("sorted by refs")));

        app.on_key(KeyEvent::from(KeyCode::Char('s')));
        let again = lines(&draw(&app));
        assert!(row_of(&again, "big-frames") < row_of(&again, "busy-ring"));
    }

    #[test]
    fn q_esc_and_ctrl_c_quit_but_a_plain_c_does_not() {
        let mut app = App::new(Path::new("ctl"));
        app.on_key(KeyEvent::from(KeyCode::Char('c')));
        assert!(!app.should_quit());
        for key in [
            KeyEvent::from(KeyCode::Char('q')),
            KeyEvent::from(KeyCode::Esc),
            KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL),
        ] {
            let mut app = App::new(Path::new("ctl"));
            app.on_key(key);
            assert!(app.should_quit(), "{key:?} quits");
        }
    }

    #[test]
    fn a_failed_refresh_shows_the_error_in_red_in_the_footer_and_keeps_the_last_data() {
        let mut app = app_with(doc(0, 0));
        app.fail("cannot reach vshmd's control socket /x: Connection refused");
        let buf = draw(&app);
        let text = lines(&buf);
        let y = row_of(&text, "Connection refused");
        assert!(y >= text.len() - 2, "the error is in the footer (row {y})");
        let x = text[y].find("refresh failed").expect("error prefix");
        let x = u16::try_from(x).expect("column");
        let y = u16::try_from(y).expect("row");
        assert_eq!(buf[(x, y)].fg, Color::Red);
        assert!(
            text.join("\n").contains("big-frames"),
            "last data still shown"
        );
        assert!(text[0].contains("stale"), "marked stale: {}", text[0]);

        app.update(doc(0, 0), Instant::now());
        assert_eq!(app.error(), None);
        let s = screen(&app);
        assert!(
            !s.contains("Connection refused") && !s.contains("stale"),
            "{s}"
        );
    }

    #[test]
    fn a_document_with_missing_or_odd_fields_renders_dashes_without_panicking() {
        for odd in [
            json!({}),
            json!(null),
            json!([1, 2]),
            json!({ "region": "x", "peers": {}, "sections": 3, "counters": [] }),
            json!({
                "region": { "used": 10, "heap_size": 0, "fragmentation": "bad" },
                "peers": [null, 7, {}, { "id": -1, "label": 5, "pid": "x" }],
                "sections": [null, {}, { "name": 5, "refs_by_peer": [null, [1], "x"] },
                             { "size": 1, "refs": "many" }],
                "counters": { "requests": -5 }
            }),
            json!({ "region": { "used": 20, "heap_size": 10 } }),
        ] {
            let mut app = App::new(Path::new("ctl"));
            app.update(odd.clone(), Instant::now());
            app.update(odd, Instant::now());
            let s = screen(&app);
            assert!(s.contains("requests - (-/s)"), "{s}");
            app.on_key(KeyEvent::from(KeyCode::Char('r')));
            let _ = screen(&app);
        }
        // Before the first document.
        let s = screen(&App::new(Path::new("ctl")));
        assert!(s.contains("waiting for the first status"), "{s}");
    }

    #[test]
    fn a_tiny_terminal_does_not_panic() {
        let app = app_with(doc(1, 1));
        for (w, h) in [(1, 1), (10, 3), (40, 8), (0, 0)] {
            let mut terminal = Terminal::new(TestBackend::new(w, h)).expect("test terminal");
            terminal.draw(|f| render(f, &app)).expect("draw");
        }
    }

    #[test]
    fn sizes_and_durations_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(16 << 20), "16.0 MiB");
        assert_eq!(span_of(42), "42s");
        assert_eq!(span_of(187), "3m 07s");
        assert_eq!(span_of(7500), "2h 05m");
        assert_eq!(span_of(4 * 86400 + 3 * 3600), "4d 03h");
    }
}
