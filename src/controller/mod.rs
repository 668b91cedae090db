//! The controller: grants `DistributedLock` requests through the lock index,
//! in queue order, renews their leases and releases them when done.
//!
//! Reconcile = finalizer → apply / cleanup. Each phase decides with a pure
//! function ([`pending::decide`], [`granted::decide`], [`crate::queue`]) and
//! then acts; I/O stays in the `reconcile` functions and in [`Context`].

pub mod admission;
pub mod error;
pub mod events;
pub mod first_pass;
pub mod granted;
pub mod holder;
pub mod index;
pub mod pending;
pub mod raw;
pub mod semaphores;
pub mod status;
pub mod watch;

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::mpsc;

pub use error::{Category, Error, Result};
use status::{IndexHealth, reason};

use crate::crd::{DistributedLock, FINALIZER, HolderKind, Phase, Semaphore};
use crate::http::Readiness;
use crate::lock::{LockClient, LockError};
use crate::metrics::Metrics;
use crate::queue::{self, Arrival, Sightings};

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub locks: LockClient,
    pub store: Store<DistributedLock>,
    pub jobs: Store<Job>,
    pub recorder: events::Recorder,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// Requests to reconcile now: the queue moved.
    pub wake: mpsc::UnboundedSender<ObjectRef<DistributedLock>>,
    pub cluster_scope_namespaces: Option<HashSet<String>>,
    pub max_retry_interval: Duration,
    pub index: Arc<index::QueueIndex>,
    /// How the lock index answered last.
    pub index_health: Mutex<IndexHealth>,
    pub semaphores: Store<Semaphore>,
    /// The Semaphore watch has listed them all (until then no request is decided on).
    pub semaphores_listed: std::sync::atomic::AtomicBool,
    /// Each semaphore key as the lock index last showed it (holders outside
    /// this cluster included).
    pub permit_holders: Mutex<std::collections::HashMap<String, crate::lock::Semaphore>>,
    /// `--selector`: the requests this operator manages (`None`: all).
    pub selector: Option<String>,
}

/// How soon a reconcile skipped for a copy older than our own last write
/// ([`index::QueueIndex::behind_own_write`]) looks again if the watch has not
/// brought the newer copy by then (which triggers it at once).
const BEHIND_OWN_WRITE_RETRY: Duration = Duration::from_millis(100);

impl Context {
    /// Runs one lock index call: times it, counts failures, and keeps the
    /// index's health (readiness, the waiters' IndexReachable condition) current.
    #[tracing::instrument(level = "debug", name = "engine", skip(self, lock, call))]
    pub async fn engine<T>(
        &self,
        operation: &'static str,
        lock: &DistributedLock,
        call: impl Future<Output = Result<T, LockError>>,
    ) -> Result<T> {
        match self.timed(operation, call).await {
            Ok(value) => {
                self.set_index_health(IndexHealth::Reachable);
                Ok(value)
            }
            Err(e) => {
                let category = Category::of_lock_error(&e);
                // about this key or request (a document in a shape we cannot
                // read, a refused id), not the index's health: no other
                // request is told the index is down
                if matches!(category, Category::Invalid | Category::Held | Category::Kind) {
                    return Err(Error::Lock(e));
                }
                if matches!(category, Category::Response | Category::Document) {
                    let next = status::with_index_health(
                        lock,
                        &IndexHealth::Failing(reason::UNREADABLE_LOCK, crate::lock::error_line(&e)),
                    );
                    self.write_aside(lock, next, "could not record the lock's problem");
                    return Err(Error::Lock(e));
                }
                let health = match category {
                    Category::Fencing | Category::Index => {
                        let message = crate::lock::error_line(&e);
                        // needs an admin: say so loudly, on the request it stops
                        let note = format!("no lock is granted: {message}");
                        self.warn_aside(lock, reason::FENCING_UNPROVEN, note);
                        IndexHealth::Failing(reason::FENCING_UNPROVEN, message)
                    }
                    Category::ReadOnly => {
                        let message = crate::lock::error_line(&e);
                        self.warn_aside(lock, reason::INDEX_READ_ONLY, message.clone());
                        IndexHealth::Failing(reason::INDEX_READ_ONLY, message)
                    }
                    _ => IndexHealth::Failing(
                        reason::INDEX_UNREACHABLE,
                        format!("the lock index cannot be reached ({}); retrying", category.as_str()),
                    ),
                };
                self.set_index_health(health.clone());
                // best effort: tell this request's user at once
                let next = status::with_index_health(lock, &health);
                self.write_aside(lock, next, "could not record the index's health");
                Err(Error::Lock(e))
            }
        }
    }

