//! The `DistributedLock` custom resource: a request for a lock, and its grant.
//! `lockctl crd` prints the CRD generated from these types; `crds/` holds it.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::crd::CustomResourceExt;
use kube::{CustomResource, KubeSchema};
use schemars::{Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::duration::{DURATION_PATTERN, parse_duration};

mod semaphore;
pub use semaphore::{
    MAX_PERMITS, Queueing, SEMAPHORE_FINALIZER, Semaphore, SemaphoreHolder, SemaphoreSpec, SemaphoreStatus,
};

/// Finalizer that keeps a request until its lock is released.
pub const FINALIZER: &str = "lockmanager.dev/release";
/// The annotation that asks for suspend gating of a Job: the lockId it needs.
pub const LOCK_ANNOTATION: &str = "lockmanager.dev/lock";
/// Field manager of everything the controller writes.
pub const FIELD_MANAGER: &str = "kube-lock-manager";
/// Lease length when `spec.ttl` is unset (Kibana's default).
pub use crate::lock::DEFAULT_TTL;

/// A request for a distributed lock. The controller grants it by acquiring
/// the lock document in the lock index, renews the lease while the holder
/// runs and releases it when the request is deleted or its holder finishes.
// clippy reads the repeated `printcolumn(type_ = ...)` keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "lockmanager.dev",
    version = "v1alpha1",
    kind = "DistributedLock",
    plural = "distributedlocks",
    singular = "distributedlock",
    shortname = "lock",
    shortname = "locks",
    shortname = "dlock",
    namespaced,
    status = "DistributedLockStatus",
    printcolumn(
        name = "Lock",
        type_ = "string",
        json_path = ".spec.lockId",
        description = "The lock requested"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Holder", type_ = "string", json_path = ".status.holder"),
    printcolumn(name = "Fencing", type_ = "integer", json_path = ".status.fencingToken"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(
        name = "Position",
        type_ = "integer",
        json_path = ".status.waitingPosition",
        priority = "1"
    ),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority", priority = "1"),
    printcolumn(name = "Scope", type_ = "string", json_path = ".spec.scope", priority = "1"),
    printcolumn(name = "Permits", type_ = "integer", json_path = ".spec.permits", priority = "1"),
    printcolumn(name = "Exclusive", type_ = "boolean", json_path = ".spec.exclusive", priority = "1")
)]
#[x_kube(
    validation = Rule::new("!(has(self.permits) && has(self.exclusive) && self.exclusive)").message("spec.permits cannot be combined with spec.exclusive: true (an exclusive request takes every permit)"),
    validation = Rule::new("has(self.permits) == has(oldSelf.permits) && (!has(self.permits) || self.permits == oldSelf.permits)").message("spec.permits is immutable"),
    validation = Rule::new("has(self.exclusive) == has(oldSelf.exclusive) && (!has(self.exclusive) || self.exclusive == oldSelf.exclusive)").message("spec.exclusive is immutable")
)]
#[serde(rename_all = "camelCase")]
pub struct DistributedLockSpec {
    /// Name of the lock. Requests with the same lockId (in the same namespace,
    /// or anywhere for scope Cluster) contend for one lock. 1..200 characters
    /// of A-Z a-z 0-9 . _ : -, not "." or "..". Immutable.
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9._:-]+$"))]
    #[x_kube(
        validation = Rule::new("self == oldSelf").message("spec.lockId is immutable"),
        validation = Rule::new("self != '.' && self != '..'").message("spec.lockId may not be '.' or '..'")
    )]
    pub lock_id: String,

    /// Namespace (default): the lock key is "<namespace>/<lockId>". Cluster:
    /// the key is "<lockId>", shared with every namespace, other clusters and
    /// clients outside Kubernetes using the same index. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.scope is immutable"))]
    pub scope: LockScope,

    /// Lease length, 1s..24h (default 30s). The lease is renewed every ttl/4
    /// while the lock is held; a holder that vanishes loses it after ttl.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1s') && duration(self) <= duration('24h')").message("spec.ttl must be between 1s and 24h"))]
    pub ttl: Option<String>,

    /// Free-form data stored with the lock document (never indexed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub metadata: Option<FreeForm>,

    /// Display text for who holds the lock; default: the holderRef, else the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub holder: Option<String>,

    /// Higher priority is granted first; equal priority: the oldest request first.
    /// A 32-bit integer (-2147483648..2147483647).
    #[serde(default)]
    #[schemars(range(min = i32::MIN, max = i32::MAX))]
    pub priority: i32,

    /// Give up waiting after this long (0s..8760h, e.g. 10m), counted from the
    /// request's creation: phase Failed, reason Timeout. Unset: wait forever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) <= duration('8760h')").message("spec.acquireTimeout must be at most 8760h"))]
    pub acquire_timeout: Option<String>,

    /// With a Semaphore on the key: how many of its permits this request
    /// takes, 1..10000 (default 1). Ignored on a plain mutex key. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub permits: Option<u32>,

    /// With a Semaphore on the key: take every permit (a writer of a
    /// read/write lock; requests without it are readers). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<bool>,

    /// A Job or Pod in this namespace whose life bounds the lock: when the Job
    /// completes or fails, or the Pod terminates or disappears, the lock is released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_ref: Option<HolderRef>,
}

