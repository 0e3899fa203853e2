//! Request rate limits: one token bucket per VM account (so reconnecting does not refill
//! it), kept in the event loop's thread. Time is passed in, so the tests need no clock.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::{Denial, Identity, Policy};

/// Most buckets kept; past it, full (idle) buckets are forgotten, since a full bucket is
/// what a new one would be anyway. Bounds the memory a stream of new identities costs.
const MAX_BUCKETS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: HashMap<Arc<Identity>, Bucket>,
}

impl RateLimiter {
    /// Takes one token for a request of `account` under `policy` at `now`, or says why not.
    /// Unlimited policies take nothing.
    pub fn admit(
        &mut self,
        account: &Arc<Identity>,
        policy: &Policy,
        now: Instant,
    ) -> Result<(), Denial> {
        let Some(rate) = policy.rate else {
            return Ok(());
        };
        if !self.buckets.contains_key(account) && self.buckets.len() >= MAX_BUCKETS {
            self.forget_full(policy, now);
        }
        let b = self.buckets.entry(account.clone()).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate.per_sec).min(rate.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Denial::Rate {
                policy: policy.name.clone(),
                per_sec: rate.per_sec,
                burst: rate.burst,
            })
        }
    }

    /// Drops buckets that have refilled (judged by `policy`'s rate: approximate for other
    /// policies, which only makes them forget sooner or later).
    fn forget_full(&mut self, policy: &Policy, now: Instant) {
        let Some(rate) = policy.rate else { return };
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
            b.tokens + elapsed * rate.per_sec < rate.burst
        });
        if self.buckets.len() >= MAX_BUCKETS {
            // Everyone is busy: start over rather than grow (each gets a full burst).
            self.buckets.clear();
        }
    }

    /// Buckets kept (tests).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// No buckets (tests).
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}
