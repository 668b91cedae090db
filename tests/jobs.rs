//! Jobs coordinating through locks, against the real API server and search
//! node. There is no kubelet or Job controller: the tests play their part by
//! watching Jobs and writing Job status, and run `lockctl wait` as a process.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Operator, RUN_LABEL, await_lock, lock_request, phase_of};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use kube_lock_manager::crd::{DistributedLock, Phase};
use serde_json::json;

use common::WAIT;

async fn setup(name: &str) -> Option<(kube::Client, String, String, Operator)> {
    common::services()?;
    let client = kube::Client::try_default().await.expect("kubeconfig");
    common::install_crd(&client).await;
    let ns = common::namespace(&client, name).await;
    let run = common::unique(name);
    let operator = Operator::start(&run, &[]);
    Some((client, ns, run, operator))
}

fn gated_job(run: &str, name: &str, lock_id: &str, suspend: bool) -> Job {
    serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {
            "name": name,
            "labels": {RUN_LABEL: run},
            "annotations": {"lockmanager.dev/lock": lock_id, "lockmanager.dev/ttl": "30s"}
        },
        "spec": {
            "suspend": suspend,
            "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}
        }
    }))
    .unwrap()
}

fn fencing_annotation(job: &Job) -> Option<i64> {
    job.metadata
        .annotations
        .as_ref()?
        .get("lockmanager.dev/fencing-token")?
        .parse()
        .ok()
}

