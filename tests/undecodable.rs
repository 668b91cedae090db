//! One request the controller cannot decode must not hurt the others: it is
//! reported (Warning event) and skipped, the operator stays ready, grants go
//! on, and SIGTERM still stops it. (Its own test binary: it loosens the CRD's
//! schema for a moment to store such an object, as an older CRD would have.)

mod common;

use std::time::Duration;

use common::{Setup, WAIT};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube_lock_manager::crd::DistributedLock;
use serde_json::json;

// One test: both change what every operator lists in the cluster, so they
// run one after the other.
#[tokio::test]
async fn requests_the_operator_cannot_use_hurt_no_other() {
    an_undecodable_request_is_reported_and_skipped_while_others_are_served().await;
    metadata_nested_too_deep_fails_its_request_and_nothing_else().await;
}

async fn an_undecodable_request_is_reported_and_skipped_while_others_are_served() {
    let Some(mut t) = Setup::new("undecodable", &[]).await else {
        return;
    };
    t.operator.kill();
    // Store a request with a priority outside int32, as the first release's
    // schema (no bounds) allowed.
    let crds: Api<CustomResourceDefinition> = Api::all(t.client.clone());
    let priority = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/priority";
    let loosen = json!([
        {"op": "remove", "path": format!("{priority}/maximum")},
        {"op": "remove", "path": format!("{priority}/minimum")},
        {"op": "remove", "path": format!("{priority}/format")}
    ]);
    crds.patch(
        "distributedlocks.lockmanager.dev",
        &PatchParams::default(),
        &Patch::<()>::Json(serde_json::from_value(loosen).unwrap()),
    )
    .await
    .unwrap();
    let resource = ApiResource::erase::<DistributedLock>(&());
    let dynamic: Api<DynamicObject> = Api::namespaced_with(t.client.clone(), &t.ns, &resource);
    let bad: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "lockmanager.dev/v1alpha1", "kind": "DistributedLock",
        "metadata": {"name": "huge", "labels": {common::RUN_LABEL: t.run}},
        "spec": {"lockId": "shared", "priority": 3_000_000_000u64}
    }))
    .unwrap();
    common::eventually("the loosened schema to admit priority 3000000000", WAIT, || async {
        dynamic.create(&PostParams::default(), &bad).await.ok()
    })
    .await;
    common::install_crd(&t.client).await;

    // The operator starts with that object in the cluster.
    t.operator.restart();
    t.create("fine", json!({"lockId": "shared"})).await;
    t.granted("fine").await;
    let warning = t.event("huge", "InvalidObject").await;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.note.unwrap_or_default().contains("cannot read this request"));
    let ready = reqwest::get(format!("http://127.0.0.1:{}/readyz", t.operator.http_port))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap_or_default());
    assert!(
        t.operator
            .metrics()
            .await
            .contains("lockmanager_undecodable_objects_total 1")
    );

    // SIGTERM stops it promptly.
    let pid = nix::unistd::Pid::from_raw(t.operator.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exited = common::eventually("the operator to exit after SIGTERM", Duration::from_secs(15), || {
        let status = t.operator.child.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(exited.success(), "{exited:?}");
    dynamic.delete("huge", &Default::default()).await.unwrap();
}

async fn metadata_nested_too_deep_fails_its_request_and_nothing_else() {
    let Some(mut t) = Setup::new("deep-metadata", &[]).await else {
        return;
    };
    // 125 levels: the API server stores it; serde_json's default limit is 128
    let raw = format!(
        r#"{{"apiVersion":"lockmanager.dev/v1alpha1","kind":"DistributedLock",
        "metadata":{{"name":"deep","labels":{{"{}":"{}"}}}},
        "spec":{{"lockId":"shared","metadata":{}{{}}{}}}}}"#,
        common::RUN_LABEL,
        t.run,
        r#"{"a":"#.repeat(125),
        "}".repeat(125)
    );
    // created through kubectl: the Rust client itself cannot encode what it cannot decode
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), raw).unwrap();
    let out = std::process::Command::new("kubectl")
        .args(["create", "-n", &t.ns, "-f"])
        .arg(file.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    t.create("fine", json!({"lockId": "shared"})).await;
    t.granted("fine").await;
    // the deep one is told why it will never be granted
    common::eventually("the deep request to fail naming spec.metadata", WAIT, || async {
        let out = std::process::Command::new("kubectl")
            .args([
                "get",
                "lock",
                "deep",
                "-n",
                &t.ns,
                "-o",
                "jsonpath={.status.phase} {.status.conditions[?(@.type==\"Granted\")].message}",
            ])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        (text.starts_with("Failed") && text.contains("spec.metadata")).then_some(())
    })
    .await;
    // a restart lists it again: the operator becomes ready and keeps serving
    t.operator.restart();
    common::eventually("the restarted operator to be ready", WAIT, || async {
        let url = format!("http://127.0.0.1:{}/readyz", t.operator.http_port);
        reqwest::get(url).await.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    t.delete("fine").await;
    t.create("after", json!({"lockId": "shared"})).await;
    t.granted("after").await;
    // and its deletion completes (the finalizer is removed)
    let out = std::process::Command::new("kubectl")
        .args(["delete", "lock", "deep", "-n", &t.ns, "--wait=false"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    common::eventually("the deep request to be gone", WAIT, || async {
        let out = std::process::Command::new("kubectl")
            .args(["get", "lock", "deep", "-n", &t.ns, "--ignore-not-found", "-o", "name"])
            .output()
            .ok()?;
        (out.status.success() && out.stdout.is_empty()).then_some(())
    })
    .await;
}
