//! Waiting in line: clients that wait for a key (`lockctl acquire|exec
//! --wait`) are served in the order they arrived, and the one next in line
//! notices a release within a few tens of milliseconds.
//!
//! The search engine has no watch, so waiting is polling, organised so that
//! only one waiter per key polls fast:
//!
//! - Each key that has waiters has one **queue document** in the lock index,
//!   id [`queue_id`]: a `~` prefix no lock key can carry, so no lock call ever
//!   addresses it, and it is never mistaken for a lock. It lists the waiters
//!   in arrival order. It changes only by compare-and-swap (read, then write
//!   with `if_seq_no`/`if_primary_term`, again on a conflict) — no script, so
//!   it works alike on every engine — and is deleted when its last waiter
//!   leaves.
//! - Only the **head** (the first live entry) tries to acquire, every
//!   [`HEAD_POLL`]. The others read the queue document, the closer to the
//!   head the more often ([`poll_interval`]), to notice when they move up.
//!   The lock script still decides every grant: the queue only decides who
//!   asks, so it cannot affect safety. Clients that do not wait (`acquire`
//!   without `--wait`, the operator) do not queue and may take a free lock
//!   between two polls of the head.
//! - Every waiter bumps a `beat` counter in its entry every [`BEAT_EVERY`]. An
//!   entry whose counter nobody has seen move for [`ENTRY_TTL`] — by the
//!   observer's own monotonic clock, so clocks of different machines never
//!   get compared — belongs to a waiter that crashed or hung, and whoever
//!   sees that removes it (the same observed-time rule as Kubernetes leader
//!   election). A crashed head thus holds up the line for at most
//!   `ENTRY_TTL` plus one poll of the waiter behind it.
//! - A waiter removes its own entry when it is granted, gives up, fails or is
//!   interrupted; one found removed (it was paused for longer than the TTL)
//!   joins again at the end.
//! - Semaphore keys: the same strict order — only the head asks, so a head
//!   whose permits do not fit (an `--exclusive` writer) holds up the waiters
//!   behind it rather than being starved by them. A request that can never
//!   be granted as things are (more permits than the limit)
//!   holds up nobody: it steps out of the line, looks at the limit every
//!   [`BEAT_EVERY`], and joins again at the end once it fits — as the
//!   operator lets such a request stand aside (reason ExceedsLimit).

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use elasticsearch::http::StatusCode;
use elasticsearch::params::OpType;
use elasticsearch::{DeleteParts, GetParts, IndexParts};
use serde::{Deserialize, Serialize};

use super::client::{LockClient, answer_version};
use super::error::LockError;
use super::ids::{MAX_LOCK_KEY_LEN, validate_lock_id};
use super::model::{AcquireRequest, Grant};
use super::semaphore::{PermitGrant, PermitRequest, Semaphore};
use super::transport::expect_success;

/// The head tries to acquire this often.
pub const HEAD_POLL: Duration = Duration::from_millis(25);
/// Every waiter shows it is alive this often.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);
/// An entry whose beat has not moved for this long is removed.
pub const ENTRY_TTL: Duration = Duration::from_secs(5);
/// Compare-and-swap rounds on the queue document before giving up.
const QUEUE_ROUNDS: usize = 60;
/// The `kind` of a queue document (for people reading the index).
pub const QUEUE_KIND: &str = "waitQueue";
const QUEUE_PREFIX: &str = "~queue~";
const HASHED_QUEUE_PREFIX: &str = "~queue-sha256~";

/// The id of the queue document of `lock_id`: `~queue~<key>`, or for a key
/// too long for that, `~queue-sha256~<hex of its SHA-256>`. `~` is not in
/// the lock-id alphabet, so it is never a lock key.
pub fn queue_id(lock_id: &str) -> String {
    if QUEUE_PREFIX.len() + lock_id.len() <= MAX_LOCK_KEY_LEN {
        return format!("{QUEUE_PREFIX}{lock_id}");
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, lock_id.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("{HASHED_QUEUE_PREFIX}{hex}")
}

/// The queue document of one key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueueDocument {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub lock_id: String,
    /// Arrival order: the first live one is the head.
    #[serde(default)]
    pub waiters: Vec<Waiter>,
}

