//! Access control and quotas on the request path: each peer's [`Grant`] (set by the daemon
//! at connect), the questions the request handlers ask its policy (`crate::policy`), what
//! a VM's objects take up (counted from the records, so nothing can drift), and the
//! bookkeeping of a refusal: counters, a log line at most once a second per peer, the
//! reason for the `denied` event. Opens and closes never come here (FORMAT.md §7): the
//! `open` patterns and `max_handles` are only reported ([`Arbiter::advisories`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use vshm_format::layout::op;
use vshm_format::{ObjectSlot, PeerId, PeerSlot, Status};

use super::{Arbiter, Backing};
use crate::policy::{Denial, Grant, Identity, Usage};

/// How often a peer's denials are logged at most (each is still counted and is an event).
const DENIAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

impl<M: Backing> Arbiter<M> {
    /// Gives connected peer `peer_id` its policy and account. The daemon calls it right
    /// after the connect, in the same loop iteration, so before any request of the peer.
    pub fn set_peer_grant(&mut self, peer_id: PeerId, grant: Grant) {
        if let Some(s) = self.slot_of(peer_id) {
            self.peers[s.raw() as usize].grant = Some(grant);
        }
    }

    /// The policy name connected peer `peer_id` got (`None`: none given: unrestricted).
    pub fn peer_policy(&self, peer_id: PeerId) -> Option<&str> {
        let s = self.slot_of(peer_id)?;
        self.grant(s).map(|g| g.policy.name.as_str())
    }

    pub(super) fn grant(&self, peer: PeerSlot) -> Option<&Grant> {
        self.peers.get(peer.raw() as usize)?.grant.as_ref()
    }

    /// What the objects counted against `account` take up now (LIVE and deleted-but-held).
    pub(super) fn usage(&self, account: &Identity) -> Usage {
        self.objects
            .iter()
            .flatten()
            .filter(|r| r.owner.as_deref() == Some(account))
            .fold(Usage::default(), |u, r| Usage {
                bytes: u.bytes.saturating_add(r.reserved),
                objects: u.objects + 1,
            })
    }

    /// The rate check for a request of `op` from `peer`. UNLOCK and CANCEL always pass:
    /// they give something back, and refusing them would hurt the peers waiting.
    pub(super) fn admit(&mut self, peer: PeerSlot, request_op: u32) -> Result<(), Denial> {
        if request_op == op::UNLOCK || request_op == op::CANCEL {
            return Ok(());
        }
        let Some(grant) = self
            .peers
            .get(peer.raw() as usize)
            .and_then(|p| p.grant.as_ref())
        else {
            return Ok(());
        };
        self.rates
            .admit(&grant.account, &grant.policy, Instant::now())
    }

    /// Whether `peer` may create `name` reserving `reserved` bytes; on success, the account
    /// the new object counts against.
    pub(super) fn may_create(
        &self,
        peer: PeerSlot,
        name: Option<&str>,
        reserved: u64,
    ) -> Result<Option<Arc<Identity>>, Denial> {
        let Some(grant) = self.grant(peer) else {
            return Ok(None);
        };
        grant
            .policy
            .check_create(name, reserved, self.usage(&grant.account))?;
        Ok(Some(grant.account.clone()))
    }

    /// Whether `peer` may open `name` (a CREATE that found the name existing is an open).
    pub(super) fn may_open(&self, peer: PeerSlot, name: Option<&str>) -> Result<(), Denial> {
        self.grant(peer)
            .map_or(Ok(()), |g| g.policy.check_open(name))
    }

    /// Whether `peer` may delete the object in `slot`: `delete` for its own VM's objects,
    /// `delete_others` for anyone else's.
    pub(super) fn may_delete(&self, peer: PeerSlot, slot: ObjectSlot) -> Result<(), Denial> {
        let (Some(grant), Some(rec)) = (self.grant(peer), self.record_at(slot)) else {
            return Ok(());
        };
        let own = rec.owner.as_deref() == Some(&*grant.account);
        grant.policy.check_delete(rec.name.as_deref(), own)
    }

    /// Records that `peer`'s request `op_name` was refused by its policy: counts it (in
    /// total and per peer), logs it at most once a second per peer, keeps the reason for
    /// the `denied` event. Returns the status to answer.
    pub(super) fn refuse(&mut self, peer: PeerSlot, op_name: &str, d: &Denial) -> Status {
        let status = d.status();
        self.counters.denials += 1;
        if status == Status::AccessDenied {
            self.counters.access_denied += 1;
        } else {
            self.counters.quota_exceeded += 1;
        }
        let now = Instant::now();
        if let Some(rec) = self.peers.get_mut(peer.raw() as usize) {
            rec.denials += 1;
            let log = match &mut rec.denial_log {
                Some((at, _)) if now.duration_since(*at) < DENIAL_LOG_INTERVAL => None,
                Some((at, unlogged)) => {
                    *at = now;
                    Some(std::mem::take(unlogged))
                }
                None => {
                    rec.denial_log = Some((now, 0));
                    Some(0)
                }
            };
            match log {
                Some(unlogged) => tracing::warn!(
                    peer_id = rec.id.raw(),
                    label = rec.label.as_deref().unwrap_or("?"),
                    "denied: {}: {op_name}: {d} ({} earlier denials of this peer not logged)",
                    status.name(),
                    unlogged
                ),
                None => {
                    if let Some((_, unlogged)) = &mut rec.denial_log {
                        *unlogged += 1;
                    }
                }
            }
        }
        self.denial = Some(d.to_string());
        status
    }

    /// What `peer` does that its policy says it should not but vshmd cannot refuse:
    /// handles on names outside its `open` patterns, more handles than `max_handles`.
    /// `held`: its handle count per object slot (from its refcount cells).
    pub(super) fn advisories(&self, peer: PeerSlot, held: &[(ObjectSlot, u64)]) -> Vec<String> {
        let Some(grant) = self.grant(peer) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let total: u64 = held.iter().map(|(_, n)| n).sum();
        if let Some(limit) = grant.policy.max_handles.filter(|&l| total > l) {
            out.push(format!(
                "holds {total} handles; policy {:?} max_handles {limit}",
                grant.policy.name
            ));
        }
        for (slot, _) in held {
            let name = self.record_at(*slot).and_then(|r| r.name.as_deref());
            if let Err(d) = grant.policy.check_open(name) {
                out.push(format!("holds a handle: {d}"));
            }
        }
        out
    }
}
