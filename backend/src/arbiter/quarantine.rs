//! Quarantine (docs/FORMAT.md §11a): the memory of a destroyed section is not handed to
//! anyone else until every peer that was connected when it died has acknowledged that it
//! checked its handles (or has left), or until the quarantine time has passed.
//!
//! Why: any peer can make an object look closed while an honest peer still holds it (zero
//! the holder's refcount cell, store CLOSED in the lease word, ring). Nothing in shared
//! memory tells that from an honest last close, so vshmd treats every destroy alike: it
//! bumps `revoke_seq`, rings every connected peer, and waits. A peer's library, rung, checks
//! the handles it holds; one whose object is gone was revoked behind its back, and the
//! library stops using that memory *before* it acknowledges. So the intruder's next create
//! never gets memory an honest peer still writes.
//!
//! Also here: creator holds that are never claimed expire (`expire_unclaimed`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vshm_format::layout::{holder_bit, refcell, VECTOR_CONTROL};
use vshm_format::lease::close_if_unheld;
use vshm_format::revoke;
use vshm_format::{ObjectSlot, PeerId, PeerSlot, RegionOffset};

use super::reclaim::Release;
use super::{Arbiter, Backing};
use crate::telemetry::Event;

/// How long destroyed memory waits at most for peers that do not acknowledge (a guest
/// whose processes share one peer cannot acknowledge for each other; an old library does
/// not know how). vshmd's `--quarantine-ms` sets it.
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(2);

/// How long the host-set holder bit of an object's creator waits for the creator to take
/// its hold (it normally does so right after the CREATE response) before the host drops it.
pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// The value the host stores in a peer's refcount cell while it holds that cell's lock
/// (`expire_unclaimed`): the lock bit with token 1, which every peer reads as a live owner
/// (a host process's token; pid 1, init, in a guest), so nobody steals it.
const HOST_CELL_LOCK: u32 = refcell::REF_LOCK | 1;

/// At most one `revoked` log line and event per peer per this interval: the count is a
/// peer-written word, and any peer can bump another's and ring in a loop.
const REVOKED_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// The `waiting` bit of a range only time releases (no peer slot has it: holder bits stop
/// below bit 62).
pub(super) const LINGER: u64 = 1 << 63;

/// One destroyed range waiting.
#[derive(Debug, Clone)]
pub(super) struct Quarantined {
    pub offset: RegionOffset,
    pub len: u64,
    /// The `revoke_seq` published when it entered.
    pub seq: u64,
    /// Peer slots (holder-bit mask) still to acknowledge.
    pub waiting: u64,
    pub since: Instant,
}

/// The quarantine's state.
#[derive(Debug)]
pub(super) struct QuarantineState {
    pub entries: Vec<Quarantined>,
    /// The last `revoke_seq` published.
    pub seq: u64,
    pub timeout: Duration,
    pub claim_timeout: Duration,
    /// Per peer slot: the `revoked_handles` count already reported.
    pub reported: Vec<u64>,
    /// Per peer slot: when it was last logged, and the handles counted since then.
    pub last_report: Vec<Option<(Instant, u64)>>,
}

impl QuarantineState {
    /// Takes `[offset, offset + len)` out of the quarantined ranges (it lies inside one),
    /// leaving what is around it quarantined.
    pub fn carve(&mut self, offset: RegionOffset, len: u64) {
        let end = offset.raw().saturating_add(len);
        let mut kept = Vec::with_capacity(self.entries.len() + 1);
        for q in self.entries.drain(..) {
            let q_end = q.offset.raw().saturating_add(q.len);
            if q_end <= offset.raw() || end <= q.offset.raw() {
                kept.push(q);
                continue;
            }
            if q.offset.raw() < offset.raw() {
                kept.push(Quarantined {
                    len: offset.raw() - q.offset.raw(),
                    ..q.clone()
                });
            }
            if end < q_end {
                kept.push(Quarantined {
                    offset: RegionOffset(end),
                    len: q_end - end,
                    ..q
                });
            }
        }
        self.entries = kept;
    }

    pub fn new(max_peers: u32) -> QuarantineState {
        QuarantineState {
            entries: Vec::new(),
            seq: 0,
            timeout: DEFAULT_QUARANTINE,
            claim_timeout: DEFAULT_CLAIM_TIMEOUT,
            reported: vec![0; max_peers as usize],
            last_report: vec![None; max_peers as usize],
        }
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|q| q.len).sum()
    }
}

impl<M: Backing> Arbiter<M> {
    /// Sets how long destroyed memory waits at most for acknowledgements (also published
    /// as `Superblock::quarantine_ms`, so libraries know how long a retry may take).
    pub fn set_quarantine(&mut self, timeout: Duration) {
        self.quarantine.timeout = timeout;
        self.publish_superblock_extras();
    }

