//! The status a request shows: pure builders (decide what the status says),
//! the condition and reason names, and the one status write.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::error::{Error, Result};
use crate::crd::{DistributedLock, DistributedLockStatus, FIELD_MANAGER, Phase};
use crate::lock::Lock;
use crate::queue::{self, Arrival};

/// Condition types.
pub const GRANTED: &str = "Granted";
pub const INDEX_REACHABLE: &str = "IndexReachable";

/// Reasons of the Granted condition (and of the events that go with them).
pub mod reason {
    pub const ACQUIRED: &str = "Acquired";
    pub const WAITING: &str = "Waiting";
    pub const HELD_ELSEWHERE: &str = "HeldElsewhere";
    pub const HOLDER_NOT_FOUND: &str = crate::queue::HOLDER_NOT_FOUND;
    pub const HOLDER_FINISHED: &str = "HolderFinished";
    pub const HOLDER_GONE: &str = "HolderGone";
    pub const NOT_SELECTED: &str = "NotSelected";
    pub const EXPIRED: &str = "Expired";
    pub const LOST: &str = "Lost";
    pub const TIMEOUT: &str = "Timeout";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const SCOPE_NOT_ALLOWED: &str = "ScopeNotAllowed";
    /// Asks for more permits than the key's Semaphore has (or it is closed).
    pub const EXCEEDS_LIMIT: &str = crate::queue::EXCEEDS_LIMIT;
    /// The key is used as the other kind in the index (a semaphore vs a plain mutex).
    pub const KIND_MISMATCH: &str = "KindMismatch";
    /// Reasons of the IndexReachable condition.
    pub const REACHABLE: &str = "Reachable";
    pub const INDEX_UNREACHABLE: &str = "IndexUnreachable";
    pub const FENCING_UNPROVEN: &str = "FencingUnproven";
    pub const INDEX_READ_ONLY: &str = "IndexReadOnly";
    /// The lock document of this key is in a shape the engine cannot read.
    pub const UNREADABLE_LOCK: &str = "UnreadableLock";
    /// (Event) The holder's Job or Pod could not be read; the lease is kept.
    pub const HOLDER_UNREADABLE: &str = "HolderUnreadable";
}

/// Whether the lock index answered the last time this controller asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexHealth {
    Reachable,
    /// Unreachable or refusing grants: (reason, message).
    Failing(&'static str, String),
}

/// The status of a waiting request.
pub fn pending(
    lock: &DistributedLock,
    arrival: &Arrival,
    position: usize,
    reason: &str,
    message: &str,
    index: &IndexHealth,
) -> DistributedLockStatus {
    let previous = lock.status.clone().unwrap_or_default();
    let mut next = DistributedLockStatus {
        phase: Some(Phase::Pending),
        lock_key: Some(queue::lock_key(lock)),
        waiting_position: Some(i32::try_from(position).unwrap_or(i32::MAX)),
        observed_generation: lock.metadata.generation,
        conditions: previous.conditions,
        ..Default::default()
    };
    record_arrival(&mut next, arrival);
    set_condition(&mut next, lock, GRANTED, false, reason, message);
    set_index_condition(&mut next, lock, index);
    next
}

/// True when `next` differs from `current` only in a waiter's place: its
/// `waitingPosition` and the words of its Granted condition (who holds the
/// key, how many are ahead). Both must be Pending with the same reasons; a
/// change of phase, reason, arrival or index health is never only that.
pub fn only_place_changed(current: &DistributedLockStatus, next: &DistributedLockStatus) -> bool {
    let without_place = |status: &DistributedLockStatus| {
        let mut status = status.clone();
        status.waiting_position = None;
        for c in status.conditions.iter_mut().filter(|c| c.type_ == GRANTED) {
            c.message.clear();
        }
        status
    };
    current.phase == Some(Phase::Pending)
        && next.phase == Some(Phase::Pending)
        && without_place(current) == without_place(next)
}

/// The status of a request the controller has just seen for the first time:
/// its place in line, recorded before anything else about it is written.
pub fn arrived(lock: &DistributedLock, arrival: &Arrival) -> DistributedLockStatus {
    let mut next = DistributedLockStatus {
        phase: Some(Phase::Pending),
        lock_key: Some(queue::lock_key(lock)),
        observed_generation: lock.metadata.generation,
        ..Default::default()
    };
    record_arrival(&mut next, arrival);
    next
}

