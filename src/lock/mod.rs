//! The lock engine: Kibana Lock Manager semantics on an Elasticsearch/OpenSearch
//! index, plus a fencing token that grows with every grant of a lock key.

mod assets;
mod client;
mod error;
mod extend;
pub mod ids;
pub mod lineage;
mod manager;
mod mappings;
mod model;
mod recovery;
pub mod scripts;
mod semaphore;
mod transport;
mod waitqueue;
mod with_lock;

pub use assets::{IndexAssets, IndexState};
pub use client::LockClient;
pub use error::{LockError, WithLockError};
pub use ids::{validate_lock_id, validate_lock_id_segment};
pub use manager::{Lease, LockManager};
pub use mappings::{lock_mappings, mappings_are_usable, missing_lock_fields};
pub use model::{
    AcquireRequest, DEFAULT_TTL, ExtendOutcome, Grant, Lock, LockDocument, RawLock, new_token, normalize_metadata,
};
pub use recovery::IndexStatus;
pub use semaphore::{MAX_PERMITS, PermitGrant, PermitHolder, PermitOutcome, PermitRequest, RetireOutcome, Semaphore};
pub use transport::TRANSIENT_RETRIES;
pub use waitqueue::{QueueDocument, WaitQueue, Waiter, queue_id};
pub use with_lock::{LockHandle, WithLockOptions};

/// An error and its causes on one line, for the single line `lockctl` prints.
pub fn error_line(error: &dyn std::error::Error) -> String {
    transport::error_chain(error)
}
