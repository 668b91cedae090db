//! Pure decisions of the controller: who waits for a lock key in which order,
//! who holds it in this cluster, and which requests need a reconcile so that
//! the queue moves. No I/O here.

use std::cmp::Reverse;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use kube::ResourceExt;

use crate::crd::{DistributedLock, Phase};

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

/// A request's place in line: when it arrived (server-set creation time, or
/// the gated Job's) and, within that second, the resourceVersion it had when
/// first seen. Once the controller has recorded it in the status it never
/// changes; nothing a requester can edit (spec, annotations, labels) moves it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Arrival {
    pub at: Option<DateTime<Utc>>,
    pub sequence: u64,
}

impl Arrival {
    /// The arrival recorded in the status, if the controller wrote one.
    pub fn recorded(lock: &DistributedLock) -> Option<Arrival> {
        let status = lock.status.as_ref()?;
        let at = status.queued_at.as_deref().and_then(parse_time)?;
        let sequence = status.queue_sequence.and_then(|s| u64::try_from(s).ok())?;
        Some(Arrival { at: Some(at), sequence })
    }

    /// The arrival of a request whose status does not record one: as
    /// [`Arrival::observed`], except for a request that carries the
    /// controller's finalizer and was never seen without it. Such a request
    /// was taken on while alone on its key (see `controller::arrive`) by a
    /// controller that stopped before writing its status; its current
    /// resourceVersion is one of that controller's making, and its true
    /// place is first within its creation second.
    pub fn unrecorded(lock: &DistributedLock, first_seen: Option<u64>) -> Arrival {
        if first_seen.is_none() && lock.finalizers().iter().any(|f| f == crate::crd::FINALIZER) {
            return Arrival {
                at: creation_time(lock),
                sequence: 0,
            };
        }
        Arrival::observed(lock, first_seen)
    }

    /// The arrival of a request not recorded yet: its creation time and the
    /// resourceVersion the watcher first delivered (else its current one).
    pub fn observed(lock: &DistributedLock, first_seen: Option<u64>) -> Arrival {
        Arrival {
            at: creation_time(lock),
            sequence: first_seen
                .or_else(|| lock.resource_version().and_then(|rv| rv.parse().ok()))
                .unwrap_or(u64::MAX),
        }
    }
}

/// How the queue learns arrivals not recorded in a status yet.
pub trait Sightings {
    /// The resourceVersion a request had when the controller first saw it.
    fn first_seen(&self, lock: &DistributedLock) -> Option<u64>;

    /// The arrival of a request whose status does not record one yet: its
    /// creation and first sighting (the controller also knows the Jobs that
    /// suspend-gated requests were made for, whose arrival they take).
    fn unrecorded(&self, lock: &DistributedLock) -> Arrival {
        Arrival::unrecorded(lock, self.first_seen(lock))
    }
}

/// No record of first sightings: the current resourceVersion stands in.
#[cfg(test)]
pub struct Unseen;

#[cfg(test)]
impl Sightings for Unseen {
    fn first_seen(&self, _: &DistributedLock) -> Option<u64> {
        None
    }
}

/// The arrival that orders `lock`: recorded, else observed.
pub fn arrival(lock: &DistributedLock, seen: &dyn Sightings) -> Arrival {
    Arrival::recorded(lock).unwrap_or_else(|| seen.unrecorded(lock))
}

/// Order among waiters: higher priority first, then earlier arrival, then name.
pub type QueueOrder = (Reverse<i32>, Arrival, String);

pub fn queue_order(lock: &DistributedLock, seen: &dyn Sightings) -> QueueOrder {
    (Reverse(lock.spec.priority), arrival(lock, seen), lock.name_any())
}

/// The server-set creation time (the deadline of acquireTimeout counts from it).
pub fn creation_time(lock: &DistributedLock) -> Option<DateTime<Utc>> {
    lock.metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| DateTime::from_timestamp_millis(t.0.as_millisecond()))
}

pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

