//! Hostile input: property tests of lock ids, TTLs, durations and metadata,
//! through the parsers, the CLI (against the real search node) and the CRD
//! (against the real API server). Every bad input gets a clear error and
//! nothing is written; every accepted input round-trips.

mod common;

use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube_lock_manager::crd::DistributedLock;
use kube_lock_manager::duration::{DURATION_PATTERN, format_duration, parse_duration};
use kube_lock_manager::lock::validate_lock_id;
use proptest::prelude::*;
use serde_json::{Value, json};

fn json_value() -> impl Strategy<Value = Value> {
    // No nulls: Kubernetes drops null fields, so they cannot round-trip there.
    let leaf = prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "\\PC{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,8}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn lock_id() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9._:-]{1,40}",
        "[A-Za-z0-9._:/-]{1,40}",
        "\\PC{0,30}",
        Just(String::new()),
        Just("x".repeat(513)),
        Just("a b".into()),
        Just("ünïcödé".into()),
        Just(".".into()),
        Just("..".into()),
    ]
}

fn ttl() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{1,3}(ms|s|m|h)",
        "[0-9]{1,2}h[0-9]{1,2}m",
        "[0-9]{1,2}\\.[0-9]s",
        "\\PC{0,8}",
        Just("0s".into()),
        Just("25h".into()),
        Just("-1s".into()),
        Just("8761h".into()),
    ]
}

proptest! {
    #[test]
    fn durations_never_panic_and_accept_exactly_the_crd_pattern(text in "\\PC{0,12}|[0-9.]{1,4}(ms|s|m|h){1,3}") {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        let parsed = parse_duration(&text);
        prop_assert_eq!(parsed.is_ok(), pattern.is_match(&text), "{:?}", text);
        if let Ok(d) = parsed {
            // what we print, we read back
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap().as_millis(), d.as_millis());
        } else {
            prop_assert!(parsed.unwrap_err().contains("invalid duration"));
        }
    }

    #[test]
    fn lock_ids_are_refused_with_their_name(id in lock_id()) {
        let ok = !id.is_empty() && id.len() <= 512
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b".-_:/".contains(&b))
            && !id.split('/').any(|part| part == "." || part == "..");
        match validate_lock_id(&id) {
            Ok(()) => prop_assert!(ok),
            Err(e) => {
                prop_assert!(!ok);
                prop_assert!(e.to_string().contains("invalid lock id"));
            }
        }
    }
}

fn ttl_accepted_by_cli(ttl: &str) -> bool {
    parse_duration(ttl).is_ok_and(|d| !d.is_zero() && d <= Duration::from_secs(365 * 86400))
}

