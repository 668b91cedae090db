//! The benchmark harness (`bench/run` starts the real environment and runs
//! this): grant and handoff latency through the operator, the client-go Lease
//! peer, the engine floor, throughput and scale. Prints a table and writes
//! `bench/out/results.json`.
//!
//! Environment: KUBECONFIG and ELASTICSEARCH_URL (from `testenv/testenv env`),
//! LEASE_PEER_BIN (the Go peer), BENCH_QUICK=1 for small sample counts,
//! ETCD_PEER_BIN and ETCD_ENDPOINT (the etcd concurrency.Mutex peer),
//! BENCH_SCENARIOS=writes,grant,handoff,peer,etcd,engine,cliwait,throughput,scale to choose,
//! BENCH_LOCKCTL to run another build of the operator.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube_lock_manager::crd::{DistributedLock, Phase};
use kube_lock_manager::engine::EngineArgs;
use kube_lock_manager::lock::LockClient;
use serde_json::{Value, json};
use tokio::sync::Notify;

#[path = "plots.rs"]
mod plots;

#[path = "breakdown.rs"]
mod breakdown;

/// `BENCH_BREAKDOWN=1`: the operator logs its span timings and the handoff
/// scenario adds where each handoff's time went.
fn breakdown_wanted() -> bool {
    std::env::var("BENCH_BREAKDOWN").is_ok_and(|v| v == "1")
}

const LABEL: &str = "test-run";

#[derive(Clone, Debug, serde::Serialize)]
struct Row {
    scenario: String,
    count: usize,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    p99_ms: Option<f64>,
    value: Option<f64>,
    unit: String,
    note: String,
    /// The latency samples, sorted (for the plots).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    samples_ms: Vec<f64>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn latency_row(scenario: &str, mut samples_ms: Vec<f64>, note: &str) -> Row {
    samples_ms.sort_by(|a, b| a.total_cmp(b));
    Row {
        scenario: scenario.into(),
        count: samples_ms.len(),
        p50_ms: Some(percentile(&samples_ms, 50.0)),
        p90_ms: Some(percentile(&samples_ms, 90.0)),
        p99_ms: Some(percentile(&samples_ms, 99.0)),
        value: None,
        unit: "ms".into(),
        note: note.into(),
        samples_ms,
    }
}

fn value_row(scenario: &str, value: f64, unit: &str, note: &str) -> Row {
    Row {
        scenario: scenario.into(),
        count: 1,
        p50_ms: None,
        p90_ms: None,
        p99_ms: None,
        value: Some(value),
        unit: unit.into(),
        note: note.into(),
        samples_ms: Vec::new(),
    }
}

/// Sees every request's first Granted through one watch.
#[derive(Default)]
struct Observer {
    granted: Mutex<HashMap<String, Instant>>,
    /// The same moments by the wall clock (to line up with the operator's log).
    granted_wall: Mutex<HashMap<String, std::time::SystemTime>>,
    /// When each request was first seen carrying the operator's finalizer
    /// (its first write about a new request).
    finalized: Mutex<HashMap<String, Instant>>,
    notify: Notify,
}

impl Observer {
    fn start(api: Api<DistributedLock>) -> Arc<Self> {
        let observer = Arc::new(Self::default());
        let seen = observer.clone();
        tokio::spawn(async move {
            // a watch error (e.g. its resourceVersion expired under load) is
            // retried with backoff, not the end of the observer
            let mut events = watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(event) = event else { continue };
                if let watcher::Event::Apply(lock) | watcher::Event::InitApply(lock) = event {
                    let key = format!("{}/{}", lock.namespace().unwrap_or_default(), lock.name_any());
                    if lock.finalizers().iter().any(|f| f == kube_lock_manager::crd::FINALIZER) {
                        seen.finalized
                            .lock()
                            .unwrap()
                            .entry(key.clone())
                            .or_insert_with(Instant::now);
                    }
                    let granted = lock.status.as_ref().and_then(|s| s.phase) == Some(Phase::Granted);
                    if granted {
                        seen.granted_wall
                            .lock()
                            .unwrap()
                            .entry(key.clone())
                            .or_insert_with(std::time::SystemTime::now);
                        seen.granted.lock().unwrap().entry(key).or_insert_with(Instant::now);
                        seen.notify.notify_waiters();
                    }
                }
            }
        });
        observer
    }

    async fn granted_at(&self, ns: &str, name: &str, timeout: Duration) -> Instant {
        let key = format!("{ns}/{name}");
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(at) = self.granted.lock().unwrap().get(&key) {
                return *at;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{key} was not granted within {timeout:?}");
            let _ = tokio::time::timeout(left, notified).await;
        }
    }

    fn finalized_at(&self, ns: &str, name: &str) -> Option<Instant> {
        self.finalized.lock().unwrap().get(&format!("{ns}/{name}")).copied()
    }

    fn granted_count(&self, ns: &str) -> usize {
        let prefix = format!("{ns}/");
        self.granted
            .lock()
            .unwrap()
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .count()
    }
}

