//! Shared helpers of the integration tests: they run against the real services
//! of `testenv/testenv up` (kube-apiserver + etcd, OpenSearch).
#![allow(dead_code)] // each test binary uses a different part of this module

use std::time::{Duration, Instant};

use kube_lock_manager::engine::EngineArgs;
use kube_lock_manager::lock::LockClient;

const HOW_TO_RUN: &str =
    "start them with `testenv/testenv up` and `eval \"$(testenv/testenv env)\"`, or run ./scripts/test";

/// The search engine's URL, or `None` (with a one-line message) when the test
/// environment is not up. Under CI a missing service fails the test.
pub fn es_url() -> Option<String> {
    match std::env::var("ELASTICSEARCH_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => missing("ELASTICSEARCH_URL (a search node)"),
    }
}

/// True when a kubeconfig for the test API server is set.
pub fn kube_available() -> bool {
    match std::env::var("KUBECONFIG") {
        Ok(path) if !path.is_empty() => true,
        _ => missing::<()>("KUBECONFIG (a kube-apiserver)").is_some(),
    }
}

/// The kubeconfig of the second cluster (`KLM_CLUSTERS=2 testenv/testenv up`
/// exports it as KUBECONFIG_B), or `None` (skip) outside CI.
pub fn kubeconfig_b() -> Option<std::path::PathBuf> {
    match std::env::var("KUBECONFIG_B") {
        Ok(path) if !path.is_empty() => Some(path.into()),
        _ => missing("KUBECONFIG_B (a second cluster: KLM_CLUSTERS=2 testenv/testenv up)"),
    }
}

/// A client of the cluster this kubeconfig file points at.
pub async fn client_for(kubeconfig: &std::path::Path) -> kube::Client {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|e| panic!("read the kubeconfig {}: {e}", kubeconfig.display()));
    let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
        .await
        .unwrap_or_else(|e| panic!("load the kubeconfig {}: {e}", kubeconfig.display()));
    kube::Client::try_from(config).expect("a client")
}

fn missing<T>(what: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() || std::env::var_os("KLM_REQUIRE_SERVICES").is_some() {
        panic!("integration test needs {what}, which is not set; {HOW_TO_RUN}");
    }
    eprintln!("skipping integration test: {what} is not set; {HOW_TO_RUN}");
    None
}

/// A lock client on its own index prefix (so tests of index assets can't
/// disturb each other) or on the shared default prefix.
pub fn lock_client(url: &str, prefix: &str) -> LockClient {
    let args = EngineArgs {
        index_prefix: prefix.to_string(),
        ..EngineArgs::for_url(url)
    };
    LockClient::from_args(&args).expect("valid engine settings")
}

/// The stored lock document as the engine has it (expired or not).
pub async fn raw_document(client: &LockClient, lock_id: &str) -> Option<serde_json::Value> {
    let response = client
        .elasticsearch()
        .get(elasticsearch::GetParts::IndexId(client.index(), lock_id))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    (body["found"] == true).then(|| body["_source"].clone())
}

/// A unique name for this test's lock ids, namespaces and prefixes.
pub fn unique(name: &str) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{name}-{}", &suffix[..8])
}

/// Polls `check` until it returns `Some`, failing after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Both services, or `None` (skip) outside CI.
pub fn services() -> Option<String> {
    let url = es_url()?;
    kube_available().then_some(url)
}

/// The `lockctl` binary built for these tests.
pub fn lockctl() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_lockctl"))
}

/// A free loopback port (for an operator's HTTP server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `lockctl operator` process that only manages requests labelled
/// `test-run=<run>`, so tests running in parallel do not share an operator.
/// Killed when dropped.
pub struct Operator {
    pub child: std::process::Child,
    pub run: String,
    pub http_port: u16,
    extra: Vec<String>,
    /// The cluster it manages (default: $KUBECONFIG).
    kubeconfig: Option<std::path::PathBuf>,
}

pub const RUN_LABEL: &str = "test-run";

impl Operator {
    pub fn start(run: &str, extra: &[&str]) -> Self {
        Self::start_in(None, run, extra)
    }

    /// An operator of the cluster `kubeconfig` points at (`None`: $KUBECONFIG).
    pub fn start_in(kubeconfig: Option<&std::path::Path>, run: &str, extra: &[&str]) -> Self {
        let http_port = free_port();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let kubeconfig = kubeconfig.map(std::path::Path::to_path_buf);
        let child = Self::spawn(kubeconfig.as_deref(), run, http_port, &extra);
        Self {
            child,
            run: run.to_string(),
            http_port,
            extra,
            kubeconfig,
        }
    }

