//! The text rendering of a [`Report`] (`vshmctl inspect` without `--json`).

use std::io::{self, Write};

use super::Report;
use crate::text::{human_bytes, printable};

/// A name cell for the text table: control characters escaped, cut to `width` characters.
fn name_cell(name: Option<&str>, width: usize) -> String {
    let Some(name) = name else {
        return "<unnamed>".to_string();
    };
    let escaped = printable(name);
    if escaped.chars().count() > width {
        let mut cut: String = escaped.chars().take(width.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        escaped
    }
}

/// The report as text: region summary, peer and object tables, findings.
pub fn print_human(report: &Report, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "{}: {} ({} bytes)",
        printable(&report.path),
        human_bytes(report.file_size),
        report.file_size
    )?;
    if let Some(sb) = &report.superblock {
        writeln!(
            out,
            "superblock  magic {} ({}), version {}, region {} ({} bytes), epoch {:#018x}",
            sb.magic,
            if sb.magic_ok { "ok" } else { "BAD" },
            sb.version,
            human_bytes(sb.region_size),
            sb.region_size,
            sb.epoch
        )?;
        writeln!(
            out,
            "            region id {}, {} peer slots, {} object slots, {} vectors, alignment {}, \
             namespace seq {}",
            sb.region_id, sb.max_peers, sb.max_objects, sb.vectors, sb.alignment, sb.namespace_seq
        )?;
        writeln!(
            out,
            "            heap at {:#x}, {}{}",
            sb.heap_offset,
            human_bytes(sb.heap_size),
            if sb.valid {
                ""
            } else {
                " (superblock invalid: tables not decoded)"
            }
        )?;
    }
    if let Some(h) = &report.heap {
        #[allow(clippy::cast_precision_loss)] // a percentage for people
        let pct = if h.size == 0 {
            0.0
        } else {
            h.reserved as f64 * 100.0 / h.size as f64
        };
        writeln!(
            out,
            "heap        {} object(s) reserve {} of {} ({pct:.1}%), {} free",
            h.objects,
            human_bytes(h.reserved),
            human_bytes(h.size),
            human_bytes(h.free)
        )?;
    }
    if let Some(ix) = &report.index {
        writeln!(
            out,
            "name index  {} entries at {:#x}: {} name(s), {} tombstone(s), longest probe {}, seq {}",
            ix.slots, ix.offset, ix.entries, ix.tombstones, ix.longest_probe, ix.seq
        )?;
    }
    if report.superblock.as_ref().is_some_and(|s| s.valid) {
        writeln!(out, "\nPEERS ({} connected)", report.peers.len())?;
        if !report.peers.is_empty() {
            writeln!(out, "SLOT  ID     INCARNATION  HANDLES  MAILBOX")?;
        }
        for p in &report.peers {
            let mailbox = if p.pending {
                format!("pending request {} (answered {})", p.req_seq, p.resp_seq)
            } else {
                format!("idle (seq {})", p.req_seq)
            };
            writeln!(
                out,
                "{:<5} {:<6} {:<12} {:<8} {}",
                p.slot, p.id, p.incarnation, p.handles, mailbox
            )?;
        }
        writeln!(out, "\nOBJECTS ({})", report.objects.len())?;
        if !report.objects.is_empty() {
            writeln!(
                out,
                "SLOT  NAME                             STATE     GEN     OFFSET       SIZE        \
                 MAX         PERSIST  LEASE               HANDLES (peer:n)"
            )?;
        }
        for o in &report.objects {
            let state = if o.closed {
                format!("{}*", o.state)
            } else {
                o.state.to_string()
            };
            let handles: Vec<String> = o
                .refs_by_peer
                .iter()
                .map(|(id, n)| format!("{id}:{n}"))
                .collect();
            writeln!(
                out,
                "{:<5} {:<32} {:<9} {:<7} {:<12} {:<11} {:<11} {:<8} {:<19} {}",
                o.slot,
                name_cell(o.name.as_deref(), 32),
                state,
                o.generation,
                format!("{:#x}", o.offset),
                human_bytes(o.size),
                human_bytes(o.max_size),
                if o.persistent { "yes" } else { "no" },
                o.lease,
                if handles.is_empty() {
                    "-".to_string()
                } else {
                    handles.join(" ")
                }
            )?;
        }
        if report.objects.iter().any(|o| o.closed) {
            writeln!(out, "(* closed, awaiting reap)")?;
        }
        print_sync(report, out)?;
    }
    writeln!(
        out,
        "\nFINDINGS: {} error(s), {} warning(s), {} note(s)",
        report.errors, report.warnings, report.notes
    )?;
    for f in &report.findings {
        writeln!(
            out,
            "  {:<8} {}: {}",
            f.severity.label(),
            f.where_,
            printable(&f.what)
        )?;
    }
    if report.findings_omitted > 0 {
        writeln!(out, "  ... and {} more", report.findings_omitted)?;
    }
    writeln!(
        out,
        "\n{}",
        if report.ok {
            "OK: the region is consistent with the format"
        } else {
            "ERRORS: the region is inconsistent with the format"
        }
    )
}

/// Events and mutexes: their sync words (printed only when the region has some, so a
/// region of sections prints as it always did).
fn print_sync(report: &Report, out: &mut impl Write) -> io::Result<()> {
    let rows: Vec<_> = report
        .objects
        .iter()
        .filter_map(|o| o.sync.as_ref().map(|s| (o, s)))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(out, "\nEVENTS AND MUTEXES ({})", rows.len())?;
    writeln!(
        out,
        "SLOT  NAME                             KIND    SIGNALS   WAITER SLOTS  STATE"
    )?;
    for (o, s) in rows {
        let state = match (s.signaled, s.owner_slot) {
            (Some(true), _) => "signalled".to_string(),
            (Some(false), _) => "not signalled".to_string(),
            (None, Some(slot)) => format!(
                "held by peer slot {slot} (token {}){}{}",
                s.owner_token.unwrap_or(0),
                if s.handoff { ", lockers queued" } else { "" },
                if s.abandoned { ", abandoned" } else { "" }
            ),
            (None, None) => format!("free{}", if s.abandoned { ", abandoned" } else { "" }),
        };
        let waiters: Vec<String> = s.waiter_slots.iter().map(u32::to_string).collect();
        writeln!(
            out,
            "{:<5} {:<32} {:<7} {:<9} {:<13} {}",
            o.slot,
            name_cell(o.name.as_deref(), 32),
            o.kind,
            s.signals,
            if waiters.is_empty() {
                "-".to_string()
            } else {
                waiters.join(",")
            },
            state
        )?;
    }
    Ok(())
}
