//! Reliability: a Jepsen-style history of who believed they held which lock,
//! recorded under faults, and a checker that fails on two overlapping holders,
//! a fencing token that repeats or goes backwards, or a lock still held after
//! everyone stopped.
//!
//! Clients: CRD requests (scope Cluster) and `lockctl exec` processes on a few
//! shared lock keys. Faults: SIGKILL of the leading operator (two replicas run
//! with leader election), SIGKILL of the search node, restart of
//! kube-apiserver, SIGSTOP of an exec holder past its TTL, and two at once.
//! The bounded form runs in CI; `CHAOS_SECONDS=600 cargo test --test chaos
//! -- --nocapture` runs the long form (fault cycles repeat until the time is up).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::chaos::{Hold, Workload, check, pause_an_exec_holder, testenv};

#[test]
fn checker_finds_overlaps_and_stale_fencing_tokens() {
    let hold = |client: &str, fencing, start, end| Hold {
        key: "k".into(),
        client: client.into(),
        fencing,
        requested: start,
        start,
        end,
        paused_at: None,
        valid_until: None,
        told_lost: false,
    };
    let mutex = HashMap::new();
    let check = |holds: &[Hold]| check(holds, &mutex);
    assert!(check(&[hold("a", 1, 0.0, 10.0), hold("b", 2, 10.0, 20.0)]).is_empty());
    assert_eq!(check(&[hold("a", 1, 0.0, 10.0), hold("b", 2, 5.0, 20.0)]).len(), 1);
    assert_eq!(check(&[hold("a", 2, 0.0, 10.0), hold("b", 1, 10.0, 20.0)]).len(), 1);
    // a paused holder told it lost the lock is cut at its lease's end
    let mut paused = hold("a", 1, 0.0, 9000.0);
    paused.paused_at = Some(100.0);
    paused.told_lost = true;
    assert!(check(&[paused.clone(), hold("b", 2, 5000.0, 6000.0)]).is_empty());
    paused.told_lost = false;
    assert_eq!(check(&[paused, hold("b", 2, 5000.0, 6000.0)]).len(), 1);
}

#[test]
fn checker_counts_the_holders_of_a_semaphore() {
    let hold = |fencing, start, end| Hold {
        key: "s".into(),
        client: "c".into(),
        fencing,
        requested: start,
        start,
        end,
        paused_at: None,
        valid_until: None,
        told_lost: false,
    };
    let limits = HashMap::from([("s".to_string(), 2)]);
    let two = [hold(1, 0.0, 10.0), hold(2, 5.0, 15.0), hold(3, 10.0, 20.0)];
    assert!(check(&two, &limits).is_empty());
    let three = [hold(1, 0.0, 10.0), hold(2, 5.0, 15.0), hold(3, 9.0, 20.0)];
    assert_eq!(check(&three, &limits).len(), 1);
    let repeated = [hold(1, 0.0, 10.0), hold(1, 5.0, 15.0)];
    assert_eq!(check(&repeated, &limits).len(), 1);
    let backwards = [hold(2, 0.0, 10.0), hold(1, 10.0, 15.0)];
    assert_eq!(check(&backwards, &limits).len(), 1);
    // a holder that saw its earlier grant late (after a later-granted holder
    // had ended) is no violation: it asked before that one ended
    let mut late = hold(1, 50.0, 60.0);
    late.requested = 0.0;
    assert!(check(&[late.clone(), hold(2, 5.0, 20.0)], &limits).is_empty());
    // asked after the other ended, and still a smaller token: a violation
    late.requested = 30.0;
    assert_eq!(check(&[late, hold(2, 5.0, 20.0)], &limits).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_two_holders_and_nothing_stuck_under_faults() {
    let Some(url) = common::services() else { return };
    let long_seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let work = Workload::start(&url, "chaos").await;
    let history = work.history.clone();
    let mut cycles = 0;
    let mut pauses = 0;
    loop {
        cycles += 1;
        tokio::time::sleep(Duration::from_secs(4)).await;
        // 1. SIGKILL the leading operator replica
        if let Some(leader) = work.leader().await {
            history.fault(&format!("SIGKILL operator leader {leader}"));
            work.kill_replica(&leader);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        // 2. SIGKILL the search node, restart it
        history.fault("SIGKILL search node");
        testenv(&["kill", "opensearch"]);
        tokio::time::sleep(Duration::from_secs(2)).await;
        testenv(&["up"]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        // 3. restart kube-apiserver
        history.fault("restart kube-apiserver");
        testenv(&["kill", "apiserver", "TERM"]);
        testenv(&["up"]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        // 4. pause an exec holder past its TTL
        let (h, dir) = (history.clone(), work.out_dir.path().to_path_buf());
        let paused = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if pause_an_exec_holder(&h, &dir) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })
        .await
        .unwrap();
        if paused {
            pauses += 1;
        } else {
            // exec clients retry with backoff and may all be waiting right now
            eprintln!("chaos: no exec holder to pause in this cycle");
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        // 5. combined: the leader and the search node at once
        if let Some(leader) = work.leader().await {
            history.fault(&format!("SIGKILL operator leader {leader} + SIGKILL search node"));
            work.kill_replica(&leader);
        }
        testenv(&["kill", "opensearch"]);
        tokio::time::sleep(Duration::from_secs(1)).await;
        testenv(&["up"]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        if work.started.elapsed() >= Duration::from_secs(long_seconds) {
            break;
        }
    }
    eprintln!("chaos: {cycles} fault cycles, {pauses} exec holders paused");
    work.finish(true).await;
}
