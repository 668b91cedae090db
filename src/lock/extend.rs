//! Extending a lease: only a live lease of the caller's token is extended;
//! an expired one is reported as such, never revived. Works on a mutex and
//! on a semaphore holder alike.

use std::time::Duration;

use elasticsearch::http::StatusCode;
use serde_json::{Value, json};

use super::client::{CAS_ROUNDS, LockClient};
use super::error::LockError;
use super::ids::validate_lock_id;
use super::model::{ExtendOutcome, implied_fencing, validate_ttl};
use super::scripts;
use super::semaphore::semaphore_limit;
use super::transport::expect_success;

impl LockClient {
    /// Moves `expiresAt` to now + ttl if `token` holds the lock and its lease
    /// has not run out by the engine's clock (an expired lease is not revived).
    /// `fencing_token` is the grant's, when the caller knows it (it keeps
    /// `get` reporting the grant's token after the extension; a semaphore
    /// holder's is stored and needs no help).
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
        self.index_state().await?;
        let result = self.extend_in(lock_id, token, ttl_ms, fencing_token).await;
        self.forget_if_unproven(result).await
    }

    async fn extend_in(
        &self,
        lock_id: &str,
        token: &str,
        ttl_ms: u64,
        fencing_token: Option<u64>,
    ) -> Result<ExtendOutcome, LockError> {
        if let Some(fencing) = fencing_token {
            return self.extend_once(lock_id, token, ttl_ms, Some(fencing), None).await;
        }
        // The caller does not know the fencing token: read it, then extend only
        // if nothing wrote the document in between (compare-and-swap).
        for _ in 0..CAS_ROUNDS {
            let Some(stored) = self.read_source("extend", lock_id).await? else {
                return Ok(ExtendOutcome::NotHeld);
            };
            if semaphore_limit(&stored.source).is_some() {
                // a holder's fencing token is stored with it: nothing to pin
                return self.extend_once(lock_id, token, ttl_ms, None, None).await;
            }
            if stored.source["token"] != token {
                return Ok(ExtendOutcome::NotHeld);
            }
            let fencing = match stored.source["fencingToken"].as_u64() {
                Some(stored) => stored,
                None => implied_fencing(stored.fencing_floor, stored.seq_no),
            };
            let version = (stored.seq_no, stored.primary_term);
            match self
                .extend_once(lock_id, token, ttl_ms, Some(fencing), Some(version))
                .await
            {
                Err(LockError::Engine { status: 409, .. }) => continue,
                other => return other,
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
    ) -> Result<ExtendOutcome, LockError> {
        let body = json!({
            "script": {
                "lang": "painless",
                "source": scripts::EXTEND,
                "params": {"token": token, "ttl": ttl_ms, "fencingToken": fencing}
            }
        });
        let answer = self.update("extend", lock_id, &body, if_version).await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(ExtendOutcome::NotHeld);
        }
        expect_success("extend", &answer)?;
        match answer.body["result"].as_str() {
            Some("updated") => Ok(ExtendOutcome::Extended),
            // the noop's _source is the document the script saw: still our
            // token (or holder entry) means the lease had run out
            Some("noop") if carries_token(&answer.body["get"]["_source"], token) => Ok(ExtendOutcome::Expired),
            Some("noop") => Ok(ExtendOutcome::NotHeld),
            other => Err(LockError::Response {
                operation: "extend",
                message: format!("result {other:?}"),
            }),
        }
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

/// True when a stored document (either kind) still names `token` as a holder.
fn carries_token(source: &Value, token: &str) -> bool {
    source["token"] == token
        || source["holders"]
            .as_array()
            .is_some_and(|holders| holders.iter().any(|h| h["token"] == token))
}