/// A waiter that cannot be granted as things are, so it must not hold up the
/// requests behind it: its holderRef names a Job or Pod that does not exist
/// (reason HolderNotFound), or it asks for more permits than its key's
/// Semaphore has (reason ExceedsLimit) — as the controller said in its
/// status. It keeps its place for when that changes (its arrival does not
/// change).
pub fn stands_aside(lock: &DistributedLock) -> bool {
    lock.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Granted" && (c.reason == HOLDER_NOT_FOUND || c.reason == EXCEEDS_LIMIT))
    })
}

/// The reason a waiter that asks for more permits than the limit shows.
pub const EXCEEDS_LIMIT: &str = "ExceedsLimit";

/// The reason a waiter whose holder does not exist shows.
pub const HOLDER_NOT_FOUND: &str = "HolderNotFound";

/// The waiters for `key` in grant order: Pending, not being deleted, and
/// able to be granted (see [`stands_aside`]).
pub fn waiters(all: &[Arc<DistributedLock>], key: &str, seen: &dyn Sightings) -> Vec<Arc<DistributedLock>> {
    let mut queue: Vec<_> = all
        .iter()
        .filter(|l| phase(l) == Phase::Pending && !is_deleting(l) && lock_key(l) == key)
        .filter(|l| !stands_aside(l))
        .cloned()
        .collect();
    queue.sort_by_cached_key(|l| queue_order(l, seen));
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

/// Who among the waiters of a key may be able to go when something changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MayGo {
    /// A mutex: the head, when nobody here holds the key.
    HeadWhenFree,
    /// A semaphore in StrictFIFO order: the head (permits may have freed up
    /// although others still hold some).
    Head,
    /// A semaphore in BestEffortFIFO order: anyone who fits.
    Anyone,
}

