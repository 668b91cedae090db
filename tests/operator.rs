//! The operator against the real kube-apiserver and the real search node.
//! Each test runs its own operator (selecting only its own requests) in its
//! own namespace.

mod common;

use std::time::{Duration, Instant};

use common::{Setup, WAIT, await_lock, lock_request, phase_of};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_lock_manager::crd::{DistributedLock, Phase};
use serde_json::json;

fn status(lock: &DistributedLock) -> kube_lock_manager::crd::DistributedLockStatus {
    lock.status.clone().unwrap_or_default()
}

#[tokio::test]
async fn a_free_lock_is_granted_with_token_fencing_token_and_expiry() {
    let Some(s) = Setup::new("grant", &[]).await else {
        return;
    };
    s.create(
        "first",
        json!({"lockId": "reindex", "ttl": "30s", "metadata": {"owner": "team-a"}}),
    )
    .await;
    let lock = s.granted("first").await;
    let st = status(&lock);
    assert!(st.token.as_deref().is_some_and(|t| !t.is_empty()));
    assert!(st.fencing_token.is_some_and(|f| f > 0));
    assert!(st.expires_at.is_some());
    assert_eq!(st.lock_key.as_deref(), Some(format!("{}/reindex", s.ns).as_str()));
    let granted = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Granted")
        .expect("Granted condition");
    assert_eq!(granted.status, "True");
    // the lock document in the index carries the same token and the metadata
    let url = std::env::var("ELASTICSEARCH_URL").unwrap();
    let doc = common::lock_client(&url, "kube-locks")
        .get(&format!("{}/reindex", s.ns))
        .await
        .unwrap()
        .expect("lock document");
    assert_eq!(Some(doc.token), st.token);
    assert_eq!(doc.metadata["owner"], "team-a");
    // `kubectl wait --for=condition=Granted` works
    let out = std::process::Command::new("kubectl")
        .args([
            "wait",
            "--for=condition=Granted",
            "-n",
            &s.ns,
            "lock/first",
            "--timeout=20s",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn deleting_the_holder_hands_the_lock_to_the_waiter_fast() {
    let Some(s) = Setup::new("handoff", &[]).await else {
        return;
    };
    s.create("holder", json!({"lockId": "migrate"})).await;
    let holder = s.granted("holder").await;
    s.create("waiter", json!({"lockId": "migrate"})).await;
    s.pending_at("waiter", 1).await;

    let started = Instant::now();
    s.delete("holder").await;
    let waiter = s.granted("waiter").await;
    let handoff = started.elapsed();
    assert!(handoff < Duration::from_secs(1), "handoff took {handoff:?}");
    assert!(status(&waiter).fencing_token > status(&holder).fencing_token);
    assert_ne!(status(&waiter).token, status(&holder).token);
    // the holder's finalizer released it and let it go
    common::eventually("the holder to be gone", WAIT, || async {
        s.api.get_opt("holder").await.unwrap().is_none().then_some(())
    })
    .await;
    let metrics = s.operator.metrics().await;
    assert!(
        metrics.contains(r#"lockmanager_grants_total{kind="mutex"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains("lockmanager_releases_total 1"), "{metrics}");
}

#[tokio::test]
async fn higher_priority_is_granted_before_an_older_request() {
    let Some(s) = Setup::new("priority", &[]).await else {
        return;
    };
    s.create("holder", json!({"lockId": "p"})).await;
    s.granted("holder").await;
    s.create("old-low", json!({"lockId": "p", "priority": 0})).await;
    s.pending_at("old-low", 1).await;
    s.create("new-high", json!({"lockId": "p", "priority": 10})).await;
    s.pending_at("new-high", 1).await;
    s.pending_at("old-low", 2).await;
    s.delete("holder").await;
    s.granted("new-high").await;
    assert_eq!(phase_of(&s.api.get("old-low").await.unwrap()), Some(Phase::Pending));
}

#[tokio::test]
async fn equal_priority_waiters_are_served_first_in_first_out() {
    let Some(s) = Setup::new("fifo", &[]).await else { return };
    s.create("holder", json!({"lockId": "q"})).await;
    s.granted("holder").await;
    let names: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
    for name in &names {
        s.create(name, json!({"lockId": "q"})).await;
    }
    for (i, name) in names.iter().enumerate() {
        s.pending_at(name, i as i32 + 1).await;
    }
    let mut previous = "holder".to_string();
    for name in &names {
        s.delete(&previous).await;
        let lock = s.granted(name).await;
        // nobody else holds it at the same time
        let all = s.api.list(&Default::default()).await.unwrap();
        let holders: Vec<_> = all
            .items
            .iter()
            .filter(|l| phase_of(l) == Some(Phase::Granted) && l.metadata.deletion_timestamp.is_none())
            .map(|l| l.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(holders, std::slice::from_ref(name), "one holder at a time");
        assert!(status(&lock).waiting_position.is_none());
        previous = name.clone();
    }
}

#[tokio::test]
async fn namespace_scope_isolates_and_cluster_scope_contends() {
    let Some(s) = Setup::new("scope", &[]).await else {
        return;
    };
    let other_ns = common::namespace(&s.client, "scope-b").await;
    let other: Api<DistributedLock> = Api::namespaced(s.client.clone(), &other_ns);
    let lock_id = common::unique("shared");
    // Namespace scope: same lockId in two namespaces, both granted.
    s.create("a", json!({"lockId": lock_id})).await;
    other
        .create(
            &PostParams::default(),
            &lock_request(&s.run, "b", json!({"lockId": lock_id})),
        )
        .await
        .unwrap();
    s.granted("a").await;
    await_lock(&other, "b", "Granted", WAIT, |l| phase_of(l) == Some(Phase::Granted)).await;
    // Cluster scope: they contend for one key.
    s.create("ca", json!({"lockId": lock_id, "scope": "Cluster"})).await;
    s.granted("ca").await;
    other
        .create(
            &PostParams::default(),
            &lock_request(&s.run, "cb", json!({"lockId": lock_id, "scope": "Cluster"})),
        )
        .await
        .unwrap();
    let waiting = await_lock(&other, "cb", "Pending", WAIT, |l| phase_of(l) == Some(Phase::Pending)).await;
    assert_eq!(status(&waiting).lock_key.as_deref(), Some(lock_id.as_str()));
    s.delete("ca").await;
    await_lock(&other, "cb", "Granted", WAIT, |l| phase_of(l) == Some(Phase::Granted)).await;
}

#[tokio::test]
async fn cluster_scope_is_refused_outside_the_allowed_namespaces() {
    let Some(s) = Setup::new("scope-deny", &["--cluster-scope-namespaces", "somewhere-else"]).await else {
        return;
    };
    s.create("c", json!({"lockId": common::unique("x"), "scope": "Cluster"}))
        .await;
    let lock = await_lock(&s.api, "c", "Failed", WAIT, |l| phase_of(l) == Some(Phase::Failed)).await;
    let condition = status(&lock)
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Granted")
        .unwrap();
    assert_eq!(condition.reason, "ScopeNotAllowed");
    assert!(condition.message.contains(&s.ns), "{}", condition.message);
}

#[tokio::test]
async fn a_lock_taken_with_lockctl_blocks_the_request_until_released() {
    let Some(s) = Setup::new("outside", &[]).await else {
        return;
    };
    let key = format!("{}/cli", s.ns);
    let out = common::lockctl()
        .args(["acquire", &key, "--ttl", "60s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    s.create("req", json!({"lockId": "cli"})).await;
    let pending = await_lock(&s.api, "req", "held elsewhere", WAIT, |l| {
        l.status
            .as_ref()
            .is_some_and(|st| st.conditions.iter().any(|c| c.reason == "HeldElsewhere"))
    })
    .await;
    assert_eq!(phase_of(&pending), Some(Phase::Pending));
    let out = common::lockctl()
        .args(["release", &key, "--token", &token])
        .output()
        .unwrap();
    assert!(out.status.success());
    // retried within the operator's bounded backoff (5 s by default)
    s.granted("req").await;
}

#[tokio::test]
async fn a_lock_taken_with_lockctl_is_granted_after_it_expires() {
    let Some(s) = Setup::new("outside-expiry", &[]).await else {
        return;
    };
    let key = format!("{}/cli", s.ns);
    let out = common::lockctl()
        .args(["acquire", &key, "--ttl", "2s"])
        .output()
        .unwrap();
    assert!(out.status.success());
    s.create("req", json!({"lockId": "cli"})).await;
    s.pending_at("req", 1).await;
    let lock = s.granted("req").await;
    assert_ne!(
        status(&lock).token.unwrap(),
        String::from_utf8(out.stdout).unwrap().trim()
    );
}

#[tokio::test]
async fn holder_job_completion_releases_and_grants_the_next() {
    let Some(s) = Setup::new("holder-job", &[]).await else {
        return;
    };
    let jobs: Api<Job> = Api::namespaced(s.client.clone(), &s.ns);
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "reindex"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    s.create(
        "by-job",
        json!({"lockId": "j", "holderRef": {"kind": "Job", "name": "reindex"}}),
    )
    .await;
    let held = s.granted("by-job").await;
    assert_eq!(status(&held).holder.as_deref(), Some("Job/reindex"));
    s.create("next", json!({"lockId": "j"})).await;
    s.pending_at("next", 1).await;

    common::complete_job(&jobs, "reindex").await;
    let released = await_lock(&s.api, "by-job", "Released", WAIT, |l| {
        phase_of(l) == Some(Phase::Released)
    })
    .await;
    assert!(status(&released).token.is_none());
    s.granted("next").await;
}

#[tokio::test]
async fn acquire_timeout_fails_the_request() {
    let Some(s) = Setup::new("timeout", &[]).await else {
        return;
    };
    s.create("holder", json!({"lockId": "t"})).await;
    s.granted("holder").await;
    s.create("impatient", json!({"lockId": "t", "acquireTimeout": "2s"}))
        .await;
    let failed = await_lock(&s.api, "impatient", "Failed", WAIT, |l| {
        phase_of(l) == Some(Phase::Failed)
    })
    .await;
    let condition = status(&failed)
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Granted")
        .unwrap();
    assert_eq!(condition.reason, "Timeout");
    // a failed request never acquires, even once the lock is free
    s.delete("holder").await;
    s.create("later", json!({"lockId": "t"})).await;
    s.granted("later").await;
    assert_eq!(phase_of(&s.api.get("impatient").await.unwrap()), Some(Phase::Failed));
}

#[tokio::test]
async fn invalid_specs_are_rejected_by_the_api_server_naming_the_field() {
    let Some(s) = Setup::new("invalid", &[]).await else {
        return;
    };
    let cases = [
        (json!({"lockId": "has space"}), "spec.lockId"),
        (json!({"lockId": ""}), "spec.lockId"),
        (json!({"lockId": "x".repeat(201)}), "spec.lockId"),
        (json!({"lockId": "a", "ttl": "500ms"}), "spec.ttl"),
        (json!({"lockId": "a", "ttl": "25h"}), "spec.ttl"),
        (json!({"lockId": "a", "ttl": "soon"}), "spec.ttl"),
        (
            json!({"lockId": "a", "acquireTimeout": "10 minutes"}),
            "spec.acquireTimeout",
        ),
        (
            json!({"lockId": "a", "holderRef": {"kind": "Deployment", "name": "x"}}),
            "spec.holderRef.kind",
        ),
        (json!({"lockId": "a", "scope": "Galaxy"}), "spec.scope"),
        (json!({}), "spec.lockId"),
    ];
    // Sent as raw objects, so that the Rust types don't stop bad input first.
    let resource = kube::api::ApiResource::erase::<DistributedLock>(&());
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(s.client.clone(), &s.ns, &resource);
    for (i, (spec, field)) in cases.into_iter().enumerate() {
        let mut object = kube::api::DynamicObject::new(&format!("bad{i}"), &resource);
        object.data = json!({"spec": spec});
        let message = match raw.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(status)) => status.message,
            other => panic!("{spec} should be rejected, got {other:?}"),
        };
        assert!(
            message.contains(field),
            "{spec}: message {message:?} should name {field}"
        );
    }
    // immutability
    s.create("fixed", json!({"lockId": "a"})).await;
    let err = s
        .api
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"lockId": "b"}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.lockId is immutable"), "{err}");
    let err = s
        .api
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scope": "Cluster"}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.scope is immutable"), "{err}");
}

#[tokio::test]
async fn a_restarted_controller_keeps_the_holder_its_token_and_the_queue_order() {
    let Some(mut s) = Setup::new("restart", &[]).await else {
        return;
    };
    s.create("holder", json!({"lockId": "r", "ttl": "4s"})).await;
    let before = s.granted("holder").await;
    for name in ["w1", "w2", "w3"] {
        s.create(name, json!({"lockId": "r"})).await;
    }
    s.pending_at("w3", 3).await;
    s.operator.restart();
    // past the lease: only renewals by the new process can keep it
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = s.granted("holder").await;
    assert_eq!(status(&after).token, status(&before).token, "same token after restart");
    assert_eq!(status(&after).fencing_token, status(&before).fencing_token);
    let url = std::env::var("ELASTICSEARCH_URL").unwrap();
    let doc = common::lock_client(&url, "kube-locks")
        .get(&format!("{}/r", s.ns))
        .await
        .unwrap()
        .expect("the lease was renewed by the restarted operator");
    assert_eq!(Some(doc.token), status(&before).token);
    for (i, name) in ["w1", "w2", "w3"].iter().enumerate() {
        s.pending_at(name, i as i32 + 1).await;
    }
    s.delete("holder").await;
    s.granted("w1").await;
}

#[tokio::test]
async fn requests_made_while_the_controller_restarts_keep_their_order() {
    let Some(mut s) = Setup::new("restart-order", &[]).await else {
        return;
    };
    s.create("holder", json!({"lockId": "r"})).await;
    s.granted("holder").await;
    // killed while it is taking on the first waiters: some have a finalizer,
    // some a recorded place, some nothing yet
    let names: Vec<String> = (1..=8).map(|i| format!("w{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        s.create(name, json!({"lockId": "r"})).await;
        if i == 3 {
            s.operator.restart();
        }
    }
    for (i, name) in names.iter().enumerate() {
        s.pending_at(name, i as i32 + 1).await;
    }
}

#[tokio::test]
async fn kubectl_get_locks_shows_the_columns() {
    let Some(s) = Setup::new("kubectl", &[]).await else {
        return;
    };
    s.create("shown", json!({"lockId": "k", "holder": "reindex job"})).await;
    s.granted("shown").await;
    let out = std::process::Command::new("kubectl")
        .args(["get", "locks", "-n", &s.ns])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "LOCK", "PHASE", "HOLDER", "FENCING", "EXPIRES", "AGE"]);
    let row = text.lines().nth(1).unwrap();
    assert!(
        row.contains("shown") && row.contains("Granted") && row.contains("reindex job"),
        "{row}"
    );
}

#[tokio::test]
async fn a_lock_cycle_writes_the_request_five_times_and_tells_each_step_once() {
    let Some(s) = Setup::new("writes", &[]).await else {
        return;
    };
    // every write to the request is one watch event: count them from its creation to its end
    let params = kube::api::WatchParams::default().fields("metadata.name=cycle");
    let mut events = s.api.watch(&params, "0").await.unwrap().boxed();
    s.create("cycle", json!({"lockId": "cycle"})).await;
    s.granted("cycle").await;
    s.delete("cycle").await;
    let mut writes = Vec::new();
    let counted = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            match event.unwrap() {
                kube::api::WatchEvent::Added(l) => writes.push(format!("created ({:?})", phase_of(&l))),
                kube::api::WatchEvent::Modified(l) => writes.push(format!(
                    "modified: phase {:?}, finalizers {:?}, deleting {}",
                    phase_of(&l),
                    l.metadata.finalizers,
                    l.metadata.deletion_timestamp.is_some()
                )),
                kube::api::WatchEvent::Deleted(_) => {
                    writes.push("deleted".into());
                    return;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(counted.is_ok(), "the request was not gone within {WAIT:?}: {writes:#?}");
    // create, finalizer, Granted (its place in line recorded with it), delete, finalizer removed
    assert_eq!(writes.len(), 5, "{writes:#?}");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(s.client.clone(), &s.ns);
    let told = |reason: &'static str| {
        let events = events.clone();
        async move {
            events
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .map(|e| e.series.as_ref().map_or(1, |s| s.count))
                .sum::<i32>()
        }
    };
    s.event("cycle", "Released").await;
    assert_eq!(told("Granted").await, 1);
    assert_eq!(told("Released").await, 1);
}

/// A holder's lease is extended in the lock index every quarter of its TTL,
/// but its status — an API write each, the load 1,000 holders put on the
/// API server — less often (an 8 s lease: every second or third time), with
/// its expiresAt still ahead.
#[tokio::test]
async fn a_holder_is_renewed_every_quarter_ttl_and_its_status_written_less_often() {
    let Some(s) = Setup::new("renewals", &[]).await else {
        return;
    };
    s.create("held", json!({"lockId": "held", "ttl": "8s"})).await;
    let granted = s.granted("held").await;
    let params = kube::api::WatchParams::default().fields("metadata.name=held");
    let version = granted.metadata.resource_version.clone().unwrap_or_default();
    let mut events = s.api.watch(&params, &version).await.unwrap().boxed();
    let url = std::env::var("ELASTICSEARCH_URL").unwrap();
    let locks = common::lock_client(&url, "kube-locks");
    let key = format!("{}/held", s.ns);
    // watch for 13 s (renewals every 2 s, six of them): the index's expiry
    // sampled, the request's writes counted, its recorded expiry checked
    let window = Instant::now() + Duration::from_secs(13);
    let (mut extensions, mut writes) = (std::collections::BTreeSet::new(), 0);
    while Instant::now() < window {
        let doc = locks.get(&key).await.unwrap().expect("the lock stays held");
        assert_eq!(Some(&doc.token), status(&granted).token.as_ref(), "the same grant");
        extensions.insert(doc.expires_at);
        let lock = s.api.get("held").await.unwrap();
        let recorded = status(&lock).expires_at.expect("a Granted request shows its expiry");
        let recorded = chrono::DateTime::parse_from_rfc3339(&recorded).unwrap();
        assert!(
            recorded > chrono::Utc::now(),
            "the recorded expiry {recorded} passed while the lease is renewed"
        );
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(250), events.next()).await {
            if let kube::api::WatchEvent::Modified(_) = event.unwrap() {
                writes += 1;
            }
        }
    }
    assert!(extensions.len() >= 6, "renewed in the index: {extensions:?}");
    assert!(
        (1..=3).contains(&writes),
        "{writes} status writes for {} renewals",
        extensions.len() - 1
    );
}

#[tokio::test]
async fn a_request_with_the_longest_name_gets_its_events() {
    let Some(s) = Setup::new("long-name", &[]).await else {
        return;
    };
    // a name of 253 characters, the most the API server allows
    let name = format!("{}-z", "l".repeat(251));
    s.create(&name, json!({"lockId": "long"})).await;
    s.granted(&name).await;
    let granted = s.event(&name, "Granted").await;
    let event_name = granted.metadata.name.unwrap_or_default();
    assert!(event_name.len() <= 253, "{event_name}");
}
