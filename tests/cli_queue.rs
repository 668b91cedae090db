//! `lockctl acquire|exec --wait`: waiters of one key are served in the order
//! they arrived, quickly, and a waiter that crashes, gives up or is
//! interrupted does not hold up the others — real `lockctl` processes
//! against the real search node.

mod common;

use common::cli::{stderr, stdout};

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kube_lock_manager::lock::LockClient;

const PREFIX: &str = "cliqueue";

fn lockctl(url: &str) -> Command {
    common::cli::lockctl_at(url, PREFIX)
}

fn run(url: &str, args: &[&str]) -> Output {
    common::cli::run_at(url, PREFIX, args)
}

/// Takes `id` with a long lease and returns its token.
fn hold(url: &str, id: &str, extra: &[&str]) -> String {
    let mut args = vec!["acquire", id, "--ttl", "2m"];
    args.extend_from_slice(extra);
    let out = run(url, &args);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    stdout(&out)
}

/// A shell command that logs `start NAME FENCING NANOS`, holds for
/// `hold_ms` and logs `end NAME NANOS`.
fn logging_command(log: &Path, name: &str, hold_ms: u64) -> String {
    format!(
        "echo \"start {name} $LOCK_FENCING_TOKEN $(date +%s%N)\" >> {log}; sleep {secs}; echo \"end {name} x $(date +%s%N)\" >> {log}",
        log = log.display(),
        secs = hold_ms as f64 / 1000.0
    )
}

