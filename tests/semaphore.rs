//! Semaphores through the operator, against the real API server and search
//! node: N holders per key, weighted and exclusive requests, live limit
//! edits, both queueing rules, CLI clients sharing the permits, and the
//! "why is it waiting" messages.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube_lock_manager::crd::{DistributedLock, Phase, Semaphore};
use kube_lock_manager::lock::{AcquireRequest, PermitOutcome, PermitRequest};
use serde_json::json;

use common::{RUN_LABEL, Setup, WAIT, await_lock, eventually, phase_of};

fn semaphores(s: &Setup) -> Api<Semaphore> {
    Api::namespaced(s.client.clone(), &s.ns)
}

async fn create_semaphore(s: &Setup, name: &str, spec: serde_json::Value) -> Semaphore {
    let semaphore: Semaphore = serde_json::from_value(json!({
        "apiVersion": "lockmanager.dev/v1alpha1",
        "kind": "Semaphore",
        "metadata": {"name": name, "labels": {RUN_LABEL: s.run}},
        "spec": spec,
    }))
    .unwrap();
    semaphores(s)
        .create(&Default::default(), &semaphore)
        .await
        .unwrap_or_else(|e| panic!("create Semaphore {name}: {e}"))
}

async fn set_limit(s: &Setup, name: &str, limit: u32) {
    semaphores(s)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"limit": limit}})),
        )
        .await
        .unwrap();
}

/// Waits until the Semaphore's status satisfies `check`.
async fn semaphore_until(s: &Setup, name: &str, what: &str, check: impl Fn(&Semaphore) -> bool) -> Semaphore {
    let api = semaphores(s);
    eventually(&format!("Semaphore {name} {what}"), WAIT, || async {
        api.get(name).await.ok().filter(|sem| check(sem))
    })
    .await
}

fn ready_reason(semaphore: &Semaphore) -> Option<String> {
    semaphore
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone())
}

/// The in-force semaphore in the index.
async fn in_force(s: &Setup, name: &str, limit: i64) -> Semaphore {
    semaphore_until(s, name, &format!("in force with limit {limit}"), |sem| {
        ready_reason(sem).as_deref() == Some("InForce") && sem.status.as_ref().and_then(|st| st.limit) == Some(limit)
    })
    .await
}

fn granted_message(lock: &DistributedLock) -> (String, String) {
    let condition = lock
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Granted"))
        .cloned()
        .unwrap_or_else(|| panic!("{:?} has no Granted condition", lock.metadata.name));
    (condition.reason, condition.message)
}

async fn waiting_with(s: &Setup, name: &str, reason: &str, text: &str) -> DistributedLock {
    await_lock(&s.api, name, &format!("Pending ({reason}: …{text}…)"), WAIT, |l| {
        phase_of(l) == Some(Phase::Pending)
            && l.status
                .as_ref()
                .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Granted"))
                .is_some_and(|c| c.reason == reason && c.message.contains(text))
    })
    .await
}

fn is_granted(lock: &DistributedLock) -> bool {
    phase_of(lock) == Some(Phase::Granted)
}

/// Records, from a watch of the namespace, the most requests that were
/// Granted (and not being deleted) at the same moment.
fn track_concurrent_holders(s: &Setup) -> Arc<Mutex<(usize, BTreeMap<String, bool>)>> {
    let seen = Arc::new(Mutex::new((0usize, BTreeMap::new())));
    let record = seen.clone();
    let api = s.api.clone();
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = events.next().await {
            let mut state = record.lock().unwrap();
            let mut note = |l: &DistributedLock| {
                let name = l.metadata.name.clone().unwrap_or_default();
                let holds = is_granted(l) && l.metadata.deletion_timestamp.is_none();
                state.1.insert(name, holds);
            };
            match &event {
                watcher::Event::Apply(l) | watcher::Event::InitApply(l) => note(l),
                watcher::Event::Delete(l) => {
                    state.1.remove(&l.metadata.name.clone().unwrap_or_default());
                }
                _ => {}
            }
            let now = state.1.values().filter(|h| **h).count();
            state.0 = state.0.max(now);
        }
    });
    seen
}

