//! Semaphores against the real search node: permits, exclusive grants,
//! limit changes, expiry, kind mismatches and fencing tokens that keep
//! growing across a key's life as a mutex and as a semaphore. Each test uses
//! its own lock ids.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use kube_lock_manager::lock::{
    AcquireRequest, ExtendOutcome, Lock, LockClient, LockError, MAX_PERMITS, PermitOutcome, PermitRequest,
    RetireOutcome, Semaphore,
};
use serde_json::json;

const PREFIX: &str = "semtest";
const LONG: Duration = Duration::from_secs(30);

fn client(url: &str) -> LockClient {
    common::lock_client(url, PREFIX)
}

fn permits(lock_id: &str, permits: u32, ttl: Duration) -> PermitRequest {
    PermitRequest {
        base: AcquireRequest::new(lock_id, ttl, json!({})),
        permits,
        exclusive: false,
    }
}

fn exclusive(lock_id: &str, ttl: Duration) -> PermitRequest {
    PermitRequest {
        exclusive: true,
        ..permits(lock_id, 1, ttl)
    }
}

/// Acquires and expects a grant.
async fn granted(client: &LockClient, request: &PermitRequest) -> Lock {
    match client.acquire_permits(request).await.expect("acquire permits") {
        PermitOutcome::Granted(lock) => lock,
        PermitOutcome::Full(sem) => panic!("{:?} should fit: {sem:?}", request.permits),
    }
}

/// Acquires and expects "does not fit".
async fn full(client: &LockClient, request: &PermitRequest) -> Semaphore {
    match client.acquire_permits(request).await.expect("acquire permits") {
        PermitOutcome::Granted(lock) => panic!("{} permits should not fit, got {lock:?}", request.permits),
        PermitOutcome::Full(sem) => sem,
    }
}

/// Permits held by live holders of the stored document (by this machine's
/// clock, which the engine on loopback shares).
async fn live_permits_in_document(client: &LockClient, lock_id: &str) -> u64 {
    let Some(doc) = common::raw_document(client, lock_id).await else {
        return 0;
    };
    let now = chrono::Utc::now();
    doc["holders"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| {
            h["expiresAt"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t > now)
        })
        .map(|h| h["permits"].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_acquirers_never_exceed_a_limit_of_three_and_all_get_their_turn() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-ten");
    client.semaphore_set(&id, 3).await.unwrap();

    // a watcher reads the stored document all along
    let done = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (client, id, done) = (client.clone(), id.clone(), done.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(Ordering::SeqCst) {
                most = most.max(live_permits_in_document(&client, &id).await);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let mut tasks = Vec::new();
    for n in 0..10 {
        let (client, id) = (client.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let request = permits(&id, 1, LONG);
            let grant = client
                .acquire_permits_timed(&request, Duration::from_secs(60))
                .await
                .unwrap()
                .unwrap_or_else(|sem| panic!("acquirer {n} never got a permit: {sem:?}"));
            let held = client.semaphore_get(&id).await.unwrap().unwrap();
            assert!(held.held() <= 3, "{held:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(client.release(&id, &grant.grant.lock.token).await.unwrap());
            grant.grant.lock.fencing_token
        }));
    }
    let mut fencing = Vec::new();
    for task in tasks {
        fencing.push(task.await.unwrap());
    }
    done.store(true, Ordering::SeqCst);
    let most = watcher.await.unwrap();
    assert!((1..=3).contains(&most), "at most 3 permits held at once, saw {most}");
    fencing.sort();
    fencing.dedup();
    assert_eq!(fencing.len(), 10, "every grant has its own fencing token");
    let sem = client.semaphore_get(&id).await.unwrap().unwrap();
    assert_eq!((sem.limit, sem.held()), (3, 0));
}

#[tokio::test]
async fn weighted_permits_wait_until_they_fit() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-weighted");
    client.semaphore_set(&id, 3).await.unwrap();
    let two = granted(&client, &permits(&id, 2, LONG)).await;
    let one = granted(&client, &permits(&id, 1, LONG)).await;
    let last = permits(&id, 1, LONG);
    let sem = full(&client, &last).await;
    assert_eq!((sem.limit, sem.held(), sem.holders.len()), (3, 3, 2));
    assert_eq!(sem.holders[0].token, two.token, "oldest grant first");
    assert_eq!(sem.holders[0].permits, 2);
    assert!(!sem.fits(1, false));
    assert!(client.release(&id, &one.token).await.unwrap());
    let third = granted(&client, &last).await;
    assert!(third.fencing_token > one.fencing_token && one.fencing_token > two.fencing_token);
    // more than the limit never fits
    full(&client, &permits(&id, 4, LONG)).await;
}

#[tokio::test]
async fn an_exclusive_request_waits_for_readers_and_blocks_new_ones() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-exclusive");
    client.semaphore_set(&id, 5).await.unwrap();
    let reader = granted(&client, &permits(&id, 1, LONG)).await;
    let writer = exclusive(&id, LONG);
    full(&client, &writer).await;
    assert!(client.release(&id, &reader.token).await.unwrap());
    let held = granted(&client, &writer).await;
    let sem = client.semaphore_get(&id).await.unwrap().unwrap();
    assert_eq!(sem.holders.len(), 1);
    assert!(sem.holders[0].exclusive);
    assert_eq!(sem.holders[0].permits, 5, "an exclusive holder takes the limit");
    assert_eq!(sem.held(), 5);
    full(&client, &permits(&id, 1, LONG)).await;
    full(&client, &exclusive(&id, LONG)).await;
    // raising the limit lets no reader in beside a writer
    client.semaphore_set(&id, 10).await.unwrap();
    full(&client, &permits(&id, 1, LONG)).await;
    assert!(client.release(&id, &held.token).await.unwrap());
    granted(&client, &permits(&id, 1, LONG)).await;
    // limit 0 closes the key, also to an exclusive request
    let closed = common::unique("sem-closed");
    client.semaphore_set(&closed, 0).await.unwrap();
    full(&client, &exclusive(&closed, LONG)).await;
    full(&client, &permits(&closed, 1, LONG)).await;
}