#[tokio::test]
async fn suspend_gated_jobs_run_strictly_one_after_another() {
    let Some((client, ns, run, _operator)) = setup("gated").await else {
        return;
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let requests: Api<DistributedLock> = Api::namespaced(client.clone(), &ns);
    let names = ["backup-1", "backup-2", "backup-3"];
    for name in names {
        jobs.create(&PostParams::default(), &gated_job(&run, name, "backup", true))
            .await
            .unwrap();
        // the operator makes a request for each Job; queue order = Job creation order
        await_lock(&requests, name, "requested", WAIT, |_| true).await;
    }
    // Play the Job controller: when a Job is un-suspended, "run" it briefly, then complete it.
    let mut intervals: BTreeMap<String, (Instant, Instant)> = BTreeMap::new();
    let mut fencing: Vec<(String, i64)> = Vec::new();
    let mut events = watcher::watcher(jobs.clone(), watcher::Config::default()).boxed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while intervals.len() < names.len() {
        let event = tokio::time::timeout_at(deadline.into(), events.try_next())
            .await
            .expect("all gated Jobs ran within 60s")
            .unwrap()
            .unwrap();
        let (watcher::Event::Apply(job) | watcher::Event::InitApply(job)) = event else {
            continue;
        };
        let name = job.metadata.name.clone().unwrap();
        let running = job.spec.as_ref().and_then(|s| s.suspend) == Some(false);
        if !running || intervals.contains_key(&name) {
            continue;
        }
        let started = Instant::now();
        fencing.push((
            name.clone(),
            fencing_annotation(&job).expect("fencing annotation before start"),
        ));
        // while this one runs, every other Job must still be suspended
        for other in jobs.list(&Default::default()).await.unwrap().items {
            let other_name = other.metadata.name.clone().unwrap();
            let other_running = other.spec.as_ref().and_then(|s| s.suspend) == Some(false);
            let other_done = intervals.contains_key(&other_name);
            assert!(
                other_name == name || !other_running || other_done,
                "{other_name} runs while {name} runs"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await; // the Job's work
        common::complete_job(&jobs, &name).await;
        intervals.insert(name, (started, Instant::now()));
    }
    let mut spans: Vec<_> = intervals.values().collect();
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "no two Jobs ran at once: {spans:?}"
    );
    let order: Vec<_> = fencing.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(order, names, "Jobs start in creation order");
    assert!(
        fencing.windows(2).all(|w| w[0].1 < w[1].1),
        "fencing tokens grow: {fencing:?}"
    );
    // the requests belong to their Jobs and were released
    for name in names {
        let r = await_lock(&requests, name, "Released", WAIT, |l| {
            phase_of(l) == Some(Phase::Released)
        })
        .await;
        assert_eq!(r.metadata.owner_references.unwrap()[0].name, name);
    }
}

#[tokio::test]
async fn gated_jobs_created_at_the_same_moment_start_in_creation_order() {
    let Some((client, ns, run, _operator)) = setup("gated-burst").await else {
        return;
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = (1..=4).map(|i| format!("burst-{i}")).collect();
    // no pause between them: the requests of later Jobs may exist before
    // those of earlier ones
    for name in &names {
        jobs.create(&PostParams::default(), &gated_job(&run, name, "burst", true))
            .await
            .unwrap();
    }
    for name in &names {
        let running = common::eventually(&format!("{name} to start"), WAIT, || async {
            let all = jobs.list(&Default::default()).await.ok()?.items;
            let started: Vec<String> = all
                .iter()
                .filter(|j| {
                    j.spec.as_ref().and_then(|s| s.suspend) == Some(false)
                        && j.status.as_ref().and_then(|s| s.succeeded).is_none()
                })
                .map(|j| j.metadata.name.clone().unwrap())
                .collect();
            (!started.is_empty()).then_some(started)
        })
        .await;
        assert_eq!(running, vec![name.clone()], "one Job at a time, in creation order");
        common::complete_job(&jobs, name).await;
    }
}

#[tokio::test]
async fn a_holder_job_without_the_selector_labels_releases_when_it_completes() {
    let Some((client, ns, run, _operator)) = setup("unlabelled-holder").await else {
        return;
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let requests: Api<DistributedLock> = Api::namespaced(client.clone(), &ns);
    // the operator runs with --selector; the holder Job carries no labels at all
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "plain"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    // renewals every 30 s: only the Job's own event can release it sooner
    let holder = json!({"lockId": "k", "ttl": "2m", "holderRef": {"kind": "Job", "name": "plain"}});
    requests
        .create(&PostParams::default(), &lock_request(&run, "holder", holder))
        .await
        .unwrap();
    requests
        .create(
            &PostParams::default(),
            &lock_request(&run, "next", json!({"lockId": "k"})),
        )
        .await
        .unwrap();
    await_lock(&requests, "holder", "Granted", WAIT, |l| {
        phase_of(l) == Some(Phase::Granted)
    })
    .await;
    common::complete_job(&jobs, "plain").await;
    await_lock(
        &requests,
        "next",
        "Granted within 10 s of the Job's completion",
        Duration::from_secs(10),
        |l| phase_of(l) == Some(Phase::Granted),
    )
    .await;
}

#[tokio::test]
async fn deleting_a_waiting_job_removes_its_request_and_shifts_the_queue() {
    let Some((client, ns, run, _operator)) = setup("gated-delete").await else {
        return;
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let requests: Api<DistributedLock> = Api::namespaced(client.clone(), &ns);
    for name in ["first", "second", "third"] {
        jobs.create(&PostParams::default(), &gated_job(&run, name, "shared", true))
            .await
            .unwrap();
        // one at a time, so the queue order is the creation order
        await_lock(&requests, name, "queued", WAIT, |l| phase_of(l).is_some()).await;
    }
    await_lock(&requests, "third", "second in line", WAIT, |l| {
        l.status.as_ref().and_then(|s| s.waiting_position) == Some(2)
    })
    .await;
    jobs.delete("second", &DeleteParams::background()).await.unwrap();
    common::eventually("the deleted Job's request to go", WAIT, || async {
        requests.get_opt("second").await.unwrap().is_none().then_some(())
    })
    .await;
    await_lock(&requests, "third", "next in line", WAIT, |l| {
        l.status.as_ref().and_then(|s| s.waiting_position) == Some(1)
    })
    .await;
}

#[tokio::test]
async fn an_annotated_job_that_is_not_suspended_gets_a_warning() {
    let Some((client, ns, run, _operator)) = setup("not-gated").await else {
        return;
    };
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    jobs.create(&PostParams::default(), &gated_job(&run, "eager", "x", false))
        .await
        .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let event = common::eventually("a NotGated warning", WAIT, || async {
        events
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("NotGated"))
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(event.note.unwrap_or_default().contains("spec.suspend"));
    let requests: Api<DistributedLock> = Api::namespaced(client, &ns);
    assert!(
        requests.get_opt("eager").await.unwrap().is_none(),
        "no request for an ungated Job"
    );
}

fn wait_cmd(
    kubeconfig: &str,
    ns: &str,
    name: &str,
    timeout: &str,
    token_file: &std::path::Path,
) -> std::process::Output {
    common::lockctl()
        .env("KUBECONFIG", kubeconfig)
        .args(["wait", name, "-n", ns, "--timeout", timeout])
        .arg("--token-file")
        .arg(token_file)
        .output()
        .unwrap()
}

#[tokio::test]
async fn lockctl_wait_hands_over_the_token_or_says_why_not() {
    let Some((client, ns, run, _operator)) = setup("wait").await else {
        return;
    };
    let kubeconfig = std::env::var("KUBECONFIG").unwrap();
    let requests: Api<DistributedLock> = Api::namespaced(client.clone(), &ns);
    let dir = tempfile::tempdir().unwrap();

    // granted: exit 0, token files written
    requests
        .create(
            &PostParams::default(),
            &lock_request(&run, "holder", json!({"lockId": "w"})),
        )
        .await
        .unwrap();
    let out = wait_cmd(&kubeconfig, &ns, "holder", "20s", &dir.path().join("token"));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let granted = requests.get("holder").await.unwrap().status.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("token")).unwrap(),
        granted.token.unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("fencing-token")).unwrap(),
        granted.fencing_token.unwrap().to_string()
    );
    let grant: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("lock.json")).unwrap()).unwrap();
    assert_eq!(grant["fencingToken"], granted.fencing_token.unwrap());
    // already granted: no time needed at all
    let out = wait_cmd(&kubeconfig, &ns, "holder", "0s", &dir.path().join("token0"));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // a waiter that is granted while lockctl waits: it was watching, not polling
    requests
        .create(
            &PostParams::default(),
            &lock_request(&run, "next", json!({"lockId": "w"})),
        )
        .await
        .unwrap();
    let waiter = {
        let (kubeconfig, ns, file) = (kubeconfig.clone(), ns.clone(), dir.path().join("next-token"));
        tokio::task::spawn_blocking(move || wait_cmd(&kubeconfig, &ns, "next", "20s", &file))
    };
    await_lock(&requests, "next", "queued", WAIT, |l| {
        phase_of(l) == Some(Phase::Pending)
    })
    .await;
    requests.delete("holder", &DeleteParams::default()).await.unwrap();
    let out = waiter.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));

    // timeout: exit 124 and a message that says so
    requests
        .create(
            &PostParams::default(),
            &lock_request(&run, "stuck", json!({"lockId": "w"})),
        )
        .await
        .unwrap();
    let out = wait_cmd(&kubeconfig, &ns, "stuck", "1s", &dir.path().join("t"));
    assert_eq!(out.status.code(), Some(124));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("timed out"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Failed: exit 1 with the reason
    requests
        .create(
            &PostParams::default(),
            &lock_request(&run, "doomed", json!({"lockId": "w", "acquireTimeout": "1s"})),
        )
        .await
        .unwrap();
    let out = wait_cmd(&kubeconfig, &ns, "doomed", "20s", &dir.path().join("d"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed") && err.contains("Timeout"), "{err}");

    // a missing object is waited for (an init-container may start first):
    // a timeout says it never appeared ...
    let out = wait_cmd(&kubeconfig, &ns, "no-such-lock", "1s", &dir.path().join("m"));
    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    // ... and one created while lockctl waits is granted
    let mut early = common::lockctl()
        .env("KUBECONFIG", &kubeconfig)
        .args(["wait", "late", "-n", &ns, "--timeout", "30s"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(early.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("does not exist yet"), "{line}");
    requests
        .create(
            &PostParams::default(),
            &lock_request(&run, "late", json!({"lockId": "w-late"})),
        )
        .await
        .unwrap();
    let status = tokio::task::spawn_blocking(move || early.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    // deletion while waiting: exit 1
    let mut waiter = common::lockctl()
        .env("KUBECONFIG", &kubeconfig)
        .args(["wait", "stuck", "-n", &ns, "--timeout", "20s"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(waiter.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
    assert!(line.contains("waiting for"), "{line}");
    requests.delete("stuck", &DeleteParams::default()).await.unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(waiter.wait().unwrap().code(), Some(1));
    assert!(rest.contains("deleted"), "{rest}");
}

/// A kubeconfig that authenticates as a ServiceAccount (token from the TokenRequest API).
async fn service_account_kubeconfig(ns: &str, sa: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let out = std::process::Command::new("kubectl")
        .args(["create", "token", sa, "-n", ns])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let admin: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(std::env::var("KUBECONFIG").unwrap()).unwrap()).unwrap();
    let cluster = admin["clusters"][0]["cluster"].clone();
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": serde_json::to_value(cluster).unwrap()}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa, "namespace": ns}}],
        "current-context": "c"
    });
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

#[tokio::test]
async fn lockctl_wait_needs_the_lock_waiter_role() {
    let Some((client, ns, run, _operator)) = setup("wait-rbac").await else {
        return;
    };
    let out = std::process::Command::new("kubectl")
        .args(["apply", "-f", "examples/rbac/lock-waiter.yaml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some("worker".into());
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let requests: Api<DistributedLock> = Api::namespaced(client.clone(), &ns);
    requests
        .create(
            &PostParams::default(),
            &lock_request(&run, "job-lock", json!({"lockId": "rbac"})),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = service_account_kubeconfig(&ns, "worker", dir.path()).await;
    let kubeconfig = kubeconfig.to_str().unwrap();

    let out = wait_cmd(kubeconfig, &ns, "job-lock", "10s", &dir.path().join("token"));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not allowed") && err.contains("lock-waiter"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &ns);
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "worker-lock-waiter"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "lock-waiter"},
        "subjects": [{"kind": "ServiceAccount", "name": "worker", "namespace": ns}]
    }))
    .unwrap();
    bindings.create(&PostParams::default(), &binding).await.unwrap();
    let out = common::eventually("the binding to take effect", WAIT, || {
        let (kubeconfig, ns, file) = (kubeconfig.to_string(), ns.clone(), dir.path().join("token"));
        async move {
            let out = wait_cmd(&kubeconfig, &ns, "job-lock", "10s", &file);
            (out.status.code() == Some(0)).then_some(out)
        }
    })
    .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("granted"));
}

#[tokio::test]
async fn every_example_passes_server_side_dry_run() {
    if common::services().is_none() {
        return;
    }
    let client = kube::Client::try_default().await.unwrap();
    common::install_crd(&client).await;
    for ns in ["lock-demo", "kube-lock-manager"] {
        let _ = std::process::Command::new("kubectl")
            .args(["create", "namespace", ns])
            .output();
    }
    let mut files: Vec<_> = walk(std::path::Path::new("examples"));
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    assert!(files.len() >= 8, "examples found: {files:?}");
    for file in files {
        let out = std::process::Command::new("kubectl")
            .args(["apply", "--dry-run=server", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} failed server-side dry run: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}
