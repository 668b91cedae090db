//! Kubernetes Events (events.k8s.io/v1) on requests and gated Jobs (best
//! effort: a failed event never fails a reconcile).
//!
//! Our own small recorder rather than kube's `events::Recorder`: that one
//! keeps every event it published for six minutes in an unbounded map (whole
//! `Event` objects, with their `ObjectReference` and `ObjectMeta`) and scans
//! all of it under a write lock on every publish. At our event rate (two per
//! lock cycle, ~90 cycles/s in the throughput benchmark) that is tens of
//! thousands of cached events — most of the operator's heap — and a serialized
//! O(n) step on the grant path. This one folds repeats the same way (an event
//! with the same type, reason, action and object within six minutes of the last
//! one becomes a `series` on the first, which keeps its note) but remembers at
//! most [`Recent::KEPT`] series, each as a few strings, and does O(1) work per
//! event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// Normal or Warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// Publishes events as one reporting controller (cheap to clone).
#[derive(Clone)]
pub struct Recorder {
    client: kube::Client,
    controller: String,
    instance: String,
    recent: Arc<Mutex<Recent>>,
}

impl Recorder {
    /// `instance`: this replica (the pod's name), the controller's name if unknown.
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.into(),
            instance: bounded(instance.unwrap_or_else(|| controller.into()), MAX_INSTANCE),
            recent: Arc::new(Mutex::new(Recent::new(Recent::KEPT, SERIES_WINDOW))),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn publish(
        &self,
        object: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let key = SeriesKey::new(object, type_, reason, action);
        let events: Api<Event> = Api::namespaced(self.client.clone(), object.namespace.as_deref().unwrap_or("default"));
        let note = bounded(note, MAX_NOTE);
        // a second time only when a series' first event is gone (deleted, expired)
        let mut once_more = true;
        loop {
            let now = Timestamp::now();
            let write = self.recent().next(key.clone(), Instant::now(), || {
                event_name(object.name.as_deref().unwrap_or(&self.controller), now.as_nanosecond())
            });
            let repeat = matches!(write, Write::Repeat { .. });
            let result = match write {
                Write::Create(name) => {
                    let event = Event {
                        metadata: ObjectMeta {
                            name: Some(name),
                            namespace: object.namespace.clone(),
                            ..Default::default()
                        },
                        action: Some(action.into()),
                        reason: Some(reason.into()),
                        note: Some(note.clone()),
                        type_: Some(type_.as_str().into()),
                        event_time: Some(MicroTime(now)),
                        regarding: Some(object.clone()),
                        reporting_controller: Some(self.controller.clone()),
                        reporting_instance: Some(self.instance.clone()),
                        ..Default::default()
                    };
                    events.create(&PostParams::default(), &event).await.map(drop)
                }
                Write::Repeat { name, count } => {
                    // the API server keeps the first note: only the series changes
                    let series = json!({"series": {"count": count, "lastObservedTime": MicroTime(now)}});
                    events
                        .patch(&name, &PatchParams::default(), &Patch::Merge(&series))
                        .await
                        .map(drop)
                }
            };
            if let Err(e) = &result {
                // the next one starts a new event rather than patching one that may not exist
                self.recent().forget(&key);
                if repeat && once_more && matches!(e, kube::Error::Api(s) if s.code == 404) {
                    once_more = false;
                    continue;
                }
            }
            return result;
        }
    }
}

/// The longest note the API server takes (bytes).
const MAX_NOTE: usize = 1024;
/// The longest object name (a DNS subdomain) and reporting instance it takes.
const MAX_NAME: usize = 253;
const MAX_INSTANCE: usize = 128;

