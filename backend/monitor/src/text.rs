//! Plain-text renderings for vshmctl: the status tables and event lines. They read the
//! JSON documents vshmd sends and print "-" for anything missing, never panic.

use std::fmt::Write;

use serde_json::Value;

/// `1536` → `1.5 KiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)] // for people
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `3725` → `1h02m`.
pub fn human_age(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..=86_399 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86_400, (secs % 86_400) / 3600),
    }
}

/// Milliseconds since the epoch → `2026-11-22T02:50:01.123Z` (UTC).
pub fn utc(ts_ms: u64) -> String {
    let secs = ts_ms / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        ts_ms % 1000
    )
}

/// Text from a peer, a guest or /proc made safe for a terminal: C0 and C1 control characters
/// and DEL are escaped (`\u{1b}`, `\n`), everything else is kept. Section names may hold
/// any character but backslash and NUL, so a raw name could set a window title or clear the
/// screen of whoever reads the output.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn or_dash(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => printable(s),
        other => printable(&other.to_string()),
    }
}

/// The status document as tables.
pub fn status(doc: &Value) -> String {
    let mut out = String::new();
    let r = &doc["region"];
    let d = &doc["vshmd"];
    // The region's name, when the document has one (vshmd serving several says which).
    let name = match &r["name"] {
        Value::String(s) => format!("region {}, ", printable(s)),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "vshmd pid {} up {}, {name}socket {}",
        or_dash(&d["pid"]),
        human_age(n(&d["uptime_secs"])),
        or_dash(&d["socket"])
    );
    let _ = writeln!(
        out,
        "region  {} total, heap {} used / {} free, largest free {} ({} extents, fragmentation {:.0}%), {} resident",
        human_bytes(n(&r["size"])),
        human_bytes(n(&r["used"])),
        human_bytes(n(&r["free"])),
        human_bytes(n(&r["largest_free"])),
        n(&r["free_extents"]),
        r["fragmentation"].as_f64().unwrap_or(0.0) * 100.0,
        human_bytes(n(&r["resident"])),
    );
    if n(&r["quarantined"]) > 0 {
        let _ = writeln!(
            out,
            "quarantine  {} in {} range(s): destroyed, waiting for peers to acknowledge",
            human_bytes(n(&r["quarantined"])),
            n(&r["quarantined_ranges"]),
        );
    }
    let _ = writeln!(
        out,
        "\nPEER  LABEL             PID      CONNECTED  SINCE      HANDLES  HELD        POLICY        DENIED  VIA"
    );
    let mut advisories = Vec::new();
    for p in doc["peers"].as_array().into_iter().flatten() {
        let since = p["connected_since"]
            .as_u64()
            .map_or_else(|| "-".to_string(), |t| utc(t * 1000)[11..19].to_string());
        for a in p["advisories"].as_array().into_iter().flatten() {
            advisories.push(format!("peer {}: {}", n(&p["id"]), or_dash(a)));
        }
        let _ = writeln!(
            out,
            "{:<5} {:<17} {:<8} {:<10} {:<10} {:<8} {:<11} {:<13} {:<7} {}",
            n(&p["id"]),
            or_dash(&p["label"]),
            or_dash(&p["pid"]),
            if p["connected"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            since,
            n(&p["handles"]),
            human_bytes(n(&p["bytes_held"])),
            // No policy given: everything allowed (vshmd without --config).
            p["policy"]
                .as_str()
                .map_or_else(|| "-".to_string(), printable),
            n(&p["denials"]),
            // Older vshmd: no transport field, and only ivshmem.
            p["transport"]
                .as_str()
                .map_or_else(|| "ivshmem".to_string(), printable),
        );
    }
    if !advisories.is_empty() {
        let _ = writeln!(
            out,
            "\nAgainst their policy (advisory: opens are not enforced in an ivshmem region):"
        );
        for a in advisories {
            let _ = writeln!(out, "  {a}");
        }
    }
    let _ = writeln!(
        out,
        "\nNAME                             KIND     SIZE        MAX         REFS  PERSIST  CREATOR  AGE     BY PEER"
    );
    let rows = doc["sections"].as_array().into_iter().flatten();
    let (sync, sections): (Vec<&Value>, Vec<&Value>) = rows.partition(|s| is_sync(s));
    for s in sections {
        let mut name = s["name"]
            .as_str()
            .map_or_else(|| "<unnamed>".to_string(), printable);
        if s["deleted"].as_bool().unwrap_or(false) {
            name.push_str(" (deleted)");
        }
        let by_peer: Vec<String> = s["refs_by_peer"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pair| format!("{}:{}", n(&pair[0]), n(&pair[1])))
            .collect();
        let _ = writeln!(
            out,
            "{:<32} {:<8} {:<11} {:<11} {:<5} {:<8} {:<8} {:<7} {}",
            name,
            or_dash(&s["kind"]),
            human_bytes(n(&s["size"])),
            human_bytes(n(&s["max_size"])),
            n(&s["refs"]),
            if s["persistent"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "no"
            },
            n(&s["creator"]),
            human_age(n(&s["age_secs"])),
            by_peer.join(" "),
        );
    }
    if !sync.is_empty() {
        sync_table(&mut out, &sync);
    }
    blocks_table(doc, &mut out);
    out
}

/// An event or a mutex row of the status document (they share the `sections` array with a
/// `kind`); anything else, including a row without a kind, is shown as a section.
fn is_sync(s: &Value) -> bool {
    matches!(s["kind"].as_str(), Some("event" | "mutex"))
}

fn name_of(s: &Value) -> String {
    let mut name = s["name"]
        .as_str()
        .map_or_else(|| "<unnamed>".to_string(), printable);
    if s["deleted"].as_bool().unwrap_or(false) {
        name.push_str(" (deleted)");
    }
    name
}

/// Events and mutexes: their state instead of sizes.
fn sync_table(out: &mut String, rows: &[&Value]) {
    let _ = writeln!(
        out,
        "\nNAME                             KIND     STATE        WAITING      SIGNALS  WAKES    ABANDONED  REFS  BY PEER"
    );
    let ids = |v: &Value| {
        let ids: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|id| n(id).to_string())
            .collect();
        if ids.is_empty() {
            "-".to_string()
        } else {
            ids.join(",")
        }
    };
    for s in rows {
        let by_peer: Vec<String> = s["refs_by_peer"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|pair| format!("{}:{}", n(&pair[0]), n(&pair[1])))
            .collect();
        let (state, waiting) = if s["kind"] == "event" {
            let state = match s["signaled"].as_bool() {
                Some(true) => "signaled",
                Some(false) => "clear",
                None => "-",
            };
            let manual = if s["manual_reset"].as_bool() == Some(true) {
                " (manual)"
            } else {
                ""
            };
            (format!("{state}{manual}"), ids(&s["waiters"]))
        } else {
            let state = match s["owner"].as_u64() {
                Some(id) => format!("owner {id}"),
                None => "free".to_string(),
            };
            (state, format!("{} queued", n(&s["queued"])))
        };
        let _ = writeln!(
            out,
            "{:<32} {:<8} {:<12} {:<12} {:<8} {:<8} {:<10} {:<5} {}",
            name_of(s),
            or_dash(&s["kind"]),
            state,
            waiting,
            s["signals"]
                .as_u64()
                .map_or_else(|| "-".to_string(), |v| v.to_string()),
            n(&s["wakes"]),
            s["abandoned"]
                .as_u64()
                .map_or_else(|| "-".to_string(), |v| v.to_string()),
            n(&s["refs"]),
            by_peer.join(" "),
        );
    }
}

