//! Test fixtures shared by the unit tests: requests, statuses and Jobs as the
//! API server would hand them to the controller.

use chrono::{DateTime, Utc};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::json;

use crate::crd::{DistributedLock, DistributedLockSpec, DistributedLockStatus, LockScope, Phase};

/// A spec for `lock_id` with every optional field unset.
pub fn spec(lock_id: &str, scope: LockScope) -> DistributedLockSpec {
    DistributedLockSpec {
        lock_id: lock_id.into(),
        scope,
        ..Default::default()
    }
}

/// A request as stored: namespace, uid `uid-NAME`, resourceVersion and creation time set.
pub fn request(name: &str, ns: &str, lock_id: &str, priority: i32, created_s: i64, rv: u64) -> DistributedLock {
    let mut lock = DistributedLock::new(
        name,
        DistributedLockSpec {
            priority,
            ..spec(lock_id, LockScope::Namespace)
        },
    );
    lock.metadata.namespace = Some(ns.into());
    lock.metadata.uid = Some(format!("uid-{name}"));
    lock.metadata.resource_version = Some(rv.to_string());
    lock.metadata.generation = Some(1);
    lock.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(created_s).expect("a valid timestamp"),
    ));
    lock
}

/// The same request with a status in `phase` (and a recorded waiting position).
pub fn with_phase(mut lock: DistributedLock, phase: Phase, position: Option<i32>) -> DistributedLock {
    let status = lock.status.get_or_insert_with(DistributedLockStatus::default);
    status.phase = Some(phase);
    status.waiting_position = position;
    lock
}

/// The same request Granted at `renewed_at` with a lease until `expires_at`.
pub fn granted(mut lock: DistributedLock, renewed_at: DateTime<Utc>, expires_at: DateTime<Utc>) -> DistributedLock {
    lock.status = Some(DistributedLockStatus {
        phase: Some(Phase::Granted),
        token: lock.metadata.uid.clone(),
        fencing_token: Some(7),
        acquired_at: Some(crate::controller::status::rfc3339(renewed_at)),
        renewed_at: Some(crate::controller::status::rfc3339(renewed_at)),
        expires_at: Some(crate::controller::status::rfc3339(expires_at)),
        ..Default::default()
    });
    lock
}

/// A Job named `name` in `ns` with these annotations and labels.
pub fn job(name: &str, annotations: &[(&str, &str)], labels: &[(&str, &str)], suspend: bool) -> Job {
    let map = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": "ns", "uid": format!("{name}-uid"), "resourceVersion": "5",
            "creationTimestamp": "2026-11-26T13:00:00Z",
            "annotations": map(annotations), "labels": map(labels)
        },
        "spec": {"suspend": suspend, "template": {"spec": {"containers": []}}}
    }))
    .expect("a valid Job")
}

/// A point in time `s` seconds after a fixed origin.
pub fn at(s: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000 + s, 0).expect("a valid time")
}
