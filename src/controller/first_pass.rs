//! The pass over every request after the watch (re)lists them, kept behind
//! fresh work. After a restart the controller must look at each listed
//! request once (renew what is due, grant a head whose holder left while it
//! was down), but a request created meanwhile should not wait for 10,000 of
//! those: the listed waiters are handed to the controller a few at a time,
//! listed holders when their renewal falls due, while changes seen after the
//! list go to it at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio::sync::{Notify, mpsc};
use tokio_util::time::DelayQueue;

use crate::crd::{DistributedLock, Phase};
use crate::queue;

/// Listed requests being reconciled at once, at most.
pub const IN_FLIGHT: usize = 8;
/// A handed-over request the controller never reported back on (deleted
/// before its turn, say) stops counting against [`IN_FLIGHT`] after this long.
const GIVE_UP: Duration = Duration::from_secs(10);
/// A listed holder goes to the controller this long before its renewal is
/// due (the renewal itself is the controller's, at its due time).
const RENEWAL_LEAD: Duration = Duration::from_millis(500);

/// The listed requests and the ones of them the controller is reconciling.
#[derive(Default)]
pub struct FirstPass {
    /// Listed but not yet seen on the controller's trigger stream: UID → resourceVersion.
    listed: Mutex<HashMap<String, String>>,
    /// Handed to the controller, not reported back yet: (namespace, name) → since.
    in_flight: Mutex<HashMap<(String, String), Instant>>,
    room: Notify,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn name_of(lock: &DistributedLock) -> (String, String) {
    (lock.namespace().unwrap_or_default(), lock.name_any())
}

impl FirstPass {
    /// Watch hook: remembers the requests of each (re)list as listed.
    pub fn observe(&self, event: &watcher::Event<DistributedLock>) {
        match event {
            watcher::Event::Init => locked(&self.listed).clear(),
            // A deleted request's lock waits for its release, and a holder
            // with a holderRef may have finished while the controller was
            // down: those go to the controller at once, never paced. Other
            // holders are handed over when their renewal is due (see [`pace`]).
            watcher::Event::InitApply(lock)
                if lock.metadata.deletion_timestamp.is_none()
                    && (queue::phase(lock) != Phase::Granted || lock.spec.holder_ref.is_none()) =>
            {
                if let (Some(uid), Some(version)) = (lock.uid(), lock.resource_version()) {
                    locked(&self.listed).insert(uid, version);
                }
            }
            watcher::Event::InitApply(_)
            | watcher::Event::Apply(_)
            | watcher::Event::Delete(_)
            | watcher::Event::InitDone => {}
        }
    }

    /// True for a request as it was listed (the store hands every listed
    /// request to the controller once the list is done): it is left to
    /// [`pace`] instead. A request that changed since is fresh work.
    pub fn is_listed(&self, lock: &DistributedLock) -> bool {
        let (Some(uid), Some(version)) = (lock.uid(), lock.resource_version()) else {
            return false;
        };
        let mut listed = locked(&self.listed);
        match listed.get(&uid) {
            Some(v) if *v == version => {
                listed.remove(&uid);
                true
            }
            _ => false,
        }
    }

    /// The controller finished a reconcile of (namespace, name).
    pub fn finished(&self, namespace: Option<&str>, name: &str) {
        let key = (namespace.unwrap_or_default().to_string(), name.to_string());
        if locked(&self.in_flight).remove(&key).is_some() {
            self.room.notify_one();
        }
    }

