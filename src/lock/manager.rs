//! [`Lease`] (renew a held lock until told to stop) and Kibana's
//! [`LockManager`] (one lock id, its token kept inside).

use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::client::LockClient;
use super::error::LockError;
use super::model::{ExtendOutcome, Lock};

/// A lease held while something runs: renewed every `ttl/4` by one task (so
/// never two extensions at once) until [`Lease::stop`] or until dropped.
pub struct Lease {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    lost: watch::Receiver<bool>,
    valid_until: watch::Receiver<std::time::SystemTime>,
}

impl Lease {
    /// Starts renewing `lock`.
    /// `granted_at` is when the acquire request was sent: the lease is safe
    /// to rely on until `granted_at + ttl` (the engine's expiry is later).
    /// The lock counts as lost when a renewal finds it expired or held by
    /// another token, and also when renewals keep failing (the engine
    /// unreachable, slow or read-only) until the lease is within `ttl/8` of
    /// running out: the holder must stop before someone else can be granted.
    pub fn start(client: LockClient, lock: Lock, ttl: Duration, granted_at: std::time::SystemTime) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let (lost_tx, lost) = watch::channel(false);
        let (valid_tx, valid_until) = watch::channel(granted_at + ttl);
        let period = (ttl / 4).max(Duration::from_millis(10));
        let margin = ttl / 8;
        let task = tokio::spawn(async move {
            let lose = |why: &str| {
                tracing::warn!(lock_id = %lock.lock_id, why, "lock was lost");
                let _ = lost_tx.send(true);
            };
            // how long until the lease must be given up, unless renewed
            let left = || {
                let cutoff = *valid_tx.borrow() - margin;
                cutoff.duration_since(std::time::SystemTime::now()).ok()
            };
            loop {
                let Some(wait) = left() else {
                    return lose("its lease ran out while it could not be renewed");
                };
                // renew every ttl/4, and sooner when the lease is short of
                // that (a grant whose answer came back slowly)
                tokio::select! {
                    _ = tokio::time::sleep(period.min(wait / 2)) => {}
                    _ = stopped.changed() => return,
                }
                let Some(deadline) = left() else {
                    return lose("its lease ran out while it could not be renewed");
                };
                let sent = std::time::SystemTime::now();
                let renewal = client.extend_lease(&lock.lock_id, &lock.token, ttl, Some(lock.fencing_token));
                match tokio::time::timeout(deadline, renewal).await {
                    Ok(Ok(ExtendOutcome::Extended)) => {
                        let _ = valid_tx.send(sent + ttl);
                    }
                    Ok(Ok(outcome)) => {
                        return lose(if outcome == ExtendOutcome::Expired {
                            "its lease ran out before it was renewed"
                        } else {
                            "another owner holds it now, or it was released"
                        });
                    }
                    // the index is gone or replaced: so is the lock
                    Ok(Err(e @ LockError::FencingUnproven { .. })) => {
                        return lose(&e.to_string());
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(lock_id = %lock.lock_id, error = %e, "could not extend the lock; will retry")
                    }
                    Err(_) => return lose("its lease ran out while a renewal was still unanswered"),
                }
            }
        });
        Self {
            stop,
            task,
            lost,
            valid_until,
        }
    }

    /// Until when the holder may rely on the lock: the send time of the last
    /// successful acquire or renewal plus the TTL.
    pub fn valid_until(&self) -> watch::Receiver<std::time::SystemTime> {
        self.valid_until.clone()
    }

    /// True once a renewal found the lock expired or held by another token.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A receiver that turns true when the lock is lost.
    pub fn lost_signal(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing and waits for an extension in flight to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Kibana's `LockManager`: one lock id, the token of the current acquisition
/// kept inside. Every acquisition uses a fresh token.
pub struct LockManager {
    client: LockClient,
    lock_id: String,
    held: Mutex<Option<Lock>>,
}

impl LockManager {
    /// A manager of `lock_id` that holds nothing yet.
    pub fn new(client: LockClient, lock_id: impl Into<String>) -> Self {
        Self {
            client,
            lock_id: lock_id.into(),
            held: Mutex::new(None),
        }
    }

    /// The lock id managed.
    pub fn lock_id(&self) -> &str {
        &self.lock_id
    }

    /// The token of the last successful acquisition.
    pub fn token(&self) -> Option<String> {
        self.held().map(|l| l.token)
    }

    /// The fencing token of the last successful acquisition.
    pub fn fencing_token(&self) -> Option<u64> {
        self.held().map(|l| l.fencing_token)
    }

    fn held(&self) -> Option<Lock> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_held(&self, lock: Option<Lock>) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = lock;
    }

    /// True when acquired (with a new token); false when another owner holds it.
    pub async fn acquire(&self, ttl: Duration, metadata: Value) -> Result<bool, LockError> {
        match self.client.acquire(&self.lock_id, ttl, metadata).await? {
            Some(lock) => {
                self.set_held(Some(lock));
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// True when this manager's token released the lock.
    pub async fn release(&self) -> Result<bool, LockError> {
        let Some(lock) = self.held() else { return Ok(false) };
        let released = self.client.release(&self.lock_id, &lock.token).await?;
        if released {
            self.set_held(None);
        }
        Ok(released)
    }

    /// True when this manager's token still held a live lease and it was
    /// extended (an expired lease is not revived).
    pub async fn extend_ttl(&self, ttl: Duration) -> Result<bool, LockError> {
        let Some(lock) = self.held() else { return Ok(false) };
        self.client
            .extend(&self.lock_id, &lock.token, ttl, Some(lock.fencing_token))
            .await
    }

    /// The live lock, whoever holds it.
    pub async fn get(&self) -> Result<Option<Lock>, LockError> {
        self.client.get(&self.lock_id).await
    }
}
