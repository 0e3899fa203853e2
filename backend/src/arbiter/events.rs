//! The arbiter's telemetry: the event outbox the event loop drains, the counts the daemon
//! reports from outside (doorbells, refused connections, denied admin requests), and
//! `observe_handles`, which turns changes in the refcount cells into `opened`/`closed`
//! events (opens and closes never reach the host), and `advisory` events for opens a
//! peer's policy does not allow.

use vshm_format::{PeerSlot, Status};

use super::{Arbiter, Backing};
use crate::telemetry::Event;

impl<M: Backing> Arbiter<M> {
    /// Adds an event to the outbox (the daemon adds its own: peers connecting, leaving).
    pub fn emit(&mut self, e: Event) {
        self.counters.events += 1;
        self.events.push(e);
    }

    /// Takes the events emitted since the last call.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// Records that a peer rang the host.
    pub fn count_doorbell(&mut self) {
        self.counters.doorbells += 1;
    }

    /// Records a connection refused before it got a peer id; reported once per second at
    /// most (a client retrying in a loop must not flood the log or the event stream).
    pub fn count_refusal(&mut self, why: &'static str) {
        self.counters.refused += 1;
        let now = std::time::Instant::now();
        if self
            .last_refusal_report
            .is_some_and(|t| now.duration_since(t).as_secs() < 1)
        {
            return;
        }
        self.last_refusal_report = Some(now);
        tracing::warn!("refusing a client: {why}");
        self.emit(Event::now("error").detail(format!("refused a client: {why}")));
    }

    /// Records an admin request refused on the control socket.
    pub fn count_denial(&mut self, what: &str) {
        self.counters.denials += 1;
        self.emit(
            Event::now("denied")
                .status(Status::AccessDenied)
                .detail(what),
        );
    }

    /// Forgets what `observe_handles` last saw for peer slot `peer` (it changes hands).
    pub(super) fn forget_seen(&mut self, peer: PeerSlot) {
        let max_peers = self.layout.max_peers as usize;
        for obj in 0..self.layout.max_objects as usize {
            if let Some(c) = self.seen.get_mut(obj * max_peers + peer.raw() as usize) {
                *c = 0;
            }
        }
    }

    /// Compares every connected peer's handle counts with the last look and emits `opened` /
    /// `closed` events for the differences: opens and closes never reach the host, so this
    /// is how the monitor sees them (at the timer's pace, coalesced).
    pub fn observe_handles(&mut self) {
        let max_peers = self.layout.max_peers as usize;
        for slot in self.object_slots() {
            let Some(name) = self.objects[slot.raw() as usize]
                .as_ref()
                .map(|r| r.name.clone())
            else {
                continue;
            };
            for p in (0..self.layout.max_peers).map(PeerSlot) {
                let rec = &self.peers[p.raw() as usize];
                let now = if rec.connected {
                    self.cell_count(p, slot)
                } else {
                    0
                };
                let i = slot.raw() as usize * max_peers + p.raw() as usize;
                let before = self.seen.get(i).copied().unwrap_or(0);
                if now == before {
                    continue;
                }
                let id = rec.id;
                if let Some(c) = self.seen.get_mut(i) {
                    *c = now;
                }
                // A departed peer's counts vanish with it: `reclaimed` already says so.
                if !self.peers[p.raw() as usize].connected {
                    continue;
                }
                let (kind, n) = if now > before {
                    ("opened", now - before)
                } else {
                    ("closed", before - now)
                };
                self.emit(
                    Event::now(kind)
                        .peer(id)
                        .object(slot, name.as_deref())
                        .detail(format!("{n} handle(s), {now} now")),
                );
                // Opens never reach vshmd: a policy's `open` patterns can only be reported.
                if now > before {
                    if let Err(d) = self.may_open(p, name.as_deref()) {
                        self.emit(
                            Event::now("advisory")
                                .peer(id)
                                .object(slot, name.as_deref())
                                .detail(format!("opened against its policy: {d}")),
                        );
                    }
                }
            }
        }
    }
}