/// The sections with a block allocator, as one more table; nothing at all if none has one
/// (so the output of regions without allocators is unchanged).
fn blocks_table(doc: &Value, out: &mut String) {
    let with: Vec<&Value> = doc["sections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["blocks"].is_object())
        .collect();
    if with.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nBLOCKS IN                        IN USE      BLOCKS    FREE        LARGEST     FRAG"
    );
    for s in with {
        let b = &s["blocks"];
        let name = s["name"]
            .as_str()
            .map_or_else(|| "<unnamed>".to_string(), printable);
        let _ = writeln!(
            out,
            "{:<32} {:<11} {:<9} {:<11} {:<11} {:.0}%",
            name,
            human_bytes(n(&b["in_use"])),
            n(&b["count"]),
            human_bytes(n(&b["free"])),
            human_bytes(n(&b["largest_free"])),
            b["fragmentation"].as_f64().unwrap_or(0.0) * 100.0,
        );
    }
}

/// One event as a line: time, kind, then what is known.
pub fn event(e: &Value) -> String {
    let mut line = format!("{} {:<14}", utc(n(&e["ts_ms"])), or_dash(&e["kind"]));
    if let Some(p) = e["peer"].as_u64() {
        let _ = write!(line, " peer={p}");
    }
    if let Some(name) = e["name"].as_str() {
        // Debug quoting escapes every control character (and quotes) already.
        let _ = write!(line, " {name:?}");
    }
    if let Some(slot) = e["slot"].as_u64() {
        let _ = write!(line, " slot={slot}");
    }
    if let Some(size) = e["size"].as_u64() {
        let _ = write!(line, " size={}", human_bytes(size));
    }
    if let Some(st) = e["status"].as_str() {
        let _ = write!(line, " {}", printable(st));
    }
    if let Some(d) = e["detail"].as_str() {
        let _ = write!(line, " ({})", printable(d));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_are_rendered_in_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_795_315_801_123), "2026-11-22T02:50:01.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn sizes_and_ages_read_naturally() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(3725), "1h02m");
    }

    #[test]
    fn the_status_tables_show_peers_and_sections_and_survive_missing_fields() {
        let doc = json!({
            "vshmd": {"pid": 7, "uptime_secs": 61, "socket": "/run/vshm.sock"},
            "region": {"size": 67108864, "used": 1048576, "free": 1, "largest_free": 1,
                       "free_extents": 1, "fragmentation": 0.0, "resident": 4096},
            "peers": [{"id": 3, "label": "guest-a", "pid": 99, "connected": true,
                       "connected_since": 1795315801u64, "handles": 2, "bytes_held": 1048576,
                       "policy": "web", "denials": 4,
                       "advisories": ["holds 9 handles; policy \"web\" max_handles 8"]}],
            "sections": [{"name": "frames", "kind": "section", "size": 4096, "max_size": 1048576,
                          "refs": 2, "persistent": true, "creator": 3, "age_secs": 5,
                          "refs_by_peer": [[3, 2]], "deleted": false},
                         {"name": null, "deleted": true}],
        });
        let text = status(&doc);
        assert!(text.contains("guest-a"), "{text}");
        assert!(text.contains(" web ") && text.contains(" 4 "), "{text}");
        // A document without a transport field (an older vshmd) shows ivshmem.
        assert!(text.contains(" ivshmem\n"), "{text}");
        assert!(text.contains("peer 3: holds 9 handles"), "{text}");
        assert!(text.contains("frames") && text.contains("3:2"), "{text}");
        assert!(text.contains("<unnamed> (deleted)"), "{text}");
        assert!(text.contains("64.0 MiB total"), "{text}");
        assert!(
            !status(&json!({})).is_empty(),
            "an empty document still renders"
        );
    }

    #[test]
    fn events_and_mutexes_get_their_own_table_and_sections_render_as_before() {
        let section = json!({"name": "frames", "kind": "section", "size": 4096,
            "max_size": 1048576, "refs": 2, "persistent": true, "creator": 3, "age_secs": 5,
            "refs_by_peer": [[3, 2]], "deleted": false});
        let only_sections = json!({"sections": [section.clone()]});
        let before = status(&only_sections);
        assert!(
            !before.contains("STATE"),
            "no sync table without sync objects"
        );
        let doc = json!({"sections": [
            section,
            {"name": "ready", "kind": "event", "refs": 2, "refs_by_peer": [[3, 1], [4, 1]],
             "wakes": 3, "signaled": true, "manual_reset": true, "signals": 7,
             "waiters": [4], "deleted": false},
            {"name": "lock", "kind": "mutex", "refs": 1, "refs_by_peer": [[3, 1]],
             "wakes": 0, "owner": 3, "queued": 2, "abandoned": 1, "deleted": false},
            {"name": "idle", "kind": "mutex", "owner": null, "queued": 0, "abandoned": 0}
        ]});
        let text = status(&doc);
        assert!(
            text.starts_with(&before),
            "the sections table is unchanged:\n{text}"
        );
        let line = |needle: &str| {
            text.lines()
                .find(|l| l.starts_with(needle))
                .unwrap_or_else(|| panic!("{needle} in {text}"))
                .to_string()
        };
        assert!(line("ready").contains("signaled (manual)"), "{text}");
        assert!(line("ready").contains(" 4 "), "{text}");
        assert!(line("lock").contains("owner 3") && line("lock").contains("2 queued"));
        assert!(line("idle").contains("free"), "{text}");
        assert_eq!(
            text.matches("ready").count(),
            1,
            "not in the sections table"
        );
    }

    #[test]
    fn an_abandoned_event_line_names_the_mutex_and_the_peer() {
        let line = event(
            &json!({"ts_ms": 0, "kind": "abandoned", "peer": 3, "name": "lock",
                                 "slot": 2, "detail": "its owner left; handed to peer 4"}),
        );
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z abandoned      peer=3 \"lock\" slot=2 (its owner left; handed to peer 4)"
        );
    }

    #[test]
    fn event_lines_carry_what_the_event_knows() {
        let line = event(
            &json!({"ts_ms": 0, "kind": "created", "peer": 2, "name": "x", "slot": 1, "size": 4096}),
        );
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z created        peer=2 \"x\" slot=1 size=4.0 KiB"
        );
    }

    #[test]
    fn names_labels_and_details_cannot_drive_the_terminal() {
        let evil = "\x1b]0;pwned\x07\x1b[2J\nPEER 9 root\u{9b}\x7f";
        let doc = json!({
            "vshmd": {"pid": 7, "uptime_secs": 1, "socket": evil},
            "peers": [{"id": 3, "label": evil, "pid": 99, "connected": true}],
            "sections": [{"name": evil, "kind": evil, "deleted": true}],
        });
        let text = status(&doc);
        for bad in ['\x1b', '\x07', '\u{9b}', '\x7f'] {
            assert!(!text.contains(bad), "{bad:?} in {text}");
        }
        // No injected line: every line is one the renderer wrote.
        assert_eq!(text.lines().count(), 8, "{text}");
        assert!(!text.lines().any(|l| l.starts_with("PEER 9")), "{text}");
        assert!(
            text.contains("\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\nPEER 9 root"),
            "{text}"
        );
        assert!(text.contains(" (deleted)"), "{text}");

        let line = event(&json!({"ts_ms": 0, "kind": evil, "peer": 2, "name": evil,
                                 "status": evil, "detail": evil}));
        for bad in ['\x1b', '\x07', '\n', '\u{9b}', '\x7f'] {
            assert!(!line.contains(bad), "{bad:?} in {line}");
        }
        assert!(line.contains("pwned"), "{line}");
    }

    #[test]
    fn printable_escapes_controls_only() {
        assert_eq!(
            printable("a\tb\u{1b}c\u{85}d\u{7f}"),
            "a\\tb\\u{1b}c\\u{85}d\\u{7f}"
        );
        assert_eq!(printable("grüße 🙂 \"x\""), "grüße 🙂 \"x\"");
    }
}