    fn spawn(kubeconfig: Option<&std::path::Path>, run: &str, http_port: u16, extra: &[String]) -> std::process::Child {
        // operator-<run>.log, or operator-<run>-<kubeconfig file name>.log in another cluster
        let name = match kubeconfig.and_then(|p| p.file_name()) {
            Some(file) => format!("operator-{run}-{}.log", file.to_string_lossy()),
            None => format!("operator-{run}.log"),
        };
        let log = std::fs::File::create(std::env::temp_dir().join(name)).unwrap();
        let mut command = lockctl();
        if let Some(path) = kubeconfig {
            command.env("KUBECONFIG", path);
        }
        command
            .args(["operator", "--selector", &format!("{RUN_LABEL}={run}")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(extra)
            .env("RUST_LOG", "info,kube_lock_manager=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lockctl operator")
    }

    /// SIGKILL, then start again with the same settings.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(self.kubeconfig.as_deref(), &self.run, self.http_port, &self.extra);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The operator's /metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.http_port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A new namespace for one test.
pub async fn namespace(client: &kube::Client, name: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    let ns_name = unique(name);
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(ns_name.clone());
    api.create(&kube::api::PostParams::default(), &ns)
        .await
        .expect("create namespace");
    ns_name
}

/// Installs the CRD from `crds/` (idempotent) and waits until it is served.
pub async fn install_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::ResourceExt;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    for (_, crd) in kube_lock_manager::crd::crds() {
        let name = crd.name_any();
        api.patch(
            &name,
            &kube::api::PatchParams::apply("kube-lock-manager-tests").force(),
            &kube::api::Patch::Apply(&crd),
        )
        .await
        .expect("apply CRD");
        // Established (not a typed list: one request in the cluster that a typed
        // client cannot decode must not make every test wait)
        eventually(
            &format!("the CRD {name} to be served"),
            Duration::from_secs(30),
            || async {
                let crd = api.get(&name).await.ok()?;
                crd.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            },
        )
        .await;
    }
}

/// A DistributedLock request labelled for operator run `run`.
pub fn lock_request(run: &str, name: &str, spec: serde_json::Value) -> kube_lock_manager::crd::DistributedLock {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "lockmanager.dev/v1alpha1",
        "kind": "DistributedLock",
        "metadata": {"name": name, "labels": {RUN_LABEL: run}},
        "spec": spec,
    }))
    .expect("valid DistributedLock")
}

/// Waits (watching, not polling) until the request satisfies `condition`.
pub async fn await_lock<F>(
    api: &kube::Api<kube_lock_manager::crd::DistributedLock>,
    name: &str,
    what: &str,
    timeout: Duration,
    condition: F,
) -> kube_lock_manager::crd::DistributedLock
where
    F: Fn(&kube_lock_manager::crd::DistributedLock) -> bool,
{
    let wait = kube::runtime::wait::await_condition(
        api.clone(),
        name,
        move |obj: Option<&kube_lock_manager::crd::DistributedLock>| obj.is_some_and(&condition),
    );
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(Some(lock))) => lock,
        Ok(other) => panic!("watching {name} for {what} failed: {other:?}"),
        Err(_) => {
            let current = api.get_opt(name).await.ok().flatten();
            panic!(
                "timed out after {timeout:?} waiting for {name} to be {what}; status: {:?}",
                current.and_then(|l| l.status)
            )
        }
    }
}

pub fn phase_of(lock: &kube_lock_manager::crd::DistributedLock) -> Option<kube_lock_manager::crd::Phase> {
    lock.status.as_ref().and_then(|s| s.phase)
}

/// How long tests wait for the operator to act.
pub const WAIT: Duration = Duration::from_secs(20);

/// A test's own namespace and operator (selecting only this run's requests).
pub struct Setup {
    pub client: kube::Client,
    pub ns: String,
    pub run: String,
    pub api: kube::Api<kube_lock_manager::crd::DistributedLock>,
    pub operator: Operator,
}

impl Setup {
    /// `None` (skip) when the services are not up outside CI.
    pub async fn new(name: &str, operator_args: &[&str]) -> Option<Setup> {
        services()?;
        let client = kube::Client::try_default().await.expect("kubeconfig");
        install_crd(&client).await;
        let ns = namespace(&client, name).await;
        let run = unique(name);
        let operator = Operator::start(&run, operator_args);
        let api = kube::Api::namespaced(client.clone(), &ns);
        Some(Setup {
            client,
            ns,
            run,
            api,
            operator,
        })
    }

    pub async fn create(&self, name: &str, spec: serde_json::Value) -> kube_lock_manager::crd::DistributedLock {
        self.api
            .create(&Default::default(), &lock_request(&self.run, name, spec))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"))
    }

    pub async fn pending_at(&self, name: &str, position: i32) -> kube_lock_manager::crd::DistributedLock {
        await_lock(&self.api, name, &format!("Pending at position {position}"), WAIT, |l| {
            phase_of(l) == Some(kube_lock_manager::crd::Phase::Pending)
                && l.status.as_ref().and_then(|s| s.waiting_position) == Some(position)
        })
        .await
    }

    pub async fn delete(&self, name: &str) {
        self.api.delete(name, &Default::default()).await.unwrap();
    }

    pub async fn granted(&self, name: &str) -> kube_lock_manager::crd::DistributedLock {
        await_lock(&self.api, name, "Granted", WAIT, |l| {
            phase_of(l) == Some(kube_lock_manager::crd::Phase::Granted)
        })
        .await
    }

