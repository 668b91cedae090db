//! A Pending request: decide (fail, wait, give up, or acquire), then act.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use serde_json::json;

use super::error::{Error, Result};
use super::holder::{self, HolderState};
use super::status::{self, reason};
use super::{Context, display_holder, renew_period};
use crate::crd::{DistributedLock, LockScope, Phase};
use crate::lock::AcquireRequest;
use crate::queue;

/// Where a Pending request stands in this cluster's queue for its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueView {
    /// 1-based place among the waiters.
    pub position: usize,
    /// The request of this cluster that holds the key, if any (not this one).
    pub held_by: Option<String>,
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
    /// Head of the queue and free here: acquire with this lease and metadata.
    Acquire {
        ttl: Duration,
        deadline: Option<Duration>,
        metadata: serde_json::Value,
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
    }
}

/// Whether this namespace may use scope Cluster; `Err` is the message saying why not.
pub fn scope_allowed(ctx: &Context, lock: &DistributedLock) -> Result<(), String> {
    let Some(allowed) = &ctx.cluster_scope_namespaces else {
        return Ok(());
    };
    let namespace = lock.namespace().unwrap_or_default();
    if lock.spec.scope != LockScope::Cluster || allowed.contains(&namespace) {
        return Ok(());
    }
    let mut names: Vec<_> = allowed.iter().cloned().collect();
    names.sort();
    Err(format!(
        "namespace {namespace:?} may not use scope Cluster (allowed: {})",
        names.join(", ")
    ))
}

/// Reconciles a Pending request.
pub async fn reconcile(lock: Arc<DistributedLock>, ctx: &Context, key: &str) -> Result<Action> {
    let holder = holder::fetch(&ctx.client, &lock).await?;
    let members = ctx.index.members(&ctx.store, key);
    let mut waiters = queue::waiters(&members, key, &*ctx.index);
    if queue::waits_for_its_holder(&lock) {
        // its holder may exist by now: place it where its arrival puts it
        waiters.push(lock.clone());
        waiters.sort_by_cached_key(|l| queue::queue_order(l, &*ctx.index));
    }
    let view = QueueView {
        position: queue::position(&waiters, &lock),
        held_by: queue::holder(&members, key, &|l| ctx.index.just_released(l))
            .filter(|h| h.uid() != lock.uid())
            .map(|h| h.name_any()),
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
            if ctx.index.take_untold_grant(&lock) {
                give_back_untold_grant(&lock, ctx, key).await?;
            }
            let next = status::pending(
                &lock,
                &ctx.arrival(&lock),
                view.position,
                reason,
                &message,
                &ctx.index_health(),
            );
            status::write(&ctx.client, &lock, next).await?;
            Ok(Action::requeue(recheck))
        }
        PendingStep::Acquire {
            ttl,
            deadline,
            metadata,
        } => acquire(lock, ctx, key, ttl, deadline, metadata).await,
    }
}

/// Head of the queue and nobody here holds the lock: acquire. The token is the
/// request's UID, so a controller that crashed between acquiring and writing
/// the status gets the same grant back instead of a stuck lock.
async fn acquire(
    lock: Arc<DistributedLock>,
    ctx: &Context,
    key: &str,
    ttl: Duration,
    deadline: Option<Duration>,
    metadata: serde_json::Value,
) -> Result<Action> {
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
    let acquired = ctx.engine("acquire", &lock, ctx.locks.try_acquire(&request)).await?;
    let Some(grant) = acquired else {
        return held_elsewhere(&lock, ctx, key, deadline).await;
    };
    let next = status::granted(&lock, &ctx.arrival(&lock), &grant, display_holder(&lock), Utc::now());
    // If this write fails the grant stays: a refused write (409) means this
    // copy was stale — the grant may be one an earlier reconcile already
    // reported (a same-token re-acquire returns it), so giving it back could
    // leave a told holder without its lock. The next reconcile decides on the
    // fresh copy: Granted renews it, the head re-acquires it (same token), and
    // a waiter that is no longer the head gives it back once the API server
    // confirms nobody was told (give_back_untold_grant).
    status::write(&ctx.client, &lock, next).await?;
    ctx.metrics.grants.inc();
    if let Some(created) = queue::creation_time(&lock) {
        ctx.metrics
            .wait_seconds
            .observe((Utc::now() - created).num_milliseconds().max(0) as f64 / 1000.0);
    }
    if let Some(released) = ctx.index.take_released_at(key) {
        ctx.metrics.handoff_seconds.observe(released.elapsed().as_secs_f64());
    }
    let note = format!("lock {key} granted with fencing token {}", grant.fencing_token);
    super::events::normal(&ctx.recorder, &super::object_ref(&lock), "Granted", note).await;
    Ok(Action::requeue(renew_period(ttl)))
}

/// A waiting request whose token holds its key: a grant it was never told of
/// (the controller stopped between acquiring and writing Granted, and the
/// request is no longer the head). The API server confirms it is still not
/// Granted — no holder can have been told — before the grant is given back.
async fn give_back_untold_grant(lock: &DistributedLock, ctx: &Context, key: &str) -> Result<()> {
    let api: Api<super::raw::RawRequest> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
    let Some(fresh) = api.get_opt(&lock.name_any()).await.map_err(Error::Kube)? else {
        return Ok(());
    };
    let Ok(fresh) = fresh.decode() else {
        return Ok(());
    };
    if fresh.uid() != lock.uid() || queue::phase(&fresh) == Phase::Granted {
        return Ok(());
    }
    if let Some(token) = lock.uid()
        && ctx.engine("release", lock, ctx.locks.release(key, &token)).await?
    {
        tracing::info!(%key, "gave back a grant its waiting request was never told of");
        ctx.index.mark_released(key, None);
        super::wake_queue(ctx, key, Some(lock));
    }
    Ok(())
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
    status::write(&ctx.client, lock, next).await?;
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
        };
        assert!(
            matches!(decide(&lock, Ok(()), HolderState::Unbound, &behind, at(1)), PendingStep::Wait { reason: "Waiting", message, .. } if message.contains("2 ahead"))
        );
        let held = QueueView {
            position: 1,
            held_by: Some("other".into()),
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
