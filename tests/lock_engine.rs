//! The lock engine against the real search node: Kibana Lock Manager
//! behaviours plus fencing tokens. Each test uses its own lock ids.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use elasticsearch::indices::{IndicesCreateParts, IndicesGetSettingsParts};
use elasticsearch::{GetParts, UpdateParts};
use kube_lock_manager::lock::{
    AcquireRequest, ExtendOutcome, LockClient, LockError, LockManager, WithLockOptions, validate_lock_id,
};
use serde_json::{Value, json};

const PREFIX: &str = "locktest";

fn client(url: &str) -> LockClient {
    common::lock_client(url, PREFIX)
}

#[tokio::test]
async fn acquire_release_and_metadata() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("basic");
    let lock = client
        .acquire(&id, Duration::from_secs(30), json!({"owner": "team-a", "n": 1}))
        .await
        .unwrap()
        .expect("a free lock is acquired");
    assert_eq!(lock.metadata, json!({"owner": "team-a", "n": 1}));
    assert_eq!((lock.expires_at - lock.created_at).num_milliseconds(), 30_000);

    let seen = client.get(&id).await.unwrap().expect("get sees the lock");
    assert_eq!(seen.token, lock.token);
    assert_eq!(seen.metadata["owner"], "team-a");
    assert_eq!(seen.fencing_token, lock.fencing_token);

    assert!(client.release(&id, &lock.token).await.unwrap(), "holder releases");
    assert!(client.get(&id).await.unwrap().is_none(), "released lock is gone");
    assert!(
        !client.release(&id, &lock.token).await.unwrap(),
        "second release is harmless"
    );
    assert!(
        common::raw_document(&client, &id).await.is_none(),
        "release deletes the document"
    );
}

#[tokio::test]
async fn second_acquirer_fails_and_first_metadata_is_kept() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("held");
    let other = common::unique("other");
    let first = client
        .acquire(&id, Duration::from_secs(30), json!({"who": "first"}))
        .await
        .unwrap()
        .unwrap();
    let second = client
        .acquire(&id, Duration::from_secs(30), json!({"who": "second"}))
        .await
        .unwrap();
    assert!(second.is_none(), "a held lock is not acquired twice");
    let seen = client.get(&id).await.unwrap().unwrap();
    assert_eq!(seen.token, first.token);
    assert_eq!(seen.metadata["who"], "first");
    // different lock ids don't interfere
    assert!(acquires(&client, &other).await);
}

#[tokio::test]
async fn expiry_hands_the_lock_to_a_new_token_and_fences_the_old_one() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("expiry");
    let first = client
        .acquire(&id, Duration::from_millis(300), json!({"who": "first"}))
        .await
        .unwrap()
        .unwrap();
    // get hides the expired lock while the raw document remains
    common::eventually("the lock to expire", Duration::from_secs(5), || async {
        client.get(&id).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        common::raw_document(&client, &id).await.is_some(),
        "the expired document is still stored"
    );

    let second = client
        .acquire(&id, Duration::from_secs(30), json!({"who": "second"}))
        .await
        .unwrap();
    let second = second.expect("an expired lock is taken over");
    assert_ne!(second.token, first.token, "a takeover uses a new token");
    assert_eq!(second.metadata["who"], "second");
    assert!(second.fencing_token > first.fencing_token, "fencing token grows");
    assert!(
        !client.release(&id, &first.token).await.unwrap(),
        "old holder cannot release"
    );
    assert!(
        !client
            .extend(&id, &first.token, Duration::from_secs(30), None)
            .await
            .unwrap(),
        "old holder cannot extend"
    );
    assert_eq!(client.get(&id).await.unwrap().unwrap().token, second.token);
    assert!(
        client.release(&id, &second.token).await.unwrap(),
        "new holder can release"
    );
}

#[tokio::test]
async fn waiting_acquirer_gets_the_lock_once_released() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("wait");
    let holder = must_acquire(&client, &id, Duration::from_secs(30)).await;
    let waiter = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let req = AcquireRequest::new(&id, Duration::from_secs(30), json!({"who": "waiter"}));
            client.acquire_with_wait(&req, Duration::from_secs(20)).await
        })
    };
    // the waiter retries while the holder still holds the lock
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the waiter must not get a held lock");
    assert!(client.release(&id, &holder.token).await.unwrap());
    let got = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("waiter acquires after the release");
    assert_eq!(got.metadata["who"], "waiter");
}

