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
    #[error("invalid lock id {0:?}: use 1..512 characters of A-Z a-z 0-9 . _ : / -")]
    InvalidLockId(String),
    #[error("invalid metadata: {0}")]
    InvalidMetadata(String),
    #[error("invalid ttl {0:?}: must be between 1ms and 365 days")]
    InvalidTtl(Duration),
    #[error("search engine unreachable during {operation} after {attempts} attempts: {message}")]
    Unavailable {
        operation: &'static str,
        attempts: u32,
        message: String,
    },
    #[error("search engine refused {operation} (HTTP {status}): {reason}")]
    Engine {
        operation: &'static str,
        status: u16,
        reason: String,
    },
    #[error("unexpected answer from the search engine to {operation}: {message}")]
    Response { operation: &'static str, message: String },
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
            LockError::InvalidLockId(_) | LockError::InvalidMetadata(_) | LockError::InvalidTtl(_) => "invalid",
            LockError::Unavailable { .. } => "unavailable",
            LockError::Engine { status: 401 | 403, .. } => "unauthorized",
            LockError::Engine { .. } => "engine",
            LockError::Response { .. } => "response",
            LockError::Config(_) => "config",
        }
    }
}

/// The error of [`super::LockClient::with_lock`]: either the lock could not be
/// had, the engine failed, or the function itself failed.
#[derive(Debug, thiserror::Error)]
pub enum WithLockError<E> {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{0}")]
    Callback(E),
}

impl<E> WithLockError<E> {
    /// True when the function never ran because another owner holds the lock.
    pub fn is_acquisition_error(&self) -> bool {
        matches!(self, WithLockError::Lock(e) if e.is_acquisition_error())
    }
}