/// One waiter in line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Waiter {
    /// The token the waiter will hold the lock with.
    pub token: String,
    /// Bumped every [`BEAT_EVERY`] while the waiter lives.
    #[serde(default)]
    pub beat: u64,
    /// Permits asked for (a semaphore request), for display.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permits: Option<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// When it joined, by its own clock (for display only; nothing is decided on it).
    pub joined_at: DateTime<Utc>,
}

impl Waiter {
    /// A new entry for `token`.
    pub fn new(token: &str, holder: Option<String>, permits: Option<(u32, bool)>) -> Self {
        Self {
            token: token.to_string(),
            beat: 0,
            permits: permits.map(|(n, _)| n),
            exclusive: permits.is_some_and(|(_, exclusive)| exclusive),
            holder,
            joined_at: Utc::now(),
        }
    }
}

/// How often a waiter at `place` (0 = head) looks again: the head tries to
/// acquire; the others read the queue, the closer the more often, so each
/// notices it moved up well before the one ahead of it is done.
pub fn poll_interval(place: usize) -> Duration {
    match place {
        0 => HEAD_POLL,
        1 => Duration::from_millis(50),
        2 => Duration::from_millis(200),
        _ => BEAT_EVERY,
    }
}

/// When each entry's beat was first seen at its current value, by this
/// observer's monotonic clock.
#[derive(Debug)]
pub struct Observer {
    ttl: Duration,
    seen: HashMap<String, (u64, Instant)>,
}

impl Observer {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            seen: HashMap::new(),
        }
    }

    /// Records what `waiters` show at `now`; the entries (token, beat) other
    /// than `me` whose beat has not moved for the TTL.
    pub fn observe(&mut self, waiters: &[Waiter], me: &str, now: Instant) -> Vec<(String, u64)> {
        let mut seen = HashMap::with_capacity(waiters.len());
        let mut stale = Vec::new();
        for waiter in waiters.iter().filter(|w| w.token != me) {
            let since = match self.seen.get(&waiter.token) {
                Some((beat, since)) if *beat == waiter.beat => *since,
                _ => now,
            };
            if now.saturating_duration_since(since) >= self.ttl {
                stale.push((waiter.token.clone(), waiter.beat));
            }
            seen.insert(waiter.token.clone(), (waiter.beat, since));
        }
        self.seen = seen;
        stale
    }
}

/// Removes the entries that are still exactly as seen stale (a beat since
/// then keeps an entry). True when something was removed.
pub fn prune(doc: &mut QueueDocument, stale: &[(String, u64)]) -> bool {
    let before = doc.waiters.len();
    doc.waiters
        .retain(|w| !stale.iter().any(|(token, beat)| *token == w.token && *beat == w.beat));
    doc.waiters.len() != before
}

/// Bumps `me`'s beat, or appends `me` at the end when it is not in line.
pub fn beat_or_join(doc: &mut QueueDocument, me: &Waiter) {
    match doc.waiters.iter_mut().find(|w| w.token == me.token) {
        Some(entry) => entry.beat += 1,
        None => doc.waiters.push(me.clone()),
    }
}

/// `me`'s place in line (0 = head), if in line.
pub fn place(doc: &QueueDocument, me: &str) -> Option<usize> {
    doc.waiters.iter().position(|w| w.token == me)
}

/// A queue document as read, with its version.
struct Versioned {
    doc: QueueDocument,
    version: Option<(u64, u64)>,
}

/// One waiter's place in the line of one key.
pub struct WaitQueue {
    client: LockClient,
    lock_id: String,
    id: String,
    me: Waiter,
}

impl WaitQueue {
    /// A place in the line of `lock_id` for the waiter `me` (not joined yet).
    pub fn new(client: &LockClient, lock_id: &str, me: Waiter) -> Result<Self, LockError> {
        validate_lock_id(lock_id)?;
        Ok(Self {
            client: client.clone(),
            lock_id: lock_id.to_string(),
            id: queue_id(lock_id),
            me,
        })
    }

