//! Extending a lease: only a live lease of the caller's token is extended;
//! an expired one is reported as such, never revived. Works on a mutex and
//! on a semaphore holder alike.

use std::time::Duration;

use elasticsearch::http::StatusCode;
use serde_json::{Value, json};

use super::client::{CAS_ROUNDS, LockClient, answer_version};
use super::error::LockError;
use super::ids::validate_lock_id;
use super::model::{ExtendOutcome, implied_fencing, validate_ttl};
use super::scripts;
use super::semaphore::semaphore_limit;
use super::transport::expect_success;

impl LockClient {
    /// Moves `expiresAt` to now + ttl if `token` holds the lock and its lease
    /// has not run out by the engine's clock (an expired lease is not revived).
    /// `fencing_token` is the grant's, when the caller knows it: only that
    /// grant is extended (the same token granted again since, under another
    /// fencing token, reads as this grant having expired), and `get` keeps
    /// reporting it after the extension. A semaphore holder's is stored with
    /// it and checked the same way.
    #[tracing::instrument(skip(self, token))]
    pub async fn extend_lease(
        &self,
        lock_id: &str,
        token: &str,
        ttl: Duration,
        fencing_token: Option<u64>,
    ) -> Result<ExtendOutcome, LockError> {
        validate_lock_id(lock_id)?;
        let ttl_ms = validate_ttl(ttl)?;
        let state = self.index_state().await?;
        let result = self
            .extend_in(lock_id, token, ttl_ms, fencing_token, state.fencing_floor)
            .await;
        self.forget_if_unproven(result).await
    }

    async fn extend_in(
        &self,
        lock_id: &str,
        token: &str,
        ttl_ms: u64,
        fencing_token: Option<u64>,
        floor: u64,
    ) -> Result<ExtendOutcome, LockError> {
        // `pin`: the write this extension is made against (if_seq_no), when
        // the grant's fencing token is still implied by the `_seq_no` and the
        // extension stores it.
        let mut pin: Option<(u64, u64)> = None;
        for _ in 0..CAS_ROUNDS {
            let fencing = match fencing_token {
                Some(known) => Some(known),
                // The caller does not know the fencing token: read it, then
                // extend only if nothing wrote the document in between.
                None => {
                    let Some(stored) = self.read_source("extend", lock_id).await? else {
                        return Ok(ExtendOutcome::NotHeld);
                    };
                    if semaphore_limit(&stored.source).is_some() {
                        // a holder's fencing token is stored with it: nothing to pin
                        None
                    } else if stored.source["token"] != token {
                        return Ok(ExtendOutcome::NotHeld);
                    } else {
                        pin = Some((stored.seq_no, stored.primary_term));
                        Some(match stored.source["fencingToken"].as_u64() {
                            Some(stored) => stored,
                            None => implied_fencing(stored.fencing_floor, stored.seq_no),
                        })
                    }
                }
            };
            match self.extend_once(lock_id, token, ttl_ms, fencing, pin).await {
                Err(LockError::Engine { status: 409, .. }) => pin = None,
                // read as a semaphore, now a mutex of our token: read again
                Ok(Extension::Unpinned(_)) if fencing.is_none() => pin = None,
                Ok(Extension::Unpinned(version)) => {
                    // our token, its fencing token not stored yet: the grant
                    // we renew is this one only if that token is ours
                    if fencing != Some(implied_fencing(floor, version.0)) {
                        tracing::info!(
                            lock_id,
                            ?fencing,
                            "the lock was granted to this token again since; the known grant is over"
                        );
                        return Ok(ExtendOutcome::Expired);
                    }
                    pin = Some(version);
                }
                Ok(Extension::Done(outcome)) => return Ok(outcome),
                Err(e) => return Err(e),
            }
        }
        Err(LockError::Response {
            operation: "extend",
            message: "the lock document kept changing; try again".into(),
        })
    }

    async fn extend_once(
        &self,
        lock_id: &str,
        token: &str,
        ttl_ms: u64,
        fencing: Option<u64>,
        if_version: Option<(u64, u64)>,
    ) -> Result<Extension, LockError> {
        let body = json!({
            "script": {
                "lang": "painless",
                "source": scripts::EXTEND,
                "params": {"token": token, "ttl": ttl_ms, "fencingToken": fencing, "checked": if_version.is_some()}
            }
        });
        let answer = self.update("extend", lock_id, &body, if_version).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(Extension::Done(ExtendOutcome::NotHeld));
        }
        expect_success("extend", &answer)?;
        let source = &answer.body["get"]["_source"];
        Ok(Extension::Done(match answer.body["result"].as_str() {
            Some("updated") => ExtendOutcome::Extended,
            Some("noop")
                if if_version.is_none()
                    && source["token"] == token
                    && source["kind"].is_null()
                    && source["fencingToken"].is_null() =>
            {
                return Ok(Extension::Unpinned(answer_version("extend", &answer)?));
            }
            // the noop's _source is the document the script saw: still our
            // token (or holder entry) means the lease had run out, or the
            // token was granted again under another fencing token
            Some("noop") if carries_token(source, token) => ExtendOutcome::Expired,
            Some("noop") => ExtendOutcome::NotHeld,
            other => {
                return Err(LockError::Response {
                    operation: "extend",
                    message: format!("result {other:?}"),
                });
            }
        }))
    }

    /// [`Self::extend_lease`] as a yes/no: true only when extended.
    pub async fn extend(
        &self,
        lock_id: &str,
        token: &str,
        ttl: Duration,
        fencing_token: Option<u64>,
    ) -> Result<bool, LockError> {
        Ok(self.extend_lease(lock_id, token, ttl, fencing_token).await? == ExtendOutcome::Extended)
    }
}

/// What one extend request came back with.
enum Extension {
    Done(ExtendOutcome),
    /// A noop on our token whose fencing token is implied by this
    /// `(_seq_no, _primary_term)`: to be checked and pinned with it.
    Unpinned((u64, u64)),
}

/// True when a stored document (either kind) still names `token` as a holder.
fn carries_token(source: &Value, token: &str) -> bool {
    source["token"] == token
        || source["holders"]
            .as_array()
            .is_some_and(|holders| holders.iter().any(|h| h["token"] == token))
}
