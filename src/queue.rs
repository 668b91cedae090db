//! Pure decisions of the controller: who waits for a lock key in which order,
//! who holds it in this cluster, and which requests need a reconcile so that
//! the queue moves. No I/O here.

use std::cmp::Reverse;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use kube::ResourceExt;

use crate::crd::{DistributedLock, Phase};

/// The place in line: the resourceVersion a request had when first seen
/// (recorded by the controller with its finalizer). Requests made for
/// suspend-gated Jobs carry the Job's instead, and the Job's creation time,
/// so they queue in the order the Jobs were created.
pub const REQUESTED_AT_ANNOTATION: &str = "lockmanager.dev/requested-at";
pub const QUEUE_SEQUENCE_ANNOTATION: &str = "lockmanager.dev/queue-sequence";

/// The request's phase (no status yet = Pending).
pub fn phase(lock: &DistributedLock) -> Phase {
    lock.status.as_ref().and_then(|s| s.phase).unwrap_or_default()
}

/// The lock key of a request.
pub fn lock_key(lock: &DistributedLock) -> String {
    lock.spec.lock_key(lock.namespace().as_deref().unwrap_or_default())
}

fn is_deleting(lock: &DistributedLock) -> bool {
    lock.metadata.deletion_timestamp.is_some()
}

/// Order among waiters: higher priority first, then older first. Creation
/// timestamps have one-second resolution, so within a second the order in
/// which the API server stored the requests ([`arrival`]) decides.
pub fn queue_order(lock: &DistributedLock, first_seen: &dyn Fn(&DistributedLock) -> Option<u64>) -> QueueOrder {
    (
        Reverse(lock.spec.priority),
        creation_time(lock),
        arrival(lock, first_seen),
        lock.name_any(),
    )
}

/// Sort key of a waiter: priority (high first), creation time, arrival, name.
pub type QueueOrder = (Reverse<i32>, Option<DateTime<Utc>>, u64, String);

/// The resourceVersion the request had when the controller first saw it:
/// the `lockmanager.dev/queue-sequence` annotation once recorded (with the
/// finalizer), else what the watcher first delivered, else its current one.
pub fn arrival(lock: &DistributedLock, first_seen: &dyn Fn(&DistributedLock) -> Option<u64>) -> u64 {
    lock.annotations()
        .get(QUEUE_SEQUENCE_ANNOTATION)
        .and_then(|s| s.parse().ok())
        .or_else(|| first_seen(lock))
        .or_else(|| lock.resource_version().and_then(|rv| rv.parse().ok()))
        .unwrap_or(u64::MAX)
}

/// No record of first sightings: the current resourceVersion stands in.
pub fn unseen(_: &DistributedLock) -> Option<u64> {
    None
}

pub fn creation_time(lock: &DistributedLock) -> Option<DateTime<Utc>> {
    if let Some(at) = lock.annotations().get(REQUESTED_AT_ANNOTATION) {
        return DateTime::parse_from_rfc3339(at).ok().map(|t| t.with_timezone(&Utc));
    }
    lock.metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| DateTime::from_timestamp_millis(t.0.as_millisecond()))
}

/// The waiters for `key` in grant order: Pending, not being deleted.
pub fn waiters(
    all: &[Arc<DistributedLock>],
    key: &str,
    first_seen: &dyn Fn(&DistributedLock) -> Option<u64>,
) -> Vec<Arc<DistributedLock>> {
    let mut queue: Vec<_> = all
        .iter()
        .filter(|l| phase(l) == Phase::Pending && !is_deleting(l) && lock_key(l) == key)
        .cloned()
        .collect();
    queue.sort_by_cached_key(|l| queue_order(l, first_seen));
    queue
}

/// The request of this cluster that holds `key`, if any. A holder being
/// deleted is releasing its lock and no longer counts, nor does one whose
/// lock was just `released` (its status may not say so yet).
pub fn holder(
    all: &[Arc<DistributedLock>],
    key: &str,
    released: &dyn Fn(&DistributedLock) -> bool,
) -> Option<Arc<DistributedLock>> {
    all.iter()
        .find(|l| phase(l) == Phase::Granted && !is_deleting(l) && lock_key(l) == key && !released(l))
        .cloned()
}

/// The 1-based place of `lock` among `queue` (after everyone if it is missing).
pub fn position(queue: &[Arc<DistributedLock>], lock: &DistributedLock) -> usize {
    queue
        .iter()
        .position(|l| l.uid() == lock.uid())
        .map(|i| i + 1)
        .unwrap_or(queue.len() + 1)
}

