//! The reliability suites' shared parts (tests/chaos.rs, tests/search_cluster.rs):
//! a Jepsen-style history of who believed they held which lock, the checker
//! that fails on two overlapping holders, a fencing token that repeats or goes
//! backwards, or a lock still held after everyone stopped, and the workload
//! that produces it (CRD and `lockctl exec` clients, two operator replicas).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, PostParams};
use kube_lock_manager::crd::{DistributedLock, Phase};
use serde_json::json;

pub const TTL_MS: f64 = 3000.0;

pub fn now_ms() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64() * 1000.0
}

/// One grant as its holder saw it.
#[derive(Clone, Debug)]
pub struct Hold {
    pub key: String,
    pub client: String,
    pub fencing: i64,
    /// When the client asked for it (created the request, started lockctl):
    /// the grant came after this.
    pub requested: f64,
    /// When the holder saw it was granted (which lags the grant itself).
    pub start: f64,
    pub end: f64,
    /// When the holder was paused (SIGSTOP), if it was, and until when its
    /// lease was valid as far as it knew at that moment.
    pub paused_at: Option<f64>,
    pub valid_until: Option<f64>,
    /// The holder was told it lost the lock.
    pub told_lost: bool,
}

#[derive(Default)]
pub struct History {
    pub holds: Mutex<Vec<Hold>>,
    pub faults: Mutex<Vec<String>>,
    pub pauses: Mutex<HashMap<u32, (f64, Option<f64>)>>,
    pub unreachable_seen: AtomicBool,
}

impl History {
    pub fn fault(&self, what: &str) {
        eprintln!("chaos: fault: {what}");
        self.faults.lock().unwrap().push(what.to_string());
    }
}

/// The checker: returns every violation found in the history. Keys in
/// `limits` are semaphores (each hold takes one permit): at most that many
/// holders at once, every fencing token unique, and a hold requested after
/// another ended has a larger one. Every other key is a mutex: no two holds
/// overlap, and a later hold has a larger token. (For a mutex the seen start
/// is good enough: the next grant can only come after the previous holder's
/// end, so holds seen in start order were granted in that order. A semaphore
/// grants while others hold: a holder that sees its grant late can start
/// after a later-granted holder ended, so only the request time orders them.)
pub fn check(holds: &[Hold], limits: &HashMap<String, usize>) -> Vec<String> {
    let mut violations = Vec::new();
    let mut by_key: HashMap<&str, Vec<&Hold>> = HashMap::new();
    for h in holds {
        by_key.entry(&h.key).or_default().push(h);
    }
    for (key, mut list) in by_key {
        list.sort_by(|a, b| a.start.total_cmp(&b.start));
        // A paused holder that was told it lost the lock could rely on it
        // only until its lease ran out as far as it knew (lockctl's lease file).
        let end = |h: &Hold| match (h.paused_at, h.valid_until) {
            (Some(_), Some(valid)) if h.told_lost => h.end.min(valid),
            (Some(p), None) if h.told_lost => h.end.min(p + TTL_MS),
            _ => h.end,
        };
        if let Some(limit) = limits.get(key) {
            let mut edges: Vec<(f64, i32)> = list.iter().flat_map(|h| [(h.start, 1), (end(h), -1)]).collect();
            // at equal times the end comes first
            edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut now = 0;
            for (at, step) in edges {
                now += step;
                if now > *limit as i32 {
                    violations.push(format!("{key}: {now} holders of {limit} permits at {at}"));
                }
            }
            let mut tokens: Vec<i64> = list.iter().map(|h| h.fencing).collect();
            tokens.sort();
            if tokens.windows(2).any(|w| w[0] == w[1]) {
                violations.push(format!("{key}: a fencing token was handed out twice: {tokens:?}"));
            }
            for a in &list {
                for b in &list {
                    // b was asked for after a ended, yet has a token no larger
                    if !std::ptr::eq(*a, *b) && b.requested >= end(a) && b.fencing <= a.fencing {
                        violations.push(format!("{key}: fencing token did not grow: {a:?} then {b:?}"));
                    }
                }
            }
            continue;
        }
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                if b.start < end(a) && a.start < end(b) {
                    violations.push(format!("{key}: overlapping holders {a:?} and {b:?}"));
                }
            }
        }
        for w in list.windows(2) {
            if w[1].fencing <= w[0].fencing {
                violations.push(format!("{key}: fencing token did not grow: {:?} then {:?}", w[0], w[1]));
            }
        }
    }
    violations
}