/// The status of a request that was just granted `grant` at `now`.
pub fn granted(
    lock: &DistributedLock,
    arrival: &Arrival,
    grant: &Lock,
    holder: String,
    now: DateTime<Utc>,
) -> DistributedLockStatus {
    let previous = lock.status.clone().unwrap_or_default();
    let mut next = DistributedLockStatus {
        phase: Some(Phase::Granted),
        lock_key: Some(grant.lock_id.clone()),
        token: Some(grant.token.clone()),
        fencing_token: i64::try_from(grant.fencing_token).ok(),
        holder: Some(holder),
        acquired_at: Some(rfc3339(grant.created_at)),
        expires_at: Some(rfc3339(grant.expires_at)),
        renewed_at: Some(rfc3339(now)),
        observed_generation: lock.metadata.generation,
        conditions: previous.conditions,
        ..Default::default()
    };
    record_arrival(&mut next, arrival);
    let message = format!("lock {} granted, fencing token {}", grant.lock_id, grant.fencing_token);
    set_condition(&mut next, lock, GRANTED, true, reason::ACQUIRED, &message);
    set_index_condition(&mut next, lock, &IndexHealth::Reachable);
    next
}

/// The status of a Granted request whose lease was renewed at `now` until `expires_at`.
pub fn renewed(lock: &DistributedLock, now: DateTime<Utc>, expires_at: DateTime<Utc>) -> DistributedLockStatus {
    let mut next = lock.status.clone().unwrap_or_default();
    next.renewed_at = Some(rfc3339(now));
    next.expires_at = Some(rfc3339(expires_at));
    next.observed_generation = lock.metadata.generation;
    set_index_condition(&mut next, lock, &IndexHealth::Reachable);
    next
}

/// The status of a request that reached a final phase (Released, Expired, Lost, Failed).
pub fn finished(lock: &DistributedLock, phase: Phase, reason: &str, message: &str) -> DistributedLockStatus {
    let previous = lock.status.clone().unwrap_or_default();
    let mut next = DistributedLockStatus {
        phase: Some(phase),
        lock_key: Some(queue::lock_key(lock)),
        holder: previous.holder,
        fencing_token: previous.fencing_token,
        acquired_at: previous.acquired_at,
        queued_at: previous.queued_at,
        queue_sequence: previous.queue_sequence,
        observed_generation: lock.metadata.generation,
        conditions: previous.conditions,
        ..Default::default()
    };
    set_condition(&mut next, lock, GRANTED, false, reason, message);
    next
}

/// The status a waiting request is given before a grant it was never told
/// of is given back: the request's own status with a Granted condition
/// message that names the moment (to the millisecond), so the write always
/// changes the object. The write is what makes the give-back safe: a Granted
/// write still on its way carries an older resourceVersion and is refused
/// once this one has landed.
pub fn returning_untold_grant(lock: &DistributedLock, now: DateTime<Utc>) -> DistributedLockStatus {
    let mut next = lock.status.clone().unwrap_or_default();
    next.phase = Some(next.phase.filter(|p| *p != Phase::Granted).unwrap_or(Phase::Pending));
    let mut message = format!(
        "giving back a grant this request was never told of ({}); waiting again",
        rfc3339(now)
    );
    if next
        .conditions
        .iter()
        .any(|c| c.type_ == GRANTED && c.message == message)
    {
        message.push_str(" (again)");
    }
    set_condition(&mut next, lock, GRANTED, false, reason::WAITING, &message);
    next
}

/// The current status with the IndexReachable condition set to `index`.
pub fn with_index_health(lock: &DistributedLock, index: &IndexHealth) -> DistributedLockStatus {
    let mut next = lock.status.clone().unwrap_or_default();
    next.phase = Some(next.phase.unwrap_or_default());
    set_index_condition(&mut next, lock, index);
    next
}

fn record_arrival(status: &mut DistributedLockStatus, arrival: &Arrival) {
    status.queued_at = arrival.at.map(rfc3339);
    status.queue_sequence = i64::try_from(arrival.sequence).ok();
}

fn set_index_condition(status: &mut DistributedLockStatus, lock: &DistributedLock, index: &IndexHealth) {
    match index {
        IndexHealth::Reachable => set_condition(
            status,
            lock,
            INDEX_REACHABLE,
            true,
            reason::REACHABLE,
            "the lock index answers",
        ),
        IndexHealth::Failing(reason, message) => set_condition(status, lock, INDEX_REACHABLE, false, reason, message),
    }
}

/// Sets a condition, keeping its lastTransitionTime while its status stays the same.
fn set_condition(
    status: &mut DistributedLockStatus,
    lock: &DistributedLock,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
) {
    set_condition_in(
        &mut status.conditions,
        lock.metadata.generation,
        type_,
        value,
        reason,
        message,
    );
}

/// Sets a condition in `conditions` (of an object at `generation`), keeping
/// its lastTransitionTime while its status stays the same.
pub fn set_condition_in(
    conditions: &mut Vec<Condition>,
    generation: Option<i64>,
    type_: &str,
    value: bool,
    reason: &str,
    message: &str,
) {
    let value = if value { "True" } else { "False" };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now;
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: generation,
        }),
    }
}

