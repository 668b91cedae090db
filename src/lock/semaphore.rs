//! Semaphores: one lock document per key that holds a limit and the holders
//! of its permits, each change one atomic scripted update (like the mutex).
//!
//! API contract shared by the operator and `lockctl` (the engine fills it in):
//! - a key is either a mutex (the Kibana-style document) or a semaphore
//!   (`kind: "semaphore"`, `limit`, `holders`); mutex calls on a semaphore key
//!   and semaphore calls on a live mutex key fail with
//!   [`LockError::KindMismatch`], permit calls on a key without a semaphore
//!   with [`LockError::NoSemaphore`];
//! - [`LockClient::release`] and [`LockClient::extend_lease`] work for both
//!   kinds (a semaphore holder is found by its token);
//! - holders whose lease ran out (engine clock) free their permits;
//! - every grant gets its own fencing token, strictly increasing per key
//!   (also across a key's change from mutex to semaphore and back; the
//!   argument is in [`super::scripts`]).
//!
//! The document (`_source`) of a semaphore key:
//! `{"kind": "semaphore", "limit": 3, "fence": 42, "holders": [{"token": …,
//! "permits": 1, "exclusive": false, "fencingToken": 42, "createdAt": …,
//! "expiresAt": …, "holder": …, "metadata": {…}}]}`, holders oldest grant
//! first; `fence` (the last fencing token handed out) is absent until the
//! creator, or the first acquirer, pins it.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use elasticsearch::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::assets::IndexState;
use super::client::{LockClient, answer_version, retry_until_granted};
use super::error::LockError;
use super::ids::validate_lock_id;
use super::model::{AcquireRequest, Grant, Lock, LockDocument, implied_fencing, normalize_metadata, validate_ttl};
use super::scripts;
use super::transport::{Answer, expect_success};

/// The largest limit of a semaphore and the most permits one request takes.
pub const MAX_PERMITS: u32 = 10_000;

/// Rounds of a semaphore update before giving up. Every permit request of a
/// key writes its one document, so under load the engine's own conflict
/// retries can run out: such a round starts over after a short pause.
const SEMAPHORE_ROUNDS: u32 = 20;
const CONFLICT_PAUSE: Duration = Duration::from_millis(5);

/// One holder of a semaphore's permits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermitHolder {
    pub token: String,
    /// Permits taken (an exclusive holder: the limit when it was granted).
    pub permits: u32,
    /// Holds every permit, whatever the limit becomes (a writer).
    #[serde(default)]
    pub exclusive: bool,
    pub fencing_token: u64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(default)]
    pub metadata: Value,
}

/// A semaphore as callers see it: its limit and its live holders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Semaphore {
    pub lock_id: String,
    pub limit: u32,
    /// Live holders only, oldest grant first.
    pub holders: Vec<PermitHolder>,
}

impl Semaphore {
    /// Permits in use: the sum of the holders' permits; an exclusive holder
    /// counts as the whole limit.
    pub fn held(&self) -> u32 {
        if self.holders.iter().any(|h| h.exclusive) {
            return self.limit.max(self.holders.iter().map(|h| h.permits).sum());
        }
        self.holders.iter().map(|h| h.permits).sum()
    }

    /// Whether a request for `permits` (or every permit) would fit now.
    pub fn fits(&self, permits: u32, exclusive: bool) -> bool {
        if self.limit == 0 || self.holders.iter().any(|h| h.exclusive) {
            return false;
        }
        if exclusive {
            return self.holders.is_empty();
        }
        self.held() + permits <= self.limit
    }
}

impl PermitHolder {
    /// The grant as a [`Lock`] of key `lock_id`.
    pub fn to_lock(&self, lock_id: &str) -> Lock {
        Lock {
            lock_id: lock_id.to_string(),
            token: self.token.clone(),
            fencing_token: self.fencing_token,
            created_at: self.created_at,
            expires_at: self.expires_at,
            metadata: self.metadata.clone(),
            holder: self.holder.clone(),
        }
    }