/// Requests of `key` that must be reconciled for the queue to move: the head
/// when nobody here holds the lock, and every waiter whose recorded position
/// is stale.
pub fn needing_attention(
    all: &[Arc<DistributedLock>],
    key: &str,
    first_seen: &dyn Fn(&DistributedLock) -> Option<u64>,
    released: &dyn Fn(&DistributedLock) -> bool,
) -> Vec<Arc<DistributedLock>> {
    let queue = waiters(all, key, first_seen);
    let free = holder(all, key, released).is_none();
    queue
        .iter()
        .enumerate()
        .filter(|(i, l)| {
            let recorded = l.status.as_ref().and_then(|s| s.waiting_position);
            (*i == 0 && free) || recorded != Some(*i as i32 + 1)
        })
        .map(|(_, l)| l.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{DistributedLockSpec, DistributedLockStatus, LockScope};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn request(name: &str, ns: &str, lock_id: &str, priority: i32, created_s: i64, rv: u64) -> DistributedLock {
        let mut lock = DistributedLock::new(
            name,
            DistributedLockSpec {
                lock_id: lock_id.into(),
                scope: LockScope::Namespace,
                ttl: None,
                metadata: None,
                holder: None,
                priority,
                acquire_timeout: None,
                holder_ref: None,
            },
        );
        lock.metadata.namespace = Some(ns.into());
        lock.metadata.uid = Some(format!("uid-{name}"));
        lock.metadata.resource_version = Some(rv.to_string());
        lock.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::from_second(created_s).unwrap()));
        lock
    }

    fn with_phase(mut lock: DistributedLock, phase: Phase, position: Option<i32>) -> DistributedLock {
        lock.status = Some(DistributedLockStatus {
            phase: Some(phase),
            waiting_position: position,
            ..Default::default()
        });
        lock
    }

    fn names(v: &[Arc<DistributedLock>]) -> Vec<String> {
        v.iter().map(|l| l.name_any()).collect()
    }

    #[test]
    fn priority_first_then_age_then_arrival() {
        let all: Vec<_> = [
            request("old-low", "ns", "a", 0, 100, 10),
            request("new-high", "ns", "a", 5, 200, 30),
            request("same-second-later", "ns", "a", 0, 150, 21),
            request("same-second-earlier", "ns", "a", 0, 150, 20),
            request("other-lock", "ns", "b", 9, 1, 1),
            request("other-ns", "ns2", "a", 9, 1, 1),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        assert_eq!(
            names(&waiters(&all, "ns/a", &unseen)),
            ["new-high", "old-low", "same-second-earlier", "same-second-later"]
        );
    }

    #[test]
    fn final_and_deleting_requests_leave_the_queue() {
        let mut deleting = request("deleting", "ns", "a", 0, 1, 1);
        deleting.metadata.deletion_timestamp = deleting.metadata.creation_timestamp.clone();
        let all: Vec<_> = [
            deleting,
            with_phase(request("done", "ns", "a", 0, 2, 2), Phase::Released, None),
            with_phase(request("failed", "ns", "a", 0, 3, 3), Phase::Failed, None),
            request("waiting", "ns", "a", 0, 4, 4),
        ]
        .into_iter()
        .map(Arc::new)
        .collect();
        assert_eq!(names(&waiters(&all, "ns/a", &unseen)), ["waiting"]);
        assert!(holder(&all, "ns/a", &|_| false).is_none());
    }

    #[test]
    fn head_needs_attention_only_when_the_lock_is_free_here() {
        let holder_lock = with_phase(request("holder", "ns", "a", 0, 1, 1), Phase::Granted, None);
        let first = with_phase(request("first", "ns", "a", 0, 2, 2), Phase::Pending, Some(1));
        let second = with_phase(request("second", "ns", "a", 0, 3, 3), Phase::Pending, Some(1));
        let all: Vec<_> = [holder_lock.clone(), first.clone(), second.clone()]
            .into_iter()
            .map(Arc::new)
            .collect();
        // "second" records a stale position
        assert_eq!(names(&needing_attention(&all, "ns/a", &unseen, &|_| false)), ["second"]);
        let mut released = holder_lock;
        released.status.as_mut().unwrap().phase = Some(Phase::Released);
        let all: Vec<_> = [released, first, second].into_iter().map(Arc::new).collect();
        assert_eq!(
            names(&needing_attention(&all, "ns/a", &unseen, &|_| false)),
            ["first", "second"]
        );
        assert_eq!(position(&waiters(&all, "ns/a", &unseen), &all[2]), 2);
    }

    #[test]
    fn cluster_scope_shares_the_key_across_namespaces() {
        let mut a = request("a", "ns1", "shared", 0, 1, 1);
        a.spec.scope = LockScope::Cluster;
        let mut b = request("b", "ns2", "shared", 0, 2, 2);
        b.spec.scope = LockScope::Cluster;
        let all: Vec<_> = [a, b].into_iter().map(Arc::new).collect();
        assert_eq!(names(&waiters(&all, "shared", &unseen)), ["a", "b"]);
    }
}
