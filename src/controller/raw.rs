//! A DistributedLock as the API server sends it, decoded without ever
//! failing on depth: its spec and status stay raw JSON (serde_json skips
//! nesting it does not build, without a recursion limit) and its metadata
//! leaves out `managedFields` (which mirror the object's own nesting). The
//! controller reads and writes requests through this type, so no object the
//! API server can hold stops the watch or a write.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use kube::Resource;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::crd::{DistributedLock, DistributedLockSpec, DistributedLockStatus};

/// A request whose spec and status are not decoded yet.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub metadata: ObjectMeta,
    pub spec: Option<Box<RawValue>>,
    pub status: Option<Box<RawValue>>,
}

/// ObjectMeta without managedFields (and other fields the controller never reads).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    deletion_grace_period_seconds: Option<i64>,
    labels: Option<BTreeMap<String, String>>,
    annotations: Option<BTreeMap<String, String>>,
    finalizers: Option<Vec<String>>,
    owner_references: Option<Vec<OwnerReference>>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(default)]
    metadata: Option<Meta>,
    #[serde(default)]
    spec: Option<Box<RawValue>>,
    #[serde(default)]
    status: Option<Box<RawValue>>,
}

impl<'de> Deserialize<'de> for RawRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(deserializer)?;
        let metadata = wire
            .metadata
            .map(|m| ObjectMeta {
                name: m.name,
                namespace: m.namespace,
                uid: m.uid,
                resource_version: m.resource_version,
                generation: m.generation,
                creation_timestamp: m.creation_timestamp,
                deletion_timestamp: m.deletion_timestamp,
                deletion_grace_period_seconds: m.deletion_grace_period_seconds,
                labels: m.labels,
                annotations: m.annotations,
                finalizers: m.finalizers,
                owner_references: m.owner_references,
                ..ObjectMeta::default()
            })
            .unwrap_or_default();
        Ok(RawRequest {
            metadata,
            spec: wire.spec,
            status: wire.status,
        })
    }
}

impl Resource for RawRequest {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        DistributedLock::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        DistributedLock::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        DistributedLock::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        DistributedLock::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl RawRequest {
    /// The request, or why it cannot be read (with a placeholder carrying
    /// only its metadata, enough to drop it from the cache).
    pub fn decode(self) -> Result<DistributedLock, (Box<DistributedLock>, String)> {
        let spec = self
            .spec
            .as_deref()
            .map(|raw| serde_json::from_str::<DistributedLockSpec>(raw.get()))
            .transpose();
        let status = self
            .status
            .as_deref()
            .map(|raw| serde_json::from_str::<DistributedLockStatus>(raw.get()))
            .transpose();
        let name = self.metadata.name.clone().unwrap_or_default();
        match (spec, status) {
            (Ok(Some(spec)), Ok(status)) => {
                let mut lock = DistributedLock::new(&name, spec);
                lock.metadata = self.metadata;
                lock.status = status;
                Ok(lock)
            }
            (spec, status) => {
                let why = match (spec, status) {
                    (Ok(None), _) => "it has no spec".to_string(),
                    (Err(e), _) => format!("spec: {e}"),
                    (_, Err(e)) => format!("status: {e}"),
                    _ => unreachable!("decodable requests are handled above"),
                };
                let mut placeholder = DistributedLock::new(&name, DistributedLockSpec::default());
                placeholder.metadata = self.metadata;
                Err((Box::new(placeholder), why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(depth: usize) -> String {
        format!("{}{{}}{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }

    #[test]
    fn any_depth_of_metadata_or_managed_fields_decodes() {
        let deep = nested(3000);
        let text = format!(
            r#"{{"apiVersion":"lockmanager.dev/v1alpha1","kind":"DistributedLock",
            "metadata":{{"name":"deep","namespace":"ns","uid":"u","resourceVersion":"7",
              "managedFields":[{{"manager":"kubectl","operation":"Update","fieldsType":"FieldsV1","fieldsV1":{deep}}}]}},
            "spec":{{"lockId":"k","metadata":{deep}}}}}"#
        );
        let list = format!(r#"{{"items":[{text}]}}"#);
        #[derive(Deserialize)]
        struct List {
            items: Vec<RawRequest>,
        }
        let list: List = serde_json::from_str(&list).expect("a deep object decodes");
        let lock = list
            .items
            .into_iter()
            .next()
            .unwrap()
            .decode()
            .expect("its spec decodes");
        assert_eq!(lock.spec.lock_id, "k");
        assert!(
            lock.spec.metadata.unwrap().to_value().is_err(),
            "too deep to use, said later"
        );
    }

    #[test]
    fn a_spec_out_of_bounds_comes_back_as_a_placeholder_with_the_reason() {
        let text = r#"{"metadata":{"name":"huge","namespace":"ns"},"spec":{"lockId":"k","priority":3000000000}}"#;
        let raw: RawRequest = serde_json::from_str(text).unwrap();
        let (placeholder, why) = raw.decode().unwrap_err();
        assert_eq!(placeholder.metadata.name.as_deref(), Some("huge"));
        assert!(why.contains("priority") || why.contains("3000000000"), "{why}");
    }
}
