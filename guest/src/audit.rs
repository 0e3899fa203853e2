//! The library's side of quarantine (docs/FORMAT.md §11a): a record of the holds this
//! process took, checked whenever vshmd announces a destroy (`Superblock::revoke_seq`), so a
//! hold whose object was destroyed behind this process's back is found, its memory fenced
//! off from this process, and vshmd told it may hand the memory on.
//!
//! One look at the object table is not proof: any peer can scribble an entry for the
//! 200 ms until vshmd heals it. So a hold whose object looks gone is only *suspect*; it is
//! looked at again after two heal periods ([`CONFIRM_AFTER`]) and only then revoked, and
//! the process acknowledges a `revoke_seq` only when no hold is suspect. The
//! acknowledgement goes through the transport's attributable channel
//! ([`Transport::acknowledge`]), never through shared memory, which any peer could forge.
//!
//! With `std` the record is a map under a mutex; without it (a driver or RTOS) there is
//! no record, each handle checks its own object on every access, and the peer never
//! acknowledges (vshmd then waits `quarantine_ms`).

use core::time::Duration;

use vshm_format::object::ObjectHead;
use vshm_format::{Generation, ObjectSlot, RegionOffset};

pub use crate::transport::HookContext;
#[allow(unused_imports)] // the doc links
use crate::Transport;

/// How long a hold whose object looks gone stays suspect before it is revoked: two of
/// vshmd's 200 ms heal periods and a margin (as a peer's own entry, `Namespace::attached`).
/// Well under vshmd's default `quarantine_ms` (2 s), which a host peer's confirmation must
/// beat.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub const CONFIRM_AFTER: Duration = Duration::from_millis(450);

/// While a hold is suspect, how often it is looked at (a scribbled entry is healed within
/// 200 ms: looking often finds the healed moment of an object that is alive).
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub const LOOK_EVERY: Duration = Duration::from_millis(40);

/// Looks further apart than this do not make an unbroken run: the object may have looked
/// alive in between.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub const LOOK_GAP: Duration = Duration::from_millis(100);

/// How often the holds are checked even when `revoke_seq` did not move (on a ring, or an
/// operation): a peer may have scribbled `revoke_seq` to the value the next destroy will
/// publish, so that the audit of the real destroy looks already done.
#[cfg_attr(not(feature = "std"), allow(dead_code))]
pub const RECHECK_EVERY: Duration = Duration::from_millis(200);

/// The heap range a section's hold covers (its reservation: `max_size` rounded up to the
/// region's alignment); nothing for events and mutexes.
fn range(info: &ObjectHead, alignment: u64) -> (RegionOffset, u64) {
    let len = info
        .max_size
        .checked_next_multiple_of(alignment.max(1))
        .unwrap_or(info.max_size);
    (info.offset, len)
}

#[cfg(feature = "std")]
pub(crate) use imp::Audit;

#[cfg(feature = "std")]
mod imp {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use vshm_format::layout::Layout;
    use vshm_format::revoke::{self, Hold};
    use vshm_format::PeerSlot;

    use super::{
        range, HookContext, ObjectHead, CONFIRM_AFTER, LOOK_EVERY, LOOK_GAP, RECHECK_EVERY,
    };
    use super::{Generation, ObjectSlot, RegionOffset};

    #[derive(Debug)]
    struct Held {
        handles: u32,
        offset: RegionOffset,
        len: u64,
        revoked: bool,
        /// When its object was first and last seen gone, in an unbroken run of looks (not
        /// yet believed).
        suspect: Option<(Instant, Instant)>,
    }

    #[derive(Debug, Default)]
    struct Record {
        held: BTreeMap<(ObjectSlot, Generation), Held>,
        /// Ranges fenced off from this process, to map again if it is handed them anew.
        fenced: Vec<(RegionOffset, u64)>,
    }

    /// Takes the fenced ranges that overlap `[offset, offset + len)` out of `fenced`,
    /// returning what must be mapped again.
    pub(super) fn take_overlaps(
        fenced: &mut Vec<(RegionOffset, u64)>,
        offset: RegionOffset,
        len: u64,
    ) -> Vec<(RegionOffset, u64)> {
        let (start, end) = (offset.0, offset.0.saturating_add(len));
        let mut back = Vec::new();
        let mut keep = Vec::with_capacity(fenced.len());
        for &(o, l) in fenced.iter() {
            let (f_start, f_end) = (o.0, o.0.saturating_add(l));
            if f_end <= start || end <= f_start {
                keep.push((o, l));
                continue;
            }
            // Only the intersection is the new hold's; what sticks out on either side may
            // be anyone's memory now and stays fenced.
            let (i_start, i_end) = (f_start.max(start), f_end.min(end));
            back.push((RegionOffset(i_start), i_end - i_start));
            if f_start < i_start {
                keep.push((o, i_start - f_start));
            }
            if i_end < f_end {
                keep.push((RegionOffset(i_end), f_end - i_end));
            }
        }
        *fenced = keep;
        back
    }

