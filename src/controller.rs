//! The controller: grants `DistributedLock` requests through the lock index,
//! in queue order, renews their leases and releases them when done.
//!
//! Reconcile = finalizer → apply / cleanup. Queue decisions are the pure
//! functions of [`crate::queue`]; this module does the I/O around them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::crd::{DistributedLock, DistributedLockStatus, FIELD_MANAGER, FINALIZER, HolderKind, LockScope, Phase};
use crate::engine::EngineArgs;
use crate::lock::{AcquireRequest, Lock, LockClient, LockError};
use crate::metrics::{Metrics, Readiness};
use crate::queue;

/// Flags of `lockctl operator`.
#[derive(Args, Debug, Clone)]
pub struct OperatorArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Namespaces allowed to use `scope: Cluster` (comma-separated; default: all).
    #[arg(long, env = "CLUSTER_SCOPE_NAMESPACES", value_delimiter = ',')]
    pub cluster_scope_namespaces: Vec<String>,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Only manage DistributedLocks with these labels (e.g. `shard=a`); default: all.
    #[arg(long, env = "LOCK_SELECTOR")]
    pub selector: Option<String>,
    /// Run as one of several replicas: only the holder of a Lease reconciles.
    #[arg(long, env = "LEADER_ELECT")]
    pub leader_elect: bool,
    /// Namespace of the leader election Lease (default: $POD_NAMESPACE, else "default").
    #[arg(long, env = "LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader election Lease.
    #[arg(long, env = "LEADER_ELECTION_NAME", default_value = "kube-lock-manager")]
    pub leader_election_name: String,
    /// Validity of the leader's lease; a standby takes over this long after the last renewal it saw.
    #[arg(long, default_value = "15s", value_parser = crate::duration::parse_duration)]
    pub lease_duration: Duration,
    /// This replica's name in the Lease (default: $POD_NAME, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Longest wait before re-checking a lock held outside this cluster.
    #[arg(long, default_value = "5s", value_parser = crate::duration::parse_duration)]
    pub max_retry_interval: Duration,
}

/// Errors of the operator as a whole (start-up).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("cannot connect to Kubernetes: {0}")]
    Kube(#[source] kube::Error),
    #[error("cannot load the kubeconfig or in-cluster configuration: {0}")]
    KubeConfig(String),
    #[error("the DistributedLock CRD is not installed (`lockctl crd | kubectl apply -f -` installs it): {0}")]
    CrdMissing(#[source] kube::Error),
    #[error("the lock index is not usable: {0}")]
    Engine(#[from] LockError),
    #[error(transparent)]
    Election(#[from] crate::leader::ElectionError),
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error("lost the leader lease {0}; stopping so that another replica leads")]
    LeadershipLost(String),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[source] kube::Error),
    #[error("lock index: {0}")]
    Lock(#[source] LockError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A bounded label for metrics and backoff.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Lock(e) => e.category(),
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.category(),
                _ => "finalizer",
            },
            Error::Invalid(_) => "invalid",
        }
    }
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub locks: LockClient,
    pub store: Store<DistributedLock>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Requests to reconcile now: the queue moved.
    pub wake: mpsc::UnboundedSender<ObjectRef<DistributedLock>>,
    pub cluster_scope_namespaces: Option<HashSet<String>>,
    pub max_retry_interval: Duration,
    /// The resourceVersion each request had when the watcher first delivered
    /// it (by UID): its place in line until `status.queueSequence` records it.
    pub first_seen: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    /// Requests by lock key (keys are immutable), so a reconcile looks at its
    /// own queue only, not at every request in the cluster.
    pub by_key: Arc<std::sync::Mutex<HashMap<String, HashSet<ObjectRef<DistributedLock>>>>>,
    /// Requests whose lock was released but whose status may still say Granted.
    pub released_uids: std::sync::Mutex<HashSet<String>>,
    /// When this controller last released a key (for the handoff histogram).
    pub released_at: std::sync::Mutex<HashMap<String, Instant>>,
}

