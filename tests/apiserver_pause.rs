//! A hung kube-apiserver (SIGSTOP: it accepts connections and never answers)
//! for longer than a lease. The leases of Granted requests must still be
//! renewed — neither reading a request's holder nor recording a renewal in its
//! status may hold up the next extension — so nobody else can take their locks
//! meanwhile, while the requests still say Granted and their holders still run.
//! The same for a waiter granted during the pause (its Granted write hangs):
//! its new lease is kept until the write lands.
//! Once the API server answers again, the operator takes on new requests at
//! once, also after churn with short leases (CRD and `lockctl exec` clients)
//! through the pause.
//!
//! Pauses the shared API server: alone in its test binary.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::chaos::testenv;
use common::{Setup, await_lock, phase_of};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use kube_lock_manager::crd::{DistributedLock, Phase};
use kube_lock_manager::lock::AcquireRequest;
use serde_json::json;

/// Resumes the API server also when the test fails while it is paused.
struct ResumeOnDrop;

impl Drop for ResumeOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("testenv/testenv")
            .args(["resume", "apiserver"])
            .status();
    }
}

/// Requests on `lock_id` (scope Cluster) with 1 s leases, one after
/// another, each deleted soon after its grant (or after 5 s without one), a
/// third of them at once; API errors are retried.
async fn churn(t: Arc<Setup>, client: usize, lock_id: String, stop: Arc<AtomicBool>, grants: Arc<AtomicUsize>) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let name = format!("churn-{client}-{i}");
        let request = common::lock_request(
            &t.run,
            &name,
            json!({"lockId": lock_id, "scope": "Cluster", "ttl": "1s"}),
        );
        if t.api.create(&PostParams::default(), &request).await.is_err() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        // every third is withdrawn at once (the operator may see it
        // created, and the object gone, before it takes it on)
        if i % 3 == 0 {
            let _ = t.api.delete(&name, &Default::default()).await;
            continue;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            let granted = t.api.get_opt(&name).await.ok().flatten().and_then(|l| phase_of(&l));
            if granted == Some(Phase::Granted) {
                grants.fetch_add(1, Ordering::Relaxed);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while t.api.delete(&name, &Default::default()).await.is_err() && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// `lockctl exec` with 1 s leases on `key`, one after another (the search
/// index only: it runs on through the pause).
fn exec_loop(key: String, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let _ = common::lockctl()
            .args(["exec", &key, "--ttl", "1s", "--wait", "5s", "--", "sleep", "0.2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn token(lock: &DistributedLock) -> Option<String> {
    lock.status.as_ref()?.token.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_outlive_a_hung_api_server_and_new_requests_are_served_after_it() {
    let Some(t) = Setup::new("api-pause", &[]).await else {
        return;
    };
    let t = Arc::new(t);
    // a holder that still runs through the pause: a Pod bound to no real node stays Pending
    let pods: Api<Pod> = Api::namespaced(t.client.clone(), &t.ns);
    let pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "holder"},
        "spec": {"nodeName": "no-such-node", "containers": [{"name": "c", "image": "local/busybox:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    t.create("plain", json!({"lockId": "plain", "ttl": "2s"})).await;
    t.create(
        "bound",
        json!({"lockId": "bound", "ttl": "2s", "holderRef": {"kind": "Pod", "name": "holder"}}),
    )
    .await;
    let before = [t.granted("plain").await, t.granted("bound").await];
    // waiters (one with a holderRef) behind holders outside the cluster whose
    // leases run out during the pause
    let engine = common::lock_client(
        &common::es_url().unwrap(),
        kube_lock_manager::engine::DEFAULT_INDEX_PREFIX,
    );
    let mut waiters = Vec::new();
    for (name, holder) in [
        ("waiter", json!(null)),
        ("bound-waiter", json!({"kind": "Pod", "name": "holder"})),
    ] {
        let key = format!("{}/{name}", t.ns);
        let outside = AcquireRequest::new(&key, Duration::from_secs(4), json!({}));
        assert!(engine.try_acquire(&outside).await.unwrap().is_some());
        let mut spec = json!({"lockId": name, "ttl": "2s"});
        if !holder.is_null() {
            spec["holderRef"] = holder;
        }
        let uid = t.create(name, spec).await.metadata.uid;
        await_lock(&t.api, name, "Pending: HeldElsewhere", common::WAIT, |l| {
            common::condition(l, "Granted").is_some_and(|c| c.reason == "HeldElsewhere")
        })
        .await;
        waiters.push((name, key, uid));
    }

    let stop = Arc::new(AtomicBool::new(false));
    // contention on two keys through the pause: four CRD clients, two exec clients
    let churn_keys = [0, 1].map(|k| format!("{}-churn{k}", t.run));
    let grants = Arc::new(AtomicUsize::new(0));
    let churners: Vec<_> = (0..4)
        .map(|c| {
            let key = churn_keys[c % 2].clone();
            tokio::spawn(churn(t.clone(), c, key, stop.clone(), grants.clone()))
        })
        .collect();
    let execs: Vec<_> = churn_keys
        .iter()
        .map(|key| {
            let (key, stop) = (key.clone(), stop.clone());
            std::thread::spawn(move || exec_loop(key, stop))
        })
        .collect();
    // the pause comes while the churn is under way (grants handed out)
    common::eventually("churn grants before the pause", common::WAIT, || async {
        (grants.load(Ordering::Relaxed) >= 4).then_some(())
    })
    .await;

    let _resume = ResumeOnDrop;
    testenv(&["pause", "apiserver"]);
    let paused = Instant::now();
    // over three 2 s leases long; another owner tries to take the locks all
    // along (a waiter's from when the index shows its grant)
    let mut handed_over = vec![None; waiters.len()];
    while paused.elapsed() < Duration::from_secs(7) {
        let mut keys = ["plain", "bound"].map(|id| format!("{}/{id}", t.ns)).to_vec();
        for ((_, key, uid), at) in waiters.iter().zip(handed_over.iter_mut()) {
            let held = engine.get(key).await.unwrap();
            if held.is_some_and(|h| Some(&h.token) == uid.as_ref()) {
                at.get_or_insert(paused.elapsed());
            }
            if at.is_some() {
                keys.push(key.clone());
            }
        }
        for key in &keys {
            let intruder = AcquireRequest::new(key, Duration::from_secs(1), json!({"intruder": true}));
            let taken = engine.try_acquire(&intruder).await.unwrap();
            assert!(
                taken.is_none(),
                "{key} taken by another owner {:?} into the API server's pause (waiters granted at {handed_over:?}): a Granted request's lease was not renewed",
                paused.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    testenv(&["resume", "apiserver"]);
    for ((name, _, uid), at) in waiters.iter().zip(handed_over) {
        if *name == "waiter" {
            let at = at.unwrap_or_else(|| panic!("{name} acquires once the outside lease runs out, during the pause"));
            assert!(
                at < Duration::from_secs(4),
                "{name} granted at {at:?}: too late to test its lease"
            );
        }
        let waiter = t.granted(name).await;
        assert_eq!(&token(&waiter), uid, "{name} holds its grant");
    }
    for held in before {
        let name = held.metadata.name.clone().unwrap();
        let now = t.api.get(&name).await.unwrap();
        assert_eq!(
            phase_of(&now),
            Some(Phase::Granted),
            "{name} after the pause: {:?}",
            now.status
        );
        assert_eq!(token(&now), token(&held), "{name} holds the same grant");
    }
    // a new request on a free key is taken on and granted at once
    t.create("probe", json!({"lockId": "probe"})).await;
    await_lock(&t.api, "probe", "Granted", Duration::from_secs(15), |l| {
        phase_of(l) == Some(Phase::Granted)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for c in churners {
        c.await.unwrap();
    }
    for e in execs {
        e.join().unwrap();
    }
    // the churned keys are served too
    let after = json!({"lockId": churn_keys[0], "scope": "Cluster"});
    t.create("after", after).await;
    t.granted("after").await;
}
