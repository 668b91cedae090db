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

#[tokio::test]
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