/// Runs the controller until SIGTERM/SIGINT.
pub async fn run(args: OperatorArgs) -> Result<(), OperatorError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| OperatorError::KubeConfig(crate::lock::error_line(&e)))?;
    let locks_api: Api<DistributedLock> = Api::all(client.clone());
    locks_api
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 404 => OperatorError::CrdMissing(e),
            _ => OperatorError::Kube(e),
        })?;
    let locks = LockClient::from_args(&args.engine)?;
    locks.ensure_ready().await?;

    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    readiness.engine_reachable.store(true, Ordering::Relaxed);
    let http = {
        let (metrics, readiness, addr) = (metrics.clone(), readiness.clone(), args.http_addr);
        let listener_check = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| OperatorError::Http { addr, source })?;
        drop(listener_check);
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, metrics, readiness).await {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        })
    };

    let (wake, woken) = mpsc::unbounded_channel();
    // Our own reflector, so that readiness follows the watcher's first full list.
    let (store, writer) = reflector::store();
    let synced = readiness.clone();
    let first_seen: Arc<std::sync::Mutex<HashMap<String, u64>>> = Default::default();
    let sightings = first_seen.clone();
    let by_key: Arc<std::sync::Mutex<HashMap<String, HashSet<ObjectRef<DistributedLock>>>>> = Default::default();
    let index = by_key.clone();
    let mut lock_watch = watcher::Config::default().any_semantic();
    if let Some(selector) = &args.selector {
        lock_watch = lock_watch.labels(selector);
    }
    let lock_events = watcher::watcher(locks_api, lock_watch)
        .default_backoff()
        // managedFields are most of an object's size and never read here
        .modify(|lock| lock.managed_fields_mut().clear())
        .inspect_ok(move |event| {
            record_sighting(&sightings, event);
            index_by_key(&index, event);
            if matches!(event, watcher::Event::InitDone) && !synced.synced.swap(true, Ordering::Relaxed) {
                tracing::info!("DistributedLock watcher synced");
            }
        })
        .reflect(writer)
        .applied_objects();
    let controller = Controller::for_stream(lock_events, store.clone());
    let holder_store = store.clone();
    let pod_store = store.clone();
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client: client.clone(),
        locks,
        store: store.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        wake,
        cluster_scope_namespaces: (!args.cluster_scope_namespaces.is_empty())
            .then(|| args.cluster_scope_namespaces.iter().cloned().collect()),
        max_retry_interval: args.max_retry_interval,
        released_at: Default::default(),
        released_uids: Default::default(),
        first_seen,
        by_key,
    });
    tracing::info!(index = %ctx.locks.index(), "operator started");
    let gauges = tokio::spawn(update_gauges_every(ctx.clone(), Duration::from_secs(1)));
    let mut gated_jobs = watcher::Config::default().any_semantic();
    let mut owned_locks = watcher::Config::default().any_semantic();
    if let Some(selector) = &args.selector {
        gated_jobs = gated_jobs.labels(selector);
        owned_locks = owned_locks.labels(selector);
    }
    let job_gate = Controller::new(Api::<Job>::all(client.clone()), gated_jobs)
        .owns(Api::<DistributedLock>::all(client.clone()), owned_locks)
        .shutdown_on_signal()
        .run(crate::gate::reconcile_job, crate::gate::job_error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let lock_controller = controller
        .watches(
            Api::<Job>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            move |job| holders_of(&holder_store, HolderKind::Job, &job),
        )
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            move |pod| holders_of(&pod_store, HolderKind::Pod, &pod),
        )
        .reconcile_on(UnboundedReceiverStream::new(woken))
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    let controllers = async {
        futures::join!(lock_controller, job_gate);
    };
    if args.leader_elect {
        let identity = args.identity.clone().unwrap_or_else(default_identity);
        let namespace = args
            .leader_election_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".into());
        let config = crate::leader::ElectionConfig::new(
            namespace,
            args.leader_election_name.clone(),
            identity,
            args.lease_duration,
        );
        lead_then_run(client.clone(), config, controllers, &metrics, &readiness).await?;
    } else {
        metrics.leader.set(1);
        controllers.await;
    }
    http.abort();
    gauges.abort();
    tracing::info!("operator stopped");
    Ok(())
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

/// Waits (as a ready standby) until this replica holds the Lease, then runs
/// the controllers while renewing it. Losing the Lease, or failing to renew
/// it within the renew deadline, stops the controllers at once.
async fn lead_then_run(
    client: kube::Client,
    config: crate::leader::ElectionConfig,
    controllers: impl std::future::Future<Output = ()>,
    metrics: &Metrics,
    readiness: &Readiness,
) -> Result<(), OperatorError> {
    use crate::leader::{Attempt, Elector};
    use tokio::signal::unix::{SignalKind, signal};
    let mut elector = Elector::new(client, config.clone());
    let mut sigterm = signal(SignalKind::terminate()).map_err(OperatorError::Signal)?;
    // A standby has no watchers to sync; it is ready to take over.
    readiness.synced.store(true, Ordering::Relaxed);
    let mut last_holder = None;
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(Attempt::Leading) => break,
            Ok(Attempt::Following { holder }) => {
                if last_holder.as_ref() != Some(&holder) {
                    tracing::info!(%holder, identity = %config.identity, "standing by: another replica leads");
                    last_holder = Some(holder);
                }
            }
            Err(e) => tracing::warn!(error = %e, "leader election failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(config.retry_period) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
    }
    tracing::info!(identity = %config.identity, lease = %config.name, "became the leader");
    readiness.synced.store(false, Ordering::Relaxed);
    metrics.leader.set(1);
    let keep_leading = async {
        loop {
            tokio::time::sleep(config.retry_period).await;
            let now = Instant::now();
            if !elector.may_lead(now) {
                return;
            }
            // Never wait on the API server past the renew deadline.
            let budget = config.renew_deadline.saturating_sub(config.retry_period);
            match tokio::time::timeout(budget, elector.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Leading)) => {}
                Ok(Ok(Attempt::Following { .. })) => return,
                Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the leader lease"),
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
        }
    };
    tokio::select! {
        _ = controllers => {
            elector.release().await;
            metrics.leader.set(0);
            Ok(())
        }
        _ = keep_leading => {
            metrics.leader.set(0);
            Err(OperatorError::LeadershipLost(config.name.clone()))
        }
    }
}

