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
use super::status::{self, Written, parse_time, reason};
use super::{Context, renew_period};
use crate::crd::{DistributedLock, DistributedLockStatus, Phase};
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
/// `period`, its lease's renewal period ([`lease_plan`]); never renewed (or unreadable): `None`, at once. The
/// last renewal is the later of the one its status records and `unrecorded`,
/// one this controller made and did not write down ([`worth_recording`]). A
/// renewal recorded in the future (a replica whose clock ran ahead, a hand
/// edit of the status) makes it due at once: it is not known when the lease
/// was last extended, and the renewal writes `renewedAt` by this clock.
pub fn renewal_due(
    lock: &DistributedLock,
    period: Duration,
    unrecorded: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let recorded = lock
        .status
        .as_ref()
        .and_then(|s| s.renewed_at.as_deref())
        .and_then(parse_time);
    if recorded.is_some_and(|recorded| recorded > now) {
        return Some(now);
    }
    let renewed = recorded.max(unrecorded)?;
    renewed.checked_add_signed(chrono::Duration::from_std(period).ok()?)
}

/// Whether `next`, the status of a renewal at `now` for `ttl`
/// ([`status::renewed`]), is worth an API write. The lease in the lock
/// index is extended every renewal period (a quarter of the TTL), its
/// status need not be: its `expiresAt` is written when, by the next renewal,
/// the recorded one would be less than [`RECORDED_LEAD`] or an eighth of
/// the TTL ahead, whichever is longer. So a write starts with at least that
/// long left before the recorded `expiresAt` (a lower bound of the lease's
/// end) passes — time for a slow API server to take it. Leases longer than
/// 8 s are written every third renewal (a third of the writes a holder
/// costs the API server), shorter ones more often: every second renewal
/// at 4–8 s, every renewal at 2 s and less. Anything else the write changes (a new TTL,
/// observedGeneration after a spec edit, the IndexReachable condition) is
/// written at once.
pub fn worth_recording(
    lock: &DistributedLock,
    next: &DistributedLockStatus,
    ttl: Duration,
    now: DateTime<Utc>,
) -> bool {
    let Some(current) = lock.status.as_ref() else {
        return true;
    };
    let mut times_aside = next.clone();
    times_aside.renewed_at.clone_from(&current.renewed_at);
    times_aside.expires_at.clone_from(&current.expires_at);
    if times_aside != *current {
        return true;
    }
    let times = |s: &DistributedLockStatus| {
        Some((
            parse_time(s.renewed_at.as_deref()?)?,
            parse_time(s.expires_at.as_deref()?)?,
        ))
    };
    let (Some((renewed, expires)), Some((_, next_expires))) = (times(current), times(next)) else {
        return true;
    };
    // (a grant's status has the lock index's expiry and this controller's
    // renewedAt: the recorded TTL is off by the two clocks' difference, which
    // is no new TTL)
    let (Ok(recorded_ttl), Ok(ttl_here)) = ((expires - renewed).to_std(), (next_expires - now).to_std()) else {
        return true;
    };
    if recorded_ttl.abs_diff(ttl_here) > ttl / 8 {
        return true;
    }
    let margin = renew_period(ttl) + (ttl / 8).max(RECORDED_LEAD);
    expires - now < chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX)
}

/// How long, at least, a renewal's status write has before the recorded
/// `expiresAt` it replaces passes ([`worth_recording`]): more than a status
/// write takes unless the API server is overloaded.
pub const RECORDED_LEAD: Duration = Duration::from_secs(2);

/// A renewal this controller made: when, and the TTL it extended the lease by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub at: DateTime<Utc>,
    pub ttl: Duration,
}

