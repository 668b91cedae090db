//! A Pending request: decide (fail, wait, give up, or acquire), then act.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use serde_json::json;

use super::admission::{self, Capacity, Turn, Want};
use super::error::{Error, Result};
use super::holder::{self, HolderState};
use super::status::{self, reason};
use super::{Context, display_holder, renew_period};
use crate::crd::{DistributedLock, Phase};
use crate::lock::{AcquireRequest, LockError, PermitOutcome, PermitRequest};
use crate::queue;

/// Where a Pending request stands in this cluster's queue for its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueView {
    /// 1-based place among the waiters.
    pub position: usize,
    /// The request of this cluster that holds the key, if any (not this one).
    /// Mutex keys only.
    pub held_by: Option<String>,
    /// The permits of the key, when a Semaphore governs it.
    pub permits: Option<PermitView>,
    /// This controller granted the request in the lock index, and no copy
    /// with its Granted status is in the cache yet (the write was given up,
    /// or the watch is slow): [`QueueIndex::holds_unseen_grant`].
    ///
    /// [`QueueIndex::holds_unseen_grant`]: super::index::QueueIndex::holds_unseen_grant
    pub own_grant_unseen: bool,
}

/// A semaphore key's permits as a waiter sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PermitView {
    pub capacity: Capacity,
    pub turn: Turn,
    /// What this request asks for.
    pub wants: Want,
    /// The Semaphore is not in force yet: a plain mutex holds the key (why, in words).
    pub held_as_mutex: Option<String>,
}

/// "waiting for KEY: WHY; 2nd in line".
fn in_line(key: &str, why: &str, position: usize) -> String {
    format!("waiting for {key}: {why}; {} in line", admission::ordinal(position))
}

/// What a Pending request needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum PendingStep {
    /// It will never be granted: a final phase with this reason.
    Fail { reason: &'static str, message: String },
    /// Its holder finished before it was granted: Released.
    HolderFinished { message: &'static str },
    /// The gated Job it was made for is gone: delete the request.
    DeleteRequest,
    /// Not its turn (or its holder does not exist yet): look again by `recheck` at the latest.
    Wait {
        reason: &'static str,
        message: String,
        recheck: Duration,
    },
    /// Head of the queue and free here: acquire with this lease and metadata
    /// (with `permits`: that many of a semaphore's permits, or every one).
    Acquire {
        ttl: Duration,
        deadline: Option<Duration>,
        metadata: serde_json::Value,
        permits: Option<Want>,
    },
}

/// How deep `spec.metadata` may nest: the lock document carries it, and search
/// engines refuse (or answer oddly to) much deeper documents.
pub const MAX_METADATA_DEPTH: usize = 32;

/// How deeply a JSON value nests (a scalar: 0, `{}`: 1).
fn nesting(value: &serde_json::Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0)];
    while let Some((value, depth)) = stack.pop() {
        let children: Vec<&serde_json::Value> = match value {
            serde_json::Value::Object(map) => map.values().collect(),
            serde_json::Value::Array(items) => items.iter().collect(),
            _ => continue,
        };
        deepest = deepest.max(depth + 1);
        stack.extend(children.into_iter().map(|child| (child, depth + 1)));
    }
    deepest
}

/// The longest a waiter sleeps without an event (events wake it sooner).
const IDLE_RECHECK: Duration = Duration::from_secs(300);

/// When a request's acquireTimeout runs out: counted from its server-set
/// creation time. `Err` names the invalid field.
pub fn deadline(lock: &DistributedLock) -> Result<Option<DateTime<Utc>>, String> {
    let Some(timeout) = lock.spec.acquire_timeout()? else {
        return Ok(None);
    };
    let timeout = chrono::Duration::from_std(timeout).map_err(|_| "spec.acquireTimeout is too long".to_string())?;
    Ok(queue::creation_time(lock).and_then(|created| created.checked_add_signed(timeout)))
}

