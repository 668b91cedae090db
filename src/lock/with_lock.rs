//! [`LockClient::with_lock`]: run a function while holding a lock, renewing
//! it, and release it afterwards — also when the function fails, panics or
//! its future is dropped.

use std::future::Future;
use std::ops::Deref;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::client::LockClient;
use super::error::{LockError, WithLockError};
use super::manager::Lease;
use super::model::{AcquireRequest, DEFAULT_TTL, Lock};

/// Options of [`LockClient::with_lock`].
#[derive(Clone, Debug)]
pub struct WithLockOptions {
    /// Lease length; renewed every `ttl/4`.
    pub ttl: Duration,
    /// A JSON object (or null) stored with the lock.
    pub metadata: Value,
    /// How long to keep retrying while another owner holds the lock (zero: try once).
    pub wait: Duration,
}

impl Default for WithLockOptions {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            metadata: Value::Null,
            wait: Duration::ZERO,
        }
    }
}

/// What the function of [`LockClient::with_lock`] gets: the lock (it derefs
/// to [`Lock`]) and word of its loss.
#[derive(Clone, Debug)]
pub struct LockHandle {
    lock: Lock,
    lost: watch::Receiver<bool>,
}

impl LockHandle {
    /// The lock held.
    pub fn lock(&self) -> &Lock {
        &self.lock
    }

    /// True once a renewal found the lease expired or the lock held by
    /// another token: the function should stop relying on it.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// A receiver that turns true when the lock is lost.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }
}

impl Deref for LockHandle {
    type Target = Lock;
    fn deref(&self) -> &Lock {
        &self.lock
    }
}

/// Releases the lock when dropped without [`ReleaseOnDrop::release`] (a panic
/// or a dropped future): the release is spawned on the current runtime.
struct ReleaseOnDrop {
    client: LockClient,
    lock: Lock,
    lease: Option<Lease>,
    released: bool,
}

impl ReleaseOnDrop {
    async fn release(mut self) {
        if let Some(lease) = self.lease.take() {
            lease.stop().await;
        }
        release(&self.client, &self.lock).await;
        self.released = true;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        drop(self.lease.take()); // stops renewing
        let (client, lock) = (self.client.clone(), self.lock.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { release(&client, &lock).await });
            }
            Err(_) => {
                tracing::warn!(lock_id = %lock.lock_id, "no runtime to release the lock on; it expires by itself")
            }
        }
    }
}

async fn release(client: &LockClient, lock: &Lock) {
    if let Err(e) = client.release(&lock.lock_id, &lock.token).await {
        tracing::warn!(lock_id = %lock.lock_id, error = %e, "could not release the lock; it expires by itself");
    }
}

impl LockClient {
    /// Runs `f` while holding `lock_id`: acquires (or fails with the
    /// acquisition error), renews every `ttl/4` while `f` runs, and always
    /// releases afterwards — when `f` fails, panics, or this future is
    /// dropped too. Returns `f`'s result. `f` gets a [`LockHandle`] that
    /// tells it when the lock was lost.
    pub async fn with_lock<T, E, F, Fut>(
        &self,
        lock_id: &str,
        options: WithLockOptions,
        f: F,
    ) -> Result<T, WithLockError<E>>
    where
        F: FnOnce(LockHandle) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let request = AcquireRequest::new(lock_id, options.ttl, options.metadata);
        let Some(grant) = self.acquire_timed(&request, options.wait).await? else {
            return Err(LockError::AcquisitionFailed {
                lock_id: lock_id.to_string(),
            }
            .into());
        };
        let lease = Lease::start(self.clone(), grant.lock.clone(), options.ttl, grant.sent_at);
        let handle = LockHandle {
            lock: grant.lock.clone(),
            lost: lease.lost_signal(),
        };
        let guard = ReleaseOnDrop {
            client: self.clone(),
            lock: grant.lock,
            lease: Some(lease),
            released: false,
        };
        let result = f(handle).await;
        guard.release().await;
        result.map_err(WithLockError::Callback)
    }
}
