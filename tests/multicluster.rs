//! Two Kubernetes clusters, one lock index: requests with `scope: Cluster` in
//! either cluster (each runs its own operator) and `lockctl exec` clients
//! contend for the same keys. Needs `KLM_CLUSTERS=2 testenv/testenv up` (two
//! kube-apiservers over one etcd, each its own cluster; KUBECONFIG_B names the
//! second).
//!
//! - One holder at a time across both clusters and fencing tokens that only
//!   grow, checked on a recorded history; cluster B loses its operator and its
//!   API server (SIGKILL both) and cluster A keeps granting meanwhile.
//! - A waiter in one cluster is served when the holder in the other releases,
//!   within the operator's retry interval for locks held elsewhere
//!   (`--max-retry-interval`, 5 s): that handoff is measured.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kube::api::{Api, PostParams};
use kube_lock_manager::crd::{DistributedLock, Phase};
use serde_json::json;

use common::Operator;
use common::chaos::{History, TTL_MS, check, crd_client, exec_client, now_ms, testenv};

/// The search node and the second cluster's kubeconfig, or `None` (skip)
/// outside CI.
fn two_clusters() -> Option<(String, PathBuf)> {
    let url = common::services()?;
    let kubeconfig_b = common::kubeconfig_b()?;
    Some((url, kubeconfig_b))
}

/// One cluster's side of a test: its client, the test's namespace there, and
/// an operator that lets that namespace use scope Cluster.
struct Cluster {
    api: Api<DistributedLock>,
    ns: String,
    operator: Operator,
}

impl Cluster {
    /// `kubeconfig`: `None` for the first cluster ($KUBECONFIG).
    async fn start(kubeconfig: Option<&Path>, test: &str, run: &str, operator_args: &[&str]) -> Cluster {
        let client = match kubeconfig {
            Some(path) => common::client_for(path).await,
            None => kube::Client::try_default().await.expect("kubeconfig"),
        };
        common::install_crd(&client).await;
        let ns = common::namespace(&client, test).await;
        let args = [&["--cluster-scope-namespaces", ns.as_str()], operator_args].concat();
        let operator = Operator::start_in(kubeconfig, run, &args);
        Cluster {
            api: Api::namespaced(client, &ns),
            ns,
            operator,
        }
    }

    async fn create(&self, run: &str, name: &str, key: &str) {
        let request = common::lock_request(run, name, json!({"lockId": key, "scope": "Cluster"}));
        self.api
            .create(&PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("create {name} in {}: {e}", self.ns));
    }
}

/// One test at a time: the first takes cluster B down.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// CRD clients 0 and 1 run in cluster A, 2 and 3 in cluster B.
const CRD_CLIENTS_PER_CLUSTER: usize = 2;

/// Brings killed services back (`testenv up`) when a test panics while they
/// are down, so one failure does not fail the tests after it.
struct RestoreOnPanic;

impl Drop for RestoreOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // no assert: a panic while panicking aborts the test binary
            let _ = std::process::Command::new("testenv/testenv").arg("up").status();
        }
    }
}

