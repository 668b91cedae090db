//! kube-lock-manager: distributed locks for Kubernetes workloads, backed by a lock
//! index in Elasticsearch or OpenSearch.

pub mod cli;
pub mod controller;
pub mod crd;
pub mod duration;
pub mod engine;
#[cfg(test)]
mod fixtures;
pub mod gate;
pub mod http;
pub mod leader;
pub mod lock;
pub mod metrics;
pub mod operator;
pub mod queue;
pub mod telemetry;
pub mod wait;