/// Requests of `key` that must be reconciled for the queue to move: those
/// that may be able to go (see [`MayGo`]), and every waiter whose recorded
/// position is stale — unless writing its place is `deferred` (it looks
/// again by itself; waking it would only wake the others again).
pub fn needing_attention(
    all: &[Arc<DistributedLock>],
    key: &str,
    seen: &dyn Sightings,
    released: &dyn Fn(&DistributedLock) -> bool,
    deferred: &dyn Fn(&DistributedLock) -> bool,
    may_go: MayGo,
) -> Vec<Arc<DistributedLock>> {
    let queue = waiters(all, key, seen);
    let head_may_go = match may_go {
        MayGo::HeadWhenFree => holder(all, key, released).is_none(),
        MayGo::Head | MayGo::Anyone => true,
    };
    queue
        .iter()
        .enumerate()
        .filter(|(i, l)| {
            let recorded = l.status.as_ref().and_then(|s| s.waiting_position);
            (*i == 0 && head_may_go) || may_go == MayGo::Anyone || (recorded != Some(*i as i32 + 1) && !deferred(l))
        })
        .map(|(_, l)| l.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::LockScope;
    use crate::fixtures::{request, with_phase};

    fn names(v: &[Arc<DistributedLock>]) -> Vec<String> {
        v.iter().map(|l| l.name_any()).collect()
    }

    #[test]
    fn a_request_taken_on_alone_and_not_yet_recorded_is_first_within_its_second() {
        // taken on alone: our finalizer, no recorded arrival, never seen without it
        let mut alone = request("alone", "ns", "a", 0, 150, 40);
        alone.metadata.finalizers = Some(vec![crate::crd::FINALIZER.into()]);
        let later = request("later", "ns", "a", 0, 150, 21);
        let all: Vec<_> = [later, alone.clone()].into_iter().map(Arc::new).collect();
        assert_eq!(names(&waiters(&all, "ns/a", &Unseen)), ["alone", "later"]);
        // a controller that saw it arrive keeps that sighting
        assert_eq!(Arrival::unrecorded(&alone, Some(20)).sequence, 20);
        // without our finalizer, the version seen stands in for the arrival
        alone.metadata.finalizers = None;
        assert_eq!(Arrival::unrecorded(&alone, None).sequence, 40);
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
            names(&waiters(&all, "ns/a", &Unseen)),
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
        assert_eq!(names(&waiters(&all, "ns/a", &Unseen)), ["waiting"]);
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
        assert_eq!(
            names(&needing_attention(
                &all,
                "ns/a",
                &Unseen,
                &|_| false,
                &|_| false,
                MayGo::HeadWhenFree
            )),
            ["second"]
        );
        let mut released = holder_lock;
        released.status.as_mut().unwrap().phase = Some(Phase::Released);
        let all: Vec<_> = [released, first, second].into_iter().map(Arc::new).collect();
        assert_eq!(
            names(&needing_attention(
                &all,
                "ns/a",
                &Unseen,
                &|_| false,
                &|_| false,
                MayGo::HeadWhenFree
            )),
            ["first", "second"]
        );
        assert_eq!(position(&waiters(&all, "ns/a", &Unseen), &all[2]), 2);
        // a waiter whose place is held back is not woken for it; the head still is
        let deferred = |l: &DistributedLock| l.name_any() != "nobody";
        assert_eq!(
            names(&needing_attention(
                &all,
                "ns/a",
                &Unseen,
                &|_| false,
                &deferred,
                MayGo::HeadWhenFree
            )),
            ["first"]
        );
    }

    #[test]
    fn a_semaphore_wakes_its_head_while_others_hold_permits_and_best_effort_wakes_everyone() {
        let holder_lock = with_phase(request("holder", "ns", "a", 0, 1, 1), Phase::Granted, None);
        let first = with_phase(request("first", "ns", "a", 0, 2, 2), Phase::Pending, Some(1));
        let second = with_phase(request("second", "ns", "a", 0, 3, 3), Phase::Pending, Some(2));
        let all: Vec<_> = [holder_lock, first, second].into_iter().map(Arc::new).collect();
        let attention = |may_go| {
            names(&needing_attention(
                &all,
                "ns/a",
                &Unseen,
                &|_| false,
                &|_| false,
                may_go,
            ))
        };
        assert!(attention(MayGo::HeadWhenFree).is_empty());
        assert_eq!(attention(MayGo::Head), ["first"]);
        assert_eq!(attention(MayGo::Anyone), ["first", "second"]);
    }

    #[test]
    fn a_waiter_whose_holder_does_not_exist_does_not_hold_up_the_queue() {
        let mut orphan = with_phase(request("orphan", "ns", "a", 0, 1, 1), Phase::Pending, Some(1));
        orphan
            .status
            .as_mut()
            .unwrap()
            .conditions
            .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "Granted".into(),
                status: "False".into(),
                reason: HOLDER_NOT_FOUND.into(),
                message: "waiting for its holder Job j to exist".into(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ),
                observed_generation: None,
            });
        let next = with_phase(request("next", "ns", "a", 0, 2, 2), Phase::Pending, Some(2));
        let all: Vec<_> = [orphan, next].into_iter().map(Arc::new).collect();
        assert_eq!(names(&waiters(&all, "ns/a", &Unseen)), ["next"]);
        assert_eq!(
            names(&needing_attention(
                &all,
                "ns/a",
                &Unseen,
                &|_| false,
                &|_| false,
                MayGo::HeadWhenFree
            )),
            ["next"]
        );
    }

    #[test]
    fn editing_a_request_never_moves_it_ahead() {
        // seen first at resourceVersion 10 and 11; an edit of the later one
        // (annotations, labels, spec) gives it a newer resourceVersion, never an older one
        let first = request("first", "ns", "a", 0, 5, 10);
        let mut second = request("second", "ns", "a", 0, 5, 11);
        second.metadata.annotations = Some(
            [(
                "lockmanager.dev/requested-at".to_string(),
                "2000-01-01T00:00:00Z".to_string(),
            )]
            .into(),
        );
        second.metadata.resource_version = Some("12".into());
        let all: Vec<_> = [second, first].into_iter().map(Arc::new).collect();
        assert_eq!(names(&waiters(&all, "ns/a", &Unseen)), ["first", "second"]);
    }

    #[test]
    fn cluster_scope_shares_the_key_across_namespaces() {
        let mut a = request("a", "ns1", "shared", 0, 1, 1);
        a.spec.scope = LockScope::Cluster;
        let mut b = request("b", "ns2", "shared", 0, 2, 2);
        b.spec.scope = LockScope::Cluster;
        let all: Vec<_> = [a, b].into_iter().map(Arc::new).collect();
        assert_eq!(names(&waiters(&all, "shared", &Unseen)), ["a", "b"]);
    }
}