#[tokio::test]
async fn extend_moves_expiry_forward_and_fails_after_release() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("extend");
    let lock = must_acquire(&client, &id, Duration::from_secs(5)).await;
    assert!(
        client
            .extend(&id, &lock.token, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    let seen = client.get(&id).await.unwrap().unwrap();
    assert!(
        seen.expires_at > lock.expires_at + chrono::Duration::seconds(50),
        "expiresAt moved forward"
    );
    assert_eq!(
        seen.fencing_token, lock.fencing_token,
        "extension keeps the fencing token"
    );
    assert!(client.release(&id, &lock.token).await.unwrap());
    assert!(
        !client
            .extend(&id, &lock.token, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn twenty_concurrent_acquirers_one_winner_one_release() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("race");
    let attempts = (0..20).map(|i| {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.acquire(&id, Duration::from_secs(30), json!({"i": i})).await })
    });
    let results: Vec<_> = futures::future::join_all(attempts).await;
    let winners: Vec<_> = results.into_iter().filter_map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(winners.len(), 1, "exactly one acquirer wins");

    // every contender tries to release with its own token; only the winner's works
    let mut tokens: Vec<String> = (0..19).map(|_| kube_lock_manager::lock::new_token()).collect();
    tokens.push(winners[0].token.clone());
    let releases = tokens.into_iter().map(|token| {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.release(&id, &token).await })
    });
    let released = futures::future::join_all(releases)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap().as_ref().unwrap())
        .count();
    assert_eq!(released, 1, "exactly one release succeeds");
}

#[tokio::test]
async fn concurrent_non_holders_cannot_steal_a_held_lock() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("steal");
    let holder = must_acquire(&client, &id, Duration::from_secs(30)).await;
    let thieves = (0..20).map(|_| {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let released = client
                .release(&id, &kube_lock_manager::lock::new_token())
                .await
                .unwrap();
            let acquired = client
                .acquire(&id, Duration::from_secs(30), json!({}))
                .await
                .unwrap()
                .is_some();
            released || acquired
        })
    });
    let successes = futures::future::join_all(thieves)
        .await
        .into_iter()
        .filter(|r| *r.as_ref().unwrap())
        .count();
    assert_eq!(successes, 0);
    assert_eq!(
        client.get(&id).await.unwrap().unwrap().token,
        holder.token,
        "the lock survives"
    );
}

#[tokio::test]
async fn token_changed_behind_the_holders_back_blocks_release() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("tamper");
    let lock = must_acquire(&client, &id, Duration::from_secs(30)).await;
    client
        .elasticsearch()
        .update(UpdateParts::IndexId(client.index(), &id))
        .body(json!({"doc": {"token": "someone-else"}}))
        .send()
        .await
        .unwrap();
    assert!(!client.release(&id, &lock.token).await.unwrap());
    assert_eq!(
        common::raw_document(&client, &id).await.unwrap()["token"],
        "someone-else"
    );
}

#[tokio::test]
async fn successive_acquisitions_get_fresh_tokens_and_growing_fencing_tokens() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("fencing");
    let mut tokens = Vec::new();
    let mut fencing = Vec::new();
    for _ in 0..5 {
        let lock = must_acquire(&client, &id, Duration::from_secs(30)).await;
        // extensions in between must not disturb the order
        assert!(
            client
                .extend(&id, &lock.token, Duration::from_secs(30), None)
                .await
                .unwrap()
        );
        tokens.push(lock.token.clone());
        fencing.push(lock.fencing_token);
        assert!(client.release(&id, &lock.token).await.unwrap());
    }
    // a new client (a process restart) continues the sequence
    let fresh = common::lock_client(&url, PREFIX);
    let lock = fresh
        .acquire(&id, Duration::from_secs(30), json!({}))
        .await
        .unwrap()
        .unwrap();
    tokens.push(lock.token);
    fencing.push(lock.fencing_token);
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 6, "every acquisition has a new token");
    assert!(
        fencing.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens strictly increase: {fencing:?}"
    );
}

