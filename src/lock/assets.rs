//! The lock index and its templates, created idempotently. Many processes may
//! run this at once: every step is a PUT that converges to the same state, and
//! "already exists" counts as success.

use std::time::Duration;

use elasticsearch::Elasticsearch;
use elasticsearch::cluster::ClusterPutComponentTemplateParts;
use elasticsearch::http::StatusCode;
use elasticsearch::indices::{
    IndicesCreateParts, IndicesDeleteParts, IndicesGetMappingParts, IndicesPutIndexTemplateParts,
};
use serde_json::{Value, json};

use super::client::{Answer, expect_success, send_with_retry};
use super::error::LockError;

/// Names of the index assets for one prefix.
#[derive(Clone, Debug)]
pub struct IndexAssets {
    es: Elasticsearch,
    prefix: String,
    index: String,
}

/// The mappings of a lock document: Kibana's fields plus ours, never dynamic.
pub fn lock_mappings() -> Value {
    json!({
        "dynamic": false,
        "properties": {
            "token": {"type": "keyword"},
            "createdAt": {"type": "date"},
            "expiresAt": {"type": "date"},
            "metadata": {"type": "object", "enabled": false},
            "holder": {"type": "keyword"},
            "fencingToken": {"type": "long"}
        }
    })
}

/// True when a mapping (the `mappings` object of an index) can hold locks.
pub fn mappings_are_usable(mappings: &Value) -> bool {
    let props = &mappings["properties"];
    props["token"]["type"] == "keyword" && props["expiresAt"]["type"] == "date"
}

impl IndexAssets {
    pub fn new(es: Elasticsearch, prefix: &str) -> Self {
        Self {
            es,
            prefix: prefix.to_string(),
            index: format!("{prefix}-000001"),
        }
    }

    pub fn index(&self) -> &str {
        &self.index
    }
    pub fn component_template(&self) -> String {
        format!("{}-mappings", self.prefix)
    }
    pub fn index_template(&self) -> String {
        format!("{}-template", self.prefix)
    }

    /// Creates the component template, the index template and the index; an
    /// index whose mappings cannot hold locks is deleted and recreated.
    #[tracing::instrument(skip(self), fields(index = %self.index))]
    pub async fn ensure(&self) -> Result<(), LockError> {
        let backoff = Duration::from_millis(100);
        let component = self.component_template();
        let answer = send_with_retry("setup", backoff, || async {
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
        expect_success("setup", &answer)?;

        let template = self.index_template();
        let pattern = format!("{}*", self.prefix);
        let answer = send_with_retry("setup", backoff, || async {
            self.es
                .indices()
                .put_index_template(IndicesPutIndexTemplateParts::Name(&template))
                .body(json!({
                    "index_patterns": [pattern],
                    "composed_of": [component],
                    "priority": 500,
                    "template": {
                        "settings": {
                            "number_of_shards": 1,
                            "auto_expand_replicas": "0-1",
                            "hidden": true
                        }
                    },
                    "_meta": {"managed_by": "kube-lock-manager"}
                }))
                .send()
                .await
        })
        .await?;
        expect_success("setup", &answer)?;

        match self.current_mappings().await? {
            Some(m) if mappings_are_usable(&m) => return Ok(()),
            Some(_) => {
                tracing::warn!(index = %self.index, "lock index has unusable mappings; recreating it");
                self.delete_index().await?;
            }
            None => {}
        }
        self.create_index().await?;
        match self.current_mappings().await? {
            Some(m) if mappings_are_usable(&m) => Ok(()),
            _ => Err(LockError::Response {
                operation: "setup",
                message: format!("index {} still lacks the lock mappings after creating it", self.index),
            }),
        }
    }

    /// The index's mappings, or `None` when the index does not exist.
    pub async fn current_mappings(&self) -> Result<Option<Value>, LockError> {
        let index = [self.index.as_str()];
        let answer = send_with_retry("setup", Duration::from_millis(100), || async {
            self.es
                .indices()
                .get_mapping(IndicesGetMappingParts::Index(&index))
                .send()
                .await
        })
        .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        expect_success("setup", &answer)?;
        Ok(Some(answer.body[&self.index]["mappings"].clone()))
    }

    async fn create_index(&self) -> Result<(), LockError> {
        // The index template supplies settings and mappings; they are repeated
        // here so the index is right even if someone changed the template.
        let answer = send_with_retry("setup", Duration::from_millis(100), || async {
            self.es
                .indices()
                .create(IndicesCreateParts::Index(&self.index))
                .body(json!({
                    "settings": {"number_of_shards": 1, "auto_expand_replicas": "0-1", "hidden": true},
                    "mappings": lock_mappings()
                }))
                .wait_for_active_shards("1")
                .send()
                .await
        })
        .await?;
        if already_exists(&answer) {
            return Ok(());
        }
        expect_success("setup", &answer)
    }

    async fn delete_index(&self) -> Result<(), LockError> {
        let index = [self.index.as_str()];
        let answer = send_with_retry("setup", Duration::from_millis(100), || async {
            self.es.indices().delete(IndicesDeleteParts::Index(&index)).send().await
        })
        .await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        expect_success("setup", &answer)
    }
}

fn already_exists(answer: &Answer) -> bool {
    answer.status == StatusCode::BAD_REQUEST
        && answer.body["error"]["type"]
            .as_str()
            .is_some_and(|t| t == "resource_already_exists_exception")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_mappings() {
        assert!(mappings_are_usable(&lock_mappings()));
        let text_token = json!({"properties": {"token": {"type": "text"}, "expiresAt": {"type": "date"}}});
        assert!(!mappings_are_usable(&text_token));
        let long_expiry = json!({"properties": {"token": {"type": "keyword"}, "expiresAt": {"type": "long"}}});
        assert!(!mappings_are_usable(&long_expiry));
        assert!(!mappings_are_usable(&json!({})));
    }
}