    /// True when the lease has run out at `now`.
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// What to ask a semaphore for.
#[derive(Clone, Debug)]
pub struct PermitRequest {
    /// Key, token (a same-token re-acquire of a live grant keeps it and its
    /// fencing token), ttl, metadata, holder text.
    pub base: AcquireRequest,
    /// 1..=MAX_PERMITS (ignored when exclusive).
    pub permits: u32,
    /// Take every permit: granted only when nobody holds any.
    pub exclusive: bool,
}

/// The answer to a permit request.
#[derive(Clone, Debug)]
pub enum PermitOutcome {
    /// Granted: the lock carries this grant's token, fencing token and expiry.
    Granted(Lock),
    /// Does not fit now; the semaphore as it is.
    Full(Semaphore),
}

/// Permits granted, with what the CLI prints besides the lock.
#[derive(Clone, Debug)]
pub struct PermitGrant {
    /// The grant and when the request that won it was sent.
    pub grant: Grant,
    /// Permits taken (an exclusive grant: the limit at the time).
    pub permits: u32,
    /// Every permit is held.
    pub exclusive: bool,
}

/// The answer to deleting a semaphore.
#[derive(Clone, Debug, PartialEq)]
pub enum RetireOutcome {
    /// The semaphore document is gone; the key is a plain mutex again.
    Deleted,
    /// It still has live holders; nothing changed.
    Held(Semaphore),
    /// There was no semaphore.
    Missing,
}

/// A semaphore document as stored.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SemaphoreDocument {
    limit: u32,
    /// The last fencing token handed out; `None` until pinned.
    #[serde(default)]
    fence: Option<u64>,
    #[serde(default)]
    holders: Vec<PermitHolder>,
}

impl SemaphoreDocument {
    fn parse(lock_id: &str, source: &Value) -> Result<Self, LockError> {
        serde_json::from_value(source.clone()).map_err(|e| LockError::Malformed {
            lock_id: lock_id.to_string(),
            message: format!("as a semaphore: {e}"),
        })
    }

    /// The semaphore with the holders live at `now` (client clock: for
    /// display and for deciding nothing the engine has not decided).
    fn live_at(self, lock_id: &str, now: DateTime<Utc>) -> Semaphore {
        Semaphore {
            lock_id: lock_id.to_string(),
            limit: self.limit,
            holders: self.holders.into_iter().filter(|h| !h.is_expired_at(now)).collect(),
        }
    }
}

/// A document whose `kind` this version does not know (a newer version's
/// kind of lock): every script leaves it untouched, and every call on its
/// key is refused with this.
pub(super) fn unknown_kind(lock_id: &str, source: &Value) -> Option<LockError> {
    let kind = &source["kind"];
    (!kind.is_null() && kind != "semaphore").then(|| LockError::KindMismatch {
        lock_id: lock_id.to_string(),
        message: format!(
            "its document has kind {kind}, which this version does not know (written by a newer kube-lock-manager?); it is left untouched"
        ),
    })
}

/// The limit of a stored semaphore document; `None` for a mutex document.
pub(super) fn semaphore_limit(source: &Value) -> Option<u64> {
    (source["kind"] == "semaphore").then(|| source["limit"].as_u64().unwrap_or(0))
}

/// A mutex call on a semaphore key.
pub(super) fn semaphore_key(lock_id: &str, limit: u64, hint: &str) -> LockError {
    LockError::KindMismatch {
        lock_id: lock_id.to_string(),
        message: format!("is a semaphore (limit {limit}): {hint}"),
    }
}

/// A semaphore call on a key a live mutex holds.
fn mutex_key(lock_id: &str, lock: &LockDocument, hint: &str) -> LockError {
    LockError::KindMismatch {
        lock_id: lock_id.to_string(),
        message: format!(
            "held as a plain mutex until {}: {hint}",
            crate::duration::format_time(lock.expires_at)
        ),
    }
}

/// The live mutex a non-semaphore document holds, if any (an expired or
/// unreadable one counts as no mutex: setting a semaphore replaces it).
fn live_mutex(source: &Value) -> Option<LockDocument> {
    serde_json::from_value::<LockDocument>(source.clone())
        .ok()
        .filter(|doc| doc.expires_at > Utc::now())
}

/// 0..=MAX_PERMITS.
fn validate_limit(lock_id: &str, limit: u32) -> Result<(), LockError> {
    if limit > MAX_PERMITS {
        return Err(LockError::InvalidPermits(format!(
            "lock {lock_id:?}: invalid limit {limit}: a semaphore has 0..={MAX_PERMITS} permits"
        )));
    }
    Ok(())
}