/// Decides the next step of a Granted request (pure).
/// `unrecorded`: this controller's last renewal of the grant, if its status
/// does not record it; its lease is kept by a period of its own TTL too
/// (a renewal with a lowered TTL whose write was given up, then the TTL
/// raised again).
pub fn decide(
    lock: &DistributedLock,
    holder: HolderState,
    unrecorded: Option<Renewal>,
    now: DateTime<Utc>,
) -> GrantedStep {
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
    let (ttl, mut period) = lease_plan(lock);
    if let Some(renewal) = unrecorded {
        period = period.min(renew_period(renewal.ttl));
    }
    let Some(due) = renewal_due(lock, period, unrecorded.map(|r| r.at), now) else {
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
    match decide(&lock, holder, ctx.index.unrecorded_renewal(&lock), Utc::now()) {
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
            let renewed = status::renewed(&lock, now, expires);
            let recorded = worth_recording(&lock, &renewed, ttl, now)
                && matches!(
                    status::write_by(&ctx.client, &lock, renewed, next).await?,
                    Written::At(_)
                );
            if !recorded {
                ctx.index.renewed_unrecorded(&lock, Renewal { at: now, ttl });
            }
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
            decide(&lock, HolderState::Unbound, None, at(0)),
            GrantedStep::NotDue(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&lock, HolderState::Unbound, None, at(1)),
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
            decide(&lock, HolderState::Unbound, None, at(0)),
            GrantedStep::NotDue(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&lock, HolderState::Unbound, None, at(1)),
            GrantedStep::Renew {
                ttl: Duration::from_secs(3600)
            },
            "the renewal extends with the new ttl"
        );
        // lowering it renews sooner
        let lock = holding("2s", 0, 4);
        assert_eq!(
            decide(&lock, HolderState::Unbound, None, at(0)),
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
        assert_eq!(decide(&lock, HolderState::Unbound, None, at(0)), renew);
        assert_eq!(decide(&lock, HolderState::Unbound, None, at(2)), renew);
    }

    /// A holder whose last renewal (at `renewed`, for `ttl` seconds) was
    /// written by the controller.
    fn recorded(ttl: i64, renewed: i64) -> DistributedLock {
        let mut lock = holding(&format!("{ttl}s"), renewed, renewed + ttl);
        lock.status = Some(status::renewed(&lock, at(renewed), at(renewed + ttl)));
        lock
    }

    fn renewal_at(lock: &DistributedLock, now: i64, ttl: i64) -> bool {
        let next = status::renewed(lock, at(now), at(now + ttl));
        worth_recording(lock, &next, Duration::from_secs(ttl as u64), at(now))
    }

    #[test]
    fn long_leases_are_written_every_third_renewal_short_ones_more_often() {
        // ttl 40s: renewals every 10s; written at 0
        let lock = recorded(40, 0);
        assert!(!renewal_at(&lock, 10, 40), "30s of the recorded lease left");
        assert!(
            !renewal_at(&lock, 20, 40),
            "20s left: still 10s ahead at the next renewal"
        );
        assert!(
            renewal_at(&lock, 30, 40),
            "10s left: under an eighth of the TTL by the next renewal"
        );
        // ttl 8s: renewals every 2s; the write needs 2s left by the next one
        let lock = recorded(8, 0);
        assert!(!renewal_at(&lock, 2, 8));
        assert!(!renewal_at(&lock, 3, 8), "5s left: 3s at the next renewal");
        assert!(renewal_at(&lock, 5, 8), "3s left: 1s at the next renewal");
        // ttl 2s: every renewal, as a write may take longer than what is left
        let lock = recorded(2, 0);
        assert!(renewal_at(&lock, 1, 2));
    }

    #[test]
    fn a_renewal_that_changes_more_than_its_times_is_written_at_once() {
        let lock = recorded(8, 0);
        // a new TTL: the recorded one is what the next reconcile plans with
        let next = status::renewed(&lock, at(2), at(2 + 60));
        assert!(worth_recording(&lock, &next, Duration::from_secs(60), at(2)));
        // but not a grant's expiry by the lock index's clock, a little ahead
        let mut granted = lock.clone();
        let engine_expiry = at(8) + chrono::Duration::milliseconds(40);
        granted.status.as_mut().unwrap().expires_at = Some(status::rfc3339(engine_expiry));
        assert!(!renewal_at(&granted, 2, 8), "the first renewal after a grant");
        // a spec edit: observedGeneration moves
        let mut edited = lock.clone();
        edited.metadata.generation = Some(edited.metadata.generation.unwrap_or(1) + 1);
        assert!(renewal_at(&edited, 2, 8));
        // the IndexReachable condition of a failing index turns back
        let mut failing = lock.clone();
        failing.status.as_mut().unwrap().conditions.clear();
        assert!(renewal_at(&failing, 2, 8));
        // nothing recorded yet
        let mut bare = lock;
        bare.status.as_mut().unwrap().expires_at = None;
        assert!(renewal_at(&bare, 2, 8));
    }

    #[test]
    fn an_unrecorded_renewal_moves_the_next_one() {
        let lock = recorded(8, 0);
        let unrecorded = |at_s: i64, ttl: u64| {
            Some(Renewal {
                at: at(at_s),
                ttl: Duration::from_secs(ttl),
            })
        };
        assert_eq!(
            decide(&lock, HolderState::Unbound, unrecorded(2, 8), at(3)),
            GrantedStep::NotDue(Duration::from_secs(1)),
            "due a period after the renewal the status does not show"
        );
        assert_eq!(
            decide(&lock, HolderState::Unbound, unrecorded(2, 8), at(4)),
            GrantedStep::Renew {
                ttl: Duration::from_secs(8)
            }
        );
        // an older unrecorded renewal does not delay one the status shows
        let later = recorded(8, 10);
        assert_eq!(
            decide(&later, HolderState::Unbound, unrecorded(2, 8), at(11)),
            GrantedStep::NotDue(Duration::from_secs(1))
        );
        // renewed unrecorded with a 4s TTL (its write given up), then the
        // spec raised back to 8s: the 4s lease is renewed within its own period
        assert_eq!(
            decide(&lock, HolderState::Unbound, unrecorded(2, 4), at(3)),
            GrantedStep::Renew {
                ttl: Duration::from_secs(8)
            }
        );
    }

    #[test]
    fn a_finished_or_missing_holder_releases() {
        let lock = holding("30s", 0, 30);
        assert!(matches!(
            decide(&lock, HolderState::Finished("Job completed"), None, at(1)),
            GrantedStep::Release {
                reason: "HolderFinished",
                ..
            }
        ));
        assert!(matches!(
            decide(&lock, HolderState::Missing, None, at(1)),
            GrantedStep::Release {
                reason: "HolderGone",
                ..
            }
        ));
    }
}
