//! Suspend gating: a Job created with `spec.suspend: true` and the annotation
//! `lockmanager.dev/lock: LOCK_ID` gets a DistributedLock owned by it; the Job
//! is un-suspended (with its fencing token annotated) once the lock is granted.
//! The lock is released when the Job finishes, through the request's holderRef.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::controller::{Context, Error};
use crate::crd::{DistributedLock, DistributedLockSpec, FIELD_MANAGER, HolderKind, HolderRef, LockScope, Phase};
use crate::queue::{QUEUE_SEQUENCE_ANNOTATION, REQUESTED_AT_ANNOTATION};

pub const LOCK_ANNOTATION: &str = "lockmanager.dev/lock";
pub const TTL_ANNOTATION: &str = "lockmanager.dev/ttl";
pub const SCOPE_ANNOTATION: &str = "lockmanager.dev/scope";
pub const PRIORITY_ANNOTATION: &str = "lockmanager.dev/priority";
pub const FENCING_ANNOTATION: &str = "lockmanager.dev/fencing-token";

/// What a gated Job needs next (a pure decision).
#[derive(Debug, PartialEq)]
pub enum GateStep {
    /// Not annotated, or nothing to do.
    Nothing,
    /// Annotated but not created suspended: tell the user why it is not gated.
    WarnNotSuspended,
    /// Create the request.
    CreateRequest,
    /// The request is granted: annotate the fencing token and un-suspend.
    Start { fencing_token: i64 },
}

fn is_finished(job: &Job) -> bool {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
}

fn is_suspended(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false)
}

/// Decides the next step for a Job from the Job and its request (if any).
pub fn next_step(job: &Job, request: Option<&DistributedLock>) -> GateStep {
    if !job.annotations().contains_key(LOCK_ANNOTATION) || is_finished(job) {
        return GateStep::Nothing;
    }
    match request {
        None if is_suspended(job) => GateStep::CreateRequest,
        None if job.annotations().contains_key(FENCING_ANNOTATION) => GateStep::Nothing,
        None => GateStep::WarnNotSuspended,
        Some(lock) => {
            let status = lock.status.clone().unwrap_or_default();
            match (status.phase, status.fencing_token) {
                (Some(Phase::Granted), Some(fencing_token)) if is_suspended(job) => GateStep::Start { fencing_token },
                _ => GateStep::Nothing,
            }
        }
    }
}

/// The request for a gated Job, from its annotations. Errors name the annotation.
pub fn request_for(job: &Job) -> Result<DistributedLock, String> {
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
            .map_err(|_| format!("annotation {PRIORITY_ANNOTATION}: {p:?} is not an integer"))?,
    };
    let mut request = DistributedLock::new(
        &job.name_any(),
        DistributedLockSpec {
            lock_id,
            scope,
            ttl: annotations.get(TTL_ANNOTATION).cloned(),
            metadata: Some(json!({"job": job.name_any()})),
            holder: None,
            priority,
            acquire_timeout: None,
            holder_ref: Some(HolderRef {
                kind: HolderKind::Job,
                name: job.name_any(),
            }),
        },
    );
    request.metadata.namespace = job.namespace();
    // Queue in the order the Jobs were created, not the order we got to them.
    let mut queue_annotations = BTreeMap::new();
    if let Some(created) = &job.metadata.creation_timestamp {
        queue_annotations.insert(REQUESTED_AT_ANNOTATION.to_string(), created.0.to_string());
    }
    if let Some(rv) = job.resource_version() {
        queue_annotations.insert(QUEUE_SEQUENCE_ANNOTATION.to_string(), rv);
    }
    request.metadata.annotations = Some(queue_annotations).filter(|a| !a.is_empty());
    // Labels travel along, so label-selected operators see the request too.
    request.metadata.labels = Some(job.labels().clone()).filter(|l: &BTreeMap<_, _>| !l.is_empty());
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

