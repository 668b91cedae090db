//! The `Semaphore` controller: puts each Semaphore's limit in force in the
//! lock index, shows who holds its permits, and closes the key (then gives
//! it back to plain mutex requests) when the Semaphore is deleted.

use std::sync::Arc;
use std::time::Duration;

use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;

use super::error::{Category, Error, Result};
use super::{Context, display_holder, status};
use crate::crd::{Phase, SEMAPHORE_FINALIZER, Semaphore, SemaphoreHolder, SemaphoreStatus};
use crate::lock::{LockError, RetireOutcome};
use crate::queue;

/// Condition type of a Semaphore.
pub const READY: &str = "Ready";

/// Reasons of the Ready condition.
pub mod reason {
    pub const IN_FORCE: &str = "InForce";
    pub const CONFLICT: &str = "Conflict";
    pub const MUTEX_IN_USE: &str = "MutexInUse";
    pub const SCOPE_NOT_ALLOWED: &str = "ScopeNotAllowed";
    pub const DRAINING: &str = "Draining";
    pub const INDEX_UNREACHABLE: &str = "IndexUnreachable";
    pub use crate::controller::status::reason::{INDEX_READ_ONLY, KIND_MISMATCH, UNREADABLE_LOCK};
}

/// How often a Semaphore's status is refreshed without an event (holders
/// outside this cluster come and go unseen).
const REFRESH: Duration = Duration::from_secs(15);

/// The lock key a Semaphore governs.
pub fn key_of(semaphore: &Semaphore) -> String {
    semaphore
        .spec
        .lock_key(&semaphore.namespace().unwrap_or_default(), &semaphore.name_any())
}

/// The Semaphore that governs `key`: the oldest one for it (creation time,
/// then namespace and name) among those whose scope is `allowed`.
pub fn governing(all: &[Arc<Semaphore>], key: &str, allowed: &dyn Fn(&Semaphore) -> bool) -> Option<Arc<Semaphore>> {
    all.iter()
        .filter(|s| key_of(s) == key && allowed(s))
        .min_by_key(|s| {
            (
                s.metadata.creation_timestamp.clone().map(|t| t.0),
                s.namespace(),
                s.name_any(),
            )
        })
        .cloned()
}

/// Whether this Semaphore's namespace may use scope Cluster.
pub fn scope_allowed(ctx: &Context, semaphore: &Semaphore) -> Result<(), String> {
    ctx.scope_allowed(&semaphore.namespace().unwrap_or_default(), semaphore.spec.scope)
}

/// The limit requests of a key see: 0 while its Semaphore is being deleted.
pub fn limit_in_force(semaphore: &Semaphore) -> u32 {
    if semaphore.metadata.deletion_timestamp.is_some() {
        0
    } else {
        semaphore.spec.limit
    }
}

