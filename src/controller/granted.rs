//! A Granted request: decide (release, renew, or not yet), then act.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::runtime::controller::Action;

use kube::ResourceExt;
use kube::api::Api;

use super::error::{Error, Result};
use super::holder::{self, HolderState};
use super::raw::RawRequest;
use super::status::{self, parse_time, reason};
use super::{Context, renew_period};
use crate::crd::{DistributedLock, Phase};
use crate::lock::ExtendOutcome;
use crate::queue;

/// What a Granted request needs next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GrantedStep {
    /// The holder is done or gone: release the lock, phase Released.
    Release {
        reason: &'static str,
        message: &'static str,
    },
    /// The next renewal is due in this long.
    NotDue(Duration),
    /// Renew now, for this long.
    Renew { ttl: Duration },
}

/// The lease to renew with and the period that keeps it alive. The lease in
/// the index was written with the TTL of its last renewal (`expiresAt -
/// renewedAt` in the status); a spec change takes effect at the next renewal,
/// and until then renewals are scheduled from the shorter of both, so raising
/// `spec.ttl` never lets the current lease run out before it is renewed.
pub fn lease_plan(lock: &DistributedLock) -> (Duration, Duration) {
    let status = lock.status.as_ref();
    let in_index = match (
        status.and_then(|s| s.renewed_at.as_deref()).and_then(parse_time),
        status.and_then(|s| s.expires_at.as_deref()).and_then(parse_time),
    ) {
        (Some(renewed), Some(expires)) => (expires - renewed).to_std().ok(),
        _ => None,
    };
    let spec = lock.spec.ttl().ok();
    let ttl = spec.or(in_index).unwrap_or(crate::lock::DEFAULT_TTL);
    let shortest = match in_index {
        Some(current) => current.min(ttl),
        None => ttl,
    };
    (ttl, renew_period(shortest))
}

/// When the next renewal of a Granted request is due: its last renewal plus
/// `period`, its lease's renewal period ([`lease_plan`]); never renewed (or unreadable): `None`, at once. A
/// renewal recorded in the future (a replica whose clock ran ahead, a hand
/// edit of the status) makes it due at once: it is not known when the lease
/// was last extended, and the renewal writes `renewedAt` by this clock.
pub fn renewal_due(lock: &DistributedLock, period: Duration, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let renewed = lock
        .status
        .as_ref()
        .and_then(|s| s.renewed_at.as_deref())
        .and_then(parse_time)?;
    if renewed > now {
        return Some(now);
    }
    renewed.checked_add_signed(chrono::Duration::from_std(period).ok()?)
}

/// Decides the next step of a Granted request (pure).
pub fn decide(lock: &DistributedLock, holder: HolderState, now: DateTime<Utc>) -> GrantedStep {
    match holder {
        HolderState::Finished(why) => {
            return GrantedStep::Release {
                reason: reason::HOLDER_FINISHED,
                message: why,
            };
        }
        HolderState::Missing => {
            return GrantedStep::Release {
                reason: reason::HOLDER_GONE,
                message: "the holder no longer exists",
            };
        }
        HolderState::Running | HolderState::Unbound => {}
    }
    let (ttl, period) = lease_plan(lock);
    let Some(due) = renewal_due(lock, period, now) else {
        return GrantedStep::Renew { ttl };
    };
    if now < due {
        return GrantedStep::NotDue((due - now).to_std().unwrap_or_default());
    }
    GrantedStep::Renew { ttl }
}

/// Reconciles a Granted request.
pub async fn reconcile(lock: Arc<DistributedLock>, ctx: &Context, key: &str) -> Result<Action> {
    let (_, period) = lease_plan(&lock);
    let holder = lease_holder(ctx, &lock, period).await;
    match decide(&lock, holder, Utc::now()) {
        GrantedStep::Release { reason, message } => super::finish(&lock, ctx, Phase::Released, reason, message).await,
        GrantedStep::NotDue(wait) => Ok(Action::requeue(wait)),
        GrantedStep::Renew { ttl } => renew(lock, ctx, key, ttl).await,
    }
}

/// The holder of a request that holds a lease renewed every `period`, read
/// with half a period to answer: the renewal after it still comes long before
/// the lease runs out. Unread, it is taken to still run ([`kept_unread`]).
async fn lease_holder(ctx: &Context, lock: &DistributedLock, period: Duration) -> HolderState {
    match holder::within(period / 2, holder::fetch(&ctx.client, lock)).await {
        Ok(state) => state,
        Err(unread) => {
            kept_unread(ctx, lock, &unread);
            HolderState::Running
        }
    }
}

/// A holder that could not be read keeps its lock (renewed) until it can be:
/// said in the log, and — when the API server answered with an error, which
/// may not pass by itself (RBAC, say) — in a Warning event on the request.
pub(super) fn kept_unread(ctx: &Context, lock: &DistributedLock, unread: &holder::Unread) {
    tracing::warn!(name = %lock.name_any(), error = %unread, "cannot read the holder; keeping its lock renewed");
    if let holder::Unread::Failed(e) = unread {
        let note = format!("cannot read its holder ({e}); the lock is kept and renewed until it can");
        ctx.warn_aside(lock, reason::HOLDER_UNREADABLE, note);
    }
}