    /// A best-effort status write, not waited for: the reconcile that asks
    /// for it may hold a lease whose next renewal must not wait on an API
    /// server that does not answer.
    fn write_aside(&self, lock: &DistributedLock, next: crate::crd::DistributedLockStatus, failed: &'static str) {
        let (client, lock) = (self.client.clone(), lock.clone());
        tokio::spawn(async move {
            if let Err(e) = status::write(&client, &lock, next).await {
                tracing::debug!(error = %e, failed);
            }
        });
    }

    /// Writes `lock`'s status ([`status::write`]) and notes the write, so
    /// that copies from before it are not decided on again
    /// ([`index::QueueIndex::behind_own_write`]). Not for a Granted status
    /// or a renewal: a stale copy of a holder must still renew.
    pub async fn write_status(
        &self,
        lock: &DistributedLock,
        next: crate::crd::DistributedLockStatus,
    ) -> Result<Option<String>> {
        let written = status::write(&self.client, lock, next).await?;
        self.index.wrote(lock, written.as_deref());
        Ok(written)
    }

    /// A Warning event, not waited for (see [`Self::write_aside`]).
    pub fn warn_aside(&self, lock: &DistributedLock, reason: &'static str, note: String) {
        let (recorder, object) = (self.recorder.clone(), object_ref(lock));
        tokio::spawn(async move { events::warning(&recorder, &object, reason, note).await });
    }

    /// Runs one lock index call, timing it and counting its failure.
    pub async fn timed<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, LockError>>,
    ) -> Result<T, LockError> {
        let started = Instant::now();
        let result = call.await;
        self.metrics.engine_call(operation, started.elapsed(), &result);
        result
    }

    /// Whether `namespace` may use `scope` (scope Cluster only from the
    /// allow-list, when there is one); `Err` is the message saying why not.
    pub fn scope_allowed(&self, namespace: &str, scope: crate::crd::LockScope) -> Result<(), String> {
        let Some(allowed) = &self.cluster_scope_namespaces else {
            return Ok(());
        };
        if scope != crate::crd::LockScope::Cluster || allowed.contains(namespace) {
            return Ok(());
        }
        let mut names: Vec<_> = allowed.iter().cloned().collect();
        names.sort();
        Err(format!(
            "namespace {namespace:?} may not use scope Cluster (allowed: {})",
            names.join(", ")
        ))
    }

    /// A gated Job's place in line: its creation and the resourceVersion it
    /// had when first seen (else its current one).
    pub fn job_arrival(&self, job: &Job) -> Arrival {
        Arrival {
            at: job
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp_millis(t.0.as_millisecond())),
            sequence: self
                .index
                .job_first_seen(job)
                .or_else(|| job.resource_version().and_then(|rv| rv.parse().ok()))
                .unwrap_or(u64::MAX),
        }
    }

    /// The index's health as this controller saw it last.
    pub fn index_health(&self) -> IndexHealth {
        self.index_health.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the index's health; when it flips, every waiter is woken so
    /// that its IndexReachable condition follows.
    fn set_index_health(&self, health: IndexHealth) {
        self.readiness
            .engine_reachable
            .store(health == IndexHealth::Reachable, Ordering::Relaxed);
        let flipped = {
            let mut current = self.index_health.lock().unwrap_or_else(|p| p.into_inner());
            let flipped = std::mem::discriminant(&*current) != std::mem::discriminant(&health);
            *current = health;
            flipped
        };
        if flipped {
            for lock in self.store.state() {
                if queue::phase(&lock) == Phase::Pending {
                    let _ = self.wake.send(ObjectRef::from_obj(lock.as_ref()));
                }
            }
        }
    }

    /// The request's place in line: recorded in its status, else the gated
    /// Job's creation (time and first-seen resourceVersion), else its own
    /// (see [`queue::Arrival::unrecorded`]).
    pub fn arrival(&self, lock: &DistributedLock) -> Arrival {
        if let Some(recorded) = Arrival::recorded(lock) {
            return recorded;
        }
        if let Some(job) = self.gating_job(lock) {
            return self.job_arrival(&job);
        }
        Arrival::unrecorded(lock, self.index.first_seen(lock))
    }

    /// The Semaphore that governs `key`, if any (see [`semaphores::governing`]).
    pub fn semaphore_for(&self, key: &str) -> Option<Arc<Semaphore>> {
        semaphores::governing(&self.semaphores.state(), key, &|s| {
            semaphores::scope_allowed(self, s).is_ok()
        })
    }

    /// Remembers how the lock index showed a semaphore key.
    pub fn saw_permits(&self, semaphore: &crate::lock::Semaphore) {
        let mut seen = self.permit_holders.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(semaphore.lock_id.clone(), semaphore.clone());
    }

    /// How the lock index last showed a semaphore key.
    pub fn seen_permits(&self, key: &str) -> Option<crate::lock::Semaphore> {
        let seen = self.permit_holders.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(key).cloned()
    }

    /// The Job a suspend-gated request was made for: its controlling owner,
    /// which its holderRef names, with the owner reference's UID.
    pub fn gating_job(&self, lock: &DistributedLock) -> Option<Arc<Job>> {
        let holder = lock.spec.holder_ref.as_ref().filter(|h| h.kind == HolderKind::Job)?;
        let owner = lock
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "Job" && o.name == holder.name)?;
        let job = self
            .jobs
            .get(&ObjectRef::new(&holder.name).within(&lock.namespace().unwrap_or_default()))?;
        // The owner reference and holderRef are the requester's to write; only
        // a request the gate itself made for that Job (its name, the Job's
        // lock annotation for this lockId) queues by the Job's creation.
        let made_for_it = job.uid().as_deref() == Some(owner.uid.as_str())
            && job.annotations().get(crate::crd::LOCK_ANNOTATION) == Some(&lock.spec.lock_id)
            && holder::request_names(&job).contains(&lock.name_any());
        made_for_it.then_some(job)
    }
}

