//! kube-lock-manager: distributed locks for Kubernetes workloads, backed by a lock
//! index in Elasticsearch or OpenSearch.

pub mod duration;
pub mod engine;
pub mod lock;
