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
pub struct CategoryLabels {
    pub category: &'static str,
}

/// Every number the operator exports.
pub struct Metrics {
    pub registry: Registry,
    pub grants: Counter,
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
    pub engine_request_seconds: Family<OperationLabels, Histogram>,
    pub engine_errors: Family<ErrorLabels, Counter>,
    pub reconcile_errors: Family<CategoryLabels, Counter>,
    pub undecodable_objects: Counter,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("lockmanager");
        let grants = Counter::default();
        let releases = Counter::default();
        let expiries = Counter::default();
        let losses = Counter::default();
        let timeouts = Counter::default();
        let reconciliations = Counter::default();
        let wait_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 20));
        let hold_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 24));
        let handoff_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let holders = Gauge::default();
        let waiters = Gauge::default();
        let engine_request_seconds = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let engine_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_errors = Family::<CategoryLabels, Counter>::default();
        let leader = Gauge::default();
        let undecodable_objects = Counter::default();
        registry.register("grants", "Locks granted", grants.clone());
        registry.register("releases", "Locks released by the controller", releases.clone());
        registry.register("expiries", "Leases that ran out before renewal", expiries.clone());
        registry.register(
            "losses",
            "Locks found taken by another owner at renewal",
            losses.clone(),
        );
        registry.register(
            "timeouts",
            "Requests that gave up waiting (acquireTimeout)",
            timeouts.clone(),
        );
        registry.register("reconciliations", "Reconciliations run", reconciliations.clone());
        registry.register(
            "wait_seconds",
            "Time from request creation to grant",
            wait_seconds.clone(),
        );
        registry.register("hold_seconds", "Time from grant to release", hold_seconds.clone());
        registry.register(
            "handoff_seconds",
            "Time from a release by this controller to the next waiter's grant",
            handoff_seconds.clone(),
        );
        registry.register("holders", "Requests currently Granted", holders.clone());
        registry.register("waiters", "Requests currently Pending", waiters.clone());
        registry.register(
            "engine_request_seconds",
            "Latency of lock index requests by operation",
            engine_request_seconds.clone(),
        );
        registry.register(
            "engine_errors",
            "Failed lock index requests by operation and category",
            engine_errors.clone(),
        );
        registry.register(
            "undecodable_objects",
            "Objects the controller could not decode and skipped",
            undecodable_objects.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconcile errors by category",
            reconcile_errors.clone(),
        );
        registry.register("leader", "1 while this replica is the leader", leader.clone());
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
            engine_request_seconds,
            engine_errors,
            reconcile_errors,
            undecodable_objects,
            leader,
        }
    }
}

impl Metrics {
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