/// The queue orders every request by [`Context::arrival`]: a suspend-gated
/// request by its Job's arrival even before its own status records it.
impl Sightings for Context {
    fn first_seen(&self, lock: &DistributedLock) -> Option<u64> {
        self.index.first_seen(lock)
    }

    fn unrecorded(&self, lock: &DistributedLock) -> Arrival {
        self.arrival(lock)
    }
}

/// The reference events about a request point at.
pub fn object_ref(lock: &DistributedLock) -> ObjectReference {
    lock.object_ref(&())
}

pub fn error_policy(lock: Arc<DistributedLock>, error: &Error, ctx: Arc<Context>) -> Action {
    let retry = retry_after(&*lock, error, &ctx);
    // a holder's lease runs on: its next try never comes later than a renewal
    // period (also for a grant whose Granted status is not in the cache yet)
    if queue::phase(&lock) == Phase::Granted || ctx.index.holds_unseen_grant(&lock) {
        let (_, period) = granted::lease_plan(&lock);
        let backoff = error.category().backoff();
        if period < backoff {
            return Action::requeue(period);
        }
    }
    retry
}

/// Counts a failed reconcile (of a request or a gated Job) by category and
/// retries after that category's backoff.
pub fn retry_after<K: Resource<DynamicType = ()>>(object: &K, error: &Error, ctx: &Context) -> Action {
    let category = error.category();
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::CategoryLabels {
            category: category.as_str(),
        })
        .inc();
    let level_warn = !matches!(category, Category::Conflict | Category::Waiting);
    if !level_warn {
        tracing::debug!(kind = %K::kind(&()), name = %object.name_any(), "decided on a stale copy; deciding again");
        return Action::requeue(category.backoff());
    }
    tracing::warn!(
        kind = %K::kind(&()),
        name = %object.name_any(),
        namespace = object.namespace().unwrap_or_default(),
        error = %error,
        category = category.as_str(),
        "reconcile failed"
    );
    Action::requeue(category.backoff())
}