#[tokio::test]
async fn lock_manager_keeps_its_token_kibana_style() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("manager");
    let a = LockManager::new(client(&url), &id);
    let b = LockManager::new(client(&url), &id);
    assert!(a.acquire(Duration::from_secs(30), json!({"by": "a"})).await.unwrap());
    assert!(!b.acquire(Duration::from_secs(30), json!({"by": "b"})).await.unwrap());
    assert!(!b.release().await.unwrap(), "b holds nothing");
    assert!(a.extend_ttl(Duration::from_secs(30)).await.unwrap());
    assert_eq!(a.get().await.unwrap().unwrap().metadata["by"], "a");
    assert!(a.release().await.unwrap());
    assert!(b.acquire(Duration::from_secs(30), json!({"by": "b"})).await.unwrap());
    assert_ne!(a.token(), b.token());
}

#[tokio::test]
async fn with_lock_runs_once_among_concurrent_callers_and_returns_its_value() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("withlock");
    let runs = Arc::new(AtomicUsize::new(0));
    let callers = (0..3).map(|i| {
        let client = client.clone();
        let id = id.clone();
        let runs = runs.clone();
        tokio::spawn(async move {
            client
                .with_lock(&id, WithLockOptions::default(), |_lock| async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, std::io::Error>(i * 10)
                })
                .await
        })
    });
    let results: Vec<_> = futures::future::join_all(callers)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the function ran once");
    let values: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(values.len(), 1);
    assert_eq!(*values[0] % 10, 0, "the function's value is returned");
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(e) if e.is_acquisition_error()))
        .count();
    assert_eq!(refused, 2, "the others get the acquisition error");
    assert!(client.get(&id).await.unwrap().is_none(), "released after success");
}

#[tokio::test]
async fn with_lock_releases_after_an_error_and_refuses_a_held_lock() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("withlock-err");
    let result = client
        .with_lock(&id, WithLockOptions::default(), |_| async { Err::<(), _>("boom") })
        .await;
    let err = result.unwrap_err();
    assert!(!err.is_acquisition_error());
    assert_eq!(err.to_string(), "boom");
    assert!(client.get(&id).await.unwrap().is_none(), "released after an error");

    let holder = must_acquire(&client, &id, Duration::from_secs(30)).await;
    let ran = AtomicUsize::new(0);
    let result = client
        .with_lock(&id, WithLockOptions::default(), |_| async {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, String>(())
        })
        .await;
    assert!(result.unwrap_err().is_acquisition_error());
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the function never ran");
    assert_eq!(client.get(&id).await.unwrap().unwrap().token, holder.token);
}

#[tokio::test]
async fn with_lock_keeps_a_short_lease_alive_through_a_longer_function() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("withlock-renew");
    let options = WithLockOptions {
        ttl: Duration::from_millis(500),
        ..WithLockOptions::default()
    };
    let checker = client.clone();
    let id2 = id.clone();
    let still_held_late = client
        .with_lock(&id, options, |lock| async move {
            tokio::time::sleep(Duration::from_millis(600)).await;
            // past the original 500 ms the lock is still ours
            let now = checker.get(&id2).await.unwrap();
            Ok::<_, String>(now.map(|l| l.token) == Some(lock.token.clone()) && Utc::now() > lock.expires_at)
        })
        .await
        .unwrap();
    assert!(still_held_late, "the lease was extended while the function ran");
    assert!(client.get(&id).await.unwrap().is_none());
}

