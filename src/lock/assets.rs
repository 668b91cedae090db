//! The lock index and its templates. Setup is idempotent and safe from many
//! processes at once; it never deletes an index (it may hold live locks):
//! missing fields are added in place, a wrong field type is refused.
//!
//! Layout for prefix `p`: lock documents live in `p-000001` (or a later
//! generation made by `lockctl index recover`), always addressed through the
//! alias `p` with `require_alias`, so a write never re-creates a deleted
//! index. The index template `p-template` matches exactly the current
//! concrete index (so overlapping prefixes never collide) and records its
//! UUID (see [`super::lineage`]).

use std::time::Duration;

use elasticsearch::Elasticsearch;
use elasticsearch::cluster::ClusterPutComponentTemplateParts;
use elasticsearch::http::StatusCode;
use elasticsearch::indices::{
    IndicesCreateParts, IndicesGetIndexTemplateParts, IndicesGetParts, IndicesGetSettingsParts,
    IndicesPutIndexTemplateParts, IndicesPutMappingParts,
};
use elasticsearch::params::ExpandWildcards;
use serde_json::{Value, json};

use super::error::LockError;
use super::lineage::{Concrete, Lineage, SetupStep, generation, index_name, next_setup_step};
use super::mappings::{lock_mappings, missing_lock_fields};
use super::transport::{Answer, expect_success, send_with_retry};

/// The index assets of one prefix: templates, alias and concrete index.
#[derive(Clone, Debug)]
pub struct IndexAssets {
    es: Elasticsearch,
    prefix: String,
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

/// What `lockctl index status` shows.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexStatus {
    pub alias: String,
    pub index: Option<String>,
    pub uuid: Option<String>,
    pub fencing_floor: Option<u64>,
    pub recorded_index: Option<String>,
    pub recorded_uuid: Option<String>,
    pub grants_allowed: bool,
    pub problem: Option<String>,
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
    pub fn component_template(&self) -> String {
        format!("{}-mappings", self.prefix)
    }
    pub fn index_template(&self) -> String {
        format!("{}-template", self.prefix)
    }