#[tracing::instrument(skip(lock, ctx), fields(name = %lock.name_any(), namespace = lock.namespace().unwrap_or_default()))]
pub async fn reconcile(lock: Arc<DistributedLock>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciliations.inc();
    // which keys are semaphores is known only once the Semaphores are listed:
    // before that a request of a semaphore key would be taken for a mutex one
    if !ctx.semaphores_listed.load(Ordering::Relaxed) {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    let namespace = lock
        .namespace()
        .ok_or_else(|| Error::Invalid("DistributedLock without a namespace".into()))?;
    // a copy from before our own Granted write: the newer one is on its way
    if let Some(wait) = ctx.index.behind_own_grant(&lock, Instant::now()) {
        return Ok(Action::requeue(wait));
    }
    // a copy from before our own last write: the newer one is on its way
    // (and should the watch be slow to bring it, a timer that fired on this
    // copy — a poll, a deadline — is not lost: look again soon)
    if ctx.index.behind_own_write(&lock) {
        tracing::debug!(name = %lock.name_any(), version = ?lock.resource_version(), "a copy older than our own last write: waiting for the newer one");
        return Ok(Action::requeue(BEHIND_OWN_WRITE_RETRY));
    }
    let api: Api<DistributedLock> = Api::namespaced(ctx.client.clone(), &namespace);
    if lock.metadata.deletion_timestamp.is_none() && !lock.finalizers().iter().any(|f| f == FINALIZER) {
        return arrive(&Api::namespaced(ctx.client.clone(), &namespace), &lock, &ctx).await;
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

/// A request this controller has not taken on yet: first its place in line
/// goes into its status, then the release finalizer is added. In this order
/// the first write to a new request is the one that records its arrival, so
/// a controller that starts after a crash still finds every unrecorded
/// request at the resourceVersion it was created with (the tiebreak within
/// a second), never at a later one of its own making.
///
/// A request alone on its key skips that write (the status that grants it,
/// or tells it to wait, records its arrival): if the controller stops before
/// that status is written, its successor finds it with our finalizer and no
/// recorded arrival, and places it first within its creation second
/// ([`queue::Arrival::unrecorded`]). That is its true place: when it was
/// taken on, every request of the key created before it had been delivered
/// by the watch (in resourceVersion order) and none was live, so every other
/// request of the key was created after it.
async fn arrive(api: &Api<raw::RawRequest>, lock: &DistributedLock, ctx: &Context) -> Result<Action> {
    let version = if queue::Arrival::recorded(lock).is_some() || alone_on_its_key(lock, ctx) {
        lock.resource_version()
    } else {
        match ctx.write_status(lock, status::arrived(lock, &ctx.arrival(lock))).await {
            Ok(version) => version,
            // a newer copy is on its way and triggers the next reconcile
            Err(Error::Stale) => return Ok(Action::await_change()),
            Err(e) => return Err(e),
        }
    };
    add_finalizer(api, lock, version, ctx).await
}

/// No other live request of this cluster uses `lock`'s key, and no
/// suspend-gated Job is about to queue for it; `lock` itself is not a gated
/// request (those take their Job's place in line).
fn alone_on_its_key(lock: &DistributedLock, ctx: &Context) -> bool {
    let key = queue::lock_key(lock);
    ctx.gating_job(lock).is_none()
        && ctx
            .index
            .members(&ctx.store, &key)
            .iter()
            .all(|m| m.uid() == lock.uid() || queue::phase(m).is_final())
        && crate::gate::job_queued_ahead(ctx, &key, &ctx.arrival(lock)).is_none()
}

/// Adds the release finalizer in one compare-and-swap write (at `version`,
/// the resourceVersion of our copy), so a stale copy never overwrites
/// someone's finalizers.
async fn add_finalizer(
    api: &Api<raw::RawRequest>,
    lock: &DistributedLock,
    version: Option<String>,
    ctx: &Context,
) -> Result<Action> {
    let mut finalizers = lock.finalizers().to_vec();
    finalizers.push(FINALIZER.to_string());
    let patch = Patch::Merge(json!({
        "metadata": {"resourceVersion": version, "finalizers": finalizers}
    }));
    match api.patch(&lock.name_any(), &PatchParams::default(), &patch).await {
        // The write itself triggers the next reconcile.
        Ok(written) => {
            ctx.index.wrote(lock, written.metadata.resource_version.as_deref());
            Ok(Action::await_change())
        }
        // We acted on a stale copy: the newer one is on its way and triggers
        // the next reconcile, so there is nothing to retry.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Action::await_change()),
        Err(e) => Err(Error::Kube(e)),
    }
}

async fn apply(lock: Arc<DistributedLock>, ctx: &Context) -> Result<Action> {
    let key = queue::lock_key(&lock);
    // Whatever changed about this request may have moved the others.
    wake_queue(ctx, &key, Some(&lock), false);
    match queue::phase(&lock) {
        phase if phase.is_final() => {
            ctx.index.forget_released(&lock);
            Ok(Action::await_change())
        }
        Phase::Granted => granted::reconcile(lock, ctx, &key).await,
        _ => pending::reconcile(lock, ctx, &key).await,
    }
}

/// Deletion: release the lock (token-fenced; "already released" is fine),
/// whatever the status says — a crash between acquiring and writing the
/// status leaves a grant the status does not show — then let the next in.
#[tracing::instrument(level = "debug", skip_all)]
async fn cleanup(lock: Arc<DistributedLock>, ctx: &Context) -> Result<Action> {
    let key = queue::lock_key(&lock);
    // A suspend-gated request deleted along with its Job (garbage collection):
    // the Job's Pods may still run through their grace period, so the lock is
    // kept — and renewed — until they are gone. (Deleting the request itself,
    // while its Job stays, releases at once: that is how a lock is forced free.)
    if queue::phase(&lock) == Phase::Granted && holder::owned_by_holder(&lock) && pods_may_run(&lock, ctx).await {
        // renew if due, then keep the finalizer: cleanup is not done
        granted::reconcile(lock, ctx, &key).await?;
        return Err(Error::HolderStillRunning);
    }
    let released_at = Instant::now();
    if release_own(&lock, ctx, &key).await? {
        // the next waiter's grant first: this request's event and finalizer
        // removal are writes that would compete with it
        if !queue::waiters(&ctx.index.members(&ctx.store, &key), &key, ctx).is_empty() {
            ctx.index.next_grant(&key, released_at, HANDOVER_GRACE).await;
        }
        let note = format!("lock {key} released: request deleted");
        events::normal(&ctx.recorder, &object_ref(&lock), "Released", note).await;
    }
    wake_queue(ctx, &key, None, true);
    Ok(Action::await_change())
}

/// A deleted gated request's Job is going and its Pods may still run: asked
/// of the API server within half a renewal period, as a Granted request's
/// holder is ([`granted::reconcile`]); no answer keeps the lock.
async fn pods_may_run(lock: &DistributedLock, ctx: &Context) -> bool {
    let (_, period) = granted::lease_plan(lock);
    let read = async {
        Ok(holder::gating_job_going(&ctx.client, lock).await?
            && holder::fetch(&ctx.client, lock).await? == holder::HolderState::Running)
    };
    holder::within(period / 2, read).await.unwrap_or_else(|unread| {
        granted::kept_unread(ctx, lock, &unread);
        true
    })
}

/// How long a deleted holder's own last writes wait for its successor's grant.
const HANDOVER_GRACE: Duration = Duration::from_millis(100);

/// Releases any grant of `key` this request holds: its token is its UID (and
/// the status's token, should that differ). One engine round trip normally.
async fn release_own(lock: &DistributedLock, ctx: &Context, key: &str) -> Result<bool> {
    let mut tokens: Vec<String> = lock.uid().into_iter().collect();
    if let Some(token) = lock.status.as_ref().and_then(|s| s.token.clone())
        && !tokens.contains(&token)
    {
        tokens.push(token);
    }
    let mut released = false;
    for token in tokens {
        released |= ctx.engine("release", lock, ctx.locks.release(key, &token)).await?;
    }
    if released {
        ctx.metrics.releases.inc();
        if let Some(acquired) = lock
            .status
            .as_ref()
            .and_then(|s| s.acquired_at.as_deref())
            .and_then(status::parse_time)
        {
            ctx.metrics
                .hold_seconds
                .observe((Utc::now() - acquired).num_milliseconds().max(0) as f64 / 1000.0);
        }
        ctx.index.mark_released(key, Some(lock));
        wake_queue(ctx, key, None, true);
    }
    Ok(released)
}

/// Moves a request to a final phase (Released, Expired, Lost, Failed),
/// releasing whatever grant it still holds first.
pub async fn finish(
    lock: &DistributedLock,
    ctx: &Context,
    phase: Phase,
    reason: &str,
    message: &str,
) -> Result<Action> {
    let key = queue::lock_key(lock);
    let final_status = status::finished(lock, phase, reason, message);
    // A copy that is not Granted may be stale behind a Granted status still
    // on its way (a given-up write, a slow watch): its final status goes
    // first, at its resourceVersion, so that either it lands — and that
    // Granted write never can — or it is refused and nothing is released.
    let written_first = queue::phase(lock) != Phase::Granted;
    if written_first {
        ctx.write_status(lock, final_status.clone()).await?;
    }
    let released = release_own(lock, ctx, &key).await?;
    match phase {
        Phase::Released if released => {
            let note = format!("lock {key} released: {message}");
            events::normal(&ctx.recorder, &object_ref(lock), "Released", note).await;
        }
        Phase::Failed => {
            events::warning(
                &ctx.recorder,
                &object_ref(lock),
                "Failed",
                format!("{reason}: {message}"),
            )
            .await;
        }
        _ => {}
    }
    if !written_first {
        ctx.write_status(lock, final_status).await?;
    }
    wake_queue(ctx, &key, None, true);
    Ok(Action::await_change())
}

/// Reconciles, now, the requests of `key` whose state is behind the queue
/// (the head when the key is free here, waiters with a stale position).
/// `freed`: this controller just gave back a grant of `key`, so on a
/// semaphore key the waiters that may now fit are woken too (not on every
/// reconcile: waiters of a BestEffortFIFO key would wake each other for ever).
fn wake_queue(ctx: &Context, key: &str, except: Option<&DistributedLock>, freed: bool) {
    let members = ctx.index.members(&ctx.store, key);
    let may_go = match ctx.semaphore_for(key) {
        _ if !freed => queue::MayGo::HeadWhenFree,
        None => queue::MayGo::HeadWhenFree,
        Some(s) if s.spec.queueing == crate::crd::Queueing::BestEffortFIFO => queue::MayGo::Anyone,
        Some(_) => queue::MayGo::Head,
    };
    let released = |l: &DistributedLock| ctx.index.just_released(l);
    let deferred = |l: &DistributedLock| ctx.index.place_deferred(l);
    for lock in queue::needing_attention(&members, key, ctx, &released, &deferred, may_go) {
        if except.is_none_or(|me| me.uid() != lock.uid()) {
            let _ = ctx.wake.send(ObjectRef::from_obj(lock.as_ref()));
        }
    }
}

/// Requests that left this operator's watch (a deletion, or a relist that
/// no longer has them). A deleted one needs nothing more (its finalizer
/// released it) unless our finalizer was taken off by someone else; one
/// that still exists and no longer matches `--selector` (its labels
/// changed): this operator can no longer renew or release it later, so it
/// lets go of it now — phase Released with reason NotSelected, its lock, and
/// its finalizer, so a later delete is not stuck — and lets the next waiter
/// of its key in. Each is tried again with backoff until done.
pub async fn departures(ctx: Arc<Context>, mut departed: mpsc::UnboundedReceiver<DistributedLock>) {
    while let Some(lock) = departed.recv().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let key = queue::lock_key(&lock);
            let mut backoff = Duration::from_millis(100);
            while let Err(e) = let_go(&ctx, &lock, &key).await {
                tracing::warn!(name = %lock.name_any(), error = %e, retry_in = ?backoff, "could not let go of a request that left this operator's view");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ctx.max_retry_interval);
            }
            wake_queue(&ctx, &key, None, true);
        });
    }
}

