//! `lockctl index status` and `lockctl index recover`: how an admin sees
//! whether locks are granted, and restores granting after the lock index was
//! deleted, re-created or restored from a snapshot.
//!
//! Recovery: find the highest fencing token ever handed out for this index
//! (downstream systems record the tokens they accepted), then run
//! `lockctl index recover --fencing-floor N` with N at least that. It creates
//! the next generation `<prefix>-00000k` whose mappings `_meta.fencingFloor`
//! is N (every token is then N + `_seq_no` + 1 > N), moves the alias to it
//! and records its UUID. Locks held in the old index are dropped.

use elasticsearch::indices::IndicesGetSettingsParts;
use elasticsearch::params::ExpandWildcards;

use super::assets::{IndexAssets, IndexState};
use super::error::LockError;
use super::lineage::{Concrete, Lineage, SetupStep, generation, index_name, next_setup_step};
use super::mappings::missing_lock_fields;
use super::transport::expect_success;

/// What `lockctl index status` shows.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexStatus {
    /// The alias lock requests address.
    pub alias: String,
    /// The concrete index found behind it, if any.
    pub index: Option<String>,
    /// That index's UUID.
    pub uuid: Option<String>,
    /// That index's fencing floor.
    pub fencing_floor: Option<u64>,
    /// The index setup recorded as its own.
    pub recorded_index: Option<String>,
    /// Its UUID.
    pub recorded_uuid: Option<String>,
    /// True when locks are granted.
    pub grants_allowed: bool,
    /// Why not, when they are not.
    pub problem: Option<String>,
}

impl IndexAssets {
    /// Where grants would go and whether they are allowed.
    pub async fn status(&self) -> Result<IndexStatus, LockError> {
        let (lineage, _) = self.lineage().await?;
        let current = self.resolve(lineage.as_ref()).await?;
        let problem = match next_setup_step(lineage.as_ref(), current.as_ref()) {
            SetupStep::Refuse { reason, .. } => Some(reason),
            // the first acquire sets it up
            SetupStep::CreateFirst => None,
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
        let (lineage, _) = self.lineage().await?;
        let current = self.resolve(lineage.as_ref()).await?;
        let step = next_setup_step(lineage.as_ref(), current.as_ref());
        if matches!(step, SetupStep::UseRecorded | SetupStep::Adopt) {
            let c = current.as_ref().map(|c| c.index.clone()).unwrap_or_default();
            return Err(LockError::Index {
                index: c,
                message: "grants are allowed on it; there is nothing to recover".into(),
            });
        }
        // Tokens never go backwards: the new floor must exceed the floor of
        // the last recovery (and of the index still behind the alias, if any).
        let previous = lineage
            .iter()
            .map(|l| l.fencing_floor)
            .chain(current.iter().map(Concrete::fencing_floor))
            .max()
            .unwrap_or(0);
        if previous > 0 && floor <= previous {
            return Err(LockError::Index {
                index: self.prefix.clone(),
                message: format!(
                    "--fencing-floor {floor} is not above {previous}, the floor of the last recovery: tokens above it were handed out; use at least the highest fencing token ever handed out"
                ),
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
        self.put_index_template(&name).await?;
        if !self.create_new_index(&name, floor).await? {
            return Err(LockError::Index {
                index: name,
                message: "another recovery created this generation meanwhile; see `lockctl index status`".into(),
            });
        }
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
            fencing_floor: created.fencing_floor(),
        };
        self.put_component_template(Some(&recorded), false).await?;
        tracing::info!(index = %name, floor, "lock index recovered; fencing tokens continue above the floor");
        Ok(IndexState {
            index: name,
            uuid: created.uuid.clone(),
            fencing_floor: created.fencing_floor(),
        })
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
}
