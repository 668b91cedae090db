//! Errors of one reconcile, their bounded categories (metric labels, event
//! reasons) and the one backoff table both controllers use.

use std::time::Duration;

use crate::lock::LockError;

/// Errors of one reconcile (of a DistributedLock or of a gated Job).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("lock index: {0}")]
    Lock(#[source] LockError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Invalid(String),
    /// The object changed since the copy this reconcile decided from; the
    /// newer copy is on its way.
    #[error("the request changed meanwhile; deciding again on the newer copy")]
    Stale,
    /// A gated request deleted with its Job: the Job's Pods still run, so the
    /// lock is kept until they are gone (the finalizer stays meanwhile).
    #[error("its Job is gone but its Pods still run; keeping the lock until they finish")]
    HolderStillRunning,
    /// A Semaphore being deleted waits for the holders of its permits.
    #[error("{0}")]
    Draining(String),
}

/// What kind of failure an error is: a bounded label for metrics and the key
/// of the backoff table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// The Kubernetes API refused or failed a request.
    Kube,
    /// A write decided on a stale copy was refused (compare-and-swap).
    Conflict,
    /// Not a failure: the request waits for something to finish before it can go.
    Waiting,
    /// The finalizer helper failed outside apply/cleanup.
    Finalizer,
    /// The search engine could not be reached (after retries).
    Unavailable,
    /// The search engine answered with an error.
    Engine,
    /// The search engine answered something we cannot read.
    Response,
    /// The search engine refused our credentials.
    Unauthorized,
    /// The lock is held by another owner.
    Held,
    /// Fencing tokens could not be proven to grow (lock index deleted or restored).
    Fencing,
    /// The lock index exists but is unusable as it is (e.g. a wrong mapping).
    Index,
    /// Bad input: an id, a ttl, a request the controller cannot act on.
    Invalid,
    /// The engine settings are unusable.
    Config,
    /// The key is used as the other kind (mutex vs semaphore, or a kind
    /// this version does not know).
    Kind,
    /// A lock document in a shape this version cannot use (edited by hand).
    Document,
    /// The lock index refuses writes (a write block, the disk flood stage).
    ReadOnly,
}

impl Category {
    /// Every category, for tests and dashboards.
    pub const ALL: [Category; 16] = [
        Category::Kube,
        Category::Conflict,
        Category::Waiting,
        Category::Finalizer,
        Category::Unavailable,
        Category::Engine,
        Category::Response,
        Category::Unauthorized,
        Category::Held,
        Category::Fencing,
        Category::Index,
        Category::Invalid,
        Category::Config,
        Category::Kind,
        Category::Document,
        Category::ReadOnly,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Category::Kube => "kube",
            Category::Conflict => "conflict",
            Category::Waiting => "waiting",
            Category::Finalizer => "finalizer",
            Category::Unavailable => "unavailable",
            Category::Engine => "engine",
            Category::Response => "response",
            Category::Unauthorized => "unauthorized",
            Category::Held => "held",
            Category::Fencing => "fencing",
            Category::Index => "index",
            Category::Invalid => "invalid",
            Category::Config => "config",
            Category::Kind => "kind",
            Category::Document => "document",
            Category::ReadOnly => "read_only",
        }
    }

    /// How long to wait before retrying a reconcile that failed this way.
    pub fn backoff(self) -> Duration {
        match self {
            // a stale cache catches up within moments
            Category::Conflict => Duration::from_millis(200),
            Category::Waiting => Duration::from_secs(1),
            Category::Kube | Category::Finalizer => Duration::from_millis(500),
            // the engine may come back any moment; its client already retried 3 times
            Category::Unavailable | Category::Engine => Duration::from_secs(2),
            Category::Held => Duration::from_secs(1),
            // needs a person: look again now and then, and stay visible
            Category::Unauthorized
            | Category::Fencing
            | Category::Index
            | Category::Response
            | Category::Config
            | Category::Kind
            | Category::Document => Duration::from_secs(10),
            // lifted by an admin or by freed disk: notice it soon
            Category::ReadOnly => Duration::from_secs(3),
            Category::Invalid => Duration::from_secs(300),
        }
    }

    /// The category of a lock engine error.
    pub fn of_lock_error(error: &LockError) -> Category {
        match error {
            LockError::AcquisitionFailed { .. } => Category::Held,
            LockError::InvalidLockId(_)
            | LockError::InvalidMetadata(_)
            | LockError::InvalidTtl(_)
            | LockError::InvalidPermits(_) => Category::Invalid,
            LockError::Unavailable { .. } | LockError::Deposed { .. } => Category::Unavailable,
            LockError::Engine { status: 401 | 403, .. } => Category::Unauthorized,
            LockError::Engine { .. } => Category::Engine,
            LockError::Response { .. } => Category::Response,
            LockError::FencingUnproven { .. } => Category::Fencing,
            LockError::Index { .. } => Category::Index,
            LockError::Config(_) => Category::Config,
            LockError::KindMismatch { .. } | LockError::NoSemaphore { .. } => Category::Kind,
            LockError::Malformed { .. } => Category::Document,
            LockError::ReadOnly { .. } => Category::ReadOnly,
        }
    }
}

impl Error {
    /// The bounded category of this error.
    pub fn category(&self) -> Category {
        match self {
            Error::Kube(_) => Category::Kube,
            Error::Lock(e) => Category::of_lock_error(e),
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.category(),
                _ => Category::Finalizer,
            },
            Error::Invalid(_) => Category::Invalid,
            Error::Stale => Category::Conflict,
            Error::HolderStillRunning | Error::Draining(_) => Category::Waiting,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_has_a_distinct_label_and_a_bounded_backoff() {
        let labels: std::collections::HashSet<_> = Category::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels.len(), Category::ALL.len());
        for c in Category::ALL {
            assert!(c.backoff() >= Duration::from_millis(100) && c.backoff() <= Duration::from_secs(300));
        }
    }

    #[test]
    fn lock_errors_keep_their_category() {
        let unavailable = LockError::Unavailable {
            operation: "acquire",
            attempts: 4,
            message: "connection refused".into(),
        };
        assert_eq!(Category::of_lock_error(&unavailable), Category::Unavailable);
        let denied = LockError::Engine {
            operation: "acquire",
            status: 403,
            reason: "no".into(),
        };
        assert_eq!(Category::of_lock_error(&denied), Category::Unauthorized);
        let fencing = LockError::FencingUnproven {
            index: "kube-locks".into(),
            reason: "deleted".into(),
        };
        assert_eq!(Category::of_lock_error(&fencing), Category::Fencing);
        for error in [unavailable, denied, fencing] {
            assert_eq!(Category::of_lock_error(&error).as_str(), error.category());
        }
    }
}
