//! Reliability on a 3-node search cluster (`KLM_SEARCH_NODES=3 testenv/testenv up`):
//! the chaos workload of tests/chaos.rs (CRD and `lockctl exec` clients, two
//! operator replicas, all given every node's URL) plus an engine-level client
//! with a short request timeout, under search-cluster faults:
//!
//! 1. SIGKILL of the node holding the lock index's primary shard (a replica is promoted);
//! 2. SIGKILL of the elected cluster manager;
//! 3. a network partition cutting the primary's node off from the other two
//!    (its HTTP port stays open to clients, which may still send it requests);
//! 4. a full-cluster restart (all three SIGKILLed, then started).
//!
//! Checked: no two holders, fencing tokens strictly increasing per key (also
//! across the primary's promotion: evidence printed), no acknowledged grant
//! lost (a grant taken before each fault is still there after it), an acquire
//! that failed or timed out mid-failover is retried with the same token and
//! then agrees with what the index holds, every client recovers by itself.
//! Bounded form in CI (./scripts/test); `SEARCH_CHAOS_SECONDS=600` repeats
//! the fault cycle until the time is up.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::chaos::{History, Hold, TTL_MS, Workload, now_ms};
use common::search::{cluster_manager, node_urls, primary, testenv_async};
use kube_lock_manager::engine::EngineArgs;
use kube_lock_manager::lock::{AcquireRequest, LockClient};
use serde_json::json;

/// What the engine-level client saw.
#[derive(Default)]
struct EngineStats {
    grants: AtomicUsize,
    /// acquires that failed (timeout, connection refused, 503) and were retried with the same token
    retried: AtomicUsize,
    /// of those, how many had been written anyway (the retry found its own token)
    landed: AtomicUsize,
    /// reads that showed this client's token with another fencing token
    stale_reads: std::sync::Mutex<Vec<String>>,
    /// grants the index never came to show as acknowledged
    disagreements: std::sync::Mutex<Vec<String>>,
}

