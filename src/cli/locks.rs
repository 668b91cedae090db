//! `lockctl acquire | release | extend | get | exec | index`: the lock engine without Kubernetes.
//! `acquire` and `exec` take a mutex, or with `--permits N` / `--exclusive`
//! permits of the key's semaphore; everything after the grant is shared.

use std::process::ExitStatus;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use super::CliError;
use super::semaphores::why_full;
use crate::duration::parse_duration;
use crate::engine::EngineArgs;
use crate::lock::{AcquireRequest, ExtendOutcome, Grant, Lease, LockClient, MAX_PERMITS, PermitRequest};

/// Exit code of `lockctl exec` when the lock could not be acquired (EX_TEMPFAIL).
pub const EXIT_NOT_ACQUIRED: i32 = 75;

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Output {
    /// The token alone.
    #[default]
    Token,
    /// The lock as JSON.
    Json,
}

/// Permits of the key's semaphore instead of the plain mutex.
#[derive(Args, Debug, Clone, Copy)]
pub struct PermitArgs {
    /// Take N permits of the key's semaphore (`lockctl semaphore set KEY --limit L` makes one).
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_PERMITS)))]
    pub permits: Option<u32>,
    /// Take every permit of the key's semaphore: granted once nobody holds
    /// any, and nobody else is granted while it is held.
    #[arg(long, conflicts_with = "permits")]
    pub exclusive: bool,
}

