//! Regression tests for holes a hostile user found, against the real API
//! server and search node: each would let two Jobs hold one lock, or one bad
//! request hurt the others. (Lease-timing cases — a raised ttl, an expired
//! lease, a holder created late, forged queue annotations — are the fixed
//! corpus of the model-based test in tests/model.rs.)

mod common;

use std::time::Duration;

use common::{RUN_LABEL, Setup, WAIT, await_lock, lock_request, phase_of};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube_lock_manager::crd::{DistributedLock, Phase};
use serde_json::json;

fn gated_job(run: &str, name: &str, lock_id: &str, labels: serde_json::Value, managed_by: Option<&str>) -> Job {
    let mut labels = labels;
    labels[RUN_LABEL] = json!(run);
    let mut job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": labels, "annotations": {"lockmanager.dev/lock": lock_id}},
        "spec": {
            "suspend": true,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}
        }
    }))
    .unwrap();
    if let Some(manager) = managed_by {
        job.spec.as_mut().unwrap().managed_by = Some(manager.into());
    }
    job
}

fn suspended(job: &Job) -> bool {
    job.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false)
}

#[tokio::test]
async fn dot_and_dot_dot_are_not_lock_ids() {
    let Some(t) = Setup::new("dot-ids", &[]).await else {
        return;
    };
    for id in [".", ".."] {
        let err = t
            .api
            .create(
                &PostParams::default(),
                &lock_request(&t.run, "dots", json!({"lockId": id})),
            )
            .await
            .expect_err("the API server refuses the id");
        assert!(err.to_string().contains("spec.lockId"), "{err}");
    }
    // dots inside an id are fine
    t.create("dotted", json!({"lockId": "a..b"})).await;
    t.granted("dotted").await;
}

#[tokio::test]
async fn a_gated_job_whose_name_is_taken_gets_a_unique_request_and_a_warning() {
    let Some(t) = Setup::new("name-clash", &[]).await else {
        return;
    };
    // someone's request already has the Job's name (and another lock)
    t.create("reindex", json!({"lockId": "unrelated"})).await;
    t.granted("reindex").await;
    let jobs: Api<Job> = Api::namespaced(t.client.clone(), &t.ns);
    let job = jobs
        .create(
            &PostParams::default(),
            &gated_job(&t.run, "reindex", "shared", json!({}), None),
        )
        .await
        .unwrap();
    let warning = t.event("reindex", "NameClash").await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.note.unwrap_or_default().contains("already exists"));
    let uid = job.uid().unwrap();
    let own = format!("reindex-{}", &uid.replace('-', "")[..8]);
    let request = t.granted(&own).await;
    assert_eq!(request.spec.lock_id, "shared");
    assert_eq!(request.spec.holder_ref.unwrap().name, "reindex");
    common::eventually("the Job to be un-suspended", WAIT, || async {
        (!suspended(&jobs.get("reindex").await.ok()?)).then_some(())
    })
    .await;
    // the other request was left alone
    let other = t.api.get("reindex").await.unwrap();
    assert_eq!(other.spec.lock_id, "unrelated");
    assert_eq!(phase_of(&other), Some(Phase::Granted));
}

#[tokio::test]
async fn jobs_that_kueue_or_another_controller_manages_are_never_gated() {
    let Some(t) = Setup::new("managed-jobs", &[]).await else {
        return;
    };
    let jobs: Api<Job> = Api::namespaced(t.client.clone(), &t.ns);
    let kueue = gated_job(
        &t.run,
        "kueued",
        "k",
        json!({"kueue.x-k8s.io/queue-name": "main"}),
        None,
    );
    let other = gated_job(&t.run, "managed", "k", json!({}), Some("example.com/batch-controller"));
    for job in [kueue, other] {
        jobs.create(&PostParams::default(), &job).await.unwrap();
    }
    for (name, says) in [("kueued", "Kueue"), ("managed", "managedBy")] {
        let warning = t.event(name, "NotGated").await;
        let note = warning.note.unwrap_or_default();
        assert!(note.contains(says) && note.contains("lockctl wait"), "{note}");
    }
    // a gated Job of the same run is served meanwhile, proving the operator looked
    jobs.create(&PostParams::default(), &gated_job(&t.run, "ours", "k", json!({}), None))
        .await
        .unwrap();
    t.granted("ours").await;
    for name in ["kueued", "managed"] {
        assert!(suspended(&jobs.get(name).await.unwrap()), "{name} must stay suspended");
        assert!(t.api.get_opt(name).await.unwrap().is_none(), "no request for {name}");
    }
}

