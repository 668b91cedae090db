//! What the controller knows about all requests beyond the reflector's cache:
//! requests by lock key and by holder, when each request (and each gated Job)
//! was first seen, and which grants it just released. Fed by the watch
//! streams' hooks, read by reconciles.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use super::granted::Renewal;
use crate::crd::{DistributedLock, HolderKind};
use crate::queue::{self, Sightings};

pub type LockRef = ObjectRef<DistributedLock>;

/// A holder a request points at: (namespace, kind, name).
pub type HolderKey = (String, HolderKind, String);

#[derive(Default)]
struct Entries {
    by_key: HashMap<String, HashSet<LockRef>>,
    by_holder: HashMap<HolderKey, HashSet<LockRef>>,
    /// What each request was filed under, to unfile it when it changes.
    filed: HashMap<LockRef, (String, Option<HolderKey>)>,
}

/// The controller's indexes over the request cache.
#[derive(Default)]
pub struct QueueIndex {
    entries: Mutex<Entries>,
    /// resourceVersion each request had when first delivered, by UID.
    first_seen: Mutex<HashMap<String, u64>>,
    /// resourceVersion each Job had when first delivered, by UID.
    jobs_first_seen: Mutex<HashMap<String, u64>>,
    /// Requests whose lock was released but whose status may still say Granted.
    released_uids: Mutex<HashSet<String>>,
    /// When this controller last released each key (for the handoff histogram).
    released_at: Mutex<HashMap<String, Instant>>,
    /// Waiting requests (by UID) whose token holds their key in the index: a
    /// grant nobody was told of (a crash between acquiring and writing Granted).
    untold_grants: Mutex<HashSet<String>>,
    /// When each key last changed hands here (a grant or a release).
    moved_at: RecentByKey,
    /// Waiters (by UID) whose new place is not written yet, since when.
    place_deferred: Mutex<HashMap<String, Instant>>,
    /// Requests (by UID) this controller granted whose Granted status the
    /// cache does not show yet.
    unseen_grants: Mutex<HashMap<String, UnseenGrant>>,
    /// Requests (by UID) this controller wrote to lately (arrival, finalizer,
    /// a waiter's or a final status), with the resourceVersion of the last
    /// such write, until the cache shows it.
    written_rv: Mutex<HashMap<String, u64>>,
    /// Granted requests (by UID) whose last renewal in the lock index is not
    /// recorded in their status (see `granted::worth_recording`).
    unrecorded_renewals: Mutex<HashMap<String, UnrecordedRenewal>>,
    /// The requests (by UID) and Jobs (by UID) a (re)list in progress has
    /// delivered so far: at its end, what it did not deliver is gone.
    relisted: Mutex<Option<HashSet<String>>>,
    jobs_relisted: Mutex<Option<HashSet<String>>>,
    /// When each key was last granted here.
    granted_at: RecentByKey,
    /// Told of every grant.
    grants: tokio::sync::Notify,
}

/// When something last happened to each key, for the keys where it happened
/// lately: past [`RecentByKey::KEPT`] keys, those older than
/// [`super::pending::PLACE_QUIET`] (nobody asks about them) are dropped.
#[derive(Default)]
struct RecentByKey(Mutex<HashMap<String, Instant>>);

impl RecentByKey {
    const KEPT: usize = 1024;

    fn mark(&self, key: &str) {
        let now = Instant::now();
        let mut at = locked(&self.0);
        if at.len() >= Self::KEPT {
            at.retain(|_, then| now.duration_since(*then) < super::pending::PLACE_QUIET);
        }
        at.insert(key.to_string(), now);
    }