#[tracing::instrument(skip(semaphore, ctx), fields(name = %semaphore.name_any(), namespace = semaphore.namespace().unwrap_or_default()))]
pub async fn reconcile(semaphore: Arc<Semaphore>, ctx: Arc<Context>) -> Result<Action> {
    let api: Api<Semaphore> = Api::namespaced(ctx.client.clone(), &semaphore.namespace().unwrap_or_default());
    finalizer(&api, SEMAPHORE_FINALIZER, semaphore, |event| async {
        match event {
            Finalizer::Apply(semaphore) => apply(&semaphore, &ctx).await,
            Finalizer::Cleanup(semaphore) => cleanup(&semaphore, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(semaphore: Arc<Semaphore>, error: &Error, ctx: Arc<Context>) -> Action {
    super::retry_after(&*semaphore, error, &ctx)
}

async fn apply(semaphore: &Semaphore, ctx: &Context) -> Result<Action> {
    let key = key_of(semaphore);
    if let Err(message) = scope_allowed(ctx, semaphore) {
        write(
            ctx,
            semaphore,
            not_ready(semaphore, &key, reason::SCOPE_NOT_ALLOWED, &message),
        )
        .await?;
        return Ok(Action::await_change());
    }
    if let Some(other) = ctx.semaphore_for(&key).filter(|g| g.uid() != semaphore.uid()) {
        let message = format!(
            "{key} is governed by Semaphore {}/{} (the oldest for it); this one has no effect",
            other.namespace().unwrap_or_default(),
            other.name_any()
        );
        write(ctx, semaphore, not_ready(semaphore, &key, reason::CONFLICT, &message)).await?;
        // takes over when the other one goes
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let limit = semaphore.spec.limit;
    match ctx.timed("semaphore_set", ctx.locks.semaphore_set(&key, limit)).await {
        Ok(state) => {
            ctx.saw_permits(&state);
            let previous = semaphore.status.as_ref().and_then(|s| s.limit);
            let next = in_force(ctx, semaphore, &key, &state);
            write(ctx, semaphore, next).await?;
            if previous != Some(i64::from(limit)) {
                wake_waiters(ctx, &key);
            }
            Ok(Action::requeue(REFRESH))
        }
        Err(LockError::KindMismatch { .. }) => {
            let message = match ctx.timed("get", ctx.locks.get(&key)).await {
                Ok(Some(held)) => format!(
                    "held as a plain mutex by {} until {}; the limit takes effect once it is released",
                    held.holder.as_deref().unwrap_or("a client"),
                    status::rfc3339(held.expires_at)
                ),
                _ => "held as a plain mutex; the limit takes effect once it is released".to_string(),
            };
            let mut next = not_ready(semaphore, &key, reason::MUTEX_IN_USE, &message);
            next.waiting = Some(waiting_here(ctx, &key) as i64);
            write(ctx, semaphore, next).await?;
            Ok(Action::requeue(Duration::from_secs(2)))
        }
        Err(e) => {
            let message = format!("the lock index: {}", crate::lock::error_line(&e));
            let why = match Category::of_lock_error(&e) {
                Category::ReadOnly => reason::INDEX_READ_ONLY,
                Category::Document => reason::UNREADABLE_LOCK,
                Category::Kind => reason::KIND_MISMATCH,
                _ => reason::INDEX_UNREACHABLE,
            };
            write(ctx, semaphore, not_ready(semaphore, &key, why, &message)).await?;
            Err(Error::Lock(e))
        }
    }
}

/// Deletion: the key is closed (limit 0) until its holders are done, then
/// its semaphore document goes and the key is a plain mutex again (unless
/// another Semaphore for it takes over).
async fn cleanup(semaphore: &Semaphore, ctx: &Context) -> Result<Action> {
    let key = key_of(semaphore);
    let governs = ctx.semaphore_for(&key).is_some_and(|g| g.uid() == semaphore.uid());
    let successor = ctx
        .semaphores
        .state()
        .into_iter()
        .any(|s| s.uid() != semaphore.uid() && s.metadata.deletion_timestamp.is_none() && key_of(&s) == key);
    if !governs || successor {
        return Ok(Action::await_change());
    }
    match ctx.timed("semaphore_delete", ctx.locks.semaphore_delete(&key)).await {
        Ok(RetireOutcome::Deleted | RetireOutcome::Missing) | Err(LockError::KindMismatch { .. }) => {
            wake_waiters(ctx, &key);
            Ok(Action::await_change())
        }
        Ok(RetireOutcome::Held(state)) => {
            let state = match state.limit {
                0 => state,
                _ => ctx
                    .timed("semaphore_set", ctx.locks.semaphore_set(&key, 0))
                    .await
                    .map_err(Error::Lock)?,
            };
            ctx.saw_permits(&state);
            let message = format!(
                "being deleted: {key} is closed until its {} holder(s) release",
                state.holders.len()
            );
            let mut next = in_force(ctx, semaphore, &key, &state);
            set_ready(&mut next, semaphore, false, reason::DRAINING, &message);
            write(ctx, semaphore, next).await?;
            Err(Error::Draining(message))
        }
        Err(e) => Err(Error::Lock(e)),
    }
}

/// Wakes the waiting requests of `key` (the limit changed, or the key is a mutex again).
fn wake_waiters(ctx: &Context, key: &str) {
    for request in ctx.index.members(&ctx.store, key) {
        if queue::phase(&request) == Phase::Pending {
            let _ = ctx.wake.send(ObjectRef::from_obj(request.as_ref()));
        }
    }
}

/// The status of a Semaphore whose limit is in force: who holds its permits now.
fn in_force(ctx: &Context, semaphore: &Semaphore, key: &str, state: &crate::lock::Semaphore) -> SemaphoreStatus {
    let members = ctx.index.members(&ctx.store, key);
    let holders = state
        .holders
        .iter()
        .map(|h| {
            let request = members.iter().find(|m| m.uid().as_deref() == Some(h.token.as_str()));
            SemaphoreHolder {
                request: request.map(|r| format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any())),
                holder: h.holder.clone().or_else(|| request.map(|r| display_holder(r))),
                permits: i64::from(h.permits),
                exclusive: h.exclusive,
                fencing_token: i64::try_from(h.fencing_token).unwrap_or(i64::MAX),
                expires_at: status::rfc3339(h.expires_at),
            }
        })
        .collect();
    let waiting = waiting_here(ctx, key);
    let mut next = SemaphoreStatus {
        lock_key: Some(key.to_string()),
        limit: Some(i64::from(state.limit)),
        held: Some(i64::from(state.held())),
        waiting: Some(waiting as i64),
        holders,
        observed_generation: semaphore.metadata.generation,
        conditions: semaphore.status.clone().unwrap_or_default().conditions,
    };
    let message = format!("{key} has {} of {} permits in use", state.held(), state.limit);
    set_ready(&mut next, semaphore, true, reason::IN_FORCE, &message);
    next
}

/// Requests of this cluster waiting for `key`.
fn waiting_here(ctx: &Context, key: &str) -> usize {
    ctx.index
        .members(&ctx.store, key)
        .iter()
        .filter(|m| queue::phase(m) == Phase::Pending && m.metadata.deletion_timestamp.is_none())
        .count()
}

/// Why the key's Semaphore is not in force because a plain mutex holds the
/// key, as its Ready condition says; `None` when it is in force.
pub fn held_as_mutex(semaphore: &Semaphore) -> Option<String> {
    semaphore
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == READY && c.reason == reason::MUTEX_IN_USE)
        .map(|c| c.message.clone())
}

fn not_ready(semaphore: &Semaphore, key: &str, reason: &str, message: &str) -> SemaphoreStatus {
    let previous = semaphore.status.clone().unwrap_or_default();
    let mut next = SemaphoreStatus {
        lock_key: Some(key.to_string()),
        observed_generation: semaphore.metadata.generation,
        conditions: previous.conditions,
        ..Default::default()
    };
    set_ready(&mut next, semaphore, false, reason, message);
    next
}

/// Sets the Ready condition, keeping its lastTransitionTime while its status stays.
fn set_ready(status: &mut SemaphoreStatus, semaphore: &Semaphore, ready: bool, reason: &str, message: &str) {
    status::set_condition_in(
        &mut status.conditions,
        semaphore.metadata.generation,
        READY,
        ready,
        reason,
        message,
    );
}

/// Writes the status unless nothing changed.
async fn write(ctx: &Context, semaphore: &Semaphore, next: SemaphoreStatus) -> Result<()> {
    if semaphore.status.as_ref() == Some(&next) {
        return Ok(());
    }
    let api: Api<Semaphore> = Api::namespaced(ctx.client.clone(), &semaphore.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "lockmanager.dev/v1alpha1",
        "kind": "Semaphore",
        "status": next,
    });
    api.patch_status(
        &semaphore.name_any(),
        &PatchParams::apply(crate::crd::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LockScope, Queueing, SemaphoreSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn semaphore(namespace: &str, name: &str, lock_id: Option<&str>, created: i64) -> Arc<Semaphore> {
        let mut s = Semaphore::new(
            name,
            SemaphoreSpec {
                lock_id: lock_id.map(String::from),
                limit: 3,
                scope: LockScope::Namespace,
                queueing: Queueing::StrictFIFO,
            },
        );
        s.metadata.namespace = Some(namespace.into());
        s.metadata.uid = Some(format!("{namespace}-{name}"));
        s.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(created).unwrap()));
        Arc::new(s)
    }

    #[test]
    fn the_name_is_the_lock_id_unless_spec_says_otherwise() {
        assert_eq!(key_of(&semaphore("batch", "reindex", None, 0)), "batch/reindex");
        assert_eq!(key_of(&semaphore("batch", "x", Some("Re:Index"), 0)), "batch/Re:Index");
    }

    #[test]
    fn the_oldest_semaphore_of_a_key_governs() {
        let all = vec![
            semaphore("batch", "young", Some("k"), 20),
            semaphore("batch", "old", Some("k"), 10),
            semaphore("batch", "k", None, 5),
            semaphore("other", "k", None, 1),
        ];
        let any = |_: &Semaphore| true;
        assert_eq!(governing(&all, "batch/k", &any).unwrap().name_any(), "k");
        let not_k = |s: &Semaphore| s.name_any() != "k";
        assert_eq!(governing(&all, "batch/k", &not_k).unwrap().name_any(), "old");
        assert!(governing(&all, "batch/none", &any).is_none());
    }
}