    /// Sets up the templates and the index, or refuses: with
    /// [`LockError::FencingUnproven`] when the recorded index is gone or was
    /// replaced, with [`LockError::Index`] when its mappings are wrong.
    #[tracing::instrument(skip(self), fields(alias = %self.prefix))]
    pub async fn ensure(&self) -> Result<IndexState, LockError> {
        self.put_component_template().await?;
        let (lineage, template) = self.lineage().await?;
        let mut current = self.resolve(lineage.as_ref()).await?;
        match next_setup_step(lineage.as_ref(), current.as_ref()) {
            SetupStep::Refuse { index, reason } => return Err(LockError::FencingUnproven { index, reason }),
            SetupStep::UseRecorded | SetupStep::Adopt => {}
            SetupStep::CreateFirst => {
                // create=true: never overwrite a lineage another process just recorded
                self.put_index_template(None, &index_name(&self.prefix, 1), true)
                    .await?;
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
        };
        if lineage.as_ref() != Some(&recorded) || !template_is_current(&template, &current.index) {
            self.put_index_template(Some(&recorded), &current.index, false).await?;
        }
        Ok(IndexState {
            index: current.index.clone(),
            uuid: current.uuid.clone(),
            fencing_floor: current.fencing_floor(),
        })
    }

    /// Where grants would go and whether they are allowed.
    pub async fn status(&self) -> Result<IndexStatus, LockError> {
        let (lineage, _) = self.lineage().await?;
        let current = self.resolve(lineage.as_ref()).await?;
        let problem = match next_setup_step(lineage.as_ref(), current.as_ref()) {
            SetupStep::Refuse { reason, .. } => Some(reason),
            SetupStep::CreateFirst => Some("not set up yet (the first acquire sets it up)".into()),
            SetupStep::Adopt | SetupStep::UseRecorded => {
                current.as_ref().and_then(|c| missing_lock_fields(&c.mappings).err())
            }
        };
        Ok(IndexStatus {
            alias: self.prefix.clone(),
            index: current.as_ref().map(|c| c.index.clone()),
            uuid: current.as_ref().map(|c| c.uuid.clone()),
            fencing_floor: current.as_ref().map(Concrete::fencing_floor),
            recorded_index: lineage.as_ref().map(|l| l.index.clone()),
            recorded_uuid: lineage.as_ref().map(|l| l.uuid.clone()),
            grants_allowed: problem.is_none(),
            problem,
        })
    }

    /// After the lock index was deleted, re-created or restored: creates the
    /// next generation of the index whose fencing tokens all exceed `floor`,
    /// points the alias at it and records it. `floor` must be at least the
    /// highest fencing token ever handed out. Refused while grants are allowed.
    pub async fn recover(&self, floor: u64) -> Result<IndexState, LockError> {
        self.put_component_template().await?;
        let (lineage, _) = self.lineage().await?;
        let current = self.resolve(lineage.as_ref()).await?;
        if next_setup_step(lineage.as_ref(), current.as_ref()) == SetupStep::UseRecorded {
            let c = current.as_ref().map(|c| c.index.clone()).unwrap_or_default();
            return Err(LockError::Index {
                index: c,
                message: "grants are allowed on it; there is nothing to recover".into(),
            });
        }
        let existing = self.generations().await?;
        let next = existing
            .iter()
            .chain(lineage.iter().map(|l| &l.index))
            .filter_map(|name| generation(&self.prefix, name))
            .max()
            .unwrap_or(0)
            + 1;
        let name = index_name(&self.prefix, next);
        self.put_index_template(lineage.as_ref(), &name, false).await?;
        self.create_index(&name, floor, false).await?;
        let holders: Vec<String> = existing.into_iter().filter(|i| *i != name).collect();
        self.point_alias(&holders, &name).await?;
        let Some(created) = self.concrete(&name).await? else {
            return Err(LockError::Response {
                operation: "recover",
                message: format!("index {name} missing right after creating it"),
            });
        };
        let recorded = Lineage {
            index: name.clone(),
            uuid: created.uuid.clone(),
        };
        self.put_index_template(Some(&recorded), &name, false).await?;
        tracing::warn!(index = %name, floor, "lock index recovered; fencing tokens continue above the floor");
        Ok(IndexState {
            index: name,
            uuid: created.uuid.clone(),
            fencing_floor: created.fencing_floor(),
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

    async fn send<F, Fut>(&self, operation: &'static str, request: F) -> Result<Answer, LockError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<elasticsearch::http::response::Response, elasticsearch::Error>>,
    {
        send_with_retry(operation, Duration::from_millis(100), request).await
    }

    /// The recorded lineage and the index template as stored.
    async fn lineage(&self) -> Result<(Option<Lineage>, Value), LockError> {
        let name = self.index_template();
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .get_index_template(IndicesGetIndexTemplateParts::Name(&name))
                    .send()
                    .await
            })
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok((None, Value::Null));
        }
        expect_success("setup", &answer)?;
        let template = answer.body["index_templates"][0]["index_template"].clone();
        let meta = &template["_meta"];
        let lineage = match (meta["lockIndex"].as_str(), meta["lockIndexUuid"].as_str()) {
            (Some(index), Some(uuid)) => Some(Lineage {
                index: index.into(),
                uuid: uuid.into(),
            }),
            _ => None,
        };
        Ok((lineage, template))
    }

    /// The index behind the alias; else the recorded one or the first
    /// generation, if it exists (an older version's index has no alias).
    async fn resolve(&self, lineage: Option<&Lineage>) -> Result<Option<Concrete>, LockError> {
        if let Some(found) = self.concrete(&self.prefix).await? {
            return Ok(Some(found));
        }
        let fallback = lineage.map_or_else(|| index_name(&self.prefix, 1), |l| l.index.clone());
        self.concrete(&fallback).await
    }

    /// One concrete index by name or alias, or `None`.
    async fn concrete(&self, name: &str) -> Result<Option<Concrete>, LockError> {
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

    /// Names of every concrete index of this prefix.
    async fn generations(&self) -> Result<Vec<String>, LockError> {
        let pattern = [format!("{}-*", self.prefix)];
        let pattern: Vec<&str> = pattern.iter().map(String::as_str).collect();
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .get_settings(IndicesGetSettingsParts::IndexName(&pattern, &["index.uuid"]))
                    .expand_wildcards(&[ExpandWildcards::All])
                    .send()
                    .await
            })
            .await?;
        expect_success("setup", &answer)?;
        Ok(answer
            .body
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, _)| name.clone())
            .filter(|name| generation(&self.prefix, name).is_some())
            .collect())
    }

    async fn put_component_template(&self) -> Result<(), LockError> {
        let component = self.component_template();
        let answer = self
            .send("setup", || async {
                self.es
                    .cluster()
                    .put_component_template(ClusterPutComponentTemplateParts::Name(&component))
                    .body(json!({
                        "template": {"mappings": lock_mappings()},
                        "_meta": {"managed_by": "kube-lock-manager"}
                    }))
                    .send()
                    .await
            })
            .await?;
        expect_success("setup", &answer)
    }

    /// The index template: exactly `index` (no pattern another prefix could
    /// match), recording `lineage`. `create_only` leaves an existing one alone.
    async fn put_index_template(
        &self,
        lineage: Option<&Lineage>,
        index: &str,
        create_only: bool,
    ) -> Result<(), LockError> {
        let template = self.index_template();
        let mut meta = json!({"managed_by": "kube-lock-manager"});
        if let Some(l) = lineage {
            meta["lockIndex"] = json!(l.index);
            meta["lockIndexUuid"] = json!(l.uuid);
        }
        let body = json!({
            "index_patterns": [index],
            "composed_of": [self.component_template()],
            "priority": 500,
            "template": {"settings": index_settings()},
            "_meta": meta
        });
        let answer = self
            .send("setup", || async {
                self.es
                    .indices()
                    .put_index_template(IndicesPutIndexTemplateParts::Name(&template))
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

    async fn create_index(&self, name: &str, floor: u64, with_alias: bool) -> Result<(), LockError> {
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
            return Ok(());
        }
        expect_success("setup", &answer)
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
    async fn point_alias(&self, from: &[String], to: &str) -> Result<(), LockError> {
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

fn index_settings() -> Value {
    json!({"number_of_shards": 1, "auto_expand_replicas": "0-1", "hidden": true})
}

fn template_is_current(template: &Value, index: &str) -> bool {
    template["index_patterns"] == json!([index]) && template["priority"] == 500
}
