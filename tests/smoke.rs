//! Proves the wiring of the test environment: the `kube` client against the real
//! kube-apiserver, the `elasticsearch` client against the real search node.

mod common;

use std::time::Duration;

use elasticsearch::indices::IndicesCreateParts;
use elasticsearch::{GetParts, UpdateParts};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::json;

#[tokio::test]
async fn kube_client_applies_a_crd_creates_an_object_and_patches_its_status() {
    if !common::kube_available() {
        return;
    }
    let client = kube::Client::try_default().await.expect("kubeconfig from testenv");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.lockmanager.dev"},
        "spec": {
            "group": "smoke.lockmanager.dev",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
                }}}
            }]
        }
    }))
    .unwrap();
    crds.patch(
        "widgets.smoke.lockmanager.dev",
        &PatchParams::apply("smoke-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    common::eventually("the CRD to be established", Duration::from_secs(30), || async {
        let crd = crds.get("widgets.smoke.lockmanager.dev").await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;

    let gvk = GroupVersionKind::gvk("smoke.lockmanager.dev", "v1", "Widget");
    let resource = ApiResource::from_gvk(&gvk);
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);
    let name = common::unique("widget");
    let mut widget = DynamicObject::new(&name, &resource);
    widget.data = json!({"spec": {"size": 3}});
    // The API server may need a moment before it serves a just-established CRD.
    common::eventually("the widget to be created", Duration::from_secs(30), || async {
        widgets.create(&PostParams::default(), &widget).await.ok()
    })
    .await;
    let read = widgets.get(&name).await.expect("read back");
    assert_eq!(read.data["spec"]["size"], 3);

    let status = json!({"status": {"phase": "Ready"}});
    widgets
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch status subresource");
    let read = widgets.get(&name).await.expect("read back");
    assert_eq!(read.data["status"]["phase"], "Ready");
    assert_eq!(read.data["spec"]["size"], 3, "status patch must not touch spec");
}

#[tokio::test]
async fn elasticsearch_client_runs_a_painless_scripted_upsert() {
    let Some(url) = common::es_url() else { return };
    let client = common::lock_client(&url, "smoke");
    let es = client.elasticsearch();
    let index = common::unique("smoke");
    let created = es
        .indices()
        .create(IndicesCreateParts::Index(&index))
        .body(json!({"settings": {"number_of_shards": 1, "number_of_replicas": 0}}))
        .send()
        .await
        .expect("create index");
    assert!(
        created.status_code().is_success(),
        "create index: {}",
        created.status_code()
    );

    let script = "if (ctx.op == 'create') { ctx._source.owner = params.owner; } else { ctx.op = 'noop'; }";
    let upsert = |owner: &'static str| {
        json!({
            "scripted_upsert": true,
            "upsert": {},
            "script": {"lang": "painless", "source": script, "params": {"owner": owner}}
        })
    };
    let first: serde_json::Value = es
        .update(UpdateParts::IndexId(&index, "doc"))
        .body(upsert("first"))
        .send()
        .await
        .expect("first upsert")
        .json()
        .await
        .unwrap();
    assert_eq!(first["result"], "created", "{first}");
    let second: serde_json::Value = es
        .update(UpdateParts::IndexId(&index, "doc"))
        .body(upsert("second"))
        .send()
        .await
        .expect("second upsert")
        .json()
        .await
        .unwrap();
    assert_eq!(second["result"], "noop", "{second}");
    let doc: serde_json::Value = es
        .get(GetParts::IndexId(&index, "doc"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .unwrap();
    assert_eq!(doc["_source"]["owner"], "first", "the script's params were read: {doc}");
}
