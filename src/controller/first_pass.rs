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
/// And at most one every this long: a listed request's reconcile is quick,
/// so slots alone would keep the controller (and the API server's CPU) busy
/// with the pass, ahead of the steps of a new request.
pub const ONE_EVERY: Duration = Duration::from_millis(1);
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

/// Which listed requests go first: the waiters (the head of a key its holder
/// left while the controller was down among them), then the rest.
fn urgency(lock: &DistributedLock) -> u8 {
    match queue::phase(lock) {
        Phase::Pending => 0,
        _ => 1,
    }
}

/// A holder handed over early only has its renewal scheduled again: its
/// wait is capped (the timer queue refuses waits of years).
const LONGEST_WAIT: Duration = Duration::from_secs(3600);

/// Holders listed with their renewal already due (it fell due while the
/// controller was down) are handed over one every this long, not all at
/// once: a burst of renewals (a status write each) would queue a new
/// request's writes behind it at the API server.
const OVERDUE_SPACING: Duration = Duration::from_millis(10);

/// When a listed holder goes to the controller, from `now`: just before its
/// renewal is due (see [`super::granted::renewal_due`]), which is when the
/// controller would have renewed it had it not restarted; and, if that is
/// now, how much longer it may still wait (its slack): until one more renewal
/// period has passed. Never renewed: at once, no slack.
///
/// A lease of 16 s and more has its status written every third renewal
/// ([`super::granted::worth_recording`]): the recorded renewal may be two
/// periods older than the last one, so most holders would look due at once
/// after a restart and be renewed together — a burst of extends and status
/// writes in front of new requests, and again every period after, as they
/// stay in step. Their recorded lease, a lower bound of the real one, is
/// renewed from when half of it is left (a period later), at the latest
/// with a quarter of it left; shorter leases, recorded at least every second
/// renewal, from a quarter gone, at the latest with half left.
fn hand_over(lock: &DistributedLock, now: DateTime<Utc>) -> (Duration, Duration) {
    let (ttl, period) = super::granted::lease_plan(lock);
    let Some(next) = super::granted::renewal_due(lock, period, None, now) else {
        return (Duration::ZERO, Duration::ZERO);
    };
    let period_ahead = chrono::Duration::from_std(period).unwrap_or_default();
    // (a renewal recorded in the future: due now, not a period later)
    let recorded_ahead = next == now;
    let due = if ttl / 8 >= super::granted::RECORDED_LEAD && !recorded_ahead {
        next + period_ahead
    } else {
        next
    };
    let wait = (due - now).to_std().map_or(Duration::ZERO, |wait| {
        wait.saturating_sub(RENEWAL_LEAD).min(LONGEST_WAIT)
    });
    let latest = due + period_ahead;
    let slack = (latest - now).to_std().unwrap_or_default().min(period);
    (wait, slack)
}

/// Listed holders, each waiting for its renewal to fall due (one timer per
/// request however often it is listed).
#[derive(Default)]
struct Holders {
    timers: DelayQueue<ObjectRef<DistributedLock>>,
    keys: HashMap<ObjectRef<DistributedLock>, tokio_util::time::delay_queue::Key>,
    /// When the next overdue holder may go.
    next_overdue: Option<tokio::time::Instant>,
}

impl Holders {
    /// How long an overdue holder waits for its turn (see
    /// [`OVERDUE_SPACING`]): not at all if its turn would come after `slack`.
    fn overdue_turn(&mut self, slack: Duration) -> Duration {
        let now = tokio::time::Instant::now();
        let turn = self.next_overdue.map_or(now, |next| next.max(now));
        if turn - now > slack {
            return Duration::ZERO;
        }
        self.next_overdue = Some(turn + OVERDUE_SPACING);
        turn - now
    }

    /// Forgets `holder`'s timer (it goes to the controller now).
    fn cancel(&mut self, holder: &ObjectRef<DistributedLock>) {
        if let Some(key) = self.keys.remove(holder) {
            self.timers.remove(&key);
        }
    }

    fn wait(&mut self, holder: ObjectRef<DistributedLock>, wait: Duration) {
        match self.keys.get(&holder) {
            Some(key) => self.timers.reset(key, wait),
            None => {
                let key = self.timers.insert(holder.clone(), wait);
                self.keys.insert(holder, key);
            }
        }
    }

    /// The next holder whose renewal falls due (pending while there is none).
    async fn due(&mut self) -> ObjectRef<DistributedLock> {
        match self.timers.next().await {
            Some(expired) => {
                let holder = expired.into_inner();
                self.keys.remove(&holder);
                holder
            }
            None => std::future::pending().await,
        }
    }
}

