//! `lockctl wait NAME`: the init-container helper. Watches one DistributedLock
//! until it is Granted, then hands the token and fencing token to the Pod.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use futures::{StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::watcher::{self, Event};

use crate::crd::{DistributedLock, Phase};
use crate::duration::parse_duration;

/// Exit code when the lock will never be granted (Failed, Lost, deleted...).
pub const EXIT_NOT_GRANTED: i32 = 1;
/// Exit code when --timeout passed first (as `timeout(1)`).
pub const EXIT_TIMEOUT: i32 = 124;

#[derive(Args, Debug)]
pub struct WaitArgs {
    /// Name of the DistributedLock.
    pub name: String,
    /// Namespace of the DistributedLock (default: the Pod's or the kubeconfig's).
    #[arg(short = 'n', long, env = "LOCK_NAMESPACE")]
    pub namespace: Option<String>,
    /// Give up after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Write the lock token here; the fencing token goes to `fencing-token`
    /// and the whole grant as JSON to `lock.json` in the same directory.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("cannot load the kubeconfig or in-cluster configuration: {0}")]
    Config(String),
    #[error(
        "not allowed to read distributedlock {namespace}/{name} (bind the lock-waiter ClusterRole to this ServiceAccount): {message}"
    )]
    Forbidden {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("Kubernetes API: {0}")]
    Api(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the wait ended with.
enum Outcome {
    Granted(Box<DistributedLock>),
    NotGranted(String),
}

pub async fn run(args: WaitArgs) -> Result<i32, WaitError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| WaitError::Config(crate::lock::error_line(&e)))?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<DistributedLock> = Api::namespaced(client, &namespace);
    let started = std::time::Instant::now();
    // Read once, so a denied read is reported as such and a request that is
    // already decided needs no watch (even with --timeout 0s).
    let read = tokio::time::timeout(args.timeout.max(FIRST_READ_TIMEOUT), api.get_opt(&args.name)).await;
    let current = match read {
        Ok(current) => current.map_err(|e| classify(&namespace, &args.name, e))?,
        Err(_) => None,
    };
    let decided = current
        .as_ref()
        .and_then(|lock| judge(lock).map(|decision| decide(decision, lock.clone())));
    let outcome = match decided {
        Some(outcome) => Ok(Ok(outcome)),
        None => {
            say_waiting(&namespace, &args.name, current.as_ref());
            let left = args.timeout.saturating_sub(started.elapsed());
            tokio::time::timeout(left, watch_for_grant(&api, &args.name, current.is_some())).await
        }
    };
    match outcome {
        Err(_) => {
            let what = if current.is_some() {
                "to be granted"
            } else {
                "to be created and granted (it does not exist)"
            };
            eprintln!(
                "lockctl: timed out after {} waiting for distributedlock {namespace}/{} {what}",
                crate::duration::format_duration(args.timeout),
                args.name
            );
            Ok(EXIT_TIMEOUT)
        }
        Ok(Err(e)) => Err(e),
        Ok(Ok(Outcome::NotGranted(why))) => {
            eprintln!(
                "lockctl: distributedlock {namespace}/{} will not be granted: {why}",
                args.name
            );
            Ok(EXIT_NOT_GRANTED)
        }
        Ok(Ok(Outcome::Granted(lock))) => {
            let status = lock.status.clone().unwrap_or_default();
            if let Some(path) = &args.token_file {
                write_grant(path, &lock)?;
            }
            println!(
                "granted {} (fencing token {})",
                status.lock_key.unwrap_or_default(),
                status.fencing_token.unwrap_or_default()
            );
            Ok(0)
        }
    }
}

fn classify(namespace: &str, name: &str, e: kube::Error) -> WaitError {
    match &e {
        kube::Error::Api(s) if s.code == 403 => WaitError::Forbidden {
            namespace: namespace.into(),
            name: name.into(),
            message: s.message.clone(),
        },
        _ => WaitError::Api(crate::lock::error_line(&e)),
    }
}

