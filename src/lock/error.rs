use std::time::Duration;

use crate::engine::ConfigError;

/// Errors of the lock engine.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock is held by someone else (only `with_lock` and waiting acquires
    /// turn "not acquired" into an error). Tell it apart with
    /// [`LockError::is_acquisition_error`].
    #[error("could not acquire lock {lock_id:?}: it is held by another owner")]
    AcquisitionFailed { lock_id: String },
    /// The id breaks the rule of [`super::validate_lock_id`].
    #[error(
        "invalid lock id {0:?}: use 1..512 characters of A-Z a-z 0-9 . _ : / - (not \".\" or \"..\", nor such a /-separated part)"
    )]
    InvalidLockId(String),
    /// Metadata that is not a JSON object.
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    /// A semaphore limit or a permit count out of range.
    #[error("{0}")]
    InvalidPermits(String),
    /// A lease length outside 1 ms ..= 365 days.
    #[error("invalid ttl {0:?}: must be between 1ms and 365 days")]
    InvalidTtl(Duration),
    /// Transient failures (HTTP 429/502/503/504, timeouts, resets) outlasted the retries.
    #[error("search engine unreachable during {operation} after {attempts} attempts: {message}")]
    Unavailable {
        operation: &'static str,
        attempts: u32,
        message: String,
    },
    /// A write was answered by a primary the cluster had already replaced
    /// (a node cut off by a partition answers late with its own, older
    /// primary term): the write may be lost, so it is not relied on.
    #[error(
        "search engine answered {operation} from a replaced primary (term {term}, current {current}): its outcome is unknown; retry"
    )]
    Deposed {
        operation: &'static str,
        term: u64,
        /// The current primary term as the cluster manager has it (0: it could not be asked).
        current: u64,
    },
    /// The engine answered with an error status; `reason` is its own.
    #[error("search engine refused {operation} (HTTP {status}): {reason}")]
    Engine {
        operation: &'static str,
        status: u16,
        reason: String,
    },
    /// The engine's answer could not be understood.
    #[error("unexpected answer from the search engine to {operation}: {message}")]
    Response { operation: &'static str, message: String },
    /// The lock index cannot prove that fencing tokens only grow (it was
    /// deleted, re-created or restored from a snapshot): no lock is granted
    /// until an admin runs `lockctl index recover --fencing-floor N`.
    #[error(
        "refusing to grant locks: fencing tokens of lock index {index} may repeat ({reason}); an admin must run `lockctl index recover --fencing-floor N` with N at least the highest fencing token ever handed out"
    )]
    FencingUnproven { index: String, reason: String },
    /// The lock index exists but cannot be used as it is (e.g. a field mapped
    /// with the wrong type); it is left untouched.
    #[error("lock index {index}: {message}")]
    Index { index: String, message: String },
    /// The key is used as the other kind (a mutex call on a semaphore key, or
    /// a semaphore call on a key a live mutex holds); the message says which.
    #[error("lock {lock_id:?}: {message}")]
    KindMismatch { lock_id: String, message: String },
    /// A permit request for a key that has no semaphore.
    #[error("lock {lock_id:?} has no semaphore: create it first (lockctl semaphore set {lock_id} --limit N)")]
    NoSemaphore { lock_id: String },
    /// A lock document this version cannot use: edited by hand into a wrong
    /// shape (a script failed on it, or it does not parse). Nothing is
    /// granted on it, and nothing else is hurt, until it is fixed or deleted.
    #[error(
        "lock document {lock_id:?} has a shape this version cannot use ({message}); nothing is granted on it until it is fixed or deleted"
    )]
    Malformed { lock_id: String, message: String },
    /// The lock index refuses writes (`index.blocks.write`/`read_only`, or
    /// the disk flood-stage watermark's read-only-allow-delete block): no
    /// lock can be granted, renewed or released until it is writable again.
    #[error("lock index is read-only, {operation} refused: {reason}; {hint}")]
    ReadOnly {
        operation: &'static str,
        reason: String,
        hint: &'static str,
    },
    /// The connection settings are malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl LockError {
    /// True when the lock could not be acquired because another owner holds it.
    pub fn is_acquisition_error(&self) -> bool {
        matches!(self, LockError::AcquisitionFailed { .. })
    }

    /// A bounded label for metrics and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            LockError::AcquisitionFailed { .. } => "held",
            LockError::InvalidLockId(_)
            | LockError::InvalidMetadata(_)
            | LockError::InvalidTtl(_)
            | LockError::InvalidPermits(_) => "invalid",
            LockError::Unavailable { .. } | LockError::Deposed { .. } => "unavailable",
            LockError::Engine { status: 401 | 403, .. } => "unauthorized",
            LockError::Engine { .. } => "engine",
            LockError::Response { .. } => "response",
            LockError::FencingUnproven { .. } => "fencing",
            LockError::Index { .. } => "index",
            LockError::Config(_) => "config",
            LockError::KindMismatch { .. } | LockError::NoSemaphore { .. } => "kind",
            LockError::Malformed { .. } => "document",
            LockError::ReadOnly { .. } => "read_only",
        }
    }
}

/// The error of [`super::LockClient::with_lock`]: either the lock could not be
/// had, the engine failed, or the function itself failed.
#[derive(Debug, thiserror::Error)]
pub enum WithLockError<E> {
    /// Acquiring, or the engine, failed; the function did not run (or its
    /// lock could not be had).
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The function ran and returned this error.
    #[error("{0}")]
    Callback(E),
}

impl<E> WithLockError<E> {
    /// True when the function never ran because another owner holds the lock.
    pub fn is_acquisition_error(&self) -> bool {
        matches!(self, WithLockError::Lock(e) if e.is_acquisition_error())
    }
}
