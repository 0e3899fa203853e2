//! Drawing `vshmctl top`: a pure function from an [`App`] to a ratatui frame (header gauge,
//! peers, sections, footer). Anything missing or odd in the status document renders as `-`.

use crate::text::human_bytes;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Gauge, Paragraph, Row, Table};
use ratatui::Frame;
use serde_json::Value;

use super::*;

/// A duration for people: `42s`, `3m 07s`, `2h 05m`, `4d 03h`.
pub(super) fn span_of(secs: u64) -> String {
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
    // Events and mutexes get a table of their own, only when there are some.
    let sync = app.sync_objects();
    let sync_height = if sync.is_empty() {
        0
    } else {
        rows_height(sync.len()).min(area.height / 4).max(3)
    };
    let [header, peers_area, sections_area, sync_area, footer] = Layout::vertical([
        Constraint::Length(5),
        Constraint::Length(peers_height),
        Constraint::Min(3),
        Constraint::Length(sync_height),
        Constraint::Length(2),
    ])
    .areas(area);
    render_header(frame, header, app, doc);
    render_peers(frame, peers_area, doc);
    render_sections(frame, sections_area, app);
    if !sync.is_empty() {
        render_sync(frame, sync_area, &sync);
    }
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

/// The peer id list of a JSON array, or `-`.
fn ids(v: &Value) -> String {
    let ids: Vec<String> = v.as_array().into_iter().flatten().map(num).collect();
    if ids.is_empty() {
        NONE.to_owned()
    } else {
        ids.join(" ")
    }
}

fn render_sync(frame: &mut Frame, area: Rect, objects: &[&Value]) {
    let rows = objects.iter().map(|s| {
        let style = if s["deleted"].as_bool() == Some(true) {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new()
        };
        let (state, waiting) = match s["kind"].as_str() {
            Some("event") => (
                match s["signaled"].as_bool() {
                    Some(true) => "signaled".to_owned(),
                    Some(false) => "clear".to_owned(),
                    None => NONE.to_owned(),
                },
                ids(&s["waiters"]),
            ),
            _ => (
                match &s["owner"] {
                    Value::Null => "free".to_owned(),
                    v => format!("owner {}", num(v)),
                },
                num(&s["queued"]),
            ),
        };
        Row::new([
            section_name(s),
            s["kind"].as_str().unwrap_or(NONE).to_owned(),
            state,
            waiting,
            num(&s["signals"]),
            num(&s["wakes"]),
            num(&s["abandoned"]),
            refs_by_peer(s),
        ])
        .style(style)
    });
    let table = Table::new(
        rows,
        [
            Constraint::Min(24),
            Constraint::Length(6),
            Constraint::Length(10),
            Constraint::Length(16),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(24),
        ],
    )
    .header(header_row([
        "NAME",
        "KIND",
        "STATE",
        "WAITING/QUEUED",
        "SIGNALS",
        "WAKES",
        "ABANDONED",
        "REFS BY PEER",
    ]))
    .block(
        Block::default()
            .borders(Borders::ALL)
            .title(format!(" events & mutexes ({}) ", objects.len())),
    );
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