#[tokio::test]
async fn deleting_a_request_releases_a_grant_its_status_does_not_show_yet() {
    let Some(t) = Setup::new("crash-grant", &[]).await else {
        return;
    };
    // An operator that crashed right after acquiring: the index holds a grant
    // with the request's token (its UID), the status still says Pending.
    let mut t = t;
    t.operator.kill();
    let lock: DistributedLock = serde_json::from_value(json!({
        "apiVersion": "lockmanager.dev/v1alpha1", "kind": "DistributedLock",
        "metadata": {"name": "crashed", "labels": {RUN_LABEL: t.run}, "finalizers": ["lockmanager.dev/release"]},
        "spec": {"lockId": "c"}
    }))
    .unwrap();
    let created = t.api.create(&PostParams::default(), &lock).await.unwrap();
    let key = format!("{}/c", t.ns);
    let engine = common::lock_client(
        &common::es_url().unwrap(),
        kube_lock_manager::engine::DEFAULT_INDEX_PREFIX,
    );
    let request = kube_lock_manager::lock::AcquireRequest {
        token: created.uid().unwrap(),
        ..kube_lock_manager::lock::AcquireRequest::new(&key, Duration::from_secs(3600), json!({}))
    };
    assert!(engine.try_acquire(&request).await.unwrap().is_some());
    t.api.delete("crashed", &DeleteParams::default()).await.unwrap();
    t.operator.restart();
    common::eventually("the request to be gone", WAIT, || async {
        t.api.get_opt("crashed").await.unwrap().is_none().then_some(())
    })
    .await;
    assert!(
        engine.get(&key).await.unwrap().is_none(),
        "the grant must be released with the request, not left for its 1h lease"
    );
}