#[tokio::test]
async fn limit_three_never_has_more_than_three_holders_and_serves_all_ten() {
    let Some(s) = Setup::new("sem-three", &[]).await else {
        return;
    };
    create_semaphore(&s, "reindex", json!({"limit": 3})).await;
    in_force(&s, "reindex", 3).await;
    let seen = track_concurrent_holders(&s);
    let names: Vec<String> = (0..10).map(|i| format!("job-{i}")).collect();
    for name in &names {
        s.create(name, json!({"lockId": "reindex"})).await;
    }
    let key = format!("{}/reindex", s.ns);
    let url = std::env::var("ELASTICSEARCH_URL").unwrap();
    let engine = common::lock_client(&url, "kube-locks");
    let mut served = Vec::new();
    let mut fencing = Vec::new();
    while served.len() < names.len() {
        // three at a time, in creation order
        let holders = eventually("three holders (or the last ones)", WAIT, || async {
            let all = s.api.list(&Default::default()).await.ok()?.items;
            let granted: Vec<DistributedLock> = all.into_iter().filter(is_granted).collect();
            (granted.len() == 3.min(names.len() - served.len())).then_some(granted)
        })
        .await;
        let in_index = engine
            .semaphore_get(&key)
            .await
            .unwrap()
            .expect("a semaphore in the index");
        assert!(in_index.held() <= 3, "{in_index:?}");
        let oldest = holders
            .iter()
            .min_by_key(|h| h.status.as_ref().unwrap().fencing_token)
            .unwrap()
            .clone();
        let name = oldest.metadata.name.clone().unwrap();
        fencing.push(oldest.status.as_ref().unwrap().fencing_token.unwrap());
        s.delete(&name).await;
        eventually(&format!("{name} gone"), WAIT, || async {
            s.api.get_opt(&name).await.ok()?.is_none().then_some(())
        })
        .await;
        served.push(name);
    }
    assert_eq!(served, names, "served in creation order");
    let max = seen.lock().unwrap().0;
    assert!(max <= 3, "at most 3 holders at once, saw {max}");
    assert!(
        fencing.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens grow: {fencing:?}"
    );
}

#[tokio::test]
async fn a_raised_limit_grants_at_once_and_a_lowered_one_lets_holders_finish() {
    let Some(s) = Setup::new("sem-limit", &[]).await else {
        return;
    };
    create_semaphore(&s, "batch", json!({"limit": 1})).await;
    in_force(&s, "batch", 1).await;
    for name in ["a", "b", "c"] {
        s.create(name, json!({"lockId": "batch"})).await;
    }
    s.granted("a").await;
    let b = waiting_with(&s, "b", "Waiting", "1/1 permits held by a; 1st in line").await;
    assert_eq!(b.status.unwrap().waiting_position, Some(1));
    waiting_with(&s, "c", "Waiting", "2nd in line").await;
    set_limit(&s, "batch", 3).await;
    s.granted("b").await;
    s.granted("c").await;
    let sem = in_force(&s, "batch", 3).await;
    let status = sem.status.unwrap();
    let _ = status;
    semaphore_until(&s, "batch", "showing 3 holders", |sem| {
        sem.status
            .as_ref()
            .is_some_and(|st| st.held == Some(3) && st.holders.len() == 3)
    })
    .await;

    // lowered below what is held: the holders keep their permits, nobody new gets one
    set_limit(&s, "batch", 1).await;
    in_force(&s, "batch", 1).await;
    s.create("d", json!({"lockId": "batch"})).await;
    waiting_with(&s, "d", "Waiting", "3/1 permits held").await;
    for name in ["a", "b", "c"] {
        assert!(is_granted(&s.api.get(name).await.unwrap()), "{name} keeps its permit");
    }
    s.delete("a").await;
    s.delete("b").await;
    waiting_with(&s, "d", "Waiting", "1/1 permits held by c").await;
    s.delete("c").await;
    s.granted("d").await;
}

