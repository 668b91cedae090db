//! [`LockClient`]: acquire, release, extend and read lock documents, each
//! one atomic scripted update (or a read) on the lock index.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::Utc;
use elasticsearch::cluster::ClusterStateParts;
use elasticsearch::http::StatusCode;
use elasticsearch::http::response::Response;
use elasticsearch::{Elasticsearch, GetParts, UpdateParts};
use serde_json::{Value, json};

use super::assets::{IndexAssets, IndexState};
use super::error::LockError;
use super::ids::validate_lock_id;
use super::model::{
    AcquireRequest, Grant, Lock, LockDocument, RawLock, implied_fencing, normalize_metadata, to_lock, validate_ttl,
};
use super::scripts;
use super::semaphore::{semaphore_key, semaphore_limit, unknown_kind};
use super::transport::{Answer, expect_success, script_failure, send_with_retry};
use crate::engine::EngineArgs;

/// How often the engine re-runs a script whose document changed under it.
const CONFLICT_RETRIES: i64 = 10;
/// Compare-and-swap rounds before giving up on a document that keeps changing.
pub(super) const CAS_ROUNDS: usize = 5;
/// How often an acquire answered by a replaced primary is asked again (200 ms apart).
const DEPOSED_ROUNDS: usize = 15;

/// The lock index: acquire, release, extend and read lock documents. Cheap to
/// clone; index assets are set up once per client (and so once per process
/// when the client is shared), and again after the index was found replaced.
#[derive(Clone)]
pub struct LockClient {
    inner: Arc<Inner>,
}

struct Inner {
    es: Elasticsearch,
    assets: IndexAssets,
    /// The index set up and verified; `None` until set up, or after a write
    /// found it gone.
    state: tokio::sync::Mutex<Option<IndexState>>,
    backoff: Duration,
}

