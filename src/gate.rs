//! Suspend gating: a Job created with `spec.suspend: true` and the annotation
//! `lockmanager.dev/lock: LOCK_ID` gets a DistributedLock owned by it; the Job
//! is un-suspended (with its fencing token annotated) once the lock is granted.
//! The lock is released when the Job finishes, through the request's holderRef.
//! Jobs that another controller manages (Kueue, `spec.managedBy`) are never
//! touched: their `spec.suspend` is not ours.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::controller::holder::{job_finished, request_names};
use crate::controller::{Context, Error, events};
use crate::crd::{DistributedLock, DistributedLockSpec, FreeForm, HolderKind, HolderRef, LockScope, Phase};

pub use crate::crd::LOCK_ANNOTATION;
pub const TTL_ANNOTATION: &str = "lockmanager.dev/ttl";
pub const SCOPE_ANNOTATION: &str = "lockmanager.dev/scope";
pub const PRIORITY_ANNOTATION: &str = "lockmanager.dev/priority";
/// With a Semaphore on the key: permits the Job takes (default 1).
pub const PERMITS_ANNOTATION: &str = "lockmanager.dev/permits";
/// With a Semaphore on the key: "true" takes every permit.
pub const EXCLUSIVE_ANNOTATION: &str = "lockmanager.dev/exclusive";
pub const FENCING_ANNOTATION: &str = "lockmanager.dev/fencing-token";
/// Kueue's label: a Job carrying it is admitted (un-suspended) by Kueue.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// `spec.managedBy` of Jobs the built-in Job controller manages.
pub const JOB_CONTROLLER: &str = "kubernetes.io/job-controller";

/// What a gated Job needs next (a pure decision).
#[derive(Debug, PartialEq)]
pub enum GateStep {
    /// Not annotated, or nothing to do.
    Nothing,
    /// Annotated but not created suspended: tell the user why it is not gated.
    WarnNotSuspended,
    /// Annotated, but another controller owns its `spec.suspend`: say so, touch nothing.
    WarnManagedElsewhere(String),
    /// Create the request.
    CreateRequest,
    /// The request is granted: annotate the fencing token and un-suspend.
    Start { fencing_token: i64 },
}

fn is_suspended(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false)
}

/// Who else manages this Job's `spec.suspend`, if anyone.
pub fn managed_elsewhere(job: &Job) -> Option<String> {
    if let Some(queue) = job.labels().get(KUEUE_QUEUE_LABEL) {
        return Some(format!("Kueue manages it (label {KUEUE_QUEUE_LABEL}={queue})"));
    }
    match job.spec.as_ref().and_then(|s| s.managed_by.as_deref()) {
        Some(manager) if manager != JOB_CONTROLLER => Some(format!("spec.managedBy is {manager:?}")),
        _ => None,
    }
}

/// Decides the next step for a Job from the Job and its request (if any), at `now`.
pub fn next_step(job: &Job, request: Option<&DistributedLock>, now: chrono::DateTime<chrono::Utc>) -> GateStep {
    if !job.annotations().contains_key(LOCK_ANNOTATION) || job_finished(job).is_some() {
        return GateStep::Nothing;
    }
    if let Some(manager) = managed_elsewhere(job) {
        return GateStep::WarnManagedElsewhere(manager);
    }
    match request {
        None if is_suspended(job) => GateStep::CreateRequest,
        None if job.annotations().contains_key(FENCING_ANNOTATION) => GateStep::Nothing,
        None => GateStep::WarnNotSuspended,
        Some(lock) => {
            let status = lock.status.clone().unwrap_or_default();
            // a live lease only: a Granted status that landed late (a write
            // the operator gave up on while the API server hung) may speak
            // of a lease that already ran out; a live one is renewed every
            // quarter of its TTL, and its recorded expiresAt (a lower bound)
            // moved while still ahead (granted::worth_recording)
            let live = status
                .expires_at
                .as_deref()
                .and_then(crate::queue::parse_time)
                .is_some_and(|expires| expires > now);
            match (status.phase, status.fencing_token) {
                // started once for this grant (its token is on the Job): a user
                // who suspends it again is not overruled
                (Some(Phase::Granted), Some(fencing_token))
                    if live
                        && is_suspended(job)
                        && job.annotations().get(FENCING_ANNOTATION) != Some(&fencing_token.to_string()) =>
                {
                    GateStep::Start { fencing_token }
                }
                _ => GateStep::Nothing,
            }
        }
    }
}