fn in_cluster_a(client: &str) -> bool {
    client
        .strip_prefix('c')
        .and_then(|rest| rest.split('-').next())
        .and_then(|id| id.parse::<usize>().ok())
        .is_some_and(|id| id < CRD_CLIENTS_PER_CLUSTER)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_holder_across_two_clusters_and_one_cluster_lost() {
    let Some((url, kubeconfig_b)) = two_clusters() else {
        return;
    };
    let _serial = ONE_AT_A_TIME.lock().await;
    let run = common::unique("multi");
    let a = Cluster::start(None, "multi-a", &run, &[]).await;
    let mut b = Cluster::start(Some(&kubeconfig_b), "multi-b", &run, &[]).await;
    let keys: Vec<String> = (0..3).map(|i| format!("{run}-key{i}")).collect();
    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let out_dir = tempfile::tempdir().unwrap();
    let started = now_ms();

    let mut clients = Vec::new();
    for id in 0..2 * CRD_CLIENTS_PER_CLUSTER {
        let api = if id < CRD_CLIENTS_PER_CLUSTER {
            a.api.clone()
        } else {
            b.api.clone()
        };
        clients.push(tokio::spawn(crd_client(
            id,
            run.clone(),
            keys.clone(),
            None,
            api,
            history.clone(),
            stop.clone(),
        )));
    }
    let mut exec_threads = Vec::new();
    for id in 0..2 {
        let (keys, history, stop, dir) = (
            keys.clone(),
            history.clone(),
            stop.clone(),
            out_dir.path().to_path_buf(),
        );
        exec_threads.push(std::thread::spawn(move || {
            exec_client(id, keys, None, history, stop, dir)
        }));
    }
    let holds_since = |since: f64, of: &dyn Fn(&str) -> bool| {
        let holds = history.holds.lock().unwrap();
        holds.iter().filter(|h| h.start >= since && of(&h.client)).count()
    };
    let cluster_a = |c: &str| in_cluster_a(c);
    let cluster_b = |c: &str| c.starts_with('c') && !in_cluster_a(c);
    let exec = |c: &str| c.starts_with('x');

    // both clusters at work
    // (cluster B's requests wait while A's are handed the key at once: B's
    // operator looks again only when the lease it saw would have run out)
    common::eventually("grants in both clusters", Duration::from_secs(90), || async {
        (holds_since(0.0, &cluster_a) >= 1 && holds_since(0.0, &cluster_b) >= 1).then_some(())
    })
    .await;

    // cluster B is lost: its operator and its API server
    let lost_at = now_ms();
    eprintln!(
        "multicluster: both clusters granting after {:.1} s",
        (lost_at - started) / 1000.0
    );
    history.fault("SIGKILL cluster B's operator and kube-apiserver");
    b.operator.kill();
    testenv(&["kill", "apiserver-b"]);
    // should this test fail while B is down, the next one still finds it up
    let _restore_b = RestoreOnPanic;
    // B's holders' leases (the clients take 3 s) run out and A goes on: A
    // grants after that
    let after_leases = lost_at + TTL_MS;
    common::eventually(
        "cluster A and the exec clients to keep granting while cluster B is down",
        // 9 s typically; its CRD clients contend with 106 exec grants and
        // look again at most every 5 s (--max-retry-interval)
        Duration::from_secs(90),
        || async {
            (holds_since(after_leases, &cluster_a) >= 3 && holds_since(after_leases, &exec) >= 1).then_some(())
        },
    )
    .await;
    // (a grant read just before the kill is recorded a moment later)
    let granted_in_b_while_down = holds_since(lost_at + 1000.0, &cluster_b);
    eprintln!(
        "multicluster: cluster A kept granting {:.1} s after cluster B was lost",
        (now_ms() - lost_at) / 1000.0
    );

    // cluster B is back and serves its requests again
    history.fault("cluster B's kube-apiserver and operator restarted");
    testenv(&["up"]);
    b.operator.restart();
    let back_at = now_ms();
    common::eventually(
        "grants in cluster B after it is back",
        Duration::from_secs(90),
        || async { (holds_since(back_at, &cluster_b) >= 1).then_some(()) },
    )
    .await;
    eprintln!(
        "multicluster: cluster B granting again {:.1} s after it was back",
        (now_ms() - back_at) / 1000.0
    );

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    for t in exec_threads {
        t.join().unwrap();
    }

    // nothing stays held once everyone stopped (a lease left over runs out)
    let locks = common::lock_client(&url, "kube-locks");
    common::eventually(
        "every key free after all clients stopped",
        Duration::from_millis(TTL_MS as u64 + 5000),
        || async {
            for key in &keys {
                if locks.get(key).await.ok()?.is_some() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    let mut leftovers = Vec::new();
    for cluster in [&a, &b] {
        for lock in cluster.api.list(&Default::default()).await.unwrap().items {
            if common::phase_of(&lock) == Some(Phase::Granted) {
                leftovers.push(format!("{}/{}", cluster.ns, lock.metadata.name.unwrap_or_default()));
            }
        }
    }

    let holds = history.holds.lock().unwrap().clone();
    let violations = check(&holds, &HashMap::new());
    let (in_a, in_b) = (
        holds.iter().filter(|h| cluster_a(&h.client)).count(),
        holds.iter().filter(|h| cluster_b(&h.client)).count(),
    );
    eprintln!(
        "multicluster: {} grants checked ({in_a} in cluster A, {in_b} in cluster B, {} exec), {} violations",
        holds.len(),
        holds.len() - in_a - in_b,
        violations.len()
    );
    assert!(violations.is_empty(), "violations:\n{}", violations.join("\n"));
    assert!(
        leftovers.is_empty(),
        "requests still Granted after all clients stopped: {leftovers:?}"
    );
    assert_eq!(
        granted_in_b_while_down, 0,
        "cluster B granted while its operator and API server were down"
    );
}

/// The operator's default --max-retry-interval: how long a waiter may take
/// to notice that a lock held outside its cluster was released.
const MAX_RETRY_INTERVAL: Duration = Duration::from_secs(5);
/// Watch delivery, the release itself and a loaded CI machine.
const SLACK: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_served_when_the_other_clusters_holder_releases() {
    let Some((_url, kubeconfig_b)) = two_clusters() else {
        return;
    };
    let _serial = ONE_AT_A_TIME.lock().await;
    let run = common::unique("handoff");
    let clusters = [
        Cluster::start(None, "handoff-a", &run, &[]).await,
        Cluster::start(Some(&kubeconfig_b), "handoff-b", &run, &[]).await,
    ];
    let key = format!("{run}-key");
    let rounds = 12;

    // the holder alternates: A, B, A, …; each round's waiter is the next holder
    clusters[0].create(&run, "r0", &key).await;
    let mut holder = common::await_lock(&clusters[0].api, "r0", "Granted", common::WAIT, |l| {
        common::phase_of(l) == Some(Phase::Granted)
    })
    .await;
    let mut handoffs = Vec::new();
    for round in 0..rounds {
        let (from, to) = (&clusters[round % 2], &clusters[(round + 1) % 2]);
        let holder_name = format!("r{round}");
        let waiter_name = format!("r{}", round + 1);
        to.create(&run, &waiter_name, &key).await;
        common::await_lock(
            &to.api,
            &waiter_name,
            "waiting for a holder elsewhere",
            common::WAIT,
            |l| common::condition(l, "Granted").is_some_and(|c| c.status == "False" && c.reason == "HeldElsewhere"),
        )
        .await;
        // Release at a different moment of the waiter's retry cycle each round
        // (0, 2.1, 4.2, 1.3, … s after its first look), not always right after
        // it looked: this spreads the measured handoffs over the whole interval.
        tokio::time::sleep(Duration::from_millis(round as u64 * 2100 % 5000)).await;
        let released = Instant::now();
        from.api
            .delete(&holder_name, &Default::default())
            .await
            .unwrap_or_else(|e| panic!("delete {holder_name}: {e}"));
        let granted = common::await_lock(
            &to.api,
            &waiter_name,
            "Granted after the other cluster's holder released",
            MAX_RETRY_INTERVAL + SLACK + Duration::from_secs(10),
            |l| common::phase_of(l) == Some(Phase::Granted),
        )
        .await;
        handoffs.push(released.elapsed());
        let (before, after) = (
            holder.status.as_ref().and_then(|s| s.fencing_token),
            granted.status.as_ref().and_then(|s| s.fencing_token),
        );
        assert!(
            after > before,
            "fencing token did not grow across clusters: {before:?} then {after:?}"
        );
        holder = granted;
    }
    clusters[rounds % 2]
        .api
        .delete(&format!("r{rounds}"), &Default::default())
        .await
        .unwrap();

    let mut sorted = handoffs.clone();
    sorted.sort();
    let nearest_rank = |p: f64| sorted[((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    eprintln!(
        "multicluster: cross-cluster handoff over {rounds} releases (--max-retry-interval {MAX_RETRY_INTERVAL:?}): p50 {:?}, p90 {:?}, max {:?}",
        nearest_rank(0.5),
        nearest_rank(0.9),
        sorted[sorted.len() - 1]
    );
    let bound = MAX_RETRY_INTERVAL + SLACK;
    let late: Vec<_> = handoffs.iter().filter(|h| **h > bound).collect();
    assert!(
        late.is_empty(),
        "a waiter took longer than the retry interval ({MAX_RETRY_INTERVAL:?}) + {SLACK:?} to get a lock released in the other cluster: {late:?} (all: {handoffs:?})"
    );
}
