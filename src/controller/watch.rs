//! The DistributedLock watch, decoded object by object, so that one request
//! the controller cannot read never stops it serving the others.

use std::collections::HashSet;
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

use super::events::Recorder;
use super::raw::RawRequest;
use crate::crd::DistributedLock;
use crate::metrics::Metrics;

/// The DistributedLock watch, decoded object by object: a request the
/// controller cannot decode (e.g. stored before the schema had bounds) is
/// reported and skipped, and never stops the watch serving the others.
pub fn requests(
    client: kube::Client,
    config: watcher::Config,
    bad: mpsc::UnboundedSender<(ObjectReference, String)>,
) -> impl futures::Stream<Item = watcher::Result<watcher::Event<DistributedLock>>> {
    let api: Api<RawRequest> = Api::all(client);
    watcher::watcher(api, config)
        .default_backoff()
        .try_filter_map(move |event| {
            let decode = |raw: RawRequest| {
                raw.decode().map_err(|(placeholder, why)| {
                    let _ = bad.send((reference(&placeholder), why));
                    placeholder
                })
            };
            let event = match event {
                watcher::Event::Apply(raw) => Some(match decode(raw) {
                    Ok(lock) => watcher::Event::Apply(lock),
                    // an object that no longer decodes leaves the cache
                    Err(placeholder) => watcher::Event::Delete(*placeholder),
                }),
                watcher::Event::InitApply(raw) => decode(raw).ok().map(watcher::Event::InitApply),
                watcher::Event::Delete(raw) => Some(watcher::Event::Delete(
                    raw.decode().unwrap_or_else(|(placeholder, _)| *placeholder),
                )),
                watcher::Event::Init => Some(watcher::Event::Init),
                watcher::Event::InitDone => Some(watcher::Event::InitDone),
            };
            futures::future::ready(Ok(event))
        })
}

/// The reference an event about `lock` points at (with its resourceVersion,
/// so each version of a bad object is reported once).
fn reference(lock: &DistributedLock) -> ObjectReference {
    let mut reference = lock.object_ref(&());
    reference.resource_version = lock.metadata.resource_version.clone();
    reference
}

/// Publishes a Warning event (once per object version) for each request the
/// controller could not decode.
pub async fn report_undecodable(
    mut bad: mpsc::UnboundedReceiver<(ObjectReference, String)>,
    recorder: Recorder,
    metrics: Arc<Metrics>,
) {
    let mut reported = HashSet::new();
    while let Some((reference, error)) = bad.recv().await {
        if !reported.insert((reference.uid.clone(), reference.resource_version.clone())) {
            continue;
        }
        metrics.undecodable_objects.inc();
        let name = format!(
            "{}/{}",
            reference.namespace.as_deref().unwrap_or_default(),
            reference.name.as_deref().unwrap_or_default()
        );
        tracing::warn!(object = %name, %error, "skipping a DistributedLock the controller cannot decode");
        let note = format!("the controller cannot read this request and skips it: {error}");
        super::events::warning(&recorder, &reference, "InvalidObject", note).await;
    }
}