    /// Waits until fewer than [`IN_FLIGHT`] handed-over requests are being
    /// reconciled, then counts `lock` as one.
    async fn take_slot(&self, lock: &DistributedLock) {
        loop {
            let room = self.room.notified();
            {
                let mut in_flight = locked(&self.in_flight);
                in_flight.retain(|_, since| since.elapsed() < GIVE_UP);
                if in_flight.len() < IN_FLIGHT {
                    in_flight.insert(name_of(lock), Instant::now());
                    return;
                }
            }
            let _ = tokio::time::timeout(GIVE_UP, room).await;
        }
    }
}

/// When a holder's next renewal is due: its last renewal plus the period of
/// that lease's TTL (a short lease renewed last may be due before a long one
/// renewed earlier); never renewed: at once.
fn renewal_due(lock: &DistributedLock) -> Option<DateTime<Utc>> {
    let renewed = lock
        .status
        .as_ref()
        .and_then(|s| s.renewed_at.as_deref())
        .and_then(queue::parse_time)?;
    let (_, period) = super::granted::lease_plan(lock);
    Some(renewed + chrono::Duration::from_std(period).unwrap_or_default())
}

/// Which listed requests go first: Granted ones by when their renewal is
/// due, then the waiters (the head of a key its holder left while the
/// controller was down among them), then the rest.
fn urgency(lock: &DistributedLock) -> (u8, Option<DateTime<Utc>>) {
    match queue::phase(lock) {
        Phase::Granted => (0, renewal_due(lock)),
        Phase::Pending => (1, None),
        _ => (2, None),
    }
}

/// How long after `now` a listed holder goes to the controller: just before
/// its renewal is due, which is when the controller would have renewed it
/// had it not restarted. Its renewal never waits for other listed requests.
fn hand_over_in(lock: &DistributedLock, now: DateTime<Utc>) -> Duration {
    renewal_due(lock)
        .and_then(|due| (due - now).to_std().ok())
        .map_or(Duration::ZERO, |wait| wait.saturating_sub(RENEWAL_LEAD))
}

/// Hands the listed requests to the controller (`to_controller`): holders
/// when their renewal is due, the others most urgent first, at most
/// [`IN_FLIGHT`] of those being reconciled at a time.
pub async fn pace(
    first_pass: Arc<FirstPass>,
    store: kube::runtime::reflector::Store<DistributedLock>,
    mut listed: mpsc::UnboundedReceiver<ObjectRef<DistributedLock>>,
    to_controller: mpsc::UnboundedSender<ObjectRef<DistributedLock>>,
) {
    let mut backlog: VecDeque<Arc<DistributedLock>> = VecDeque::new();
    let mut holders: DelayQueue<ObjectRef<DistributedLock>> = DelayQueue::new();
    // a holder whose renewal fell due (gone from the store: nothing to do)
    let due = |holder: ObjectRef<DistributedLock>| store.get(&holder).is_none() || to_controller.send(holder).is_ok();
    loop {
        if backlog.is_empty() {
            tokio::select! {
                next = listed.recv() => match next {
                    Some(next) => backlog.extend(store.get(&next)),
                    None => return,
                },
                Some(holder) = holders.next() => {
                    if !due(holder.into_inner()) {
                        return;
                    }
                    continue;
                }
            }
        }
        // whatever else arrived meanwhile, in order of urgency
        let mut more = false;
        while let Ok(next) = listed.try_recv() {
            backlog.extend(store.get(&next));
            more = true;
        }
        if more {
            backlog.make_contiguous().sort_by_cached_key(|l| urgency(l));
        }
        let Some(lock) = backlog.pop_front() else { continue };
        let reference = ObjectRef::from_obj(lock.as_ref());
        if queue::phase(&lock) == Phase::Granted {
            match hand_over_in(&lock, Utc::now()) {
                Duration::ZERO => {
                    if to_controller.send(reference).is_err() {
                        return;
                    }
                }
                wait => {
                    holders.insert(reference, wait);
                }
            }
            continue;
        }
        // holders falling due meanwhile do not wait for a slot
        let slot = first_pass.take_slot(&lock);
        tokio::pin!(slot);
        loop {
            tokio::select! {
                () = &mut slot => break,
                Some(holder) = holders.next() => {
                    if !due(holder.into_inner()) {
                        return;
                    }
                }
            }
        }
        if to_controller.send(reference).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{granted, request, with_phase};

    #[tokio::test]
    async fn listed_requests_go_to_the_controller_a_few_at_a_time_most_urgent_first() {
        let (store, mut writer) = kube::runtime::reflector::store::<DistributedLock>();
        let (to_pace, listed) = mpsc::unbounded_channel();
        for i in 0..20 {
            let mut lock = request(&format!("w{i}"), "ns", "k", 0, 1, i);
            if i == 19 {
                lock = with_phase(lock, Phase::Granted, None);
            }
            writer.apply_watcher_event(&watcher::Event::Apply(lock.clone()));
            to_pace.send(ObjectRef::from_obj(&lock)).unwrap();
        }
        let pass = Arc::new(FirstPass::default());
        let (to_controller, mut handed) = mpsc::unbounded_channel();
        tokio::spawn(pace(pass.clone(), store, listed, to_controller));
        let mut first = Vec::new();
        // the holder never renewed (due at once) takes no slot
        for _ in 0..=IN_FLIGHT {
            first.push(handed.recv().await.unwrap());
        }
        assert_eq!(first[0].name, "w19", "a Granted request whose renewal is due first");
        // (an absence: nothing to poll for, so a bounded wait)
        let more = tokio::time::timeout(Duration::from_millis(300), handed.recv()).await;
        assert!(more.is_err(), "no more than {IN_FLIGHT} at a time: {more:?}");
        pass.finished(Some("ns"), &first[1].name);
        let next = tokio::time::timeout(Duration::from_secs(5), handed.recv()).await;
        assert!(next.is_ok_and(|n| n.is_some()), "one reported back, the next goes");
    }

    #[test]
    fn a_short_lease_renewed_last_goes_before_a_long_one_renewed_earlier() {
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        // renewed at 0 for an hour: due at 900 s; renewed at 5 s for 10 s: due at 7.5 s
        let with_ttl = |mut lock: DistributedLock, ttl: &str| {
            lock.spec.ttl = Some(ttl.into());
            lock
        };
        let long = granted(with_ttl(request("long", "ns", "a", 0, 1, 1), "1h"), at(0), at(3600));
        let short = granted(with_ttl(request("short", "ns", "b", 0, 1, 2), "10s"), at(5), at(15));
        let waiter = request("waiter", "ns", "c", 0, 1, 3);
        let mut order = [waiter, long, short];
        order.sort_by_cached_key(urgency);
        let names: Vec<_> = order.iter().map(|l| l.name_any()).collect();
        assert_eq!(names, ["short", "long", "waiter"]);
    }

    #[test]
    fn only_a_request_as_it_was_listed_is_left_to_the_pass() {
        let pass = FirstPass::default();
        let listed = request("a", "ns", "k", 0, 1, 10);
        pass.observe(&watcher::Event::Init);
        pass.observe(&watcher::Event::InitApply(listed.clone()));
        let mut changed = listed.clone();
        changed.metadata.resource_version = Some("11".into());
        assert!(!pass.is_listed(&changed), "changed since the list: fresh work");
        assert!(pass.is_listed(&listed));
        assert!(!pass.is_listed(&listed), "once");
    }

    #[test]
    fn deleted_requests_and_holders_with_a_holder_ref_are_never_paced() {
        // a deleted holder's lock waits for its release; a holderRef's Job or
        // Pod may have finished while the controller was down
        let pass = FirstPass::default();
        let mut holder = with_phase(request("holder", "ns", "k", 0, 1, 10), Phase::Granted, None);
        holder.spec.holder_ref = Some(crate::crd::HolderRef {
            kind: crate::crd::HolderKind::Job,
            name: "job".into(),
        });
        let mut deleted = request("deleted", "ns", "j", 0, 1, 11);
        deleted.metadata.deletion_timestamp = deleted.metadata.creation_timestamp.clone();
        pass.observe(&watcher::Event::Init);
        pass.observe(&watcher::Event::InitApply(holder.clone()));
        pass.observe(&watcher::Event::InitApply(deleted.clone()));
        assert!(!pass.is_listed(&holder));
        assert!(!pass.is_listed(&deleted));
    }

    #[tokio::test(start_paused = true)]
    async fn a_listed_holder_goes_to_the_controller_when_its_renewal_is_due_whatever_the_slots() {
        let (store, mut writer) = kube::runtime::reflector::store::<DistributedLock>();
        let (to_pace, listed) = mpsc::unbounded_channel();
        // every slot taken by waiters that never report back
        for i in 0..IN_FLIGHT {
            let waiter = request(&format!("w{i}"), "ns", "k", 0, 1, i as u64);
            writer.apply_watcher_event(&watcher::Event::Apply(waiter.clone()));
            to_pace.send(ObjectRef::from_obj(&waiter)).unwrap();
        }
        // renewed just now with a 4 s lease: due in 1 s
        let now = Utc::now();
        let mut holder = granted(
            request("holder", "ns", "h", 0, 1, 50),
            now,
            now + chrono::Duration::seconds(4),
        );
        holder.spec.ttl = Some("4s".into());
        writer.apply_watcher_event(&watcher::Event::Apply(holder.clone()));
        to_pace.send(ObjectRef::from_obj(&holder)).unwrap();
        let waiter = request("late", "ns", "k", 0, 1, 60);
        writer.apply_watcher_event(&watcher::Event::Apply(waiter.clone()));
        to_pace.send(ObjectRef::from_obj(&waiter)).unwrap();
        let pass = Arc::new(FirstPass::default());
        let (to_controller, mut handed) = mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        tokio::spawn(pace(pass, store, listed, to_controller));
        for _ in 0..IN_FLIGHT {
            assert_ne!(
                handed.recv().await.unwrap().name,
                "holder",
                "not before its renewal is due"
            );
        }
        let next = tokio::time::timeout(Duration::from_secs(5), handed.recv()).await;
        let next = next
            .expect("the holder goes when due, while every slot is taken")
            .unwrap();
        assert_eq!(next.name, "holder");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited <= Duration::from_secs(1),
            "handed over {waited:?} after the start, just before its renewal (1 s)"
        );
    }
}