#[tokio::test]
async fn index_assets_have_the_right_mappings_and_settings_and_are_not_recreated() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("assets");
    let client = common::lock_client(&url, &prefix);
    let lock = client
        .acquire("a", Duration::from_secs(30), json!({}))
        .await
        .unwrap()
        .unwrap();
    let mappings = client.assets().current_mappings().await.unwrap().unwrap();
    assert_eq!(mappings["dynamic"], "false");
    assert_eq!(mappings["properties"]["token"]["type"], "keyword");
    assert_eq!(mappings["properties"]["expiresAt"]["type"], "date");
    assert_eq!(mappings["properties"]["metadata"]["enabled"], false);
    let settings: Value = client
        .elasticsearch()
        .indices()
        .get_settings(IndicesGetSettingsParts::Index(&[client.index()]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let concrete = format!("{prefix}-000001");
    let index_settings = &settings[&concrete]["settings"]["index"];
    assert_eq!(index_settings["number_of_shards"], "1");
    assert_eq!(index_settings["auto_expand_replicas"], "0-2");
    assert_eq!(index_settings["hidden"], "true");
    let uuid = index_settings["uuid"].clone();

    // a new process (new client) sets up again: the index and its locks stay
    let again = common::lock_client(&url, &prefix);
    assert!(
        again
            .acquire("b", Duration::from_secs(30), json!({}))
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        again.get("a").await.unwrap().unwrap().token,
        lock.token,
        "existing locks survive"
    );
    let settings: Value = again
        .elasticsearch()
        .indices()
        .get_settings(IndicesGetSettingsParts::Index(&[again.index()]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        settings[&concrete]["settings"]["index"]["uuid"], uuid,
        "index not recreated"
    );
}

#[tokio::test]
async fn an_index_with_a_wrong_token_mapping_is_refused_and_its_documents_kept() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("broken");
    let client = common::lock_client(&url, &prefix);
    let index = format!("{prefix}-000001");
    create_index_by_hand(
        &client,
        &index,
        json!({"mappings": {"properties": {"token": {"type": "text"}, "expiresAt": {"type": "date"}}}}),
    )
    .await;
    let put = client
        .elasticsearch()
        .index(elasticsearch::IndexParts::IndexId(&index, "precious"))
        .body(json!({"token": "t", "expiresAt": "2999-01-01T00:00:00Z"}))
        .refresh(elasticsearch::params::Refresh::True)
        .send()
        .await
        .unwrap();
    assert!(put.status_code().is_success());

    let err = client
        .acquire("x", Duration::from_secs(30), json!({}))
        .await
        .expect_err("an index with a text token is refused");
    assert!(matches!(err, LockError::Index { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&index) && text.contains("\"token\"") && text.contains("text"),
        "{text}"
    );
    let doc: Value = client
        .elasticsearch()
        .get(GetParts::IndexId(&index, "precious"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["found"], true, "the index and its documents are still there");
    let mappings = client.assets().current_mappings().await.unwrap().unwrap();
    assert_eq!(mappings["properties"]["token"]["type"], "text", "nothing was changed");
}

#[tokio::test]
async fn an_index_missing_our_extra_fields_is_repaired_in_place() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("kibana-like");
    let client = common::lock_client(&url, &prefix);
    let index = format!("{prefix}-000001");
    // Kibana's own mappings: no holder, no fencingToken
    create_index_by_hand(
        &client,
        &index,
        json!({"mappings": {"dynamic": false, "properties": {
            "token": {"type": "keyword"}, "createdAt": {"type": "date"},
            "expiresAt": {"type": "date"}, "metadata": {"type": "object", "enabled": false}}}}),
    )
    .await;
    let uuid = index_uuid(&client, &index).await;
    let lock = client
        .acquire("x", Duration::from_secs(30), json!({}))
        .await
        .unwrap()
        .expect("the repaired index grants");
    assert_eq!(client.get("x").await.unwrap().unwrap().token, lock.token);
    let mappings = client.assets().current_mappings().await.unwrap().unwrap();
    assert_eq!(mappings["properties"]["fencingToken"]["type"], "long");
    assert_eq!(mappings["properties"]["holder"]["type"], "keyword");
    assert_eq!(
        index_uuid(&client, &index).await,
        uuid,
        "repaired in place, not re-created"
    );
}

async fn index_uuid(client: &LockClient, index: &str) -> String {
    let settings: Value = client
        .elasticsearch()
        .indices()
        .get_settings(IndicesGetSettingsParts::Index(&[index]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    settings[index]["settings"]["index"]["uuid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn setup_is_safe_from_many_processes_at_once() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("parallel");
    let clients: Vec<_> = (0..8).map(|_| common::lock_client(&url, &prefix)).collect();
    let setups = clients.iter().map(|c| c.ensure_ready());
    for result in futures::future::join_all(setups).await {
        result.expect("concurrent setup succeeds");
    }
    // and in sequence, again
    for c in &clients {
        c.assets().ensure().await.expect("repeated setup succeeds");
    }
}

#[tokio::test]
async fn transient_503s_of_the_acquire_request_are_retried_three_times() {
    let Some(url) = common::es_url() else { return };
    // Set up the index through the real node first: the proxy fails only the
    // acquire's `POST /<alias>/_update/<id>`.
    client(&url).ensure_ready().await.unwrap();
    for (failures, should_succeed) in [(3, true), (4, false)] {
        let proxy = common::FlakyProxy::start(&url, failures, common::lock_updates(PREFIX)).await;
        let flaky = common::lock_client(&proxy.url, PREFIX);
        flaky.ensure_ready().await.expect("setup is not failed by the proxy");
        assert_eq!(proxy.failed(), 0);
        let id = common::unique("flaky");
        let result = flaky.acquire(&id, Duration::from_secs(30), json!({})).await;
        if should_succeed {
            let lock = result
                .unwrap()
                .expect("3 transient failures of the acquire are retried");
            assert_eq!(client(&url).get(&id).await.unwrap().unwrap().token, lock.token);
        } else {
            let err = result.unwrap_err();
            assert!(matches!(err, LockError::Unavailable { attempts: 4, .. }), "{err}");
            assert!(err.to_string().contains("503"), "the cause is named: {err}");
            assert!(client(&url).get(&id).await.unwrap().is_none(), "nothing was granted");
        }
        assert_eq!(proxy.failed(), failures, "the failures hit the acquire request");
    }
}

#[tokio::test]
async fn an_expired_lease_is_not_extended_and_its_holder_is_told() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("extend-expired");
    let lock = must_acquire(&client, &id, Duration::from_secs(1)).await;
    until_expired(&client, &id).await;
    let outcome = client
        .extend_lease(&id, &lock.token, Duration::from_secs(30), Some(lock.fencing_token))
        .await
        .unwrap();
    assert_eq!(outcome, ExtendOutcome::Expired, "an expired lease is not revived");
    // without the fencing token (the CLI's path) too
    let outcome = client
        .extend_lease(&id, &lock.token, Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_eq!(outcome, ExtendOutcome::Expired);
    assert!(
        !client
            .extend(&id, &lock.token, Duration::from_secs(30), None)
            .await
            .unwrap()
    );
    assert!(client.get(&id).await.unwrap().is_none(), "still expired");
    let outcome = client
        .extend_lease(&id, "another-token", Duration::from_secs(30), None)
        .await
        .unwrap();
    assert_eq!(outcome, ExtendOutcome::NotHeld);
    // the next waiter is served
    assert!(acquires(&client, &id).await);
}

#[tokio::test]
async fn a_lease_renewal_reports_lost_when_its_lease_expired() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("lease-expired");
    let lock = must_acquire(&client, &id, Duration::from_millis(400)).await;
    until_expired(&client, &id).await;
    // renewals every ttl/4 = 1 s start only after the lease ran out
    let lease = kube_lock_manager::lock::Lease::start(
        client.clone(),
        lock,
        Duration::from_secs(4),
        std::time::SystemTime::now(),
    );
    let mut lost = lease.lost_signal();
    tokio::time::timeout(Duration::from_secs(10), lost.wait_for(|l| *l))
        .await
        .expect("the lease reports lost")
        .unwrap();
    assert!(lease.is_lost());
    lease.stop().await;
}

#[tokio::test]
async fn every_printable_ascii_id_round_trips_or_is_refused() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let base = common::unique("ascii");
    for c in (0x20u8..0x7f).map(char::from) {
        let id = format!("{base}a{c}b");
        let result = client.acquire(&id, Duration::from_secs(30), json!({})).await;
        if validate_lock_id(&id).is_ok() {
            let lock = result
                .unwrap_or_else(|e| panic!("{id:?} is valid but failed: {e}"))
                .unwrap_or_else(|| panic!("{id:?} not acquired"));
            assert_eq!(lock.lock_id, id);
            let seen = client.get(&id).await.unwrap().unwrap_or_else(|| panic!("get {id:?}"));
            assert_eq!(
                (seen.lock_id.as_str(), seen.token.as_str()),
                (id.as_str(), lock.token.as_str())
            );
            assert_eq!(
                common::raw_document(&client, &id).await.unwrap()["token"],
                lock.token.as_str()
            );
            assert!(client.release(&id, &lock.token).await.unwrap(), "{id:?}");
        } else {
            let err = result.expect_err(&id);
            assert!(
                matches!(err, LockError::InvalidLockId(ref bad) if *bad == id),
                "{id:?}: {err}"
            );
        }
    }
    for bad in [".", "..", "ns/..", "ns/.", "../x", "a/../b"] {
        let err = client
            .acquire(bad, Duration::from_secs(30), json!({}))
            .await
            .unwrap_err();
        assert!(matches!(err, LockError::InvalidLockId(_)), "{bad:?}: {err}");
        assert!(client.get(bad).await.is_err(), "{bad:?}");
    }
    // slashes and dots inside one id stay one document id
    for id in [format!("{base}/x"), format!("{base}/..x"), format!("{base}:y/z.")] {
        let lock = must_acquire(&client, &id, Duration::from_secs(30)).await;
        assert_eq!(client.get(&id).await.unwrap().unwrap().token, lock.token, "{id}");
    }
}

#[tokio::test]
async fn a_retried_acquire_with_the_same_token_keeps_its_fencing_token() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("retry-fencing");
    // another key's grants move the shard's _seq_no between the attempts
    let noise = common::unique("noise");
    let req = AcquireRequest::new(&id, Duration::from_secs(30), json!({"try": 1}));
    let first = client.try_acquire(&req).await.unwrap().unwrap();
    for attempt in 2..5 {
        let other = must_acquire(&client, &noise, Duration::from_secs(30)).await;
        client.release(&noise, &other.token).await.unwrap();
        let again = client
            .try_acquire(&req)
            .await
            .unwrap()
            .expect("our own token re-acquires");
        assert_eq!(again.token, first.token);
        assert_eq!(
            again.fencing_token, first.fencing_token,
            "attempt {attempt} keeps the grant's fencing token"
        );
        let seen = client.get(&id).await.unwrap().unwrap();
        assert_eq!(seen.fencing_token, first.fencing_token, "get agrees");
    }
    assert!(
        client
            .extend(&id, &first.token, Duration::from_secs(30), None)
            .await
            .unwrap()
    );
    assert_eq!(
        client.get(&id).await.unwrap().unwrap().fencing_token,
        first.fencing_token
    );
    assert!(client.release(&id, &first.token).await.unwrap());
    let next = must_acquire(&client, &id, Duration::from_secs(30)).await;
    assert!(
        next.fencing_token > first.fencing_token,
        "{} > {}",
        next.fencing_token,
        first.fencing_token
    );
}

/// The operator's token is the request's UID, so one token can be granted
/// twice: a renewal of the first grant must not extend (or stamp its fencing
/// token on) the second, made after another owner held the key.
#[tokio::test]
async fn a_renewal_extends_only_the_grant_it_names() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("extend-names-grant");
    let mine = AcquireRequest::new(&id, Duration::from_secs(1), json!({}));
    let first = client.try_acquire(&mine).await.unwrap().unwrap();
    until_expired(&client, &id).await;
    let between = must_acquire(&client, &id, Duration::from_secs(30)).await;
    assert!(client.release(&id, &between.token).await.unwrap());
    let mine = AcquireRequest {
        ttl: Duration::from_secs(30),
        ..mine
    };
    let second = client.try_acquire(&mine).await.unwrap().unwrap();
    assert_eq!(second.token, first.token);
    assert!(second.fencing_token > between.fencing_token);
    let before = client.get(&id).await.unwrap().unwrap();

    let outcome = client
        .extend_lease(&id, &first.token, Duration::from_secs(60), Some(first.fencing_token))
        .await
        .unwrap();
    assert_eq!(outcome, ExtendOutcome::Expired, "the first grant is over");
    let after = client.get(&id).await.unwrap().unwrap();
    assert_eq!(
        after.fencing_token, second.fencing_token,
        "the old fencing token is not stamped on"
    );
    assert_eq!(after.expires_at, before.expires_at, "the second grant is not extended");

    // the second grant renews (pinning its token), and then the first is
    // refused against the stored token too
    for _ in 0..2 {
        let outcome = client
            .extend_lease(&id, &second.token, Duration::from_secs(60), Some(second.fencing_token))
            .await
            .unwrap();
        assert_eq!(outcome, ExtendOutcome::Extended);
    }
    assert_eq!(
        client.get(&id).await.unwrap().unwrap().fencing_token,
        second.fencing_token
    );
    let outcome = client
        .extend_lease(&id, &first.token, Duration::from_secs(60), Some(first.fencing_token))
        .await
        .unwrap();
    assert_eq!(outcome, ExtendOutcome::Expired);
    // without a fencing token (the CLI's path) the token's current grant renews
    assert!(
        client
            .extend(&id, &first.token, Duration::from_secs(60), None)
            .await
            .unwrap()
    );
    assert_eq!(
        client.get(&id).await.unwrap().unwrap().fencing_token,
        second.fencing_token
    );
}

#[tokio::test]
async fn overlapping_prefixes_coexist_on_one_cluster() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("p");
    let staging_prefix = format!("{prefix}-staging");
    let prod = common::lock_client(&url, &prefix);
    let staging = common::lock_client(&url, &staging_prefix);
    // set up in both orders of a fresh process
    staging.ensure_ready().await.expect("the longer prefix sets up");
    prod.ensure_ready()
        .await
        .expect("the shorter prefix sets up next to it");
    common::lock_client(&url, &staging_prefix)
        .ensure_ready()
        .await
        .expect("and again");
    let a = prod
        .acquire("shared", Duration::from_secs(30), json!({"env": "prod"}))
        .await
        .unwrap()
        .unwrap();
    let b = staging
        .acquire("shared", Duration::from_secs(30), json!({"env": "staging"}))
        .await
        .unwrap()
        .expect("the same id in the other deployment is a different lock");
    assert_eq!(prod.get("shared").await.unwrap().unwrap().token, a.token);
    assert_eq!(staging.get("shared").await.unwrap().unwrap().token, b.token);
    let only_prod = prod
        .acquire("prod-only", Duration::from_secs(30), json!({}))
        .await
        .unwrap()
        .unwrap();
    assert!(
        staging.get("prod-only").await.unwrap().is_none(),
        "staging sees only its own locks"
    );
    assert_eq!(prod.get("prod-only").await.unwrap().unwrap().token, only_prod.token);
}