/// `text` cut to at most `max` bytes, on a character boundary.
fn bounded(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A new event's name: the object's name (cut so the whole fits a DNS
/// subdomain) and the time in hex.
fn event_name(object: &str, nanos: i128) -> String {
    let suffix = format!("{nanos:x}");
    let stem = bounded(object.to_string(), MAX_NAME - 1 - suffix.len());
    format!("{}.{suffix}", stem.trim_end_matches(['-', '.']))
}

/// How long after the last occurrence a repeat still joins its series (as
/// kube's and client-go's recorders do).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// What makes two events one series (the reporting controller is the recorder's own).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    type_: EventType,
    reason: String,
    action: String,
    namespace: Option<String>,
    kind: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

impl SeriesKey {
    fn new(object: &ObjectReference, type_: EventType, reason: &str, action: &str) -> Self {
        Self {
            type_,
            reason: reason.into(),
            action: action.into(),
            namespace: object.namespace.clone(),
            kind: object.kind.clone(),
            name: object.name.clone(),
            uid: object.uid.clone(),
        }
    }
}

/// An event already written: its name and how often it happened.
#[derive(Debug)]
struct Series {
    name: String,
    count: i32,
    last: Instant,
}

/// What to write for an event.
#[derive(Debug, PartialEq, Eq)]
enum Write {
    /// A new event with this name.
    Create(String),
    /// The event `name` happened again: its series now counts `count`.
    Repeat { name: String, count: i32 },
}

/// The series seen lately, bounded: two generations of at most `half` each.
/// New and repeated series go into the current one; when it is full it
/// becomes the previous one and the previous one is dropped, so a series
/// is remembered for at least `half` other series and at most `2 × half`
/// series are kept, each O(1) to find, add or drop. A series whose last
/// occurrence is older than `window` is not continued.
struct Recent {
    current: HashMap<SeriesKey, Series>,
    previous: HashMap<SeriesKey, Series>,
    half: usize,
    window: Duration,
}

impl Recent {
    /// Series remembered at most (~100 bytes each plus their strings).
    const KEPT: usize = 1024;

    fn new(kept: usize, window: Duration) -> Self {
        Self {
            current: HashMap::new(),
            previous: HashMap::new(),
            half: (kept / 2).max(1),
            window,
        }
    }

    /// Records an event with `key` at `now`: a repeat of a recent series, or a
    /// new event named `name()`.
    fn next(&mut self, key: SeriesKey, now: Instant, name: impl FnOnce() -> String) -> Write {
        let earlier = self
            .current
            .remove(&key)
            .or_else(|| self.previous.remove(&key))
            .filter(|s| now.saturating_duration_since(s.last) < self.window);
        let series = match earlier {
            Some(s) => Series {
                name: s.name,
                count: s.count.saturating_add(1),
                last: now,
            },
            None => Series {
                name: name(),
                count: 1,
                last: now,
            },
        };
        let write = if series.count == 1 {
            Write::Create(series.name.clone())
        } else {
            Write::Repeat {
                name: series.name.clone(),
                count: series.count,
            }
        };
        if self.current.len() >= self.half {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, series);
        write
    }

    fn forget(&mut self, key: &SeriesKey) {
        self.current.remove(key);
        self.previous.remove(key);
    }
}

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
    if let Err(e) = recorder.publish(object, type_, reason, action, note).await {
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

#[cfg(test)]
mod tests {
    #[test]
    fn names_notes_and_instances_fit_what_the_api_server_takes() {
        // a DistributedLock name may be 253 characters long
        let long = "a".repeat(250) + "-b";
        let name = event_name(&long, 0x1234_5678_9abc_def0);
        assert!(name.len() <= MAX_NAME, "{} characters", name.len());
        assert!(name.ends_with(".123456789abcdef0") && !name.contains("-."), "{name}");
        assert_eq!(event_name("lock-1", 255), "lock-1.ff");
        let note = bounded("é".repeat(600), MAX_NOTE);
        assert_eq!((note.len(), note.chars().count()), (1024, 512));
        assert_eq!(bounded("x".repeat(300), MAX_INSTANCE).len(), 128);
    }

    use super::*;

    impl Recent {
        fn len(&self) -> usize {
            self.current.len() + self.previous.len()
        }
    }

    fn key(name: &str, reason: &str) -> SeriesKey {
        let object = ObjectReference {
            kind: Some("DistributedLock".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        };
        SeriesKey::new(&object, EventType::Normal, reason, reason)
    }

    fn named(n: &str) -> impl FnOnce() -> String + '_ {
        move || n.to_string()
    }

    #[test]
    fn a_repeat_within_the_window_continues_the_series_of_the_first_event() {
        let mut recent = Recent::new(8, SERIES_WINDOW);
        let t = Instant::now();
        assert_eq!(
            recent.next(key("a", "Granted"), t, named("a.1")),
            Write::Create("a.1".into())
        );
        let later = t + Duration::from_secs(60);
        assert_eq!(
            recent.next(key("a", "Granted"), later, named("a.2")),
            Write::Repeat {
                name: "a.1".into(),
                count: 2
            }
        );
        // the window runs from the last occurrence
        assert_eq!(
            recent.next(key("a", "Granted"), later + Duration::from_secs(300), named("a.3")),
            Write::Repeat {
                name: "a.1".into(),
                count: 3
            }
        );
        // another reason, another object: their own events
        assert_eq!(
            recent.next(key("a", "Released"), later, named("a.4")),
            Write::Create("a.4".into())
        );
        assert_eq!(
            recent.next(key("b", "Granted"), later, named("b.1")),
            Write::Create("b.1".into())
        );
    }

    #[test]
    fn a_repeat_after_the_window_is_a_new_event() {
        let mut recent = Recent::new(8, SERIES_WINDOW);
        let t = Instant::now();
        recent.next(key("a", "Granted"), t, named("a.1"));
        assert_eq!(
            recent.next(key("a", "Granted"), t + SERIES_WINDOW, named("a.2")),
            Write::Create("a.2".into())
        );
    }

    #[test]
    fn memory_stays_bounded_however_many_objects_have_events() {
        let mut recent = Recent::new(Recent::KEPT, SERIES_WINDOW);
        let t = Instant::now();
        for i in 0..20_000 {
            let name = format!("lock-{i}");
            recent.next(key(&name, "Granted"), t, || name.clone());
            assert!(recent.len() <= Recent::KEPT, "{} series kept after {i}", recent.len());
        }
        // the latest ones still fold
        assert_eq!(
            recent.next(key("lock-19999", "Granted"), t, named("x")),
            Write::Repeat {
                name: "lock-19999".into(),
                count: 2
            }
        );
    }

    #[test]
    fn a_series_kept_repeating_survives_many_other_events() {
        let mut recent = Recent::new(16, SERIES_WINDOW);
        let t = Instant::now();
        recent.next(key("busy", "Warning"), t, named("busy.1"));
        for i in 0..100 {
            recent.next(key(&format!("other-{i}"), "Granted"), t, named("o"));
            if i % 7 == 0 {
                assert!(matches!(
                    recent.next(key("busy", "Warning"), t, named("busy.2")),
                    Write::Repeat { ref name, .. } if name == "busy.1"
                ));
            }
        }
    }

    #[test]
    fn a_forgotten_series_starts_over() {
        let mut recent = Recent::new(8, SERIES_WINDOW);
        let t = Instant::now();
        recent.next(key("a", "Granted"), t, named("a.1"));
        recent.forget(&key("a", "Granted"));
        assert_eq!(
            recent.next(key("a", "Granted"), t, named("a.2")),
            Write::Create("a.2".into())
        );
    }
}