    /// Runs `attempt` in turn: at once when nobody waits, otherwise once this
    /// waiter is the head of the line, every [`HEAD_POLL`], until it wins or
    /// `wait` has passed. Leaves the line in every case but cancellation (a
    /// dropped future: then call [`Self::leave`]). `check` runs instead of
    /// an attempt when others already wait, so a request that can never be
    /// granted (the wrong kind of key) fails at once. Without a grant: the
    /// last attempt's loss, if there was an attempt. A loss that is
    /// `hopeless` (it cannot be granted as things are) ends the turn at once,
    /// out of the line, so it holds up nobody behind it.
    pub async fn take_turn<W, L, A, Fut, C, CFut>(
        &self,
        wait: Duration,
        mut attempt: A,
        check: C,
        hopeless: &dyn Fn(&L) -> bool,
    ) -> Result<Result<W, Option<L>>, LockError>
    where
        A: FnMut() -> Fut,
        Fut: Future<Output = Result<Result<W, L>, LockError>>,
        C: FnOnce() -> CFut,
        CFut: Future<Output = Result<(), LockError>>,
    {
        let deadline = Instant::now() + wait;
        let nobody_waits = self.read().await?.doc.waiters.is_empty();
        let mut last = None;
        if nobody_waits {
            match attempt().await? {
                Ok(won) => return Ok(Ok(won)),
                Err(lost) if hopeless(&lost) => return Ok(Err(Some(lost))),
                Err(lost) => last = Some(lost),
            }
            if Instant::now() >= deadline {
                return Ok(Err(last));
            }
        } else {
            check().await?;
        }
        let outcome = self.wait_in_line(deadline, &mut attempt, last, hopeless).await;
        if let Err(e) = self.leave().await {
            tracing::debug!(lock_id = %self.lock_id, error = %e, "could not leave the line; the entry expires");
        }
        outcome
    }

    async fn wait_in_line<W, L, A, Fut>(
        &self,
        deadline: Instant,
        attempt: &mut A,
        mut last: Option<L>,
        hopeless: &dyn Fn(&L) -> bool,
    ) -> Result<Result<W, Option<L>>, LockError>
    where
        A: FnMut() -> Fut,
        Fut: Future<Output = Result<Result<W, L>, LockError>>,
    {
        let mut observer = Observer::new(ENTRY_TTL);
        let mut last_beat = None::<Instant>;
        loop {
            let beat_due = last_beat.is_none_or(|at| at.elapsed() >= BEAT_EVERY);
            let doc = self.refresh(&mut observer, beat_due).await?;
            if beat_due {
                last_beat = Some(Instant::now());
            }
            // not in line: the refresh put it back at the end, look again
            let Some(place) = place(&doc, &self.me.token) else {
                continue;
            };
            let next_look = match (place, last_beat) {
                // the head only looks at the line to beat
                (0, Some(at)) => at + BEAT_EVERY,
                _ => Instant::now() + poll_interval(place),
            };
            loop {
                if place == 0 {
                    match attempt().await? {
                        Ok(won) => return Ok(Ok(won)),
                        Err(lost) if hopeless(&lost) => return Ok(Err(Some(lost))),
                        Err(lost) => last = Some(lost),
                    }
                }
                let now = Instant::now();
                if now >= deadline {
                    return Ok(Err(last));
                }
                if now >= next_look {
                    break;
                }
                let pause = if place == 0 { HEAD_POLL } else { next_look - now };
                tokio::time::sleep(pause.min(deadline - now).min(next_look - now)).await;
            }
        }
    }

    /// Reads the line and notes the beats; removes entries seen stale, and
    /// beats (or joins) when `beat` or when this waiter is not in line. The
    /// line as written (or read).
    async fn refresh(&self, observer: &mut Observer, beat: bool) -> Result<QueueDocument, LockError> {
        for round in 0..QUEUE_ROUNDS {
            let Versioned { mut doc, version } = self.read().await?;
            let stale = observer.observe(&doc.waiters, &self.me.token, Instant::now());
            let pruned = prune(&mut doc, &stale);
            let missing = place(&doc, &self.me.token).is_none();
            if !(pruned || missing || beat) {
                return Ok(doc);
            }
            if pruned {
                tracing::info!(lock_id = %self.lock_id, removed = stale.len(), "removed waiters that stopped beating");
            }
            beat_or_join(&mut doc, &self.me);
            if self.write(&doc, version).await? {
                return Ok(doc);
            }
            conflict_pause(round).await;
        }
        Err(kept_changing())
    }