#[tokio::test]
async fn a_raised_limit_lets_a_waiter_in_and_a_lowered_one_lets_holders_finish() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-limit");
    client.semaphore_set(&id, 2).await.unwrap();
    let a = granted(&client, &permits(&id, 1, LONG)).await;
    let b = granted(&client, &permits(&id, 1, LONG)).await;
    let waiter = permits(&id, 1, LONG);
    full(&client, &waiter).await;
    let sem = client.semaphore_set(&id, 3).await.unwrap();
    assert_eq!((sem.limit, sem.holders.len()), (3, 2), "holders keep their permits");
    let c = granted(&client, &waiter).await;

    let sem = client.semaphore_set(&id, 1).await.unwrap();
    assert_eq!((sem.limit, sem.held()), (1, 3), "a lowered limit keeps every holder");
    let newcomer = permits(&id, 1, LONG);
    full(&client, &newcomer).await;
    // a holder's retry (same token) is still granted and keeps its fencing token
    let again = granted(&client, &waiter).await;
    assert_eq!(
        (again.token.as_str(), again.fencing_token),
        (c.token.as_str(), c.fencing_token)
    );
    assert!(client.release(&id, &a.token).await.unwrap());
    assert!(client.release(&id, &b.token).await.unwrap());
    full(&client, &newcomer).await; // 1 held, limit 1
    assert!(client.release(&id, &c.token).await.unwrap());
    granted(&client, &newcomer).await;
}

#[tokio::test]
async fn expired_holders_free_their_permits() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-expiry");
    client.semaphore_set(&id, 2).await.unwrap();
    let short = granted(&client, &permits(&id, 2, Duration::from_millis(300))).await;
    let waiter = permits(&id, 1, LONG);
    full(&client, &waiter).await;
    // the extend of an expired holder reports it, it is not revived
    common::eventually("the short lease to run out", Duration::from_secs(5), || async {
        let sem = client.semaphore_get(&id).await.unwrap().unwrap();
        sem.holders.is_empty().then_some(())
    })
    .await;
    let outcome = client.extend_lease(&id, &short.token, LONG, None).await.unwrap();
    assert_eq!(outcome, ExtendOutcome::Expired);
    let next = common::eventually("the freed permits to be granted", Duration::from_secs(5), || async {
        match client.acquire_permits(&waiter).await.unwrap() {
            PermitOutcome::Granted(lock) => Some(lock),
            PermitOutcome::Full(_) => None,
        }
    })
    .await;
    assert!(next.fencing_token > short.fencing_token);
    // the grant dropped the expired holder: its token is simply not held now
    let doc = common::raw_document(&client, &id).await.unwrap();
    assert_eq!(doc["holders"].as_array().unwrap().len(), 1, "{doc}");
    let outcome = client.extend_lease(&id, &short.token, LONG, None).await.unwrap();
    assert_eq!(outcome, ExtendOutcome::NotHeld);
    assert!(!client.release(&id, &short.token).await.unwrap());
}