/// Who shares a lock key.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum LockScope {
    /// The key is "<namespace>/<lockId>".
    #[default]
    Namespace,
    /// The key is "<lockId>", shared across namespaces and clusters.
    Cluster,
}

/// A workload in the request's namespace that holds the lock.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct HolderRef {
    /// Job or Pod.
    pub kind: HolderKind,
    /// Name of the Job or Pod.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Kinds a holderRef may point at.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum HolderKind {
    Job,
    Pod,
}

/// Where a request stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema)]
pub enum Phase {
    /// Waiting in the queue for the lock.
    #[default]
    Pending,
    /// Holds the lock (see token, fencingToken, expiresAt).
    Granted,
    /// Held the lock and gave it back.
    Released,
    /// Held the lock and its lease ran out before it was renewed.
    Expired,
    /// Held the lock until another owner took it.
    Lost,
    /// Will never get the lock (see the Granted condition's reason).
    Failed,
}

impl Phase {
    /// Released, Expired, Lost and Failed requests never acquire again.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Released | Phase::Expired | Phase::Lost | Phase::Failed)
    }
}

/// The grant (or the place in the queue) as the controller last saw it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DistributedLockStatus {
    /// Pending, Granted, Released, Expired, Lost or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The lock key in the index ("<namespace>/<lockId>" or "<lockId>").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_key: Option<String>,
    /// The lock token, while Granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Grows with every grant of this lock key; downstream systems can reject
    /// writes carrying a smaller one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    /// Who holds the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// When the lock was granted (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquired_at: Option<String>,
    /// When the lease runs out unless renewed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When the lease was last renewed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at: Option<String>,
    /// Place in line, recorded by the controller when it first saw the
    /// request (RFC 3339): the creation time of the request, or of the Job
    /// that a suspend-gated request was made for. Only the controller writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<String>,
    /// Tie-break within the same `queuedAt` second: the resourceVersion the
    /// request (or its gated Job) had when the controller first saw it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_sequence: Option<i64>,
    /// While Pending: place in this cluster's queue for the lock, 1 = next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_position: Option<i32>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Granted: whether the lock is held, with the reason (Acquired, Waiting,
    /// Released, Expired, Lost, Timeout, ScopeNotAllowed, IndexUnreachable...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Free-form JSON kept as the API server sent it: decoding it never fails,
/// however deeply it nests (a request whose metadata is too deep to use is
/// told so by the controller instead of breaking the watch).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FreeForm(Box<serde_json::value::RawValue>);

impl FreeForm {
    /// Free-form JSON from a value.
    pub fn from_value(value: &Value) -> Self {
        Self(serde_json::value::to_raw_value(value).unwrap_or_else(|_| Self::empty().0))
    }

    fn empty() -> Self {
        Self(serde_json::value::RawValue::from_string("{}".into()).expect("{} is JSON"))
    }

