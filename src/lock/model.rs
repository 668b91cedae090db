//! The values the lock engine deals in: lock documents, locks, requests and
//! outcomes, and the checks on what callers pass in.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::LockError;

/// Kibana's default lease length (also a DistributedLock's default `ttl`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// A lock document as stored in the index (Kibana-compatible field names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockDocument {
    /// The holder's token; release and extend must present it.
    pub token: String,
    /// When the current grant was made (engine clock).
    pub created_at: DateTime<Utc>,
    /// When the lease runs out (engine clock).
    pub expires_at: DateTime<Utc>,
    /// Free-form JSON object stored with the lock.
    #[serde(default)]
    pub metadata: Value,
    /// Display text naming the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The grant's fencing token once stored; absent right after a grant,
    /// when the document's `_seq_no` implies it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
}

/// A lock as callers see it: the document plus its key and fencing token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lock {
    /// The lock key.
    pub lock_id: String,
    /// The holder's token.
    pub token: String,
    /// Grows with every grant of this key; a same-token re-acquire keeps it.
    pub fencing_token: u64,
    /// When this grant was made (engine clock).
    pub created_at: DateTime<Utc>,
    /// When the lease runs out unless extended (engine clock).
    pub expires_at: DateTime<Utc>,
    /// The JSON object stored with the lock.
    pub metadata: Value,
    /// Display text naming the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

impl Lock {
    /// True when the lease has run out at `now`.
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// What to ask for when acquiring.
#[derive(Clone, Debug)]
pub struct AcquireRequest {
    /// The lock key (see [`super::validate_lock_id`]).
    pub lock_id: String,
    /// The token to hold the lock with. A new random one for a new grant; the
    /// current one to retry a grant or renew an expired-but-untaken lease of
    /// one's own (the grant's fencing token is kept).
    pub token: String,
    /// Lease length.
    pub ttl: Duration,
    /// A JSON object (or null) stored with the lock.
    pub metadata: Value,
    /// Display text naming the holder.
    pub holder: Option<String>,
    /// Ignored: the engine works out the fencing token of a same-token
    /// re-acquire itself (kept so existing callers compile).
    pub fencing_token: Option<u64>,
}

impl AcquireRequest {
    /// A fresh acquisition with a new random token.
    pub fn new(lock_id: impl Into<String>, ttl: Duration, metadata: Value) -> Self {
        Self {
            lock_id: lock_id.into(),
            token: new_token(),
            ttl,
            metadata,
            holder: None,
            fencing_token: None,
        }
    }
}

/// A granted lock and when the request that won it was sent: the holder may
/// rely on the lock until `sent_at + ttl` (the engine's expiry is later).
#[derive(Clone, Debug)]
pub struct Grant {
    /// The lock granted.
    pub lock: Lock,
    /// When the successful acquire request was sent.
    pub sent_at: SystemTime,
}

/// The outcome of [`super::LockClient::extend_lease`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtendOutcome {
    /// The lease now runs until now + ttl.
    Extended,
    /// The document still carries the caller's token, but its lease ran out
    /// (by the engine's clock): it is not revived; the holder has lost it.
    Expired,
    /// The lock is gone or held by another token.
    NotHeld,
}

/// A stored lock document with the version the engine gave it.
#[derive(Clone, Debug)]
pub struct RawLock {
    /// The stored document, expired or not.
    pub document: LockDocument,
    /// The document's sequence number.
    pub seq_no: u64,
    /// The document's primary term.
    pub primary_term: u64,
    /// The index's fencing floor (see [`super::IndexState`]).
    pub fencing_floor: u64,
}

impl RawLock {
    /// The grant's fencing token: stored, or implied by the document's `_seq_no`.
    pub fn fencing_token(&self) -> u64 {
        self.document
            .fencing_token
            .unwrap_or(implied_fencing(self.fencing_floor, self.seq_no))
    }

    /// The lock as callers see it.
    pub fn into_lock(self, lock_id: &str) -> Lock {
        let fencing = self.fencing_token();
        to_lock(lock_id, self.document, fencing)
    }
}

/// The fencing token of a grant whose document was last written at `seq_no`
/// in an index with fencing floor `floor` (sequence numbers start at 0).
pub(crate) fn implied_fencing(floor: u64, seq_no: u64) -> u64 {
    floor + seq_no + 1
}

pub(crate) fn to_lock(lock_id: &str, doc: LockDocument, fencing_token: u64) -> Lock {
    Lock {
        lock_id: lock_id.to_string(),
        token: doc.token,
        fencing_token,
        created_at: doc.created_at,
        expires_at: doc.expires_at,
        metadata: doc.metadata,
        holder: doc.holder,
    }
}

/// A fresh random lock token.
pub fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A lease length in milliseconds: 1 ms ..= 365 days.
pub(crate) fn validate_ttl(ttl: Duration) -> Result<u64, LockError> {
    let ms = ttl.as_millis();
    if ms == 0 || ms > 365 * 24 * 3600 * 1000 {
        return Err(LockError::InvalidTtl(ttl));
    }
    Ok(ms as u64)
}

/// Metadata is a JSON object (or nothing, stored as `{}`).
pub fn normalize_metadata(metadata: Value) -> Result<Value, LockError> {
    match metadata {
        Value::Null => Ok(json!({})),
        Value::Object(_) => Ok(metadata),
        other => Err(LockError::InvalidMetadata(format!(
            "expected a JSON object, got {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_must_be_an_object() {
        assert_eq!(normalize_metadata(Value::Null).unwrap(), json!({}));
        assert!(normalize_metadata(json!({"a": 1})).is_ok());
        let err = normalize_metadata(json!([1])).unwrap_err();
        assert!(err.to_string().contains("an array"), "{err}");
    }

    #[test]
    fn ttl_bounds() {
        assert!(validate_ttl(Duration::ZERO).is_err());
        assert_eq!(validate_ttl(Duration::from_secs(30)).unwrap(), 30_000);
    }

    #[test]
    fn the_floor_raises_implied_fencing_tokens() {
        assert_eq!(implied_fencing(0, 0), 1);
        assert_eq!(implied_fencing(1000, 4), 1005);
    }
}