#[tokio::test]
async fn a_same_token_reacquire_keeps_its_fencing_token_and_refreshes_the_lease() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-retry");
    client.semaphore_set(&id, 2).await.unwrap();
    let request = permits(&id, 1, Duration::from_secs(5));
    let first = granted(&client, &request).await;
    let other = granted(&client, &permits(&id, 1, LONG)).await;
    let longer = PermitRequest {
        base: AcquireRequest {
            ttl: Duration::from_secs(60),
            metadata: json!({"try": 2}),
            ..request.base.clone()
        },
        ..request.clone()
    };
    let again = granted(&client, &longer).await;
    assert_eq!(again.token, first.token);
    assert_eq!(again.fencing_token, first.fencing_token);
    assert!(again.expires_at > first.expires_at);
    let sem = client.semaphore_get(&id).await.unwrap().unwrap();
    assert_eq!(sem.holders.len(), 2, "still one entry per token: {sem:?}");
    assert_eq!(sem.holders[0].metadata["try"], 2);
    assert!(other.fencing_token > first.fencing_token);
}

#[tokio::test]
async fn fencing_tokens_grow_from_mutex_to_semaphore_to_mutex() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-fence");
    let noise = common::unique("sem-noise");
    let mut tokens = Vec::new();
    // a mutex, granted, released and granted again until it runs out
    for _ in 0..2 {
        let lock = client.acquire(&id, LONG, json!({})).await.unwrap().unwrap();
        tokens.push(lock.fencing_token);
        assert!(client.release(&id, &lock.token).await.unwrap());
    }
    let lock = client
        .acquire(&id, Duration::from_millis(200), json!({}))
        .await
        .unwrap()
        .unwrap();
    tokens.push(lock.fencing_token);
    common::eventually("the mutex lease to run out", Duration::from_secs(5), || async {
        client.get(&id).await.unwrap().is_none().then_some(())
    })
    .await;
    // the expired mutex document is replaced by the semaphore
    client.semaphore_set(&id, 2).await.unwrap();
    for round in 0..3 {
        // other keys move the shard's _seq_no in between
        let other = client.acquire(&noise, LONG, json!({})).await.unwrap().unwrap();
        client.release(&noise, &other.token).await.unwrap();
        let a = granted(&client, &permits(&id, 1, LONG)).await;
        let b = granted(&client, &permits(&id, 1, LONG)).await;
        tokens.extend([a.fencing_token, b.fencing_token]);
        if round == 1 {
            client.semaphore_set(&id, 3).await.unwrap();
        }
        assert!(client.release(&id, &a.token).await.unwrap());
        assert!(client.release(&id, &b.token).await.unwrap());
    }
    assert_eq!(client.semaphore_delete(&id).await.unwrap(), RetireOutcome::Deleted);
    assert!(common::raw_document(&client, &id).await.is_none());
    for _ in 0..2 {
        let lock = client.acquire(&id, LONG, json!({})).await.unwrap().unwrap();
        tokens.push(lock.fencing_token);
        assert!(client.release(&id, &lock.token).await.unwrap());
    }
    // and once more a semaphore, created fresh
    client.semaphore_set(&id, 1).await.unwrap();
    tokens.push(granted(&client, &permits(&id, 1, LONG)).await.fencing_token);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens strictly increase: {tokens:?}"
    );
}