fn index_by_key(
    index: &std::sync::Mutex<HashMap<String, HashSet<ObjectRef<DistributedLock>>>>,
    event: &watcher::Event<DistributedLock>,
) {
    let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
    match event {
        watcher::Event::Apply(lock) | watcher::Event::InitApply(lock) => {
            index
                .entry(queue::lock_key(lock))
                .or_default()
                .insert(ObjectRef::from_obj(lock));
        }
        watcher::Event::Delete(lock) => {
            let key = queue::lock_key(lock);
            if let Some(refs) = index.get_mut(&key) {
                refs.remove(&ObjectRef::from_obj(lock));
                if refs.is_empty() {
                    index.remove(&key);
                }
            }
        }
        watcher::Event::Init | watcher::Event::InitDone => {}
    }
}

/// Remembers the resourceVersion of each request's first watch event: the
/// watcher delivers creations in the order the API server stored them.
fn record_sighting(
    seen: &std::sync::Mutex<std::collections::HashMap<String, u64>>,
    event: &watcher::Event<DistributedLock>,
) {
    let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    match event {
        watcher::Event::Apply(lock) | watcher::Event::InitApply(lock) => {
            if let (Some(uid), Some(rv)) = (lock.uid(), lock.resource_version().and_then(|rv| rv.parse().ok())) {
                seen.entry(uid).or_insert(rv);
            }
        }
        watcher::Event::Delete(lock) => {
            if let Some(uid) = lock.uid() {
                seen.remove(&uid);
            }
        }
        watcher::Event::Init | watcher::Event::InitDone => {}
    }
}

impl Context {
    /// True for a request whose lock this controller released a moment ago,
    /// before its status says so.
    fn just_released(&self, lock: &DistributedLock) -> bool {
        lock.uid().is_some_and(|uid| {
            self.released_uids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&uid)
        })
    }

    fn forget_released(&self, lock: &DistributedLock) {
        if let Some(uid) = lock.uid() {
            self.released_uids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&uid);
        }
    }

    /// The requests of one lock key, as the cache has them now.
    fn members(&self, key: &str) -> Vec<Arc<DistributedLock>> {
        let refs: Vec<_> = self
            .by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default();
        refs.iter().filter_map(|r| self.store.get(r)).collect()
    }

    fn first_seen(&self, lock: &DistributedLock) -> Option<u64> {
        let uid = lock.uid()?;
        self.first_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&uid)
            .copied()
    }
}

/// The requests whose holderRef points at this Job or Pod.
fn holders_of<K: Resource + ResourceExt>(
    store: &Store<DistributedLock>,
    kind: HolderKind,
    holder: &K,
) -> Vec<ObjectRef<DistributedLock>> {
    let (name, namespace) = (holder.name_any(), holder.namespace());
    store
        .state()
        .iter()
        .filter(|l| {
            l.namespace() == namespace
                && l.spec
                    .holder_ref
                    .as_ref()
                    .is_some_and(|r| r.kind == kind && r.name == name)
        })
        .map(|l| ObjectRef::from_obj(l.as_ref()))
        .collect()
}

fn error_policy(_lock: Arc<DistributedLock>, error: &Error, ctx: Arc<Context>) -> Action {
    let category = error.category();
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::CategoryLabels { category })
        .inc();
    tracing::warn!(error = %error, category, "reconcile failed");
    Action::requeue(match category {
        "unavailable" | "engine" | "response" => Duration::from_secs(2),
        "kube" | "finalizer" => Duration::from_millis(500),
        "invalid" => Duration::from_secs(300),
        _ => Duration::from_secs(5),
    })
}

