//! The lock index and its templates. Setup is idempotent and safe from many
//! processes at once; it never deletes an index (it may hold live locks):
//! missing fields are added in place, a wrong field type is refused.
//!
//! Layout for prefix `p`: lock documents live in `p-000001` (or a later
//! generation made by `lockctl index recover`), always addressed through the
//! alias `p` with `require_alias`, so a write never re-creates a deleted
//! index. The component template `p-mappings` holds the mappings and records
//! the UUID of the index setup created (see [`super::lineage`]); the index
//! template `p-template` matches exactly the current concrete index, so
//! overlapping prefixes never collide.

use std::time::Duration;

use elasticsearch::Elasticsearch;
use elasticsearch::cluster::{ClusterGetComponentTemplateParts, ClusterPutComponentTemplateParts};
use elasticsearch::http::StatusCode;
use elasticsearch::indices::{
    IndicesCreateParts, IndicesGetParts, IndicesGetSettingsParts, IndicesPutIndexTemplateParts, IndicesPutMappingParts,
};
use elasticsearch::params::ExpandWildcards;
use serde_json::{Value, json};

use super::error::LockError;
use super::lineage::{Concrete, Lineage, SetupStep, index_name, next_setup_step};
use super::mappings::{lock_mappings, missing_lock_fields};
use super::transport::{Answer, expect_success, send_with_retry};

/// The index assets of one prefix: templates, alias and concrete index.
#[derive(Clone, Debug)]
pub struct IndexAssets {
    pub(super) es: Elasticsearch,
    pub(super) prefix: String,
}

/// The index grants go to, as verified by setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexState {
    /// The concrete index behind the alias.
    pub index: String,
    /// Its UUID (changes when an index is re-created or restored).
    pub uuid: String,
    /// Added to every fencing token: tokens of this index are all above it.
    pub fencing_floor: u64,
}

impl IndexAssets {
    /// The assets of `prefix` (index `<prefix>-000001`, alias `<prefix>`).
    pub fn new(es: Elasticsearch, prefix: &str) -> Self {
        Self {
            es,
            prefix: prefix.to_string(),
        }
    }

    /// The name every lock request addresses: an alias of the concrete index.
    pub fn index(&self) -> &str {
        &self.prefix
    }
    /// The alias of the concrete lock index (same as [`Self::index`]).
    pub fn alias(&self) -> &str {
        &self.prefix
    }
    /// The component template: the mappings and the recorded lineage.
    pub fn component_template(&self) -> String {
        format!("{}-mappings", self.prefix)
    }
    /// The index template: settings for exactly the current concrete index.
    pub fn index_template(&self) -> String {
        format!("{}-template", self.prefix)
    }

    /// Sets up the templates and the index, or refuses: with
    /// [`LockError::FencingUnproven`] when the recorded index is gone or was
    /// replaced, with [`LockError::Index`] when its mappings are wrong.
    #[tracing::instrument(skip(self), fields(alias = %self.prefix))]
    pub async fn ensure(&self) -> Result<IndexState, LockError> {
        let (lineage, component) = self.lineage().await?;
        let mut current = self.resolve(lineage.as_ref()).await?;
        match next_setup_step(lineage.as_ref(), current.as_ref()) {
            SetupStep::Refuse { index, reason } => return Err(LockError::FencingUnproven { index, reason }),
            SetupStep::UseRecorded | SetupStep::Adopt => {}
            SetupStep::CreateFirst => {
                // create-only: never overwrite a lineage another process just recorded
                self.put_component_template(None, true).await?;
                self.put_index_template(&index_name(&self.prefix, 1)).await?;
                self.create_index(&index_name(&self.prefix, 1), 0, true).await?;
                current = self.resolve(None).await?;
            }
        }
        let Some(current) = current else {
            return Err(LockError::Response {
                operation: "setup",
                message: format!(
                    "lock index {} missing right after creating it",
                    index_name(&self.prefix, 1)
                ),
            });
        };
        self.repair_mappings(&current).await?;
        if !current.has_alias {
            self.point_alias(&[], &current.index).await?;
        }
        let recorded = Lineage {
            index: current.index.clone(),
            uuid: current.uuid.clone(),
            fencing_floor: current.fencing_floor(),
        };
        if lineage.as_ref() != Some(&recorded) || component["_meta"]["mappingsVersion"] != MAPPINGS_VERSION {
            self.put_component_template(Some(&recorded), false).await?;
        }
        self.put_index_template(&current.index).await?;
        Ok(IndexState {
            index: current.index.clone(),
            uuid: current.uuid.clone(),
            fencing_floor: current.fencing_floor(),
        })
    }