impl LockClient {
    /// A client of the lock index `<index_prefix>` on `es`.
    pub fn new(es: Elasticsearch, index_prefix: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                assets: IndexAssets::new(es.clone(), index_prefix),
                es,
                state: tokio::sync::Mutex::new(None),
                backoff: Duration::from_millis(100),
            }),
        }
    }

    /// Builds a client from command-line style settings.
    pub fn from_args(args: &EngineArgs) -> Result<Self, LockError> {
        Ok(Self::new(args.client()?, &args.index_prefix))
    }

    /// The name lock requests address: the alias of the concrete lock index.
    pub fn index(&self) -> &str {
        self.inner.assets.index()
    }

    /// The index assets (templates, alias, concrete index) of this client.
    pub fn assets(&self) -> &IndexAssets {
        &self.inner.assets
    }

    /// The underlying search engine client.
    pub fn elasticsearch(&self) -> &Elasticsearch {
        &self.inner.es
    }

    /// Makes sure the templates and the index exist and that fencing tokens
    /// can be trusted to grow, once per client.
    pub async fn ensure_ready(&self) -> Result<(), LockError> {
        self.index_state().await.map(|_| ())
    }

    /// The verified index state, setting it up first if needed.
    pub async fn index_state(&self) -> Result<IndexState, LockError> {
        let mut state = self.inner.state.lock().await;
        if let Some(known) = &*state {
            return Ok(known.clone());
        }
        let fresh = self.inner.assets.ensure().await?;
        *state = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forgets the verified state when `result` says the index can no longer
    /// be trusted, so the next call sets up (and checks) again.
    pub(super) async fn forget_if_unproven<T>(&self, result: Result<T, LockError>) -> Result<T, LockError> {
        if let Err(LockError::FencingUnproven { .. }) = &result {
            *self.inner.state.lock().await = None;
        }
        result
    }

    /// Acquires `lock_id` with a fresh token. `None` when someone else holds it.
    pub async fn acquire(&self, lock_id: &str, ttl: Duration, metadata: Value) -> Result<Option<Lock>, LockError> {
        self.try_acquire(&AcquireRequest::new(lock_id, ttl, metadata)).await
    }

    /// One atomic scripted upsert: takes the lock if it is free, expired or
    /// already ours (then the grant's fencing token is kept). `None` when
    /// another token holds a live lease.
    #[tracing::instrument(skip(self, req), fields(lock_id = %req.lock_id))]
    pub async fn try_acquire(&self, req: &AcquireRequest) -> Result<Option<Lock>, LockError> {
        Ok(self.try_acquire_versioned(req).await?.map(|(lock, _)| lock))
    }

    /// [`Self::try_acquire`], also giving the `(_seq_no, _primary_term)` of
    /// the write that made the grant, to check a grant against the index's
    /// history (a fault test does).
    pub async fn try_acquire_versioned(&self, req: &AcquireRequest) -> Result<Option<(Lock, (u64, u64))>, LockError> {
        validate_lock_id(&req.lock_id)?;
        let ttl_ms = validate_ttl(req.ttl)?;
        let metadata = normalize_metadata(req.metadata.clone())?;
        let state = self.index_state().await?;
        let result = self.acquire_in(&state, req, ttl_ms, &metadata).await;
        self.forget_if_unproven(result).await
    }

    async fn acquire_in(
        &self,
        state: &IndexState,
        req: &AcquireRequest,
        ttl_ms: u64,
        metadata: &Value,
    ) -> Result<Option<(Lock, (u64, u64))>, LockError> {
        // `pin`: the fencing token of our own grant, stored with if_seq_no
        // when a same-token re-acquire finds it still implied by `_seq_no`.
        let mut pin: Option<(u64, (u64, u64))> = None;
        let mut deposed = 0;
        for _ in 0..CAS_ROUNDS + DEPOSED_ROUNDS {
            let script = json!({
                "lang": "painless",
                "source": scripts::ACQUIRE,
                "params": {
                    "token": req.token,
                    "ttl": ttl_ms,
                    "metadata": metadata,
                    "holder": req.holder,
                    "fencingToken": pin.map(|(fencing, _)| fencing),
                }
            });
            let body = match pin {
                None => json!({"scripted_upsert": true, "upsert": {}, "script": script}),
                Some(_) => json!({"script": script}),
            };
            let answer = match self
                .update("acquire", &req.lock_id, &body, pin.map(|(_, version)| version))
                .await
            {
                // answered by a primary the cluster replaced: ask again (same
                // token) once the cluster has settled
                Err(LockError::Deposed { term, current, .. }) if deposed < DEPOSED_ROUNDS => {
                    deposed += 1;
                    tracing::debug!(lock_id = %req.lock_id, term, current, "acquire answered by a replaced primary; asking again");
                    pin = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                other => other?,
            };
            if pin.is_some() && matches!(answer.status.as_u16(), 404 | 409) {
                pin = None; // changed or gone since we read it: start over
                continue;
            }
            expect_success("acquire", &answer)?;
            if let Some(limit) = semaphore_limit(&answer.body["get"]["_source"]) {
                return Err(semaphore_key(&req.lock_id, limit, "acquire permits with --permits"));
            }
            let doc = answer_document(&req.lock_id, &answer)?;
            let (seq_no, primary_term) = answer_version("acquire", &answer)?;
            match answer.body["result"].as_str() {
                Some("created" | "updated") => {
                    let fencing = doc
                        .fencing_token
                        .unwrap_or(implied_fencing(state.fencing_floor, seq_no));
                    // the write must have landed in the index we set up, not
                    // in one restored from a snapshot since; if not, the
                    // grant is withdrawn rather than left blocking others
                    if let Err(e) = self.inner.assets.verify(state).await {
                        let release = json!({"script": {"lang": "painless", "source": scripts::RELEASE,
                            "params": {"token": req.token}}});
                        let _ = self.update("release", &req.lock_id, &release, None).await;
                        return Err(e);
                    }
                    return Ok(Some((to_lock(&req.lock_id, doc, fencing), (seq_no, primary_term))));
                }
                Some("noop") if doc.token == req.token && doc.fencing_token.is_none() => {
                    let fencing = implied_fencing(state.fencing_floor, seq_no);
                    pin = Some((fencing, (seq_no, primary_term)));
                }
                Some("noop") => return Ok(None),
                other => {
                    return Err(LockError::Response {
                        operation: "acquire",
                        message: format!("result {other:?}"),
                    });
                }
            }
        }
        Err(LockError::Response {
            operation: "acquire",
            message: "the lock document kept changing; try again".into(),
        })
    }

    /// Acquires, retrying with capped exponential backoff while another owner
    /// holds the lock, until `wait` has passed (zero: one attempt). The grant
    /// carries the send time of the attempt that won it.
    pub async fn acquire_timed(&self, req: &AcquireRequest, wait: Duration) -> Result<Option<Grant>, LockError> {
        let outcome = retry_until_granted(wait, || self.try_acquire_timed(req)).await?;
        Ok(outcome.ok())
    }

    /// One attempt, with the send time of its request; `Err(())` when another
    /// owner holds the lock.
    pub(super) async fn try_acquire_timed(&self, req: &AcquireRequest) -> Result<Result<Grant, ()>, LockError> {
        let sent_at = SystemTime::now();
        Ok(match self.try_acquire(req).await? {
            Some(lock) => Ok(Grant { lock, sent_at }),
            None => Err(()),
        })
    }

    /// Acquires, retrying with capped exponential backoff until `wait` has passed.
    pub async fn acquire_with_wait(&self, req: &AcquireRequest, wait: Duration) -> Result<Option<Lock>, LockError> {
        Ok(self.acquire_timed(req, wait).await?.map(|grant| grant.lock))
    }

    /// Token-fenced delete (on a semaphore: removes that token's holder).
    /// `false` when the lock is missing, held by another token, or its index
    /// is gone.
    #[tracing::instrument(skip(self, token))]
    pub async fn release(&self, lock_id: &str, token: &str) -> Result<bool, LockError> {
        validate_lock_id(lock_id)?;
        // No setup first: a token-fenced delete is safe in any index, and
        // with the index gone there is nothing to release.
        let body = json!({
            "script": {"lang": "painless", "source": scripts::RELEASE, "params": {"token": token}}
        });
        let answer = match self.update("release", lock_id, &body, None).await {
            Err(LockError::FencingUnproven { index, reason }) => {
                tracing::warn!(%index, %reason, "the lock index is gone; nothing to release");
                return self.forget_if_unproven(Ok(false)).await;
            }
            // a kind this version does not know holds no token of ours
            Err(LockError::KindMismatch { message, .. }) => {
                tracing::debug!(lock_id, %message, "nothing of ours to release");
                return Ok(false);
            }
            other => other?,
        };
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        expect_success("release", &answer)?;
        Ok(matches!(answer.body["result"].as_str(), Some("deleted" | "updated")))
    }

    /// The live lock, or `None` when there is none or it has expired.
    pub async fn get(&self, lock_id: &str) -> Result<Option<Lock>, LockError> {
        Ok(self
            .get_raw(lock_id)
            .await?
            .map(|raw| raw.into_lock(lock_id))
            .filter(|lock| !lock.is_expired_at(Utc::now())))
    }

    /// The stored document, expired or not, with its sequence number.
    /// `KindMismatch` when the key is a semaphore.
    pub async fn get_raw(&self, lock_id: &str) -> Result<Option<RawLock>, LockError> {
        let Some(stored) = self.read_source("get", lock_id).await? else {
            return Ok(None);
        };
        if let Some(limit) = semaphore_limit(&stored.source) {
            let hint = format!("read it with `lockctl semaphore get {lock_id}`");
            return Err(semaphore_key(lock_id, limit, &hint));
        }
        let document: LockDocument = serde_json::from_value(stored.source).map_err(|e| LockError::Malformed {
            lock_id: lock_id.to_string(),
            message: e.to_string(),
        })?;
        Ok(Some(RawLock {
            document,
            seq_no: stored.seq_no,
            primary_term: stored.primary_term,
            fencing_floor: stored.fencing_floor,
        }))
    }

    /// The stored `_source` of `lock_id` (either kind), with its version.
    pub(super) async fn read_source(
        &self,
        operation: &'static str,
        lock_id: &str,
    ) -> Result<Option<StoredSource>, LockError> {
        validate_lock_id(lock_id)?;
        let state = self.index_state().await?;
        let index = self.index();
        let answer = self
            .send(operation, || {
                self.inner.es.get(GetParts::IndexId(index, lock_id)).send()
            })
            .await?;
        if answer.index_missing() {
            return self.forget_if_unproven(Err(index_gone(&state))).await;
        }
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        expect_success(operation, &answer)?;
        if let Some(e) = unknown_kind(lock_id, &answer.body["_source"]) {
            return Err(e);
        }
        let (seq_no, primary_term) = answer_version(operation, &answer)?;
        Ok(Some(StoredSource {
            source: answer.body["_source"].clone(),
            seq_no,
            primary_term,
            fencing_floor: state.fencing_floor,
        }))
    }

    /// A scripted update of one lock document through the alias
    /// (`require_alias`: a deleted index is never re-created by a write).
    pub(super) async fn update(
        &self,
        operation: &'static str,
        lock_id: &str,
        body: &Value,
        if_version: Option<(u64, u64)>,
    ) -> Result<Answer, LockError> {
        let index = self.index();
        let answer = self
            .send(operation, || {
                let request = self
                    .inner
                    .es
                    .update(UpdateParts::IndexId(index, lock_id))
                    .require_alias(true)
                    ._source(&["true"]);
                let request = match if_version {
                    Some((seq_no, term)) => request.if_seq_no(seq_no as i64).if_primary_term(term as i64),
                    // concurrent first writes of one document conflict; the
                    // engine re-runs the script, which then sees the winner
                    None => request.retry_on_conflict(CONFLICT_RETRIES),
                };
                request.body(body.clone()).send()
            })
            .await?;
        if answer.index_missing() {
            let state = self.inner.state.lock().await.clone();
            let index = state.map_or_else(|| self.index().to_string(), |s| s.index);
            return self
                .forget_if_unproven(Err(LockError::FencingUnproven {
                    index,
                    reason: "the index (or its alias) was deleted".into(),
                }))
                .await;
        }
        if let Some((term, current)) = self.answered_by_replaced_primary(&answer).await {
            return Err(LockError::Deposed {
                operation,
                term,
                current,
            });
        }
        if let Some(message) = script_failure(&answer) {
            return Err(LockError::Malformed {
                lock_id: lock_id.to_string(),
                message,
            });
        }
        if let Some(e) = unknown_kind(lock_id, &answer.body["get"]["_source"]) {
            return Err(e);
        }
        Ok(answer)
    }

    /// For a write answered without every copy of the shard (`_shards`
    /// successful < total): the answer's primary term and the current one,
    /// when the cluster manager knows a newer primary than the one that
    /// answered (or cannot be asked). A primary cut off by a partition keeps
    /// answering with its own term; once the partition heals it can
    /// acknowledge a write its replicas refused and the new primary never
    /// had (seen in tests/search_partition.rs, every such answer counting
    /// only its own copy). A write acknowledged by every copy needs no check.
    async fn answered_by_replaced_primary(&self, answer: &Answer) -> Option<(u64, u64)> {
        let shards = &answer.body["_shards"];
        let (total, successful) = (shards["total"].as_u64()?, shards["successful"].as_u64()?);
        if successful >= total {
            return None;
        }
        let term = answer.body["_primary_term"].as_u64()?;
        let index = answer.body["_index"].as_str()?;
        let current = self.current_primary_term(index).await;
        match current {
            Some(current) if current <= term => None,
            other => Some((term, other.unwrap_or(0))),
        }
    }

    /// The primary term of `index`'s shard as the elected cluster manager has it.
    async fn current_primary_term(&self, index: &str) -> Option<u64> {
        let (metric, indices, filter) = (["metadata"], [index], ["metadata.indices.*.primary_terms"]);
        let cluster = self.inner.es.cluster();
        let answer = self
            .send("cluster state", || {
                cluster
                    .state(ClusterStateParts::MetricIndex(&metric, &indices))
                    .filter_path(&filter)
                    .send()
            })
            .await
            .ok()?;
        if !answer.status.is_success() {
            return None;
        }
        answer.body["metadata"]["indices"][index]["primary_terms"]["0"].as_u64()
    }

    pub(super) async fn send<F, Fut>(&self, operation: &'static str, request: F) -> Result<Answer, LockError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Response, elasticsearch::Error>>,
    {
        send_with_retry(operation, self.inner.backoff, request).await
    }
}

fn index_gone(state: &IndexState) -> LockError {
    LockError::FencingUnproven {
        index: state.index.clone(),
        reason: "the index (or its alias) was deleted".into(),
    }
}

/// The lock document in an update answer (`_source: true`).
fn answer_document(lock_id: &str, answer: &Answer) -> Result<LockDocument, LockError> {
    serde_json::from_value(answer.body["get"]["_source"].clone()).map_err(|e| LockError::Malformed {
        lock_id: lock_id.to_string(),
        message: e.to_string(),
    })
}

/// A stored lock document of either kind, as read.
pub(super) struct StoredSource {
    pub source: Value,
    pub seq_no: u64,
    pub primary_term: u64,
    /// The index's fencing floor (see [`IndexState`]).
    pub fencing_floor: u64,
}

/// Retries `attempt` with capped exponential backoff until it wins
/// (`Ok(Ok(_))`) or `wait` has passed (zero: one attempt); then the last
/// loss (`Ok(Err(_))`). Errors end it at once.
pub(super) async fn retry_until_granted<W, L, F, Fut>(wait: Duration, mut attempt: F) -> Result<Result<W, L>, LockError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Result<W, L>, LockError>>,
{
    let deadline = Instant::now() + wait;
    let mut delay = Duration::from_millis(50);
    loop {
        let lost = match attempt().await? {
            Ok(won) => return Ok(Ok(won)),
            Err(lost) => lost,
        };
        let now = Instant::now();
        if now >= deadline {
            return Ok(Err(lost));
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

pub(super) fn answer_version(operation: &'static str, answer: &Answer) -> Result<(u64, u64), LockError> {
    match (answer.body["_seq_no"].as_u64(), answer.body["_primary_term"].as_u64()) {
        (Some(seq_no), Some(term)) => Ok((seq_no, term)),
        _ => Err(LockError::Response {
            operation,
            message: "no _seq_no/_primary_term in the answer".into(),
        }),
    }
}
