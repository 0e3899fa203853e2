//! `vshmctl top` rendered on ratatui's TestBackend, and its model driven by keys.

use super::render::span_of;
use super::*;
use crate::text::human_bytes;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::style::Color;
use ratatui::Terminal;
use serde_json::json;
use std::time::Duration;

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

#[test]
fn events_and_mutexes_get_their_own_table_and_stay_out_of_the_sections_table() {
    let mut d = doc(1, 0);
    let rows = d["sections"].as_array_mut().expect("rows");
    rows.push(
        json!({ "name": "frame-ready", "slot": 3, "generation": 4, "kind": "event",
        "offset": 0, "size": 0, "max_size": 0, "persistent": false, "deleted": false,
        "refs": 2, "refs_by_peer": [[1, 1], [3, 1]], "creator": 1, "created": 1,
        "age_secs": 1, "wakes": 4, "signaled": true, "signals": 9, "waiters": [3] }),
    );
    rows.push(
        json!({ "name": "table-lock", "slot": 4, "generation": 5, "kind": "mutex",
        "offset": 0, "size": 0, "max_size": 0, "persistent": false, "deleted": false,
        "refs": 2, "refs_by_peer": [[1, 1], [3, 1]], "creator": 1, "created": 1,
        "age_secs": 1, "wakes": 0, "owner": 3, "queued": 1, "abandoned": 2 }),
    );
    let app = app_with(d);
    assert_eq!(app.sections().len(), 3, "sections only");
    let s = lines(&draw(&app));
    let title = row_of(&s, "events & mutexes (2)");
    let ev = row_of(&s, "frame-ready");
    let mx = row_of(&s, "table-lock");
    assert!(ev > title && mx > title, "{}", s.join("\n"));
    assert!(
        s[ev].contains("signaled") && s[ev].contains('9'),
        "{}",
        s[ev]
    );
    assert!(s[mx].contains("owner 3"), "{}", s[mx]);
    // Without any, no such table.
    let plain = screen(&app_with(doc(1, 0)));
    assert!(!plain.contains("events & mutexes"), "{plain}");
}
