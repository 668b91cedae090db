//! `lockctl acquire | release | extend | get | exec` as a user runs them,
//! against the real search node.

mod common;

use common::cli::{stderr, stdout};

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PREFIX: &str = "clitest";

fn lockctl(url: &str) -> Command {
    common::cli::lockctl_at(url, PREFIX)
}

fn run(url: &str, args: &[&str]) -> Output {
    common::cli::run_at(url, PREFIX, args)
}

#[test]
fn acquire_get_extend_release_with_their_exit_codes() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("cli");
    let out = run(
        &url,
        &[
            "acquire",
            &id,
            "--ttl",
            "30s",
            "--metadata",
            r#"{"owner":"ops"}"#,
            "-o",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lock: Value = serde_json::from_str(&stdout(&out)).expect("JSON output");
    for field in ["lockId", "token", "fencingToken", "createdAt", "expiresAt", "metadata"] {
        assert!(lock.get(field).is_some(), "{field} missing in {lock}");
    }
    assert_eq!(lock["metadata"]["owner"], "ops");
    let token = lock["token"].as_str().unwrap().to_string();

    let out = run(&url, &["acquire", &id]);
    assert_eq!(out.status.code(), Some(1), "held by someone else");
    assert!(stderr(&out).contains("held by someone else"), "{}", stderr(&out));

    let out = run(&url, &["get", &id]);
    assert_eq!(out.status.code(), Some(0));
    let seen: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(seen["token"], token.as_str());
    assert_eq!(seen["fencingToken"], lock["fencingToken"]);

    assert_eq!(run(&url, &["extend", &id, "--token", "wrong"]).status.code(), Some(1));
    assert_eq!(
        run(&url, &["extend", &id, "--token", &token, "--ttl", "1m"])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(run(&url, &["release", &id, "--token", "wrong"]).status.code(), Some(1));
    assert_eq!(run(&url, &["release", &id, "--token", &token]).status.code(), Some(0));
    assert_eq!(run(&url, &["release", &id, "--token", &token]).status.code(), Some(1));
    let out = run(&url, &["get", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("no live lock"), "{}", stderr(&out));
}

#[test]
fn bad_input_is_one_clear_line_and_exit_2() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("bad");
    let cases: [(&[&str], &str); 6] = [
        (&["acquire", &id, "--ttl", "soon"], "invalid duration"),
        (&["acquire", &id, "--metadata", "{not json"], "invalid JSON"),
        (&["acquire", &id, "--metadata", "[1,2]"], "JSON object"),
        (&["acquire", "has space"], "invalid lock id"),
        (&["acquire", &id, "--es-url", "http://127.0.0.1:1"], "unreachable"),
        (&["acquire", &id, "--index-prefix", "UPPER"], "--index-prefix"),
    ];
    for (args, expected) in cases {
        let out = run(&url, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: {err:?} should mention {expected:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // nothing was written for any of them
    assert_eq!(run(&url, &["get", &id]).status.code(), Some(1));
}

#[test]
fn exec_runs_the_command_with_the_lock_and_exits_with_its_code() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("exec");
    let out = lockctl(&url)
        .args(["exec", &id, "--", "sh", "-c", "echo \"$LOCK_FENCING_TOKEN\"; exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    assert!(
        stdout(&out).parse::<u64>().is_ok(),
        "the command saw its fencing token: {}",
        stdout(&out)
    );
    assert_eq!(
        run(&url, &["get", &id]).status.code(),
        Some(1),
        "released after the command"
    );

    // held by someone else → 75 and the command never runs
    let holder = stdout(&run(&url, &["acquire", &id]));
    let marker = tempfile::NamedTempFile::new().unwrap();
    let out = lockctl(&url)
        .args([
            "exec",
            &id,
            "--",
            "sh",
            "-c",
            &format!("echo ran > {}", marker.path().display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75));
    assert_eq!(
        std::fs::read_to_string(marker.path()).unwrap(),
        "",
        "the command did not run"
    );
    assert_eq!(run(&url, &["release", &id, "--token", &holder]).status.code(), Some(0));
}

#[test]
fn two_concurrent_execs_never_overlap() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("overlap");
    let dir = tempfile::tempdir().unwrap();
    let script = |name: &str| {
        let log = dir.path().join(name);
        format!(
            "date +%s%N > {log}.start; sleep 0.5; date +%s%N > {log}.end",
            log = log.display()
        )
    };
    let spawn = |name: &str| {
        lockctl(&url)
            .args([
                "exec",
                &id,
                "--ttl",
                "2s",
                "--wait",
                "20s",
                "--",
                "sh",
                "-c",
                &script(name),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("a"), spawn("b"));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let read = |file: &str| -> u128 {
        std::fs::read_to_string(dir.path().join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (a_start, a_end, b_start, b_end) = (read("a.start"), read("a.end"), read("b.start"), read("b.end"));
    let disjoint = a_end <= b_start || b_end <= a_start;
    assert!(disjoint, "runs overlapped: a {a_start}..{a_end}, b {b_start}..{b_end}");
}

#[test]
fn exec_keeps_renewing_a_short_lease_and_forwards_sigterm() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("sigterm");
    let mut child = lockctl(&url)
        .args([
            "exec",
            &id,
            "--ttl",
            "1s",
            "--",
            "sh",
            "-c",
            "trap 'exit 42' TERM; while true; do sleep 0.1; done",
        ])
        .spawn()
        .unwrap();
    // wait until the lock is taken, then past two of its TTLs
    let deadline = Instant::now() + Duration::from_secs(10);
    while run(&url, &["get", &id]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "exec never took the lock");
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        run(&url, &["get", &id]).status.code(),
        Some(0),
        "lease renewed while the command runs"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(42), "the child got SIGTERM and its code is ours");
    assert_eq!(
        run(&url, &["get", &id]).status.code(),
        Some(1),
        "released after SIGTERM"
    );
}

#[test]
fn extend_of_an_expired_lease_exits_1_saying_it_expired() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("cli-expired");
    let out = run(&url, &["acquire", &id, "--ttl", "1s"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = stdout(&out);
    let deadline = Instant::now() + Duration::from_secs(5);
    while run(&url, &["get", &id]).status.code() != Some(1) {
        assert!(Instant::now() < deadline, "the lease never ran out");
    }
    let out = run(&url, &["extend", &id, "--token", &token, "--ttl", "30s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("expired"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(run(&url, &["get", &id]).status.code(), Some(1), "not revived");
}

#[test]
fn printable_ascii_ids_round_trip_or_are_refused_with_exit_2() {
    let Some(url) = common::es_url() else { return };
    let base = common::unique("cli-ascii");
    let mut ids: Vec<String> = (0x20u8..0x7f).map(|c| format!("{base}a{}b", char::from(c))).collect();
    ids.extend([".", "..", "ns/..", "ns/."].map(String::from));
    for id in ids {
        let out = run(&url, &["acquire", &id, "-o", "json"]);
        let err = stderr(&out);
        assert!(!err.contains("HTTP 400") && !err.contains("decode"), "{id:?}: {err}");
        match out.status.code() {
            Some(0) => {
                let lock: Value = serde_json::from_str(&stdout(&out)).unwrap();
                assert_eq!(lock["lockId"], id.as_str());
                let got = run(&url, &["get", &id]);
                assert_eq!(got.status.code(), Some(0), "{id:?}: {}", stderr(&got));
                let seen: Value = serde_json::from_str(&stdout(&got)).unwrap();
                assert_eq!(
                    (&seen["lockId"], &seen["token"]),
                    (&lock["lockId"], &lock["token"]),
                    "{id:?}"
                );
                let token = lock["token"].as_str().unwrap();
                assert_eq!(run(&url, &["release", &id, "--token", token]).status.code(), Some(0));
            }
            Some(2) => {
                assert!(
                    err.contains("invalid lock id") && err.contains(&format!("{id:?}")),
                    "{id:?}: {err}"
                );
                assert_eq!(err.lines().count(), 1, "{id:?}: {err}");
            }
            other => panic!("{id:?}: exit {other:?}: {err}"),
        }
    }
    for bad in [".", "..", &format!("{base}/..")] {
        assert_eq!(run(&url, &["acquire", bad]).status.code(), Some(2), "{bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lock_index_refuses_grants_until_an_admin_recovers() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("cli-fence");
    let cli = |args: &[&str]| {
        let mut cmd = lockctl(&url);
        cmd.env("LOCK_INDEX_PREFIX", &prefix).args(args);
        cmd.output().expect("run lockctl")
    };
    let client = common::lock_client(&url, &prefix);
    let held = client
        .acquire("held", Duration::from_secs(30), serde_json::json!({}))
        .await
        .unwrap()
        .unwrap();
    let mut old = vec![held.fencing_token];
    for _ in 0..3 {
        let lock = client
            .acquire("busy", Duration::from_secs(30), serde_json::json!({}))
            .await
            .unwrap()
            .unwrap();
        old.push(lock.fencing_token);
        client.release("busy", &lock.token).await.unwrap();
    }

    common::delete_index(&client, &format!("{prefix}-000001")).await;

    let fresh = common::lock_client(&url, &prefix);
    for (who, c) in [("running", &client), ("fresh", &fresh)] {
        let err = c
            .acquire("new", Duration::from_secs(30), serde_json::json!({}))
            .await
            .expect_err("no grant after the index was deleted");
        assert!(
            matches!(err, kube_lock_manager::lock::LockError::FencingUnproven { .. }),
            "{who}: {err}"
        );
        // release answers "not held" (its index is gone), get names the problem
        assert!(!c.release("held", &held.token).await.unwrap(), "{who}");
        let err = c.get("held").await.expect_err("get names the problem");
        assert_eq!(err.category(), "fencing", "{who}: {err}");
    }
    assert_eq!(cli(&["release", "held", "--token", &held.token]).status.code(), Some(1));
    let out = cli(&["acquire", "new"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("lockctl index recover --fencing-floor"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    let out = cli(&["index", "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("grants: refused"), "{}", stdout(&out));
    assert_eq!(
        run(&url, &["get", "held"]).status.code(),
        Some(1),
        "another prefix is unaffected"
    );

    let floor = old.iter().max().unwrap() + 1000;
    let out = cli(&["index", "recover", "--fencing-floor", &floor.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = cli(&["index", "status", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["grantsAllowed"], true);
    assert_eq!(status["fencingFloor"], floor);

    for (who, c) in [("running", &client), ("fresh", &fresh)] {
        let lock = c
            .acquire(&format!("after-{who}"), Duration::from_secs(30), serde_json::json!({}))
            .await
            .unwrap()
            .expect("granted after recovery");
        assert!(lock.fencing_token > floor, "{who}: {} > {floor}", lock.fencing_token);
    }
    let out = cli(&["acquire", "held", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lock: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let fencing = lock["fencingToken"].as_u64().unwrap();
    assert!(
        fencing > floor && old.iter().all(|o| *o < floor),
        "{fencing} > {floor} > {old:?}"
    );
    let out = cli(&["index", "recover", "--fencing-floor", "1"]);
    assert_eq!(out.status.code(), Some(2), "nothing to recover while granting");
    assert!(stderr(&out).contains("nothing to recover"), "{}", stderr(&out));

    // deleted again: a floor at or below the last recovery's is refused (tokens
    // above it were handed out), whatever the admin remembers
    let second = format!("{prefix}-000002");
    common::delete_index(&client, &second).await;
    let out = cli(&["index", "recover", "--fencing-floor", &(floor / 2).to_string()]);
    assert_eq!(out.status.code(), Some(2), "a lower floor is refused");
    assert!(stderr(&out).contains("not above"), "{}", stderr(&out));
    let higher = fencing + 1000;
    let out = cli(&["index", "recover", "--fencing-floor", &higher.to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // (a client that lived through the deletion reports it once, then sets up again)
    let lock = common::lock_client(&url, &prefix)
        .acquire("after-second", Duration::from_secs(30), serde_json::json!({}))
        .await
        .unwrap()
        .expect("granted after the second recovery");
    assert!(lock.fencing_token > higher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_exits_2_when_the_acquire_request_keeps_failing() {
    let Some(url) = common::es_url() else { return };
    let prefix = common::unique("cli-flaky");
    common::lock_client(&url, &prefix).ensure_ready().await.unwrap();
    for (failures, code) in [(3, 0), (4, 2)] {
        let proxy = common::FlakyProxy::start(&url, failures, common::lock_updates(&prefix)).await;
        let mut cmd = lockctl(&proxy.url);
        cmd.env("LOCK_INDEX_PREFIX", &prefix)
            .args(["acquire", &common::unique("flaky")]);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{failures} failures: {}", stderr(&out));
        if code == 2 {
            let err = stderr(&out);
            assert!(err.contains("unreachable") && err.contains("503"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        assert_eq!(proxy.failed(), failures);
    }
}

#[test]
fn semaphore_set_get_delete_and_permits_with_their_exit_codes() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("cli-sem");
    let out = run(&url, &["semaphore", "get", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("has no semaphore"), "{}", stderr(&out));
    let out = run(&url, &["acquire", &id, "--permits", "1"]);
    assert_eq!(out.status.code(), Some(2), "no semaphore yet: {}", stderr(&out));
    assert!(stderr(&out).contains("lockctl semaphore set"), "{}", stderr(&out));

    let out = run(&url, &["semaphore", "set", &id, "--limit", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("limit: 2"), "{}", stdout(&out));

    let out = run(&url, &["acquire", &id, "--permits", "1", "--holder", "a", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let a: Value = serde_json::from_str(&stdout(&out)).expect("JSON output");
    for field in ["lockId", "token", "fencingToken", "createdAt", "expiresAt", "metadata"] {
        assert!(a.get(field).is_some(), "{field} missing in {a}");
    }
    assert_eq!((&a["permits"], &a["exclusive"]), (&Value::from(1), &Value::from(false)));
    let a_token = a["token"].as_str().unwrap().to_string();
    let out = run(&url, &["acquire", &id, "--permits", "1", "--holder", "b"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let b_token = stdout(&out);

    // full: exit 1 and who holds it, in one line
    for extra in [&["--permits", "1"][..], &["--exclusive"][..]] {
        let out = run(&url, &[&["acquire", id.as_str()][..], extra].concat());
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(&format!("lock {id}: 2/2 permits held by a, b")), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }

    let out = run(&url, &["semaphore", "get", &id, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let sem: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!((&sem["limit"], &sem["held"]), (&Value::from(2), &Value::from(2)));
    assert_eq!(sem["holders"][0]["token"], a_token.as_str(), "oldest first");
    assert_eq!(sem["holders"][0]["fencingToken"], a["fencingToken"]);
    let out = run(&url, &["semaphore", "get", &id]);
    let text = stdout(&out);
    assert!(
        text.contains("held: 2") && text.contains(&format!("fencingToken={}", a["fencingToken"])),
        "{text}"
    );

    // the mutex commands on a semaphore key
    for (args, expected) in [
        (vec!["get", &id], "lockctl semaphore get"),
        (vec!["acquire", &id], "acquire permits with --permits"),
    ] {
        let out = run(&url, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(expected) && err.contains("is a semaphore (limit 2)"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    assert_eq!(run(&url, &["extend", &id, "--token", &a_token]).status.code(), Some(0));
    assert_eq!(run(&url, &["extend", &id, "--token", "nobody"]).status.code(), Some(1));
    assert_eq!(run(&url, &["release", &id, "--token", &a_token]).status.code(), Some(0));
    assert_eq!(run(&url, &["release", &id, "--token", &a_token]).status.code(), Some(1));

    let out = run(&url, &["semaphore", "delete", &id]);
    assert_eq!(out.status.code(), Some(1), "b still holds a permit");
    let err = stderr(&out);
    assert!(err.contains("not deleted") && err.contains("held by b"), "{err}");
    assert_eq!(run(&url, &["release", &id, "--token", &b_token]).status.code(), Some(0));
    let out = run(&url, &["semaphore", "delete", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(&url, &["semaphore", "delete", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("has no semaphore"), "{}", stderr(&out));
    // a plain mutex again
    let out = run(&url, &["acquire", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn exec_with_permits_runs_the_command_and_gives_them_back() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("cli-sem-exec");
    assert_eq!(
        run(&url, &["semaphore", "set", &id, "--limit", "3"]).status.code(),
        Some(0)
    );
    let out = lockctl(&url)
        .args([
            "exec",
            &id,
            "--permits",
            "2",
            "--",
            "sh",
            "-c",
            "echo \"$LOCK_PERMITS $LOCK_FENCING_TOKEN\"; exit 7",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let seen = stdout(&out);
    let (permits, fencing) = seen.split_once(' ').expect("two words");
    assert_eq!(permits, "2");
    assert!(fencing.parse::<u64>().is_ok(), "{seen}");
    let sem: Value = serde_json::from_str(&stdout(&run(&url, &["semaphore", "get", &id, "-o", "json"]))).unwrap();
    assert_eq!(sem["held"], 0, "released after the command: {sem}");

    // permits that do not fit now: 75, and the command never runs
    let holder = stdout(&run(&url, &["acquire", &id, "--permits", "2"]));
    let marker = tempfile::NamedTempFile::new().unwrap();
    let out = lockctl(&url)
        .args([
            "exec",
            &id,
            "--exclusive",
            "--",
            "sh",
            "-c",
            &format!("echo ran > {}", marker.path().display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("2/3 permits held by"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(marker.path()).unwrap(), "");
    assert_eq!(run(&url, &["release", &id, "--token", &holder]).status.code(), Some(0));
}

#[test]
fn execs_sharing_a_semaphore_of_two_run_at_most_two_at_a_time() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("cli-sem-overlap");
    assert_eq!(
        run(&url, &["semaphore", "set", &id, "--limit", "2"]).status.code(),
        Some(0)
    );
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = (0..4)
        .map(|n| {
            let log = dir.path().join(n.to_string());
            let script = format!(
                "date +%s%N > {log}.start; sleep 0.4; date +%s%N > {log}.end",
                log = log.display()
            );
            lockctl(&url)
                .args([
                    "exec",
                    &id,
                    "--permits",
                    "1",
                    "--ttl",
                    "2s",
                    "--wait",
                    "30s",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ])
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success());
    }
    let read = |file: String| -> u128 {
        std::fs::read_to_string(dir.path().join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let runs: Vec<(u128, u128)> = (0..4)
        .map(|n| (read(format!("{n}.start")), read(format!("{n}.end"))))
        .collect();
    for (start, _) in &runs {
        let running = runs.iter().filter(|(s, e)| s <= start && start < e).count();
        assert!(running <= 2, "{running} commands ran at once: {runs:?}");
    }
}

#[test]
fn bad_permit_input_is_one_clear_line_and_exit_2() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("cli-sem-bad");
    let mutex = common::unique("cli-sem-mutex");
    let out = run(&url, &["acquire", &mutex]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let cases: [(&[&str], &str); 7] = [
        (
            &["semaphore", "set", &id, "--limit", "10001"],
            "10001 is not in 0..=10000",
        ),
        (&["semaphore", "set", &id, "--limit", "-1"], "-1 is not in 0..=10000"),
        (&["acquire", &id, "--permits", "0"], "0 is not in 1..=10000"),
        (&["acquire", &id, "--permits", "20000"], "20000 is not in 1..=10000"),
        (
            &["acquire", &id, "--permits", "1", "--exclusive"],
            "cannot be used with",
        ),
        (&["acquire", &mutex, "--permits", "1"], "held as a plain mutex until"),
        (
            &["semaphore", "set", &mutex, "--limit", "3"],
            "held as a plain mutex until",
        ),
    ];
    for (args, expected) in cases {
        let out = run(&url, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: {err:?} should mention {expected:?}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line, got {err:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert_eq!(
        run(&url, &["semaphore", "get", &id]).status.code(),
        Some(1),
        "nothing was made"
    );
    let out = run(&url, &["semaphore", "get", &mutex]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("lockctl get"), "{}", stderr(&out));
}

#[test]
fn exec_with_permits_renews_a_short_lease_while_the_command_runs() {
    let Some(url) = common::es_url() else { return };
    let id = common::unique("cli-sem-renew");
    assert_eq!(
        run(&url, &["semaphore", "set", &id, "--limit", "1"]).status.code(),
        Some(0)
    );
    // the command outlives its 1 s lease twice over, and checks on the way
    // that nobody else got the only permit
    let probe = format!(
        "sleep 1.5; {lockctl} acquire {id} --permits 1 && exit 9; sleep 1",
        lockctl = env!("CARGO_BIN_EXE_lockctl")
    );
    let out = lockctl(&url)
        .args(["exec", &id, "--permits", "1", "--ttl", "1s", "--", "sh", "-c", &probe])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("permits held by"), "the probe was refused: {err}");
    assert!(!err.contains("lost"), "{err}");
    let sem: Value = serde_json::from_str(&stdout(&run(&url, &["semaphore", "get", &id, "-o", "json"]))).unwrap();
    assert_eq!(sem["held"], 0, "released after the command: {sem}");
}
