//! Bad input from the search side: a lock document edited by hand into a
//! wrong shape, one written by a newer version (unknown fields, an unknown
//! kind), an index made read-only by an admin (`index.blocks.write`) or by
//! the disk flood stage (`read_only_allow_delete`, HTTP 429). Each is a clear
//! one-line error (library, CLI) or condition and event (operator); nothing is
//! granted twice or taken over, other keys are not hurt, and everything
//! recovers by itself once the cause is fixed. Each test has its own index.

mod common;

use std::time::Duration;

use common::{Setup, WAIT, await_lock, phase_of};
use kube_lock_manager::crd::Phase;
use kube_lock_manager::lock::{LockClient, LockError};
use serde_json::{Value, json};

const TTL: Duration = Duration::from_secs(30);

/// A lock client on a fresh index of its own, with the index set up.
async fn engine(name: &str) -> Option<(String, LockClient)> {
    let url = common::es_url()?;
    let client = common::lock_client(&url, &common::unique(name));
    client.ensure_ready().await.expect("index set up");
    Some((url, client))
}

/// Writes a document as an admin (or another program) would, bypassing our scripts.
async fn put_document(url: &str, client: &LockClient, id: &str, source: Value) {
    let response = reqwest::Client::new()
        .put(format!(
            "{url}/{}/_doc/{}?refresh=true",
            client.index(),
            id.replace('/', "%2F")
        ))
        .json(&source)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "put {id}: {}",
        response.text().await.unwrap()
    );
}

/// Sets (or with `null`, removes) index block settings.
async fn set_blocks(url: &str, index: &str, settings: Value) {
    let response = reqwest::Client::new()
        .put(format!("{url}/{index}/_settings"))
        .json(&settings)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "settings: {}",
        response.text().await.unwrap()
    );
}