/// Decides the next step of a Pending request (pure).
pub fn decide(
    lock: &DistributedLock,
    scope: Result<(), String>,
    holder: HolderState,
    queue: &QueueView,
    now: DateTime<Utc>,
) -> PendingStep {
    let fail = |reason, message: String| PendingStep::Fail { reason, message };
    let ttl = match lock.spec.ttl() {
        Ok(ttl) => ttl,
        Err(message) => return fail(reason::INVALID_SPEC, format!("spec.ttl: {message}")),
    };
    if let Err(message) = scope {
        return fail(reason::SCOPE_NOT_ALLOWED, message);
    }
    let metadata = match lock.spec.metadata.as_ref().map(|m| m.to_value()).transpose() {
        Ok(metadata) => metadata.unwrap_or_else(|| json!({})),
        Err(why) => return fail(reason::INVALID_SPEC, format!("spec.metadata cannot be used: {why}")),
    };
    if nesting(&metadata) > MAX_METADATA_DEPTH {
        let message = format!("spec.metadata nests deeper than {MAX_METADATA_DEPTH} levels");
        return fail(reason::INVALID_SPEC, message);
    }
    let deadline = match deadline(lock) {
        Ok(d) => d,
        Err(message) => return fail(reason::INVALID_SPEC, format!("spec.acquireTimeout: {message}")),
    };
    if queue.own_grant_unseen {
        // Granted in the lock index, the Granted status not in the cache yet
        // (its write given up — it may still land — or the watch slow): the
        // grant stands. Nothing else is decided on this copy: a release from
        // it (acquireTimeout, a holder done, another's turn) could be
        // overtaken by that write landing — a holder told Granted without its
        // lock. The acquire is repeated (same token: the lease is extended,
        // and the Granted status written again) until a copy shows the
        // request Granted; the Granted path decides from there.
        let permits = queue.permits.as_ref().map(|p| p.wants.clone());
        return PendingStep::Acquire {
            ttl,
            deadline: None,
            metadata,
            permits,
        };
    }
    match holder {
        HolderState::Finished(why) => return PendingStep::HolderFinished { message: why },
        HolderState::Missing if holder::owned_by_holder(lock) => return PendingStep::DeleteRequest,
        HolderState::Missing | HolderState::Running | HolderState::Unbound => {}
    }
    if let Some(deadline) = deadline
        && now >= deadline
    {
        let timeout = lock.spec.acquire_timeout.as_deref().unwrap_or_default();
        return fail(reason::TIMEOUT, format!("not granted within acquireTimeout {timeout}"));
    }
    let until_deadline = deadline.map(|d| (d - now).to_std().unwrap_or_default());
    let recheck = until_deadline.map_or(IDLE_RECHECK, |d| d.min(IDLE_RECHECK));
    if holder == HolderState::Missing {
        // A holder that does not exist yet must not be granted: its creation
        // wakes this request (and acquireTimeout, if set, bounds the wait).
        let r = lock
            .spec
            .holder_ref
            .as_ref()
            .map(|r| format!("{:?} {}", r.kind, r.name));
        return PendingStep::Wait {
            reason: reason::HOLDER_NOT_FOUND,
            message: format!("waiting for its holder {} to exist", r.unwrap_or_default()),
            recheck,
        };
    }
    if let Some(view) = &queue.permits {
        let key = queue::lock_key(lock);
        let (reason, message) = match view.turn {
            Turn::Go { .. } => {
                return PendingStep::Acquire {
                    ttl,
                    deadline: until_deadline,
                    metadata,
                    permits: Some(view.wants.clone()),
                };
            }
            Turn::ExceedsLimit if view.capacity.limit == 0 => (
                reason::EXCEEDS_LIMIT,
                format!("waiting for {key}: it is closed (limit 0)"),
            ),
            Turn::ExceedsLimit => (
                reason::EXCEEDS_LIMIT,
                format!(
                    "waiting for {key}: asks for {} permits, more than its limit of {}",
                    view.wants.permits, view.capacity.limit
                ),
            ),
            Turn::Full | Turn::Behind => (
                reason::WAITING,
                in_line(
                    &key,
                    &view.held_as_mutex.clone().unwrap_or_else(|| view.capacity.summary()),
                    queue.position,
                ),
            ),
        };
        return PendingStep::Wait {
            reason,
            message,
            recheck,
        };
    }
    if let Some(holder) = &queue.held_by {
        return PendingStep::Wait {
            reason: reason::WAITING,
            message: format!("waiting for {} (held by {holder})", queue::lock_key(lock)),
            recheck,
        };
    }
    if queue.position > 1 {
        return PendingStep::Wait {
            reason: reason::WAITING,
            message: format!(
                "waiting for {}: {} ahead in the queue",
                queue::lock_key(lock),
                queue.position - 1
            ),
            recheck,
        };
    }
    PendingStep::Acquire {
        ttl,
        deadline: until_deadline,
        metadata,
        permits: None,
    }
}

/// Whether this namespace may use scope Cluster; `Err` is the message saying why not.
pub fn scope_allowed(ctx: &Context, lock: &DistributedLock) -> Result<(), String> {
    ctx.scope_allowed(&lock.namespace().unwrap_or_default(), lock.spec.scope)
}

