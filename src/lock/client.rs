use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use elasticsearch::http::StatusCode;
use elasticsearch::http::response::Response;
use elasticsearch::{Elasticsearch, GetParts, UpdateParts};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::assets::IndexAssets;
use super::error::LockError;
use super::scripts;
use crate::engine::EngineArgs;

/// Kibana's default lease length.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Retries of a transient failure (503, timeout, connection reset) before giving up.
pub const TRANSIENT_RETRIES: u32 = 3;
/// How often the engine re-runs a script whose document changed under it.
const CONFLICT_RETRIES: i64 = 10;

/// A lock document as stored in the index (Kibana-compatible field names).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LockDocument {
    pub token: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    #[serde(default)]
    pub metadata: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<u64>,
}

/// A lock as callers see it: the document plus its key and fencing token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lock {
    pub lock_id: String,
    pub token: String,
    pub fencing_token: u64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub metadata: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

impl Lock {
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// What to ask for when acquiring.
#[derive(Clone, Debug)]
pub struct AcquireRequest {
    pub lock_id: String,
    /// The token to hold the lock with. A new random one for a new grant; the
    /// current one to renew an expired-but-untaken lease of one's own.
    pub token: String,
    pub ttl: Duration,
    pub metadata: Value,
    pub holder: Option<String>,
    /// The fencing token of the grant being renewed, when re-acquiring with the same token.
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

/// A fresh random lock token.
pub fn new_token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Lock keys become document ids: 1..512 characters of `[A-Za-z0-9._:/-]`.
pub fn validate_lock_id(lock_id: &str) -> Result<(), LockError> {
    let ok = !lock_id.is_empty()
        && lock_id.len() <= 512
        && lock_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'/' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(LockError::InvalidLockId(lock_id.to_string()))
    }
}

fn validate_ttl(ttl: Duration) -> Result<u64, LockError> {
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

/// The lock index: acquire, release, extend and read lock documents. Cheap to
/// clone; index assets are set up once per client (and so once per process
/// when the client is shared).
#[derive(Clone)]
pub struct LockClient {
    inner: Arc<Inner>,
}

struct Inner {
    es: Elasticsearch,
    assets: IndexAssets,
    ready: OnceCell<()>,
    backoff: Duration,
}

/// The outcome of one engine request after retries.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl LockClient {
    pub fn new(es: Elasticsearch, index_prefix: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                assets: IndexAssets::new(es.clone(), index_prefix),
                es,
                ready: OnceCell::new(),
                backoff: Duration::from_millis(100),
            }),
        }
    }

    /// Builds a client from command-line style settings.
    pub fn from_args(args: &EngineArgs) -> Result<Self, LockError> {
        Ok(Self::new(args.client()?, &args.index_prefix))
    }

    /// The concrete index that holds the lock documents.
    pub fn index(&self) -> &str {
        self.inner.assets.index()
    }

    pub fn assets(&self) -> &IndexAssets {
        &self.inner.assets
    }

    pub fn elasticsearch(&self) -> &Elasticsearch {
        &self.inner.es
    }

    /// Makes sure the templates and the index exist, once per client.
    pub async fn ensure_ready(&self) -> Result<(), LockError> {
        self.inner
            .ready
            .get_or_try_init(|| async { self.inner.assets.ensure().await })
            .await
            .map(|_| ())
    }

    /// Acquires `lock_id` with a fresh token. `None` when someone else holds it.
    pub async fn acquire(&self, lock_id: &str, ttl: Duration, metadata: Value) -> Result<Option<Lock>, LockError> {
        self.try_acquire(&AcquireRequest::new(lock_id, ttl, metadata)).await
    }

    /// One atomic scripted upsert: takes the lock if it is free, expired or
    /// already ours. `None` when another token holds a live lease.
    #[tracing::instrument(skip(self, req), fields(lock_id = %req.lock_id))]
    pub async fn try_acquire(&self, req: &AcquireRequest) -> Result<Option<Lock>, LockError> {
        validate_lock_id(&req.lock_id)?;
        let ttl_ms = validate_ttl(req.ttl)?;
        let metadata = normalize_metadata(req.metadata.clone())?;
        self.ensure_ready().await?;
        let body = json!({
            "scripted_upsert": true,
            "upsert": {},
            "script": {
                "lang": "painless",
                "source": scripts::ACQUIRE,
                "params": {
                    "token": req.token,
                    "ttl": ttl_ms,
                    "metadata": metadata,
                    "holder": req.holder,
                    "fencingToken": req.fencing_token,
                }
            }
        });
        let index = self.index();
        let answer = self
            .send("acquire", || {
                self.inner
                    .es
                    .update(UpdateParts::IndexId(index, &req.lock_id))
                    // concurrent first writes of one document conflict; the
                    // engine re-runs the script, which then sees the winner
                    .retry_on_conflict(CONFLICT_RETRIES)
                    ._source(&["true"])
                    .body(body.clone())
                    .send()
            })
            .await?;
        expect_success("acquire", &answer)?;
        match answer.body["result"].as_str() {
            Some("created" | "updated") => {
                let seq_no = answer.body["_seq_no"].as_u64();
                let source = answer.body["get"]["_source"].clone();
                let doc: LockDocument = serde_json::from_value(source).map_err(|e| LockError::Response {
                    operation: "acquire",
                    message: format!("lock document: {e}"),
                })?;
                let fencing_token = doc
                    .fencing_token
                    .or(seq_no.map(implied_fencing))
                    .ok_or(LockError::Response {
                        operation: "acquire",
                        message: "no _seq_no in the answer".into(),
                    })?;
                Ok(Some(to_lock(&req.lock_id, doc, fencing_token)))
            }
            Some("noop") => Ok(None),
            other => Err(LockError::Response {
                operation: "acquire",
                message: format!("result {other:?}"),
            }),
        }
    }

    /// Token-fenced delete. `false` when the lock is missing or held by another token.
    #[tracing::instrument(skip(self, token))]
    pub async fn release(&self, lock_id: &str, token: &str) -> Result<bool, LockError> {
        validate_lock_id(lock_id)?;
        self.ensure_ready().await?;
        let body = json!({
            "script": {"lang": "painless", "source": scripts::RELEASE, "params": {"token": token}}
        });
        let index = self.index();
        let answer = self
            .send("release", || {
                self.inner
                    .es
                    .update(UpdateParts::IndexId(index, lock_id))
                    .retry_on_conflict(CONFLICT_RETRIES)
                    .body(body.clone())
                    .send()
            })
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        expect_success("release", &answer)?;
        Ok(answer.body["result"] == "deleted")
    }

    /// Sets `expiresAt = now + ttl` if `token` still holds the lock.
    /// `fencing_token` is the grant's, when the caller knows it (it keeps
    /// `get` reporting the grant's token after the extension).
    #[tracing::instrument(skip(self, token))]
    pub async fn extend(
        &self,
        lock_id: &str,
        token: &str,
        ttl: Duration,
        fencing_token: Option<u64>,
    ) -> Result<bool, LockError> {
        validate_lock_id(lock_id)?;
        let ttl_ms = validate_ttl(ttl)?;
        self.ensure_ready().await?;
        if let Some(fencing) = fencing_token {
            return self.extend_once(lock_id, token, ttl_ms, fencing, None).await;
        }
        // The caller does not know the fencing token: read it, then extend only
        // if nothing wrote the document in between (compare-and-swap).
        for _ in 0..5 {
            let Some(raw) = self.get_raw(lock_id).await? else {
                return Ok(false);
            };
            if raw.document.token != token {
                return Ok(false);
            }
            let fencing = raw.document.fencing_token.unwrap_or(implied_fencing(raw.seq_no));
            match self
                .extend_once(lock_id, token, ttl_ms, fencing, Some((raw.seq_no, raw.primary_term)))
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
        fencing: u64,
        if_version: Option<(u64, u64)>,
    ) -> Result<bool, LockError> {
        let body = json!({
            "script": {
                "lang": "painless",
                "source": scripts::EXTEND,
                "params": {"token": token, "ttl": ttl_ms, "fencingToken": fencing}
            }
        });
        let index = self.index();
        let answer = self
            .send("extend", || {
                let mut request = self.inner.es.update(UpdateParts::IndexId(index, lock_id));
                request = match if_version {
                    Some((seq_no, primary_term)) => {
                        request.if_seq_no(seq_no as i64).if_primary_term(primary_term as i64)
                    }
                    None => request.retry_on_conflict(CONFLICT_RETRIES),
                };
                request.body(body.clone()).send()
            })
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(false);
        }
        expect_success("extend", &answer)?;
        Ok(answer.body["result"] == "updated")
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
    pub async fn get_raw(&self, lock_id: &str) -> Result<Option<RawLock>, LockError> {
        validate_lock_id(lock_id)?;
        self.ensure_ready().await?;
        let index = self.index();
        let answer = self
            .send("get", || self.inner.es.get(GetParts::IndexId(index, lock_id)).send())
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        expect_success("get", &answer)?;
        let response = |message: String| LockError::Response {
            operation: "get",
            message,
        };
        let document: LockDocument = serde_json::from_value(answer.body["_source"].clone())
            .map_err(|e| response(format!("lock document {lock_id:?}: {e}")))?;
        let seq_no = answer.body["_seq_no"]
            .as_u64()
            .ok_or_else(|| response("no _seq_no".into()))?;
        let primary_term = answer.body["_primary_term"]
            .as_u64()
            .ok_or_else(|| response("no _primary_term".into()))?;
        Ok(Some(RawLock {
            document,
            seq_no,
            primary_term,
        }))
    }

    /// Acquires, retrying with capped exponential backoff until `wait` has passed.
    pub async fn acquire_with_wait(&self, req: &AcquireRequest, wait: Duration) -> Result<Option<Lock>, LockError> {
        let deadline = Instant::now() + wait;
        let mut delay = Duration::from_millis(50);
        loop {
            if let Some(lock) = self.try_acquire(req).await? {
                return Ok(Some(lock));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    async fn send<F, Fut>(&self, operation: &'static str, request: F) -> Result<Answer, LockError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Response, elasticsearch::Error>>,
    {
        send_with_retry(operation, self.inner.backoff, request).await
    }
}

/// Sends one request, retrying transient failures (transport errors and
/// HTTP 429/502/503/504) up to [`TRANSIENT_RETRIES`] times.
pub(crate) async fn send_with_retry<F, Fut>(
    operation: &'static str,
    backoff: Duration,
    request: F,
) -> Result<Answer, LockError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Response, elasticsearch::Error>>,
{
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let message = match request().await {
                Ok(response) => {
                    let status = response.status_code();
                    match response.text().await {
                        Ok(text) if is_transient_status(status) => format!("HTTP {status}: {}", short(&text)),
                        Ok(text) => {
                            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                            return Ok(Answer { status, body });
                        }
                        Err(e) => error_chain(&e),
                    }
                }
                Err(e) => error_chain(&e),
            };
            if attempt > TRANSIENT_RETRIES {
                return Err(LockError::Unavailable {
                    operation,
                    attempts: attempt,
                    message,
                });
            }
            tracing::debug!(operation, attempt, %message, "transient search engine failure, retrying");
            tokio::time::sleep(backoff * 2u32.pow(attempt - 1)).await;
        }
    }
}

/// A stored lock document with the version the engine gave it.
#[derive(Clone, Debug)]
pub struct RawLock {
    pub document: LockDocument,
    pub seq_no: u64,
    pub primary_term: u64,
}

impl RawLock {
    pub fn into_lock(self, lock_id: &str) -> Lock {
        let fencing = self.document.fencing_token.unwrap_or(implied_fencing(self.seq_no));
        to_lock(lock_id, self.document, fencing)
    }
}

/// The fencing token of a grant whose document was last written at `seq_no`
/// (sequence numbers start at 0; fencing tokens at 1).
fn implied_fencing(seq_no: u64) -> u64 {
    seq_no + 1
}

fn to_lock(lock_id: &str, doc: LockDocument, fencing_token: u64) -> Lock {
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

fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

fn short(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() > 300 {
        format!("{}…", text.chars().take(300).collect::<String>())
    } else {
        text.to_string()
    }
}

/// The error and its causes on one line ("error sending request: connection refused").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Turns a non-2xx answer into an error that names the engine's reason.
pub(crate) fn expect_success(operation: &'static str, answer: &Answer) -> Result<(), LockError> {
    if answer.status.is_success() {
        return Ok(());
    }
    Err(LockError::Engine {
        operation,
        status: answer.status.as_u16(),
        reason: engine_reason(&answer.body),
    })
}

fn engine_reason(body: &Value) -> String {
    let error = &body["error"];
    let root = &error["root_cause"][0];
    let pick = |v: &Value| {
        let kind = v["type"].as_str().unwrap_or_default();
        let reason = v["reason"].as_str().unwrap_or_default();
        (!kind.is_empty() || !reason.is_empty()).then(|| format!("{kind}: {reason}"))
    };
    pick(error)
        .or_else(|| pick(root))
        .or_else(|| error.as_str().map(str::to_string))
        .unwrap_or_else(|| short(&body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_ids() {
        for ok in ["reindex", "batch/reindex", "a.b_c:d-e", &"x".repeat(512)] {
            assert!(validate_lock_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "ä", "a?b", "a#b", &"x".repeat(513)] {
            assert!(validate_lock_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metadata_must_be_an_object() {
        assert_eq!(normalize_metadata(Value::Null).unwrap(), json!({}));
        assert!(normalize_metadata(json!({"a": 1})).is_ok());
        let err = normalize_metadata(json!([1])).unwrap_err();
        assert!(err.to_string().contains("an array"), "{err}");
    }

    #[test]
    fn engine_reason_names_the_exception() {
        let body = json!({"error": {"type": "version_conflict_engine_exception", "reason": "boom"}, "status": 409});
        assert_eq!(engine_reason(&body), "version_conflict_engine_exception: boom");
        assert_eq!(engine_reason(&json!("plain")), "\"plain\"");
    }

    #[test]
    fn ttl_bounds() {
        assert!(validate_ttl(Duration::ZERO).is_err());
        assert_eq!(validate_ttl(Duration::from_secs(30)).unwrap(), 30_000);
    }
}