fn lockctl(url: &str, client: &LockClient, args: &[&str]) -> (Option<i32>, String) {
    let prefix = client.index().trim_end_matches("-000001");
    let out = common::lockctl()
        .env("ELASTICSEARCH_URL", url)
        .env("LOCK_INDEX_PREFIX", prefix)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[tokio::test]
async fn a_document_edited_into_a_wrong_shape_is_refused_by_name_and_recovers_when_fixed() {
    let Some((url, client)) = engine("shape").await else {
        return;
    };
    // a date the mapping accepts (epoch millis) but the lock scripts cannot read
    put_document(
        &url,
        &client,
        "team/mangled",
        json!({"token": "t1", "expiresAt": 12345}),
    )
    .await;
    let before = common::raw_document(&client, "team/mangled").await;

    let err = client.acquire("team/mangled", TTL, json!({})).await.unwrap_err();
    assert!(matches!(err, LockError::Malformed { .. }), "{err:?}");
    let line = err.to_string();
    assert!(
        line.contains("\"team/mangled\"") && line.contains("expiresAt") && !line.contains('\n'),
        "one line naming the document and the field: {line}"
    );
    assert!(matches!(
        client.get("team/mangled").await,
        Err(LockError::Malformed { .. })
    ));
    assert_eq!(
        common::raw_document(&client, "team/mangled").await,
        before,
        "left as it was"
    );
    // the CLI: exit 2, one line
    let (code, stderr) = lockctl(&url, &client, &["acquire", "team/mangled"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("shape this version cannot use"), "{stderr}");

    // other keys are not hurt
    assert!(client.acquire("team/other", TTL, json!({})).await.unwrap().is_some());

    // a semaphore whose holders are not a list
    put_document(
        &url,
        &client,
        "team/sem",
        json!({"kind": "semaphore", "limit": 3, "fence": 1, "holders": {"a": 1}}),
    )
    .await;
    let (code, stderr) = lockctl(&url, &client, &["acquire", "team/sem", "--permits", "1"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("\"team/sem\"") && stderr.contains("holders"),
        "{stderr}"
    );

    // an admin fixes the date: the key works again
    put_document(
        &url,
        &client,
        "team/mangled",
        json!({"token": "t1", "expiresAt": "2000-01-01T00:00:00Z"}),
    )
    .await;
    let lock = client.acquire("team/mangled", TTL, json!({})).await.unwrap();
    assert!(lock.is_some(), "a fixed, expired document is free");
}

#[tokio::test]
async fn a_document_of_a_kind_this_version_does_not_know_is_never_touched() {
    let Some((url, client)) = engine("kind").await else {
        return;
    };
    // a newer version's kind of lock whose top-level lease looks expired to us
    let newer = json!({"kind": "rwlock", "token": "theirs", "expiresAt": "2000-01-01T00:00:00Z",
        "readers": [{"token": "r1", "expiresAt": "2999-01-01T00:00:00Z"}]});
    put_document(&url, &client, "jobs/rw", newer.clone()).await;

    let err = client.acquire("jobs/rw", TTL, json!({})).await.unwrap_err();
    assert!(matches!(err, LockError::KindMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("\"rwlock\""), "{err}");
    assert!(client.get("jobs/rw").await.is_err());
    assert!(client.semaphore_set("jobs/rw", 3).await.is_err());
    assert!(
        !client.release("jobs/rw", "theirs").await.unwrap(),
        "nothing of ours to release"
    );
    assert!(client.extend("jobs/rw", "theirs", TTL, None).await.is_err());
    let (code, stderr) = lockctl(&url, &client, &["exec", "jobs/rw", "--", "true"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("does not know"), "{stderr}");
    assert_eq!(
        common::raw_document(&client, "jobs/rw").await,
        Some(newer),
        "left untouched"
    );
}

#[tokio::test]
async fn fields_a_newer_version_added_are_kept_and_do_not_break_the_lock() {
    let Some((url, client)) = engine("fields").await else {
        return;
    };
    let held = client.acquire("jobs/extra", TTL, json!({})).await.unwrap().unwrap();
    // a newer version adds a field of its own to the live lock
    let mut doc = common::raw_document(&client, "jobs/extra").await.unwrap();
    doc["priorityClass"] = json!({"name": "high"});
    put_document(&url, &client, "jobs/extra", doc).await;

    assert!(
        client.acquire("jobs/extra", TTL, json!({})).await.unwrap().is_none(),
        "still held"
    );
    let seen = client.get("jobs/extra").await.unwrap().expect("read despite the field");
    assert_eq!(seen.token, held.token);
    assert!(client.extend("jobs/extra", &held.token, TTL, None).await.unwrap());
    assert!(client.release("jobs/extra", &held.token).await.unwrap());
    assert!(client.acquire("jobs/extra", TTL, json!({})).await.unwrap().is_some());
}

#[tokio::test]
async fn a_read_only_index_refuses_every_write_with_the_reason_and_recovers_when_lifted() {
    let Some((url, client)) = engine("readonly").await else {
        return;
    };
    let index = client.index().to_string();
    let held = client.acquire("ro/held", TTL, json!({})).await.unwrap().unwrap();

    for (block, words) in [
        ("index.blocks.write", "index.blocks.write"),
        // what the disk flood stage sets (HTTP 429): a block, not a passing overload
        ("index.blocks.read_only_allow_delete", "free disk space"),
    ] {
        set_blocks(&url, &index, json!({ block: true })).await;
        let err = client.acquire("ro/new", TTL, json!({})).await.unwrap_err();
        assert!(
            matches!(err, LockError::ReadOnly { .. }),
            "not retried as transient: {err:?}"
        );
        assert!(err.to_string().contains(words), "{err}");
        let renewal = client.extend("ro/held", &held.token, TTL, None).await.unwrap_err();
        assert!(matches!(renewal, LockError::ReadOnly { .. }), "{renewal:?}");
        let (code, stderr) = lockctl(&url, &client, &["acquire", "ro/new"]);
        assert_eq!((code, stderr.lines().count()), (Some(2), 1), "{stderr}");
        assert!(stderr.contains("read-only"), "{stderr}");
        // still held by its holder alone
        assert_eq!(client.get("ro/held").await.unwrap().unwrap().token, held.token);
        set_blocks(&url, &index, json!({ block: null })).await;
    }
    // lifted: the same client works again, nothing to restart
    assert!(client.extend("ro/held", &held.token, TTL, None).await.unwrap());
    assert!(client.acquire("ro/new", TTL, json!({})).await.unwrap().is_some());
}

#[tokio::test]
async fn the_operator_reports_a_read_only_index_and_a_mangled_lock_and_recovers() {
    let prefix = common::unique("op-ro");
    let Some(t) = Setup::new("op-readonly", &["--index-prefix", &prefix]).await else {
        return;
    };
    let url = common::es_url().unwrap();
    let client = common::lock_client(&url, &prefix);
    let index = format!("{prefix}-000001");

    t.create("holder", json!({"lockId": "k", "ttl": "30s"})).await;
    let token = t.granted("holder").await.status.unwrap().fencing_token.unwrap();
    set_blocks(&url, &index, json!({"index.blocks.write": true})).await;
    t.create("waiter", json!({"lockId": "k"})).await;
    t.delete("holder").await;
    // the release is refused: the holder's request stays (finalizer) and says why
    for name in ["holder", "waiter"] {
        await_lock(&t.api, name, "IndexReachable=False (IndexReadOnly)", WAIT, |l| {
            common::condition(l, "IndexReachable").is_some_and(|c| {
                c.status == "False" && c.reason == "IndexReadOnly" && c.message.contains("blocks.write")
            })
        })
        .await;
    }
    t.event("holder", "IndexReadOnly").await;
    assert_ne!(phase_of(&t.api.get("waiter").await.unwrap()), Some(Phase::Granted));

    // a mangled document of another key: only its request is told
    set_blocks(&url, &index, json!({"index.blocks.write": null})).await;
    let key = format!("{}/m", t.ns);
    put_document(&url, &client, &key, json!({"token": "x", "expiresAt": 12345})).await;
    t.create("mangled", json!({"lockId": "m"})).await;
    await_lock(&t.api, "mangled", "IndexReachable=False (UnreadableLock)", WAIT, |l| {
        common::condition(l, "IndexReachable")
            .is_some_and(|c| c.reason == "UnreadableLock" && c.message.contains("expiresAt"))
    })
    .await;

    // the block lifted: the holder's lock is released, the waiter served with a larger token
    let next = t.granted("waiter").await.status.unwrap();
    assert!(next.fencing_token.unwrap() > token);
    common::eventually("the holder's request to go", WAIT, || async {
        t.api.get_opt("holder").await.unwrap().is_none().then_some(())
    })
    .await;
    // the document fixed: the mangled key's request is granted by itself
    put_document(
        &url,
        &client,
        &key,
        json!({"token": "x", "expiresAt": "2000-01-01T00:00:00Z"}),
    )
    .await;
    t.granted("mangled").await;
}