/// Hands the listed requests to the controller (`to_controller`): holders
/// when their renewal is due, never behind anything else; the others
/// waiters first, at most [`IN_FLIGHT`] of those being reconciled at a time
/// and one every [`ONE_EVERY`].
pub async fn pace(
    first_pass: Arc<FirstPass>,
    store: kube::runtime::reflector::Store<DistributedLock>,
    mut listed: mpsc::UnboundedReceiver<ObjectRef<DistributedLock>>,
    to_controller: mpsc::UnboundedSender<ObjectRef<DistributedLock>>,
) {
    let mut backlog: VecDeque<Arc<DistributedLock>> = VecDeque::new();
    let mut holders = Holders::default();
    let mut rate = tokio::time::interval(ONE_EVERY);
    rate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // a listed request: a holder to its timer (or to the controller, if due),
    // anything else to the backlog; false once the controller is gone
    let route =
        |next: ObjectRef<DistributedLock>, backlog: &mut VecDeque<Arc<DistributedLock>>, holders: &mut Holders| {
            let Some(lock) = store.get(&next) else { return true };
            if queue::phase(&lock) != Phase::Granted {
                // waiters before the rest, each group in list order
                let at = backlog.partition_point(|l| urgency(l) <= urgency(&lock));
                backlog.insert(at, lock);
                return true;
            }
            let wait = match hand_over(&lock, Utc::now()) {
                (Duration::ZERO, slack) => holders.overdue_turn(slack),
                (wait, _) => wait,
            };
            if wait.is_zero() {
                holders.cancel(&next);
                return to_controller.send(next).is_ok();
            }
            holders.wait(next, wait);
            true
        };
    // a holder whose renewal fell due (gone from the store: nothing to do)
    let due = |holder: ObjectRef<DistributedLock>| store.get(&holder).is_none() || to_controller.send(holder).is_ok();
    loop {
        if backlog.is_empty() {
            let alive = tokio::select! {
                next = listed.recv() => match next {
                    Some(next) => route(next, &mut backlog, &mut holders),
                    None => return,
                },
                holder = holders.due() => due(holder),
            };
            if !alive {
                return;
            }
            continue;
        }
        // whatever else arrived meanwhile (each in its place)
        while let Ok(next) = listed.try_recv() {
            if !route(next, &mut backlog, &mut holders) {
                return;
            }
        }
        let Some(lock) = backlog.pop_front() else { continue };
        // holders listed or falling due meanwhile never wait for a slot
        let slot = async {
            rate.tick().await;
            first_pass.take_slot(&lock).await
        };
        tokio::pin!(slot);
        loop {
            let alive = tokio::select! {
                () = &mut slot => break,
                Some(next) = listed.recv() => route(next, &mut backlog, &mut holders),
                holder = holders.due() => due(holder),
            };
            if !alive {
                return;
            }
        }
        if to_controller.send(ObjectRef::from_obj(lock.as_ref())).is_err() {
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
    fn a_holder_is_handed_over_just_before_its_renewal() {
        let at = |s: i64| DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap();
        let with_ttl = |mut lock: DistributedLock, ttl: &str| {
            lock.spec.ttl = Some(ttl.into());
            lock
        };
        let now = at(6);
        // renewed at 5 s for 10 s: due at 7.5 s; recorded at 0 for an hour
        // (written every third renewal): from half of it left, at 1,800 s
        let long = granted(with_ttl(request("long", "ns", "a", 0, 1, 1), "1h"), at(0), at(3600));
        let short = granted(with_ttl(request("short", "ns", "b", 0, 1, 2), "10s"), at(5), at(15));
        assert_eq!(hand_over(&short, now).0, Duration::from_millis(1000));
        assert_eq!(hand_over(&long, now).0, Duration::from_millis(1_793_500));
        // the default 30 s lease recorded 10 s ago: not due yet (at 15 s),
        // with a period of slack after that; 20 s ago: at once, 2.5 s slack
        let default = granted(request("default", "ns", "e", 0, 1, 5), at(0), at(30));
        assert_eq!(
            hand_over(&default, at(10)),
            (Duration::from_millis(4500), Duration::from_millis(7500))
        );
        assert_eq!(
            hand_over(&default, at(20)),
            (Duration::ZERO, Duration::from_millis(2500))
        );
        // overdue, or never renewed: at once
        assert_eq!(hand_over(&short, at(8)).0, Duration::ZERO);
        let never = with_phase(request("never", "ns", "c", 0, 1, 3), Phase::Granted, None);
        assert_eq!(hand_over(&never, now).0, Duration::ZERO);
        // a renewal recorded years ahead (a clock ahead, a hand edit) is due
        // at once, with one period of slack — not years (the timer queue
        // refuses those)
        let ahead = granted(
            with_ttl(request("ahead", "ns", "d", 0, 1, 4), "10s"),
            at(200_000_000),
            at(200_000_010),
        );
        assert_eq!(hand_over(&ahead, now).0, Duration::ZERO);
        assert_eq!(hand_over(&ahead, now).1, Duration::from_millis(2500));
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

    #[tokio::test(start_paused = true)]
    async fn a_holder_listed_while_every_slot_is_taken_does_not_wait_for_one() {
        let (store, mut writer) = kube::runtime::reflector::store::<DistributedLock>();
        let (to_pace, listed) = mpsc::unbounded_channel();
        // one waiter more than there are slots, none reporting back
        for i in 0..=IN_FLIGHT {
            let waiter = request(&format!("w{i}"), "ns", "k", 0, 1, i as u64);
            writer.apply_watcher_event(&watcher::Event::Apply(waiter.clone()));
            to_pace.send(ObjectRef::from_obj(&waiter)).unwrap();
        }
        let (to_controller, mut handed) = mpsc::unbounded_channel();
        tokio::spawn(pace(Arc::new(FirstPass::default()), store, listed, to_controller));
        for _ in 0..IN_FLIGHT {
            handed.recv().await.unwrap();
        }
        // then a holder overdue for its renewal
        let long_ago = Utc::now() - chrono::Duration::seconds(20);
        let holder = granted(
            request("holder", "ns", "h", 0, 1, 50),
            long_ago,
            long_ago + chrono::Duration::seconds(30),
        );
        writer.apply_watcher_event(&watcher::Event::Apply(holder.clone()));
        let sent = tokio::time::Instant::now();
        to_pace.send(ObjectRef::from_obj(&holder)).unwrap();
        let next = tokio::time::timeout(GIVE_UP, handed.recv()).await;
        assert_eq!(next.expect("handed over before a slot frees").unwrap().name, "holder");
        assert!(
            sent.elapsed() < Duration::from_millis(100),
            "at once: {:?}",
            sent.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn overdue_holders_are_spread_out_within_their_slack_and_the_most_urgent_go_at_once() {
        let (store, mut writer) = kube::runtime::reflector::store::<DistributedLock>();
        let (to_pace, listed) = mpsc::unbounded_channel();
        let now = Utc::now();
        let renewed = |ago_ms: i64| now - chrono::Duration::milliseconds(ago_ms);
        // 30 s leases (recorded every third renewal: due from half of the
        // recorded lease left, 15 s) due 1.5 s ago: 6 s of slack each
        for i in 0..30 {
            let holder = granted(
                request(&format!("h{i}"), "ns", &format!("k{i}"), 0, 1, i),
                renewed(16_500),
                renewed(16_500) + chrono::Duration::seconds(30),
            );
            writer.apply_watcher_event(&watcher::Event::Apply(holder.clone()));
            to_pace.send(ObjectRef::from_obj(&holder)).unwrap();
        }
        // recorded 24 s ago: past its slack (less than a quarter of the
        // recorded lease left), listed last
        let urgent = granted(
            request("urgent", "ns", "u", 0, 1, 99),
            renewed(24_000),
            renewed(24_000) + chrono::Duration::seconds(30),
        );
        writer.apply_watcher_event(&watcher::Event::Apply(urgent.clone()));
        to_pace.send(ObjectRef::from_obj(&urgent)).unwrap();
        let (to_controller, mut handed) = mpsc::unbounded_channel();
        let started = tokio::time::Instant::now();
        tokio::spawn(pace(Arc::new(FirstPass::default()), store, listed, to_controller));
        let mut order = Vec::new();
        for _ in 0..31 {
            let next = tokio::time::timeout(Duration::from_secs(6), handed.recv()).await;
            order.push((next.expect("within the slack").unwrap().name, started.elapsed()));
        }
        let urgent_at = order.iter().position(|(name, _)| name == "urgent").unwrap();
        assert!(urgent_at <= 1, "the holder past its slack goes at once: {order:?}");
        let last = order.last().unwrap().1;
        assert!(
            last >= OVERDUE_SPACING * 25 && last < Duration::from_secs(1),
            "one every {OVERDUE_SPACING:?}, not all at once: the last after {last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_overdue_holder_whose_turn_comes_after_its_slack_goes_at_once_and_takes_no_turn() {
        let mut holders = Holders::default();
        let second = Duration::from_secs(1);
        assert_eq!(holders.overdue_turn(second), Duration::ZERO);
        assert_eq!(holders.overdue_turn(second), OVERDUE_SPACING);
        let urgent = holders.overdue_turn(Duration::from_millis(5));
        assert_eq!(urgent, Duration::ZERO, "its turn (in 20 ms) is past its slack");
        assert_eq!(
            holders.overdue_turn(second),
            OVERDUE_SPACING * 2,
            "the urgent one took no turn"
        );
    }
}