#[tokio::test]
async fn a_request_over_the_limit_waits_until_the_limit_is_raised() {
    let Some(s) = Setup::new("sem-exceeds", &[]).await else {
        return;
    };
    create_semaphore(&s, "wide", json!({"limit": 3})).await;
    in_force(&s, "wide", 3).await;
    s.create("big", json!({"lockId": "wide", "permits": 5})).await;
    s.create("small", json!({"lockId": "wide"})).await;
    let big = waiting_with(
        &s,
        "big",
        "ExceedsLimit",
        "asks for 5 permits, more than its limit of 3",
    )
    .await;
    assert_eq!(phase_of(&big), Some(Phase::Pending), "not Failed: the limit may rise");
    // it holds up nobody, nor counts as ahead of anyone
    s.granted("small").await;
    s.create("wider", json!({"lockId": "wide", "permits": 3})).await;
    waiting_with(&s, "wider", "Waiting", "1/3 permits held by small; 1st in line").await;
    s.delete("small").await;
    s.granted("wider").await;
    s.delete("wider").await;
    set_limit(&s, "wide", 6).await;
    s.granted("big").await;
    // 0 closes the key
    set_limit(&s, "wide", 0).await;
    s.create("late", json!({"lockId": "wide"})).await;
    waiting_with(&s, "late", "ExceedsLimit", "it is closed (limit 0)").await;
}

#[tokio::test]
async fn a_writer_waits_for_readers_to_drain_and_blocks_readers_behind_it() {
    let Some(s) = Setup::new("sem-rw", &[]).await else {
        return;
    };
    create_semaphore(&s, "table", json!({"limit": 5})).await;
    in_force(&s, "table", 5).await;
    s.create("reader-1", json!({"lockId": "table"})).await;
    s.create("reader-2", json!({"lockId": "table"})).await;
    s.granted("reader-1").await;
    s.granted("reader-2").await;
    s.create("writer", json!({"lockId": "table", "exclusive": true})).await;
    waiting_with(
        &s,
        "writer",
        "Waiting",
        "2/5 permits held by reader-1, reader-2; 1st in line",
    )
    .await;
    // StrictFIFO: a reader that would fit waits behind the writer
    s.create("reader-3", json!({"lockId": "table"})).await;
    waiting_with(&s, "reader-3", "Waiting", "2nd in line").await;
    s.delete("reader-1").await;
    waiting_with(&s, "writer", "Waiting", "1/5 permits held by reader-2").await;
    s.delete("reader-2").await;
    let writer = s.granted("writer").await;
    waiting_with(&s, "reader-3", "Waiting", "5/5 permits held by writer; 1st in line").await;
    let sem = semaphore_until(&s, "table", "showing the writer", |sem| {
        sem.status
            .as_ref()
            .is_some_and(|st| st.held == Some(5) && st.holders.len() == 1)
    })
    .await;
    let holder = &sem.status.unwrap().holders[0];
    assert!(holder.exclusive);
    assert_eq!(holder.request.as_deref(), Some(format!("{}/writer", s.ns).as_str()));
    assert_eq!(Some(holder.fencing_token), writer.status.unwrap().fencing_token);
    s.delete("writer").await;
    s.granted("reader-3").await;
}

#[tokio::test]
async fn best_effort_fifo_lets_a_fitting_request_pass_a_blocked_head() {
    let Some(s) = Setup::new("sem-best-effort", &[]).await else {
        return;
    };
    create_semaphore(&s, "pool", json!({"limit": 3, "queueing": "BestEffortFIFO"})).await;
    create_semaphore(&s, "strict", json!({"limit": 3})).await;
    in_force(&s, "pool", 3).await;
    in_force(&s, "strict", 3).await;
    for key in ["pool", "strict"] {
        s.create(&format!("{key}-holder"), json!({"lockId": key, "permits": 2}))
            .await;
        s.granted(&format!("{key}-holder")).await;
        s.create(&format!("{key}-big"), json!({"lockId": key, "permits": 2}))
            .await;
        waiting_with(&s, &format!("{key}-big"), "Waiting", "1st in line").await;
        s.create(&format!("{key}-small"), json!({"lockId": key})).await;
    }
    // BestEffortFIFO: the small one fits and passes the blocked head
    s.granted("pool-small").await;
    waiting_with(&s, "pool-big", "Waiting", "3/3 permits held").await;
    // StrictFIFO: it waits behind the head
    waiting_with(&s, "strict-small", "Waiting", "2nd in line").await;
    let metrics = s.operator.metrics().await;
    assert!(metrics.contains("lockmanager_head_of_line_skips_total 1"), "{metrics}");
    // the head is served once it fits
    s.delete("pool-holder").await;
    s.granted("pool-big").await;
    s.delete("strict-holder").await;
    s.granted("strict-big").await;
    s.granted("strict-small").await;
}