    /// Sets how long a creator's host-set holder bit waits to be claimed.
    pub fn set_claim_timeout(&mut self, timeout: Duration) {
        self.quarantine.claim_timeout = timeout;
    }

    /// Bytes and ranges in quarantine now.
    pub fn quarantined(&self) -> (u64, usize) {
        (self.quarantine.bytes(), self.quarantine.entries.len())
    }

    /// Puts a destroyed range in quarantine (or, with nobody to wait for, straight back).
    pub(super) fn quarantine_range(&mut self, offset: RegionOffset, len: u64) {
        // vshmd keeps its proxies' holds itself: a destroy never takes one from them.
        let waiting = self.connected_mask() & !self.proxy_mask();
        // No one to wait for, or an operator who turned the quarantine off.
        if waiting == 0 || self.quarantine.timeout.is_zero() {
            self.heap.release(offset, len);
            return;
        }
        self.quarantine.seq += 1;
        let seq = self.quarantine.seq;
        let _ = revoke::publish_revoke_seq(&self.mem, seq);
        self.quarantine.entries.push(Quarantined {
            offset,
            len,
            seq,
            waiting,
            since: Instant::now(),
        });
        self.counters.quarantined += 1;
        let ids: Vec<_> = self
            .peer_slots()
            .filter(|(_, p)| p.connected)
            .map(|(_, p)| p.id)
            .collect();
        for id in ids {
            self.rings.push((id, VECTOR_CONTROL));
        }
    }

    /// Puts a range a departed vhost-user VM had mapped in quarantine for the whole
    /// quarantine time ([`LINGER`] is never acknowledged); ivshmem peers never held it, so
    /// nobody is rung.
    pub(super) fn quarantine_lingering(&mut self, offset: RegionOffset, len: u64) {
        if self.quarantine.timeout.is_zero() {
            self.heap.release(offset, len);
            return;
        }
        self.quarantine.entries.push(Quarantined {
            offset,
            len,
            seq: self.quarantine.seq,
            waiting: LINGER,
            since: Instant::now(),
        });
        self.counters.quarantined += 1;
    }

    /// A peer left for good (its process is gone): it holds nothing, stop waiting for it.
    pub(super) fn quarantine_forget(&mut self, slot: PeerSlot) {
        for q in &mut self.quarantine.entries {
            q.waiting &= !holder_bit(slot);
        }
        if let Some(r) = self.quarantine.reported.get_mut(slot.raw() as usize) {
            *r = 0;
        }
        if let Some(r) = self.quarantine.last_report.get_mut(slot.raw() as usize) {
            *r = None;
        }
    }

    /// Releases every range all its peers acknowledged (or whose time is up) to the heap;
    /// reports peers that found handles revoked. Runs on each sweep and before a CREATE
    /// is refused for space. Returns the bytes released.
    pub fn release_quarantine(&mut self) -> u64 {
        self.note_revocations();
        if self.quarantine.entries.is_empty() {
            return 0;
        }
        // Each connected peer's acknowledgement, as its own doorbell carried it
        // (`acknowledged`); never the mailbox word, which any peer can write.
        let acks: Vec<(u64, u64)> = self
            .peer_slots()
            .filter(|(_, p)| p.connected)
            .map(|(slot, p)| (holder_bit(slot), p.acked))
            .collect();
        let timeout = self.quarantine.timeout;
        let mut released = 0;
        let mut keep = Vec::with_capacity(self.quarantine.entries.len());
        for mut q in std::mem::take(&mut self.quarantine.entries) {
            for &(bit, seq) in &acks {
                if seq >= q.seq {
                    q.waiting &= !bit;
                }
            }
            if q.waiting == 0 {
                self.counters.quarantine_acked += 1;
            } else if q.since.elapsed() >= timeout {
                self.counters.quarantine_expired += 1;
            } else {
                keep.push(q);
                continue;
            }
            self.heap.release(q.offset, q.len);
            released += q.len;
        }
        self.quarantine.entries = keep;
        released
    }

    /// Peer `id` rang the host's vector 1 with `value` on its own eventfd: an
    /// acknowledgement of `revoke_seq` values up to what the value vouches for (FORMAT.md
    /// §11a). Never above what was published: a peer that acknowledges ahead (a scribbled
    /// `revoke_seq`) is credited with no more than is real. Releases what that completes.
    pub fn acknowledged(&mut self, id: PeerId, value: u64) {
        let seq = revoke::acked_by_ring_value(value).min(self.quarantine.seq);
        let Some(slot) = self.slot_of(id) else {
            return;
        };
        let Some(p) = self.peers.get_mut(slot.raw() as usize) else {
            return;
        };
        if seq <= p.acked {
            return;
        }
        p.acked = seq;
        self.release_quarantine();
    }

    /// Whether `wanted` bytes would fit if the quarantine were empty.
    pub(super) fn fits_after_quarantine(&self, wanted: u64) -> bool {
        let mut heap = self.heap.clone();
        for q in &self.quarantine.entries {
            heap.release(q.offset, q.len);
        }
        heap.allocate(wanted).is_some()
    }