/// Our writes (to requests and events) counted by the API server between two
/// readings of its counters, by kind, in name order.
fn writes_since(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Vec<(String, f64)> {
    let mut writes: Vec<(String, f64)> = after
        .iter()
        .filter(|(kind, _)| kind.contains("distributedlocks") || kind.contains("events"))
        .map(|(kind, count)| (kind.clone(), count - before.get(kind).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    writes.sort_by(|a, b| a.0.cmp(&b.0));
    writes
}

fn list_writes(writes: &[(String, f64)]) -> String {
    writes
        .iter()
        .map(|(k, d)| format!("{k} {d}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn request(run: &str, name: &str, spec: Value) -> DistributedLock {
    serde_json::from_value(json!({
        "apiVersion": "lockmanager.dev/v1alpha1", "kind": "DistributedLock",
        "metadata": {"name": name, "labels": {LABEL: run}},
        "spec": spec
    }))
    .unwrap()
}

struct Operator {
    child: Child,
    port: u16,
    run: String,
}

impl Operator {
    fn start(run: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(format!("bench/out/operator-{}.log", std::process::id())).unwrap();
        // BENCH_LOCKCTL: another build of the operator (e.g. the commit before, to compare)
        let bin = std::env::var("BENCH_LOCKCTL").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lockctl").into());
        let child = Command::new(bin)
            .args([
                "operator",
                "--selector",
                &format!("{LABEL}={run}"),
                "--http-addr",
                &format!("127.0.0.1:{port}"),
            ])
            .env(
                "RUST_LOG",
                std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| {
                    if breakdown_wanted() {
                        "warn,kube_lock_manager::controller=debug".into()
                    } else {
                        "warn".into()
                    }
                }),
            )
            .env("KLM_LOG_SPANS", if breakdown_wanted() { "1" } else { "0" })
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the operator");
        Self {
            child,
            port,
            run: run.into(),
        }
    }

    async fn wait_ready(&mut self) -> Duration {
        let started = Instant::now();
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        loop {
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return started.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the operator exited ({status}) before it was ready: see bench/out/operator-*.log");
            }
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "operator never became ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }

    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = Self::start(&self.run.clone());
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Bench {
    client: kube::Client,
    run: String,
    quick: bool,
    observer: Arc<Observer>,
    /// Every namespace a scenario made, to clean up at the end.
    namespaces: Mutex<Vec<String>>,
    /// The "holder deleted" handoffs, for the breakdown.
    handoffs: Mutex<Vec<breakdown::Handoff>>,
}

impl Bench {
    async fn namespace(&self, name: &str) -> String {
        let ns = format!("bench-{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        let api: Api<Namespace> = Api::all(self.client.clone());
        let mut object = Namespace::default();
        object.metadata.name = Some(ns.clone());
        api.create(&PostParams::default(), &object).await.unwrap();
        self.namespaces.lock().unwrap().push(ns.clone());
        ns
    }

    /// Deletes every request the scenarios made while the operator still runs
    /// (its finalizer releases their locks, so nothing is left held in the
    /// index), waits until they are gone, then deletes their namespaces.
    async fn clean_up(&self) {
        let namespaces = self.namespaces.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(300);
        for ns in &namespaces {
            let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), ns);
            let _ = api
                .delete_collection(&DeleteParams::default(), &Default::default())
                .await;
            let jobs: Api<Job> = Api::namespaced(self.client.clone(), ns);
            let _ = jobs
                .delete_collection(&DeleteParams::background(), &Default::default())
                .await;
        }
        for ns in &namespaces {
            let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), ns);
            let mut asked = Instant::now();
            while Instant::now() < deadline
                && api
                    .list_metadata(&Default::default())
                    .await
                    .is_ok_and(|list| !list.items.is_empty())
            {
                // one delete of 10,000 requests can run past the API
                // server's request timeout, having deleted only some: again
                if asked.elapsed() > Duration::from_secs(5) {
                    let _ = api
                        .delete_collection(&DeleteParams::default(), &Default::default())
                        .await;
                    asked = Instant::now();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let left: usize = futures::future::join_all(namespaces.iter().map(|ns| {
            let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), ns);
            async move { api.list(&Default::default()).await.map_or(0, |l| l.items.len()) }
        }))
        .await
        .into_iter()
        .sum();
        let api: Api<Namespace> = Api::all(self.client.clone());
        for ns in &namespaces {
            let _ = api.delete(ns, &DeleteParams::default()).await;
        }
        if left > 0 {
            eprintln!("bench: {left} requests were still not released after 300 s; left in place");
        } else {
            eprintln!("bench: cleaned up {} namespaces and their requests", namespaces.len());
        }
    }

    fn n(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// 1. Create a request for a free lock → Granted, seen by the watcher.
    async fn grant_latency(&self) -> Row {
        let ns = self.namespace("grant").await;
        let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), &ns);
        let mut samples = Vec::new();
        for i in 0..self.n(200, 20) {
            let name = format!("g{i}");
            let started = Instant::now();
            api.create(
                &PostParams::default(),
                &request(&self.run, &name, json!({"lockId": name})),
            )
            .await
            .unwrap();
            let at = self.observer.granted_at(&ns, &name, Duration::from_secs(30)).await;
            samples.push(at.duration_since(started).as_secs_f64() * 1000.0);
        }
        latency_row(
            "grant latency (create → Granted)",
            samples,
            "free lock, watcher-observed",
        )
    }

    /// Scenario 0, API writes per lock cycle as the kube-apiserver counts them
    /// (`apiserver_request_total` of its own /metrics, before and after):
    /// `n` cycles one after the other, each create → Granted → delete → gone,
    /// on a free lock id, with nothing else of this run in the cluster.
    async fn api_writes_per_cycle(&self) -> Vec<Row> {
        let ns = self.namespace("writes").await;
        let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), &ns);
        let n = self.n(50, 10);
        let before = self.api_writes().await;
        for i in 0..n {
            let name = format!("w{i}");
            api.create(
                &PostParams::default(),
                &request(&self.run, &name, json!({"lockId": name})),
            )
            .await
            .unwrap();
            self.observer.granted_at(&ns, &name, Duration::from_secs(30)).await;
            api.delete(&name, &DeleteParams::default()).await.unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while api.get_opt(&name).await.unwrap().is_some() {
                assert!(Instant::now() < deadline, "{name} was not gone 30 s after its delete");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // (the API server's own housekeeping — its identity Lease, … — is not ours)
        let by_kind = writes_since(&before, &self.api_writes().await);
        let per_cycle = |pick: &dyn Fn(&str) -> bool| {
            by_kind.iter().filter(|(k, _)| pick(k)).map(|(_, d)| d).sum::<f64>() / n as f64
        };
        let detail = |pick: &dyn Fn(&str) -> bool| {
            by_kind
                .iter()
                .filter(|(k, _)| pick(k))
                .map(|(k, d)| format!("{k} {:.2}", d / n as f64))
                .collect::<Vec<_>>()
                .join(", ")
        };
        vec![
            value_row(
                "API writes per lock cycle",
                per_cycle(&|_| true),
                "writes",
                &format!(
                    "kube-apiserver's apiserver_request_total, {n} cycles create → Granted → delete → gone: {}",
                    detail(&|_| true)
                ),
            ),
            value_row(
                "API writes per lock cycle by the operator",
                per_cycle(&|k| !k.starts_with("POST distributedlocks") && !k.starts_with("DELETE distributedlocks")),
                "writes",
                "the same without the client's create and delete",
            ),
        ]
    }

    /// The kube-apiserver's count of mutating requests so far, by "VERB resource[/subresource]".
    async fn api_writes(&self) -> HashMap<String, f64> {
        let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
        let text = self
            .client
            .request_text(request)
            .await
            .expect("the kube-apiserver's /metrics (the bench's kubeconfig must be allowed to read it)");
        let mut counts = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
                continue;
            };
            let Some((labels, value)) = rest.rsplit_once("} ") else {
                continue;
            };
            let labels: HashMap<&str, &str> = labels
                .split("\",")
                .filter_map(|pair| pair.split_once("=\""))
                .map(|(k, v)| (k, v.trim_end_matches('"')))
                .collect();
            let verb = labels.get("verb").copied().unwrap_or_default();
            if !matches!(verb, "POST" | "PUT" | "PATCH" | "APPLY" | "DELETE" | "DELETECOLLECTION") {
                continue;
            }
            let mut kind = format!("{verb} {}", labels.get("resource").copied().unwrap_or_default());
            if let Some(sub) = labels.get("subresource").filter(|s| !s.is_empty()) {
                kind = format!("{kind}/{sub}");
            }
            *counts.entry(kind).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
        }
        counts
    }

    /// 2. Ten waiters; release the holder → next waiter Granted.
    async fn handoff_latency(&self, via_job: bool) -> Row {
        let ns = self.namespace(if via_job { "handoff-job" } else { "handoff" }).await;
        let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), &ns);
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &ns);
        let mut next = 0usize;
        let create = |i: usize| {
            let (api, jobs, run) = (api.clone(), jobs.clone(), self.run.clone());
            async move {
                let name = format!("h{i:05}");
                let mut spec = json!({"lockId": "hot"});
                if via_job {
                    let job: Job = serde_json::from_value(json!({
                        "metadata": {"name": name},
                        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
                    }))
                    .unwrap();
                    jobs.create(&PostParams::default(), &job).await.unwrap();
                    spec["holderRef"] = json!({"kind": "Job", "name": name});
                }
                api.create(&PostParams::default(), &request(&run, &name, spec))
                    .await
                    .unwrap();
                name
            }
        };
        let mut queue = std::collections::VecDeque::new();
        for _ in 0..11 {
            queue.push_back(create(next).await);
            next += 1;
        }
        let mut holder = queue.pop_front().unwrap();
        self.observer.granted_at(&ns, &holder, Duration::from_secs(30)).await;
        // the queue must be settled (everyone Pending with a position) before measuring
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut samples = Vec::new();
        for _ in 0..self.n(200, 20) {
            let successor = queue.pop_front().unwrap();
            let sent = std::time::SystemTime::now();
            let started = Instant::now();
            if via_job {
                let now = chrono::Utc::now().to_rfc3339();
                let status = json!({"status": {"startTime": now, "completionTime": now, "succeeded": 1, "conditions": [
                    {"type": "SuccessCriteriaMet", "status": "True", "lastProbeTime": now, "lastTransitionTime": now},
                    {"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}});
                jobs.patch_status(&holder, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .unwrap();
            } else {
                api.delete(&holder, &DeleteParams::default()).await.unwrap();
            }
            let at = self.observer.granted_at(&ns, &successor, Duration::from_secs(30)).await;
            samples.push(at.duration_since(started).as_secs_f64() * 1000.0);
            if !via_job
                && let Some(seen) = self
                    .observer
                    .granted_wall
                    .lock()
                    .unwrap()
                    .get(&format!("{ns}/{successor}"))
            {
                self.handoffs.lock().unwrap().push(breakdown::Handoff {
                    namespace: ns.clone(),
                    holder: holder.clone(),
                    successor: successor.clone(),
                    sent,
                    seen: *seen,
                });
            }
            holder = successor;
            queue.push_back(create(next).await);
            next += 1;
        }
        if via_job {
            latency_row(
                "handoff latency (holder Job completes → next Granted)",
                samples,
                "10 waiters",
            )
        } else {
            latency_row("handoff latency (holder deleted → next Granted)", samples, "10 waiters")
        }
    }

    /// 2b. The handoff's physical floor on this machine: what a handoff
    /// cannot avoid — two API writes each seen through a watch (the holder's
    /// delete, the successor's status) and two engine round trips (release,
    /// acquire) — done back to back by hand, with nothing else.
    async fn handoff_floor(&self, url: &str) -> Row {
        let ns = self.namespace("floor").await;
        let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), &ns);
        // unlabelled: the operator leaves it alone
        let mut object = request("none", "floor", json!({"lockId": "floor"}));
        object.metadata.labels = None;
        api.create(&PostParams::default(), &object).await.unwrap();
        let (seen_tx, mut seen) = tokio::sync::watch::channel(-1i64);
        let watched = api.clone();
        let watch = tokio::spawn(async move {
            let mut events = watcher::watcher(watched, watcher::Config::default())
                .default_backoff()
                .boxed();
            while let Some(event) = events.next().await {
                let Ok(event) = event else { continue };
                if let watcher::Event::Apply(lock) | watcher::Event::InitApply(lock) = event {
                    let n = lock.status.and_then(|s| s.waiting_position).unwrap_or(-1);
                    let _ = seen_tx.send(i64::from(n));
                }
            }
        });
        let http = reqwest::Client::new();
        let locks = LockClient::from_args(&EngineArgs {
            index_prefix: "bench-locks".into(),
            ..EngineArgs::for_url(url)
        })
        .unwrap();
        locks.ensure_ready().await.unwrap();
        let raw_url = format!("{}/{}/_update/floor-handoff", url.trim_end_matches('/'), locks.index());
        let body = json!({"scripted_upsert": true, "upsert": {},
            "script": {"lang": "painless", "source": "ctx._source.n = params.n", "params": {"n": 1}}});
        let mut n = 0i32;
        let mut samples = Vec::new();
        for i in 0..self.n(200, 20) + 5 {
            let started = Instant::now();
            for _ in 0..2 {
                n += 1;
                let patch = json!({"status": {"waitingPosition": n}});
                api.patch_status("floor", &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .unwrap();
                let target = i64::from(n);
                seen.wait_for(|seen| *seen >= target).await.unwrap();
            }
            for _ in 0..2 {
                let r = http.post(&raw_url).json(&body).send().await.unwrap();
                assert!(r.status().is_success());
                r.bytes().await.unwrap();
            }
            if i >= 5 {
                samples.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        watch.abort();
        latency_row(
            "handoff floor (2 status patches seen by a watch + 2 raw _updates)",
            samples,
            "nothing but the unavoidable steps, back to back",
        )
    }

    /// 3. client-go leader election on a Lease, default timings, ReleaseOnCancel.
    async fn lease_peer(&self) -> Option<Row> {
        let bin = std::env::var("LEASE_PEER_BIN").ok()?;
        let ns = self.namespace("peer").await;
        let handoffs = self.n(50, 5).to_string();
        let out = tokio::process::Command::new(bin)
            .args(["-namespace", &ns, "-handoffs", &handoffs])
            .stderr(Stdio::null())
            .output()
            .await
            .ok()?;
        let result: Value = serde_json::from_slice(&out.stdout).ok()?;
        let samples: Vec<f64> = result["samples_ms"]
            .as_array()?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        Some(latency_row(
            "peer: client-go leader election handoff (release → next leads)",
            samples,
            "LeaseDuration 15s, RenewDeadline 10s, RetryPeriod 2s, ReleaseOnCancel",
        ))
    }

    /// 3b. etcd's concurrency.Mutex on the API server's own etcd: an
    /// uncontended Lock+Unlock cycle and the handoff among 1 + 10 contenders.
    async fn etcd_peer(&self) -> Option<Vec<Row>> {
        let bin = std::env::var("ETCD_PEER_BIN").ok()?;
        let endpoint = std::env::var("ETCD_ENDPOINT").ok()?;
        let (cycles, handoffs) = (self.n(1000, 100).to_string(), self.n(50, 20).to_string());
        let out = tokio::process::Command::new(bin)
            .args([
                "-endpoints",
                &endpoint,
                "-cycles",
                &cycles,
                "-handoffs",
                &handoffs,
                "-waiters",
                "10",
            ])
            .stderr(Stdio::inherit())
            .output()
            .await
            .ok()?;
        let result: Value = serde_json::from_slice(&out.stdout).ok()?;
        let samples = |field: &str| -> Vec<f64> {
            result[field]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default()
        };
        Some(vec![
            latency_row(
                "etcd peer: concurrency.Mutex Lock + Unlock cycle",
                samples("cycle_ms"),
                "clientv3, one session, uncontended",
            ),
            latency_row(
                "etcd peer: concurrency.Mutex handoff (Unlock → next Lock returns)",
                samples("handoff_ms"),
                "10 waiters, each watching the key ahead of it",
            ),
        ])
    }

    /// 4. One raw scripted `_update` round trip vs the library's acquire+release.
    async fn engine_floor(&self, url: &str) -> Vec<Row> {
        let locks = LockClient::from_args(&EngineArgs {
            index_prefix: "bench-locks".into(),
            ..EngineArgs::for_url(url)
        })
        .unwrap();
        locks.ensure_ready().await.unwrap();
        let http = reqwest::Client::new();
        let raw_url = format!("{}/{}/_update/raw-floor", url.trim_end_matches('/'), locks.index());
        let body = json!({"scripted_upsert": true, "upsert": {},
            "script": {"lang": "painless", "source": "ctx._source.n = params.n", "params": {"n": 1}}});
        let n = self.n(1000, 100);
        let (mut raw, mut cycle) = (Vec::new(), Vec::new());
        for i in 0..n + 20 {
            let started = Instant::now();
            let r = http.post(&raw_url).json(&body).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
            if i >= 20 {
                raw.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        for i in 0..n + 20 {
            let started = Instant::now();
            let lock = locks
                .acquire("floor", Duration::from_secs(30), json!({}))
                .await
                .unwrap()
                .unwrap();
            assert!(locks.release("floor", &lock.token).await.unwrap());
            if i >= 20 {
                cycle.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        let raw_row = latency_row("engine floor: one raw scripted _update", raw, "reqwest, keep-alive");
        let cycle_row = latency_row(
            "library acquire + release cycle",
            cycle,
            "2 scripted _update round trips",
        );
        let ratio = cycle_row.p50_ms.unwrap() / (2.0 * raw_row.p50_ms.unwrap());
        vec![
            raw_row,
            cycle_row,
            value_row("ratio: cycle p50 / (2 × raw p50)", ratio, "x", "goal ≤ 1.3"),
        ]
    }

    /// 4b. `lockctl exec --wait` waiters: 1 holder + 10 CLI waiters on one
    /// key, each waiter running again (and so queueing at the end again)
    /// after its turn; the handoff as a user sees it (one command's end →
    /// the next command's start) and the load the waiting puts on the engine,
    /// from the lock index's own `_stats` (this scenario has its own index).
    async fn cli_waiters(&self, url: &str) -> Vec<Row> {
        const WAITERS: usize = 10;
        const HOLD: &str = "0.2";
        let prefix = "bench-cliwait";
        let locks = LockClient::from_args(&EngineArgs {
            index_prefix: prefix.into(),
            ..EngineArgs::for_url(url)
        })
        .unwrap();
        locks.ensure_ready().await.unwrap();
        let key = format!("cliwait-{}", self.run);
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let holder = locks
            .acquire(&key, Duration::from_secs(120), json!({}))
            .await
            .unwrap()
            .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let script = format!(
            "echo \"start $(date +%s%N)\" >> {log}; sleep {HOLD}; echo \"end $(date +%s%N)\" >> {log}",
            log = log.display()
        );
        let loops: Vec<_> = (0..WAITERS)
            .map(|_| {
                let (stop, key, script, url) = (stop.clone(), key.clone(), script.clone(), url.to_string());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let status = Command::new(env!("CARGO_BIN_EXE_lockctl"))
                            .args(["exec", &key, "--wait", "10m", "--", "sh", "-c", &script])
                            .env("ELASTICSEARCH_URL", &url)
                            .env("LOCK_INDEX_PREFIX", prefix)
                            .stdout(Stdio::null())
                            .status()
                            .expect("run lockctl exec");
                        assert!(status.success(), "lockctl exec failed: {status}");
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while locks.waiters(&key).await.unwrap().len() < WAITERS {
            assert!(Instant::now() < deadline, "the waiters never all joined the line");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // the load of waiting alone: the holder does nothing meanwhile
        let window = Duration::from_secs(if self.quick { 5 } else { 20 });
        let before = index_ops(url, locks.index()).await;
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let waiting = (index_ops(url, locks.index()).await - before) / started.elapsed().as_secs_f64();
        // handoffs
        let n = self.n(200, 20);
        let before = index_ops(url, locks.index()).await;
        let started = Instant::now();
        assert!(locks.release(&key, &holder.token).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(600);
        let events = loop {
            let events: Vec<(String, u128)> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let (what, at) = l.split_once(' ')?;
                    Some((what.to_string(), at.trim().parse().ok()?))
                })
                .collect();
            if events.iter().filter(|e| e.0 == "start").count() > n {
                break events;
            }
            assert!(Instant::now() < deadline, "fewer than {n} handoffs in 600 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let handing_off = (index_ops(url, locks.index()).await - before) / started.elapsed().as_secs_f64();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples: Vec<f64> = events
            .windows(2)
            .filter(|w| w[0].0 == "end" && w[1].0 == "start")
            .map(|w| w[1].1.saturating_sub(w[0].1) as f64 / 1e6)
            .take(n)
            .collect();
        let overlaps = events.windows(2).filter(|w| w[0].0 == w[1].0).count();
        assert_eq!(overlaps, 0, "two commands ran at once");
        for handle in loops {
            handle.join().unwrap();
        }
        let per = |ops: OpsRate| ops.total() / WAITERS as f64;
        vec![
            latency_row(
                "CLI waiters: handoff (command ends → next command starts)",
                samples,
                "1 holder + 10 `lockctl exec --wait`, 200 ms commands, each waiter rejoins at the end; goal p50 ≤ 100 ms",
            ),
            value_row(
                "CLI waiters: engine operations/s per waiter, waiting",
                per(waiting),
                "ops/s",
                &format!("10 waiters, no handoff; all of them together: {waiting}"),
            ),
            value_row(
                "CLI waiters: engine operations/s per waiter, handing off",
                per(handing_off),
                "ops/s",
                &format!("10 waiters; all of them together: {handing_off}"),
            ),
        ]
    }

    /// 5. Lock cycles per second through the CRD path, and the raw status-patch ceiling.
    async fn throughput(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        let duration = Duration::from_secs(if self.quick { 3 } else { 10 });
        // the ceiling: warmed up, then three runs; the median, with the spread
        self.status_patch_rate(Duration::from_secs(2)).await;
        let mut runs = Vec::new();
        for _ in 0..3 {
            runs.push(self.status_patch_rate(duration).await);
        }
        runs.sort_by(f64::total_cmp);
        let ceiling = runs[1];
        rows.push(value_row(
            "API server raw status-patch rate",
            ceiling,
            "patches/s",
            &format!(
                "10 concurrent clients; median of 3 runs of {}s after a warm-up (spread {:.0}–{:.0})",
                duration.as_secs(),
                runs[0],
                runs[2]
            ),
        ));
        for ids in [1usize, 10, 100] {
            let ns = self.namespace(&format!("tput{ids}")).await;
            let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), &ns);
            let cycles = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let deadline = Instant::now() + duration;
            let workers = (0..ids).map(|w| {
                let (api, cycles, run, observer, ns) = (
                    api.clone(),
                    cycles.clone(),
                    self.run.clone(),
                    self.observer.clone(),
                    ns.clone(),
                );
                async move {
                    let mut i = 0;
                    while Instant::now() < deadline {
                        let name = format!("t{w}-{i}");
                        i += 1;
                        api.create(
                            &PostParams::default(),
                            &request(&run, &name, json!({"lockId": format!("id{w}")})),
                        )
                        .await
                        .unwrap();
                        observer.granted_at(&ns, &name, Duration::from_secs(60)).await;
                        api.delete(&name, &DeleteParams::default()).await.unwrap();
                        cycles.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
            let started = Instant::now();
            futures::future::join_all(workers).await;
            let rate = cycles.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
            rows.push(value_row(
                &format!("throughput: lock cycles/s, {ids} lock id(s)"),
                rate,
                "cycles/s",
                &format!(
                    "create → Granted → delete; {:.1}% of the patch ceiling",
                    100.0 * rate / ceiling
                ),
            ));
        }
        rows
    }

    async fn status_patch_rate(&self, duration: Duration) -> f64 {
        let ns = self.namespace("ceiling").await;
        let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), &ns);
        for i in 0..10 {
            // unlabelled: the operator leaves these alone
            let mut lock = request("none", &format!("c{i}"), json!({"lockId": format!("c{i}")}));
            lock.metadata.labels = None;
            api.create(&PostParams::default(), &lock).await.unwrap();
        }
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let deadline = Instant::now() + duration;
        let started = Instant::now();
        let clients = (0..10).map(|i| {
            let (api, count) = (api.clone(), count.clone());
            async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    n += 1;
                    let patch = json!({"status": {"phase": "Pending", "waitingPosition": n % 1000}});
                    api.patch_status(&format!("c{i}"), &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .unwrap();
                    count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
        futures::future::join_all(clients).await;
        count.load(std::sync::atomic::Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
    }

    /// Scenario 6, 10,000 requests (1,000 lock ids × 10): grant latency as
    /// they pile up, RSS, sync after restart, grant latency after it.
    async fn scale(&self, operator: &mut Operator) -> Vec<Row> {
        let (ids, per_id) = if self.quick { (100, 10) } else { (1000, 10) };
        let total = ids * per_id; // per_id requests per lock id
        let ns = self.namespace("scale").await;
        let api: Api<DistributedLock> = Api::namespaced(self.client.clone(), &ns);
        let mut rows = Vec::new();
        let started = Instant::now();
        let writes_at_start = self.api_writes().await;
        let mut made = 0;
        let mut free = 0; // requests on free ids, Granted and kept
        for stage in [total / 10, total / 4, total / 2, total] {
            futures::stream::iter(made..stage)
                .map(|i| {
                    let (api, run) = (api.clone(), self.run.clone());
                    async move {
                        let name = format!("s{:04}-{}", i % ids, i / ids);
                        api.create(
                            &PostParams::default(),
                            &request(&run, &name, json!({"lockId": format!("k{}", i % ids)})),
                        )
                        .await
                        .unwrap();
                    }
                })
                .buffer_unordered(32)
                .collect::<Vec<_>>()
                .await;
            made = stage;
            let holders = made.min(ids) + free;
            let deadline = Instant::now() + Duration::from_secs(900);
            while operator.metric("lockmanager_holders").await < holders as f64
                || operator.metric("lockmanager_waiters").await < (made - made.min(ids)) as f64
            {
                assert!(Instant::now() < deadline, "scale scenario did not settle at {made}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if stage == total {
                break;
            }
            let samples = self.grants_on_free_ids(&api, &ns, &mut free, self.n(30, 10)).await;
            rows.push(latency_row(
                &format!("scale: grant latency at {made} objects"),
                samples,
                "free lock ids, settled",
            ));
        }
        let created = started.elapsed();
        // settled: every lock id has its holder and every waiter its position
        let deadline = Instant::now() + Duration::from_secs(900);
        while self.observer.granted_count(&ns) < ids + free {
            assert!(Instant::now() < deadline, "scale scenario did not settle");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let settled = started.elapsed();
        let creation_writes = writes_since(&writes_at_start, &self.api_writes().await);
        let created_requests = total + free; // (the settled-grant samples so far included)
        let at_total = self.grants_on_free_ids(&api, &ns, &mut free, self.n(30, 10)).await;
        rows.push(latency_row(
            &format!("scale: grant latency at {total} objects"),
            at_total,
            "free lock ids, settled",
        ));
        let rss_settled = operator.rss_mib();
        let writes_before = self.api_writes().await;
        operator.restart();
        let sync = operator.wait_ready().await;
        // grant latency while the first pass over every object runs: new
        // requests on free locks, one every 20 ms from the moment /readyz
        // answers, each timed on its own
        let first_pass = Instant::now();
        let listed = total + free;
        let samples = futures::stream::iter(0..self.n(100, 20))
            .map(|i| {
                let (api, run, observer, ns) = (api.clone(), self.run.clone(), self.observer.clone(), ns.clone());
                let name = format!("fresh{i}");
                async move {
                    tokio::time::sleep(Duration::from_millis(20) * i as u32).await;
                    let t = Instant::now();
                    api.create(&PostParams::default(), &request(&run, &name, json!({"lockId": name})))
                        .await
                        .unwrap();
                    let at = observer.granted_at(&ns, &name, Duration::from_secs(120)).await;
                    // the part until the operator's first write about it
                    let finalized = observer.finalized_at(&ns, &name).unwrap_or(at).max(t);
                    (
                        at.duration_since(t).as_secs_f64() * 1000.0,
                        finalized.duration_since(t).as_secs_f64() * 1000.0,
                    )
                }
            })
            .buffer_unordered(1000)
            .collect::<Vec<_>>()
            .await;
        let (samples, until_finalizer): (Vec<f64>, Vec<f64>) = samples.into_iter().unzip();
        // the first pass: one reconcile of each of the objects listed at start-up
        let deadline = Instant::now() + Duration::from_secs(300);
        while operator.metric("lockmanager_reconciliations_total").await < listed as f64 {
            assert!(
                Instant::now() < deadline,
                "the first pass after the restart did not end"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let first_pass = first_pass.elapsed();
        let rss_after_restart = operator.rss_mib();
        let restart_writes = writes_since(&writes_before, &self.api_writes().await);
        rows.extend(vec![
            value_row(
                &format!("scale: create {total} requests"),
                created.as_secs_f64(),
                "s",
                "32 concurrent creates",
            ),
            value_row(
                &format!("scale: {ids} granted + {} queued, from first create", total - ids),
                settled.as_secs_f64(),
                "s",
                "operator reconciling as they arrive",
            ),
            value_row(
                &format!("scale: operator RSS at {total} objects"),
                rss_settled,
                "MiB",
                "goal < 100",
            ),
            value_row(
                "scale: time to sync after a restart",
                sync.as_secs_f64() * 1000.0,
                "ms",
                "until /readyz",
            ),
            value_row(
                "scale: operator RSS right after restart+sync",
                rss_after_restart,
                "MiB",
                "",
            ),
            value_row(
                "scale: first pass after the restart",
                first_pass.as_secs_f64() * 1000.0,
                "ms",
                &format!("from /readyz until {listed} reconciles ran (the objects listed at start-up)"),
            ),
            value_row(
                &format!("scale: API writes per request from the first create until all {total} settled"),
                creation_writes.iter().map(|(_, d)| d).sum::<f64>() / created_requests as f64,
                "writes",
                &format!(
                    "apiserver_request_total over {created_requests} requests (incl. the settled-grant samples): {}",
                    list_writes(&creation_writes)
                ),
            ),
            value_row(
                "scale: API writes from the restart to the end of the first pass",
                restart_writes.iter().map(|(_, d)| d).sum(),
                "writes",
                &format!(
                    "apiserver_request_total, incl. the fresh requests' own: {}",
                    list_writes(&restart_writes)
                ),
            ),
            latency_row(
                "scale: after a restart, create → the operator's finalizer seen",
                until_finalizer,
                "the same requests: the part of their grant latency until the operator's first write was seen",
            ),
            latency_row(
                &format!("scale: grant latency right after a restart at {total} objects"),
                samples,
                "free lock ids, one created every 20 ms from /readyz on (during the first pass), goal p99 < 200 ms",
            ),
        ]);
        rows
    }

    /// Grant latencies of `n` new requests on lock ids nobody uses (kept Granted).
    async fn grants_on_free_ids(&self, api: &Api<DistributedLock>, ns: &str, free: &mut usize, n: usize) -> Vec<f64> {
        let mut samples = Vec::new();
        for _ in 0..n {
            let name = format!("free{free}");
            *free += 1;
            let t = Instant::now();
            api.create(
                &PostParams::default(),
                &request(&self.run, &name, json!({"lockId": name})),
            )
            .await
            .unwrap();
            let at = self.observer.granted_at(ns, &name, Duration::from_secs(120)).await;
            samples.push(at.duration_since(t).as_secs_f64() * 1000.0);
        }
        samples
    }
}

#[tokio::main]
async fn main() {
    let url = std::env::var("ELASTICSEARCH_URL").expect("ELASTICSEARCH_URL (run bench/run)");
    let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| v == "1");
    let wanted = std::env::var("BENCH_SCENARIOS")
        .unwrap_or_else(|_| "writes,grant,handoff,peer,etcd,engine,cliwait,throughput,scale".into());
    let wants = |s: &str| wanted.split(',').any(|w| w == s);
    std::fs::create_dir_all("bench/out").unwrap();
    let mut client_config = kube::Config::infer().await.expect("KUBECONFIG (run bench/run)");
    client_config.read_timeout = Some(Duration::from_secs(300));
    let client = kube::Client::try_from(client_config).unwrap();
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    // both CRDs (the operator refuses to start without either), served before it starts
    for (_, crd) in kube_lock_manager::crd::crds() {
        let name = crd.name_any();
        crds.patch(&name, &PatchParams::apply("bench").force(), &Patch::Apply(&crd))
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !crds
            .get(&name)
            .await
            .ok()
            .and_then(|c| c.status?.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"))
        {
            assert!(Instant::now() < deadline, "the CRD {name} was not served within 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let run = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut operator = Operator::start(&run);
    operator.wait_ready().await;
    let observer = Observer::start(Api::all(client.clone()));
    let bench = Bench {
        client,
        run,
        quick,
        observer,
        namespaces: Mutex::new(Vec::new()),
        handoffs: Mutex::new(Vec::new()),
    };

    let mut rows = Vec::new();
    let report = |row: Row, rows: &mut Vec<Row>| {
        eprintln!("bench: {}: done", row.scenario);
        rows.push(row);
    };
    // first, while no request of this run holds a lock (renewals would count)
    if wants("writes") {
        for row in bench.api_writes_per_cycle().await {
            report(row, &mut rows);
        }
    }
    if wants("grant") {
        report(bench.grant_latency().await, &mut rows);
    }
    if wants("handoff") {
        report(bench.handoff_floor(&url).await, &mut rows);
        report(bench.handoff_latency(false).await, &mut rows);
        report(bench.handoff_latency(true).await, &mut rows);
        if breakdown_wanted() {
            let log =
                std::fs::read_to_string(format!("bench/out/operator-{}.log", std::process::id())).unwrap_or_default();
            let handoffs = bench.handoffs.lock().unwrap();
            let steps = breakdown::steps(&log, &handoffs);
            eprintln!(
                "bench: breakdown of {} handoffs from the operator's spans",
                handoffs.len()
            );
            for (step, samples) in steps {
                rows.push(latency_row(
                    step,
                    samples,
                    "BENCH_BREAKDOWN=1: operator spans + bench clock",
                ));
            }
        }
    }
    if wants("peer") {
        match bench.lease_peer().await {
            Some(row) => report(row, &mut rows),
            None => eprintln!("bench: peer skipped: set LEASE_PEER_BIN (bench/run builds it)"),
        }
    }
    if wants("etcd") {
        match bench.etcd_peer().await {
            Some(rows_) => rows_.into_iter().for_each(|row| report(row, &mut rows)),
            None => eprintln!("bench: etcd peer skipped: set ETCD_PEER_BIN and ETCD_ENDPOINT (bench/run does)"),
        }
    }
    if wants("engine") {
        for row in bench.engine_floor(&url).await {
            report(row, &mut rows);
        }
    }
    if wants("cliwait") {
        for row in bench.cli_waiters(&url).await {
            report(row, &mut rows);
        }
    }
    if wants("throughput") {
        for row in bench.throughput().await {
            report(row, &mut rows);
        }
    }
    if wants("scale") {
        for row in bench.scale(&mut operator).await {
            report(row, &mut rows);
        }
    }
    // The headline comparisons.
    let mut derived = Vec::new();
    let p99 = |prefix: &str| {
        rows.iter()
            .find(|r| r.scenario.starts_with(prefix))
            .and_then(|r| r.p50_ms.zip(r.p99_ms))
    };
    if let (Some((ours_p50, _)), Some((peer_p50, _))) = (p99("handoff latency (holder deleted"), p99("peer:")) {
        derived.push(value_row(
            "handoff speed-up vs client-go Lease (p50)",
            peer_p50 / ours_p50,
            "x",
            "goal ≥ 50",
        ));
    }
    if let (Some((ours50, ours99)), Some((floor50, floor99))) =
        (p99("handoff latency (holder deleted"), p99("handoff floor"))
    {
        derived.push(value_row(
            "handoff p50 / floor p50",
            ours50 / floor50,
            "x",
            "goal ≤ 1.5",
        ));
        derived.push(value_row("handoff p99 / floor p99", ours99 / floor99, "x", "goal ≤ 3"));
    }
    // against the stronger peer: how many times slower we are, at p50
    if let (Some((ours, _)), Some((etcd, _))) = (
        p99("handoff latency (holder deleted"),
        p99("etcd peer: concurrency.Mutex handoff"),
    ) {
        derived.push(value_row(
            "CRD handoff p50 / etcd Mutex handoff p50",
            ours / etcd,
            "x",
            "the API server's write + watch path and two search-engine round trips vs one etcd watch event",
        ));
    }
    if let (Some((ours, _)), Some((etcd, _))) = (
        p99("library acquire + release cycle"),
        p99("etcd peer: concurrency.Mutex Lock"),
    ) {
        derived.push(value_row(
            "library cycle p50 / etcd Mutex cycle p50",
            ours / etcd,
            "x",
            "two scripted _update round trips (HTTP/JSON, painless) vs etcd txns over gRPC",
        ));
    }
    rows.extend(derived);
    bench.clean_up().await;
    drop(operator);
    print_table(&rows);
    write_plots(&rows);
    let machine = format!(
        "{} cores, {} ",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| m
                .lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string()))
            .map(|kb| format!("{:.0} GiB RAM", kb.parse::<f64>().unwrap_or(0.0) / 1048576.0))
            .unwrap_or_default()
    );
    let json = json!({"machine": machine, "quick": quick, "rows": rows});
    std::fs::write("bench/out/results.json", serde_json::to_string_pretty(&json).unwrap()).unwrap();
    eprintln!("bench: wrote bench/out/results.json");
}

/// bench/out/handoff-cdf.svg (us, the floor and both peers) and
/// bench/out/scale.svg (grant latency vs number of objects).
fn write_plots(rows: &[Row]) {
    let series = |prefixes: &[(&str, &str)]| -> Vec<(String, Vec<f64>)> {
        prefixes
            .iter()
            .filter_map(|(prefix, name)| {
                let row = rows.iter().find(|r| r.scenario.starts_with(prefix))?;
                Some((name.to_string(), row.samples_ms.clone()))
            })
            .collect()
    };
    let handoff = series(&[
        (
            "handoff latency (holder deleted",
            "kube-lock-manager: holder deleted → next Granted",
        ),
        (
            "handoff latency (holder Job",
            "kube-lock-manager: holder Job completes → next Granted",
        ),
        ("handoff floor", "floor: 2 watched status patches + 2 raw _updates"),
        ("etcd peer: concurrency.Mutex handoff", "etcd concurrency.Mutex"),
        ("peer: client-go", "client-go Lease leader election"),
    ]);
    let mut scale: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            let n = r.scenario.strip_prefix("scale: grant latency at ")?.split(' ').next()?;
            Some((n.parse().ok()?, r.p50_ms?, r.p99_ms?))
        })
        .collect();
    scale.sort_by(|a, b| a.0.total_cmp(&b.0));
    let outcome = [
        plots::cdf(
            "bench/out/handoff-cdf.svg",
            "Handoff latency: CDF (release → next holder)",
            &handoff,
        ),
        plots::lines(
            "bench/out/scale.svg",
            "Grant latency of a free lock vs DistributedLocks in the cluster",
            ("DistributedLock objects", "grant latency (ms)"),
            &[
                ("p50".to_string(), scale.iter().map(|(n, p50, _)| (*n, *p50)).collect()),
                ("p99".to_string(), scale.iter().map(|(n, _, p99)| (*n, *p99)).collect()),
            ],
        ),
    ];
    for result in outcome {
        if let Err(e) = result {
            eprintln!("bench: a plot could not be written: {e}");
        }
    }
    eprintln!("bench: wrote bench/out/handoff-cdf.svg and bench/out/scale.svg");
}

/// Operations on one index, from its `_stats` (primaries): realtime gets
/// (also the one inside every update), writes (index + delete) and
/// scripted updates that changed nothing.
#[derive(Clone, Copy, Debug, Default)]
struct OpsRate {
    gets: f64,
    writes: f64,
    noops: f64,
}

impl OpsRate {
    fn total(&self) -> f64 {
        self.gets + self.writes + self.noops
    }
}

impl std::ops::Sub for OpsRate {
    type Output = OpsRate;
    fn sub(self, other: OpsRate) -> OpsRate {
        OpsRate {
            gets: self.gets - other.gets,
            writes: self.writes - other.writes,
            noops: self.noops - other.noops,
        }
    }
}

impl std::ops::Div<f64> for OpsRate {
    type Output = OpsRate;
    fn div(self, secs: f64) -> OpsRate {
        OpsRate {
            gets: self.gets / secs,
            writes: self.writes / secs,
            noops: self.noops / secs,
        }
    }
}

impl std::fmt::Display for OpsRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} gets/s, {:.1} writes/s, {:.1} no-op updates/s",
            self.gets, self.writes, self.noops
        )
    }
}

async fn index_ops(url: &str, index: &str) -> OpsRate {
    let stats_url = format!("{}/{index}/_stats/indexing,get", url.trim_end_matches('/'));
    let stats: Value = reqwest::get(&stats_url).await.unwrap().json().await.unwrap();
    let primaries = &stats["_all"]["primaries"];
    let count = |section: &str, field: &str| primaries[section][field].as_f64().unwrap_or(0.0);
    OpsRate {
        gets: count("get", "total"),
        writes: count("indexing", "index_total") + count("indexing", "delete_total"),
        noops: count("indexing", "noop_update_total"),
    }
}

fn print_table(rows: &[Row]) {
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "".into());
    println!("| scenario | n | p50 | p90 | p99 | value | note |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for r in rows {
        let value = r.value.map(|v| format!("{v:.2} {}", r.unit)).unwrap_or_default();
        let unit = if r.p50_ms.is_some() { " ms" } else { "" };
        println!(
            "| {} | {} | {}{unit} | {}{unit} | {}{unit} | {} | {} |",
            r.scenario,
            r.count,
            fmt(r.p50_ms),
            fmt(r.p90_ms),
            fmt(r.p99_ms),
            value,
            r.note
        );
    }
}