/// Reconciles one Job carrying the lock annotation.
pub async fn reconcile_job(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = job.namespace().unwrap_or_default();
    let requests: Api<DistributedLock> = Api::namespaced(ctx.client.clone(), &namespace);
    let request = requests.get_opt(&job.name_any()).await.map_err(Error::Kube)?;
    // A request of another Job with the same name (an older one) is not ours.
    let request = request.filter(|r| r.owner_references().iter().any(|o| Some(&o.uid) == job.uid().as_ref()));
    match next_step(&job, request.as_ref()) {
        GateStep::Nothing => {}
        GateStep::WarnNotSuspended => {
            warn_job(
                &ctx,
                &job,
                "NotGated",
                format!(
                    "annotation {LOCK_ANNOTATION} is set but the Job was not created with spec.suspend: true, so it runs without the lock"
                ),
            )
            .await;
        }
        GateStep::CreateRequest => match request_for(&job) {
            Ok(new) => match requests.create(&PostParams::default(), &new).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    warn_job(&ctx, &job, "InvalidLockRequest", s.message.clone()).await;
                }
                Err(e) => return Err(Error::Kube(e)),
            },
            Err(message) => warn_job(&ctx, &job, "InvalidLockRequest", message).await,
        },
        GateStep::Start { fencing_token } => {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
            // One write: the fencing token is on the Job (and on its Pod
            // template, for the downward API) before it runs. The template of
            // a Job that has run before cannot change; then only the Job gets it.
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
            let params = PatchParams::apply(FIELD_MANAGER);
            match jobs.patch(&job.name_any(), &params, &Patch::Merge(&patch(true))).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    jobs.patch(&job.name_any(), &params, &Patch::Merge(&patch(false)))
                        .await
                        .map_err(Error::Kube)?;
                }
                Err(e) => return Err(Error::Kube(e)),
            }
            publish_job(
                &ctx,
                &job,
                EventType::Normal,
                "Started",
                format!("lock granted (fencing token {fencing_token}); Job un-suspended"),
            )
            .await;
        }
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

pub fn job_error_policy(_job: Arc<Job>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::CategoryLabels {
            category: error.category(),
        })
        .inc();
    tracing::warn!(error = %error, "gated Job reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

async fn warn_job(ctx: &Context, job: &Job, reason: &str, note: String) {
    publish_job(ctx, job, EventType::Warning, reason, note).await;
}

async fn publish_job(ctx: &Context, job: &Job, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Gate".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DistributedLockStatus;

    fn job(annotations: &[(&str, &str)], suspend: bool) -> Job {
        serde_json::from_value(json!({
            "metadata": {
                "name": "backup", "namespace": "ns", "uid": "job-uid",
                "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()
            },
            "spec": {"suspend": suspend, "template": {"spec": {"containers": []}}}
        }))
        .unwrap()
    }

    #[test]
    fn only_suspended_annotated_jobs_are_gated() {
        assert_eq!(next_step(&job(&[], true), None), GateStep::Nothing);
        assert_eq!(
            next_step(&job(&[(LOCK_ANNOTATION, "b")], true), None),
            GateStep::CreateRequest
        );
        assert_eq!(
            next_step(&job(&[(LOCK_ANNOTATION, "b")], false), None),
            GateStep::WarnNotSuspended
        );
    }

    #[test]
    fn a_granted_request_starts_the_job_once() {
        let j = job(&[(LOCK_ANNOTATION, "b")], true);
        let mut request = request_for(&j).unwrap();
        assert_eq!(
            next_step(&j, Some(&request)),
            GateStep::Nothing,
            "pending: stay suspended"
        );
        request.status = Some(DistributedLockStatus {
            phase: Some(Phase::Granted),
            fencing_token: Some(7),
            ..Default::default()
        });
        assert_eq!(next_step(&j, Some(&request)), GateStep::Start { fencing_token: 7 });
        let started = job(&[(LOCK_ANNOTATION, "b"), (FENCING_ANNOTATION, "7")], false);
        assert_eq!(next_step(&started, Some(&request)), GateStep::Nothing);
    }

    #[test]
    fn annotations_shape_the_request() {
        let j = job(
            &[
                (LOCK_ANNOTATION, "backup"),
                (TTL_ANNOTATION, "1m"),
                (SCOPE_ANNOTATION, "Cluster"),
                (PRIORITY_ANNOTATION, "5"),
            ],
            true,
        );
        let request = request_for(&j).unwrap();
        assert_eq!(request.spec.lock_id, "backup");
        assert_eq!(request.spec.scope, LockScope::Cluster);
        assert_eq!(request.spec.priority, 5);
        assert_eq!(request.spec.ttl.as_deref(), Some("1m"));
        assert_eq!(request.owner_references()[0].uid, "job-uid");
        let bad = job(&[(LOCK_ANNOTATION, "b"), (PRIORITY_ANNOTATION, "high")], true);
        assert!(request_for(&bad).unwrap_err().contains(PRIORITY_ANNOTATION));
    }
}
