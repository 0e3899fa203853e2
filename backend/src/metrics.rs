//! Prometheus text exposition (format 0.0.4) of vshmd's state, for `vshmd --metrics ADDR`
//! and `vshmctl metrics`.

use std::fmt::Write;

use crate::arbiter::StatusReport;
use crate::telemetry::{RequestStats, LATENCY_BUCKETS_US};

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    let _ = writeln!(out, "{name} {value}");
}

/// A Prometheus label value: backslash, double quote and newline escaped.
fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the metrics.
pub fn render(status: &StatusReport, requests: &RequestStats) -> String {
    let mut out = String::new();
    let r = &status.region;
    gauge(
        &mut out,
        "vshm_region_bytes",
        "Size of the shared region.",
        r.size,
    );
    gauge(
        &mut out,
        "vshm_heap_bytes",
        "Size of the data heap.",
        r.heap_size,
    );
    gauge(
        &mut out,
        "vshm_heap_used_bytes",
        "Heap bytes reserved by objects.",
        r.used,
    );
    gauge(&mut out, "vshm_heap_free_bytes", "Heap bytes free.", r.free);
    gauge(
        &mut out,
        "vshm_heap_largest_free_bytes",
        "Largest free heap extent.",
        r.largest_free,
    );
    gauge(
        &mut out,
        "vshm_name_area_free_bytes",
        "Name area bytes no object's name holds.",
        r.name_area_free,
    );
    gauge(
        &mut out,
        "vshm_resident_bytes",
        "Host memory the region holds.",
        r.resident,
    );
    family(
        &mut out,
        "vshm_sections",
        "gauge",
        "Objects in the table, by state.",
    );
    let deleted = status.sections.iter().filter(|s| s.deleted).count();
    let _ = writeln!(
        out,
        "vshm_sections{{state=\"live\"}} {}",
        status.sections.len() - deleted
    );
    let _ = writeln!(out, "vshm_sections{{state=\"deleted\"}} {deleted}");
    let connected = status.peers.iter().filter(|p| p.connected).count();
    gauge(
        &mut out,
        "vshm_peers_connected",
        "Peers attached now.",
        connected,
    );
    let c = &status.counters;
    counter(
        &mut out,
        "vshm_doorbells_total",
        "Doorbells rung by peers.",
        c.doorbells,
    );
    counter(
        &mut out,
        "vshm_reclaims_total",
        "Peers reclaimed after they left.",
        c.reclaims,
    );
    counter(
        &mut out,
        "vshm_objects_created_total",
        "Objects created.",
        c.created,
    );
    counter(
        &mut out,
        "vshm_objects_destroyed_total",
        "Objects destroyed.",
        c.destroyed,
    );
    counter(
        &mut out,
        "vshm_repairs_total",
        "Lease words repaired.",
        c.repairs,
    );
    counter(
        &mut out,
        "vshm_heals_total",
        "Host-written header parts (superblock, peer or object entries) rewritten after a peer scribbled on them.",
        c.heals,
    );
    gauge(
        &mut out,
        "vshm_quarantined_bytes",
        "Heap bytes of destroyed sections waiting for peers to acknowledge (FORMAT.md §11a).",
        status.region.quarantined,
    );
    family(
        &mut out,
        "vshm_quarantine_released_total",
        "counter",
        "Quarantined ranges released, by why: every peer acknowledged, or the time was up.",
    );
    let _ = writeln!(
        out,
        "vshm_quarantine_released_total{{why=\"acknowledged\"}} {}",
        c.quarantine_acked
    );
    let _ = writeln!(
        out,
        "vshm_quarantine_released_total{{why=\"expired\"}} {}",
        c.quarantine_expired
    );
    counter(
        &mut out,
        "vshm_revoked_handles_total",
        "Handles peers found revoked: objects they held were destroyed behind their backs.",
        c.revoked_handles,
    );
    counter(
        &mut out,
        "vshm_unclaimed_expired_total",
        "Creator holds dropped because the creator never took them.",
        c.unclaimed_expired,
    );
    counter(
        &mut out,
        "vshm_denials_total",
        "Requests refused for lack of rights.",
        c.denials,
    );
    family(
        &mut out,
        "vshm_policy_denials_total",
        "counter",
        "Peer requests refused by their policy, by status.",
    );
    let _ = writeln!(
        out,
        "vshm_policy_denials_total{{status=\"STATUS_ACCESS_DENIED\"}} {}",
        c.access_denied
    );
    let _ = writeln!(
        out,
        "vshm_policy_denials_total{{status=\"STATUS_QUOTA_EXCEEDED\"}} {}",
        c.quota_exceeded
    );
    family(
        &mut out,
        "vshm_peer_policy_denials",
        "gauge",
        "Requests of each connected peer refused by its policy, with the policy it got.",
    );
    for p in status.peers.iter().filter(|p| p.connected) {
        let _ = writeln!(
            out,
            "vshm_peer_policy_denials{{peer=\"{}\",policy=\"{}\"}} {}",
            p.id,
            label_value(p.policy.as_deref().unwrap_or("")),
            p.denials
        );
    }
    counter(&mut out, "vshm_events_total", "Events emitted.", c.events);
    counter(
        &mut out,
        "vshm_refused_connections_total",
        "Connections refused before they got a peer id.",
        c.refused,
    );
    counter(
        &mut out,
        "vshm_wakes_total",
        "WAKE requests served.",
        c.wakes,
    );
    counter(
        &mut out,
        "vshm_wake_rings_total",
        "Wake-ups rung to peers (WAKE and mutex handoffs).",
        c.rings,
    );
    counter(
        &mut out,
        "vshm_mutex_handoffs_total",
        "Mutexes handed to a queued waiter by vshmd.",
        c.handoffs,
    );
    counter(
        &mut out,
        "vshm_mutex_abandoned_total",
        "Mutexes released because their owner died holding them.",
        c.abandoned,
    );
    let live_signals: u64 = status
        .sections
        .iter()
        .filter_map(|s| s.signals)
        .fold(0, u64::wrapping_add);
    counter(
        &mut out,
        "vshm_event_signals_total",
        "Event signals counted (live and destroyed events).",
        c.retired_signals.wrapping_add(live_signals),
    );
    family(
        &mut out,
        "vshm_requests_total",
        "counter",
        "Requests answered, by op and status.",
    );
    for (op, st, n) in requests.by_op_status() {
        let _ = writeln!(
            out,
            "vshm_requests_total{{op=\"{op}\",status=\"{st}\"}} {n}"
        );
    }
    let name = "vshm_request_duration_seconds";
    family(
        &mut out,
        name,
        "histogram",
        "Host time to answer a request.",
    );
    let mut cumulative = 0;
    for (i, n) in requests.buckets().iter().enumerate() {
        cumulative += n;
        let le = LATENCY_BUCKETS_US
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum {}", requests.sum().as_secs_f64());
    let _ = writeln!(out, "{name}_count {}", requests.count());
    out
}
