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
//!   (also across a key's change from mutex to semaphore and back).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::client::LockClient;
use super::error::LockError;
use super::model::{AcquireRequest, Lock};

/// The largest limit of a semaphore and the most permits one request takes.
pub const MAX_PERMITS: u32 = 10_000;

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

impl LockClient {
    /// Creates the semaphore `lock_id` with `limit` (0..=MAX_PERMITS) or
    /// changes its limit; holders keep their permits. Fails with
    /// `KindMismatch` while a live mutex holds the key.
    pub async fn semaphore_set(&self, lock_id: &str, limit: u32) -> Result<Semaphore, LockError> {
        let _ = (lock_id, limit);
        todo!("semaphore engine")
    }

    /// The semaphore and its live holders; `None` when the key has none.
    /// `KindMismatch` when the key is a mutex.
    pub async fn semaphore_get(&self, lock_id: &str) -> Result<Option<Semaphore>, LockError> {
        let _ = lock_id;
        todo!("semaphore engine")
    }

    /// Deletes the semaphore if nobody holds a permit.
    pub async fn semaphore_delete(&self, lock_id: &str) -> Result<RetireOutcome, LockError> {
        let _ = lock_id;
        todo!("semaphore engine")
    }

    /// Takes permits of a semaphore in one atomic scripted update.
    pub async fn acquire_permits(&self, request: &PermitRequest) -> Result<PermitOutcome, LockError> {
        let _ = request;
        todo!("semaphore engine")
    }
}