/// Writes the status with server-side apply under our field manager, unless
/// nothing changed (so a reconcile does not cause another one). The write
/// carries the resourceVersion of the copy it was decided from: a status
/// decided on a stale copy (say, Pending, while a newer reconcile already
/// wrote Granted) is refused (`Error::Stale`) instead of overwriting the newer one.
/// Returns the request's resourceVersion after the write.
#[tracing::instrument(level = "debug", skip_all, fields(phase = ?next.phase))]
pub async fn write(
    client: &kube::Client,
    lock: &DistributedLock,
    next: DistributedLockStatus,
) -> Result<Option<String>> {
    if lock.status.as_ref() == Some(&next) {
        return Ok(lock.resource_version());
    }
    // the answer is read as a RawRequest: it decodes whatever the object holds
    let api: Api<super::raw::RawRequest> = Api::namespaced(client.clone(), &lock.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "lockmanager.dev/v1alpha1",
        "kind": "DistributedLock",
        "metadata": {"resourceVersion": lock.resource_version()},
        "status": next,
    });
    match api
        .patch_status(
            &lock.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(written) => Ok(written.metadata.resource_version),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Stale),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// What [`write_by`] did.
#[derive(Debug)]
pub enum Written {
    /// Written: the request's resourceVersion after the write.
    At(Option<String>),
    /// No answer from the API server by the deadline: the write was given up
    /// (it may still land; it carries the resourceVersion it was decided on).
    GivenUp,
}

/// [`write`], given up at `deadline`. A status that records a lease (a grant,
/// a renewal) is written within the lease's renewal period: an API server
/// that hangs must not hold up the lease's next extension, which a reconcile
/// does only once the previous one returned.
pub async fn write_by(
    client: &kube::Client,
    lock: &DistributedLock,
    next: DistributedLockStatus,
    deadline: std::time::Instant,
) -> Result<Written> {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    match tokio::time::timeout(left, write(client, lock, next)).await {
        Ok(written) => written.map(Written::At),
        Err(_) => {
            tracing::warn!(name = %lock.name_any(), "the API server did not take a lease's status in time; renewing again");
            Ok(Written::GivenUp)
        }
    }
}

pub use crate::duration::format_time as rfc3339;

pub use crate::queue::parse_time;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{at, request};

    #[test]
    fn times_round_trip() {
        let t = parse_time("2026-11-26T13:00:00.123Z").unwrap();
        assert_eq!(rfc3339(t), "2026-11-26T13:00:00.123Z");
    }

    #[test]
    fn every_status_keeps_the_recorded_arrival() {
        let lock = request("a", "ns", "k", 0, 10, 42);
        let arrival = Arrival {
            at: Some(at(0)),
            sequence: 42,
        };
        let waiting = pending(&lock, &arrival, 2, reason::WAITING, "2nd", &IndexHealth::Reachable);
        assert_eq!(waiting.queue_sequence, Some(42));
        let mut lock = lock;
        lock.status = Some(waiting);
        assert_eq!(Arrival::recorded(&lock), Some(arrival));
        let done = finished(&lock, Phase::Failed, reason::TIMEOUT, "late");
        assert_eq!(done.queue_sequence, Some(42));
        assert_eq!(
            done.conditions.iter().find(|c| c.type_ == GRANTED).unwrap().reason,
            "Timeout"
        );
    }

    #[test]
    fn an_unreachable_index_shows_on_waiters() {
        let lock = request("a", "ns", "k", 0, 10, 42);
        let arrival = Arrival::observed(&lock, None);
        let down = IndexHealth::Failing(reason::INDEX_UNREACHABLE, "unavailable".into());
        let waiting = pending(&lock, &arrival, 3, reason::WAITING, "3rd", &down);
        let c = waiting.conditions.iter().find(|c| c.type_ == INDEX_REACHABLE).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "IndexUnreachable"));
    }

    #[test]
    fn returning_an_untold_grant_always_changes_the_request_and_keeps_it_waiting() {
        let mut lock = request("a", "ns", "k", 0, 10, 42);
        let arrival = Arrival::observed(&lock, None);
        lock.status = Some(pending(
            &lock,
            &arrival,
            2,
            reason::WAITING,
            "2nd",
            &IndexHealth::Reachable,
        ));
        let first = returning_untold_grant(&lock, at(5));
        assert_ne!(
            lock.status.as_ref(),
            Some(&first),
            "the fencing write must change the object"
        );
        assert_eq!(first.phase, Some(Phase::Pending));
        assert_eq!(first.queue_sequence, lock.status.as_ref().unwrap().queue_sequence);
        // a second give-back in the same millisecond still changes it
        lock.status = Some(first.clone());
        let second = returning_untold_grant(&lock, at(5));
        assert_ne!(first, second);
        lock.status = None;
        assert_eq!(returning_untold_grant(&lock, at(5)).phase, Some(Phase::Pending));
    }
}
