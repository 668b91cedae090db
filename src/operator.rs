//! `lockctl operator`: wires the Kubernetes client, the lock index, the
//! watch streams, the two controllers (requests and gated Jobs), leader
//! election, the HTTP endpoints and shutdown on SIGTERM/SIGINT.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Args;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Controller;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::controller::index::QueueIndex;
use crate::controller::status::{IndexHealth, reason};
use crate::controller::{self, Context};
use crate::crd::{DistributedLock, FIELD_MANAGER, HolderKind, Semaphore};
use crate::engine::EngineArgs;
use crate::http::Readiness;
use crate::lock::{LockClient, LockError};
use crate::metrics::Metrics;
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
    /// Only manage DistributedLocks (and gated Jobs) with these labels (e.g. `shard=a`); default: all.
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

/// Errors of the operator as a whole (start-up, leadership).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("cannot connect to Kubernetes: {0}")]
    Kube(#[source] kube::Error),
    #[error("cannot load the kubeconfig or in-cluster configuration: {0}")]
    KubeConfig(String),
    #[error("the {0} CRD is not installed (`lockctl crd | kubectl apply -f -` installs both): {1}")]
    CrdMissing(&'static str, #[source] kube::Error),
    #[error("the lock index is not usable: {0}")]
    Engine(#[from] LockError),
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    LeadershipLost(#[from] crate::leader::LeadershipLost),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// How long in-flight reconciles may take after SIGTERM before the process ends anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Objects a consumer of a watch's fan-out may be behind (controller::watch::fan_out).
const SHARED_STREAM_BUFFER: usize = 1024;

/// Runs the controllers until SIGTERM/SIGINT.
pub async fn run(args: OperatorArgs) -> Result<(), OperatorError> {
    let shutdown = shutdown_signal()?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| OperatorError::KubeConfig(crate::lock::error_line(&e)))?;
    // read as RawRequest: whatever one request holds, the check answers
    Api::<controller::raw::RawRequest>::all(client.clone())
        .list(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 404 => OperatorError::CrdMissing("DistributedLock", e),
            _ => OperatorError::Kube(e),
        })?;
    Api::<Semaphore>::all(client.clone())
        .list_metadata(&kube::api::ListParams::default().limit(1))
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 404 => OperatorError::CrdMissing("Semaphore", e),
            _ => OperatorError::Kube(e),
        })?;
    let locks = LockClient::from_args(&args.engine)?;
    let index_health = match locks.ensure_ready().await {
        Ok(()) => IndexHealth::Reachable,
        // Needs an admin, not a restart loop: stay up, grant nothing, and say
        // so on every request (condition, event) and in /readyz.
        Err(e) if controller::Category::of_lock_error(&e) == controller::Category::Fencing => {
            tracing::error!(error = %crate::lock::error_line(&e), "the lock index refuses grants");
            IndexHealth::Failing(reason::FENCING_UNPROVEN, crate::lock::error_line(&e))
        }
        Err(e) => return Err(e.into()),
    };

    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    readiness
        .engine_reachable
        .store(index_health == IndexHealth::Reachable, Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| OperatorError::Http {
            addr: args.http_addr,
            source,
        })?;
    let http = tokio::spawn(
        crate::http::serve(listener, metrics.clone(), readiness.clone()).map(|r| {
            if let Err(e) = r {
                tracing::error!(error = %e, "HTTP server stopped");
            }
        }),
    );

    let recorder = controller::events::Recorder::new(client.clone(), FIELD_MANAGER, std::env::var("POD_NAME").ok());
    let index = Arc::new(QueueIndex::default());
    let (lock_store, lock_writer) = reflector::store::<DistributedLock>();
    let (job_store, job_writer) = reflector::store::<Job>();
    let (semaphore_store, semaphore_writer) = reflector::store::<Semaphore>();
    let (wake, woken) = mpsc::unbounded_channel();
    let ctx = Arc::new(Context {
        client: client.clone(),
        locks,
        store: lock_store.clone(),
        jobs: job_store.clone(),
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        wake,
        cluster_scope_namespaces: (!args.cluster_scope_namespaces.is_empty())
            .then(|| args.cluster_scope_namespaces.iter().cloned().collect::<HashSet<_>>()),
        max_retry_interval: args.max_retry_interval,
        index: index.clone(),
        index_health: std::sync::Mutex::new(index_health),
        semaphores: semaphore_store.clone(),
        semaphores_listed: Default::default(),
        permit_holders: Default::default(),
        selector: args.selector.clone(),
    });
    tracing::info!(index = %ctx.locks.index(), "operator started");

    let mut lock_watch = watcher::Config::default().any_semantic();
    let mut job_watch = watcher::Config::default().any_semantic();
    let mut semaphore_watch = watcher::Config::default().any_semantic();
    if let Some(selector) = &args.selector {
        lock_watch = lock_watch.labels(selector);
        job_watch = job_watch.labels(selector);
        semaphore_watch = semaphore_watch.labels(selector);
    }
    let (bad_objects, bad_objects_rx) = mpsc::unbounded_channel();
    tokio::spawn(controller::watch::report_undecodable(
        bad_objects_rx,
        recorder.clone(),
        metrics.clone(),
    ));

    // One watch per kind, fanned out to the controllers (controller::watch::fan_out).
    let synced = readiness.clone();
    let lock_index = index.clone();
    let first_pass = Arc::new(controller::first_pass::FirstPass::default());
    let listed = first_pass.clone();
    let (departed, departures) = mpsc::unbounded_channel();
    let cached = ctx.store.clone();
    let lock_events = controller::watch::requests(client.clone(), lock_watch, bad_objects).inspect_ok(move |event| {
        // gone from this operator's view: deleted, or no longer selected —
        // while the watch was down too (a relist that no longer has it;
        // the store still has the copy until it takes the list)
        for unlisted in lock_index.observe(event) {
            if let Some(lock) = cached.get(&unlisted) {
                let _ = departed.send(lock.as_ref().clone());
            }
        }
        listed.observe(event);
        if let watcher::Event::Delete(lock) = event {
            let _ = departed.send(lock.clone());
        }
        if matches!(event, watcher::Event::InitDone) && !synced.synced.swap(true, Ordering::Relaxed) {
            tracing::info!("DistributedLock watcher synced");
        }
    });
    let (lock_events, [locks_for_controller, locks_for_gate, locks_for_semaphores]) =
        controller::watch::fan_out(lock_events, lock_writer, SHARED_STREAM_BUFFER);
    let lock_root = lock_events.for_each(|_| futures::future::ready(()));
    let (job_index, job_gone) = (index.clone(), ctx.wake.clone());
    let job_events = watcher::watcher(Api::<Job>::all(client.clone()), job_watch)
        .default_backoff()
        .modify(|job| job.managed_fields_mut().clear())
        .inspect_ok(move |event| {
            job_index.observe_job(event);
            // the fan-out carries no deletions: wake the requests a deleted Job held
            if let watcher::Event::Delete(job) = event {
                let holder = (job.namespace().unwrap_or_default(), HolderKind::Job, job.name_any());
                for request in job_index.held_by(&holder) {
                    let _ = job_gone.send(request);
                }
            }
        });
    let (job_events, [jobs_for_controller, jobs_for_gate]) =
        controller::watch::fan_out(job_events, job_writer, SHARED_STREAM_BUFFER);
    let job_root = job_events.for_each(|_| futures::future::ready(()));

    let semaphore_events = watcher::watcher(Api::<Semaphore>::all(client.clone()), semaphore_watch)
        .default_backoff()
        .modify(|semaphore| semaphore.managed_fields_mut().clear());
    let (semaphore_events, [semaphores_for_locks, semaphores_for_controller]) =
        controller::watch::fan_out(semaphore_events, semaphore_writer, SHARED_STREAM_BUFFER);
    let semaphore_root = semaphore_events
        .inspect_ok({
            let ctx = ctx.clone();
            move |event| match event {
                watcher::Event::InitDone => ctx.semaphores_listed.store(true, Ordering::Relaxed),
                // the fan-out carries no deletions: a Semaphore gone (its
                // store entry already removed) turns its key back into a
                // mutex, so its waiters are decided on again now, not at
                // their next retry
                watcher::Event::Delete(semaphore) => {
                    for request in ctx.index.of_key(&controller::semaphores::key_of(semaphore)) {
                        let _ = ctx.wake.send(request);
                    }
                }
                _ => {}
            }
        })
        .for_each(|_| futures::future::ready(()));

    // Requests as they were listed are reconciled a few at a time, behind
    // what changed since (see controller::first_pass).
    let (to_pace, pacing) = mpsc::unbounded_channel();
    let (paced, paced_rx) = mpsc::unbounded_channel();
    let fresh = {
        let first_pass = first_pass.clone();
        locks_for_controller.filter(move |lock| {
            // (were the pacer gone, the controller would take them all)
            let paced =
                first_pass.is_listed(lock) && to_pace.send(reflector::ObjectRef::from_obj(lock.as_ref())).is_ok();
            futures::future::ready(!paced)
        })
    };
    let pacer = tokio::spawn(controller::first_pass::pace(
        first_pass.clone(),
        lock_store.clone(),
        pacing,
        paced,
    ));
    let (holder_index, pod_index, key_index) = (index.clone(), index.clone(), index.clone());
    let mut lock_controller = Controller::for_shared_stream(fresh, lock_store.clone())
        .watches_shared_stream(jobs_for_controller, move |job| {
            holder_index.held_by(&(job.namespace().unwrap_or_default(), HolderKind::Job, job.name_any()))
        })
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            move |pod| pod_index.held_by(&(pod.namespace().unwrap_or_default(), HolderKind::Pod, pod.name_any())),
        )
        // a Semaphore's limit moves the queue of its key
        .watches_shared_stream(semaphores_for_locks, move |semaphore| {
            key_index.of_key(&controller::semaphores::key_of(&semaphore))
        });
    if args.selector.is_some() {
        // A holderRef Job need not carry the selector's labels (the shared Job
        // watch only sees those, for the gate): watch every Job's metadata so
        // that a holder finishing or going releases its lock at once, not at
        // the next renewal.
        let (finished_index, gone) = (index.clone(), ctx.wake.clone());
        let every_job = watcher::watcher(
            Api::<kube::core::PartialObjectMeta<Job>>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff()
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(job) = event {
                let holder = (job.namespace().unwrap_or_default(), HolderKind::Job, job.name_any());
                for request in finished_index.held_by(&holder) {
                    let _ = gone.send(request);
                }
            }
        })
        .touched_objects();
        let held_index = index.clone();
        lock_controller = lock_controller.watches_stream(every_job, move |job| {
            held_index.held_by(&(job.namespace().unwrap_or_default(), HolderKind::Job, job.name_any()))
        });
    }
    let reconciled = first_pass.clone();
    let lock_controller = lock_controller
        .reconcile_on(UnboundedReceiverStream::new(woken))
        .reconcile_on(UnboundedReceiverStream::new(paced_rx))
        .graceful_shutdown_on(wait_for(shutdown.clone()))
        .run(controller::reconcile, controller::error_policy, ctx.clone())
        .for_each(move |result| {
            use kube::runtime::controller::Error as Run;
            match &result {
                Ok((object, _)) => reconciled.finished(object.namespace.as_deref(), &object.name),
                Err(Run::ReconcilerFailed(_, object) | Run::ObjectNotFound(object)) => {
                    reconciled.finished(object.namespace.as_deref(), &object.name)
                }
                Err(_) => {}
            }
            futures::future::ready(())
        });
    let job_gate = Controller::for_shared_stream(jobs_for_gate, job_store.clone())
        .owns_shared_stream(locks_for_gate)
        .graceful_shutdown_on(wait_for(shutdown.clone()))
        .run(crate::gate::reconcile_job, crate::gate::job_error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()));
    let governed = semaphore_store.clone();
    let semaphore_controller = Controller::for_shared_stream(semaphores_for_controller, semaphore_store.clone())
        // grants and releases change who holds a semaphore's permits
        .watches_shared_stream(locks_for_semaphores, move |lock| {
            let key = queue::lock_key(&lock);
            governed
                .state()
                .into_iter()
                .filter(|s| controller::semaphores::key_of(s) == key)
                .map(|s| reflector::ObjectRef::from_obj(s.as_ref()))
                .collect::<Vec<_>>()
        })
        .with_config(kube::runtime::controller::Config::default().debounce(Duration::from_millis(200)))
        .graceful_shutdown_on(wait_for(shutdown.clone()))
        .run(
            controller::semaphores::reconcile,
            controller::semaphores::error_policy,
            ctx.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let gauges = tokio::spawn(controller::update_gauges_every(ctx.clone(), Duration::from_secs(1)));
    let work = async {
        tokio::select! {
            _ = futures::future::join3(lock_controller, job_gate, semaphore_controller) => {}
            // the watch streams end only with the process
            _ = futures::future::join3(lock_root, job_root, semaphore_root) => {}
            _ = controller::departures(ctx.clone(), departures) => {}
        }
    };
    // After the first signal, in-flight reconciles get a grace period; then we stop anyway.
    let work = async {
        tokio::select! {
            _ = work => {}
            _ = async { wait_for(shutdown.clone()).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                tracing::warn!("reconciles did not finish within {SHUTDOWN_GRACE:?} of the shutdown signal; stopping");
            }
        }
    };
    let result = if args.leader_elect {
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
        // A standby has no watchers to sync; it is ready to take over.
        readiness.synced.store(true, Ordering::Relaxed);
        let (leading_readiness, leading_metrics) = (readiness.clone(), metrics.clone());
        let result =
            crate::leader::lead_then_run(client.clone(), config, work, wait_for(shutdown.clone()), move || {
                leading_readiness.synced.store(false, Ordering::Relaxed);
                leading_metrics.leader.set(1);
            })
            .await
            .map_err(OperatorError::from);
        metrics.leader.set(0);
        result
    } else {
        metrics.leader.set(1);
        work.await;
        Ok(())
    };
    http.abort();
    gauges.abort();
    pacer.abort();
    tracing::info!("operator stopped");
    result
}

/// A receiver that turns true on the first SIGTERM or SIGINT.
fn shutdown_signal() -> Result<watch::Receiver<bool>, OperatorError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut sigterm = signal(SignalKind::terminate()).map_err(OperatorError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(OperatorError::Signal)?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
        tracing::info!("shutdown signal received");
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn wait_for(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}