/// 1..=MAX_PERMITS (ignored for an exclusive request).
fn validate_permits(request: &PermitRequest) -> Result<(), LockError> {
    if !request.exclusive && !(1..=MAX_PERMITS).contains(&request.permits) {
        return Err(LockError::InvalidPermits(format!(
            "lock {:?}: invalid permits {}: a request takes 1..={MAX_PERMITS} permits",
            request.base.lock_id, request.permits
        )));
    }
    Ok(())
}

/// The `_source` an update answered with (`_source: true`).
fn answer_source(answer: &Answer) -> &Value {
    &answer.body["get"]["_source"]
}

impl LockClient {
    /// Creates the semaphore `lock_id` with `limit` (0..=MAX_PERMITS) or
    /// changes its limit; holders keep their permits. Fails with
    /// `KindMismatch` while a live mutex holds the key (a mutex whose lease
    /// ran out is replaced).
    #[tracing::instrument(skip(self))]
    pub async fn semaphore_set(&self, lock_id: &str, limit: u32) -> Result<Semaphore, LockError> {
        validate_lock_id(lock_id)?;
        validate_limit(lock_id, limit)?;
        let state = self.index_state().await?;
        let result = self.semaphore_set_in(&state, lock_id, limit).await;
        self.forget_if_unproven(result).await
    }

    async fn semaphore_set_in(&self, state: &IndexState, lock_id: &str, limit: u32) -> Result<Semaphore, LockError> {
        // `pin`: the starting fence of a new semaphore, stored with if_seq_no
        let mut pin: Option<(u64, (u64, u64))> = None;
        for round in 0..SEMAPHORE_ROUNDS {
            let script = json!({
                "lang": "painless",
                "source": scripts::SEMAPHORE_SET,
                "params": {"limit": limit, "fence": pin.map(|(fence, _)| fence)}
            });
            let body = match pin {
                None => json!({"scripted_upsert": true, "upsert": {}, "script": script}),
                Some(_) => json!({"script": script}),
            };
            let answer = self
                .update("semaphore set", lock_id, &body, pin.map(|(_, version)| version))
                .await?;
            if answer.status == StatusCode::CONFLICT || (pin.is_some() && answer.status == StatusCode::NOT_FOUND) {
                // changed or gone since the pin was read, or the engine's own
                // conflict retries ran out on a busy document: start over
                pin = None;
                tokio::time::sleep(CONFLICT_PAUSE * round).await;
                continue;
            }
            expect_success("semaphore set", &answer)?;
            let source = answer_source(&answer);
            if semaphore_limit(source).is_none() {
                let hint = "release it (or let it expire) before making the key a semaphore";
                return Err(match live_mutex(source) {
                    Some(lock) => mutex_key(lock_id, &lock, hint),
                    None => LockError::Response {
                        operation: "semaphore set",
                        message: format!("lock document {lock_id:?} was left as it was"),
                    },
                });
            }
            let doc = SemaphoreDocument::parse(lock_id, source)?;
            if doc.fence.is_none() {
                let version = answer_version("semaphore set", &answer)?;
                pin = Some((implied_fencing(state.fencing_floor, version.0), version));
                continue;
            }
            return Ok(doc.live_at(lock_id, Utc::now()));
        }
        Err(kept_changing("semaphore set"))
    }

    /// The semaphore and its live holders; `None` when the key has none (a
    /// mutex whose lease ran out counts as none). `KindMismatch` when a live
    /// mutex holds the key.
    pub async fn semaphore_get(&self, lock_id: &str) -> Result<Option<Semaphore>, LockError> {
        let Some(stored) = self.read_source("semaphore get", lock_id).await? else {
            return Ok(None);
        };
        if semaphore_limit(&stored.source).is_none() {
            return match live_mutex(&stored.source) {
                Some(lock) => Err(mutex_key(lock_id, &lock, &format!("see `lockctl get {lock_id}`"))),
                None => Ok(None),
            };
        }
        let doc = SemaphoreDocument::parse(lock_id, &stored.source)?;
        Ok(Some(doc.live_at(lock_id, Utc::now())))
    }

