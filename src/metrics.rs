//! Prometheus metrics, with bounded labels only (operation, category): never
//! object names or error text.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub operation: &'static str,
    pub category: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// mutex or semaphore
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    pub category: &'static str,
}

/// Every number the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub grants: Family<KindLabels, Counter>,
    pub releases: Counter,
    pub expiries: Counter,
    pub losses: Counter,
    pub timeouts: Counter,
    pub reconciliations: Counter,
    pub wait_seconds: Histogram,
    pub hold_seconds: Histogram,
    pub handoff_seconds: Histogram,
    pub holders: Gauge,
    pub waiters: Gauge,
    pub permits_held: Gauge,
    pub permits_waiting: Gauge,
    pub head_of_line_skips: Counter,
    pub engine_request_seconds: Family<OperationLabels, Histogram>,
    pub engine_errors: Family<ErrorLabels, Counter>,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    pub undecodable_objects: Counter,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lockmanager");
        let r = &mut registry;
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let grants = registered(
            r,
            "grants",
            "Locks granted, by kind (mutex or semaphore)",
            Family::<KindLabels, Counter>::default(),
        );
        let releases = registered(r, "releases", "Locks released by the controller", Counter::default());
        let expiries = registered(r, "expiries", "Leases that ran out before renewal", Counter::default());
        let losses = registered(
            r,
            "losses",
            "Locks found taken by another owner at renewal",
            Counter::default(),
        );
        let timeouts = registered(
            r,
            "timeouts",
            "Requests that gave up waiting (acquireTimeout)",
            Counter::default(),
        );
        let reconciliations = registered(r, "reconciliations", "Reconciliations run", Counter::default());
        let wait_seconds = registered(
            r,
            "wait_seconds",
            "Time from request creation to grant",
            Histogram::new(exponential_buckets(0.005, 2.0, 20)),
        );
        let hold_seconds = registered(
            r,
            "hold_seconds",
            "Time from grant to release",
            Histogram::new(exponential_buckets(0.01, 2.0, 24)),
        );
        let handoff_seconds = registered(
            r,
            "handoff_seconds",
            "Time from a release by this controller to the next waiter's grant",
            latency(),
        );
        let holders = registered(r, "holders", "Requests currently Granted", Gauge::default());
        let waiters = registered(r, "waiters", "Requests currently Pending", Gauge::default());
        let permits_held = registered(
            r,
            "permits_held",
            "Semaphore permits held by Granted requests (exclusive: the whole limit)",
            Gauge::default(),
        );
        let permits_waiting = registered(
            r,
            "permits_waiting",
            "Semaphore permits asked for by Pending requests",
            Gauge::default(),
        );
        let head_of_line_skips = registered(
            r,
            "head_of_line_skips",
            "Grants that passed a waiting head that did not fit (BestEffortFIFO)",
            Counter::default(),
        );
        let engine_request_seconds = registered(
            r,
            "engine_request_seconds",
            "Latency of lock index requests by operation",
            Family::<OperationLabels, Histogram>::new_with_constructor(latency),
        );
        let engine_errors = registered(
            r,
            "engine_errors",
            "Failed lock index requests by operation and category",
            Family::<ErrorLabels, Counter>::default(),
        );
        let undecodable_objects = registered(
            r,
            "undecodable_objects",
            "Objects the controller could not decode and skipped",
            Counter::default(),
        );
        let reconcile_errors = registered(
            r,
            "reconcile_errors",
            "Reconcile errors by category",
            Family::<CategoryLabels, Counter>::default(),
        );
        let leader = registered(r, "leader", "1 while this replica is the leader", Gauge::default());
        Self {
            registry,
            grants,
            releases,
            expiries,
            losses,
            timeouts,
            reconciliations,
            wait_seconds,
            hold_seconds,
            handoff_seconds,
            holders,
            waiters,
            permits_held,
            permits_waiting,
            head_of_line_skips,
            engine_request_seconds,
            engine_errors,
            reconcile_errors,
            undecodable_objects,
            leader,
        }
    }
}

/// Registers `metric` under `name` and hands it back (metrics are cheap handles).
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// Counts a grant of a `kind` ("mutex" or "semaphore") key.
    pub fn granted(&self, kind: &'static str) {
        self.grants.get_or_create(&KindLabels { kind }).inc();
    }

    /// Records one lock index request.
    pub fn engine_call<T, E: EngineErrorCategory>(
        &self,
        operation: &'static str,
        elapsed: Duration,
        result: &Result<T, E>,
    ) {
        self.engine_request_seconds
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
        if let Err(e) = result {
            self.engine_errors
                .get_or_create(&ErrorLabels {
                    operation,
                    category: e.category(),
                })
                .inc();
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Errors that have a bounded category label.
pub trait EngineErrorCategory {
    fn category(&self) -> &'static str;
}

impl EngineErrorCategory for crate::lock::LockError {
    fn category(&self) -> &'static str {
        crate::lock::LockError::category(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chart's Grafana dashboard queries only metrics this operator
    /// exports (a renamed metric would leave a panel silently empty).
    #[test]
    fn the_grafana_dashboard_queries_only_metrics_we_export() {
        // a labelled family is exported once it has a child
        let metrics = Metrics::default();
        metrics.grants.get_or_create(&KindLabels { kind: "mutex" }).inc();
        metrics
            .engine_request_seconds
            .get_or_create(&OperationLabels { operation: "acquire" })
            .observe(0.01);
        let error = ErrorLabels {
            operation: "acquire",
            category: "unavailable",
        };
        metrics.engine_errors.get_or_create(&error).inc();
        metrics
            .reconcile_errors
            .get_or_create(&CategoryLabels { category: "kube" })
            .inc();
        let exported: Vec<String> = metrics
            .encode()
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let dashboard = include_str!("../charts/kube-lock-manager/dashboards/kube-lock-manager.json");
        let dashboard: serde_json::Value = serde_json::from_str(dashboard).expect("the dashboard is JSON");
        let mut queried = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let mut rest = expr;
                while let Some(at) = rest.find("lockmanager_") {
                    let name: String = rest[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    rest = &rest[at + name.len()..];
                    queried.push(name);
                }
            }
        }
        assert!(queried.len() >= 10, "{queried:?}");
        for name in queried {
            let family = ["_bucket", "_total", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            assert!(
                exported.iter().any(|e| e == family),
                "the dashboard queries {name}, which is not exported"
            );
        }
    }
}
