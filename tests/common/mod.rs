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

fn missing<T>(what: &str) -> Option<T> {
    if std::env::var_os("CI").is_some() {
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