    /// Removes this waiter's entry (none: nothing to do). True when removed.
    pub async fn leave(&self) -> Result<bool, LockError> {
        for round in 0..QUEUE_ROUNDS {
            let Versioned { mut doc, version } = self.read().await?;
            let before = doc.waiters.len();
            doc.waiters.retain(|w| w.token != self.me.token);
            if doc.waiters.len() == before {
                return Ok(false);
            }
            if self.write(&doc, version).await? {
                return Ok(true);
            }
            conflict_pause(round).await;
        }
        Err(kept_changing())
    }

    /// The line as stored (realtime GET); empty when there is none.
    async fn read(&self) -> Result<Versioned, LockError> {
        let (index, id) = (self.client.index(), self.id.as_str());
        let es = self.client.elasticsearch();
        let answer = self
            .client
            .send("read the wait queue", || es.get(GetParts::IndexId(index, id)).send())
            .await?;
        if answer.status == StatusCode::NOT_FOUND {
            // no line (or no index yet: the first acquire sets it up)
            return Ok(Versioned {
                doc: self.empty(),
                version: None,
            });
        }
        expect_success("read the wait queue", &answer)?;
        let doc = serde_json::from_value(answer.body["_source"].clone()).map_err(|e| LockError::Malformed {
            lock_id: self.id.clone(),
            message: format!("as a wait queue: {e}"),
        })?;
        let version = answer_version("read the wait queue", &answer)?;
        Ok(Versioned {
            doc,
            version: Some(version),
        })
    }

    /// Writes the line if it is still at `version` (`None`: if there is
    /// none); an empty line is deleted. False on a conflict.
    async fn write(&self, doc: &QueueDocument, version: Option<(u64, u64)>) -> Result<bool, LockError> {
        let (index, id) = (self.client.index(), self.id.as_str());
        let es = self.client.elasticsearch();
        let answer = match version {
            None if doc.waiters.is_empty() => return Ok(true),
            Some((seq_no, term)) if doc.waiters.is_empty() => {
                self.client
                    .send("update the wait queue", || {
                        es.delete(DeleteParts::IndexId(index, id))
                            .if_seq_no(seq_no as i64)
                            .if_primary_term(term as i64)
                            .send()
                    })
                    .await?
            }
            _ => {
                let body = serde_json::to_value(doc).map_err(|e| LockError::Response {
                    operation: "update the wait queue",
                    message: e.to_string(),
                })?;
                self.client
                    .send("update the wait queue", || {
                        let request = es.index(IndexParts::IndexId(index, id)).require_alias(true);
                        let request = match version {
                            Some((seq_no, term)) => request.if_seq_no(seq_no as i64).if_primary_term(term as i64),
                            None => request.op_type(OpType::Create),
                        };
                        request.body(body.clone()).send()
                    })
                    .await?
            }
        };
        if answer.index_missing() {
            return Err(LockError::FencingUnproven {
                index: index.to_string(),
                reason: "the index (or its alias) was deleted".into(),
            });
        }
        // a conflict, or deleted meanwhile: read again
        if answer.status == StatusCode::CONFLICT || (version.is_some() && answer.status == StatusCode::NOT_FOUND) {
            return Ok(false);
        }
        expect_success("update the wait queue", &answer)?;
        Ok(true)
    }

    fn empty(&self) -> QueueDocument {
        QueueDocument {
            kind: QUEUE_KIND.into(),
            lock_id: self.lock_id.clone(),
            waiters: Vec::new(),
        }
    }
}

impl WaitQueue {
    /// Acquires the mutex in turn (see [`Self::take_turn`]); `None` when
    /// `wait` passed first.
    pub async fn acquire(&self, req: &AcquireRequest, wait: Duration) -> Result<Option<Grant>, LockError> {
        let outcome = self
            .take_turn(
                wait,
                || self.client.try_acquire_timed(req),
                || async { self.client.get_raw(&req.lock_id).await.map(|_| ()) },
                &|_| false,
            )
            .await?;
        Ok(outcome.ok())
    }