/// See [`departures`]; `lock` is the last copy this operator had.
async fn let_go(ctx: &Context, lock: &DistributedLock, key: &str) -> Result<()> {
    let namespace = lock.namespace().unwrap_or_default();
    let api: Api<raw::RawRequest> = Api::namespaced(ctx.client.clone(), &namespace);
    let ours = |l: &DistributedLock| l.finalizers().iter().any(|f| f == FINALIZER);
    let current = api.get_opt(&lock.name_any()).await.map_err(Error::Kube)?;
    let Some(current) = current.filter(|c| c.metadata.uid == lock.metadata.uid) else {
        // deleted (and maybe created again: a new request): if our finalizer
        // did not run, whatever it held is given back (token-fenced)
        if ours(lock) {
            release_own(lock, ctx, key).await?;
        }
        return Ok(());
    };
    let Ok(current) = current.decode() else {
        return Ok(()); // reported already; nothing this controller can act on
    };
    if !ours(&current) || still_selected(ctx, &current).await? {
        return Ok(());
    }
    tracing::info!(name = %current.name_any(), %namespace, "request no longer matches --selector; releasing it");
    // the request is told first, at the version just read (a label put back
    // since is a newer version: refused, and read again), then whatever it
    // holds is given back (also when a try before was cut short after the
    // status write)
    if !queue::phase(&current).is_final() {
        let message = "its labels no longer match this operator's --selector";
        let next = status::finished(&current, Phase::Released, reason::NOT_SELECTED, message);
        status::write(&ctx.client, &current, next).await?;
    }
    release_own(&current, ctx, key).await?;
    // drop our finalizer: compare-and-swap on a fresh read
    let Some(fresh) = api.get_opt(&current.name_any()).await.map_err(Error::Kube)? else {
        return Ok(());
    };
    let finalizers: Vec<&String> = fresh.finalizers().iter().filter(|f| *f != FINALIZER).collect();
    let patch = Patch::Merge(json!({
        "metadata": {"resourceVersion": fresh.resource_version(), "finalizers": finalizers}
    }));
    match api.patch(&current.name_any(), &PatchParams::default(), &patch).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        // changed since the read: read again (its labels may be back)
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Stale),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Whether `lock` (as just read) still matches this operator's
/// `--selector`, asked of the API server (its own label matching) by a list
/// of that one name under the selector, read after the copy.
async fn still_selected(ctx: &Context, lock: &DistributedLock) -> Result<bool> {
    let Some(selector) = ctx.selector.as_deref() else {
        return Ok(true);
    };
    let api: Api<raw::RawRequest> = Api::namespaced(ctx.client.clone(), &lock.namespace().unwrap_or_default());
    let params = ListParams::default()
        .labels(selector)
        .fields(&format!("metadata.name={}", lock.name_any()));
    let listed = api.list(&params).await.map_err(Error::Kube)?;
    Ok(listed.items.iter().any(|l| l.metadata.uid == lock.metadata.uid))
}