#[tokio::test]
async fn cli_clients_and_requests_share_the_permits() {
    let Some(s) = Setup::new("sem-cli", &[]).await else {
        return;
    };
    create_semaphore(&s, "shared", json!({"limit": 3})).await;
    in_force(&s, "shared", 3).await;
    let key = format!("{}/shared", s.ns);
    let url = std::env::var("ELASTICSEARCH_URL").unwrap();
    let engine = common::lock_client(&url, "kube-locks");
    let mut cli = AcquireRequest::new(key.clone(), Duration::from_secs(60), json!({}));
    cli.holder = Some("nightly backup".into());
    let request = PermitRequest {
        base: cli.clone(),
        permits: 2,
        exclusive: false,
    };
    let PermitOutcome::Granted(cli_grant) = engine.acquire_permits(&request).await.unwrap() else {
        panic!("the CLI client gets 2 of 3 permits");
    };
    s.create("one", json!({"lockId": "shared"})).await;
    let one = s.granted("one").await;
    assert!(one.status.unwrap().fencing_token.unwrap() > cli_grant.fencing_token as i64);
    s.create("two", json!({"lockId": "shared"})).await;
    let two = waiting_with(&s, "two", "Waiting", "3/3 permits held").await;
    let (_, message) = granted_message(&two);
    assert!(
        message.contains("nightly backup") && message.contains("one"),
        "{message}"
    );
    let sem = semaphore_until(&s, "shared", "listing the CLI holder", |sem| {
        sem.status
            .as_ref()
            .is_some_and(|st| st.holders.iter().any(|h| h.holder.as_deref() == Some("nightly backup")))
    })
    .await;
    let status = sem.status.unwrap();
    let outside = status.holders.iter().find(|h| h.request.is_none()).unwrap();
    assert_eq!(outside.permits, 2);
    assert!(engine.release(&key, &cli.token).await.unwrap());
    s.granted("two").await;
}

#[tokio::test]
async fn two_semaphores_for_one_key_the_oldest_governs() {
    let Some(s) = Setup::new("sem-conflict", &[]).await else {
        return;
    };
    create_semaphore(&s, "first", json!({"lockId": "k", "limit": 2})).await;
    in_force(&s, "first", 2).await;
    create_semaphore(&s, "second", json!({"lockId": "k", "limit": 5})).await;
    let second = semaphore_until(&s, "second", "in Conflict", |sem| {
        ready_reason(sem).as_deref() == Some("Conflict")
    })
    .await;
    let message = second.status.unwrap().conditions[0].message.clone();
    assert!(message.contains("first"), "{message}");
    // deleting the governing one hands the key to the other
    semaphores(&s).delete("first", &Default::default()).await.unwrap();
    in_force(&s, "second", 5).await;
}

#[tokio::test]
async fn a_deleted_semaphore_closes_until_its_holders_finish_then_the_key_is_a_mutex() {
    let Some(s) = Setup::new("sem-delete", &[]).await else {
        return;
    };
    create_semaphore(&s, "gone", json!({"limit": 2})).await;
    in_force(&s, "gone", 2).await;
    s.create("a", json!({"lockId": "gone"})).await;
    s.create("b", json!({"lockId": "gone"})).await;
    s.granted("a").await;
    s.granted("b").await;
    semaphores(&s).delete("gone", &Default::default()).await.unwrap();
    semaphore_until(&s, "gone", "draining", |sem| {
        ready_reason(sem).as_deref() == Some("Draining")
    })
    .await;
    s.create("c", json!({"lockId": "gone"})).await;
    waiting_with(&s, "c", "ExceedsLimit", "closed").await;
    s.delete("a").await;
    s.delete("b").await;
    // a plain mutex again: c gets the whole key
    s.granted("c").await;
    assert!(semaphores(&s).get_opt("gone").await.unwrap().is_none());
    s.create("d", json!({"lockId": "gone"})).await;
    waiting_with(&s, "d", "Waiting", "held by c").await;
}