    /// The first event with this reason about the object named `name`.
    pub async fn event(&self, name: &str, reason: &str) -> k8s_openapi::api::events::v1::Event {
        self.event_where(name, reason, |_| true).await
    }

    /// The first event with this reason about the object named `name` that
    /// satisfies `check`.
    pub async fn event_where(
        &self,
        name: &str,
        reason: &str,
        check: impl Fn(&k8s_openapi::api::events::v1::Event) -> bool,
    ) -> k8s_openapi::api::events::v1::Event {
        let events: kube::Api<k8s_openapi::api::events::v1::Event> =
            kube::Api::namespaced(self.client.clone(), &self.ns);
        eventually(&format!("a {reason} event on {name}"), WAIT, || async {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                        && check(e)
                })
        })
        .await
    }
}

/// Marks a Job complete through its status subresource, as the Job controller would.
pub async fn complete_job(jobs: &kube::Api<k8s_openapi::api::batch::v1::Job>, name: &str) {
    let now = chrono::Utc::now().to_rfc3339();
    let status = serde_json::json!({"status": {
        "startTime": now, "completionTime": now, "succeeded": 1,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True", "lastProbeTime": now, "lastTransitionTime": now},
            {"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}
        ]
    }});
    jobs.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .unwrap_or_else(|e| panic!("mark {name} complete: {e}"));
}

/// The condition of a request's status with this type.
pub fn condition(
    lock: &kube_lock_manager::crd::DistributedLock,
    type_: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    lock.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .cloned()
}

/// A loopback TCP proxy to the search node that can be switched off (every
/// connection refused and the open ones cut) and on again: an index outage
/// for one client, without touching the shared node.
pub struct SwitchProxy {
    pub url: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl SwitchProxy {
    pub async fn start(target_url: &str) -> SwitchProxy {
        use std::sync::atomic::Ordering;
        let target = url::Url::parse(target_url).expect("a URL");
        let target = format!(
            "{}:{}",
            target.host_str().expect("a host"),
            target.port_or_known_default().expect("a port")
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let accepting = up.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let target = target.clone();
                let mut cuts = cuts.clone();
                cuts.mark_unchanged(); // only cuts from now on end this connection
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        SwitchProxy { url, up, cut }
    }

    /// Switches the proxy on or off (off also cuts the open connections).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

/// A loopback HTTP proxy to the search node that answers 503 to the first
/// `failures` requests `fails(method, path)` picks, and passes everything
/// else through.
pub struct FlakyProxy {
    pub url: String,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

type Pick = std::sync::Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

impl FlakyProxy {
    pub async fn start(
        upstream: &str,
        failures: usize,
        fails: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) -> Self {
        use std::sync::atomic::Ordering;

        use axum::body::Bytes;
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let upstream = upstream.trim_end_matches('/').to_string();
        let http = reqwest::Client::new();
        let counter = failed.clone();
        let fails: Pick = std::sync::Arc::new(fails);
        let app = axum::Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let counter = counter.clone();
            let http = http.clone();
            let upstream = upstream.clone();
            let fails = fails.clone();
            async move {
                if fails(method.as_str(), uri.path()) {
                    if counter.fetch_add(1, Ordering::SeqCst) < failures {
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            HeaderMap::new(),
                            Bytes::from_static(b"unavailable"),
                        );
                    }
                    counter.fetch_sub(1, Ordering::SeqCst);
                }
                let target = format!("{upstream}{}", uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
                let mut request = http.request(method, target).body(body);
                if let Some(ct) = headers.get("content-type") {
                    request = request.header("content-type", ct);
                }
                let response = request.send().await.unwrap();
                let status = response.status();
                let mut out = HeaderMap::new();
                if let Some(ct) = response.headers().get("content-type") {
                    out.insert("content-type", ct.clone());
                }
                (status, out, response.bytes().await.unwrap())
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, failed }
    }

    /// How many requests were failed.
    pub fn failed(&self) -> usize {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Picks the lock writes (`POST /<alias>/_update/<id>`) of index prefix `prefix`.
pub fn lock_updates(prefix: &str) -> impl Fn(&str, &str) -> bool + Send + Sync + 'static {
    let path = format!("/{prefix}/_update/");
    move |method, uri_path| method == "POST" && uri_path.starts_with(&path)
}

/// Deletes a concrete index by hand (as an admin or an accident would).
pub async fn delete_index(client: &LockClient, index: &str) {
    let response = client
        .elasticsearch()
        .indices()
        .delete(elasticsearch::indices::IndicesDeleteParts::Index(&[index]))
        .send()
        .await
        .unwrap();
    assert!(
        response.status_code().is_success(),
        "delete {index}: {}",
        response.status_code()
    );
}

/// The flags of an operator replica that takes part in leader election on
/// the Lease `lease` in `ns` with a short (3 s) lease.
pub fn leader_election_args(ns: &str, lease: &str) -> Vec<String> {
    [
        "--leader-elect",
        "--leader-election-namespace",
        ns,
        "--leader-election-name",
        lease,
        "--lease-duration",
        "3s",
    ]
    .map(String::from)
    .to_vec()
}
pub mod chaos;
pub mod cli;
pub mod search;