/// The request for a gated Job, from its annotations. Errors name the annotation.
pub fn request_for(job: &Job, name: &str) -> Result<DistributedLock, String> {
    let annotations = job.annotations();
    let lock_id = annotations.get(LOCK_ANNOTATION).cloned().unwrap_or_default();
    let scope = match annotations.get(SCOPE_ANNOTATION).map(String::as_str) {
        None | Some("Namespace") => LockScope::Namespace,
        Some("Cluster") => LockScope::Cluster,
        Some(other) => {
            return Err(format!(
                "annotation {SCOPE_ANNOTATION}: {other:?} is not Namespace or Cluster"
            ));
        }
    };
    let priority = match annotations.get(PRIORITY_ANNOTATION) {
        None => 0,
        Some(p) => p
            .parse()
            .map_err(|_| format!("annotation {PRIORITY_ANNOTATION}: {p:?} is not a 32-bit integer"))?,
    };
    let permits = match annotations.get(PERMITS_ANNOTATION) {
        None => None,
        Some(p) => Some(
            p.parse::<u32>()
                .ok()
                .filter(|p| (1..=crate::crd::MAX_PERMITS).contains(p))
                .ok_or_else(|| {
                    format!("annotation {PERMITS_ANNOTATION}: {p:?} is not a number of permits (1..10000)")
                })?,
        ),
    };
    let exclusive = match annotations.get(EXCLUSIVE_ANNOTATION).map(String::as_str) {
        None | Some("false") => None,
        Some("true") if permits.is_some() => {
            return Err(format!(
                "annotations {PERMITS_ANNOTATION} and {EXCLUSIVE_ANNOTATION}: \"true\" cannot be combined"
            ));
        }
        Some("true") => Some(true),
        Some(other) => {
            return Err(format!(
                "annotation {EXCLUSIVE_ANNOTATION}: {other:?} is not true or false"
            ));
        }
    };
    let mut request = DistributedLock::new(
        name,
        DistributedLockSpec {
            lock_id,
            scope,
            ttl: annotations.get(TTL_ANNOTATION).cloned(),
            metadata: Some(FreeForm::from_value(&json!({"job": job.name_any()}))),
            holder: None,
            priority,
            acquire_timeout: None,
            permits,
            exclusive,
            holder_ref: Some(HolderRef {
                kind: HolderKind::Job,
                name: job.name_any(),
            }),
        },
    );
    request.metadata.namespace = job.namespace();
    // Labels travel along, so label-selected operators see the request too.
    request.metadata.labels = Some(job.labels().clone()).filter(|l: &BTreeMap<_, _>| !l.is_empty());
    // The controller queues it by the Job's creation (see Context::arrival).
    request.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "batch/v1".into(),
        kind: "Job".into(),
        name: job.name_any(),
        uid: job.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    Ok(request)
}

fn owned_by(request: &DistributedLock, job: &Job) -> bool {
    request
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == job.uid().as_ref())
}

/// How long a gated Job without its request yet holds up later requests of
/// its key (its request is on its way; one that never comes — the gate
/// refused it — must not block the key for ever).
const REQUEST_ON_ITS_WAY: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// A suspended, annotated Job for `key` that arrived before `arrival` but
/// whose request the gate has not created yet (or the cache not shown yet):
/// the request that would otherwise be the head waits for it, so Jobs
/// created within one moment still queue in creation order.
pub fn job_queued_ahead(ctx: &Context, key: &str, arrival: &crate::queue::Arrival) -> Option<String> {
    let now = chrono::Utc::now();
    ctx.jobs.state().into_iter().find_map(|job| {
        if next_step(&job, None, chrono::Utc::now()) != GateStep::CreateRequest {
            return None;
        }
        let theirs = ctx.job_arrival(&job);
        if now - theirs.at? > REQUEST_ON_ITS_WAY {
            return None;
        }
        let namespace = job.namespace().unwrap_or_default();
        let has_request = request_names(&job).iter().any(|name| {
            ctx.store
                .get(&ObjectRef::new(name).within(&namespace))
                .is_some_and(|r| owned_by(&r, &job))
        });
        if has_request {
            return None;
        }
        let request = request_for(&job, &job.name_any()).ok()?;
        if crate::queue::lock_key(&request) != key {
            return None;
        }
        (theirs < *arrival).then(|| format!("{namespace}/{}", job.name_any()))
    })
}

/// This Job's request, under either of its names.
async fn find_request(api: &Api<DistributedLock>, job: &Job) -> Result<Option<DistributedLock>, Error> {
    for name in request_names(job) {
        if let Some(request) = api.get_opt(&name).await.map_err(Error::Kube)?
            && owned_by(&request, job)
        {
            return Ok(Some(request));
        }
    }
    Ok(None)
}