#[tokio::test]
async fn a_key_used_as_the_other_kind_is_named_and_nothing_breaks() {
    let Some(s) = Setup::new("sem-kind", &[]).await else {
        return;
    };
    let url = std::env::var("ELASTICSEARCH_URL").unwrap();
    let engine = common::lock_client(&url, "kube-locks");
    // a Semaphore for a key a CLI client holds as a plain mutex
    let key = format!("{}/plain", s.ns);
    let mut request = AcquireRequest::new(key.clone(), Duration::from_secs(60), json!({}));
    request.holder = Some("cron backup".into());
    let cli = engine.try_acquire(&request).await.unwrap().unwrap();
    create_semaphore(&s, "plain", json!({"limit": 2})).await;
    let sem = semaphore_until(&s, "plain", "MutexInUse", |sem| {
        ready_reason(sem).as_deref() == Some("MutexInUse")
    })
    .await;
    let status = sem.status.unwrap();
    let message = status.conditions[0].message.clone();
    assert!(
        message.contains("held as a plain mutex by cron backup until"),
        "{message}"
    );
    s.create("p", json!({"lockId": "plain"})).await;
    s.create("q", json!({"lockId": "plain"})).await;
    // in the requester's terms: who holds it, no CLI flags
    let p = waiting_with(&s, "p", "KindMismatch", "held as a plain mutex by cron backup").await;
    assert!(
        !granted_message(&p).1.contains("--permits"),
        "{:?}",
        granted_message(&p)
    );
    waiting_with(&s, "q", "Waiting", "held as a plain mutex by cron backup until").await;
    waiting_with(&s, "q", "Waiting", "2nd in line").await;
    semaphore_until(&s, "plain", "counting its waiters", |sem| {
        sem.status.as_ref().is_some_and(|st| st.waiting == Some(2))
    })
    .await;
    assert!(engine.release(&key, &cli.token).await.unwrap());
    in_force(&s, "plain", 2).await;
    s.granted("p").await;
    s.granted("q").await;

    // the reverse: a mutex request for a key a CLI client made a semaphore
    let other = format!("{}/counted", s.ns);
    engine.semaphore_set(&other, 4).await.unwrap();
    s.create("m", json!({"lockId": "counted"})).await;
    waiting_with(
        &s,
        "m",
        "KindMismatch",
        "holds it as a semaphore (limit 4) that no Semaphore here governs",
    )
    .await;
    // the operator serves everyone else meanwhile
    s.create("free", json!({"lockId": "elsewhere"})).await;
    s.granted("free").await;
    let ids: HashSet<_> = s
        .api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(is_granted)
        .map(|l| l.metadata.name.unwrap())
        .collect();
    assert_eq!(ids, HashSet::from(["p".into(), "q".into(), "free".to_string()]));
}