    /// Deletes the semaphore if nobody holds a permit (one atomic scripted
    /// update). A key without a semaphore, also one a mutex holds, is `Missing`.
    #[tracing::instrument(skip(self))]
    pub async fn semaphore_delete(&self, lock_id: &str) -> Result<RetireOutcome, LockError> {
        validate_lock_id(lock_id)?;
        self.index_state().await?;
        let body = json!({"script": {"lang": "painless", "source": scripts::SEMAPHORE_DELETE, "params": {}}});
        let result = self.update("semaphore delete", lock_id, &body, None).await;
        let answer = self.forget_if_unproven(result).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(RetireOutcome::Missing);
        }
        expect_success("semaphore delete", &answer)?;
        match answer.body["result"].as_str() {
            Some("deleted") => Ok(RetireOutcome::Deleted),
            Some("noop") if semaphore_limit(answer_source(&answer)).is_some() => {
                let doc = SemaphoreDocument::parse(lock_id, answer_source(&answer))?;
                Ok(RetireOutcome::Held(doc.live_at(lock_id, Utc::now())))
            }
            Some("noop") => Ok(RetireOutcome::Missing),
            other => Err(LockError::Response {
                operation: "semaphore delete",
                message: format!("result {other:?}"),
            }),
        }
    }

    /// Takes permits of a semaphore in one atomic scripted update.
    pub async fn acquire_permits(&self, request: &PermitRequest) -> Result<PermitOutcome, LockError> {
        Ok(match self.grant_permits(request).await? {
            Ok(holder) => PermitOutcome::Granted(holder.to_lock(&request.base.lock_id)),
            Err(full) => PermitOutcome::Full(full),
        })
    }

    /// Takes permits, retrying with capped exponential backoff while they do
    /// not fit, until `wait` has passed (zero: one attempt). Without a grant:
    /// the semaphore as the last attempt found it.
    pub async fn acquire_permits_timed(
        &self,
        request: &PermitRequest,
        wait: Duration,
    ) -> Result<Result<PermitGrant, Semaphore>, LockError> {
        retry_until_granted(wait, || self.try_permits_timed(request)).await
    }

    /// One attempt at permits, with the send time of its request.
    pub(super) async fn try_permits_timed(
        &self,
        request: &PermitRequest,
    ) -> Result<Result<PermitGrant, Semaphore>, LockError> {
        let sent_at = SystemTime::now();
        Ok(self.grant_permits(request).await?.map(|holder| PermitGrant {
            grant: Grant {
                lock: holder.to_lock(&request.base.lock_id),
                sent_at,
            },
            permits: holder.permits,
            exclusive: holder.exclusive,
        }))
    }

    #[tracing::instrument(skip(self, request), fields(lock_id = %request.base.lock_id, permits = request.permits, exclusive = request.exclusive))]
    async fn grant_permits(&self, request: &PermitRequest) -> Result<Result<PermitHolder, Semaphore>, LockError> {
        validate_lock_id(&request.base.lock_id)?;
        validate_permits(request)?;
        let ttl_ms = validate_ttl(request.base.ttl)?;
        let metadata = normalize_metadata(request.base.metadata.clone())?;
        let state = self.index_state().await?;
        let result = self.grant_permits_in(&state, request, ttl_ms, &metadata).await;
        self.forget_if_unproven(result).await
    }

    async fn grant_permits_in(
        &self,
        state: &IndexState,
        request: &PermitRequest,
        ttl_ms: u64,
        metadata: &Value,
    ) -> Result<Result<PermitHolder, Semaphore>, LockError> {
        let lock_id = &request.base.lock_id;
        let token = &request.base.token;
        // `pin`: the starting fence of a semaphore its creator did not pin
        let mut pin: Option<(u64, (u64, u64))> = None;
        for round in 0..SEMAPHORE_ROUNDS {
            let body = json!({"script": {
                "lang": "painless",
                "source": scripts::ACQUIRE_PERMITS,
                "params": {
                    "token": token,
                    "ttl": ttl_ms,
                    "metadata": metadata,
                    "holder": request.base.holder,
                    "permits": request.permits,
                    "exclusive": request.exclusive,
                    "fence": pin.map(|(fence, _)| fence),
                }
            }});
            let answer = self
                .update("acquire permits", lock_id, &body, pin.map(|(_, version)| version))
                .await?;
            if answer.status == StatusCode::CONFLICT || (pin.is_some() && answer.status == StatusCode::NOT_FOUND) {
                // changed or gone since the pin was read, or the engine's own
                // conflict retries ran out on a busy document: start over
                pin = None;
                tokio::time::sleep(CONFLICT_PAUSE * round).await;
                continue;
            }
            if answer.status == StatusCode::NOT_FOUND {
                return Err(LockError::NoSemaphore {
                    lock_id: lock_id.clone(),
                });
            }
            expect_success("acquire permits", &answer)?;
            let source = answer_source(&answer);
            if semaphore_limit(source).is_none() {
                let hint = "it is not a semaphore; acquire it without --permits";
                return Err(match live_mutex(source) {
                    Some(lock) => mutex_key(lock_id, &lock, hint),
                    None => LockError::NoSemaphore {
                        lock_id: lock_id.clone(),
                    },
                });
            }
            let doc = SemaphoreDocument::parse(lock_id, source)?;
            let updated = answer.body["result"] == "updated";
            let ours = doc.holders.iter().find(|h| h.token == *token).cloned();
            match ours {
                Some(holder) if updated => {
                    // the write must have landed in the index we set up (see
                    // `acquire`); if not, the permits are given back
                    if let Err(e) = self.assets().verify(state).await {
                        let _ = self.release(lock_id, token).await;
                        return Err(e);
                    }
                    return Ok(Ok(holder));
                }
                _ if doc.fence.is_none() => {
                    let version = answer_version("acquire permits", &answer)?;
                    pin = Some((implied_fencing(state.fencing_floor, version.0), version));
                }
                _ => return Ok(Err(doc.live_at(lock_id, Utc::now()))),
            }
        }
        Err(kept_changing("acquire permits"))
    }
}

