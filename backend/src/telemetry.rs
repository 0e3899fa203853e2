//! What vshmd tells its monitor: events (an outbox the event loop drains into a ring and
//! out to watchers) and request statistics (counts by op and status, a latency histogram).
//! All of it lives in the single event-loop thread: no locks, and the hot path only bumps
//! counters and pushes into a reused Vec.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use vshm_format::layout::op;
use vshm_format::{ObjectSlot, PeerId, Status};

/// One thing that happened.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Event {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// What: peer_connected, peer_gone, created, opened, closed, grown, deleted, destroyed,
    /// reclaimed, denied, advisory, repaired, abandoned, error.
    pub kind: &'static str,
    /// The peer involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<u16>,
    /// The object's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The object's slot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
    /// A size (created: max size; grown: new size).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The NTSTATUS name of a refused request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Event {
    /// An event of `kind` now, with nothing else filled in.
    pub fn now(kind: &'static str) -> Event {
        let ts_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Event {
            ts_ms,
            kind,
            peer: None,
            name: None,
            slot: None,
            size: None,
            status: None,
            detail: None,
        }
    }
    /// With a peer.
    pub fn peer(mut self, id: PeerId) -> Event {
        self.peer = Some(id.raw());
        self
    }
    /// With an object.
    pub fn object(mut self, slot: ObjectSlot, name: Option<&str>) -> Event {
        self.slot = Some(slot.raw());
        self.name = name.map(str::to_owned);
        self
    }
    /// With a size.
    pub fn size(mut self, size: u64) -> Event {
        self.size = Some(size);
        self
    }
    /// With a status.
    pub fn status(mut self, status: Status) -> Event {
        self.status = Some(status.name());
        self
    }
    /// With free text.
    /// With free text (cut to [`DETAIL_MAX`] bytes: events are kept in a ring and sent
    /// to every watcher, so no client may make them big).
    pub fn detail(mut self, detail: impl Into<String>) -> Event {
        let mut d: String = detail.into();
        if d.len() > DETAIL_MAX {
            let mut cut = DETAIL_MAX;
            while !d.is_char_boundary(cut) {
                cut -= 1;
            }
            d.truncate(cut);
            d.push('…');
        }
        self.detail = Some(d);
        self
    }
}

/// Longest event detail, in bytes.
pub const DETAIL_MAX: usize = 256;

/// Upper bounds (µs) of the request latency histogram buckets; the last is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 9] = [1, 2, 5, 10, 20, 50, 100, 500, 1000];

/// Request counts by (op, status) and host-side latency.
#[derive(Debug, Clone, Default)]
pub struct RequestStats {
    by_op_status: BTreeMap<(&'static str, &'static str), u64>,
    buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    sum: Duration,
    count: u64,
}

/// The name of a mailbox op.
pub fn op_name(code: u32) -> &'static str {
    match code {
        op::CREATE => "create",
        op::DELETE => "delete",
        op::GROW => "grow",
        op::WAKE => "wake",
        op::LOCK => "lock",
        op::UNLOCK => "unlock",
        op::CANCEL => "cancel",
        _ => "invalid",
    }
}

impl RequestStats {
    /// Records one answered request.
    pub fn record(&mut self, op: u32, status: u32, took: Duration) {
        let status = Status::from_code(status).map_or("UNKNOWN", Status::name);
        *self.by_op_status.entry((op_name(op), status)).or_default() += 1;
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[i] += 1;
        self.sum += took;
        self.count += 1;
    }

    /// Counts by (op, status name).
    pub fn by_op_status(&self) -> impl Iterator<Item = (&'static str, &'static str, u64)> + '_ {
        self.by_op_status.iter().map(|(&(o, s), &n)| (o, s, n))
    }

    /// Per-bucket (non-cumulative) counts; the last is the +Inf bucket.
    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }

    /// Total time spent answering.
    pub fn sum(&self) -> Duration {
        self.sum
    }

    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_details_are_cut_to_a_bounded_size_on_a_character_boundary() {
        let e = Event::now("denied").detail("é".repeat(10_000));
        let d = e.detail.expect("detail");
        assert!(d.len() <= DETAIL_MAX + '…'.len_utf8(), "{}", d.len());
        assert!(d.ends_with('…'));
    }

    #[test]
    fn requests_land_in_the_right_latency_bucket_and_status_row() {
        let mut s = RequestStats::default();
        s.record(op::CREATE, 0, Duration::from_micros(3));
        s.record(op::CREATE, 0xC000_0034, Duration::from_micros(2000));
        s.record(77, 0xC000_000D, Duration::from_nanos(10));
        assert_eq!(s.buckets()[0], 1, "10 ns ≤ 1 µs");
        assert_eq!(s.buckets()[2], 1, "3 µs ≤ 5 µs");
        assert_eq!(
            s.buckets()[LATENCY_BUCKETS_US.len()],
            1,
            "2 ms is past the last bound"
        );
        let rows: Vec<_> = s.by_op_status().collect();
        assert!(rows.contains(&("create", "STATUS_SUCCESS", 1)));
        assert!(rows.contains(&("create", "STATUS_OBJECT_NAME_NOT_FOUND", 1)));
        assert!(rows.contains(&("invalid", "STATUS_INVALID_PARAMETER", 1)));
        assert_eq!(s.count(), 3);
    }
}