    /// Takes permits in turn (see [`Self::take_turn`]); without a grant, the
    /// semaphore as it was when `wait` passed.
    pub async fn acquire_permits(
        &self,
        req: &PermitRequest,
        wait: Duration,
    ) -> Result<Result<PermitGrant, Semaphore>, LockError> {
        let (client, lock_id) = (&self.client, &req.base.lock_id);
        let exists = move || async move {
            match client.semaphore_get(lock_id).await? {
                Some(_) => Ok(()),
                None => Err(LockError::NoSemaphore {
                    lock_id: lock_id.clone(),
                }),
            }
        };
        let deadline = Instant::now() + wait;
        let hopeless = |semaphore: &Semaphore| never_fits(semaphore, req);
        let outcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let outcome = self
                .take_turn(left, || self.client.try_permits_timed(req), exists, &hopeless)
                .await?;
            let Err(Some(full)) = &outcome else { break outcome };
            if !hopeless(full) {
                break outcome;
            }
            // out of the line until the limit lets it in (or the wait is over)
            let mut now_fits = false;
            while !now_fits && Instant::now() < deadline {
                let pause = BEAT_EVERY.min(deadline.saturating_duration_since(Instant::now()));
                tokio::time::sleep(pause).await;
                now_fits = match self.client.semaphore_get(lock_id).await? {
                    Some(semaphore) => !hopeless(&semaphore),
                    None => true,
                };
            }
            if !now_fits {
                break outcome;
            }
        };
        match outcome {
            Ok(granted) => Ok(Ok(granted)),
            Err(Some(full)) => Ok(Err(full)),
            // never asked (others were ahead): the semaphore as it is now
            Err(None) => match self.client.semaphore_get(lock_id).await? {
                Some(semaphore) => Ok(Err(semaphore)),
                None => Err(LockError::NoSemaphore {
                    lock_id: lock_id.clone(),
                }),
            },
        }
    }
}

impl LockClient {
    /// A place in the line of `lock_id` for a client that will acquire with
    /// `token` (not joined yet: [`WaitQueue::acquire`] joins when it must wait).
    pub fn wait_queue(
        &self,
        lock_id: &str,
        token: &str,
        holder: Option<String>,
        permits: Option<(u32, bool)>,
    ) -> Result<WaitQueue, LockError> {
        WaitQueue::new(self, lock_id, Waiter::new(token, holder, permits))
    }

    /// The waiters in line for `lock_id` (`lockctl … --wait` clients), in
    /// arrival order, as stored (also those about to be removed as stale).
    pub async fn waiters(&self, lock_id: &str) -> Result<Vec<Waiter>, LockError> {
        let line = WaitQueue::new(self, lock_id, Waiter::new("", None, None))?;
        Ok(line.read().await?.doc.waiters)
    }
}

/// True when `req` cannot be granted whoever lets go while the waiters
/// behind it could: more permits than a limit above 0. (A closed key, limit
/// 0, grants nobody, so its line keeps its order for when it opens.)
fn never_fits(semaphore: &Semaphore, req: &PermitRequest) -> bool {
    semaphore.limit > 0 && !req.exclusive && req.permits > semaphore.limit
}

fn kept_changing() -> LockError {
    LockError::Response {
        operation: "update the wait queue",
        message: "the queue document kept changing; try again".into(),
    }
}