fn spawn_exec(url: &str, id: &str, extra: &[&str], command: &str) -> Child {
    let mut args = vec!["exec", id, "--wait", "2m"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", command]);
    lockctl(url)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lockctl exec")
}

/// Waits until `n` waiters are in line for `id`.
async fn in_line(client: &LockClient, id: &str, n: usize) {
    common::eventually(
        &format!("{n} waiters in line for {id}"),
        Duration::from_secs(20),
        || async { (client.waiters(id).await.ok()?.len() == n).then_some(()) },
    )
    .await;
}

/// One line of a command's log: (event, name, fencing token, nanos).
fn read_log(log: &Path) -> Vec<(String, String, Option<u64>, u128)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(parts.len(), 4, "log line {line:?}");
            (
                parts[0].to_string(),
                parts[1].to_string(),
                parts[2].parse().ok(),
                parts[3].parse().expect("nanos"),
            )
        })
        .collect()
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_waiters_are_served_in_arrival_order_with_fast_handoffs() {
    let Some(url) = common::es_url() else { return };
    let client = common::lock_client(&url, PREFIX);
    let id = common::unique("queue-order");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let holder = hold(&url, &id, &[]);
    // eight `exec --wait` waiters and two `acquire --wait` ones (the 4th and
    // the 8th), each joining once the one before it is in line
    let mut execs = Vec::new();
    let mut acquires = Vec::new();
    for n in 0..10 {
        let name = format!("w{n}");
        if n == 3 || n == 7 {
            let child = lockctl(&url)
                .args(["acquire", &id, "--wait", "2m", "-o", "json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            acquires.push((name, child));
        } else {
            execs.push(spawn_exec(&url, &id, &[], &logging_command(&log, &name, 150)));
        }
        in_line(&client, &id, n + 1).await;
    }
    assert_eq!(run(&url, &["release", &id, "--token", &holder]).status.code(), Some(0));
    let released_at = now_nanos();
    // an `acquire` waiter prints its grant and exits; the test then holds it
    // briefly, as a user's script would, and releases it
    for (name, child) in acquires {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        let lock: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON grant");
        let fencing = lock["fencingToken"].as_u64().unwrap();
        let line = format!("start {name} {fencing} {}\n", now_nanos());
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let line = format!("end {name} x {}\n", now_nanos());
        std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()))
            .unwrap();
        let token = lock["token"].as_str().unwrap();
        assert_eq!(run(&url, &["release", &id, "--token", token]).status.code(), Some(0));
    }
    for child in execs {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let events = read_log(&log);
    let starts: Vec<_> = events.iter().filter(|e| e.0 == "start").collect();
    let order: Vec<&str> = starts.iter().map(|e| e.1.as_str()).collect();
    let arrival: Vec<String> = (0..10).map(|n| format!("w{n}")).collect();
    assert_eq!(order, arrival, "served in arrival order");
    let fencing: Vec<u64> = starts.iter().map(|e| e.2.unwrap()).collect();
    assert!(
        fencing.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens grow with every grant: {fencing:?}"
    );
    // handoffs between `exec` waiters: previous command's end → next start
    let mut handoffs: Vec<u128> = events
        .windows(2)
        .filter(|w| w[0].0 == "end" && w[1].0 == "start")
        .filter(|w| !["w3", "w7"].contains(&w[0].1.as_str()) && !["w3", "w7"].contains(&w[1].1.as_str()))
        .map(|w| w[1].3.saturating_sub(w[0].3) / 1_000_000)
        .collect();
    handoffs.push(starts[0].3.saturating_sub(released_at) / 1_000_000);
    handoffs.sort();
    let median = handoffs[handoffs.len() / 2];
    eprintln!("handoffs (ms, sorted): {handoffs:?}");
    // the bench measures the real figures; this catches a return to
    // seconds-long backoff (generous for a loaded machine)
    assert!(median < 400, "median handoff {median} ms: {handoffs:?}");
    assert!(client.waiters(&id).await.unwrap().is_empty(), "everyone left the line");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_head_holds_up_the_line_only_until_its_entry_expires() {
    let Some(url) = common::es_url() else { return };
    let client = common::lock_client(&url, PREFIX);
    let id = common::unique("queue-crash");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let holder = hold(&url, &id, &[]);
    let mut head = spawn_exec(&url, &id, &[], &logging_command(&log, "head", 0));
    in_line(&client, &id, 1).await;
    let mut next = spawn_exec(&url, &id, &[], &logging_command(&log, "next", 0));
    in_line(&client, &id, 2).await;
    head.kill().unwrap(); // SIGKILL: no chance to leave the line
    head.wait().unwrap();
    assert_eq!(run(&url, &["release", &id, "--token", &holder]).status.code(), Some(0));
    let released = Instant::now();
    let status = tokio::task::spawn_blocking(move || next.wait().unwrap()).await.unwrap();
    assert!(status.success(), "the next waiter was served");
    let waited = released.elapsed();
    let names: Vec<String> = read_log(&log).into_iter().map(|e| e.1).collect();
    assert_eq!(names, ["next", "next"], "only the live waiter ran");
    // the dead entry's beat stood still for the entry TTL (5 s) before it
    // was removed; the bound allows for one poll and a slow machine
    assert!(
        waited < Duration::from_secs(9),
        "the dead head held up the line for {waited:?}"
    );
    assert!(
        client.waiters(&id).await.unwrap().is_empty(),
        "the dead entry was removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_times_out_or_is_interrupted_leaves_the_line() {
    let Some(url) = common::es_url() else { return };
    let client = common::lock_client(&url, PREFIX);
    let id = common::unique("queue-leave");
    let holder = hold(&url, &id, &[]);
    // joined behind another waiter, gives up after 1 s: exit 1, one line
    let first = spawn_exec(&url, &id, &[], "true");
    in_line(&client, &id, 1).await;
    // the queue document is no lock: no lock call can address it, and the
    // index still grants
    let out = run(&url, &["get", &kube_lock_manager::lock::queue_id(&id)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("invalid lock id"), "{}", stderr(&out));
    assert_eq!(run(&url, &["index", "status"]).status.code(), Some(0));
    let started = Instant::now();
    let out = run(&url, &["acquire", &id, "--wait", "1s"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("held by someone else"), "{}", stderr(&out));
    assert!(started.elapsed() >= Duration::from_secs(1));
    let line = client.waiters(&id).await.unwrap();
    assert_eq!(line.len(), 1, "only the first waiter is left: {line:?}");

    // SIGTERM while waiting: exit 143, one line, out of the line, no grant
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = tokio::task::spawn_blocking(move || first.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("stopped waiting") && err.lines().count() == 1, "{err}");
    assert!(client.waiters(&id).await.unwrap().is_empty(), "left the line");
    let lock = client.get(&id).await.unwrap().expect("still held");
    assert_eq!(lock.token, holder, "the interrupted waiter took nothing");

    // with nobody else in line, a waiter that arrives takes the lock as
    // soon as it is free
    let mut waiter = spawn_exec(&url, &id, &[], "true");
    in_line(&client, &id, 1).await;
    assert_eq!(run(&url, &["release", &id, "--token", &holder]).status.code(), Some(0));
    let status = tokio::task::spawn_blocking(move || waiter.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    assert!(client.waiters(&id).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permit_waiters_keep_their_order_so_an_exclusive_writer_is_not_starved() {
    let Some(url) = common::es_url() else { return };
    let client = common::lock_client(&url, PREFIX);
    let id = common::unique("queue-sem");
    assert_eq!(
        run(&url, &["semaphore", "set", &id, "--limit", "2"]).status.code(),
        Some(0)
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    // a reader holds one permit; one is free
    let reader = hold(&url, &id, &["--permits", "1"]);
    let waiters = [
        ("writer", vec!["--exclusive"]),
        ("r1", vec!["--permits", "1"]),
        ("r2", vec!["--permits", "1"]),
    ];
    let mut children = Vec::new();
    for (n, (name, extra)) in waiters.iter().enumerate() {
        children.push(spawn_exec(&url, &id, extra, &logging_command(&log, name, 300)));
        in_line(&client, &id, n + 1).await;
    }
    // r1 would fit in the free permit, but the writer is ahead of it
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        read_log(&log).is_empty(),
        "nobody passed the writer: {:?}",
        read_log(&log)
    );
    assert_eq!(run(&url, &["release", &id, "--token", &reader]).status.code(), Some(0));
    for child in children {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    let events = read_log(&log);
    let seq: Vec<String> = events.iter().map(|e| format!("{} {}", e.0, e.1)).collect();
    assert_eq!(
        &seq[..2],
        ["start writer", "end writer"],
        "the writer ran alone, first: {seq:?}"
    );
    let starts: Vec<&str> = events.iter().filter(|e| e.0 == "start").map(|e| e.1.as_str()).collect();
    assert_eq!(starts, ["writer", "r1", "r2"], "{seq:?}");
    let fencing: Vec<u64> = events.iter().filter_map(|e| e.2).collect();
    assert!(fencing.windows(2).all(|w| w[0] < w[1]), "{fencing:?}");
    assert!(client.waiters(&id).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_asking_more_permits_than_the_limit_holds_up_nobody_behind_it() {
    let Some(url) = common::es_url() else { return };
    let client = common::lock_client(&url, PREFIX);
    let id = common::unique("queue-over");
    assert_eq!(
        run(&url, &["semaphore", "set", &id, "--limit", "2"]).status.code(),
        Some(0)
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let holder = hold(&url, &id, &["--permits", "2"]);
    // in line: "first", then "big", which can never fit a limit of 2, then
    // "small", which would fit
    let mut children = Vec::new();
    for (n, (name, permits)) in [("first", "1"), ("big", "3"), ("small", "1")].into_iter().enumerate() {
        children.push(spawn_exec(
            &url,
            &id,
            &["--permits", permits],
            &logging_command(&log, name, 10),
        ));
        in_line(&client, &id, n + 1).await;
    }
    let small = children.pop().unwrap();
    let big = children.pop().unwrap();
    let first = children.pop().unwrap();
    let released = Instant::now();
    assert_eq!(run(&url, &["release", &id, "--token", &holder]).status.code(), Some(0));
    for child in [first, small] {
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert!(
        released.elapsed() < Duration::from_secs(10),
        "the request behind one that never fits waited {:?}",
        released.elapsed()
    );
    // the big one still waits, out of the line, and goes once the limit is raised
    assert!(read_log(&log).iter().all(|e| e.1 != "big"), "{:?}", read_log(&log));
    assert_eq!(
        run(&url, &["semaphore", "set", &id, "--limit", "3"]).status.code(),
        Some(0)
    );
    let out = tokio::task::spawn_blocking(move || big.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let starts: Vec<String> = read_log(&log)
        .into_iter()
        .filter(|e| e.0 == "start")
        .map(|e| e.1)
        .collect();
    assert_eq!(starts, ["first", "small", "big"]);
    assert!(client.waiters(&id).await.unwrap().is_empty());
}
