//! Whether the lock index can prove that fencing tokens only grow, decided as
//! a pure function of what the cluster shows.
//!
//! Setup records the UUID of the index it created (its lineage) in the index
//! template's `_meta`, which outlives the index. A lock index that is missing
//! or has another UUID was deleted, re-created or restored from a snapshot:
//! its `_seq_no`s (and so fencing tokens) may restart or go back, so nothing
//! is granted until an admin runs `lockctl index recover --fencing-floor N`,
//! which creates the next index whose tokens start above N.

use serde_json::Value;

/// The index this deployment's setup created, as recorded in the index template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lineage {
    pub index: String,
    pub uuid: String,
    /// The fencing floor that index was created with (a later recovery must exceed it).
    pub fencing_floor: u64,
}

/// A concrete lock index as the cluster shows it.
#[derive(Clone, Debug)]
pub struct Concrete {
    pub index: String,
    pub uuid: String,
    pub mappings: Value,
    /// True when the deployment's alias points at it.
    pub has_alias: bool,
}

impl Concrete {
    /// Added to every fencing token of the index (`_meta.fencingFloor` of its mappings).
    pub fn fencing_floor(&self) -> u64 {
        self.mappings["_meta"]["fencingFloor"].as_u64().unwrap_or(0)
    }
}

/// What setup does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetupStep {
    /// The recorded index is there: check its mappings and alias, grant.
    UseRecorded,
    /// No lineage yet, but an index exists (an older version's, or another
    /// process is half-way through setup): adopt it and record it.
    Adopt,
    /// Nothing yet: create the first index and record it.
    CreateFirst,
    /// Monotonic fencing cannot be proven: refuse to grant.
    Refuse { index: String, reason: String },
}

/// Decides setup from the recorded lineage and the index found.
pub fn next_setup_step(lineage: Option<&Lineage>, current: Option<&Concrete>) -> SetupStep {
    match (lineage, current) {
        (Some(l), Some(c)) if c.uuid == l.uuid => SetupStep::UseRecorded,
        (Some(l), Some(c)) => SetupStep::Refuse {
            index: c.index.clone(),
            reason: format!(
                "it has UUID {} but the index this deployment created ({}) had UUID {}: it was re-created or restored from a snapshot",
                c.uuid, l.index, l.uuid
            ),
        },
        (Some(l), None) => SetupStep::Refuse {
            index: l.index.clone(),
            reason: format!("the index (UUID {}) was deleted", l.uuid),
        },
        (None, Some(_)) => SetupStep::Adopt,
        (None, None) => SetupStep::CreateFirst,
    }
}

/// The generation number of `name` when it is one of `prefix`'s concrete
/// indices (`<prefix>-000001`, `<prefix>-000002`, …).
pub fn generation(prefix: &str, name: &str) -> Option<u32> {
    let digits = name.strip_prefix(prefix)?.strip_prefix('-')?;
    (digits.len() == 6 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The concrete index name of generation `n`.
pub fn index_name(prefix: &str, n: u32) -> String {
    format!("{prefix}-{n:06}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn concrete(uuid: &str) -> Concrete {
        Concrete {
            index: "p-000001".into(),
            uuid: uuid.into(),
            mappings: json!({"_meta": {"fencingFloor": 7}}),
            has_alias: true,
        }
    }

    #[test]
    fn setup_steps() {
        let recorded = Lineage {
            index: "p-000001".into(),
            uuid: "u1".into(),
            fencing_floor: 0,
        };
        assert_eq!(next_setup_step(None, None), SetupStep::CreateFirst);
        assert_eq!(next_setup_step(None, Some(&concrete("u1"))), SetupStep::Adopt);
        assert_eq!(
            next_setup_step(Some(&recorded), Some(&concrete("u1"))),
            SetupStep::UseRecorded
        );
        assert!(matches!(
            next_setup_step(Some(&recorded), Some(&concrete("u2"))),
            SetupStep::Refuse { reason, .. } if reason.contains("restored")
        ));
        assert!(matches!(
            next_setup_step(Some(&recorded), None),
            SetupStep::Refuse { reason, .. } if reason.contains("deleted")
        ));
    }

    #[test]
    fn generations_belong_to_one_prefix_only() {
        assert_eq!(generation("p", "p-000002"), Some(2));
        assert_eq!(generation("p", "p-staging-000001"), None);
        assert_eq!(generation("p", "p-00001"), None);
        assert_eq!(index_name("p", 12), "p-000012");
        assert_eq!(concrete("u").fencing_floor(), 7);
    }
}