/// Reconciles a Pending request.
pub async fn reconcile(lock: Arc<DistributedLock>, ctx: &Context, key: &str) -> Result<Action> {
    let own_grant_unseen = ctx.index.holds_unseen_grant(&lock);
    if own_grant_unseen && let Some(over) = unseen_grant_over(&lock, ctx, key).await? {
        return Ok(over);
    }
    let holder = if own_grant_unseen {
        // not read: the grant stands whatever the holder does (decide), and
        // the API server may not be answering
        HolderState::Running
    } else {
        holder::fetch(&ctx.client, &lock).await?
    };
    let members = ctx.index.members(&ctx.store, key);
    let mut waiters = queue::waiters(&members, key, ctx);
    if queue::stands_aside(&lock) {
        // its holder may exist by now: place it where its arrival puts it
        waiters.push(lock.clone());
        waiters.sort_by_cached_key(|l| queue::queue_order(l, ctx));
    }
    let position = queue::position(&waiters, &lock);
    let semaphore = ctx.semaphore_for(key);
    let view = QueueView {
        position,
        held_by: queue::holder(&members, key, &|l| ctx.index.just_released(l))
            .filter(|h| h.uid() != lock.uid() && semaphore.is_none())
            .map(|h| h.name_any()),
        permits: semaphore.map(|s| permit_view(ctx, &s, key, &lock, &members, &waiters)),
        own_grant_unseen,
    };
    let step = decide(&lock, scope_allowed(ctx, &lock), holder, &view, Utc::now());
    tracing::debug!(?step, "pending");
    match step {
        PendingStep::Fail { reason, message } => {
            if reason == reason::TIMEOUT {
                ctx.metrics.timeouts.inc();
            }
            super::finish(&lock, ctx, Phase::Failed, reason, &message).await
        }
        PendingStep::HolderFinished { message } => {
            super::finish(&lock, ctx, Phase::Released, reason::HOLDER_FINISHED, message).await
        }
        PendingStep::DeleteRequest => {
            // The gated Job is gone; in a cluster the garbage collector
            // deletes its request too, and we do it here without waiting.
            let api: Api<DistributedLock> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
            match api.delete(&lock.name_any(), &Default::default()).await {
                Ok(_) => Ok(Action::await_change()),
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(Action::await_change()),
                Err(e) => Err(Error::Kube(e)),
            }
        }
        PendingStep::Wait {
            reason,
            message,
            recheck,
        } => {
            // given back: the fencing write made this copy stale, and the
            // newer one triggers the next reconcile (which writes its place)
            if ctx.index.take_untold_grant(&lock) && give_back_untold_grant(&lock, ctx, key).await? {
                return Ok(Action::requeue(recheck));
            }
            let recheck = match reason {
                // a Semaphore being deleted: the key turns into a mutex soon
                reason::EXCEEDS_LIMIT
                    if ctx
                        .semaphore_for(key)
                        .is_some_and(|s| s.metadata.deletion_timestamp.is_some()) =>
                {
                    recheck.min(Duration::from_secs(1))
                }
                _ => recheck,
            };
            match wait(&lock, ctx, key, view.position, reason, &message).await? {
                Some(later) => Ok(Action::requeue(later.min(recheck))),
                None => Ok(Action::requeue(recheck)),
            }
        }
        PendingStep::Acquire {
            ttl,
            deadline,
            metadata,
            permits,
        } => {
            // (no status write: its place is not known until that request exists)
            if !view.own_grant_unseen
                && let Some(job) = crate::gate::job_queued_ahead(ctx, key, &ctx.arrival(&lock))
            {
                tracing::debug!(%job, "a Job created earlier is queueing for the same key");
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
            let skipped = matches!(view.permits, Some(PermitView { turn: Turn::Go { skipped }, .. }) if skipped > 0);
            let ask = Ask {
                ttl,
                deadline,
                metadata,
                permits,
                skipped,
                position: view.position,
            };
            acquire(lock, ctx, key, ask).await
        }
    }
}

/// A grant this controller made whose Granted status is not in the cache
/// yet: its lease is extended first — never revived, as a same-token acquire
/// would revive a lease that ran out — and the grant then stands (the caller
/// re-acquires and writes Granted again, see [`decide`]). A lease that ran
/// out ends the request Expired; one another owner holds puts it back in
/// line as any waiter (`None` either way when the caller goes on deciding).
async fn unseen_grant_over(lock: &DistributedLock, ctx: &Context, key: &str) -> Result<Option<Action>> {
    let ttl = lock.spec.ttl().unwrap_or(crate::lock::DEFAULT_TTL);
    let token = lock.uid().unwrap_or_default();
    match ctx
        .engine("extend", lock, ctx.locks.extend_lease(key, &token, ttl, None))
        .await?
    {
        crate::lock::ExtendOutcome::Extended => Ok(None),
        crate::lock::ExtendOutcome::Expired => {
            ctx.index.forget_unseen_grant(lock);
            ctx.metrics.expiries.inc();
            let message = "the lease ran out before it could be renewed";
            super::finish(lock, ctx, Phase::Expired, reason::EXPIRED, message)
                .await
                .map(Some)
        }
        crate::lock::ExtendOutcome::NotHeld => {
            ctx.index.forget_unseen_grant(lock);
            Ok(None)
        }
    }
}

/// What an acquire asks the lock index for.
struct Ask {
    ttl: Duration,
    deadline: Option<Duration>,
    metadata: serde_json::Value,
    /// A semaphore's permits, or (None) the whole key.
    permits: Option<Want>,
    /// The grant passes waiters ahead that do not fit (BestEffortFIFO).
    skipped: bool,
    /// Its place in this cluster's queue, for the status if it must wait.
    position: usize,
}

/// A waiter's new place is written once its key has not changed hands here
/// for this long...
pub const PLACE_QUIET: Duration = Duration::from_millis(200);
/// ...or once it has waited this long to be written.
pub const PLACE_MAX_DELAY: Duration = Duration::from_secs(1);

/// Whether to hold back a write that only moves a waiter's place (pure):
/// while its key changes hands here, every handoff moves every waiter, and
/// writing each move would put one API write per waiter in front of the next
/// grant's. `Some(wait)`: look again after `wait`; `None`: write now.
pub fn defer_place(key_moved_ago: Option<Duration>, deferred_for: Duration) -> Option<Duration> {
    let quiet_in = PLACE_QUIET.checked_sub(key_moved_ago?).filter(|d| !d.is_zero())?;
    let due_in = PLACE_MAX_DELAY.checked_sub(deferred_for).filter(|d| !d.is_zero())?;
    Some(quiet_in.min(due_in).max(Duration::from_millis(10)))
}

/// Writes a waiting status; a gated Job is told (an Event) when its place
/// changes. A change of place alone may be held back while the key changes
/// hands ([`defer_place`]): `Some(wait)` says when to look again.
async fn wait(
    lock: &DistributedLock,
    ctx: &Context,
    key: &str,
    position: usize,
    reason: &str,
    message: &str,
) -> Result<Option<Duration>> {
    let next = status::pending(lock, &ctx.arrival(lock), position, reason, message, &ctx.index_health());
    if lock.status.as_ref() == Some(&next) {
        ctx.index.place_written(lock);
        return Ok(None);
    }
    if lock
        .status
        .as_ref()
        .is_some_and(|current| status::only_place_changed(current, &next))
        && let Some(later) = defer_place(ctx.index.moved_ago(key), ctx.index.place_deferred_for(lock))
    {
        return Ok(Some(later));
    }
    let moved = lock.status.as_ref().and_then(|s| s.waiting_position) != next.waiting_position;
    ctx.write_status(lock, next).await?;
    ctx.index.place_written(lock);
    if moved && let Some(job) = ctx.gating_job(lock) {
        let job_ref = kube::Resource::object_ref(job.as_ref(), &());
        super::events::placed(&ctx.recorder, &job_ref, position, message.to_string()).await;
    }
    Ok(None)
}

/// The permits of a semaphore key as `waiters[me]` sees them: this cluster's
/// holders (from the cache) and the holders outside it (as the lock index
/// showed them last), and its turn under the Semaphore's queueing.
fn permit_view(
    ctx: &Context,
    semaphore: &crate::crd::Semaphore,
    key: &str,
    lock: &DistributedLock,
    members: &[Arc<DistributedLock>],
    waiters: &[Arc<DistributedLock>],
) -> PermitView {
    let me = waiters
        .iter()
        .position(|w| w.uid() == lock.uid())
        .unwrap_or(waiters.len());
    let limit = super::semaphores::limit_in_force(semaphore);
    let now = Utc::now();
    let want = |l: &DistributedLock| Want {
        permits: l.spec.permits(),
        exclusive: l.spec.is_exclusive(),
        waited: ctx
            .arrival(l)
            .at
            .and_then(|at| (now - at).to_std().ok())
            .unwrap_or_default(),
    };
    let mut capacity = Capacity {
        limit,
        ..Default::default()
    };
    let mut ours = std::collections::HashSet::new();
    let mut holders = Vec::new();
    for m in members {
        ours.insert(m.uid().unwrap_or_default());
        let holds =
            queue::phase(m) == Phase::Granted && m.metadata.deletion_timestamp.is_none() && !ctx.index.just_released(m);
        if holds {
            let w = want(m);
            capacity.exclusive_held |= w.exclusive;
            capacity.held += if w.exclusive { limit } else { w.permits };
            holders.push((m.status.as_ref().and_then(|s| s.fencing_token), display_holder(m)));
        }
    }
    // oldest grant first
    holders.sort();
    capacity.holders = holders.into_iter().map(|(_, name)| name).collect();
    let wants: Vec<Want> = waiters.iter().map(|w| want(w)).collect();
    let turn = if me < wants.len() {
        admission::turn(semaphore.spec.queueing, &capacity, &wants, me)
    } else {
        Turn::Behind
    };
    // whose turn it is follows from this cluster's holders; holders outside
    // it are known only from the last answer of the lock index, which may be
    // stale, so they are shown but left to the index to count (an acquire
    // that does not fit refreshes them)
    if let Some(seen) = ctx.seen_permits(key) {
        for h in seen
            .holders
            .iter()
            .filter(|h| !ours.contains(&h.token) && h.expires_at > now)
        {
            capacity.exclusive_held |= h.exclusive;
            capacity.held += if h.exclusive { limit } else { h.permits };
            capacity.holders.push(
                h.holder
                    .clone()
                    .unwrap_or_else(|| "a client outside this cluster".into()),
            );
        }
    }
    PermitView {
        wants: want(lock),
        capacity,
        turn,
        held_as_mutex: super::semaphores::held_as_mutex(semaphore),
    }
}

/// Head of the queue and nobody here holds the lock: acquire. The token is the
/// request's UID, so a controller that crashed between acquiring and writing
/// the status gets the same grant back instead of a stuck lock.
#[tracing::instrument(level = "debug", skip_all)]
async fn acquire(lock: Arc<DistributedLock>, ctx: &Context, key: &str, ask: Ask) -> Result<Action> {
    let Ask {
        ttl,
        deadline,
        metadata,
        permits,
        skipped,
        position,
    } = ask;
    let Some(token) = lock.uid() else {
        return Err(Error::Invalid("a DistributedLock without a uid".into()));
    };
    let request = AcquireRequest {
        lock_id: key.to_string(),
        token,
        ttl,
        metadata,
        holder: Some(display_holder(&lock)),
        fencing_token: None,
    };
    let kind = if permits.is_some() { "semaphore" } else { "mutex" };
    let started = Instant::now();
    let grant = match permits {
        None => match ctx.engine("acquire", &lock, ctx.locks.try_acquire(&request)).await {
            Ok(Some(grant)) => grant,
            Ok(None) if leaving_holder_here(ctx, key, &lock) => {
                ctx.index.forget_unseen_grant(&lock);
                // its release (on its way) wakes this request; nothing to write meanwhile
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            Ok(None) => {
                ctx.index.forget_unseen_grant(&lock);
                return held_elsewhere(&lock, ctx, key, deadline).await;
            }
            Err(Error::Lock(LockError::KindMismatch { .. })) => {
                ctx.index.forget_unseen_grant(&lock);
                return kind_mismatch(&lock, ctx, key, position, false).await;
            }
            Err(e) => return Err(e),
        },
        Some(want) => {
            let request = PermitRequest {
                base: request,
                permits: want.permits,
                exclusive: want.exclusive,
            };
            match ctx
                .engine("acquire_permits", &lock, ctx.locks.acquire_permits(&request))
                .await
            {
                Ok(PermitOutcome::Granted(grant)) => grant,
                Ok(PermitOutcome::Full(state)) => {
                    ctx.index.forget_unseen_grant(&lock);
                    return permits_in_use(&lock, ctx, key, state, position, deadline).await;
                }
                Err(Error::Lock(LockError::NoSemaphore { .. })) => {
                    ctx.index.forget_unseen_grant(&lock);
                    return no_semaphore_yet(&lock, ctx, key).await;
                }
                Err(Error::Lock(LockError::KindMismatch { .. })) => {
                    ctx.index.forget_unseen_grant(&lock);
                    return kind_mismatch(&lock, ctx, key, position, true).await;
                }
                Err(e) => return Err(e),
            }
        }
    };
    let next = status::granted(&lock, &ctx.arrival(&lock), &grant, display_holder(&lock), Utc::now());
    // If this write fails the grant stays: a refused write (409) means this
    // copy was stale — the grant may be one an earlier reconcile already
    // reported (a same-token re-acquire returns it), so giving it back could
    // leave a told holder without its lock. The next reconcile decides on the
    // fresh copy: Granted renews it, the head re-acquires it (same token), and
    // a waiter that is no longer the head gives it back once the API server
    // confirms nobody was told (give_back_untold_grant). A write the API
    // server has not answered when the new lease is due for renewal is given
    // up the same way: the next reconcile re-acquires (same token: the lease
    // is extended) and writes again.
    let period = renew_period(ttl);
    let renewal = started + period;
    let written = match status::write_by(&ctx.client, &lock, next, renewal).await? {
        status::Written::At(version) => version,
        status::Written::GivenUp => {
            ctx.index.gave_up_grant_write(&lock, renewal, period);
            return Ok(Action::requeue(Duration::ZERO));
        }
    };
    ctx.index.place_written(&lock);
    ctx.index.wrote_grant(&lock, written.as_deref(), renewal, period);
    ctx.metrics.granted(kind);
    if skipped {
        ctx.metrics.head_of_line_skips.inc();
    }
    if let Some(created) = queue::creation_time(&lock) {
        ctx.metrics
            .wait_seconds
            .observe((Utc::now() - created).num_milliseconds().max(0) as f64 / 1000.0);
    }
    if let Some(released) = ctx.index.take_released_at(key) {
        ctx.metrics.handoff_seconds.observe(released.elapsed().as_secs_f64());
    }
    // the event is not waited for: an API server that stops answering right
    // after the grant's write must not hold up the lease's first renewal
    let note = format!("lock {key} granted with fencing token {}", grant.fencing_token);
    let (recorder, object) = (ctx.recorder.clone(), super::object_ref(&lock));
    tokio::spawn(async move { super::events::normal(&recorder, &object, "Granted", note).await });
    Ok(Action::requeue(renewal.saturating_duration_since(Instant::now())))
}

/// True when this cluster's holder of `key` is on its way out (its request
/// is being deleted, or this controller has just released it): a head woken
/// by that may reach the lock index before the release does.
fn leaving_holder_here(ctx: &Context, key: &str, lock: &DistributedLock) -> bool {
    ctx.index.members(&ctx.store, key).iter().any(|m| {
        m.uid() != lock.uid()
            && queue::phase(m) == Phase::Granted
            && (m.metadata.deletion_timestamp.is_some() || ctx.index.just_released(m))
    })
}

/// A waiting request whose token holds its key: a grant it was never told
/// of (the controller stopped between acquiring and writing Granted, or gave
/// up a Granted write the API server had not answered, and the request is no
/// longer the head). The API server confirms it is still not Granted, and a
/// status write on that very copy (carrying its resourceVersion) makes sure
/// it stays so: a Granted write still on its way — from before a restart, or
/// given up — carries an older resourceVersion and is refused from then on.
/// Only then is the grant given back: no holder can have been told. True
/// when that status was written (and the grant given back, if still held).
async fn give_back_untold_grant(lock: &DistributedLock, ctx: &Context, key: &str) -> Result<bool> {
    let api: Api<super::raw::RawRequest> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
    let Some(fresh) = api.get_opt(&lock.name_any()).await.map_err(Error::Kube)? else {
        return Ok(false);
    };
    let Ok(fresh) = fresh.decode() else {
        return Ok(false);
    };
    if fresh.uid() != lock.uid() || queue::phase(&fresh) == Phase::Granted {
        return Ok(false);
    }
    let fence = status::returning_untold_grant(&fresh, Utc::now());
    if let Err(e) = ctx.write_status(&fresh, fence).await {
        // not fenced (the request changed, perhaps a Granted write landed):
        // the next reconcile decides on the fresh copy and looks again
        if let Some(uid) = lock.uid() {
            ctx.index.suspect_untold_grant(&uid);
        }
        return match e {
            Error::Stale => Ok(false),
            e => Err(e),
        };
    }
    if let Some(token) = lock.uid()
        && ctx.engine("release", lock, ctx.locks.release(key, &token)).await?
    {
        tracing::info!(%key, "gave back a grant its waiting request was never told of");
        ctx.index.mark_released(key, None);
        super::wake_queue(ctx, key, Some(lock), true);
    }
    Ok(true)
}

/// The semaphore's permits are in use (as the lock index says, with holders
/// outside this cluster): say who holds them and look again when the first
/// outside lease could run out (releases here wake this request sooner).
async fn permits_in_use(
    lock: &DistributedLock,
    ctx: &Context,
    key: &str,
    state: crate::lock::Semaphore,
    position: usize,
    deadline: Option<Duration>,
) -> Result<Action> {
    ctx.saw_permits(&state);
    let members = ctx.index.members(&ctx.store, key);
    // a waiter of this cluster among the holders: a grant it was never told
    // of; it gives it back itself (see give_back_untold_grant)
    for owner in members.iter().filter(|m| {
        m.uid() != lock.uid()
            && queue::phase(m) != Phase::Granted
            && state
                .holders
                .iter()
                .any(|h| Some(h.token.as_str()) == m.uid().as_deref())
    }) {
        if let Some(token) = owner.uid() {
            ctx.index.suspect_untold_grant(&token);
        }
        let _ = ctx
            .wake
            .send(kube::runtime::reflector::ObjectRef::from_obj(owner.as_ref()));
    }
    let names: Vec<String> = state
        .holders
        .iter()
        .map(|h| {
            members
                .iter()
                .find(|m| m.uid().as_deref() == Some(h.token.as_str()))
                .map(|m| display_holder(m))
                .or_else(|| h.holder.clone())
                .unwrap_or_else(|| "a client outside this cluster".into())
        })
        .collect();
    let capacity = Capacity {
        limit: state.limit,
        held: state.held(),
        exclusive_held: state.holders.iter().any(|h| h.exclusive),
        holders: names,
    };
    let message = in_line(key, &capacity.summary(), position);
    let later = wait(lock, ctx, key, position, reason::WAITING, &message).await?;
    let first_expiry = state.holders.iter().map(|h| h.expires_at).min();
    let retry = first_expiry.map_or(ctx.max_retry_interval, |at| {
        (at - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(20)
    });
    let retry = retry.clamp(Duration::from_millis(20), ctx.max_retry_interval);
    let retry = later.map_or(retry, |later| later.min(retry));
    Ok(Action::requeue(deadline.map_or(retry, |d| d.min(retry))))
}

/// The key's Semaphore exists but its limit is not in the lock index yet
/// (its own reconcile is on the way): put it there, then try again.
async fn no_semaphore_yet(lock: &DistributedLock, ctx: &Context, key: &str) -> Result<Action> {
    if let Some(semaphore) = ctx.semaphore_for(key)
        && semaphore.metadata.deletion_timestamp.is_none()
    {
        let state = ctx
            .engine(
                "semaphore_set",
                lock,
                ctx.locks.semaphore_set(key, semaphore.spec.limit),
            )
            .await?;
        ctx.saw_permits(&state);
        return Ok(Action::requeue(Duration::from_millis(1)));
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The key is used as the other kind in the lock index (a plain mutex held
/// while a Semaphore governs it here, or a semaphore no Semaphore here
/// governs): wait, and say so in the requester's terms.
async fn kind_mismatch(
    lock: &DistributedLock,
    ctx: &Context,
    key: &str,
    position: usize,
    wants_permits: bool,
) -> Result<Action> {
    let message = if wants_permits {
        let why = ctx
            .semaphore_for(key)
            .and_then(|s| super::semaphores::held_as_mutex(&s))
            .unwrap_or_else(|| "held as a plain mutex; its Semaphore takes effect once it is released".into());
        format!("waiting for {key}: {why}")
    } else {
        let limit = match ctx.locks.semaphore_get(key).await {
            Ok(Some(s)) => format!(" (limit {})", s.limit),
            _ => String::new(),
        };
        format!(
            "waiting for {key}: the lock index holds it as a semaphore{limit} that no Semaphore here governs; create a Semaphore for it, or remove it when unused (lockctl semaphore delete)"
        )
    };
    let later = wait(lock, ctx, key, position, reason::KIND_MISMATCH, &message).await?;
    let retry = Duration::from_secs(2).min(ctx.max_retry_interval);
    Ok(Action::requeue(later.map_or(retry, |later| later.min(retry))))
}

/// Held outside this cluster (CLI, another cluster): look again no later than
/// its expiry, and at least every max_retry_interval.
async fn held_elsewhere(
    lock: &DistributedLock,
    ctx: &Context,
    key: &str,
    deadline: Option<Duration>,
) -> Result<Action> {
    let current = ctx.engine("get", lock, ctx.locks.get(key)).await?;
    // held by a request of this cluster that waits (or has finished): a grant
    // it was never told of; it gives it back itself (see give_back_untold_grant)
    if let Some(held) = &current
        && let Some(owner) = ctx
            .index
            .members(&ctx.store, key)
            .into_iter()
            .find(|m| m.uid().as_deref() == Some(held.token.as_str()) && m.uid() != lock.uid())
        && queue::phase(&owner) != Phase::Granted
    {
        ctx.index.suspect_untold_grant(&held.token);
        let _ = ctx
            .wake
            .send(kube::runtime::reflector::ObjectRef::from_obj(owner.as_ref()));
    }
    let (message, retry) = match current {
        Some(held) => (
            format!(
                "held outside this cluster by {} until {}",
                held.holder.as_deref().unwrap_or("another client"),
                status::rfc3339(held.expires_at)
            ),
            (held.expires_at - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(20),
        ),
        None => (
            "the lock was just taken; retrying".to_string(),
            Duration::from_millis(50),
        ),
    };
    let next = status::pending(
        lock,
        &ctx.arrival(lock),
        1,
        reason::HELD_ELSEWHERE,
        &message,
        &ctx.index_health(),
    );
    ctx.write_status(lock, next).await?;
    ctx.index.place_written(lock);
    let retry = retry.clamp(Duration::from_millis(20), ctx.max_retry_interval);
    Ok(Action::requeue(deadline.map_or(retry, |d| d.min(retry))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{HolderKind, HolderRef};
    use crate::fixtures::{at, request};

    fn held_by_job(mut lock: DistributedLock, job: &str) -> DistributedLock {
        lock.spec.holder_ref = Some(HolderRef {
            kind: HolderKind::Job,
            name: job.into(),
        });
        lock
    }

    fn head() -> QueueView {
        QueueView {
            position: 1,
            held_by: None,
            own_grant_unseen: false,
            permits: None,
        }
    }

    fn created_at_zero() -> DistributedLock {
        let mut lock = request("r", "ns", "k", 0, 0, 1);
        lock.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(at(0).timestamp()).unwrap(),
        ));
        lock
    }

    #[test]
    fn the_head_of_a_free_queue_acquires() {
        let step = decide(&created_at_zero(), Ok(()), HolderState::Unbound, &head(), at(1));
        assert!(matches!(step, PendingStep::Acquire { ttl, deadline: None, .. } if ttl == Duration::from_secs(30)));
    }

    #[test]
    fn others_wait_their_turn() {
        let lock = created_at_zero();
        let behind = QueueView {
            position: 3,
            held_by: None,
            own_grant_unseen: false,
            permits: None,
        };
        assert!(
            matches!(decide(&lock, Ok(()), HolderState::Unbound, &behind, at(1)), PendingStep::Wait { reason: "Waiting", message, .. } if message.contains("2 ahead"))
        );
        let held = QueueView {
            position: 1,
            held_by: Some("other".into()),
            own_grant_unseen: false,
            permits: None,
        };
        assert!(
            matches!(decide(&lock, Ok(()), HolderState::Unbound, &held, at(1)), PendingStep::Wait { message, .. } if message.contains("held by other"))
        );
    }

    #[test]
    fn a_holder_that_does_not_exist_yet_is_waited_for_until_the_timeout() {
        let lock = &mut held_by_job(created_at_zero(), "reindex");
        let step = decide(lock, Ok(()), HolderState::Missing, &head(), at(1));
        assert!(matches!(step, PendingStep::Wait { reason: "HolderNotFound", recheck, .. } if recheck == IDLE_RECHECK));
        lock.spec.acquire_timeout = Some("10s".into());
        let step = decide(lock, Ok(()), HolderState::Missing, &head(), at(4));
        assert!(matches!(step, PendingStep::Wait { recheck, .. } if recheck == Duration::from_secs(6)));
        let step = decide(lock, Ok(()), HolderState::Missing, &head(), at(10));
        assert!(matches!(step, PendingStep::Fail { reason: "Timeout", .. }));
        // once it exists, the head acquires
        let step = decide(lock, Ok(()), HolderState::Running, &head(), at(4));
        assert!(matches!(step, PendingStep::Acquire { .. }));
    }

    fn with_permits(position: usize, turn: Turn, limit: u32, held: u32, holders: &[&str], permits: u32) -> QueueView {
        QueueView {
            position,
            held_by: None,
            own_grant_unseen: false,
            permits: Some(PermitView {
                capacity: Capacity {
                    limit,
                    held,
                    exclusive_held: false,
                    holders: holders.iter().map(|h| h.to_string()).collect(),
                },
                turn,
                wants: Want {
                    permits,
                    exclusive: false,
                    waited: Duration::ZERO,
                },
                held_as_mutex: None,
            }),
        }
    }

    #[test]
    fn a_semaphore_waiter_says_who_holds_the_permits_and_its_place() {
        let lock = created_at_zero();
        let view = with_permits(2, Turn::Behind, 3, 3, &["a", "b", "c"], 1);
        let step = decide(&lock, Ok(()), HolderState::Unbound, &view, at(1));
        assert!(
            matches!(&step, PendingStep::Wait { reason: "Waiting", message, .. } if message == "waiting for ns/k: 3/3 permits held by a, b, c; 2nd in line"),
            "{step:?}"
        );
        let many: Vec<String> = (1..=7).map(|i| format!("h{i}")).collect();
        let names: Vec<&str> = many.iter().map(String::as_str).collect();
        let view = with_permits(1, Turn::Full, 7, 7, &names, 1);
        let step = decide(&lock, Ok(()), HolderState::Unbound, &view, at(1));
        assert!(
            matches!(&step, PendingStep::Wait { message, .. } if message.ends_with("held by h1, h2, h3, h4, h5 and 2 more; 1st in line")),
            "{step:?}"
        );
    }

    #[test]
    fn a_semaphore_waiter_over_the_limit_is_told_so_and_its_turn_acquires_permits() {
        let lock = created_at_zero();
        let over = with_permits(1, Turn::ExceedsLimit, 3, 0, &[], 5);
        let step = decide(&lock, Ok(()), HolderState::Unbound, &over, at(1));
        assert!(
            matches!(&step, PendingStep::Wait { reason: "ExceedsLimit", message, .. } if message.contains("asks for 5 permits, more than its limit of 3")),
            "{step:?}"
        );
        let closed = with_permits(1, Turn::ExceedsLimit, 0, 0, &[], 1);
        let step = decide(&lock, Ok(()), HolderState::Unbound, &closed, at(1));
        assert!(
            matches!(&step, PendingStep::Wait { message, .. } if message.contains("closed (limit 0)")),
            "{step:?}"
        );
        let go = with_permits(2, Turn::Go { skipped: 1 }, 3, 1, &["a"], 2);
        let step = decide(&lock, Ok(()), HolderState::Unbound, &go, at(1));
        assert!(
            matches!(
                &step,
                PendingStep::Acquire {
                    permits: Some(Want {
                        permits: 2,
                        exclusive: false,
                        ..
                    }),
                    ..
                }
            ),
            "{step:?}"
        );
    }

    #[test]
    fn a_grant_whose_status_is_not_seen_yet_stands_whatever_this_copy_says() {
        // past its acquireTimeout, its holder done, behind others, the key
        // held by another here: a release from this copy could be overtaken
        // by its Granted write landing, so it re-acquires (extends)
        let mut lock = held_by_job(created_at_zero(), "j");
        lock.spec.acquire_timeout = Some("5s".into());
        let unseen = |mut view: QueueView| {
            view.own_grant_unseen = true;
            view
        };
        let behind = QueueView {
            position: 3,
            held_by: Some("other".into()),
            permits: None,
            own_grant_unseen: false,
        };
        for holder in [
            HolderState::Finished("Job completed"),
            HolderState::Missing,
            HolderState::Running,
        ] {
            let step = decide(&lock, Ok(()), holder, &unseen(behind.clone()), at(60));
            assert!(
                matches!(
                    step,
                    PendingStep::Acquire {
                        deadline: None,
                        permits: None,
                        ..
                    }
                ),
                "{holder:?}: {step:?}"
            );
        }
        // a semaphore key: the same permits again
        let full = unseen(with_permits(2, Turn::ExceedsLimit, 1, 1, &["a"], 1));
        let step = decide(&lock, Ok(()), HolderState::Running, &full, at(60));
        assert!(
            matches!(
                &step,
                PendingStep::Acquire {
                    permits: Some(Want { permits: 1, .. }),
                    ..
                }
            ),
            "{step:?}"
        );
        // seen (or forgotten): the copy is decided on as any waiter's
        assert!(matches!(
            decide(&lock, Ok(()), HolderState::Running, &behind, at(60)),
            PendingStep::Fail { reason: "Timeout", .. }
        ));
    }

    #[test]
    fn a_gated_request_whose_job_is_gone_is_deleted() {
        let mut lock = held_by_job(created_at_zero(), "j");
        lock.metadata.owner_references = Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "batch/v1".into(),
            kind: "Job".into(),
            name: "j".into(),
            uid: "j-uid".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        assert_eq!(
            decide(&lock, Ok(()), HolderState::Missing, &head(), at(1)),
            PendingStep::DeleteRequest
        );
    }

    #[test]
    fn the_timeout_counts_from_creation_and_annotations_do_not_move_it() {
        let mut lock = created_at_zero();
        lock.spec.acquire_timeout = Some("5s".into());
        lock.metadata.annotations = Some(
            [("lockmanager.dev/requested-at".to_string(), "bogus".to_string())]
                .into_iter()
                .collect(),
        );
        assert!(
            matches!(decide(&lock, Ok(()), HolderState::Unbound, &head(), at(4)), PendingStep::Acquire { deadline: Some(d), .. } if d == Duration::from_secs(1))
        );
        assert!(matches!(
            decide(&lock, Ok(()), HolderState::Unbound, &head(), at(5)),
            PendingStep::Fail { reason: "Timeout", .. }
        ));
    }

    #[test]
    fn metadata_too_deep_to_use_fails_the_request_with_a_message() {
        let mut lock = created_at_zero();
        for depth in [200, MAX_METADATA_DEPTH] {
            let deep = format!("{}{{}}{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
            lock.spec.metadata = Some(serde_json::from_str(&deep).unwrap());
            assert!(
                matches!(
                    decide(&lock, Ok(()), HolderState::Unbound, &head(), at(1)),
                    PendingStep::Fail { reason: "InvalidSpec", message } if message.contains("spec.metadata")
                ),
                "{depth} levels"
            );
        }
        assert_eq!(nesting(&json!({"a": [1, {"b": {}}]})), 4);
        lock.spec.metadata = Some(serde_json::from_str(r#"{"owner": "team-a"}"#).unwrap());
        assert!(matches!(
            decide(&lock, Ok(()), HolderState::Unbound, &head(), at(1)),
            PendingStep::Acquire { metadata, .. } if metadata["owner"] == "team-a"
        ));
    }

    #[test]
    fn a_place_alone_is_written_once_the_key_is_quiet_or_after_at_most_a_second() {
        let ms = Duration::from_millis;
        // the key has not changed hands lately: write now
        assert_eq!(defer_place(None, ms(0)), None);
        assert_eq!(defer_place(Some(PLACE_QUIET), ms(0)), None);
        // it just did: look again when it has been quiet for PLACE_QUIET
        assert_eq!(defer_place(Some(ms(50)), ms(0)), Some(PLACE_QUIET - ms(50)));
        // but never hold a place back longer than PLACE_MAX_DELAY
        assert_eq!(defer_place(Some(ms(50)), PLACE_MAX_DELAY - ms(30)), Some(ms(30)));
        assert_eq!(defer_place(Some(ms(50)), PLACE_MAX_DELAY), None);
        assert_eq!(defer_place(Some(ms(0)), ms(5000)), None);
    }

    #[test]
    fn only_a_change_of_place_may_be_held_back() {
        let lock = request("a", "ns", "k", 0, 10, 42);
        let arrival = queue::Arrival::recorded(&lock).unwrap_or(queue::Arrival { at: None, sequence: 42 });
        let health = status::IndexHealth::Reachable;
        let third = status::pending(&lock, &arrival, 3, reason::WAITING, "held by x; 3rd in line", &health);
        let mut waiting = lock.clone();
        waiting.status = Some(third.clone());
        let second = status::pending(
            &waiting,
            &arrival,
            2,
            reason::WAITING,
            "held by y; 2nd in line",
            &health,
        );
        assert!(status::only_place_changed(&third, &second));
        // a new reason, a failing index or a grant is written at once
        let other = status::pending(&waiting, &arrival, 2, reason::HELD_ELSEWHERE, "held outside", &health);
        assert!(!status::only_place_changed(&third, &other));
        let failing = status::IndexHealth::Failing(reason::INDEX_UNREACHABLE, "down".into());
        let down = status::pending(
            &waiting,
            &arrival,
            3,
            reason::WAITING,
            "held by x; 3rd in line",
            &failing,
        );
        assert!(!status::only_place_changed(&third, &down));
        let mut granted = second.clone();
        granted.phase = Some(Phase::Granted);
        assert!(!status::only_place_changed(&third, &granted));
    }

    #[test]
    fn finished_holders_and_bad_scope_end_the_wait() {
        let lock = created_at_zero();
        assert_eq!(
            decide(&lock, Ok(()), HolderState::Finished("Job completed"), &head(), at(1)),
            PendingStep::HolderFinished {
                message: "Job completed"
            }
        );
        assert!(matches!(
            decide(&lock, Err("no".into()), HolderState::Unbound, &head(), at(1)),
            PendingStep::Fail {
                reason: "ScopeNotAllowed",
                ..
            }
        ));
    }
}
