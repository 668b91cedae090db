//! Kubernetes Events on requests and gated Jobs (best effort: a failed event
//! never fails a reconcile).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Publishes one event about `object`.
pub async fn publish(recorder: &Recorder, object: &ObjectReference, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, object).await {
        tracing::debug!(error = %e, reason, "could not publish event");
    }
}

/// A Normal event.
pub async fn normal(recorder: &Recorder, object: &ObjectReference, reason: &str, note: String) {
    publish(recorder, object, EventType::Normal, reason, note).await;
}

/// A Warning event.
pub async fn warning(recorder: &Recorder, object: &ObjectReference, reason: &str, note: String) {
    publish(recorder, object, EventType::Warning, reason, note).await;
}