#[test]
fn cli_refuses_bad_input_without_writing_and_round_trips_good_input() {
    let Some(url) = common::es_url() else { return };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    let strategy = (lock_id(), ttl(), json_value(), any::<u16>());
    runner
        .run(&strategy, |(id, ttl, metadata, salt)| {
            // a unique prefix keeps cases apart; invalid ids stay invalid
            let id = if validate_lock_id(&id).is_ok() {
                format!("hostile-{salt}-{id}")
            } else {
                id
            };
            let metadata_text = metadata.to_string();
            let sent = std::time::Instant::now();
            let out = common::lockctl()
                .env("ELASTICSEARCH_URL", &url)
                .args([
                    "acquire",
                    &id,
                    "--ttl",
                    &ttl,
                    "--metadata",
                    &metadata_text,
                    "-o",
                    "json",
                ])
                .output()
                .unwrap();
            let valid = validate_lock_id(&id).is_ok() && ttl_accepted_by_cli(&ttl) && metadata.is_object();
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            if valid {
                prop_assert_eq!(
                    out.status.code(),
                    Some(0),
                    "{} {} {}: {}",
                    id,
                    ttl,
                    metadata_text,
                    stderr
                );
                let lock: Value = serde_json::from_slice(&out.stdout).unwrap();
                prop_assert_eq!(&lock["metadata"], &metadata);
                let got = common::lockctl()
                    .env("ELASTICSEARCH_URL", &url)
                    .args(["get", &id])
                    .output()
                    .unwrap();
                // A TTL of a few ms may run out before the get: then, and
                // only then, the lock is gone.
                let lease = parse_duration(&ttl).unwrap();
                let lapsed = || sent.elapsed() >= lease;
                if got.status.code() == Some(1) && lapsed() {
                    return Ok(());
                }
                prop_assert_eq!(
                    got.status.code(),
                    Some(0),
                    "a live lock {} ({}) is found: {}",
                    id,
                    ttl,
                    String::from_utf8_lossy(&got.stderr)
                );
                let seen: Value = serde_json::from_slice(&got.stdout).unwrap();
                prop_assert_eq!(&seen["metadata"], &metadata, "metadata round-trips");
                let token = lock["token"].as_str().unwrap();
                let rel = common::lockctl()
                    .env("ELASTICSEARCH_URL", &url)
                    .args(["release", &id, "--token", token])
                    .output()
                    .unwrap();
                prop_assert!(
                    rel.status.code() == Some(0) || (rel.status.code() == Some(1) && lapsed()),
                    "release of {} ({}): {:?}",
                    id,
                    ttl,
                    rel.status
                );
            } else {
                prop_assert_eq!(
                    out.status.code(),
                    Some(2),
                    "{:?} {:?} {}: {}",
                    id,
                    ttl,
                    metadata_text,
                    stderr
                );
                prop_assert_eq!(stderr.trim().lines().count(), 1, "one line: {:?}", stderr);
                prop_assert!(stderr.starts_with("lockctl: error:"), "{:?}", stderr);
                if validate_lock_id(&id).is_ok() {
                    let got = common::lockctl()
                        .env("ELASTICSEARCH_URL", &url)
                        .args(["get", &id])
                        .output()
                        .unwrap();
                    prop_assert_eq!(got.status.code(), Some(1), "nothing was written for {}", id);
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn cli_handles_non_utf8_deep_and_huge_input() {
    let Some(url) = common::es_url() else { return };
    use std::os::unix::ffi::OsStrExt;
    let out = common::lockctl()
        .env("ELASTICSEARCH_URL", &url)
        .arg("acquire")
        .arg(std::ffi::OsStr::from_bytes(b"bad\xffid"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim().lines().count(), 1);

    let mut deep = json!({"leaf": true});
    for i in 0..64 {
        deep = json!({format!("l{i}"): deep});
    }
    // larger than one command-line argument may be: passed as @FILE
    let huge = json!({"blob": "x".repeat(1024 * 1024)});
    let dir = tempfile::tempdir().unwrap();
    for (name, metadata) in [("deep", deep), ("huge", huge)] {
        let id = common::unique(name);
        let file = dir.path().join(name);
        std::fs::write(&file, metadata.to_string()).unwrap();
        let out = common::lockctl()
            .env("ELASTICSEARCH_URL", &url)
            .args(["acquire", &id, "-o", "json"])
            .arg(format!("--metadata=@{}", file.display()))
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = common::lockctl()
            .env("ELASTICSEARCH_URL", &url)
            .args(["get", &id])
            .output()
            .unwrap();
        let seen: Value = serde_json::from_slice(&got.stdout).unwrap();
        assert_eq!(seen["metadata"], metadata, "{name} metadata round-trips");
    }
}

/// What the API server should accept, by the contract.
fn crd_accepts(lock_id: &str, ttl: Option<&str>, priority: Option<i64>, acquire_timeout: Option<&str>) -> bool {
    let id_ok = !lock_id.is_empty()
        && lock_id.chars().count() <= 200
        && lock_id != "."
        && lock_id != ".."
        && lock_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    let priority_ok = priority.is_none_or(|p| i32::try_from(p).is_ok());
    let timeout_ok = acquire_timeout.is_none_or(|t| {
        regex::Regex::new(DURATION_PATTERN).unwrap().is_match(t)
            && parse_duration(t).is_ok_and(|d| d <= Duration::from_secs(8760 * 3600))
    });
    let ttl_ok = match ttl {
        None => true,
        Some(t) => {
            regex::Regex::new(DURATION_PATTERN).unwrap().is_match(t)
                && parse_duration(t).is_ok_and(|d| d >= Duration::from_secs(1) && d <= Duration::from_secs(86400))
        }
    };
    id_ok && ttl_ok && priority_ok && timeout_ok
}

/// Priorities around and beyond the int32 bounds.
fn priority() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i32>().prop_map(i64::from),
        Just(i64::from(i32::MAX) + 1),
        Just(i64::from(i32::MIN) - 1),
        Just(3_000_000_000),
        any::<i64>(),
    ]
}

#[test]
fn the_api_server_enforces_the_same_rules_and_accepted_specs_round_trip() {
    if common::services().is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (client, ns) = rt.block_on(async {
        let client = kube::Client::try_default().await.unwrap();
        common::install_crd(&client).await;
        let ns = common::namespace(&client, "hostile").await;
        (client, ns)
    });
    let resource = ApiResource::erase::<DistributedLock>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let typed: Api<DistributedLock> = Api::namespaced(client, &ns);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 48,
        ..ProptestConfig::default()
    });
    let strategy = (
        lock_id(),
        prop::option::of(ttl()),
        json_value(),
        any::<u32>(),
        prop::option::of(priority()),
        prop::option::of(ttl()),
    );
    runner
        .run(&strategy, |(lock_id, ttl, metadata, n, priority, acquire_timeout)| {
            let name = format!("h{n}");
            let mut spec = json!({"lockId": lock_id});
            if let Some(t) = &ttl {
                spec["ttl"] = json!(t);
            }
            if let Some(p) = priority {
                spec["priority"] = json!(p);
            }
            if let Some(t) = &acquire_timeout {
                spec["acquireTimeout"] = json!(t);
            }
            let object_metadata = if metadata.is_object() {
                Some(metadata.clone())
            } else {
                None
            };
            if let Some(m) = &object_metadata {
                spec["metadata"] = m.clone();
            }
            let mut object = DynamicObject::new(&name, &resource);
            object.data = json!({"spec": spec});
            let result = rt.block_on(raw.create(&PostParams::default(), &object));
            let expected = crd_accepts(&lock_id, ttl.as_deref(), priority, acquire_timeout.as_deref());
            match result {
                Ok(_) => {
                    prop_assert!(expected, "accepted {}", spec);
                    let back = rt.block_on(typed.get(&name)).unwrap();
                    prop_assert_eq!(&back.spec.lock_id, &lock_id);
                    prop_assert_eq!(back.spec.ttl.as_deref(), ttl.as_deref());
                    prop_assert_eq!(
                        back.spec.metadata.as_ref().map(|m| m.to_value().unwrap()),
                        object_metadata.clone(),
                        "metadata round-trips"
                    );
                    prop_assert!(
                        back.spec.ttl().is_ok(),
                        "the controller can read what the API server accepted"
                    );
                    rt.block_on(typed.delete(&name, &Default::default())).unwrap();
                }
                Err(kube::Error::Api(status)) => {
                    prop_assert!(!expected, "rejected {}: {}", spec, status.message);
                    prop_assert!(status.message.contains("spec."), "names the field: {}", status.message);
                    prop_assert!(rt.block_on(typed.get_opt(&name)).unwrap().is_none(), "nothing written");
                }
                Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
            }
            Ok(())
        })
        .unwrap();
}