    /// The JSON as a value; `Err` when it nests too deeply to decode.
    pub fn to_value(&self) -> Result<Value, String> {
        serde_json::from_str(self.0.get()).map_err(|e| e.to_string())
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for FreeForm {
    /// The same JSON, whatever its formatting.
    fn eq(&self, other: &Self) -> bool {
        if self.0.get() == other.0.get() {
            return true;
        }
        match (self.to_value(), other.to_value()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

impl DistributedLockSpec {
    /// The lock key in the index for a request in `namespace`.
    pub fn lock_key(&self, namespace: &str) -> String {
        match self.scope {
            LockScope::Namespace => format!("{namespace}/{}", self.lock_id),
            LockScope::Cluster => self.lock_id.clone(),
        }
    }

    /// The lease length (spec.ttl or 30s). The API server has validated the format.
    pub fn ttl(&self) -> Result<Duration, String> {
        match &self.ttl {
            Some(text) => parse_duration(text),
            None => Ok(DEFAULT_TTL),
        }
    }

    /// Permits asked for (default 1).
    pub fn permits(&self) -> u32 {
        self.permits.unwrap_or(1)
    }

    /// Whether every permit is asked for.
    pub fn is_exclusive(&self) -> bool {
        self.exclusive.unwrap_or(false)
    }

    pub fn acquire_timeout(&self) -> Result<Option<Duration>, String> {
        self.acquire_timeout.as_deref().map(parse_duration).transpose()
    }
}

/// The CRDs `lockctl crd` prints: (file in `crds/`, the CRD).
pub fn crds() -> [(
    &'static str,
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
); 2] {
    [
        ("distributedlocks.yaml", DistributedLock::crd()),
        ("semaphores.yaml", Semaphore::crd()),
    ]
}

/// The DistributedLock CRD as YAML, the content of `crds/distributedlocks.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    crd_file(&DistributedLock::crd())
}

/// The Semaphore CRD as YAML, the content of `crds/semaphores.yaml`.
pub fn semaphore_crd_yaml() -> Result<String, serde_yaml::Error> {
    crd_file(&Semaphore::crd())
}

fn crd_file(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> Result<String, serde_yaml::Error> {
    Ok(format!(
        "# Generated by `lockctl crd` from src/crd/; do not edit.\n---\n{}",
        serde_yaml::to_string(crd)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::spec;

    #[test]
    fn lock_keys_follow_the_scope() {
        assert_eq!(spec("reindex", LockScope::Namespace).lock_key("batch"), "batch/reindex");
        assert_eq!(spec("reindex", LockScope::Cluster).lock_key("batch"), "reindex");
    }

    #[test]
    fn ttl_defaults_to_thirty_seconds() {
        assert_eq!(spec("a", LockScope::Namespace).ttl(), Ok(Duration::from_secs(30)));
    }

    #[test]
    fn committed_crds_match_the_rust_types() {
        let committed = include_str!("../../crds/distributedlocks.yaml");
        assert!(
            committed == crd_yaml().unwrap(),
            "crds/distributedlocks.yaml is stale: run `cargo run -q -- crd distributedlocks > crds/distributedlocks.yaml`"
        );
        let committed = include_str!("../../crds/semaphores.yaml");
        assert!(
            committed == semaphore_crd_yaml().unwrap(),
            "crds/semaphores.yaml is stale: run `cargo run -q -- crd semaphores > crds/semaphores.yaml`"
        );
    }

    #[test]
    fn crd_has_the_contracted_names_columns_and_validation() {
        let crd = serde_json::to_value(DistributedLock::crd()).unwrap();
        assert_eq!(crd["metadata"]["name"], "distributedlocks.lockmanager.dev");
        assert_eq!(
            crd["spec"]["names"]["shortNames"],
            serde_json::json!(["lock", "locks", "dlock"])
        );
        let version = &crd["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        let columns: Vec<_> = version["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c.get("priority").is_none())
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(columns, ["Lock", "Phase", "Holder", "Fencing", "Expires", "Age"]);
        let text = crd.to_string();
        assert!(text.contains("spec.lockId is immutable"));
        assert!(text.contains("spec.ttl must be between 1s and 24h"));
    }
}
