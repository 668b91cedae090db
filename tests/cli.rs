//! `lockctl acquire | release | extend | get | exec` as a user runs them,
//! against the real search node.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const PREFIX: &str = "clitest";

fn lockctl(url: &str) -> Command {
    let mut cmd = common::lockctl();
    cmd.env("ELASTICSEARCH_URL", url).env("LOCK_INDEX_PREFIX", PREFIX);
    cmd
}

fn run(url: &str, args: &[&str]) -> Output {
    lockctl(url).args(args).output().expect("run lockctl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
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