#[tokio::test]
async fn an_unpinned_fence_is_pinned_by_the_first_acquirer() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-unpinned");
    let before = client.acquire(&id, LONG, json!({})).await.unwrap().unwrap();
    client.release(&id, &before.token).await.unwrap();
    // as if the creator crashed right after creating it: no `fence` yet
    let created = client
        .elasticsearch()
        .index(elasticsearch::IndexParts::IndexId(client.index(), &id))
        .body(json!({"kind": "semaphore", "limit": 2, "holders": []}))
        .send()
        .await
        .unwrap();
    assert!(created.status_code().is_success());
    let first = granted(&client, &permits(&id, 1, LONG)).await;
    assert!(first.fencing_token > before.fencing_token);
    let doc = common::raw_document(&client, &id).await.unwrap();
    assert_eq!(doc["fence"].as_u64(), Some(first.fencing_token), "{doc}");
}

#[tokio::test]
async fn each_kind_refuses_the_other_kinds_calls() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-kind");
    // no semaphore
    let err = client.acquire_permits(&permits(&id, 1, LONG)).await.unwrap_err();
    assert!(matches!(err, LockError::NoSemaphore { .. }), "{err}");
    assert!(err.to_string().contains("lockctl semaphore set"), "{err}");
    assert!(client.semaphore_get(&id).await.unwrap().is_none());
    assert_eq!(client.semaphore_delete(&id).await.unwrap(), RetireOutcome::Missing);

    // a live mutex: semaphore calls are refused, the mutex stays
    let mutex = client.acquire(&id, LONG, json!({})).await.unwrap().unwrap();
    for err in [
        client.semaphore_set(&id, 3).await.unwrap_err(),
        client.acquire_permits(&permits(&id, 1, LONG)).await.unwrap_err(),
        client.semaphore_get(&id).await.unwrap_err(),
    ] {
        assert!(matches!(err, LockError::KindMismatch { .. }), "{err}");
        assert!(err.to_string().contains("held as a plain mutex until"), "{err}");
        assert_eq!(err.category(), "kind");
    }
    assert_eq!(client.get(&id).await.unwrap().unwrap().token, mutex.token);
    assert_eq!(client.semaphore_delete(&id).await.unwrap(), RetireOutcome::Missing);
    assert!(client.release(&id, &mutex.token).await.unwrap());

    // a semaphore: mutex calls are refused, the semaphore stays
    client.semaphore_set(&id, 3).await.unwrap();
    let err = client.acquire(&id, LONG, json!({})).await.unwrap_err();
    assert!(matches!(err, LockError::KindMismatch { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("is a semaphore (limit 3): acquire permits with --permits"),
        "{err}"
    );
    for err in [
        client.get(&id).await.unwrap_err(),
        client.get_raw(&id).await.unwrap_err(),
    ] {
        assert!(matches!(err, LockError::KindMismatch { .. }), "{err}");
        assert!(err.to_string().contains("lockctl semaphore get"), "{err}");
    }
    assert_eq!(client.semaphore_get(&id).await.unwrap().unwrap().limit, 3);
    assert!(!client.release(&id, "not-a-holder").await.unwrap());
    assert_eq!(
        client.extend_lease(&id, "not-a-holder", LONG, None).await.unwrap(),
        ExtendOutcome::NotHeld
    );

    // an expired mutex: no semaphore, and setting one replaces it
    let other = common::unique("sem-kind-expired");
    client
        .acquire(&other, Duration::from_millis(100), json!({}))
        .await
        .unwrap()
        .unwrap();
    common::eventually("the mutex lease to run out", Duration::from_secs(5), || async {
        client.get(&other).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(client.semaphore_get(&other).await.unwrap().is_none());
    let err = client.acquire_permits(&permits(&other, 1, LONG)).await.unwrap_err();
    assert!(matches!(err, LockError::NoSemaphore { .. }), "{err}");
    assert_eq!(client.semaphore_set(&other, 1).await.unwrap().limit, 1);

    // bad numbers are named
    let err = client.semaphore_set(&id, MAX_PERMITS + 1).await.unwrap_err();
    assert!(err.to_string().contains("invalid limit 10001"), "{err}");
    for n in [0, MAX_PERMITS + 1] {
        let err = client.acquire_permits(&permits(&id, n, LONG)).await.unwrap_err();
        assert!(err.to_string().contains(&format!("invalid permits {n}")), "{err}");
    }
    assert_eq!(client.semaphore_set(&id, MAX_PERMITS).await.unwrap().limit, MAX_PERMITS);
    granted(&client, &permits(&id, MAX_PERMITS, LONG)).await;
}

#[tokio::test]
async fn release_and_extend_work_on_semaphore_holders() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-release");
    client.semaphore_set(&id, 2).await.unwrap();
    let a = granted(&client, &permits(&id, 1, Duration::from_secs(5))).await;
    let b = granted(&client, &permits(&id, 1, LONG)).await;
    // extend with and without the fencing token
    for fencing in [None, Some(a.fencing_token)] {
        let outcome = client
            .extend_lease(&id, &a.token, Duration::from_secs(60), fencing)
            .await
            .unwrap();
        assert_eq!(outcome, ExtendOutcome::Extended);
    }
    let sem = client.semaphore_get(&id).await.unwrap().unwrap();
    let extended = sem.holders.iter().find(|h| h.token == a.token).unwrap();
    assert!(extended.expires_at > a.expires_at);
    assert_eq!(
        extended.fencing_token, a.fencing_token,
        "extending keeps the fencing token"
    );
    // a renewal names its grant: another fencing token under a's token
    // (the same token granted again) is not extended
    assert_eq!(
        client
            .extend_lease(&id, &a.token, Duration::from_secs(120), Some(b.fencing_token))
            .await
            .unwrap(),
        ExtendOutcome::Expired
    );
    let unchanged = client.semaphore_get(&id).await.unwrap().unwrap();
    let unchanged = unchanged.holders.iter().find(|h| h.token == a.token).unwrap();
    assert_eq!(unchanged.expires_at, extended.expires_at);
    assert_eq!(
        client.extend_lease(&id, "someone-else", LONG, None).await.unwrap(),
        ExtendOutcome::NotHeld
    );
    assert!(client.release(&id, &a.token).await.unwrap());
    assert!(
        !client.release(&id, &a.token).await.unwrap(),
        "a second release is harmless"
    );
    assert_eq!(
        client.extend_lease(&id, &a.token, LONG, None).await.unwrap(),
        ExtendOutcome::NotHeld
    );
    let sem = client.semaphore_get(&id).await.unwrap().unwrap();
    assert_eq!(sem.holders.len(), 1);
    assert_eq!(sem.holders[0].token, b.token);
    // deleting is refused while b holds a permit
    match client.semaphore_delete(&id).await.unwrap() {
        RetireOutcome::Held(sem) => assert_eq!(sem.holders[0].token, b.token),
        other => panic!("still held: {other:?}"),
    }
    assert!(client.release(&id, &b.token).await.unwrap());
    assert_eq!(client.semaphore_delete(&id).await.unwrap(), RetireOutcome::Deleted);
    assert_eq!(client.semaphore_delete(&id).await.unwrap(), RetireOutcome::Missing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_limit_changes_and_acquires_never_lose_a_holder() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("sem-race");
    client.semaphore_set(&id, 100).await.unwrap();
    let setters: Vec<_> = (0..4)
        .map(|n| {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move {
                for round in 0..10 {
                    client.semaphore_set(&id, 100 + n * 10 + round).await.unwrap();
                }
            })
        })
        .collect();
    let acquirers: Vec<_> = (0..20)
        .map(|_| {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move { granted(&client, &permits(&id, 1, LONG)).await })
        })
        .collect();
    let mut grants = Vec::new();
    for task in acquirers {
        grants.push(task.await.unwrap());
    }
    for task in setters {
        task.await.unwrap();
    }
    let sem = client.semaphore_get(&id).await.unwrap().unwrap();
    assert_eq!(sem.holders.len(), 20, "every granted holder is still there");
    for grant in &grants {
        let holder = sem
            .holders
            .iter()
            .find(|h| h.token == grant.token)
            .expect("holder kept");
        assert_eq!(holder.fencing_token, grant.fencing_token);
    }
    let mut fencing: Vec<u64> = grants.iter().map(|g| g.fencing_token).collect();
    fencing.sort();
    fencing.dedup();
    assert_eq!(fencing.len(), 20);
}
