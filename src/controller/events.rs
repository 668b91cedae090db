//! Kubernetes Events on requests and gated Jobs (best effort: a failed event
//! never fails a reconcile).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

/// Publishes one event about `object`.
pub async fn publish(recorder: &Recorder, object: &ObjectReference, type_: EventType, reason: &str, note: String) {
    publish_action(recorder, object, type_, reason, reason, note).await;
}

/// Publishes one event about `object` for `action`. The recorder folds
/// events with the same reason and action into one series (keeping the first
/// note), so an event whose note matters each time needs its own action.
async fn publish_action(
    recorder: &Recorder,
    object: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
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

/// A Normal `Waiting` event telling a gated Job its new place in line.
pub async fn placed(recorder: &Recorder, job: &ObjectReference, position: usize, note: String) {
    let action = format!("WaitingAt{position}");
    publish_action(recorder, job, EventType::Normal, "Waiting", &action, note).await;
}