#[tokio::test]
async fn a_lock_index_recreated_under_a_running_client_is_refused() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("recreated");
    let client = common::lock_client(&url, &prefix);
    let held = client
        .acquire("a", Duration::from_secs(30), json!({}))
        .await
        .unwrap()
        .unwrap();
    let index = format!("{prefix}-000001");
    common::delete_index(&client, &index).await;
    // re-created by hand, alias and all, as a snapshot restore would: its
    // sequence numbers start again
    create_index_by_hand(
        &client,
        &index,
        json!({"mappings": kube_lock_manager::lock::lock_mappings(), "aliases": {prefix.clone(): {}}}),
    )
    .await;
    for (who, c) in [("running", &client), ("fresh", &common::lock_client(&url, &prefix))] {
        let err = c
            .acquire("b", Duration::from_secs(30), json!({}))
            .await
            .expect_err("no grant from a replaced index");
        assert!(matches!(err, LockError::FencingUnproven { .. }), "{who}: {err}");
        assert_eq!(err.category(), "fencing");
        assert!(err.to_string().contains("lockctl index recover"), "{err}");
    }
    // the old holder's token means nothing in the new index
    assert!(!client.release("a", &held.token).await.unwrap());
}

#[tokio::test]
async fn with_lock_releases_when_the_function_panics() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("withlock-panic");
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let task = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move {
            client
                .with_lock(&id, WithLockOptions::default(), |lock| async move {
                    started_tx.send(lock.token.clone()).unwrap();
                    if lock.fencing_token > 0 {
                        panic!("the function panics");
                    }
                    Ok::<_, String>(())
                })
                .await
        })
    };
    let token = started.await.expect("the function ran");
    assert!(task.await.unwrap_err().is_panic());
    // far sooner than the 30 s TTL
    common::eventually("the lock to be released", Duration::from_secs(5), || async {
        client.get(&id).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        common::raw_document(&client, &id).await.is_none(),
        "released, not expired ({token})"
    );
}