fn kept_changing(operation: &'static str) -> LockError {
    LockError::Response {
        operation,
        message: "the lock document kept changing; try again".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(permits: u32, exclusive: bool) -> PermitHolder {
        PermitHolder {
            token: crate::lock::new_token(),
            permits,
            exclusive,
            fencing_token: 1,
            created_at: Utc::now(),
            expires_at: Utc::now(),
            holder: None,
            metadata: Value::Null,
        }
    }

    fn semaphore(limit: u32, holders: Vec<PermitHolder>) -> Semaphore {
        Semaphore {
            lock_id: "k".into(),
            limit,
            holders,
        }
    }

    #[test]
    fn held_counts_permits_and_an_exclusive_holder_as_the_whole_limit() {
        assert_eq!(semaphore(3, vec![]).held(), 0);
        assert_eq!(semaphore(3, vec![holder(2, false), holder(1, false)]).held(), 3);
        // a lowered limit: holders keep what they took
        assert_eq!(semaphore(1, vec![holder(2, false), holder(1, false)]).held(), 3);
        // an exclusive holder took the old limit; a raised limit is all its own too
        assert_eq!(semaphore(10, vec![holder(5, true)]).held(), 10);
        assert_eq!(semaphore(2, vec![holder(5, true)]).held(), 5);
    }

    #[test]
    fn fits_follows_the_grant_rules_of_the_script() {
        let sem = semaphore(3, vec![holder(2, false)]);
        assert!(sem.fits(1, false));
        assert!(!sem.fits(2, false));
        assert!(!sem.fits(1, true), "an exclusive request waits for every holder");
        assert!(semaphore(3, vec![]).fits(1, true));
        assert!(semaphore(3, vec![]).fits(3, false));
        assert!(!semaphore(3, vec![]).fits(4, false));
        assert!(!semaphore(0, vec![]).fits(1, false), "limit 0 closes the key");
        assert!(!semaphore(0, vec![]).fits(1, true));
        assert!(
            !semaphore(10, vec![holder(3, true)]).fits(1, false),
            "nobody beside a writer"
        );
        assert!(!semaphore(1, vec![holder(1, false), holder(1, false)]).fits(1, false));
    }

    #[test]
    fn a_stored_document_is_told_apart_by_its_kind() {
        assert_eq!(semaphore_limit(&json!({"kind": "semaphore", "limit": 4})), Some(4));
        assert_eq!(
            semaphore_limit(&json!({"token": "t", "expiresAt": "2020-01-01T00:00:00Z"})),
            None
        );
        let err = semaphore_key("k", 4, "acquire permits with --permits");
        assert_eq!(
            err.to_string(),
            "lock \"k\": is a semaphore (limit 4): acquire permits with --permits"
        );
    }
}