#[tracing::instrument(skip(lock, ctx), fields(name = %lock.name_any(), namespace = lock.namespace().unwrap_or_default()))]
async fn reconcile(lock: Arc<DistributedLock>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciliations.inc();
    let namespace = lock
        .namespace()
        .ok_or_else(|| Error::Invalid("DistributedLock without a namespace".into()))?;
    let api: Api<DistributedLock> = Api::namespaced(ctx.client.clone(), &namespace);
    if lock.metadata.deletion_timestamp.is_none() && !lock.finalizers().iter().any(|f| f == FINALIZER) {
        return add_finalizer_and_arrival(&api, &lock, ctx.first_seen(&lock)).await;
    }
    let result = finalizer(&api, FINALIZER, lock, |event| async {
        match event {
            Finalizer::Apply(lock) => apply(lock, &ctx).await,
            Finalizer::Cleanup(lock) => cleanup(lock, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    tracing::debug!(?result, "reconciled");
    result
}

/// Adds the release finalizer and records the request's place in line (the
/// resourceVersion it had when first seen, normally its creation's) in one
/// compare-and-swap write, so the order survives controller restarts.
async fn add_finalizer_and_arrival(
    api: &Api<DistributedLock>,
    lock: &DistributedLock,
    first_seen: Option<u64>,
) -> Result<Action> {
    let mut finalizers = lock.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let mut metadata = json!({
        "resourceVersion": lock.resource_version(),
        "finalizers": finalizers,
    });
    if !lock.annotations().contains_key(queue::QUEUE_SEQUENCE_ANNOTATION) {
        let arrival = queue::arrival(lock, &|_| first_seen);
        metadata["annotations"] = json!({queue::QUEUE_SEQUENCE_ANNOTATION: arrival.to_string()});
    }
    let patch = Patch::Merge(json!({"metadata": metadata}));
    match api.patch(&lock.name_any(), &PatchParams::default(), &patch).await {
        // The write itself triggers the next reconcile.
        Ok(_) => Ok(Action::await_change()),
        // We acted on a stale copy: the newer one is on its way and triggers
        // the next reconcile, so there is nothing to retry.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Action::await_change()),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Refreshes the holders/waiters gauges from the cache every few seconds
/// (counting per reconcile would cost O(requests) each time).
async fn update_gauges_every(ctx: Arc<Context>, period: Duration) {
    loop {
        update_gauges(&ctx);
        tokio::time::sleep(period).await;
    }
}

fn update_gauges(ctx: &Context) {
    let all = ctx.store.state();
    let count = |phase: Phase| all.iter().filter(|l| queue::phase(l) == phase).count() as i64;
    ctx.metrics.holders.set(count(Phase::Granted));
    ctx.metrics.waiters.set(count(Phase::Pending));
}

async fn apply(lock: Arc<DistributedLock>, ctx: &Context) -> Result<Action> {
    let key = queue::lock_key(&lock);
    let phase = queue::phase(&lock);
    // Whatever changed about this request may have moved the others.
    wake_others(ctx, &key, &lock);
    if phase.is_final() {
        ctx.forget_released(&lock);
        // A request that just left the lock: let the queue move.
        wake_queue(ctx, &key);
        return Ok(Action::await_change());
    }
    let ttl = match lock.spec.ttl() {
        Ok(ttl) => ttl,
        Err(message) => return finish(&lock, ctx, Phase::Failed, "InvalidSpec", &message).await,
    };
    if lock.spec.scope == LockScope::Cluster && !cluster_scope_allowed(ctx, &lock) {
        let message = format!(
            "namespace {:?} may not use scope Cluster (allowed: {})",
            lock.namespace().unwrap_or_default(),
            ctx.cluster_scope_namespaces
                .as_ref()
                .map(|s| {
                    let mut v: Vec<_> = s.iter().cloned().collect();
                    v.sort();
                    v.join(", ")
                })
                .unwrap_or_default()
        );
        return finish(&lock, ctx, Phase::Failed, "ScopeNotAllowed", &message).await;
    }
    match phase {
        Phase::Granted => keep_or_release(lock, ctx, &key, ttl).await,
        _ => try_grant(lock, ctx, &key, ttl).await,
    }
}

fn cluster_scope_allowed(ctx: &Context, lock: &DistributedLock) -> bool {
    match (&ctx.cluster_scope_namespaces, lock.namespace()) {
        (None, _) => true,
        (Some(allowed), Some(ns)) => allowed.contains(&ns),
        (Some(_), None) => false,
    }
}

/// True when the request belongs to the Job its holderRef names (suspend gating).
fn owned_by_holder(lock: &DistributedLock) -> bool {
    let Some(holder) = &lock.spec.holder_ref else {
        return false;
    };
    lock.owner_references()
        .iter()
        .any(|o| o.kind == format!("{:?}", holder.kind) && o.name == holder.name)
}

/// Whether the workload named by holderRef still needs the lock.
#[derive(Debug, PartialEq, Eq)]
enum HolderState {
    Running,
    Finished(&'static str),
    Gone,
}

async fn holder_state(lock: &DistributedLock, ctx: &Context) -> Result<HolderState> {
    let Some(holder) = &lock.spec.holder_ref else {
        return Ok(HolderState::Running);
    };
    let namespace = lock.namespace().unwrap_or_default();
    match holder.kind {
        HolderKind::Job => {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
            let Some(job) = jobs.get_opt(&holder.name).await.map_err(Error::Kube)? else {
                return Ok(HolderState::Gone);
            };
            let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
            let done = |t: &str| conditions.iter().any(|c| c.type_ == t && c.status == "True");
            Ok(if done("Complete") {
                HolderState::Finished("Job completed")
            } else if done("Failed") {
                HolderState::Finished("Job failed")
            } else {
                HolderState::Running
            })
        }
        HolderKind::Pod => {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            let Some(pod) = pods.get_opt(&holder.name).await.map_err(Error::Kube)? else {
                return Ok(HolderState::Gone);
            };
            if pod.metadata.deletion_timestamp.is_some() {
                return Ok(HolderState::Finished("Pod terminating"));
            }
            Ok(match pod.status.and_then(|s| s.phase).as_deref() {
                Some("Succeeded") => HolderState::Finished("Pod succeeded"),
                Some("Failed") => HolderState::Finished("Pod failed"),
                _ => HolderState::Running,
            })
        }
    }
}

/// A Pending request: time out, wait in the queue, or acquire if it is the head.
async fn try_grant(lock: Arc<DistributedLock>, ctx: &Context, key: &str, ttl: Duration) -> Result<Action> {
    let now = Utc::now();
    match holder_state(&lock, ctx).await? {
        HolderState::Running => {}
        HolderState::Finished(why) => {
            return finish(&lock, ctx, Phase::Released, "HolderFinished", why).await;
        }
        HolderState::Gone if lock.spec.holder_ref.as_ref().is_some_and(|h| h.kind == HolderKind::Pod) => {
            return finish(
                &lock,
                ctx,
                Phase::Released,
                "HolderGone",
                "the holder Pod no longer exists",
            )
            .await;
        }
        HolderState::Gone if owned_by_holder(&lock) => {
            // The gated Job is gone; in a cluster the garbage collector
            // deletes its request too, and we do it here without waiting.
            let api: Api<DistributedLock> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
            match api.delete(&lock.name_any(), &Default::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(Error::Kube(e)),
            }
            return Ok(Action::await_change());
        }
        HolderState::Gone => {}
    }
    let deadline = match lock.spec.acquire_timeout() {
        Ok(Some(timeout)) => {
            queue::creation_time(&lock).map(|c| c + chrono::Duration::from_std(timeout).unwrap_or_default())
        }
        Ok(None) => None,
        Err(message) => return finish(&lock, ctx, Phase::Failed, "InvalidSpec", &message).await,
    };
    if let Some(deadline) = deadline
        && now >= deadline
    {
        ctx.metrics.timeouts.inc();
        let message = format!(
            "not granted within acquireTimeout {}",
            lock.spec.acquire_timeout.as_deref().unwrap_or_default()
        );
        return finish(&lock, ctx, Phase::Failed, "Timeout", &message).await;
    }
    let until_deadline = deadline.map(|d| (d - now).to_std().unwrap_or_default());

    let all = ctx.members(key);
    let waiters = queue::waiters(&all, key, &|l| ctx.first_seen(l));
    let position = queue::position(&waiters, &lock);
    let holder_here = queue::holder(&all, key, &|l| ctx.just_released(l)).filter(|h| h.uid() != lock.uid());
    if position > 1 || holder_here.is_some() {
        let message = match &holder_here {
            Some(h) => format!("waiting for {} (held by {})", key, h.name_any()),
            None => format!("waiting for {key}: {} ahead in the queue", position - 1),
        };
        write_pending(&lock, ctx, position, "Waiting", &message).await?;
        return Ok(requeue_within(until_deadline, Duration::from_secs(300)));
    }

    // Head of the queue and nobody here holds the lock: acquire. The token is
    // the request's UID, so a controller that crashed between acquiring and
    // writing the status gets the same grant back instead of a stuck lock.
    let request = AcquireRequest {
        lock_id: key.to_string(),
        token: lock.uid().unwrap_or_else(crate::lock::new_token),
        ttl,
        metadata: lock.spec.metadata.clone().unwrap_or(json!({})),
        holder: Some(display_holder(&lock)),
        fencing_token: None,
    };
    let started = Instant::now();
    let acquired = ctx.locks.try_acquire(&request).await;
    record_engine(ctx, "acquire", started, &acquired);
    let acquired = match acquired {
        Ok(acquired) => acquired,
        Err(e) => {
            mark_index_unreachable(&lock, ctx, &e).await;
            return Err(Error::Lock(e));
        }
    };
    match acquired {
        Some(grant) => {
            write_granted(&lock, ctx, &grant).await?;
            ctx.metrics.grants.inc();
            if let Some(created) = queue::creation_time(&lock) {
                ctx.metrics
                    .wait_seconds
                    .observe((Utc::now() - created).num_milliseconds().max(0) as f64 / 1000.0);
            }
            if let Some(released) = ctx.released_at.lock().unwrap_or_else(|p| p.into_inner()).remove(key) {
                ctx.metrics.handoff_seconds.observe(released.elapsed().as_secs_f64());
            }
            publish(
                ctx,
                &lock,
                EventType::Normal,
                "Granted",
                format!("lock {key} granted with fencing token {}", grant.fencing_token),
            )
            .await;
            Ok(Action::requeue(renew_period(ttl)))
        }
        None => {
            // Held outside this cluster (CLI, another cluster): look again no
            // later than its expiry, and at least every max_retry_interval.
            let started = Instant::now();
            let current = ctx.locks.get(key).await;
            record_engine(ctx, "get", started, &current);
            let (message, retry) = match current.map_err(Error::Lock)? {
                Some(held) => (
                    format!(
                        "held outside this cluster by {} until {}",
                        held.holder.as_deref().unwrap_or("another client"),
                        rfc3339(held.expires_at)
                    ),
                    (held.expires_at - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(20),
                ),
                None => (
                    "the lock was just taken; retrying".to_string(),
                    Duration::from_millis(50),
                ),
            };
            write_pending(&lock, ctx, 1, "HeldElsewhere", &message).await?;
            let retry = retry.clamp(Duration::from_millis(20), ctx.max_retry_interval);
            Ok(Action::requeue(until_deadline.map_or(retry, |d| d.min(retry))))
        }
    }
}

/// A Granted request: release when the holder is done, renew when due,
/// notice when the lock was taken.
async fn keep_or_release(lock: Arc<DistributedLock>, ctx: &Context, key: &str, ttl: Duration) -> Result<Action> {
    let status = lock.status.clone().unwrap_or_default();
    let token = status.token.clone().unwrap_or_default();
    match holder_state(&lock, ctx).await? {
        HolderState::Running => {}
        HolderState::Finished(why) => return release_and_finish(&lock, ctx, key, &token, "HolderFinished", why).await,
        HolderState::Gone => {
            return release_and_finish(&lock, ctx, key, &token, "HolderGone", "the holder no longer exists").await;
        }
    }
    let now = Utc::now();
    let renewed_at = status.renewed_at.as_deref().and_then(parse_time).unwrap_or(now);
    let due = renewed_at + chrono::Duration::from_std(renew_period(ttl)).unwrap_or_default();
    if now < due {
        return Ok(Action::requeue((due - now).to_std().unwrap_or_default()));
    }
    let fencing = status.fencing_token.map(|f| f as u64);
    let started = Instant::now();
    let extended = ctx.locks.extend(key, &token, ttl, fencing).await;
    record_engine(ctx, "extend", started, &extended);
    match extended {
        Ok(true) => {
            let mut next = status.clone();
            next.renewed_at = Some(rfc3339(now));
            next.expires_at = Some(rfc3339(now + chrono::Duration::from_std(ttl).unwrap_or_default()));
            mark_index_reachable(&mut next, &lock);
            write_status(&lock, ctx, next).await?;
            Ok(Action::requeue(renew_period(ttl)))
        }
        Ok(false) => {
            let expired = status
                .expires_at
                .as_deref()
                .and_then(parse_time)
                .is_some_and(|e| e <= now);
            let (phase, reason, message) = if expired {
                ctx.metrics.expiries.inc();
                (
                    Phase::Expired,
                    "Expired",
                    "the lease ran out before it could be renewed and another owner took the lock",
                )
            } else {
                ctx.metrics.losses.inc();
                (Phase::Lost, "Lost", "the lock was taken or released by another owner")
            };
            publish(ctx, &lock, EventType::Warning, reason, format!("lock {key}: {message}")).await;
            finish(&lock, ctx, phase, reason, message).await
        }
        Err(e) => {
            mark_index_unreachable(&lock, ctx, &e).await;
            Err(Error::Lock(e))
        }
    }
}

/// Deletion: release the lock (token-fenced; "already released" is fine),
/// then let the next waiter in.
async fn cleanup(lock: Arc<DistributedLock>, ctx: &Context) -> Result<Action> {
    let key = queue::lock_key(&lock);
    if queue::phase(&lock) == Phase::Granted
        && let Some(token) = lock.status.as_ref().and_then(|s| s.token.clone())
    {
        let started = Instant::now();
        let released = ctx.locks.release(&key, &token).await;
        record_engine(ctx, "release", started, &released);
        if released.map_err(Error::Lock)? {
            ctx.metrics.releases.inc();
            observe_hold(ctx, &lock);
            mark_released(ctx, &key);
            publish(
                ctx,
                &lock,
                EventType::Normal,
                "Released",
                format!("lock {key} released: request deleted"),
            )
            .await;
        }
    }
    wake_queue(ctx, &key);
    Ok(Action::await_change())
}

async fn release_and_finish(
    lock: &DistributedLock,
    ctx: &Context,
    key: &str,
    token: &str,
    reason: &str,
    message: &str,
) -> Result<Action> {
    let started = Instant::now();
    let released = ctx.locks.release(key, token).await;
    record_engine(ctx, "release", started, &released);
    released.map_err(Error::Lock)?;
    ctx.metrics.releases.inc();
    observe_hold(ctx, lock);
    if let Some(uid) = lock.uid() {
        ctx.released_uids.lock().unwrap_or_else(|p| p.into_inner()).insert(uid);
    }
    mark_released(ctx, key);
    publish(
        ctx,
        lock,
        EventType::Normal,
        "Released",
        format!("lock {key} released: {message}"),
    )
    .await;
    finish(lock, ctx, Phase::Released, reason, message).await
}

fn observe_hold(ctx: &Context, lock: &DistributedLock) {
    if let Some(acquired) = lock
        .status
        .as_ref()
        .and_then(|s| s.acquired_at.as_deref())
        .and_then(parse_time)
    {
        ctx.metrics
            .hold_seconds
            .observe((Utc::now() - acquired).num_milliseconds().max(0) as f64 / 1000.0);
    }
}

fn mark_released(ctx: &Context, key: &str) {
    ctx.released_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.to_string(), Instant::now());
    wake_queue(ctx, key);
}

/// Reconcile, now, the requests of `key` whose state is behind the queue.
fn wake_queue(ctx: &Context, key: &str) {
    for lock in queue::needing_attention(&ctx.members(key), key, &|l| ctx.first_seen(l), &|l| {
        ctx.just_released(l)
    }) {
        let _ = ctx.wake.send(ObjectRef::from_obj(lock.as_ref()));
    }
}

fn wake_others(ctx: &Context, key: &str, me: &DistributedLock) {
    for lock in queue::needing_attention(&ctx.members(key), key, &|l| ctx.first_seen(l), &|l| {
        ctx.just_released(l)
    }) {
        if lock.uid() != me.uid() {
            let _ = ctx.wake.send(ObjectRef::from_obj(lock.as_ref()));
        }
    }
}

/// Moves a request to a final phase (Released, Expired, Lost, Failed).
async fn finish(lock: &DistributedLock, ctx: &Context, phase: Phase, reason: &str, message: &str) -> Result<Action> {
    // The request's token is its UID, so a grant this copy of the object does
    // not show yet (a stale cache, or a crash between acquiring and writing
    // the status) is released here too; token-fenced, so it never touches
    // another holder's lock.
    if let Some(uid) = lock.uid() {
        let key = queue::lock_key(lock);
        let started = Instant::now();
        let released = ctx.locks.release(&key, &uid).await;
        record_engine(ctx, "release", started, &released);
        if released.map_err(Error::Lock)? {
            ctx.metrics.releases.inc();
            tracing::info!(%key, "released a grant the cached status did not show yet");
            mark_released(ctx, &key);
        }
    }
    let previous = lock.status.clone().unwrap_or_default();
    let mut next = DistributedLockStatus {
        phase: Some(phase),
        lock_key: Some(queue::lock_key(lock)),
        holder: previous.holder.clone(),
        fencing_token: previous.fencing_token,
        acquired_at: previous.acquired_at.clone(),
        observed_generation: lock.metadata.generation,
        conditions: previous.conditions.clone(),
        ..Default::default()
    };
    set_condition(&mut next, lock, "Granted", "False", reason, message);
    if matches!(phase, Phase::Failed) {
        publish(ctx, lock, EventType::Warning, "Failed", format!("{reason}: {message}")).await;
    }
    write_status(lock, ctx, next).await?;
    wake_queue(ctx, &queue::lock_key(lock));
    Ok(Action::await_change())
}

async fn write_pending(
    lock: &DistributedLock,
    ctx: &Context,
    position: usize,
    reason: &str,
    message: &str,
) -> Result<()> {
    let previous = lock.status.clone().unwrap_or_default();
    let mut next = DistributedLockStatus {
        phase: Some(Phase::Pending),
        lock_key: Some(queue::lock_key(lock)),
        waiting_position: Some(position as i32),
        observed_generation: lock.metadata.generation,
        conditions: previous.conditions.clone(),
        ..Default::default()
    };
    set_condition(&mut next, lock, "Granted", "False", reason, message);
    mark_index_reachable(&mut next, lock);
    write_status(lock, ctx, next).await
}

async fn write_granted(lock: &DistributedLock, ctx: &Context, grant: &Lock) -> Result<()> {
    let previous = lock.status.clone().unwrap_or_default();
    let now = Utc::now();
    let mut next = DistributedLockStatus {
        phase: Some(Phase::Granted),
        lock_key: Some(grant.lock_id.clone()),
        token: Some(grant.token.clone()),
        fencing_token: Some(grant.fencing_token as i64),
        holder: Some(display_holder(lock)),
        acquired_at: Some(rfc3339(grant.created_at)),
        expires_at: Some(rfc3339(grant.expires_at)),
        renewed_at: Some(rfc3339(now)),
        waiting_position: None,
        observed_generation: lock.metadata.generation,
        conditions: previous.conditions.clone(),
    };
    set_condition(
        &mut next,
        lock,
        "Granted",
        "True",
        "Acquired",
        &format!("lock {} granted, fencing token {}", grant.lock_id, grant.fencing_token),
    );
    mark_index_reachable(&mut next, lock);
    write_status(lock, ctx, next).await
}

fn mark_index_reachable(status: &mut DistributedLockStatus, lock: &DistributedLock) {
    set_condition(
        status,
        lock,
        "IndexReachable",
        "True",
        "Reachable",
        "the lock index answers",
    );
}

/// Best effort: tell the user (status condition) that the lock index cannot be reached.
async fn mark_index_unreachable(lock: &DistributedLock, ctx: &Context, error: &LockError) {
    ctx.readiness.engine_reachable.store(false, Ordering::Relaxed);
    let mut next = lock.status.clone().unwrap_or_default();
    next.phase = Some(next.phase.unwrap_or_default());
    set_condition(
        &mut next,
        lock,
        "IndexReachable",
        "False",
        "IndexUnreachable",
        &format!("the lock index cannot be reached ({}); retrying", error.category()),
    );
    if let Err(e) = write_status(lock, ctx, next).await {
        tracing::debug!(error = %e, "could not record IndexUnreachable");
    }
}

fn record_engine<T>(ctx: &Context, operation: &'static str, started: Instant, result: &Result<T, LockError>) {
    ctx.metrics.engine_call(operation, started.elapsed(), result);
    if result.is_ok() {
        ctx.readiness.engine_reachable.store(true, Ordering::Relaxed);
    }
}

/// Writes the status with server-side apply under our field manager, unless
/// nothing changed (so a reconcile does not cause another one).
async fn write_status(lock: &DistributedLock, ctx: &Context, next: DistributedLockStatus) -> Result<()> {
    if lock.status.as_ref() == Some(&next) {
        return Ok(());
    }
    let api: Api<DistributedLock> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "lockmanager.dev/v1alpha1",
        "kind": "DistributedLock",
        "status": next,
    });
    api.patch_status(
        &lock.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::Kube)?;
    Ok(())
}

/// Sets a condition, keeping its lastTransitionTime when the status is unchanged.
fn set_condition(
    status: &mut DistributedLockStatus,
    lock: &DistributedLock,
    type_: &str,
    value: &str,
    reason: &str,
    message: &str,
) {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let existing = status.conditions.iter_mut().find(|c| c.type_ == type_);
    match existing {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now;
            }
            c.status = value.into();
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = lock.metadata.generation;
        }
        None => status.conditions.push(Condition {
            type_: type_.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: lock.metadata.generation,
        }),
    }
}

async fn publish(ctx: &Context, lock: &DistributedLock, type_: EventType, reason: &str, note: String) {
    let event = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &lock.object_ref(&())).await {
        tracing::debug!(error = %e, "could not publish event");
    }
}

/// spec.holder, else the holderRef, else the request's name.
pub fn display_holder(lock: &DistributedLock) -> String {
    if let Some(holder) = &lock.spec.holder {
        return holder.clone();
    }
    if let Some(r) = &lock.spec.holder_ref {
        return format!("{:?}/{}", r.kind, r.name);
    }
    lock.name_any()
}

/// Leases are renewed every ttl/4.
pub fn renew_period(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(100))
}

fn requeue_within(deadline: Option<Duration>, fallback: Duration) -> Action {
    Action::requeue(deadline.map_or(fallback, |d| d.min(fallback)))
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_a_quarter_of_the_ttl() {
        assert_eq!(renew_period(Duration::from_secs(30)), Duration::from_millis(7500));
        assert_eq!(renew_period(Duration::from_millis(200)), Duration::from_millis(100));
    }

    #[test]
    fn times_round_trip() {
        let t = parse_time("2026-11-26T13:00:00.123Z").unwrap();
        assert_eq!(rfc3339(t), "2026-11-26T13:00:00.123Z");
    }
}
