//! The DistributedLock watch, decoded object by object, so that one request
//! the controller cannot read never stops it serving the others.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef};
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

/// A watch's objects for several consumers (the controllers, the Job gate),
/// with `writer`'s store kept up to date first. Every consumer gets every
/// applied object and, when a (re)list is done, every object in the store,
/// in order, with backpressure: the watch waits while a consumer is `buffer`
/// objects behind.
///
/// Not kube-runtime's shared reflector (`reflect_shared` and its
/// subscribers): its channel carries references that each consumer looks up
/// in the store when it takes them, and a reference to an object deleted in
/// between (created and deleted within moments) leaves that consumer pending
/// without a wakeup — it never takes another object. Under churn with quick
/// deletions all three consumers of the DistributedLock watch stopped for
/// good and the operator took on no new request. Here the channel carries the
/// objects themselves (the store's own copies: nothing is cloned).
pub fn fan_out<K, S, const N: usize>(
    events: S,
    writer: reflector::store::Writer<K>,
    buffer: usize,
) -> (
    impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    [async_broadcast::Receiver<Arc<K>>; N],
)
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    S: Stream<Item = watcher::Result<watcher::Event<K>>>,
{
    let (mut sender, receiver) = async_broadcast::broadcast(buffer);
    // a consumer not polled yet gets what was sent before
    sender.set_await_active(false);
    let consumers = std::array::from_fn(|_| receiver.clone());
    let store = writer.as_reader();
    let events = events.reflect(writer).then(move |event| {
        let (sender, store) = (sender.clone(), store.clone());
        async move {
            let objects = match &event {
                Ok(watcher::Event::Apply(object)) => vec![
                    store
                        .get(&ObjectRef::from_obj(object))
                        .unwrap_or_else(|| Arc::new(object.clone())),
                ],
                Ok(watcher::Event::InitDone) => store.state(),
                _ => Vec::new(),
            };
            for object in objects {
                // (an error: every consumer is gone, the process is ending)
                let _ = sender.broadcast_direct(object).await;
            }
            event
        }
    });
    (events, consumers)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::request;
    use kube::ResourceExt;
    use std::time::Duration;

    fn names(objects: &[Arc<DistributedLock>]) -> Vec<String> {
        objects.iter().map(|o| o.name_any()).collect()
    }

    #[tokio::test]
    async fn every_consumer_gets_every_object_even_one_deleted_before_it_looked() {
        let (a, b) = (request("a", "ns", "k", 0, 0, 1), request("b", "ns", "k", 0, 0, 2));
        let events = futures::stream::iter([
            Ok(watcher::Event::Apply(a.clone())),
            // gone from the store before any consumer takes it
            Ok(watcher::Event::Delete(a)),
            Ok(watcher::Event::Apply(b)),
        ]);
        let (store, writer) = reflector::store::<DistributedLock>();
        let (events, [first, second]) = fan_out(events, writer, 16);
        assert_eq!(events.count().await, 3, "the watch's events pass through");
        assert_eq!(names(&store.state()), ["b"]);
        for consumer in [first, second] {
            // taken as kube's controllers take their triggers: through a
            // SelectAll, which polls a stream again only once it woke it
            let consumer = futures::stream::select_all([consumer]);
            let got: Vec<_> = tokio::time::timeout(Duration::from_secs(2), consumer.take(2).collect())
                .await
                .expect("a consumer stalled behind a deleted object");
            assert_eq!(names(&got), ["a", "b"]);
        }
    }

    #[tokio::test]
    async fn a_finished_list_hands_every_object_to_every_consumer() {
        let listed = ["a", "b", "c"].map(|n| request(n, "ns", "k", 0, 0, 1));
        let events = futures::stream::iter(
            [watcher::Event::Init]
                .into_iter()
                .chain(listed.into_iter().map(watcher::Event::InitApply))
                .chain([watcher::Event::InitDone])
                .map(Ok),
        );
        let (_store, writer) = reflector::store::<DistributedLock>();
        let (events, [consumer]) = fan_out(events, writer, 16);
        events.for_each(|_| futures::future::ready(())).await;
        let mut got = names(&consumer.take(3).collect::<Vec<_>>().await);
        got.sort();
        assert_eq!(got, ["a", "b", "c"]);
    }
}