/// Takes one key over and over with a fresh token each time: acquire
/// (retrying the same request, so the same token, whenever a call fails),
/// check the grant against what the index holds, hold it briefly, release.
async fn engine_client(
    locks: LockClient,
    key: String,
    history: Arc<History>,
    stats: Arc<EngineStats>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let mut req = AcquireRequest::new(&key, Duration::from_millis(TTL_MS as u64), json!({}));
        req.holder = Some(format!("engine-{i}"));
        let granted = loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let sent = now_ms();
            match locks.try_acquire(&req).await {
                Ok(Some(lock)) => break Some((lock, sent)),
                Ok(None) => break None,
                Err(_) => {
                    stats.retried.fetch_add(1, Ordering::Relaxed);
                    if let Ok(Some(raw)) = locks.get_raw(&key).await
                        && raw.document.token == req.token
                    {
                        stats.landed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let Some((lock, sent)) = granted else {
            // an earlier grant of ours whose release failed: it runs out
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let start = now_ms();
        stats.grants.fetch_add(1, Ordering::Relaxed);
        // The index must hold this grant as it was acknowledged. A read may be
        // served by a copy that is behind or about to roll back (a replica, or
        // the old primary cut off by a partition): it must catch up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match locks.get_raw(&key).await {
                Ok(Some(raw)) if raw.document.token == lock.token && raw.fencing_token() == lock.fencing_token => break,
                Ok(Some(raw)) if raw.document.token == lock.token => {
                    stats.stale_reads.lock().unwrap().push(format!(
                        "granted with fencing token {}, a read showed {} (seq_no {}, term {})",
                        lock.fencing_token,
                        raw.fencing_token(),
                        raw.seq_no,
                        raw.primary_term
                    ));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                stats.disagreements.lock().unwrap().push(format!(
                    "{key}: granted with fencing token {} but the index never showed that grant",
                    lock.fencing_token
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await; // the work
        // the holder may rely on the lease until sent + ttl, and not after it
        // started releasing
        let end = now_ms().min(sent + TTL_MS);
        if end > start {
            history.holds.lock().unwrap().push(Hold {
                key: key.clone(),
                client: format!("engine-{i}"),
                fencing: lock.fencing_token as i64,
                requested: sent,
                start,
                end,
                paused_at: None,
                valid_until: None,
                told_lost: false,
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while locks.release(&key, &lock.token).await.is_err()
            && Instant::now() < deadline
            && !stop.load(Ordering::Relaxed)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A grant taken right before a fault, with a lease that outlives it.
struct Witness {
    key: String,
    token: String,
    fencing: u64,
}

async fn witness(locks: &LockClient, key: String) -> Witness {
    let lock = locks
        .acquire(&key, Duration::from_secs(600), json!({}))
        .await
        .unwrap_or_else(|e| panic!("acquire {key} before the fault: {e}"))
        .unwrap_or_else(|| panic!("{key} is held by someone else"));
    Witness {
        key,
        token: lock.token,
        fencing: lock.fencing_token,
    }
}

/// The witness grant is still there, unchanged, once the cluster answers.
async fn still_there(locks: &LockClient, w: &Witness, fault: &str) {
    let raw = common::eventually(
        &format!("{} readable after {fault}", w.key),
        Duration::from_secs(60),
        || async { locks.get_raw(&w.key).await.ok() },
    )
    .await;
    let raw = raw.unwrap_or_else(|| panic!("the acknowledged grant of {} was lost after {fault}", w.key));
    assert_eq!(
        raw.document.token, w.token,
        "the grant of {} changed hands after {fault}",
        w.key
    );
    assert_eq!(
        raw.fencing_token(),
        w.fencing,
        "the fencing token of {} changed after {fault}",
        w.key
    );
    assert!(
        locks.release(&w.key, &w.token).await.unwrap(),
        "release {} after {fault}",
        w.key
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a 3-node search cluster: KLM_SEARCH_NODES=3 (./scripts/test runs it)"]
async fn no_two_holders_and_no_lost_grant_under_search_cluster_faults() {
    let urls = node_urls();
    common::services().expect("the test environment");
    let url_list = urls.join(",");
    let long_seconds: u64 = std::env::var("SEARCH_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let work = Workload::start(&url_list, "search").await;
    let history = work.history.clone();
    // the engine-level client: every node's URL and a short request timeout,
    // so calls do time out while the cluster fails over
    let engine_locks = LockClient::from_args(&EngineArgs {
        request_timeout: Duration::from_secs(2),
        ..EngineArgs::for_url(&url_list)
    })
    .unwrap();
    let stats = Arc::new(EngineStats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_engine_client = StopOnDrop(stop.clone());
    let engine_task = tokio::spawn(engine_client(
        engine_locks,
        format!("{}-engine", work.run),
        history.clone(),
        stats.clone(),
        stop.clone(),
    ));
    let locks = common::lock_client(&url_list, "kube-locks");
    let mut promotions = Vec::new();
    let mut cycle = 0;
    loop {
        cycle += 1;
        tokio::time::sleep(Duration::from_secs(4)).await;

        // 1. SIGKILL the node holding the primary
        let (node, term) = primary(&urls).await.expect("the lock index's primary");
        let w = witness(&locks, format!("{}-w{cycle}-primary", work.run)).await;
        history.fault(&format!("SIGKILL {node}, holding the primary (term {term})"));
        testenv_async(&["kill", &node]).await;
        let (promoted, new_term) = common::eventually("a promoted primary", Duration::from_secs(60), || async {
            primary(&urls).await.filter(|(n, _)| *n != node)
        })
        .await;
        assert!(
            new_term > term,
            "the primary moved to {promoted} without a new primary term"
        );
        promotions.push(format!("{node} (term {term}) -> {promoted} (term {new_term})"));
        still_there(&locks, &w, "the primary's node was killed").await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        testenv_async(&["up"]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;

        // 2. SIGKILL the cluster manager
        let manager = common::eventually("an elected cluster manager", Duration::from_secs(60), || {
            cluster_manager(&urls)
        })
        .await;
        let w = witness(&locks, format!("{}-w{cycle}-manager", work.run)).await;
        history.fault(&format!("SIGKILL {manager}, the cluster manager"));
        testenv_async(&["kill", &manager]).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        still_there(&locks, &w, "the cluster manager was killed").await;
        testenv_async(&["up"]).await;
        tokio::time::sleep(Duration::from_secs(3)).await;

        // 3. cut the primary's node off from the other two
        let (node, term) = primary(&urls).await.expect("the lock index's primary");
        let w = witness(&locks, format!("{}-w{cycle}-partition", work.run)).await;
        history.fault(&format!(
            "partition {node}, holding the primary (term {term}), for 10 s"
        ));
        testenv_async(&["partition", &node]).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        if let Some((now_on, now_term)) = primary(&urls[..]).await.filter(|(n, _)| *n != node) {
            promotions.push(format!(
                "{node} (term {term}) -> {now_on} (term {now_term}), partitioned"
            ));
        }
        testenv_async(&["heal"]).await;
        testenv_async(&["up"]).await; // waits until all three are back in one cluster
        still_there(&locks, &w, "the primary's node was cut off").await;
        tokio::time::sleep(Duration::from_secs(3)).await;

        // 4. full-cluster restart
        let w = witness(&locks, format!("{}-w{cycle}-restart", work.run)).await;
        history.fault("SIGKILL all three search nodes, restart them");
        testenv_async(&["kill", "opensearch-0"]).await;
        testenv_async(&["kill", "opensearch-1"]).await;
        testenv_async(&["kill", "opensearch-2"]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        testenv_async(&["up"]).await;
        still_there(&locks, &w, "a full-cluster restart").await;
        tokio::time::sleep(Duration::from_secs(5)).await;

        if work.started.elapsed() >= Duration::from_secs(long_seconds) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    engine_task.await.unwrap();
    let disagreements = stats.disagreements.lock().unwrap().clone();
    eprintln!(
        "search chaos: {cycle} fault cycles; primary moves: {promotions:?}; engine client: {} grants, {} failed acquires retried with the same token, {} of them had been written anyway",
        stats.grants.load(Ordering::Relaxed),
        stats.retried.load(Ordering::Relaxed),
        stats.landed.load(Ordering::Relaxed),
    );
    let stale_reads = stats.stale_reads.lock().unwrap().clone();
    eprintln!(
        "search chaos: {} stale reads of the engine client's own grant: {stale_reads:?}",
        stale_reads.len()
    );
    assert!(disagreements.is_empty(), "{disagreements:?}");
    assert!(
        stats.grants.load(Ordering::Relaxed) >= 10,
        "the engine client was granted too rarely to mean anything"
    );
    work.finish(true).await;
}