    /// Reports peers whose library found handles revoked (their `revoked_handles` grew).
    fn note_revocations(&mut self) {
        let mut found = Vec::new();
        for (slot, p) in self.peer_slots() {
            if !p.connected {
                continue;
            }
            let Ok((_, n)) = revoke::acknowledgement(&self.mem, &self.layout, slot) else {
                continue;
            };
            let before = self.quarantine.reported[slot.raw() as usize];
            if n > before {
                found.push((slot, p.id, n, n - before));
            }
        }
        let now = Instant::now();
        for (slot, id, total, new) in found {
            let i = slot.raw() as usize;
            self.quarantine.reported[i] = total;
            // Peer-written: saturate rather than overflow (a forged u64::MAX).
            self.counters.revoked_handles = self.counters.revoked_handles.saturating_add(new);
            // Counted every time; logged and reported at most once a second per peer, with
            // what went unreported since.
            let new = match self.quarantine.last_report[i] {
                Some((at, n)) if now.duration_since(at) < REVOKED_REPORT_INTERVAL => {
                    self.quarantine.last_report[i] = Some((at, n.saturating_add(new)));
                    continue;
                }
                previous => {
                    self.quarantine.last_report[i] = Some((now, 0));
                    new.saturating_add(previous.map_or(0, |(_, n)| n))
                }
            };
            tracing::warn!(
                peer = id.raw(),
                handles = new,
                "a peer found handles revoked: objects it held were destroyed behind its back"
            );
            self.emit(Event::now("revoked").peer(id).detail(format!(
                "{new} handle(s) this peer held were destroyed behind its back (someone \
                 cleared its holds); their memory stayed in quarantine"
            )));
        }
    }

    /// Drops creator holds that were never claimed: the host sets the creator's holder bit
    /// at CREATE and the creator takes its hold right after; a creator that never does
    /// (it died or misbehaves but stays connected) must not keep a non-persistent object
    /// alive forever.
    ///
    /// Safe against a creator claiming at that very moment: the host takes the creator's
    /// own cell lock for the slot (CAS 0 → locked), which a claim needs too, so the two
    /// never overlap. A cell that is not 0 is a claim made or in progress; after the host
    /// has dropped the bit, a late claim takes the ordinary path (sets the bit unless the
    /// word is CLOSED, then checks the generation), as any open does.
    pub(super) fn expire_unclaimed(&mut self) {
        let timeout = self.quarantine.claim_timeout;
        let mut expired = Vec::new();
        for (i, rec) in self.objects.iter_mut().enumerate() {
            let Some(rec) = rec.as_mut() else { continue };
            let Some((creator, since)) = rec.unclaimed else {
                continue;
            };
            let slot = ObjectSlot(u32::try_from(i).unwrap_or(u32::MAX));
            let Some(cell) = self.layout.refcount_cell(creator, slot) else {
                rec.unclaimed = None;
                continue;
            };
            match self.mem.load_u32(cell, Ordering::Acquire) {
                Ok(0) if since.elapsed() >= timeout => expired.push((slot, creator, cell)),
                Ok(0) => {}
                // Claimed (or being claimed, or the cell is unreadable): done watching.
                _ => rec.unclaimed = None,
            }
        }
        for (slot, creator, cell) in expired {
            if let Some(rec) = self.objects[slot.raw() as usize].as_mut() {
                rec.unclaimed = None;
            }
            if self.mem.cas_u32(cell, 0, HOST_CELL_LOCK) != Ok(Ok(0)) {
                continue; // the creator is claiming right now
            }
            let dropped = self.drop_unclaimed(slot, creator);
            let _ = self.mem.store_u32(cell, 0, Ordering::Release);
            if dropped {
                self.reap(slot, Release::ToHeap);
            }
        }
    }

    /// With the creator's cell lock held: clears its holder bit and closes the word if that
    /// left it unheld. Returns whether it closed it.
    fn drop_unclaimed(&mut self, slot: ObjectSlot, creator: PeerSlot) -> bool {
        let Some(lease) = self.lease_off(slot) else {
            return false;
        };
        let bit = holder_bit(creator);
        let Ok(prev) = self.mem.fetch_and_u64(lease, !bit) else {
            return false;
        };
        if prev & bit == 0 {
            return false;
        }
        self.counters.unclaimed_expired += 1;
        let name = self.objects[slot.raw() as usize]
            .as_ref()
            .and_then(|r| r.name.clone());
        tracing::info!(slot = slot.raw(), "creator never took its hold: dropped");
        self.emit(
            Event::now("unclaimed")
                .object(slot, name.as_deref())
                .detail("its creator never took its hold; the host's hold was dropped"),
        );
        close_if_unheld(&self.mem, lease, prev & !bit).unwrap_or(false)
    }
}