    /// This process's holds and how far it has checked them.
    #[derive(Debug)]
    pub(crate) struct Audit {
        layout: Layout,
        peer_slot: PeerSlot,
        record: Mutex<Record>,
        /// The `revoke_seq` this process last checked its holds for.
        audited: AtomicU64,
        /// Holds found revoked so far.
        revoked: AtomicU64,
        /// When every hold was last checked, in ns since `base` (`u64::MAX`: never). An
        /// atomic, not a lock: every namespace operation (opens and closes too) reads it.
        checked: AtomicU64,
        base: Instant,
        /// A hold is suspect: every run looks (no shortcut).
        pending: std::sync::atomic::AtomicBool,
    }

    impl Audit {
        pub(crate) fn new(layout: Layout, peer_slot: PeerSlot) -> Audit {
            Audit {
                layout,
                peer_slot,
                record: Mutex::new(Record::default()),
                audited: AtomicU64::new(0),
                revoked: AtomicU64::new(0),
                checked: AtomicU64::new(u64::MAX),
                base: Instant::now(),
                pending: std::sync::atomic::AtomicBool::new(false),
            }
        }

        /// A hold was taken. Returns the parts of fenced ranges inside its range, which the
        /// caller must map again before using the memory (this process fenced them off after
        /// an earlier revocation and the host has now handed them out anew); the parts
        /// outside stay fenced.
        pub(crate) fn held(&self, info: &ObjectHead) -> Vec<(RegionOffset, u64)> {
            let (offset, len) = range(info, self.layout.alignment);
            let Ok(mut rec) = self.record.lock() else {
                return Vec::new();
            };
            rec.held
                .entry((info.slot, info.generation))
                .or_insert(Held {
                    handles: 0,
                    offset,
                    len,
                    revoked: false,
                    suspect: None,
                })
                .handles += 1;
            if len == 0 {
                return Vec::new();
            }
            take_overlaps(&mut rec.fenced, offset, len)
        }

        /// A handle is being closed. Returns false if its hold was revoked: the close must
        /// not touch the refcount cell, which no longer counts this object.
        pub(crate) fn releasing(&self, slot: ObjectSlot, generation: Generation) -> bool {
            let Ok(mut rec) = self.record.lock() else {
                return true;
            };
            let Some(h) = rec.held.get_mut(&(slot, generation)) else {
                return true;
            };
            let live = !h.revoked;
            h.handles = h.handles.saturating_sub(1);
            if h.handles == 0 {
                rec.held.remove(&(slot, generation));
            }
            live
        }

        /// Whether the hold on (slot, generation) was found revoked.
        pub(crate) fn is_revoked(&self, slot: ObjectSlot, generation: Generation) -> bool {
            self.record
                .lock()
                .ok()
                .and_then(|r| r.held.get(&(slot, generation)).map(|h| h.revoked))
                .unwrap_or(false)
        }

        /// Holds found revoked so far.
        pub(crate) fn revoked_count(&self) -> u64 {
            self.revoked.load(Ordering::Relaxed)
        }