#[tokio::test]
async fn with_lock_releases_when_its_future_is_dropped() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let id = common::unique("withlock-drop");
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let run = client.with_lock(&id, WithLockOptions::default(), |lock| async move {
        started_tx.send(lock.token.clone()).unwrap();
        std::future::pending::<()>().await;
        Ok::<_, String>(())
    });
    assert!(tokio::time::timeout(Duration::from_millis(500), run).await.is_err());
    assert!(started.recv().await.is_some(), "the function ran");
    common::eventually("the lock to be released", Duration::from_secs(5), || async {
        client.get(&id).await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        common::raw_document(&client, &id).await.is_none(),
        "released, not expired"
    );
}

#[tokio::test]
async fn with_lock_tells_the_function_when_its_lock_was_lost() {
    let Some(url) = common::es_url() else { return };
    let client = client(&url);
    let other = common::lock_client(&url, PREFIX);
    let id = common::unique("withlock-lost");
    let options = WithLockOptions {
        ttl: Duration::from_secs(1),
        ..WithLockOptions::default()
    };
    let lost = client
        .with_lock(&id, options, |lock| async move {
            assert!(!lock.is_lost());
            // someone releases it by token (an admin, a bug) and takes it
            assert!(other.release(&lock.lock_id, &lock.token).await.unwrap());
            other
                .acquire(&lock.lock_id, Duration::from_secs(30), json!({}))
                .await
                .unwrap()
                .unwrap();
            let mut signal = lock.lost();
            let seen = tokio::time::timeout(Duration::from_secs(5), signal.wait_for(|l| *l)).await;
            Ok::<_, String>(seen.is_ok() && lock.is_lost())
        })
        .await
        .unwrap();
    assert!(lost, "the function learned that the lock was lost");
}