#[tokio::test]
async fn kubectl_shows_semaphores_and_permits() {
    let Some(s) = Setup::new("sem-kubectl", &[]).await else {
        return;
    };
    create_semaphore(&s, "shown", json!({"limit": 4})).await;
    in_force(&s, "shown", 4).await;
    s.create("w", json!({"lockId": "shown", "permits": 3})).await;
    s.granted("w").await;
    s.create("x", json!({"lockId": "shown", "permits": 2})).await;
    waiting_with(&s, "x", "Waiting", "3/4 permits held by w").await;
    semaphore_until(&s, "shown", "showing 3 held and 1 waiting", |sem| {
        sem.status
            .as_ref()
            .is_some_and(|st| st.held == Some(3) && st.waiting == Some(1))
    })
    .await;
    let kubectl = |args: &[&str]| {
        let out = std::process::Command::new("kubectl")
            .args(args)
            .args(["-n", &s.ns])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = kubectl(&["get", "sem"]);
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "LIMIT", "HELD", "WAITING", "QUEUEING", "AGE"]);
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["shown", "4", "3", "1", "StrictFIFO"], "{text}");
    let wide = kubectl(&["get", "locks", "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("PERMITS"), "{wide}");
    let x = wide.lines().find(|l| l.starts_with("x ")).unwrap();
    assert!(x.split_whitespace().any(|c| c == "2"), "{x}");
}

/// A Waiting event on the Job `name` that says `text`.
async fn job_event(s: &Setup, name: &str, text: &str) {
    s.event_where(name, "Waiting", |e| {
        e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Job")
            && e.note.as_deref().is_some_and(|n| n.contains(text))
    })
    .await;
}

#[tokio::test]
async fn gated_jobs_take_permits_and_hear_when_their_place_changes() {
    use k8s_openapi::api::batch::v1::Job;
    let Some(s) = Setup::new("sem-jobs", &[]).await else {
        return;
    };
    create_semaphore(&s, "render", json!({"limit": 3})).await;
    in_force(&s, "render", 3).await;
    let jobs: Api<Job> = Api::namespaced(s.client.clone(), &s.ns);
    let job = |name: &str, permits: &str| -> Job {
        serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {
                "name": name,
                "labels": {RUN_LABEL: s.run},
                "annotations": {"lockmanager.dev/lock": "render", "lockmanager.dev/permits": permits}
            },
            "spec": {
                "suspend": true,
                "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}
            }
        }))
        .unwrap()
    };
    for (name, permits) in [("wide", "2"), ("narrow", "2"), ("last", "1")] {
        jobs.create(&Default::default(), &job(name, permits)).await.unwrap();
    }
    let running = |name: &'static str| {
        let jobs = jobs.clone();
        async move {
            eventually(&format!("Job {name} un-suspended"), WAIT, || async {
                let job = jobs.get(name).await.ok()?;
                (job.spec?.suspend == Some(false)).then_some(())
            })
            .await
        }
    };
    running("wide").await;
    // StrictFIFO: "narrow" (2) does not fit next to "wide" (2); "last" waits behind it
    waiting_with(&s, "narrow", "Waiting", "2/3 permits held by Job/wide; 1st in line").await;
    waiting_with(&s, "last", "Waiting", "2/3 permits held by Job/wide; 2nd in line").await;
    // each Job hears of its place (an event per place: its words are those
    // of the moment it got there)
    job_event(&s, "narrow", "1st in line").await;
    job_event(&s, "last", "2nd in line").await;
    // the first Job finishes: the next two fit together
    common::complete_job(&jobs, "wide").await;
    running("narrow").await;
    running("last").await;
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named() {
    let Some(s) = Setup::new("sem-bad", &[]).await else {
        return;
    };
    let refused = |result: Result<Semaphore, kube::Error>, field: &str| {
        let err = result.expect_err("refused").to_string();
        assert!(err.contains(field), "{err}");
    };
    let semaphore = |spec: serde_json::Value| -> Semaphore {
        serde_json::from_value(json!({
            "apiVersion": "lockmanager.dev/v1alpha1", "kind": "Semaphore",
            "metadata": {"name": "bad", "labels": {RUN_LABEL: s.run}}, "spec": spec,
        }))
        .unwrap()
    };
    let api = semaphores(&s);
    refused(
        api.create(&Default::default(), &semaphore(json!({"limit": 10001})))
            .await,
        "spec.limit",
    );
    let request = |spec| common::lock_request(&s.run, "bad", spec);
    for (spec, field) in [
        (json!({"lockId": "k", "permits": 10001}), "spec.permits"),
        (json!({"lockId": "k", "permits": 0}), "spec.permits"),
        (
            json!({"lockId": "k", "permits": 2, "exclusive": true}),
            "spec.permits cannot be combined",
        ),
    ] {
        let err = s
            .api
            .create(&Default::default(), &request(spec))
            .await
            .expect_err("refused");
        assert!(err.to_string().contains(field), "{err}");
    }
    create_semaphore(&s, "good", json!({"limit": 2})).await;
    let err = api
        .patch(
            "good",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"lockId": "other"}})),
        )
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("spec.lockId is immutable"), "{err}");
    s.create("r", json!({"lockId": "good", "permits": 2})).await;
    let err = s
        .api
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"permits": 1}})),
        )
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("spec.permits is immutable"), "{err}");
    // and the operator serves on
    s.granted("r").await;
}
