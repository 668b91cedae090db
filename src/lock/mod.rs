//! The lock engine: Kibana Lock Manager semantics on an Elasticsearch/OpenSearch
//! index, plus a fencing token that grows with every grant of a lock key.

mod assets;
mod client;
mod error;
mod manager;
pub mod scripts;

pub use assets::{IndexAssets, lock_mappings, mappings_are_usable};
pub use client::{
    AcquireRequest, DEFAULT_TTL, Lock, LockClient, LockDocument, RawLock, TRANSIENT_RETRIES, new_token,
    normalize_metadata, validate_lock_id,
};
pub use error::{LockError, WithLockError};
pub use manager::{Lease, LockManager, WithLockOptions};

/// An error and its causes on one line, for the single line `lockctl` prints.
pub fn error_line(error: &dyn std::error::Error) -> String {
    client::error_chain(error)
}