        /// Checks every hold if vshmd announced a destroy since the last check, or if one
        /// is suspect: a hold whose object looks gone becomes suspect; one still gone
        /// [`CONFIRM_AFTER`] later is revoked (its range fenced off this process). With no
        /// suspect left, acknowledges the `revoke_seq` checked (§11a). Returns when to look
        /// again (a suspect is waiting), if at all. One atomic load when nothing changed.
        pub(crate) fn run(&self, ctx: &dyn HookContext) -> Option<Duration> {
            let mem = ctx.region();
            let Ok(seq) = revoke::revoke_seq(&mem) else {
                return None;
            };
            let now = Instant::now();
            if seq == self.audited.load(Ordering::Acquire) && !self.pending.load(Ordering::Acquire)
            {
                let at = self.checked.load(Ordering::Acquire);
                let since = (at != u64::MAX).then(|| {
                    now.duration_since(self.base)
                        .saturating_sub(Duration::from_nanos(at))
                });
                if let Some(since) = since.filter(|&d| d < RECHECK_EVERY) {
                    // Checked a moment ago: look once more when the period is up (the ring
                    // that brought us here may announce a destroy whose number was
                    // scribbled in early).
                    return Some(RECHECK_EVERY - since);
                }
            }
            let Ok(mut rec) = self.record.lock() else {
                return None;
            };
            let at =
                u64::try_from(now.duration_since(self.base).as_nanos()).unwrap_or(u64::MAX - 1);
            self.checked.store(at, Ordering::Release);
            let (mut found, mut wait) = (0u64, None::<Duration>);
            let mut fenced = Vec::new();
            for (&(slot, generation), h) in &mut rec.held {
                if h.revoked {
                    continue;
                }
                let hold = revoke::check_hold(&mem, &self.layout, self.peer_slot, slot, generation);
                if hold != Ok(Hold::Revoked) {
                    h.suspect = None;
                    continue;
                }
                // Only an unbroken run of looks counts: one that saw it intact clears the
                // suspicion above, and a gap in the looks may have hidden such a moment.
                let (first, last) = h.suspect.unwrap_or((now, now));
                let first = if now.duration_since(last) > LOOK_GAP {
                    now
                } else {
                    first
                };
                h.suspect = Some((first, now));
                let left = CONFIRM_AFTER.saturating_sub(now.duration_since(first));
                if !left.is_zero() {
                    let next = left.min(LOOK_EVERY);
                    wait = Some(wait.map_or(next, |w| w.min(next)));
                    continue;
                }
                h.revoked = true;
                found += 1;
                if h.len > 0 && ctx.revoke(h.offset, h.len) {
                    fenced.push((h.offset, h.len));
                }
            }
            rec.fenced.extend(fenced);
            self.revoked.fetch_add(found, Ordering::Relaxed);
            if found > 0 {
                // A report for the operator; vshmd counts it, trusting it for nothing else.
                let _ = revoke::acknowledge(&mem, &self.layout, self.peer_slot, seq, found);
            }
            self.pending.store(wait.is_some(), Ordering::Release);
            if wait.is_some() {
                // Not done with this seq: no acknowledgement until every suspect is settled.
                return wait;
            }
            // Only after the fences are up: from here vshmd may give the memory away. Sent
            // again after a revocation found late (the seq may have been acknowledged when
            // a scribbled revoke_seq made the real destroy's audit look done).
            if seq != self.audited.load(Ordering::Acquire) || found > 0 {
                ctx.acknowledge(seq);
            }
            self.audited.store(seq, Ordering::Release);
            None
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::imp::take_overlaps;
    use vshm_format::RegionOffset;

    fn r(o: u64, l: u64) -> (RegionOffset, u64) {
        (RegionOffset(o), l)
    }

    #[test]
    fn a_new_hold_maps_back_only_its_own_part_of_fenced_ranges_that_overlap_it_partially() {
        // Two revoked sections fenced side by side; the host hands out a section that
        // straddles their border. Only the new section's pages may reach the region again:
        // the rest may be anyone's memory now, and a revoked handle's raw pointer still
        // points there.
        let mut fenced = vec![r(0x10000, 0x4000), r(0x14000, 0x4000), r(0x40000, 0x1000)];
        let mut back = take_overlaps(&mut fenced, RegionOffset(0x12000), 0x4000);
        back.sort();
        fenced.sort();
        assert_eq!(back, vec![r(0x12000, 0x2000), r(0x14000, 0x2000)]);
        assert_eq!(
            fenced,
            vec![r(0x10000, 0x2000), r(0x16000, 0x2000), r(0x40000, 0x1000)]
        );
    }

    #[test]
    fn a_new_hold_inside_a_fenced_range_leaves_both_ends_fenced() {
        let mut fenced = vec![r(0x10000, 0x10000)];
        let back = take_overlaps(&mut fenced, RegionOffset(0x14000), 0x1000);
        assert_eq!(back, vec![r(0x14000, 0x1000)]);
        fenced.sort();
        assert_eq!(fenced, vec![r(0x10000, 0x4000), r(0x15000, 0xB000)]);
    }
}

/// Without `std`: no record; the peer never acknowledges and vshmd waits its quarantine
/// time. Each handle still checks its own object on access.
#[cfg(not(feature = "std"))]
#[derive(Debug)]
pub(crate) struct Audit;

#[cfg(not(feature = "std"))]
impl Audit {
    pub(crate) fn new(
        _layout: vshm_format::layout::Layout,
        _peer_slot: vshm_format::PeerSlot,
    ) -> Audit {
        Audit
    }
    pub(crate) fn held(&self, info: &ObjectHead) -> [(RegionOffset, u64); 0] {
        let _ = range(info, 1);
        []
    }
    pub(crate) fn releasing(&self, _slot: ObjectSlot, _generation: Generation) -> bool {
        true
    }
    pub(crate) fn revoked_count(&self) -> u64 {
        0
    }
    pub(crate) fn run(&self, _ctx: &dyn HookContext) -> Option<Duration> {
        None
    }
}

/// How the namespace keeps its audit: shared with the transport's ring hook under `std`.
#[cfg(feature = "std")]
pub(crate) type Shared = std::sync::Arc<Audit>;
/// How the namespace keeps its audit: by value without `std` (there is no ring hook).
#[cfg(not(feature = "std"))]
pub(crate) type Shared = Audit;