#[tokio::test]
async fn waiters_show_when_the_index_is_unreachable_too() {
    // The operator reaches the search node through a loopback proxy that the
    // test switches off: the holder's renewal fails, and every request in
    // line (not only the head, which calls the engine) says so.
    let Some(url) = common::services() else {
        return;
    };
    let proxy = common::SwitchProxy::start(&url).await;
    let Some(mut t) = Setup::new("index-down-waiters", &["--es-url", &proxy.url]).await else {
        return;
    };
    t.create("holder", json!({"lockId": "w", "ttl": "2s"})).await;
    t.granted("holder").await;
    for name in ["second", "third"] {
        t.create(name, json!({"lockId": "w"})).await;
    }
    await_lock(&t.api, "third", "Pending at 2", WAIT, |l| {
        l.status.as_ref().and_then(|s| s.waiting_position) == Some(2)
    })
    .await;
    proxy.set_up(false);
    for name in ["second", "third"] {
        await_lock(&t.api, name, "IndexReachable=False", WAIT, |l| {
            common::condition(l, "IndexReachable")
                .is_some_and(|c| c.status == "False" && c.reason == "IndexUnreachable")
        })
        .await;
    }
    let readyz = format!("http://127.0.0.1:{}/readyz", t.operator.http_port);
    let ready = || async { reqwest::get(&readyz).await.map(|r| r.status().as_u16()).unwrap_or(0) };
    assert_eq!(ready().await, 503, "unready while the index is unreachable");
    proxy.set_up(true);
    for name in ["second", "third"] {
        await_lock(&t.api, name, "IndexReachable=True again", WAIT, |l| {
            common::condition(l, "IndexReachable").is_some_and(|c| c.status == "True")
        })
        .await;
    }
    common::eventually("/readyz to answer 200 again", WAIT, || async {
        (ready().await == 200).then_some(())
    })
    .await;

    // Unready again, the first SIGTERM stops it.
    proxy.set_up(false);
    common::eventually("/readyz to answer 503", WAIT, || async {
        (ready().await == 503).then_some(())
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(t.operator.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    common::eventually("the operator to exit after one SIGTERM", WAIT, || {
        let exited = t.operator.child.try_wait().unwrap();
        async move { exited }
    })
    .await;
    // and its log, written to a file, has no terminal colour codes
    let log = std::fs::read_to_string(std::env::temp_dir().join(format!("operator-{}.log", t.run))).unwrap();
    assert!(
        log.contains("operator started") && !log.contains('\u{1b}'),
        "plain text log"
    );
}

#[tokio::test]
async fn a_deleted_lock_index_stops_all_grants_loudly_until_an_admin_recovers() {
    let prefix = common::unique("op-fence");
    let Some(t) = Setup::new("fence", &["--index-prefix", &prefix]).await else {
        return;
    };
    t.create("holder", json!({"lockId": "f", "ttl": "3s"})).await;
    let before = t.granted("holder").await.status.unwrap().fencing_token.unwrap();
    t.create("waiter", json!({"lockId": "f"})).await;
    t.pending_at("waiter", 1).await;

    let url = common::es_url().unwrap();
    let engine = common::lock_client(&url, &prefix);
    common::delete_index(&engine, &format!("{prefix}-000001")).await;

    // the holder's renewal finds no provable index: every request says so
    for name in ["holder", "waiter"] {
        await_lock(&t.api, name, "IndexReachable=False (FencingUnproven)", WAIT, |l| {
            common::condition(l, "IndexReachable").is_some_and(|c| c.status == "False" && c.reason == "FencingUnproven")
        })
        .await;
    }
    let warning = t.event("holder", "FencingUnproven").await;
    assert!(warning.note.unwrap_or_default().contains("lockctl index recover"));
    assert!(
        t.operator
            .metrics()
            .await
            .contains(r#"lockmanager_engine_errors_total{operation="extend",category="fencing"}"#)
    );
    assert_eq!(phase_of(&t.api.get("waiter").await.unwrap()), Some(Phase::Pending));

    // the admin recovers with a floor above every token handed out
    let floor = 1_000_000;
    assert!(before < floor);
    let out = common::lockctl()
        .env("ELASTICSEARCH_URL", &url)
        .env("LOCK_INDEX_PREFIX", &prefix)
        .args(["index", "recover", "--fencing-floor", &floor.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // the old grant is gone with its index: its holder is told, the waiter served
    await_lock(&t.api, "holder", "Lost or Expired", WAIT, |l| {
        matches!(phase_of(l), Some(Phase::Lost | Phase::Expired))
    })
    .await;
    let granted = t.granted("waiter").await.status.unwrap().fencing_token.unwrap();
    assert!(granted > floor, "fencing token {granted} must exceed the floor {floor}");
}

#[tokio::test]
async fn a_request_that_leaves_the_selector_is_released_and_its_waiter_served() {
    let Some(t) = Setup::new("left-selector", &[]).await else {
        return;
    };
    t.create("holder", json!({"lockId": "s", "ttl": "30s"})).await;
    t.granted("holder").await;
    t.create("waiter", json!({"lockId": "s"})).await;
    t.pending_at("waiter", 1).await;
    // someone removes the label the operator selects by
    let patch = kube::api::Patch::Merge(json!({"metadata": {"labels": {common::RUN_LABEL: null}}}));
    t.api
        .patch("holder", &kube::api::PatchParams::default(), &patch)
        .await
        .unwrap();
    // its lock is released (not left to lapse, nor renewed), it says why, the waiter is served
    let left = await_lock(&t.api, "holder", "Released without our finalizer", WAIT, |l| {
        phase_of(l) == Some(Phase::Released) && !l.finalizers().iter().any(|f| f == "lockmanager.dev/release")
    })
    .await;
    assert_eq!(common::condition(&left, "Granted").unwrap().reason, "NotSelected");
    t.granted("waiter").await;
    // and deleting it later is not stuck
    t.delete("holder").await;
    common::eventually("the request to be gone", WAIT, || async {
        t.api.get_opt("holder").await.unwrap().is_none().then_some(())
    })
    .await;
}

/// Hostile review (2026-11-29, high): a request whose `--selector` label was
/// removed and put back while the operator was not looking was let go — its
/// lock given to the waiter, Released/NotSelected — though it is selected
/// again. A departure is now checked against the selector by the API server
/// first, and the request told (at the version read) before its lock is
/// given back.
#[tokio::test]
async fn a_request_whose_label_came_back_is_not_let_go() {
    let Some(t) = Setup::new("label-back", &[]).await else {
        return;
    };
    t.create("holder", json!({"lockId": "s", "ttl": "30s"})).await;
    let before = t.granted("holder").await;
    t.create("waiter", json!({"lockId": "s"})).await;
    t.pending_at("waiter", 1).await;
    let operator = nix::unistd::Pid::from_raw(t.operator.child.id() as i32);
    nix::sys::signal::kill(operator, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let resume = resume_on_drop(operator);
    for label in [serde_json::Value::Null, json!(t.run)] {
        let patch = kube::api::Patch::Merge(json!({"metadata": {"labels": {RUN_LABEL: label}}}));
        t.api
            .patch("holder", &kube::api::PatchParams::default(), &patch)
            .await
            .unwrap();
    }
    // the operator sees the holder leave its view and come back
    drop(resume);
    // it keeps its grant and the waiter waits (the release came within
    // milliseconds of the resume)
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let holder = t.api.get("holder").await.unwrap();
        assert_eq!(phase_of(&holder), Some(Phase::Granted), "{:?}", holder.status);
        assert_eq!(
            holder.status.and_then(|s| s.token),
            before.status.as_ref().and_then(|s| s.token.clone())
        );
        let waiter = t.api.get("waiter").await.unwrap();
        assert_eq!(phase_of(&waiter), Some(Phase::Pending), "{:?}", waiter.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // and it is still this operator's: deleting it hands the lock over
    t.delete("holder").await;
    t.granted("waiter").await;
}

#[tokio::test]
async fn a_grant_a_waiting_request_was_never_told_of_is_given_back() {
    let Some(mut t) = Setup::new("untold-grant", &[]).await else {
        return;
    };
    // The operator stopped between acquiring for "early" and writing Granted;
    // meanwhile "urgent" (higher priority) arrived: "early" is no longer the
    // head, yet its token holds the key (for an hour).
    t.operator.kill();
    let early = t.create("early", json!({"lockId": "u"})).await;
    t.create("urgent", json!({"lockId": "u", "priority": 10})).await;
    let key = format!("{}/u", t.ns);
    let engine = common::lock_client(
        &common::es_url().unwrap(),
        kube_lock_manager::engine::DEFAULT_INDEX_PREFIX,
    );
    let request = kube_lock_manager::lock::AcquireRequest {
        token: early.uid().unwrap(),
        ..kube_lock_manager::lock::AcquireRequest::new(&key, Duration::from_secs(3600), json!({}))
    };
    assert!(engine.try_acquire(&request).await.unwrap().is_some());
    t.operator.restart();
    // the head is served now, not in an hour; "early" waits behind it
    let granted = t.granted("urgent").await;
    assert_eq!(
        engine.get(&key).await.unwrap().map(|l| l.token),
        granted.status.unwrap().token,
        "the index holds the head's grant"
    );
    t.pending_at("early", 1).await;
}

#[tokio::test]
async fn a_lease_that_ran_out_while_the_spec_was_edited_is_expired_not_lost() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(s) = Setup::new("expired-edited", &[]).await else {
        return;
    };
    s.create("holder", json!({"lockId": "k", "ttl": "2s"})).await;
    s.granted("holder").await;
    // the operator stalls past the lease while the requester edits the spec:
    // the copy it decides on when it wakes is stale
    let pid = Pid::from_raw(s.operator.child.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let edit = json!({"spec": {"holder": "edited while stalled"}});
    s.api
        .patch(
            "holder",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&edit),
        )
        .await
        .unwrap();
    let url = std::env::var("ELASTICSEARCH_URL").unwrap();
    let engine = common::lock_client(&url, "kube-locks");
    let key = format!("{}/k", s.ns);
    common::eventually("the lease to run out", WAIT, || async {
        engine.get(&key).await.ok()?.is_none().then_some(())
    })
    .await;
    kill(pid, Signal::SIGCONT).unwrap();
    let done = await_lock(&s.api, "holder", "final", WAIT, |l| {
        phase_of(l).is_some_and(|p| p.is_final())
    })
    .await;
    assert_eq!(phase_of(&done), Some(Phase::Expired), "{:?}", done.status);
}

/// Hostile review of issue 15: `lockctl exec` kept its command running after
/// its lease ran out for as long as renewals failed (the search engine out of
/// reach): another client was granted the lock and both commands ran at once
/// (12.9 s in the review). Now the command gets SIGTERM before the lease runs
/// out, so it has stopped before anyone else can be granted.
#[tokio::test]
async fn exec_stops_its_command_before_its_lease_runs_out_when_it_cannot_renew() {
    let Some(url) = common::es_url() else {
        return;
    };
    let proxy = common::SwitchProxy::start(&url).await;
    let lock_id = common::unique("exec-cut-off");
    let dir = tempfile::tempdir().unwrap();
    let ticks = dir.path().join("ticks");
    let script = format!("while :; do date +%s%N >> {}; sleep 0.05; done", ticks.display());
    use std::os::unix::process::CommandExt;
    let args = [
        "exec",
        &lock_id,
        "--ttl",
        "2s",
        "--es-timeout",
        "1s",
        "--",
        "sh",
        "-c",
        &script,
    ];
    let child = common::lockctl()
        .env("ELASTICSEARCH_URL", &proxy.url)
        .args(args)
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    // on a failed assertion the endless command must not outlive the test
    struct KillGroup(std::process::Child);
    impl Drop for KillGroup {
        fn drop(&mut self) {
            let group = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = self.0.wait();
        }
    }
    let mut exec = KillGroup(child);
    let exec_child = &mut exec.0;
    common::eventually("the command to run", WAIT, || async {
        std::fs::read_to_string(&ticks).ok().filter(|t| !t.is_empty())
    })
    .await;
    // the holder loses the search engine; another client waits for the lock
    proxy.set_up(false);
    let other = common::lock_client(&url, "kube-locks");
    let request = kube_lock_manager::lock::AcquireRequest::new(&lock_id, Duration::from_secs(30), json!({}));
    let granted = other
        .acquire_with_wait(&request, Duration::from_secs(20))
        .await
        .unwrap()
        .expect("the lock is free once the cut-off holder's lease ran out");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = exec_child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "lockctl exec still runs its command 10 s after another client was granted the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(exec_child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_ne!(status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("was lost"), "{stderr}");
    // the command's last tick came before the other client's grant was written
    let last_tick = std::fs::read_to_string(&ticks)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse::<i64>().ok())
        .max()
        .unwrap();
    let granted_at = granted.created_at.timestamp_nanos_opt().unwrap();
    assert!(
        last_tick < granted_at,
        "the cut-off holder's command still ran {} ms after another client was granted the lock",
        (last_tick - granted_at) / 1_000_000
    );
    other.release(&lock_id, &granted.token).await.unwrap();
}

/// A request (and a gated Job) created and deleted within moments — here
/// while the operator is paused, so that its watch brings both events at
/// once — must not stop the operator taking on new ones. With kube-runtime's
/// shared reflector every consumer of the watch looked the created object up
/// in the store, found it gone and waited without a wakeup, for good: a
/// hostile run saw no request granted again after churn with quick deletions.
#[tokio::test]
async fn an_object_created_and_deleted_in_a_blink_does_not_stop_the_operator() {
    let Some(t) = Setup::new("blink", &[]).await else {
        return;
    };
    t.create("before", json!({"lockId": "k"})).await;
    t.granted("before").await;
    let operator = nix::unistd::Pid::from_raw(t.operator.child.id() as i32);
    nix::sys::signal::kill(operator, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let resume = resume_on_drop(operator);
    let jobs: Api<Job> = Api::namespaced(t.client.clone(), &t.ns);
    for i in 0..3 {
        let name = format!("blink-{i}");
        t.create(&name, json!({"lockId": "k"})).await;
        t.delete(&name).await;
        let job = gated_job(&t.run, &format!("blink-job-{i}"), "j", json!({}), None);
        jobs.create(&PostParams::default(), &job).await.unwrap();
        jobs.delete(&job.name_any(), &DeleteParams::background()).await.unwrap();
    }
    drop(resume);
    // a new request, a gated Job and the first request's successor are served
    t.create("after", json!({"lockId": "fresh"})).await;
    t.granted("after").await;
    jobs.create(
        &PostParams::default(),
        &gated_job(&t.run, "gated", "j", json!({}), None),
    )
    .await
    .unwrap();
    t.granted("gated").await;
    t.create("next", json!({"lockId": "k"})).await;
    t.delete("before").await;
    t.granted("next").await;
}

/// SIGCONT to the paused operator when dropped (also when the test fails).
fn resume_on_drop(pid: nix::unistd::Pid) -> impl Drop {
    struct Resume(nix::unistd::Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    Resume(pid)
}