/// Reconciles one Job carrying the lock annotation.
pub async fn reconcile_job(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !job.annotations().contains_key(LOCK_ANNOTATION) {
        return Ok(Action::await_change());
    }
    let namespace = job.namespace().unwrap_or_default();
    let requests: Api<DistributedLock> = Api::namespaced(ctx.client.clone(), &namespace);
    let request = find_request(&requests, &job).await?;
    match next_step(&job, request.as_ref(), chrono::Utc::now()) {
        GateStep::Nothing => {}
        GateStep::WarnNotSuspended => {
            let note = format!(
                "annotation {LOCK_ANNOTATION} is set but the Job was not created with spec.suspend: true, so it runs without the lock"
            );
            events::warning(&ctx.recorder, &job.object_ref(&()), "NotGated", note).await;
        }
        GateStep::WarnManagedElsewhere(manager) => {
            let note = format!(
                "not gating this Job: {manager}, so its spec.suspend is not ours to change; use the init-container form (lockctl wait) instead"
            );
            events::warning(&ctx.recorder, &job.object_ref(&()), "NotGated", note).await;
            return Ok(Action::await_change());
        }
        GateStep::CreateRequest => create_request(&ctx, &requests, &job).await?,
        GateStep::Start { fencing_token } => start(&ctx, &job, fencing_token).await?,
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Creates the Job's request under its first free name; a name taken by a
/// request that is not this Job's gets a Warning naming the clash.
async fn create_request(ctx: &Context, requests: &Api<DistributedLock>, job: &Job) -> Result<(), Error> {
    let [own, unique] = request_names(job);
    for name in [&own, &unique] {
        let new = match request_for(job, name) {
            Ok(new) => new,
            Err(message) => {
                events::warning(&ctx.recorder, &job.object_ref(&()), "InvalidLockRequest", message).await;
                return Ok(());
            }
        };
        match requests.create(&PostParams::default(), &new).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 && name == &own => {
                let note = format!(
                    "a DistributedLock named {own:?} already exists and is not this Job's; requesting the lock as {unique:?} instead"
                );
                events::warning(&ctx.recorder, &job.object_ref(&()), "NameClash", note).await;
            }
            // created by an earlier attempt (find_request will see it next time)
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                events::warning(
                    &ctx.recorder,
                    &job.object_ref(&()),
                    "InvalidLockRequest",
                    s.message.clone(),
                )
                .await;
                return Ok(());
            }
            Err(e) => return Err(Error::Kube(e)),
        }
    }
    Ok(())
}

/// One compare-and-swap write: the fencing token is on the Job (and on its
/// Pod template, for the downward API) before it runs, and it is un-suspended.
async fn start(ctx: &Context, job: &Job, fencing_token: i64) -> Result<(), Error> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let token = fencing_token.to_string();
    let patch = |template: bool| {
        let mut patch = json!({
            "metadata": {
                "annotations": {FENCING_ANNOTATION: token},
                "resourceVersion": job.resource_version(),
            },
            "spec": {"suspend": false}
        });
        if template {
            patch["spec"]["template"] = json!({"metadata": {"annotations": {FENCING_ANNOTATION: token}}});
        }
        patch
    };
    let params = PatchParams::default();
    match jobs.patch(&job.name_any(), &params, &Patch::Merge(&patch(true))).await {
        Ok(_) => {}
        // The template of a Job that has run before cannot change; then only the Job gets it.
        Err(kube::Error::Api(s)) if s.code == 422 => {
            jobs.patch(&job.name_any(), &params, &Patch::Merge(&patch(false)))
                .await
                .map_err(Error::Kube)?;
        }
        Err(e) => return Err(Error::Kube(e)),
    }
    let note = format!("lock granted (fencing token {fencing_token}); Job un-suspended");
    events::normal(&ctx.recorder, &job.object_ref(&()), "Started", note).await;
    Ok(())
}

pub fn job_error_policy(job: Arc<Job>, error: &Error, ctx: Arc<Context>) -> Action {
    crate::controller::retry_after(&*job, error, &ctx)
}

#[cfg(test)]
mod tests {
    fn at(time: &str) -> chrono::DateTime<chrono::Utc> {
        crate::queue::parse_time(time).unwrap()
    }

    use super::*;
    use crate::crd::DistributedLockStatus;
    use crate::fixtures;

    fn job(annotations: &[(&str, &str)], suspend: bool) -> Job {
        fixtures::job("backup", annotations, &[], suspend)
    }

    #[test]
    fn only_suspended_annotated_jobs_are_gated() {
        assert_eq!(
            next_step(&job(&[], true), None, at("2026-11-28T12:00:00Z")),
            GateStep::Nothing
        );
        assert_eq!(
            next_step(&job(&[(LOCK_ANNOTATION, "b")], true), None, at("2026-11-28T12:00:00Z")),
            GateStep::CreateRequest
        );
        assert_eq!(
            next_step(&job(&[(LOCK_ANNOTATION, "b")], false), None, at("2026-11-28T12:00:00Z")),
            GateStep::WarnNotSuspended
        );
    }