async fn renew(lock: Arc<DistributedLock>, ctx: &Context, key: &str, ttl: Duration) -> Result<Action> {
    let status = lock.status.clone().unwrap_or_default();
    let token = status.token.clone().unwrap_or_default();
    let fencing = status.fencing_token.and_then(|f| u64::try_from(f).ok());
    let now = Utc::now();
    let started = Instant::now();
    let outcome = ctx
        .engine("extend", &lock, ctx.locks.extend_lease(key, &token, ttl, fencing))
        .await?;
    let (phase, reason, message) = match outcome {
        ExtendOutcome::Extended => {
            // The next renewal is due a period after this one began, whatever
            // the API server does meanwhile: the status write that records
            // this renewal gets the time left until then, and one that has
            // not returned by then is given up (the next renewal extends
            // again and records itself).
            let next = started + renew_period(ttl);
            let expires = now + chrono::Duration::from_std(ttl).unwrap_or_default();
            status::write_by(&ctx.client, &lock, status::renewed(&lock, now, expires), next).await?;
            return Ok(Action::requeue(next.saturating_duration_since(Instant::now())));
        }
        // by the search engine's clock: a lease that ran out is over, even if
        // nobody took the lock meanwhile; the next waiter is served
        ExtendOutcome::Expired => {
            ctx.metrics.expiries.inc();
            (
                Phase::Expired,
                reason::EXPIRED,
                "the lease ran out before it could be renewed",
            )
        }
        ExtendOutcome::NotHeld => {
            ctx.metrics.losses.inc();
            (
                Phase::Lost,
                reason::LOST,
                "the lock was taken or released by another owner",
            )
        }
    };
    let note = format!("lock {}: {message}", queue::lock_key(&lock));
    super::events::warning(&ctx.recorder, &super::object_ref(&lock), reason, note).await;
    match super::finish(&lock, ctx, phase, reason, message).await {
        // The lease is over whatever a newer copy of the request says (the
        // lock index decided, and finish gave back what was left of it): a
        // spec edit that made this copy stale must not turn the outcome into
        // Lost at the next renewal. Finish the newer copy the same way.
        Err(Error::Stale) => {
            let api: Api<RawRequest> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
            let fresh = api.get_opt(&lock.name_any()).await.map_err(Error::Kube)?;
            let Some(Ok(fresh)) = fresh.map(|f| f.decode()) else {
                return Ok(Action::await_change());
            };
            let same_grant = fresh.uid() == lock.uid()
                && queue::phase(&fresh) == Phase::Granted
                && fresh.status.as_ref().and_then(|s| s.token.as_ref()) == Some(&token);
            if !same_grant {
                return Ok(Action::await_change());
            }
            super::finish(&fresh, ctx, phase, reason, message).await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{at, granted, request};

    fn holding(ttl: &str, renewed: i64, expires: i64) -> DistributedLock {
        let mut lock = granted(request("h", "ns", "k", 0, 0, 1), at(renewed), at(expires));
        lock.spec.ttl = Some(ttl.into());
        lock
    }

    #[test]
    fn renewal_is_due_a_quarter_of_the_ttl_after_the_last_one() {
        let lock = holding("4s", 0, 4);
        assert_eq!(
            decide(&lock, HolderState::Unbound, at(0)),
            GrantedStep::NotDue(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&lock, HolderState::Unbound, at(1)),
            GrantedStep::Renew {
                ttl: Duration::from_secs(4)
            }
        );
    }

    #[test]
    fn raising_the_ttl_never_delays_the_next_renewal_past_the_current_lease() {
        // granted with 4s, then spec.ttl patched to 1h: the lease in the index
        // still runs out 4s after its renewal, so the next renewal stays at 1s
        let lock = holding("1h", 0, 4);
        assert_eq!(
            decide(&lock, HolderState::Unbound, at(0)),
            GrantedStep::NotDue(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&lock, HolderState::Unbound, at(1)),
            GrantedStep::Renew {
                ttl: Duration::from_secs(3600)
            },
            "the renewal extends with the new ttl"
        );
        // lowering it renews sooner
        let lock = holding("2s", 0, 4);
        assert_eq!(
            decide(&lock, HolderState::Unbound, at(0)),
            GrantedStep::NotDue(Duration::from_millis(500))
        );
    }

    #[test]
    fn a_renewal_recorded_in_the_future_is_due_at_once() {
        // a replica whose clock ran ahead, or a hand edit: renew now, and
        // again now a period later (not a period after each look)
        let lock = holding("8s", 60, 68);
        let renew = GrantedStep::Renew {
            ttl: Duration::from_secs(8),
        };
        assert_eq!(decide(&lock, HolderState::Unbound, at(0)), renew);
        assert_eq!(decide(&lock, HolderState::Unbound, at(2)), renew);
    }

    #[test]
    fn a_finished_or_missing_holder_releases() {
        let lock = holding("30s", 0, 30);
        assert!(matches!(
            decide(&lock, HolderState::Finished("Job completed"), at(1)),
            GrantedStep::Release {
                reason: "HolderFinished",
                ..
            }
        ));
        assert!(matches!(
            decide(&lock, HolderState::Missing, at(1)),
            GrantedStep::Release {
                reason: "HolderGone",
                ..
            }
        ));
    }
}