#[derive(Args, Debug)]
pub struct AcquireArgs {
    /// Lock key (also shared with Kubernetes requests: `<namespace>/<lockId>` or a cluster-scoped id).
    pub lock_id: String,
    /// Lease length.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// JSON object stored with the lock; `@FILE` reads it from a file, `@-` from stdin.
    #[arg(long, value_parser = parse_metadata)]
    pub metadata: Option<Value>,
    /// Who holds it (display text).
    #[arg(long)]
    pub holder: Option<String>,
    /// Wait this long for the lock (or the permits), in line with the other
    /// `--wait` clients of the key: served in arrival order.
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
    #[command(flatten)]
    pub permits: PermitArgs,
    #[arg(short = 'o', long = "output", value_enum, default_value_t)]
    pub output: Output,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    pub lock_id: String,
    /// The token printed by `lockctl acquire`.
    #[arg(long)]
    pub token: String,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct ExtendArgs {
    pub lock_id: String,
    #[arg(long)]
    pub token: String,
    /// New lease length from now.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    pub lock_id: String,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    pub lock_id: String,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Wait this long for the lock (or the permits), in line with the other
    /// `--wait` clients of the key: served in arrival order.
    #[arg(long, value_parser = parse_duration)]
    pub wait: Option<Duration>,
    #[arg(long, value_parser = parse_metadata)]
    pub metadata: Option<Value>,
    #[arg(long)]
    pub holder: Option<String>,
    #[command(flatten)]
    pub permits: PermitArgs,
    /// Keep this file holding the time (RFC 3339) until which the lock is
    /// safe to rely on; rewritten after every renewal (the command can read it).
    #[arg(long)]
    pub lease_file: Option<std::path::PathBuf>,
    /// The command to run while holding the lock. It sees LOCK_ID, LOCK_TOKEN,
    /// LOCK_FENCING_TOKEN (and with permits LOCK_PERMITS).
    #[arg(required = true, last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `--metadata` must be a JSON object, given inline or as `@FILE` (`@-`: stdin).
pub fn parse_metadata(text: &str) -> Result<Value, String> {
    let content;
    let text = match text.strip_prefix('@') {
        Some("-") => {
            let mut buf = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            content = buf;
            content.as_str()
        }
        Some(path) => {
            content = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            content.as_str()
        }
        None => text,
    };
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    if !value.is_object() {
        return Err("metadata must be a JSON object, e.g. '{\"owner\":\"team-a\"}'".into());
    }
    Ok(value)
}

fn request(lock_id: &str, ttl: Duration, metadata: Option<Value>, holder: Option<String>) -> AcquireRequest {
    AcquireRequest {
        holder,
        ..AcquireRequest::new(lock_id, ttl, metadata.unwrap_or(Value::Null))
    }
}

/// What `acquire` and `exec` ask for: the mutex or permits of a semaphore.
enum Want {
    Mutex(AcquireRequest),
    Permits(PermitRequest),
}

impl Want {
    fn lock_id(&self) -> &str {
        match self {
            Want::Mutex(req) => &req.lock_id,
            Want::Permits(req) => &req.base.lock_id,
        }
    }

    fn token(&self) -> &str {
        match self {
            Want::Mutex(req) => &req.token,
            Want::Permits(req) => &req.base.token,
        }
    }

    fn new(base: AcquireRequest, permits: PermitArgs) -> Self {
        match permits {
            PermitArgs {
                permits: None,
                exclusive: false,
            } => Want::Mutex(base),
            PermitArgs { permits, exclusive } => Want::Permits(PermitRequest {
                base,
                permits: permits.unwrap_or(1),
                exclusive,
            }),
        }
    }
}

/// A grant of either kind; `permits` is `Some((n, exclusive))` for a semaphore's.
struct Held {
    grant: Grant,
    permits: Option<(u32, bool)>,
}

/// How often `exec` takes a lock again whose grant came back too late to rely on.
const STALE_GRANT_ATTEMPTS: u32 = 5;

/// What came of waiting for a lock.
enum Taken {
    Held(Held),
    /// Not granted: one line saying why (who holds it).
    NotGranted(String),
    /// SIGINT or SIGTERM while waiting in line: the exit code (128 + signal).
    Interrupted(i32),
}

/// Acquires what `want` asks for. With a `wait`, in line with the other
/// waiters of the key (arrival order; see `lock::WaitQueue`); SIGINT or
/// SIGTERM meanwhile leave the line and give back a grant that may have
/// come with the signal.
async fn take(client: &LockClient, want: &Want, wait: Option<Duration>) -> Result<Taken, CliError> {
    use tokio::signal::unix::{SignalKind, signal};

    let wait = wait.unwrap_or_default();
    if wait.is_zero() {
        return Ok(match want {
            Want::Mutex(req) => match client.acquire_timed(req, wait).await? {
                Some(grant) => Taken::Held(Held { grant, permits: None }),
                None => Taken::NotGranted(held_elsewhere(&req.lock_id)),
            },
            Want::Permits(req) => match client.acquire_permits_timed(req, wait).await? {
                Ok(taken) => Taken::Held(taken.into()),
                Err(semaphore) => Taken::NotGranted(why_full(&semaphore, req)),
            },
        });
    }
    let (holder, permits) = match want {
        Want::Mutex(req) => (req.holder.clone(), None),
        Want::Permits(req) => (req.base.holder.clone(), Some((req.permits, req.exclusive))),
    };
    let line = client.wait_queue(want.lock_id(), want.token(), holder, permits)?;
    let waiting = async {
        Ok::<_, CliError>(match want {
            Want::Mutex(req) => match line.acquire(req, wait).await? {
                Some(grant) => Taken::Held(Held { grant, permits: None }),
                None => Taken::NotGranted(held_elsewhere(&req.lock_id)),
            },
            Want::Permits(req) => match line.acquire_permits(req, wait).await? {
                Ok(taken) => Taken::Held(taken.into()),
                Err(semaphore) => Taken::NotGranted(why_full(&semaphore, req)),
            },
        })
    };
    let mut sigterm = signal(SignalKind::terminate()).map_err(CliError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(CliError::Signal)?;
    let signal = tokio::select! {
        taken = waiting => return taken,
        _ = sigterm.recv() => nix::sys::signal::Signal::SIGTERM,
        _ = sigint.recv() => nix::sys::signal::Signal::SIGINT,
    };
    // best effort: the entry expires, and so would a grant
    let _ = line.leave().await;
    let _ = client.release(want.lock_id(), want.token()).await;
    eprintln!(
        "lockctl: stopped waiting for lock {:?} ({signal}); left the line",
        want.lock_id()
    );
    Ok(Taken::Interrupted(128 + signal as i32))
}

fn held_elsewhere(lock_id: &str) -> String {
    format!("lock {lock_id:?} is held by someone else")
}

impl From<crate::lock::PermitGrant> for Held {
    fn from(taken: crate::lock::PermitGrant) -> Self {
        Held {
            grant: taken.grant,
            permits: Some((taken.permits, taken.exclusive)),
        }
    }
}

pub async fn acquire(args: AcquireArgs) -> Result<i32, CliError> {
    let client = LockClient::from_args(&args.engine)?;
    let want = Want::new(
        request(&args.lock_id, args.ttl, args.metadata, args.holder),
        args.permits,
    );
    match take(&client, &want, args.wait).await? {
        Taken::Held(Held { grant, permits }) => {
            let lock = grant.lock;
            match args.output {
                Output::Token => println!("{}", lock.token),
                Output::Json => {
                    let mut json = serde_json::to_value(&lock)?;
                    if let Some((permits, exclusive)) = permits {
                        json["permits"] = permits.into();
                        json["exclusive"] = exclusive.into();
                    }
                    println!("{}", serde_json::to_string_pretty(&json)?);
                }
            }
            Ok(0)
        }
        Taken::NotGranted(why) => {
            eprintln!("lockctl: {why}");
            Ok(1)
        }
        Taken::Interrupted(code) => Ok(code),
    }
}

pub async fn release(args: ReleaseArgs) -> Result<i32, CliError> {
    let client = LockClient::from_args(&args.engine)?;
    if client.release(&args.lock_id, &args.token).await? {
        Ok(0)
    } else {
        eprintln!("lockctl: lock {:?} is not held by that token", args.lock_id);
        Ok(1)
    }
}

pub async fn extend(args: ExtendArgs) -> Result<i32, CliError> {
    let client = LockClient::from_args(&args.engine)?;
    match client.extend_lease(&args.lock_id, &args.token, args.ttl, None).await? {
        ExtendOutcome::Extended => Ok(0),
        ExtendOutcome::Expired => {
            eprintln!(
                "lockctl: the lease of lock {:?} expired; an expired lease is not extended (acquire the lock again)",
                args.lock_id
            );
            Ok(1)
        }
        ExtendOutcome::NotHeld => {
            eprintln!("lockctl: lock {:?} is not held by that token", args.lock_id);
            Ok(1)
        }
    }
}

pub async fn get(args: GetArgs) -> Result<i32, CliError> {
    let client = LockClient::from_args(&args.engine)?;
    match client.get(&args.lock_id).await? {
        Some(lock) => {
            println!("{}", serde_json::to_string_pretty(&lock)?);
            Ok(0)
        }
        None => {
            eprintln!("lockctl: no live lock {:?}", args.lock_id);
            Ok(1)
        }
    }
}

/// Runs the command while holding the lock; forwards SIGTERM/SIGINT to it;
/// releases when it exits; exits with its code.
pub async fn exec(args: ExecArgs) -> Result<i32, CliError> {
    use tokio::signal::unix::{SignalKind, signal};

    let client = LockClient::from_args(&args.engine)?;
    let want = Want::new(
        request(&args.lock_id, args.ttl, args.metadata, args.holder),
        args.permits,
    );
    // The winning attempt's send time bounds the lease. A grant whose answer
    // came back after that bound (a search cluster failing over: retries, a
    // slow node) may already belong to someone else: the command must not
    // start on it. It is taken again with the same token, which succeeds (and
    // keeps the fencing token) only while nobody else took the lock meanwhile.
    let deadline = args.wait.map(|wait| std::time::Instant::now() + wait);
    let mut attempts = 0;
    let held = loop {
        attempts += 1;
        let wait = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let taken = if attempts == 1 {
            take(&client, &want, wait).await
        } else {
            // a retake: at once by the same token, which still holds the
            // lock unless someone else took it meanwhile; only then in line
            // (joining the end while holding the lock would stall everyone)
            match take(&client, &want, None).await {
                Ok(Taken::NotGranted(_)) => take(&client, &want, wait).await,
                other => other,
            }
        };
        let held = match taken {
            Ok(Taken::Held(held)) => held,
            Ok(Taken::NotGranted(why)) => {
                eprintln!("lockctl: could not acquire: {why}");
                return Ok(EXIT_NOT_ACQUIRED);
            }
            Ok(Taken::Interrupted(code)) => return Ok(code),
            // an acquire whose answer was lost may have been granted: give
            // it back by its token rather than leave it held for a whole ttl
            Err(e) => {
                let _ = client.release(want.lock_id(), want.token()).await;
                return Err(e);
            }
        };
        if held.grant.sent_at + args.ttl > std::time::SystemTime::now() {
            break held;
        }
        if attempts >= STALE_GRANT_ATTEMPTS {
            client
                .release(&held.grant.lock.lock_id, &held.grant.lock.token)
                .await
                .ok();
            eprintln!(
                "lockctl: could not acquire: each grant of {:?} came back after its {} lease could have run out (is the search engine overloaded?)",
                held.grant.lock.lock_id,
                crate::duration::format_duration(args.ttl)
            );
            return Ok(EXIT_NOT_ACQUIRED);
        }
        eprintln!(
            "lockctl: the grant of {:?} came back after its lease could have run out; taking it again",
            held.grant.lock.lock_id
        );
    };
    let Grant { lock, sent_at } = held.grant;
    // renewing and releasing work alike for a mutex and a semaphore holder
    let lease = Lease::start(client.clone(), lock.clone(), args.ttl, sent_at);
    if let Some(path) = args.lease_file.clone() {
        let mut valid = lease.valid_until();
        tokio::spawn(async move {
            loop {
                let until: chrono::DateTime<chrono::Utc> = (*valid.borrow_and_update()).into();
                let tmp = path.with_extension("tmp");
                let text = crate::duration::format_time(until);
                if std::fs::write(&tmp, text)
                    .and_then(|_| std::fs::rename(&tmp, &path))
                    .is_err()
                {
                    return;
                }
                if valid.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let mut command = tokio::process::Command::new(&args.command[0]);
    command
        .args(&args.command[1..])
        .env("LOCK_ID", &lock.lock_id)
        .env("LOCK_TOKEN", &lock.token)
        .env("LOCK_FENCING_TOKEN", lock.fencing_token.to_string());
    if let Some((permits, _)) = held.permits {
        command.env("LOCK_PERMITS", permits.to_string());
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            client.release(&lock.lock_id, &lock.token).await.ok();
            return Err(CliError::Spawn(args.command[0].clone(), e));
        }
    };
    let mut lost = lease.lost_signal();
    let mut sigterm = signal(SignalKind::terminate()).map_err(CliError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(CliError::Signal)?;
    let mut lock_lost = false;
    let status: ExitStatus = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(CliError::Wait)?,
            _ = sigterm.recv() => forward(&child, nix::sys::signal::Signal::SIGTERM),
            _ = sigint.recv() => forward(&child, nix::sys::signal::Signal::SIGINT),
            Ok(()) = lost.changed(), if !lock_lost => {
                if *lost.borrow() {
                    lock_lost = true;
                    eprintln!(
                        "lockctl: lock {:?} was lost (its lease ran out or another owner took it); stopping the command",
                        lock.lock_id
                    );
                    forward(&child, nix::sys::signal::Signal::SIGTERM);
                }
            }
        }
    };
    lease.stop().await;
    match client.release(&lock.lock_id, &lock.token).await {
        Ok(true) => {}
        // Not ours any more: the lease ran out (the process was paused, or
        // renewals failed) and someone else may have held it meanwhile.
        Ok(false) if !lock_lost => {
            lock_lost = true;
            eprintln!(
                "lockctl: lock {:?} was lost while the command ran (its lease was not renewed in time)",
                lock.lock_id
            );
        }
        Ok(false) => {}
        Err(e) => eprintln!(
            "lockctl: could not release lock {:?} (it expires by itself): {e}",
            lock.lock_id
        ),
    }
    let code = exit_code(status);
    Ok(if lock_lost { code.max(1) } else { code })
}

#[derive(Args, Debug)]
pub struct IndexArgs {
    #[command(subcommand)]
    pub command: IndexCommand,
}

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// Show the lock index behind the alias, its UUID and fencing floor, and
    /// whether locks are granted. Exit 0 granting, 1 refusing, 2 error.
    Status(IndexStatusArgs),
    /// After the lock index was deleted, re-created or restored from a
    /// snapshot: create the next lock index, whose fencing tokens all exceed
    /// --fencing-floor, and grant again. Live locks of the old index are
    /// dropped. Refused while locks are being granted.
    Recover(IndexRecoverArgs),
}

#[derive(Args, Debug)]
pub struct IndexStatusArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Text)]
    pub output: TextOrJson,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Output of the `index` and `semaphore` commands: lines to read, or JSON.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TextOrJson {
    Text,
    Json,
}

#[derive(Args, Debug)]
pub struct IndexRecoverArgs {
    /// Every fencing token handed out from now on is above this number. It
    /// MUST be at least the highest fencing token ever handed out for any
    /// lock of this index (check your downstream systems' records, e.g. the
    /// highest token they accepted), or stale holders may pass fencing checks.
    #[arg(long)]
    pub fencing_floor: u64,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub async fn index(args: IndexArgs) -> Result<i32, CliError> {
    match args.command {
        IndexCommand::Status(args) => index_status(args).await,
        IndexCommand::Recover(args) => index_recover(args).await,
    }
}

async fn index_status(args: IndexStatusArgs) -> Result<i32, CliError> {
    let client = LockClient::from_args(&args.engine)?;
    let status = client.assets().status().await?;
    match args.output {
        TextOrJson::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        TextOrJson::Text => {
            let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            println!("alias: {}", status.alias);
            match &status.index {
                Some(index) => println!("index: {index}"),
                None if status.grants_allowed => println!("index: - (the first acquire creates it)"),
                None => println!("index: -"),
            }
            println!("uuid: {}", or_none(&status.uuid));
            println!("recorded uuid: {}", or_none(&status.recorded_uuid));
            println!(
                "fencing floor: {}",
                status.fencing_floor.map_or_else(|| "-".into(), |f| f.to_string())
            );
            match &status.problem {
                None => println!("grants: allowed"),
                Some(problem) => println!("grants: refused: {problem}"),
            }
        }
    }
    Ok(if status.grants_allowed { 0 } else { 1 })
}

async fn index_recover(args: IndexRecoverArgs) -> Result<i32, CliError> {
    let client = LockClient::from_args(&args.engine)?;
    let state = client.assets().recover(args.fencing_floor).await?;
    println!(
        "lock index {} (UUID {}) now serves alias {}; fencing tokens start above {}",
        state.index,
        state.uuid,
        client.index(),
        state.fencing_floor
    );
    Ok(0)
}

fn forward(child: &tokio::process::Child, signal: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
    }
}

/// The child's exit code; 128 + signal number when a signal ended it (as shells do).
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_must_be_a_json_object() {
        assert!(parse_metadata(r#"{"a":1}"#).is_ok());
        assert!(parse_metadata("[1]").unwrap_err().contains("JSON object"));
        assert!(parse_metadata("{oops").unwrap_err().contains("invalid JSON"));
    }
}