#[tokio::test]
async fn an_older_deployments_wildcard_template_does_not_stop_setup() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("legacy");
    let old = common::lock_client(&url, &prefix);
    // what the previous version installed: pattern `<prefix>*`, priority 500
    let put = old
        .elasticsearch()
        .indices()
        .put_index_template(elasticsearch::indices::IndicesPutIndexTemplateParts::Name(&format!(
            "{prefix}-old-template"
        )))
        .body(json!({"index_patterns": [format!("{prefix}*")], "priority": 500}))
        .send()
        .await
        .unwrap();
    assert!(put.status_code().is_success());
    let staging = common::lock_client(&url, &format!("{prefix}-staging"));
    let lock = staging
        .acquire("x", Duration::from_secs(30), json!({}))
        .await
        .unwrap()
        .expect("setup and grant despite the overlapping template");
    assert_eq!(staging.get("x").await.unwrap().unwrap().token, lock.token);
}

/// True when a fresh 30 s acquire of `id` succeeds (the key is free).
async fn acquires(client: &kube_lock_manager::lock::LockClient, id: &str) -> bool {
    client
        .acquire(id, Duration::from_secs(30), json!({}))
        .await
        .expect("acquire")
        .is_some()
}

/// A fresh acquire of `id` that must succeed.
async fn must_acquire(
    client: &kube_lock_manager::lock::LockClient,
    id: &str,
    ttl: Duration,
) -> kube_lock_manager::lock::Lock {
    client
        .acquire(id, ttl, json!({}))
        .await
        .expect("acquire")
        .unwrap_or_else(|| panic!("{id} is free and must be acquired"))
}

/// Waits until the lease of `id` has run out (by the engine's clock).
async fn until_expired(client: &kube_lock_manager::lock::LockClient, id: &str) {
    common::eventually("the lease to run out", Duration::from_secs(5), || async {
        client.get(id).await.unwrap().is_none().then_some(())
    })
    .await;
}

/// Creates `index` directly with this body (as an admin, an older version or
/// a restore would), bypassing the engine's setup.
async fn create_index_by_hand(client: &kube_lock_manager::lock::LockClient, index: &str, body: Value) {
    let created = client
        .elasticsearch()
        .indices()
        .create(IndicesCreateParts::Index(index))
        .body(body)
        .send()
        .await
        .expect("create index");
    assert!(
        created.status_code().is_success(),
        "create {index}: {}",
        created.status_code()
    );
}
