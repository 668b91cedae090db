//! The DistributedLock watch, decoded object by object, so that one request
//! the controller cannot read never stops it serving the others.

use std::collections::HashSet;
use std::sync::Arc;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::events::Recorder;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;

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
    let resource = ApiResource::erase::<DistributedLock>(&());
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    watcher::watcher(api, config)
        .default_backoff()
        .try_filter_map(move |event| {
            let decode = |object: DynamicObject| decode_request(object, &resource, &bad);
            let event = match event {
                watcher::Event::Apply(o) => Some(match decode(o) {
                    Decoded::Request(lock) => watcher::Event::Apply(lock),
                    // an object that no longer decodes leaves the cache
                    Decoded::Undecodable(placeholder) => watcher::Event::Delete(placeholder),
                }),
                watcher::Event::InitApply(o) => match decode(o) {
                    Decoded::Request(lock) => Some(watcher::Event::InitApply(lock)),
                    Decoded::Undecodable(_) => None,
                },
                watcher::Event::Delete(o) => Some(watcher::Event::Delete(decode(o).into_inner())),
                watcher::Event::Init => Some(watcher::Event::Init),
                watcher::Event::InitDone => Some(watcher::Event::InitDone),
            };
            futures::future::ready(Ok(event))
        })
}

/// A watched object, decoded or not.
enum Decoded {
    Request(DistributedLock),
    /// A placeholder carrying only the object's metadata (enough to drop it from the cache).
    Undecodable(DistributedLock),
}

impl Decoded {
    fn into_inner(self) -> DistributedLock {
        match self {
            Decoded::Request(lock) | Decoded::Undecodable(lock) => lock,
        }
    }
}

/// Decodes one request; one that does not decode is reported (once per
/// resourceVersion) and comes back as a placeholder.
fn decode_request(
    mut object: DynamicObject,
    resource: &ApiResource,
    bad: &mpsc::UnboundedSender<(ObjectReference, String)>,
) -> Decoded {
    object.metadata.managed_fields = None;
    let metadata = object.metadata.clone();
    match object.try_parse::<DistributedLock>() {
        Ok(lock) => Decoded::Request(lock),
        Err(e) => {
            let reference = ObjectReference {
                api_version: Some(resource.api_version.clone()),
                kind: Some(resource.kind.clone()),
                name: metadata.name.clone(),
                namespace: metadata.namespace.clone(),
                uid: metadata.uid.clone(),
                resource_version: metadata.resource_version.clone(),
                ..Default::default()
            };
            let _ = bad.send((reference, e.to_string()));
            let mut placeholder = DistributedLock::new(
                metadata.name.as_deref().unwrap_or_default(),
                crate::crd::DistributedLockSpec::default(),
            );
            placeholder.metadata = metadata;
            Decoded::Undecodable(placeholder)
        }
    }
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