    fn get(&self, key: &str) -> Option<Instant> {
        locked(&self.0).get(key).copied()
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Notes a UID a (re)list in progress delivered.
fn relisting(relisted: &Mutex<Option<HashSet<String>>>, uid: Option<String>) {
    if let (Some(listed), Some(uid)) = (locked(relisted).as_mut(), uid) {
        listed.insert(uid);
    }
}

fn holder_key(lock: &DistributedLock) -> Option<HolderKey> {
    let r = lock.spec.holder_ref.as_ref()?;
    Some((lock.namespace().unwrap_or_default(), r.kind, r.name.clone()))
}

fn resource_version<K: ResourceExt>(obj: &K) -> Option<u64> {
    obj.resource_version().and_then(|rv| rv.parse().ok())
}

/// A grant this controller made whose Granted status the cache does not show
/// yet ([`QueueIndex::wrote_grant`]).
#[derive(Debug)]
struct UnseenGrant {
    /// The resourceVersion of the Granted write; `None`: given up (or
    /// unreadable): seen once a copy shows the request Granted.
    written: Option<u64>,
    /// When the lease is next due for renewal.
    renewal: Instant,
    period: Duration,
}

impl UnseenGrant {
    /// The cache's copy (at `rv`) shows the grant: at or after the write, or
    /// — a write given up that landed after all — Granted or done.
    fn seen_in(&self, lock: &DistributedLock, rv: u64) -> bool {
        match self.written {
            Some(written) => rv >= written,
            None => queue::phase(lock) == crate::crd::Phase::Granted || queue::phase(lock).is_final(),
        }
    }
}

/// A renewal of one grant (its token and fencing token) that its request's
/// status does not show ([`QueueIndex::renewed_unrecorded`]).
#[derive(Debug)]
struct UnrecordedRenewal {
    token: Option<String>,
    fencing: Option<i64>,
    renewal: Renewal,
}

impl QueueIndex {
    /// Watch hook for DistributedLocks (called before the reflector stores
    /// the event). At the end of a (re)list: the requests it did not list,
    /// gone from this controller's view while the watch was down (deleted,
    /// or no longer selected), never delivered as deleted — now forgotten
    /// here, still in the store until the reflector takes the list.
    pub fn observe(&self, event: &watcher::Event<DistributedLock>) -> Vec<LockRef> {
        match event {
            watcher::Event::Apply(lock) => self.file(lock, true),
            watcher::Event::InitApply(lock) => {
                relisting(&self.relisted, lock.uid());
                self.file(lock, false);
            }
            watcher::Event::Delete(lock) => self.unfile(lock),
            watcher::Event::Init => *locked(&self.relisted) = Some(HashSet::new()),
            watcher::Event::InitDone => {
                if let Some(listed) = locked(&self.relisted).take() {
                    return self.keep_only(&listed);
                }
            }
        }
        Vec::new()
    }

    /// The end of a (re)list: requests deleted while the watch was down
    /// (never delivered as deleted) are forgotten — their filing and every
    /// mark kept for them.
    fn keep_only(&self, listed: &HashSet<String>) -> Vec<LockRef> {
        let gone = |uid: &String| !listed.contains(uid);
        let mut entries = locked(&self.entries);
        let unlisted: Vec<LockRef> = entries
            .filed
            .keys()
            .filter(|r| r.extra.uid.as_ref().is_none_or(gone))
            .cloned()
            .collect();
        for object in &unlisted {
            remove_filing(&mut entries, object);
        }
        drop(entries);
        locked(&self.first_seen).retain(|uid, _| !gone(uid));
        locked(&self.released_uids).retain(|uid| !gone(uid));
        locked(&self.untold_grants).retain(|uid| !gone(uid));
        locked(&self.place_deferred).retain(|uid, _| !gone(uid));
        locked(&self.unseen_grants).retain(|uid, _| !gone(uid));
        locked(&self.written_rv).retain(|uid, _| !gone(uid));
        locked(&self.unrecorded_renewals).retain(|uid, _| !gone(uid));
        unlisted
    }

    /// Watch hook for Jobs: remembers when each Job was first seen.
    pub fn observe_job(&self, event: &watcher::Event<Job>) {
        let mut seen = locked(&self.jobs_first_seen);
        match event {
            watcher::Event::Apply(job) | watcher::Event::InitApply(job) => {
                if let (Some(uid), Some(rv)) = (job.uid(), resource_version(job)) {
                    seen.entry(uid).or_insert(rv);
                }
            }
            watcher::Event::Delete(job) => {
                if let Some(uid) = job.uid() {
                    seen.remove(&uid);
                }
            }
            watcher::Event::Init => *locked(&self.jobs_relisted) = Some(HashSet::new()),
            watcher::Event::InitDone => {
                if let Some(listed) = locked(&self.jobs_relisted).take() {
                    seen.retain(|uid, _| listed.contains(uid));
                }
            }
        }
        if let watcher::Event::InitApply(job) = event {
            relisting(&self.jobs_relisted, job.uid());
        }
    }

    /// `live`: delivered by the watch as it happened, not by a (re)list.
    fn file(&self, lock: &DistributedLock, live: bool) {
        // (the marks of our own writes — unseen_grants, written_rv — are not
        // dropped here but by the first reconcile whose copy shows the write:
        // this hook runs before the store has the copy, and a reconcile
        // reading the store in between saw a stale Pending copy with no mark
        // and re-acquired, reviving a lease that had run out)
        // a listed version that already carries our finalizer may be of a
        // predecessor's making, no sighting of the request's arrival (see
        // queue::Arrival::unrecorded); the first version the watch delivers
        // live is its creation, even one created with our finalizer
        let ours = lock.finalizers().iter().any(|f| f == crate::crd::FINALIZER);
        if let (Some(uid), Some(rv)) = (lock.uid(), resource_version(lock))
            && (live || !ours)
        {
            locked(&self.first_seen).entry(uid).or_insert(rv);
        }
        let object = ObjectRef::from_obj(lock);
        let key = queue::lock_key(lock);
        let holder = holder_key(lock);
        let mut entries = locked(&self.entries);
        // (the same name may be a new request: refiled under its own UID,
        // which a relist goes by)
        if let Some((filed, place)) = entries.filed.get_key_value(&object)
            && filed.extra.uid == object.extra.uid
            && *place == (key.clone(), holder.clone())
        {
            return;
        }
        remove_filing(&mut entries, &object);
        entries.by_key.entry(key.clone()).or_default().insert(object.clone());
        if let Some(h) = &holder {
            entries.by_holder.entry(h.clone()).or_default().insert(object.clone());
        }
        entries.filed.insert(object, (key, holder));
    }

    /// (the same per-request maps as [`Self::keep_only`] forgets in bulk:
    /// one removal each here, on every deletion)
    fn unfile(&self, lock: &DistributedLock) {
        if let Some(uid) = lock.uid() {
            locked(&self.first_seen).remove(&uid);
            locked(&self.released_uids).remove(&uid);
            locked(&self.untold_grants).remove(&uid);
            locked(&self.place_deferred).remove(&uid);
            locked(&self.unseen_grants).remove(&uid);
            locked(&self.written_rv).remove(&uid);
            locked(&self.unrecorded_renewals).remove(&uid);
        }
        remove_filing(&mut locked(&self.entries), &ObjectRef::from_obj(lock));
    }

    /// The requests of one lock key, as the cache has them now.
    pub fn members(&self, store: &Store<DistributedLock>, key: &str) -> Vec<Arc<DistributedLock>> {
        self.of_key(key).iter().filter_map(|r| store.get(r)).collect()
    }

    /// References to the requests of one lock key.
    pub fn of_key(&self, key: &str) -> Vec<LockRef> {
        locked(&self.entries)
            .by_key
            .get(key)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The requests whose holderRef names this Job or Pod.
    pub fn held_by(&self, holder: &HolderKey) -> Vec<LockRef> {
        locked(&self.entries)
            .by_holder
            .get(holder)
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The resourceVersion a Job had when first seen.
    pub fn job_first_seen(&self, job: &Job) -> Option<u64> {
        locked(&self.jobs_first_seen).get(&job.uid()?).copied()
    }

    /// How long ago `key` last changed hands here, if it did lately.
    pub fn moved_ago(&self, key: &str) -> Option<std::time::Duration> {
        self.moved_at.get(key).map(|at| at.elapsed())
    }

    /// How long the new place of this waiter has gone unwritten (starting
    /// the count now if it was written).
    pub fn place_deferred_for(&self, lock: &DistributedLock) -> std::time::Duration {
        let Some(uid) = lock.uid() else {
            return std::time::Duration::ZERO;
        };
        locked(&self.place_deferred)
            .entry(uid)
            .or_insert_with(Instant::now)
            .elapsed()
    }

    /// True while this waiter's new place is held back (never for longer
    /// than PLACE_MAX_DELAY, whichever path wrote its status since).
    pub fn place_deferred(&self, lock: &DistributedLock) -> bool {
        lock.uid().is_some_and(|uid| {
            locked(&self.place_deferred)
                .get(&uid)
                .is_some_and(|since| since.elapsed() < super::pending::PLACE_MAX_DELAY)
        })
    }

    /// The waiter's place is written (or no longer needs to be).
    pub fn place_written(&self, lock: &DistributedLock) {
        if let Some(uid) = lock.uid() {
            locked(&self.place_deferred).remove(&uid);
        }
    }

    /// Waits (at most `grace`) until `key` is granted again here after
    /// `since`: a holder that has just let go lets its successor's grant
    /// reach the API server before its own bookkeeping writes.
    pub async fn next_grant(&self, key: &str, since: Instant, grace: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let granted = self.grants.notified();
            tokio::pin!(granted);
            granted.as_mut().enable();
            if self.granted_at.get(key).is_some_and(|at| at >= since) {
                return;
            }
            if tokio::time::timeout_at(deadline, granted).await.is_err() {
                return;
            }
        }
    }

    /// Notes that this controller wrote Granted on `lock` at resourceVersion
    /// `rv`, for a lease renewed every `period` from `renewal` on: its key
    /// changed hands.
    pub fn wrote_grant(&self, lock: &DistributedLock, rv: Option<&str>, renewal: Instant, period: Duration) {
        let key = queue::lock_key(lock);
        self.moved_at.mark(&key);
        self.granted_at.mark(&key);
        self.grants.notify_waiters();
        self.unseen(lock, rv.and_then(|rv| rv.parse().ok()), renewal, period);
    }

    /// Notes that `lock` was granted in the lock index but its Granted write
    /// was given up (it may still land): as [`Self::wrote_grant`], until a
    /// copy shows the request Granted.
    pub fn gave_up_grant_write(&self, lock: &DistributedLock, renewal: Instant, period: Duration) {
        self.unseen(lock, None, renewal, period);
    }

    fn unseen(&self, lock: &DistributedLock, written: Option<u64>, renewal: Instant, period: Duration) {
        if let Some(uid) = lock.uid() {
            let grant = UnseenGrant {
                written,
                renewal,
                period,
            };
            locked(&self.unseen_grants).insert(uid, grant);
        }
    }

    /// What to do with a copy of `lock` from before a Granted status this
    /// controller wrote (or gave up writing): deciding on it would acquire
    /// again, and the newer copy is on its way and triggers the next
    /// reconcile — so wait for it (`Some(wait)`), but never past the grant's
    /// next renewal: should the watch be slow (an API server that stopped
    /// answering), the copy is decided on then (`None`) — as the head it
    /// re-acquires with the same token, which extends the lease — and the
    /// renewal after is waited for again.
    pub fn behind_own_grant(&self, lock: &DistributedLock, now: Instant) -> Option<Duration> {
        let (uid, rv) = (lock.uid()?, resource_version(lock)?);
        let mut unseen = locked(&self.unseen_grants);
        let grant = unseen.get_mut(&uid)?;
        if grant.seen_in(lock, rv) {
            unseen.remove(&uid);
            return None;
        }
        if now < grant.renewal {
            return Some(grant.renewal - now);
        }
        grant.renewal = now + grant.period;
        None
    }

    /// Notes that this controller's write to `lock` (not a grant's or a
    /// renewal's: see [`Self::wrote_grant`]) made resourceVersion `rv`.
    pub fn wrote(&self, lock: &DistributedLock, rv: Option<&str>) {
        if let (Some(uid), Some(rv)) = (lock.uid(), rv.and_then(|rv| rv.parse::<u64>().ok())) {
            let mut written = locked(&self.written_rv);
            let last = written.entry(uid).or_insert(rv);
            *last = (*last).max(rv);
        }
    }

    /// True when the cache still shows a copy older than this controller's
    /// last [`Self::wrote`] to the request: deciding on it would redo what
    /// that write did (record the arrival again, add the finalizer again and
    /// be refused, write a status that is refused as stale); the newer copy
    /// is on its way and triggers the next reconcile. Never true for a copy
    /// that is Granted or whose grant is not seen yet: their leases are kept
    /// by [`Self::behind_own_grant`]'s rule, which bounds the wait.
    /// A copy that shows the write drops the mark.
    pub fn behind_own_write(&self, lock: &DistributedLock) -> bool {
        let (Some(uid), Some(rv)) = (lock.uid(), resource_version(lock)) else {
            return false;
        };
        {
            let mut written = locked(&self.written_rv);
            match written.get(&uid) {
                None => return false,
                Some(last) if rv >= *last => {
                    written.remove(&uid);
                    return false;
                }
                Some(_) => {}
            }
        }
        queue::phase(lock) != crate::crd::Phase::Granted && !self.holds_unseen_grant(lock)
    }

    /// Notes that `lock`'s grant (as its status shows it) was extended in the
    /// lock index at `at`, a renewal its status does not record.
    pub fn renewed_unrecorded(&self, lock: &DistributedLock, renewal: Renewal) {
        let (Some(uid), Some(status)) = (lock.uid(), lock.status.as_ref()) else {
            return;
        };
        let unrecorded = UnrecordedRenewal {
            token: status.token.clone(),
            fencing: status.fencing_token,
            renewal,
        };
        locked(&self.unrecorded_renewals).insert(uid, unrecorded);
    }

    /// When `lock`'s grant was last extended here, if later than its status
    /// records ([`Self::renewed_unrecorded`]); a copy that records it, or
    /// shows another grant, drops the mark.
    pub fn unrecorded_renewal(&self, lock: &DistributedLock) -> Option<Renewal> {
        let uid = lock.uid()?;
        let status = lock.status.as_ref();
        let recorded = status.and_then(|s| s.renewed_at.as_deref()).and_then(queue::parse_time);
        let mut renewals = locked(&self.unrecorded_renewals);
        let unrecorded = renewals.get(&uid)?;
        let same_grant = status.is_some_and(|s| s.token == unrecorded.token && s.fencing_token == unrecorded.fencing);
        if same_grant && recorded.is_none_or(|recorded| recorded < unrecorded.renewal.at) {
            return Some(unrecorded.renewal);
        }
        renewals.remove(&uid);
        None
    }

    /// The grant this controller made to `lock` is gone from the lock index
    /// (a re-acquire found the key held by another or not ours to take): the
    /// request is decided on as any waiter again.
    pub fn forget_unseen_grant(&self, lock: &DistributedLock) {
        if let Some(uid) = lock.uid() {
            locked(&self.unseen_grants).remove(&uid);
        }
    }

    /// True while a grant this controller made to `lock` is not shown by
    /// this copy of it ([`Self::wrote_grant`]): its reconciles keep its lease
    /// alive. A copy that shows it drops the mark.
    pub fn holds_unseen_grant(&self, lock: &DistributedLock) -> bool {
        let (Some(uid), Some(rv)) = (lock.uid(), resource_version(lock)) else {
            return false;
        };
        let mut unseen = locked(&self.unseen_grants);
        match unseen.get(&uid) {
            Some(grant) if grant.seen_in(lock, rv) => {
                unseen.remove(&uid);
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// Notes that this controller released `lock`'s grant of `key` just now.
    pub fn mark_released(&self, key: &str, lock: Option<&DistributedLock>) {
        self.moved_at.mark(key);
        locked(&self.released_at).insert(key.to_string(), Instant::now());
        if let Some(uid) = lock.and_then(|l| l.uid()) {
            locked(&self.released_uids).insert(uid);
        }
    }

    /// True for a request whose lock this controller released a moment ago,
    /// before its status says so.
    pub fn just_released(&self, lock: &DistributedLock) -> bool {
        lock.uid().is_some_and(|uid| locked(&self.released_uids).contains(&uid))
    }

    /// Forgets the release of a request whose status now shows it.
    pub fn forget_released(&self, lock: &DistributedLock) {
        if let Some(uid) = lock.uid() {
            locked(&self.released_uids).remove(&uid);
        }
    }

    /// Notes that the request with this UID holds its key though it waits.
    pub fn suspect_untold_grant(&self, uid: &str) {
        locked(&self.untold_grants).insert(uid.to_string());
    }

    /// True (once) when a waiter was noted to hold its key.
    pub fn take_untold_grant(&self, lock: &DistributedLock) -> bool {
        lock.uid().is_some_and(|uid| locked(&self.untold_grants).remove(&uid))
    }

    /// When this controller last released `key`, taken (for the handoff histogram).
    pub fn take_released_at(&self, key: &str) -> Option<Instant> {
        locked(&self.released_at).remove(key)
    }
}

fn remove_filing(entries: &mut Entries, object: &LockRef) {
    let Some((key, holder)) = entries.filed.remove(object) else {
        return;
    };
    if let Some(refs) = entries.by_key.get_mut(&key) {
        refs.remove(object);
        if refs.is_empty() {
            entries.by_key.remove(&key);
        }
    }
    if let Some(h) = holder
        && let Some(refs) = entries.by_holder.get_mut(&h)
    {
        refs.remove(object);
        if refs.is_empty() {
            entries.by_holder.remove(&h);
        }
    }
}

impl Sightings for QueueIndex {
    fn first_seen(&self, lock: &DistributedLock) -> Option<u64> {
        locked(&self.first_seen).get(&lock.uid()?).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{HolderRef, Phase};
    use crate::fixtures::request;

    fn renewal(at_s: i64) -> Renewal {
        Renewal {
            at: crate::fixtures::at(at_s),
            ttl: Duration::from_secs(8),
        }
    }

    #[test]
    fn a_relist_forgets_the_requests_deleted_while_the_watch_was_down() {
        use crate::fixtures::{at, granted};
        let index = QueueIndex::default();
        let kept = request("kept", "ns", "k", 0, 1, 10);
        let gone = granted(request("gone", "ns", "k", 0, 2, 11), at(0), at(8));
        for lock in [&kept, &gone] {
            index.observe(&watcher::Event::Apply(lock.clone()));
        }
        index.wrote(&gone, Some("20"));
        index.renewed_unrecorded(&gone, renewal(2));
        index.suspect_untold_grant(&gone.uid().unwrap());
        assert_eq!(index.of_key("ns/k").len(), 2);
        // the watch fell behind; `gone` was deleted meanwhile: the relist
        // delivers `kept` only, and no deletion of `gone`
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(kept.clone()));
        assert_eq!(index.of_key("ns/k").len(), 2, "not before the relist ends");
        let unlisted = index.observe(&watcher::Event::InitDone);
        assert_eq!(unlisted, vec![ObjectRef::from_obj(&gone)], "told, to let it go");
        assert_eq!(index.of_key("ns/k"), vec![ObjectRef::from_obj(&kept)]);
        assert!(index.first_seen(&kept).is_some(), "a listed request keeps its sighting");
        assert_eq!(index.first_seen(&gone), None);
        assert_eq!(index.unrecorded_renewal(&gone), None);
        assert!(!index.take_untold_grant(&gone));
        assert!(locked(&index.written_rv).is_empty());
        // Jobs the same way
        let job = crate::fixtures::job("j", &[], &[], false);
        let mut job = job;
        job.metadata.uid = Some("job-uid".into());
        job.metadata.resource_version = Some("5".into());
        index.observe_job(&watcher::Event::Apply(job.clone()));
        assert_eq!(index.job_first_seen(&job), Some(5));
        index.observe_job(&watcher::Event::Init);
        index.observe_job(&watcher::Event::InitDone);
        assert_eq!(index.job_first_seen(&job), None);
    }

    #[test]
    fn a_request_created_again_under_the_same_name_while_the_watch_was_down_stays_filed() {
        let index = QueueIndex::default();
        let before = request("same", "ns", "k", 0, 1, 10);
        index.observe(&watcher::Event::Apply(before.clone()));
        let mut again = request("same", "ns", "k", 0, 5, 20);
        again.metadata.uid = Some("uid-same-2".into());
        index.observe(&watcher::Event::Init);
        index.observe(&watcher::Event::InitApply(again.clone()));
        let unlisted = index.observe(&watcher::Event::InitDone);
        assert!(unlisted.is_empty(), "nothing to let go: the name is the new request's");
        let filed = index.of_key("ns/k");
        assert_eq!(filed.len(), 1, "the new one is filed under its key");
        assert_eq!(filed[0].extra.uid.as_deref(), Some("uid-same-2"));
        assert!(index.first_seen(&again).is_some());
    }

    #[test]
    fn an_unrecorded_renewal_is_kept_until_a_copy_records_it_or_shows_another_grant() {
        use crate::fixtures::{at, granted};
        let index = QueueIndex::default();
        let lock = granted(request("a", "ns", "k", 0, 1, 10), at(0), at(8));
        assert_eq!(index.unrecorded_renewal(&lock), None);
        index.renewed_unrecorded(&lock, renewal(2));
        assert_eq!(index.unrecorded_renewal(&lock), Some(renewal(2)));
        // another grant of the same request (a new fencing token)
        let mut regranted = lock.clone();
        regranted.status.as_mut().unwrap().fencing_token = Some(8);
        assert_eq!(index.unrecorded_renewal(&regranted), None);
        assert_eq!(index.unrecorded_renewal(&lock), None, "the mark is dropped");
        // a copy that records it (or a later renewal)
        index.renewed_unrecorded(&lock, renewal(2));
        let written = granted(request("a", "ns", "k", 0, 1, 10), at(2), at(10));
        assert_eq!(index.unrecorded_renewal(&written), None);
        assert_eq!(index.unrecorded_renewal(&lock), None, "the mark is dropped");
        // the request's deletion
        index.renewed_unrecorded(&lock, renewal(4));
        index.observe(&watcher::Event::Delete(lock.clone()));
        assert_eq!(index.unrecorded_renewal(&lock), None);
    }

    #[test]
    fn a_copy_behind_our_grant_waits_for_the_watch_but_never_past_a_renewal() {
        let index = QueueIndex::default();
        let pending = crate::fixtures::with_phase(request("a", "ns", "k", 0, 1, 10), Phase::Pending, Some(1));
        index.observe(&watcher::Event::Apply(pending.clone()));
        let (t0, period) = (Instant::now(), Duration::from_millis(500));
        assert_eq!(index.behind_own_grant(&pending, t0), None, "nothing granted yet");
        index.wrote_grant(&pending, Some("11"), t0 + period, period);
        assert!(index.holds_unseen_grant(&pending));
        assert_eq!(
            index.behind_own_grant(&pending, t0),
            Some(period),
            "the newer copy is on its way"
        );
        // the watch is slow: at the renewal the stale copy is decided on (and
        // re-acquires), then the next renewal is waited for
        assert_eq!(index.behind_own_grant(&pending, t0 + period), None);
        assert_eq!(index.behind_own_grant(&pending, t0 + period), Some(period));
        // the Granted copy arrives: while the store may still hand out the
        // stale copy, that copy still holds the unseen grant (a reconcile
        // reading it must not take it for a plain waiter: it would acquire
        // again and could revive a lease that ran out); the Granted copy
        // shows it, and the mark is gone
        let granted = crate::fixtures::with_phase(request("a", "ns", "k", 0, 1, 11), Phase::Granted, None);
        index.observe(&watcher::Event::Apply(granted.clone()));
        assert!(index.holds_unseen_grant(&pending));
        assert_eq!(index.behind_own_grant(&granted, t0), None);
        assert!(!index.holds_unseen_grant(&granted));
        assert!(!index.holds_unseen_grant(&pending));
        // a write given up is seen once a copy shows the request Granted
        let other = request("b", "ns", "k", 0, 1, 12);
        index.gave_up_grant_write(&other, t0, period);
        assert_eq!(index.behind_own_grant(&other, t0), None, "due at once: re-acquire");
        index.observe(&watcher::Event::Apply(other.clone()));
        assert!(index.holds_unseen_grant(&other), "a Pending copy does not show it");
        let landed = crate::fixtures::with_phase(request("b", "ns", "k", 0, 1, 13), Phase::Granted, None);
        index.observe(&watcher::Event::Apply(landed.clone()));
        assert!(!index.holds_unseen_grant(&landed));
        assert!(!index.holds_unseen_grant(&other));
    }

    #[test]
    fn copies_from_before_our_last_write_are_behind_until_the_cache_shows_it() {
        let index = QueueIndex::default();
        let created = request("a", "ns", "k", 0, 1, 10);
        index.observe(&watcher::Event::Apply(created.clone()));
        assert!(!index.behind_own_write(&created), "nothing written yet");
        // arrival recorded (11), then the finalizer (12): 10 and 11 are behind
        index.wrote(&created, Some("11"));
        index.wrote(&created, Some("12"));
        index.wrote(&created, Some("not a number"));
        let arrived = request("a", "ns", "k", 0, 1, 11);
        assert!(index.behind_own_write(&created));
        assert!(index.behind_own_write(&arrived));
        // a write answered out of order never moves the mark back
        index.wrote(&created, Some("11"));
        assert!(index.behind_own_write(&arrived));
        let finalized = request("a", "ns", "k", 0, 1, 12);
        // a Granted copy, or one whose grant is not seen yet, is never
        // skipped here: its lease must be kept
        let granted = crate::fixtures::with_phase(request("a", "ns", "k", 0, 1, 11), Phase::Granted, None);
        assert!(!index.behind_own_write(&granted));
        let now = Instant::now();
        index.gave_up_grant_write(&arrived, now, Duration::from_secs(1));
        assert!(!index.behind_own_write(&arrived));
        index.forget_unseen_grant(&arrived);
        assert!(index.behind_own_write(&arrived));
        // the watch bringing it is not enough (the store may not have it yet)
        index.observe(&watcher::Event::Apply(finalized.clone()));
        assert!(index.behind_own_write(&arrived));
        // once a copy shows it, nothing is behind any more
        assert!(!index.behind_own_write(&finalized));
        assert!(!index.behind_own_write(&arrived));
        // another request is not affected; a deleted one is forgotten
        index.wrote(&created, Some("20"));
        assert!(!index.behind_own_write(&request("b", "ns", "k", 0, 1, 13)));
        index.observe(&watcher::Event::Delete(created.clone()));
        assert!(!index.behind_own_write(&created));
    }

    #[test]
    fn a_request_created_with_our_finalizer_keeps_its_place_within_its_second() {
        let index = QueueIndex::default();
        let earlier = request("earlier", "ns", "k", 0, 1, 10);
        let mut preset = request("preset", "ns", "k", 0, 1, 20);
        preset.metadata.finalizers = Some(vec![crate::crd::FINALIZER.into()]);
        index.observe(&watcher::Event::Apply(earlier.clone()));
        index.observe(&watcher::Event::Apply(preset.clone()));
        assert_eq!(index.first_seen(&preset), Some(20), "seen live as created");
        let all: Vec<_> = [preset.clone(), earlier].into_iter().map(Arc::new).collect();
        let order: Vec<_> = queue::waiters(&all, "ns/k", &index)
            .iter()
            .map(|l| l.name_any())
            .collect();
        assert_eq!(order, ["earlier", "preset"]);
        // listed with our finalizer (a predecessor may have added it): no sighting
        let listed = QueueIndex::default();
        listed.observe(&watcher::Event::InitApply(preset.clone()));
        assert_eq!(listed.first_seen(&preset), None);
    }

    #[test]
    fn requests_are_found_by_key_and_by_holder_and_refiled_when_the_holder_changes() {
        let index = QueueIndex::default();
        let mut lock = request("a", "ns", "k", 0, 1, 10);
        lock.spec.holder_ref = Some(HolderRef {
            kind: HolderKind::Job,
            name: "j1".into(),
        });
        index.observe(&watcher::Event::Apply(lock.clone()));
        let j1 = ("ns".to_string(), HolderKind::Job, "j1".to_string());
        assert_eq!(index.held_by(&j1).len(), 1);
        assert_eq!(index.first_seen(&lock), Some(10));
        lock.spec.holder_ref.as_mut().unwrap().name = "j2".into();
        lock.metadata.resource_version = Some("11".into());
        index.observe(&watcher::Event::Apply(lock.clone()));
        assert!(index.held_by(&j1).is_empty());
        assert_eq!(index.held_by(&("ns".into(), HolderKind::Job, "j2".into())).len(), 1);
        assert_eq!(index.first_seen(&lock), Some(10), "the first sighting stays");
        index.observe(&watcher::Event::Delete(lock.clone()));
        assert!(locked(&index.entries).by_key.is_empty());
        assert_eq!(index.first_seen(&lock), None);
    }
}