    /// Fails with [`LockError::FencingUnproven`] unless the alias still
    /// points at the index `state` was set up with.
    pub async fn verify(&self, state: &IndexState) -> Result<(), LockError> {
        let alias = [self.prefix.as_str()];
        let answer = self
            .send("verify", || async {
                self.es
                    .indices()
                    .get_settings(IndicesGetSettingsParts::IndexName(&alias, &["index.uuid"]))
                    .send()
                    .await
            })
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Err(LockError::FencingUnproven {
                index: state.index.clone(),
                reason: "the index was deleted".into(),
            });
        }
        expect_success("verify", &answer)?;
        let uuid = answer.body[&state.index]["settings"]["index"]["uuid"].as_str();
        if uuid == Some(state.uuid.as_str()) {
            return Ok(());
        }
        Err(LockError::FencingUnproven {
            index: state.index.clone(),
            reason: format!(
                "the alias now leads to another index (UUID {:?}, set up with {}): re-created or restored from a snapshot",
                uuid, state.uuid
            ),
        })
    }

    /// The mappings of the index behind the alias (or of `<prefix>-000001`),
    /// or `None` when there is none.
    pub async fn current_mappings(&self) -> Result<Option<Value>, LockError> {
        Ok(self.resolve(None).await?.map(|c| c.mappings))
    }

    pub(super) async fn send<F, Fut>(&self, operation: &'static str, request: F) -> Result<Answer, LockError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<elasticsearch::http::response::Response, elasticsearch::Error>>,
    {
        send_with_retry(operation, Duration::from_millis(100), request).await
    }

    /// The recorded lineage and the component template as stored.
    pub(crate) async fn lineage(&self) -> Result<(Option<Lineage>, Value), LockError> {
        let name = self.component_template();
        let names = [name.as_str()];
        let answer = self
            .send("setup", || async {
                self.es
                    .cluster()
                    .get_component_template(ClusterGetComponentTemplateParts::Name(&names))
                    .send()
                    .await
            })
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok((None, Value::Null));
        }
        expect_success("setup", &answer)?;
        let template = answer.body["component_templates"][0]["component_template"].clone();
        let meta = &template["_meta"];
        let lineage = match (meta["lockIndex"].as_str(), meta["lockIndexUuid"].as_str()) {
            (Some(index), Some(uuid)) => Some(Lineage {
                index: index.into(),
                uuid: uuid.into(),
                fencing_floor: meta["lockIndexFencingFloor"].as_u64().unwrap_or(0),
            }),
            _ => None,
        };
        Ok((lineage, template))
    }

    /// The index behind the alias; else the recorded one or the first
    /// generation, if it exists (an older version's index has no alias).
    pub(super) async fn resolve(&self, lineage: Option<&Lineage>) -> Result<Option<Concrete>, LockError> {
        if let Some(found) = self.concrete(&self.prefix).await? {
            return Ok(Some(found));
        }
        let fallback = lineage.map_or_else(|| index_name(&self.prefix, 1), |l| l.index.clone());
        self.concrete(&fallback).await
    }

    /// One concrete index by name or alias, or `None`.
    pub(super) async fn concrete(&self, name: &str) -> Result<Option<Concrete>, LockError> {
        let names = [name];
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .get(IndicesGetParts::Index(&names))
                    .expand_wildcards(&[ExpandWildcards::All])
                    .send()
                    .await
            })
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        expect_success("setup", &answer)?;
        let Some(indices) = answer.body.as_object().filter(|m| m.len() == 1) else {
            return Err(LockError::Index {
                index: name.to_string(),
                message: "the lock alias must lead to exactly one index".into(),
            });
        };
        let Some((index, body)) = indices.iter().next() else {
            return Ok(None);
        };
        if index == &self.prefix {
            return Err(LockError::Index {
                index: index.clone(),
                message: "an index has the name of the lock alias; rename it or choose another --index-prefix".into(),
            });
        }
        Ok(Some(Concrete {
            index: index.clone(),
            uuid: body["settings"]["index"]["uuid"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            mappings: body["mappings"].clone(),
            has_alias: body["aliases"].get(&self.prefix).is_some(),
        }))
    }

    /// The mappings, and the lineage when known. `create_only` leaves an
    /// existing one alone.
    pub(crate) async fn put_component_template(
        &self,
        lineage: Option<&Lineage>,
        create_only: bool,
    ) -> Result<(), LockError> {
        let component = self.component_template();
        let mut meta = json!({"managed_by": "kube-lock-manager", "mappingsVersion": MAPPINGS_VERSION});
        if let Some(l) = lineage {
            meta["lockIndex"] = json!(l.index);
            meta["lockIndexUuid"] = json!(l.uuid);
            meta["lockIndexFencingFloor"] = json!(l.fencing_floor);
        }
        let body = json!({"template": {"mappings": lock_mappings()}, "_meta": meta});
        let answer = self
            .send("setup", || async {
                self.es
                    .cluster()
                    .put_component_template(ClusterPutComponentTemplateParts::Name(&component))
                    .create(create_only)
                    .body(body.clone())
                    .send()
                    .await
            })
            .await?;
        if create_only && answer.status == StatusCode::BAD_REQUEST {
            return Ok(()); // it exists already
        }
        expect_success("setup", &answer)
    }

    /// The index template: exactly `index`, so no other prefix's template
    /// can match it. An older version's overlapping `<other>*` template of
    /// the same priority makes the engine refuse it; that is only logged:
    /// the index is created with explicit settings and mappings anyway.
    pub(crate) async fn put_index_template(&self, index: &str) -> Result<(), LockError> {
        let template = self.index_template();
        let body = json!({
            "index_patterns": [index],
            "composed_of": [self.component_template()],
            "priority": 500,
            "template": {"settings": index_settings()},
            "_meta": {"managed_by": "kube-lock-manager"}
        });
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .put_index_template(IndicesPutIndexTemplateParts::Name(&template))
                    .body(body.clone())
                    .send()
                    .await
            })
            .await?;
        if answer.status == StatusCode::BAD_REQUEST {
            let reason = answer.body["error"]["reason"].as_str().unwrap_or_default();
            if reason.contains("same priority") {
                tracing::warn!(
                    template,
                    reason,
                    "index template not updated: another template overlaps it"
                );
                return Ok(());
            }
        }
        expect_success("setup", &answer)
    }

    /// Creates `name` with this floor (an index that exists already is fine).
    pub(super) async fn create_index(&self, name: &str, floor: u64, with_alias: bool) -> Result<(), LockError> {
        self.create_index_once(name, floor, with_alias).await.map(|_| ())
    }

    /// Creates `name` with this floor; `false` when it exists already (someone
    /// else created it: a concurrent recovery).
    pub(super) async fn create_new_index(&self, name: &str, floor: u64) -> Result<bool, LockError> {
        self.create_index_once(name, floor, false).await
    }

    async fn create_index_once(&self, name: &str, floor: u64, with_alias: bool) -> Result<bool, LockError> {
        let mut mappings = lock_mappings();
        mappings["_meta"] = json!({"fencingFloor": floor, "managed_by": "kube-lock-manager"});
        let mut body = json!({"settings": index_settings(), "mappings": mappings});
        if with_alias {
            body["aliases"] = json!({ self.prefix.clone(): {} });
        }
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .create(IndicesCreateParts::Index(name))
                    .body(body.clone())
                    .wait_for_active_shards("1")
                    .send()
                    .await
            })
            .await?;
        if answer.error_type() == Some("resource_already_exists_exception") {
            return Ok(false);
        }
        expect_success("setup", &answer).map(|_| true)
    }

    /// Adds fields the index lacks; refuses (untouched) when one has the wrong type.
    async fn repair_mappings(&self, current: &Concrete) -> Result<(), LockError> {
        let missing = missing_lock_fields(&current.mappings).map_err(|message| LockError::Index {
            index: current.index.clone(),
            message,
        })?;
        if missing.is_empty() {
            return Ok(());
        }
        tracing::warn!(index = %current.index, fields = ?missing.keys().collect::<Vec<_>>(), "adding missing lock fields to the index mappings");
        let index = [current.index.as_str()];
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .put_mapping(IndicesPutMappingParts::Index(&index))
                    .body(json!({"properties": missing}))
                    .send()
                    .await
            })
            .await?;
        expect_success("setup", &answer).map_err(|e| LockError::Index {
            index: current.index.clone(),
            message: format!("cannot add the missing lock fields: {e}"),
        })
    }

    /// Moves the alias from `from` to `to` in one atomic step.
    pub(super) async fn point_alias(&self, from: &[String], to: &str) -> Result<(), LockError> {
        let mut actions: Vec<Value> = from
            .iter()
            .map(|index| json!({"remove": {"index": index, "alias": self.prefix}}))
            .collect();
        actions.push(json!({"add": {"index": to, "alias": self.prefix}}));
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .update_aliases()
                    .body(json!({ "actions": actions }))
                    .send()
                    .await
            })
            .await?;
        if answer.status == StatusCode::NOT_FOUND && !from.is_empty() {
            // some `from` index no longer had the alias: just add it
            return Box::pin(self.point_alias(&[], to)).await;
        }
        expect_success("setup", &answer)
    }
}

/// One shard (one `_seq_no` sequence per index, which fencing tokens rely on)
/// with a copy on each of up to three nodes: on a cluster of three, any one
/// node may go and every acknowledged write still has two copies (OpenSearch
/// and Elasticsearch acknowledge a write once every in-sync copy has it, and
/// promote only an in-sync copy); on one node there are no replicas, so
/// nothing waits for a copy that cannot exist.
fn index_settings() -> Value {
    json!({"number_of_shards": 1, "auto_expand_replicas": "0-2", "hidden": true})
}

/// Bumped when [`lock_mappings`] change, so setup re-writes the component template.
const MAPPINGS_VERSION: u64 = 1;