/// Refreshes the holders/waiters gauges from the cache once a second
/// (counting per reconcile would cost O(requests) each time).
pub async fn update_gauges_every(ctx: Arc<Context>, period: Duration) {
    loop {
        let all = ctx.store.state();
        let count = |phase: Phase| all.iter().filter(|l| queue::phase(l) == phase).count() as i64;
        ctx.metrics.holders.set(count(Phase::Granted));
        ctx.metrics.waiters.set(count(Phase::Pending));
        let limits: std::collections::HashMap<String, u32> = ctx
            .semaphores
            .state()
            .iter()
            .map(|s| (semaphores::key_of(s), semaphores::limit_in_force(s)))
            .collect();
        let (mut held, mut waiting) = (0i64, 0i64);
        for lock in all.iter() {
            let Some(limit) = limits.get(&queue::lock_key(lock)) else {
                continue;
            };
            let permits = i64::from(if lock.spec.is_exclusive() {
                *limit
            } else {
                lock.spec.permits()
            });
            match queue::phase(lock) {
                Phase::Granted => held += permits,
                Phase::Pending => waiting += permits,
                _ => {}
            }
        }
        ctx.metrics.permits_held.set(held);
        ctx.metrics.permits_waiting.set(waiting);
        tokio::time::sleep(period).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_a_quarter_of_the_ttl() {
        assert_eq!(renew_period(Duration::from_secs(30)), Duration::from_millis(7500));
        assert_eq!(renew_period(Duration::from_millis(200)), Duration::from_millis(100));
    }
}
