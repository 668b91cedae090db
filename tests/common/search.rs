//! The 3-node search cluster of `KLM_SEARCH_NODES=3 testenv/testenv up`: its
//! nodes, where the lock index's primary and the cluster manager are, and
//! testenv calls that do not block the test's runtime.

use std::time::Duration;

use serde_json::Value;

use super::chaos::testenv;

/// Every node's URL, from `testenv/testenv env` of a search cluster.
pub fn node_urls() -> Vec<String> {
    let urls = std::env::var("KLM_SEARCH_NODE_URLS").unwrap_or_default();
    let urls: Vec<String> = urls.split(',').filter(|u| !u.is_empty()).map(String::from).collect();
    assert!(
        urls.len() >= 3,
        "this test needs a search cluster of 3 nodes: KLM_SEARCH_NODES=3 testenv/testenv up, then eval \"$(testenv/testenv env)\" (KLM_SEARCH_NODE_URLS is {urls:?})"
    );
    urls
}

/// A `_cat`/cluster API answer from the first node that gives one.
pub async fn cluster_api(urls: &[String], path: &str) -> Option<Value> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    for url in urls {
        if let Ok(response) = http.get(format!("{url}{path}")).send().await
            && response.status().is_success()
            && let Ok(body) = response.json::<Value>().await
        {
            return Some(body);
        }
    }
    None
}

/// The concrete lock index, its primary's node and its primary term.
pub async fn primary(urls: &[String]) -> Option<(String, u64)> {
    let shards = cluster_api(urls, "/_cat/shards/kube-locks?format=json&h=index,prirep,state,node").await?;
    let shard = shards
        .as_array()?
        .iter()
        .find(|s| s["prirep"] == "p" && s["state"] == "STARTED")?;
    let index = shard["index"].as_str()?;
    let state = cluster_api(urls, &format!("/_cluster/state/metadata/{index}")).await?;
    let term = state["metadata"]["indices"][index]["primary_terms"]["0"].as_u64()?;
    Some((shard["node"].as_str()?.to_string(), term))
}

pub async fn cluster_manager(urls: &[String]) -> Option<String> {
    let managers = cluster_api(urls, "/_cat/cluster_manager?format=json").await?;
    managers.get(0)?["node"].as_str().map(String::from)
}

/// Restarts what is missing and waits until all nodes are back (in a blocking
/// thread: the clients keep running meanwhile).
pub async fn testenv_async(args: &[&str]) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || testenv(&args.iter().map(String::as_str).collect::<Vec<_>>()))
        .await
        .unwrap();
}