/// Operator replicas, restarted when they exit (as a Deployment would).
pub struct Replicas {
    pub children: Mutex<Vec<(String, Child)>>,
    pub args: Vec<String>,
    pub log_dir: std::path::PathBuf,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Replicas {
    pub fn spawn(&self, identity: &str) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_dir.join(format!("{identity}.log")))
            .unwrap();
        super::lockctl()
            .arg("operator")
            .args(&self.args)
            .args([
                "--identity",
                identity,
                "--http-addr",
                &format!("127.0.0.1:{}", super::free_port()),
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn supervise(&self) {
        let mut children = self.children.lock().unwrap();
        for (identity, child) in children.iter_mut() {
            if let Ok(Some(_)) = child.try_wait() {
                *child = self.spawn(identity);
            }
        }
    }

    pub fn kill(&self, identity: &str) {
        let mut children = self.children.lock().unwrap();
        if let Some((_, child)) = children.iter_mut().find(|(i, _)| i == identity) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stop(&self) {
        for (_, child) in self.children.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn testenv(args: &[&str]) {
    let out = Command::new("testenv/testenv").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "testenv {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[allow(clippy::too_many_arguments)]
pub async fn crd_client(
    id: usize,
    run: String,
    keys: Vec<String>,
    semaphore_key: Option<String>,
    api: Api<DistributedLock>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let name = format!("c{id}-{i}");
        // CRD clients use all keys but the last: there the exec clients,
        // which retry with backoff, do not starve behind queued requests.
        // the last client uses only the semaphore key
        let key = match &semaphore_key {
            Some(key) => key.clone(),
            None => keys[(id + i) % (keys.len() - 1)].clone(),
        };
        let request = super::lock_request(&run, &name, json!({"lockId": key, "scope": "Cluster", "ttl": "3s"}));
        let requested = now_ms();
        while api.create(&PostParams::default(), &request).await.is_err() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut granted = None;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if let Ok(lock) = api.get(&name).await {
                let status = lock.status.clone().unwrap_or_default();
                if status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "IndexReachable" && c.status == "False")
                {
                    history.unreachable_seen.store(true, Ordering::Relaxed);
                }
                match status.phase {
                    Some(Phase::Granted) => {
                        granted = Some(status);
                        break;
                    }
                    Some(p) if p.is_final() => break,
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if let Some(status) = granted {
            let start = now_ms();
            let expires = status
                .expires_at
                .as_deref()
                .and_then(|e| chrono::DateTime::parse_from_rfc3339(e).ok())
                .map(|e| e.timestamp_millis() as f64)
                .unwrap_or(start);
            tokio::time::sleep(Duration::from_millis(200)).await; // the work
            let end = now_ms().min(expires);
            if end > start {
                history.holds.lock().unwrap().push(Hold {
                    key: key.clone(),
                    client: name.clone(),
                    fencing: status.fencing_token.unwrap_or(-1),
                    requested,
                    start,
                    end,
                    paused_at: None,
                    valid_until: None,
                    told_lost: false,
                });
            }
        }
        while api.delete(&name, &DeleteParams::default()).await.is_err() {
            if api.get_opt(&name).await.is_ok_and(|l| l.is_none()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

pub fn exec_client(
    id: usize,
    keys: Vec<String>,
    semaphore_key: Option<String>,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
    out_dir: std::path::PathBuf,
) {
    use std::os::unix::process::CommandExt;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let key = semaphore_key
            .clone()
            .unwrap_or_else(|| keys[(id + i) % keys.len()].clone());
        let permits: &[&str] = if semaphore_key.is_some() {
            &["--permits", "1"]
        } else {
            &[]
        };
        let out_file = out_dir.join(format!("x{id}-{i}.out"));
        // A command stopped by SIGTERM (lockctl's "lock lost") records when
        // it stopped: lockctl releases the lock only after that, and its own
        // exit (the fallback end) comes later still, after the release and
        // maybe after the next holder's grant.
        let script = format!(
            "trap 'echo end $(date +%s%N) >> {f}; exit 143' TERM; echo start $(date +%s%N) $LOCK_FENCING_TOKEN >> {f}; sleep 0.3 & wait $!; echo end $(date +%s%N) >> {f}",
            f = out_file.display()
        );
        let requested = now_ms();
        let child = super::lockctl()
            .args(["exec", &key, "--ttl", "3s", "--wait", "60s"])
            .args(permits)
            .arg("--lease-file")
            .arg(out_dir.join(format!("x{id}-{i}.lease")))
            .args(["--", "sh", "-c", &script])
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        history.pauses.lock().unwrap().remove(&pid);
        std::fs::write(
            out_dir.join(format!("x{id}.current")),
            format!("{pid} {}", out_file.display()),
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let text = std::fs::read_to_string(&out_file).unwrap_or_default();
        let field = |prefix: &str, n: usize| -> Option<String> {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .and_then(|l| l.split_whitespace().nth(n).map(str::to_string))
        };
        let (Some(start), Some(fencing)) = (field("start", 1), field("start", 2)) else {
            continue;
        };
        let start = start.parse::<f64>().unwrap() / 1e6;
        // killed before it could print "end": it believed until it exited
        let end = field("end", 1)
            .map(|e| e.parse::<f64>().unwrap() / 1e6)
            .unwrap_or_else(now_ms);
        // (one lock at a time: a guard in a temporary lives to the end of the statement)
        let pause = history.pauses.lock().unwrap().get(&pid).copied();
        history.holds.lock().unwrap().push(Hold {
            key,
            client: format!("x{id}-{i}"),
            fencing: fencing.parse().unwrap(),
            requested,
            start,
            end,
            paused_at: pause.map(|p| p.0),
            valid_until: pause.and_then(|p| p.1),
            told_lost: out.status.code() != Some(0) && stderr.contains("was lost"),
        });
    }
}

/// SIGSTOP an exec holder (its whole process group) past its TTL, then SIGCONT.
pub fn pause_an_exec_holder(history: &History, out_dir: &std::path::Path) -> bool {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    for entry in std::fs::read_dir(out_dir).unwrap().flatten() {
        if !entry.file_name().to_string_lossy().ends_with(".current") {
            continue;
        }
        let current = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let mut parts = current.split_whitespace();
        let (Some(pid), Some(file)) = (parts.next(), parts.next()) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if !text.contains("start") || text.contains("end") {
            continue; // not holding right now
        }
        let pid: u32 = pid.parse().unwrap();
        let paused_at = now_ms();
        if killpg(Pid::from_raw(pid as i32), Signal::SIGSTOP).is_err() {
            continue;
        }
        // stopped: its lease file no longer changes
        let valid_until = std::fs::read_to_string(std::path::Path::new(file).with_extension("lease"))
            .ok()
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t.trim()).ok())
            .map(|t| t.timestamp_millis() as f64);
        history.pauses.lock().unwrap().insert(pid, (paused_at, valid_until));
        history.fault(&format!("SIGSTOP exec holder {pid} for 4s (TTL 3s)"));
        std::thread::sleep(Duration::from_millis(TTL_MS as u64 + 1000));
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGCONT);
        return true;
    }
    false
}

/// The identity holding the leader Lease, if any.
pub async fn current_leader(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases.get_opt(name).await.ok().flatten()?.spec?.holder_identity
}

/// The chaos workload: a namespace, two operator replicas with leader
/// election (restarted when they exit), five CRD clients and three
/// `lockctl exec` clients on three mutex keys and one 2-permit semaphore key,
/// all recording into one [`History`].
pub struct Workload {
    pub client: kube::Client,
    pub ns: String,
    pub run: String,
    pub keys: Vec<String>,
    pub semaphore_key: String,
    pub lease_name: String,
    pub history: Arc<History>,
    pub out_dir: tempfile::TempDir,
    pub locks: kube_lock_manager::lock::LockClient,
    pub started: Instant,
    replicas: Arc<Replicas>,
    stop: Arc<AtomicBool>,
    api: Api<DistributedLock>,
    supervisor: tokio::task::JoinHandle<()>,
    clients: Vec<tokio::task::JoinHandle<()>>,
    exec_threads: Vec<std::thread::JoinHandle<()>>,
    /// Stops the clients and the supervisor also when the test fails half-way.
    _stop_on_drop: StopOnDrop,
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl Workload {
    /// Starts it against the search engine at `url` (one URL or a list).
    pub async fn start(url: &str, name: &str) -> Workload {
        let client = kube::Client::try_default().await.unwrap();
        super::install_crd(&client).await;
        let ns = super::namespace(&client, name).await;
        let run = super::unique(name);
        let keys: Vec<String> = (0..3).map(|i| format!("{run}-key{i}")).collect();
        // one more key, with 2 permits, shared by a CRD client and an exec client
        let semaphore_key = format!("{run}-sem");
        let out_dir = tempfile::tempdir().unwrap();
        let lease_name = super::unique(&format!("{name}-leader"));
        let replicas = Arc::new(Replicas {
            children: Mutex::new(Vec::new()),
            args: [
                vec!["--selector".to_string(), format!("{}={run}", super::RUN_LABEL)],
                super::leader_election_args(&ns, &lease_name),
            ]
            .concat(),
            log_dir: std::env::temp_dir(),
        });
        for identity in [format!("{name}-a"), format!("{name}-b")] {
            let child = replicas.spawn(&identity);
            replicas.children.lock().unwrap().push((identity, child));
        }
        let history = Arc::new(History::default());
        let stop = Arc::new(AtomicBool::new(false));
        let api: Api<DistributedLock> = Api::namespaced(client.clone(), &ns);
        let supervisor = {
            let (replicas, stop) = (replicas.clone(), stop.clone());
            tokio::task::spawn_blocking(move || {
                while !stop.load(Ordering::Relaxed) {
                    replicas.supervise();
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let semaphores: Api<kube_lock_manager::crd::Semaphore> = Api::namespaced(client.clone(), &ns);
        let semaphore = serde_json::from_value(json!({
            "apiVersion": "lockmanager.dev/v1alpha1", "kind": "Semaphore",
            "metadata": {"name": format!("{name}-sem"), "labels": {super::RUN_LABEL: run}},
            "spec": {"lockId": semaphore_key, "scope": "Cluster", "limit": 2},
        }))
        .unwrap();
        semaphores.create(&PostParams::default(), &semaphore).await.unwrap();
        let locks = super::lock_client(url, "kube-locks");
        super::eventually("the Semaphore in force", Duration::from_secs(30), || async {
            locks
                .semaphore_get(&semaphore_key)
                .await
                .ok()
                .flatten()
                .filter(|s| s.limit == 2)
        })
        .await;
        let mut clients = Vec::new();
        for id in 0..5 {
            clients.push(tokio::spawn(crd_client(
                id,
                run.clone(),
                keys.clone(),
                (id == 4).then(|| semaphore_key.clone()),
                api.clone(),
                history.clone(),
                stop.clone(),
            )));
        }
        let mut exec_threads = Vec::new();
        for id in 0..3 {
            let (keys, history, stop, dir) = (
                keys.clone(),
                history.clone(),
                stop.clone(),
                out_dir.path().to_path_buf(),
            );
            let semaphore_key = (id == 2).then(|| semaphore_key.clone());
            exec_threads.push(std::thread::spawn(move || {
                exec_client(id, keys, semaphore_key, history, stop, dir)
            }));
        }
        Workload {
            client,
            ns,
            run,
            keys,
            semaphore_key,
            lease_name,
            history,
            out_dir,
            locks,
            started: Instant::now(),
            replicas,
            stop: stop.clone(),
            api,
            supervisor,
            clients,
            exec_threads,
            _stop_on_drop: StopOnDrop(stop),
        }
    }

    /// The operator replica leading right now, if any.
    pub async fn leader(&self) -> Option<String> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.ns);
        current_leader(&leases, &self.lease_name).await
    }

    /// SIGKILLs an operator replica (the supervisor starts it again).
    pub fn kill_replica(&self, identity: &str) {
        self.replicas.kill(identity);
    }

    /// Stops every client, waits until nothing can still be held, and checks
    /// the history: no violation, nothing stuck, no request left Granted,
    /// enough grants to mean something, and (`expect_unreachable`) requests
    /// marked IndexReachable=False while the index was out of reach.
    pub async fn finish(self, expect_unreachable: bool) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.await.unwrap();
        }
        for t in self.exec_threads {
            t.join().unwrap();
        }
        // Nothing may stay held TTL + 5 s after everyone stopped.
        tokio::time::sleep(Duration::from_millis(TTL_MS as u64 + 5000)).await;
        let mut stuck = Vec::new();
        for key in &self.keys {
            if let Some(lock) = self.locks.get(key).await.unwrap() {
                stuck.push(format!("{key} still held: {lock:?}"));
            }
        }
        if let Some(state) = self.locks.semaphore_get(&self.semaphore_key).await.unwrap()
            && !state.holders.is_empty()
        {
            stuck.push(format!("{} still has holders: {state:?}", self.semaphore_key));
        }
        let leftovers: Vec<_> = self
            .api
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|l| l.status.as_ref().and_then(|s| s.phase) == Some(Phase::Granted))
            .map(|l| l.metadata.name.unwrap_or_default())
            .collect();
        self.supervisor.await.unwrap();
        self.replicas.stop();

        let holds = self.history.holds.lock().unwrap().clone();
        let faults = self.history.faults.lock().unwrap().clone();
        let limits = HashMap::from([(self.semaphore_key.clone(), 2)]);
        let violations = check(&holds, &limits);
        let on_semaphore = holds.iter().filter(|h| h.key == self.semaphore_key).count();
        let crd = holds.iter().filter(|h| h.client.starts_with('c')).count();
        let exec = holds.iter().filter(|h| h.client.starts_with('x')).count();
        let others = holds.len() - crd - exec;
        let told = holds.iter().filter(|h| h.told_lost).count();
        eprintln!(
            "chaos: {} s, {} grants checked ({crd} CRD, {exec} exec, {others} engine, {on_semaphore} of a 2-permit semaphore, {told} told they lost the lock), {} faults injected, {} violations",
            self.started.elapsed().as_secs(),
            holds.len(),
            faults.len(),
            violations.len() + stuck.len() + leftovers.len()
        );
        assert!(violations.is_empty(), "violations:\n{}", violations.join("\n"));
        assert!(stuck.is_empty(), "{stuck:?}");
        assert!(
            leftovers.is_empty(),
            "requests still Granted after all clients stopped: {leftovers:?}"
        );
        assert!(
            crd >= 5 && exec >= 3 && on_semaphore >= 3,
            "too few grants to mean anything: {crd} CRD, {exec} exec, {on_semaphore} on the semaphore"
        );
        if expect_unreachable {
            assert!(
                self.history.unreachable_seen.load(Ordering::Relaxed),
                "no request was marked IndexReachable=False while the search engine was out of reach"
            );
        }
    }
}