/// The decision for one observed state of the request.
fn judge(lock: &DistributedLock) -> Option<Result<(), String>> {
    let status = lock.status.as_ref()?;
    let reason = || {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "Granted")
            .map(|c| format!("{}: {}", c.reason, c.message))
            .unwrap_or_default()
    };
    if lock.metadata.deletion_timestamp.is_some() {
        return Some(Err("the request is being deleted".into()));
    }
    // A grant whose lease already ran out is no grant: the operator renews it
    // (a new expiry) or turns it Expired; wait for that.
    let live = status
        .expires_at
        .as_deref()
        .and_then(crate::queue::parse_time)
        .is_some_and(|expires| expires > chrono::Utc::now());
    match status.phase? {
        Phase::Granted if status.token.is_some() && live => Some(Ok(())),
        Phase::Granted | Phase::Pending => None,
        phase => Some(Err(format!("phase {phase:?} ({})", reason()))),
    }
}

/// The longest the first read may take when --timeout is shorter.
const FIRST_READ_TIMEOUT: Duration = Duration::from_secs(10);

fn say_waiting(namespace: &str, name: &str, current: Option<&DistributedLock>) {
    match current {
        None => eprintln!("lockctl: distributedlock {namespace}/{name} does not exist yet; waiting for it"),
        Some(lock) => {
            let position = lock.status.as_ref().and_then(|s| s.waiting_position);
            eprintln!(
                "lockctl: waiting for distributedlock {namespace}/{name}{}",
                position
                    .map(|p| format!(" (position {p} in the queue)"))
                    .unwrap_or_default()
            );
        }
    }
}

/// Watches the request until it is decided. `existed`: it was there when
/// first read, so a (re)list without it means it was deleted meanwhile.
async fn watch_for_grant(api: &Api<DistributedLock>, name: &str, existed: bool) -> Result<Outcome, WaitError> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api.clone(), config).boxed();
    let mut seen = existed;
    let mut listed = false;
    while let Some(event) = events.try_next().await.map_err(|e| WaitError::Api(e.to_string()))? {
        match event {
            Event::Apply(lock) | Event::InitApply(lock) => {
                listed = true;
                seen = true;
                if let Some(decision) = judge(&lock) {
                    return Ok(decide(decision, lock));
                }
            }
            Event::Delete(_) => return Ok(Outcome::NotGranted("the request was deleted".into())),
            Event::Init => listed = false,
            Event::InitDone if seen && !listed => return Ok(Outcome::NotGranted("the request was deleted".into())),
            Event::InitDone => {}
        }
    }
    Ok(Outcome::NotGranted("the watch ended".into()))
}

fn decide(decision: Result<(), String>, lock: DistributedLock) -> Outcome {
    match decision {
        Ok(()) => Outcome::Granted(Box::new(lock)),
        Err(why) => Outcome::NotGranted(why),
    }
}

/// Writes the token, the fencing token and the grant as JSON next to each other.
fn write_grant(token_file: &Path, lock: &DistributedLock) -> Result<(), WaitError> {
    let status = lock.status.clone().unwrap_or_default();
    let dir = token_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let write = |path: PathBuf, content: String| {
        std::fs::write(&path, content).map_err(|source| WaitError::Write { path, source })
    };
    std::fs::create_dir_all(dir).map_err(|source| WaitError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write(token_file.to_path_buf(), status.token.clone().unwrap_or_default())?;
    write(
        dir.join("fencing-token"),
        status.fencing_token.unwrap_or_default().to_string(),
    )?;
    let grant = serde_json::json!({
        "lockId": lock.spec.lock_id,
        "lockKey": status.lock_key,
        "token": status.token,
        "fencingToken": status.fencing_token,
        "acquiredAt": status.acquired_at,
        "expiresAt": status.expires_at,
    });
    write(dir.join("lock.json"), format!("{grant:#}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{granted, request};

    #[test]
    fn only_a_live_grant_of_a_request_not_being_deleted_is_handed_over() {
        let now = chrono::Utc::now();
        let live = granted(
            request("r", "ns", "k", 0, 0, 1),
            now,
            now + chrono::Duration::seconds(30),
        );
        assert_eq!(judge(&live), Some(Ok(())));
        let lapsed = granted(
            request("r", "ns", "k", 0, 0, 1),
            now - chrono::Duration::seconds(60),
            now - chrono::Duration::seconds(30),
        );
        assert_eq!(judge(&lapsed), None, "an expired grant is waited on, not handed over");
        let mut deleting = live.clone();
        deleting.metadata.deletion_timestamp = deleting.metadata.creation_timestamp.clone();
        assert!(matches!(judge(&deleting), Some(Err(why)) if why.contains("deleted")));
    }
}
