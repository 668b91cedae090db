//! The workload a request's holderRef names (a Job or a Pod), and whether it
//! still needs the lock. Shared by the lock controller and the Job gate.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::{Resource, ResourceExt};

use super::error::{Error, Result};
use crate::crd::{DistributedLock, HolderKind};

/// Whether the workload named by holderRef still needs the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderState {
    /// No holderRef: the request itself is the holder.
    Unbound,
    /// The Job or Pod exists and runs (or has not started yet).
    Running,
    /// It is done; the message says how.
    Finished(&'static str),
    /// It does not exist (never did yet, or was deleted).
    Missing,
}

/// A finished Job: its Complete or Failed condition is True.
pub fn job_finished(job: &Job) -> Option<&'static str> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let done = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
    if done("Complete") {
        Some("Job completed")
    } else if done("Failed") {
        Some("Job failed")
    } else {
        None
    }
}

/// A finished Pod: Succeeded or Failed. A Pod being deleted still runs its
/// containers for its grace period: it holds the lock until it is gone.
pub fn pod_finished(pod: &Pod) -> Option<&'static str> {
    match pod.status.as_ref()?.phase.as_deref() {
        Some("Succeeded") => Some("Pod succeeded"),
        Some("Failed") => Some("Pod failed"),
        _ => None,
    }
}

/// Reads the holder from the API server (not a cache: a stale "missing"
/// right after the holder was created must not release a lock).
pub async fn fetch(client: &kube::Client, lock: &DistributedLock) -> Result<HolderState> {
    let Some(holder) = &lock.spec.holder_ref else {
        return Ok(HolderState::Unbound);
    };
    let namespace = lock.namespace().unwrap_or_default();
    let state = match holder.kind {
        HolderKind::Job => match Api::<Job>::namespaced(client.clone(), &namespace)
            .get_opt(&holder.name)
            .await
            .map_err(Error::Kube)?
        {
            Some(job) => Some(job_finished(&job)),
            // deleted in the background: its Pods may still run
            None if job_pods_running(client, &namespace, &holder.name).await? => Some(None),
            None => None,
        },
        HolderKind::Pod => Api::<Pod>::namespaced(client.clone(), &namespace)
            .get_opt(&holder.name)
            .await
            .map_err(Error::Kube)?
            .map(|pod| pod_finished(&pod)),
    };
    Ok(match state {
        None => HolderState::Missing,
        Some(None) => HolderState::Running,
        Some(Some(why)) => HolderState::Finished(why),
    })
}

/// Why a holder was not read in time.
#[derive(Debug)]
pub enum Unread {
    /// The API server did not answer within this long.
    NoAnswer(std::time::Duration),
    /// It answered with an error (or the connection failed).
    Failed(Error),
}

impl std::fmt::Display for Unread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unread::NoAnswer(budget) => write!(f, "no answer from the API server within {budget:?}"),
            Unread::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// `read` (of a holder, for a request holding a lease), given at most
/// `budget`: the caller then keeps the lease renewed rather than let it lapse
/// under a workload that may still be using it.
pub async fn within<T>(
    budget: std::time::Duration,
    read: impl std::future::Future<Output = Result<T>>,
) -> std::result::Result<T, Unread> {
    match tokio::time::timeout(budget, read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Unread::Failed(e)),
        Err(_) => Err(Unread::NoAnswer(budget)),
    }
}

/// True when the Job a gated request was made for is gone or being deleted.
pub async fn gating_job_going(client: &kube::Client, lock: &DistributedLock) -> Result<bool> {
    let Some(holder) = lock.spec.holder_ref.as_ref().filter(|h| h.kind == HolderKind::Job) else {
        return Ok(false);
    };
    let job = Api::<Job>::namespaced(client.clone(), &lock.namespace().unwrap_or_default())
        .get_opt(&holder.name)
        .await
        .map_err(Error::Kube)?;
    Ok(job.is_none_or(|job| job.metadata.deletion_timestamp.is_some()))
}

/// True while a Pod of the Job named `job` (the Job controller labels them
/// `batch.kubernetes.io/job-name`) has not finished.
async fn job_pods_running(client: &kube::Client, namespace: &str, job: &str) -> Result<bool> {
    if job.len() > 63 {
        return Ok(false); // not a valid label value: its Pods cannot carry it
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("batch.kubernetes.io/job-name={job}");
    let list = pods
        .list(&kube::api::ListParams::default().labels(&selector))
        .await
        .map_err(Error::Kube)?;
    Ok(list.items.iter().any(|pod| pod_finished(pod).is_none()))
}

/// The names a Job's request may have: the Job's own, or — when a request of
/// that name that is not this Job's already exists — one made unique with
/// the Job's UID (deterministic, so a retry finds what it created).
pub fn request_names(job: &Job) -> [String; 2] {
    let name = job.name_any();
    let uid = job.uid().unwrap_or_default();
    let suffix: String = uid.chars().filter(|c| c.is_ascii_alphanumeric()).take(8).collect();
    let stem: String = name.chars().take(253 - 1 - suffix.len()).collect();
    [name, format!("{}-{suffix}", stem.trim_end_matches(['-', '.']))]
}

/// True when the request was made by the Job its holderRef names (suspend
/// gating): that Job is its controlling owner.
pub fn owned_by_holder(lock: &DistributedLock) -> bool {
    let Some(holder) = &lock.spec.holder_ref else {
        return false;
    };
    let kind = match holder.kind {
        HolderKind::Job => Job::kind(&()),
        HolderKind::Pod => Pod::kind(&()),
    };
    lock.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && o.kind == kind && o.name == holder.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::job;
    use serde_json::json;

    #[test]
    fn a_job_is_finished_by_its_complete_or_failed_condition() {
        let mut j = job("j", &[], &[], false);
        assert_eq!(job_finished(&j), None);
        j.status = serde_json::from_value(json!({"conditions": [{"type": "Complete", "status": "False"}]})).unwrap();
        assert_eq!(job_finished(&j), None);
        j.status = serde_json::from_value(json!({"conditions": [{"type": "Failed", "status": "True"}]})).unwrap();
        assert_eq!(job_finished(&j), Some("Job failed"));
    }
}