/// A short, jittered pause after a conflict, so waiters that collided do not
/// collide again in step.
async fn conflict_pause(round: usize) {
    let jitter = (uuid::Uuid::new_v4().as_u128() % 10) as u64;
    let base = 2 * (round.min(10) as u64);
    tokio::time::sleep(Duration::from_millis(base + jitter)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(token: &str, beat: u64) -> Waiter {
        Waiter {
            beat,
            ..Waiter::new(token, None, None)
        }
    }

    fn line(waiters: Vec<Waiter>) -> QueueDocument {
        QueueDocument {
            kind: QUEUE_KIND.into(),
            lock_id: "k".into(),
            waiters,
        }
    }

    #[test]
    fn queue_ids_are_never_lock_ids_and_always_fit() {
        assert_eq!(queue_id("batch/reindex"), "~queue~batch/reindex");
        assert!(validate_lock_id(&queue_id("batch/reindex")).is_err());
        let long = "x".repeat(MAX_LOCK_KEY_LEN);
        let id = queue_id(&long);
        assert!(
            id.starts_with(HASHED_QUEUE_PREFIX) && id.len() <= MAX_LOCK_KEY_LEN,
            "{id}"
        );
        assert_ne!(queue_id(&long), queue_id(&"y".repeat(MAX_LOCK_KEY_LEN)));
        let fits = "x".repeat(MAX_LOCK_KEY_LEN - QUEUE_PREFIX.len());
        assert_eq!(queue_id(&fits).len(), MAX_LOCK_KEY_LEN);
    }

    #[test]
    fn an_entry_is_stale_only_after_its_beat_stood_still_for_the_ttl() {
        let ttl = Duration::from_secs(5);
        let mut observer = Observer::new(ttl);
        let t0 = Instant::now();
        let waiters = vec![waiter("me", 0), waiter("a", 3), waiter("b", 7)];
        assert!(observer.observe(&waiters, "me", t0).is_empty());
        // "a" beats, "b" does not
        let later = vec![waiter("me", 0), waiter("a", 4), waiter("b", 7)];
        assert!(observer.observe(&later, "me", t0 + Duration::from_secs(3)).is_empty());
        let stale = observer.observe(&later, "me", t0 + ttl);
        assert_eq!(stale, vec![("b".to_string(), 7)]);
        // my own entry is never stale to me, however long it stands still
        assert!(observer.observe(&[waiter("me", 0)], "me", t0 + ttl * 10).is_empty());
    }

    #[test]
    fn a_new_observer_waits_a_whole_ttl() {
        let mut observer = Observer::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let dead = vec![waiter("dead", 1)];
        assert!(observer.observe(&dead, "me", t0 + Duration::from_secs(100)).is_empty());
        assert_eq!(observer.observe(&dead, "me", t0 + Duration::from_secs(105)).len(), 1);
    }

    #[test]
    fn pruning_keeps_an_entry_that_beat_since_it_was_seen_stale() {
        let mut doc = line(vec![waiter("a", 1), waiter("b", 2), waiter("c", 0)]);
        let stale = vec![("a".to_string(), 1), ("b".to_string(), 1)];
        assert!(prune(&mut doc, &stale));
        let left: Vec<_> = doc.waiters.iter().map(|w| w.token.as_str()).collect();
        assert_eq!(left, ["b", "c"]);
        assert!(!prune(&mut doc, &stale));
    }

    #[test]
    fn joining_appends_and_beating_keeps_the_place() {
        let mut doc = line(vec![waiter("a", 0)]);
        let me = waiter("me", 0);
        beat_or_join(&mut doc, &me);
        assert_eq!(place(&doc, "me"), Some(1));
        beat_or_join(&mut doc, &me);
        assert_eq!((place(&doc, "me"), doc.waiters[1].beat), (Some(1), 1));
        assert_eq!(place(&doc, "nobody"), None);
    }

    #[test]
    fn only_the_head_polls_fast() {
        assert_eq!(poll_interval(0), HEAD_POLL);
        assert!(poll_interval(1) < poll_interval(2));
        assert_eq!(poll_interval(3), BEAT_EVERY);
        assert_eq!(poll_interval(9), BEAT_EVERY);
    }

    #[test]
    fn the_document_round_trips() {
        let doc = line(vec![Waiter::new("t", Some("job".into()), Some((2, false)))]);
        let json = serde_json::to_value(&doc).unwrap();
        assert_eq!(json["kind"], QUEUE_KIND);
        assert_eq!(json["waiters"][0]["permits"], 2);
        assert!(json["waiters"][0].get("exclusive").is_none());
        let back: QueueDocument = serde_json::from_value(json).unwrap();
        assert_eq!(back, doc);
    }
}
