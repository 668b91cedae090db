//! The `Semaphore` custom resource: N permits for one lock key, with a limit
//! that can be changed at any time. Requests of that key then take
//! `spec.permits` (or, exclusive, every permit) instead of the whole key.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::LockScope;

/// The most permits a semaphore has and a request takes.
pub const MAX_PERMITS: u32 = crate::lock::MAX_PERMITS;

/// Finalizer that closes a semaphore's key in the index before it goes.
pub const SEMAPHORE_FINALIZER: &str = "lockmanager.dev/semaphore";

/// A limit of N holders for one lock key. Its name is the lockId it governs
/// (unless spec.lockId says otherwise).
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "lockmanager.dev",
    version = "v1alpha1",
    kind = "Semaphore",
    plural = "semaphores",
    singular = "semaphore",
    shortname = "sem",
    namespaced,
    status = "SemaphoreStatus",
    printcolumn(name = "Limit", type_ = "integer", json_path = ".spec.limit"),
    printcolumn(name = "Held", type_ = "integer", json_path = ".status.held"),
    printcolumn(name = "Waiting", type_ = "integer", json_path = ".status.waiting"),
    printcolumn(name = "Queueing", type_ = "string", json_path = ".spec.queueing"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Lock", type_ = "string", json_path = ".status.lockKey", priority = "1"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    )
)]
#[x_kube(
    validation = Rule::new("has(self.lockId) == has(oldSelf.lockId) && (!has(self.lockId) || self.lockId == oldSelf.lockId)").message("spec.lockId is immutable")
)]
#[serde(rename_all = "camelCase")]
pub struct SemaphoreSpec {
    /// The lock id it governs; default: the object's name. Set it when the id
    /// is not a valid object name (upper case, ':', '_'). 1..200 characters of
    /// A-Z a-z 0-9 . _ : -, not "." or "..". Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9._:-]+$"))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("spec.lockId may not be '.' or '..'"))]
    pub lock_id: Option<String>,

    /// How many permits the key has, 0..10000. Editable at any time: a raised
    /// limit grants waiters at once; a lowered one lets holders finish and
    /// grants nobody until the key is under it; 0 closes the key.
    #[schemars(range(min = 0, max = 10000))]
    pub limit: u32,

    /// Namespace (default): the key is "<namespace>/<lockId>". Cluster: the
    /// key is "<lockId>" (same allow-list as requests). Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.scope is immutable"))]
    pub scope: LockScope,

    /// StrictFIFO (default): only the head of the queue may take permits.
    /// BestEffortFIFO: a later request that fits may pass a head that does
    /// not, until the head has waited a minute (then it blocks the others).
    #[serde(default)]
    pub queueing: Queueing,
}

/// How waiters of a semaphore are served.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Queueing {
    /// Only the head of the queue (priority, then age) may take permits.
    #[default]
    StrictFIFO,
    /// A request that fits may go ahead of a head that does not fit.
    BestEffortFIFO,
}

impl Queueing {
    pub fn as_str(self) -> &'static str {
        match self {
            Queueing::StrictFIFO => "StrictFIFO",
            Queueing::BestEffortFIFO => "BestEffortFIFO",
        }
    }
}

/// The semaphore as the controller last saw it in the lock index.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SemaphoreStatus {
    /// The lock key it governs ("<namespace>/<lockId>" or "<lockId>").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_key: Option<String>,
    /// The limit in force in the lock index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// Permits in use (an exclusive holder counts as the whole limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<i64>,
    /// Requests of this cluster waiting for permits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<i64>,
    /// Who holds permits, oldest grant first (clients outside this cluster too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<SemaphoreHolder>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready: whether the limit is in force, with the reason (InForce,
    /// Conflict, MutexInUse, ScopeNotAllowed, Draining, IndexUnreachable).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One holder of a semaphore's permits.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SemaphoreHolder {
    /// The DistributedLock holding them ("<namespace>/<name>"), when it is one of this cluster's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Display text of the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    pub permits: i64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
    pub fencing_token: i64,
    /// RFC 3339.
    pub expires_at: String,
}

impl SemaphoreSpec {
    /// The lock id: spec.lockId, else the object's name.
    pub fn lock_id<'a>(&'a self, name: &'a str) -> &'a str {
        self.lock_id.as_deref().unwrap_or(name)
    }

    /// The lock key it governs for an object `name` in `namespace`.
    pub fn lock_key(&self, namespace: &str, name: &str) -> String {
        match self.scope {
            LockScope::Namespace => format!("{namespace}/{}", self.lock_id(name)),
            LockScope::Cluster => self.lock_id(name).to_string(),
        }
    }
}