    #[test]
    fn jobs_another_controller_manages_are_never_gated() {
        let kueue = fixtures::job("q", &[(LOCK_ANNOTATION, "b")], &[(KUEUE_QUEUE_LABEL, "main")], true);
        assert!(
            matches!(next_step(&kueue, None, at("2026-11-28T12:00:00Z")), GateStep::WarnManagedElsewhere(m) if m.contains("Kueue"))
        );
        let mut managed = job(&[(LOCK_ANNOTATION, "b")], true);
        managed.spec.as_mut().unwrap().managed_by = Some("example.com/mine".into());
        assert!(
            matches!(next_step(&managed, None, at("2026-11-28T12:00:00Z")), GateStep::WarnManagedElsewhere(m) if m.contains("managedBy"))
        );
        managed.spec.as_mut().unwrap().managed_by = Some(JOB_CONTROLLER.into());
        assert_eq!(
            next_step(&managed, None, at("2026-11-28T12:00:00Z")),
            GateStep::CreateRequest
        );
    }

    #[test]
    fn a_granted_request_starts_the_job_once() {
        let j = job(&[(LOCK_ANNOTATION, "b")], true);
        let mut request = request_for(&j, "backup").unwrap();
        assert_eq!(
            next_step(&j, Some(&request), at("2026-11-28T12:00:00Z")),
            GateStep::Nothing,
            "pending: stay suspended"
        );
        request.status = Some(DistributedLockStatus {
            phase: Some(Phase::Granted),
            fencing_token: Some(7),
            expires_at: Some("2026-11-28T12:00:30Z".into()),
            ..Default::default()
        });
        assert_eq!(
            next_step(&j, Some(&request), at("2026-11-28T12:00:31Z")),
            GateStep::Nothing,
            "a Granted status whose lease already ran out (landed late) starts nothing"
        );
        assert_eq!(
            next_step(&j, Some(&request), at("2026-11-28T12:00:30Z")),
            GateStep::Nothing
        );
        request.status.as_mut().unwrap().expires_at = None;
        assert_eq!(
            next_step(&j, Some(&request), at("2026-11-28T12:00:00Z")),
            GateStep::Nothing
        );
        request.status.as_mut().unwrap().expires_at = Some("2026-11-28T12:00:30Z".into());
        assert_eq!(
            next_step(&j, Some(&request), at("2026-11-28T12:00:00Z")),
            GateStep::Start { fencing_token: 7 }
        );
        let started = job(&[(LOCK_ANNOTATION, "b"), (FENCING_ANNOTATION, "7")], false);
        assert_eq!(
            next_step(&started, Some(&request), at("2026-11-28T12:00:00Z")),
            GateStep::Nothing
        );
        let suspended_again = job(&[(LOCK_ANNOTATION, "b"), (FENCING_ANNOTATION, "7")], true);
        assert_eq!(
            next_step(&suspended_again, Some(&request), at("2026-11-28T12:00:00Z")),
            GateStep::Nothing,
            "a user's re-suspend is respected"
        );
    }

    #[test]
    fn annotations_shape_the_request_but_not_its_place_in_line() {
        let j = job(
            &[
                (LOCK_ANNOTATION, "backup"),
                (TTL_ANNOTATION, "1m"),
                (SCOPE_ANNOTATION, "Cluster"),
                (PRIORITY_ANNOTATION, "5"),
            ],
            true,
        );
        let request = request_for(&j, "backup").unwrap();
        assert_eq!(request.spec.lock_id, "backup");
        assert_eq!(request.spec.scope, LockScope::Cluster);
        assert_eq!(request.spec.priority, 5);
        assert_eq!(request.spec.ttl.as_deref(), Some("1m"));
        assert_eq!(request.owner_references()[0].uid, "backup-uid");
        assert!(request.annotations().is_empty());
        let bad = job(&[(LOCK_ANNOTATION, "b"), (PRIORITY_ANNOTATION, "3000000000")], true);
        assert!(request_for(&bad, "b").unwrap_err().contains(PRIORITY_ANNOTATION));
    }

    #[test]
    fn a_clashing_name_falls_back_to_a_unique_one() {
        let long = "x".repeat(253);
        let j = fixtures::job(&long, &[], &[], true);
        let [own, unique] = request_names(&j);
        assert_eq!(own, long);
        assert!(
            unique.len() <= 253 && unique.ends_with("-xxxxxxxx") || unique.contains('-'),
            "{unique}"
        );
        assert_ne!(own, unique);
    }
}
