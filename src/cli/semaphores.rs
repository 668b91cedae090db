//! `lockctl semaphore set | get | delete`: a key's semaphore (its limit and
//! who holds its permits), without Kubernetes.

use clap::{Args, Subcommand};
use serde_json::json;

use super::CliError;
use super::locks::TextOrJson;
use crate::duration::format_time;
use crate::engine::EngineArgs;
use crate::lock::{LockClient, MAX_PERMITS, PermitHolder, PermitRequest, RetireOutcome, Semaphore};

#[derive(Args, Debug)]
pub struct SemaphoreArgs {
    #[command(subcommand)]
    pub command: SemaphoreCommand,
}

#[derive(Subcommand, Debug)]
pub enum SemaphoreCommand {
    /// Make KEY a semaphore of LIMIT permits, or change its limit (holders
    /// keep their permits). Exit 0 done, 2 error (also while a mutex holds KEY).
    Set(SetArgs),
    /// Show the limit and the holders of KEY's semaphore. Exit 0, 1 if KEY
    /// has no semaphore, 2 error.
    Get(GetArgs),
    /// Delete KEY's semaphore (KEY is a plain mutex again) if nobody holds a
    /// permit. Exit 0 deleted, 1 still held or no semaphore, 2 error.
    Delete(DeleteArgs),
}

#[derive(Args, Debug)]
pub struct SetArgs {
    pub lock_id: String,
    /// Permits (0 closes the key).
    #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_PERMITS)))]
    pub limit: u32,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Text)]
    pub output: TextOrJson,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    pub lock_id: String,
    #[arg(short = 'o', long = "output", value_enum, default_value_t = TextOrJson::Text)]
    pub output: TextOrJson,
    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    pub lock_id: String,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub async fn semaphore(args: SemaphoreArgs) -> Result<i32, CliError> {
    match args.command {
        SemaphoreCommand::Set(args) => {
            let client = LockClient::from_args(&args.engine)?;
            let semaphore = client.semaphore_set(&args.lock_id, args.limit).await?;
            print(&semaphore, args.output)?;
            Ok(0)
        }
        SemaphoreCommand::Get(args) => {
            let client = LockClient::from_args(&args.engine)?;
            match client.semaphore_get(&args.lock_id).await? {
                Some(semaphore) => {
                    print(&semaphore, args.output)?;
                    Ok(0)
                }
                None => {
                    eprintln!("lockctl: lock {:?} has no semaphore", args.lock_id);
                    Ok(1)
                }
            }
        }
        SemaphoreCommand::Delete(args) => {
            let client = LockClient::from_args(&args.engine)?;
            match client.semaphore_delete(&args.lock_id).await? {
                RetireOutcome::Deleted => {
                    println!("semaphore {:?} deleted; the key is a plain mutex again", args.lock_id);
                    Ok(0)
                }
                RetireOutcome::Held(semaphore) => {
                    eprintln!(
                        "lockctl: semaphore {:?} not deleted: {}",
                        args.lock_id,
                        who_holds(&semaphore)
                    );
                    Ok(1)
                }
                RetireOutcome::Missing => {
                    eprintln!("lockctl: lock {:?} has no semaphore", args.lock_id);
                    Ok(1)
                }
            }
        }
    }
}

fn print(semaphore: &Semaphore, output: TextOrJson) -> Result<(), CliError> {
    match output {
        TextOrJson::Json => {
            let mut value = serde_json::to_value(semaphore)?;
            value["held"] = json!(semaphore.held());
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        TextOrJson::Text => {
            println!("semaphore: {}", semaphore.lock_id);
            println!("limit: {}", semaphore.limit);
            println!("held: {}", semaphore.held());
            if semaphore.holders.is_empty() {
                println!("holders: none");
            } else {
                println!("holders (oldest grant first):");
            }
            for h in &semaphore.holders {
                let kind = if h.exclusive { " exclusive" } else { "" };
                println!(
                    "  {} permits={}{kind} fencingToken={} expiresAt={}{}",
                    h.token,
                    h.permits,
                    h.fencing_token,
                    format_time(h.expires_at),
                    h.holder.as_deref().map(|n| format!(" holder={n}")).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}

/// Who holds a semaphore, in one line: "3/3 permits held by a, b, c".
pub fn who_holds(semaphore: &Semaphore) -> String {
    let names: Vec<&str> = semaphore.holders.iter().map(holder_name).collect();
    match semaphore.holders.iter().find(|h| h.exclusive) {
        Some(writer) => format!("held exclusively by {}", holder_name(writer)),
        None if names.is_empty() => format!("0/{} permits held", semaphore.limit),
        None => format!(
            "{}/{} permits held by {}",
            semaphore.held(),
            semaphore.limit,
            names.join(", ")
        ),
    }
}

/// Why a permit request was not granted, in one line.
pub fn why_full(semaphore: &Semaphore, request: &PermitRequest) -> String {
    let lock_id = &semaphore.lock_id;
    let wanted = if request.exclusive {
        "every permit".to_string()
    } else {
        format!(
            "{} permit{}",
            request.permits,
            if request.permits == 1 { "" } else { "s" }
        )
    };
    if semaphore.limit == 0 {
        return format!("lock {lock_id}: the semaphore is closed (limit 0)");
    }
    if !request.exclusive && request.permits > semaphore.limit {
        return format!(
            "lock {lock_id}: {wanted} never fit the limit of {} (until it is raised)",
            semaphore.limit
        );
    }
    format!("lock {lock_id}: {}; wanted {wanted}", who_holds(semaphore))
}

fn holder_name(holder: &PermitHolder) -> &str {
    holder.holder.as_deref().unwrap_or(&holder.token)
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::Value;

    use super::*;
    use crate::lock::AcquireRequest;

    fn holder(name: &str, permits: u32, exclusive: bool) -> PermitHolder {
        PermitHolder {
            token: format!("token-{name}"),
            permits,
            exclusive,
            fencing_token: 1,
            created_at: Utc::now(),
            expires_at: Utc::now(),
            holder: Some(name.into()),
            metadata: Value::Null,
        }
    }

    fn request(permits: u32, exclusive: bool) -> PermitRequest {
        PermitRequest {
            base: AcquireRequest::new("k", std::time::Duration::from_secs(1), Value::Null),
            permits,
            exclusive,
        }
    }

    #[test]
    fn a_full_semaphore_says_who_holds_it_in_one_line() {
        let sem = Semaphore {
            lock_id: "reindex".into(),
            limit: 3,
            holders: vec![holder("a", 1, false), holder("b", 1, false), holder("c", 1, false)],
        };
        assert_eq!(
            why_full(&sem, &request(1, false)),
            "lock reindex: 3/3 permits held by a, b, c; wanted 1 permit"
        );
        assert_eq!(
            why_full(&sem, &request(4, false)),
            "lock reindex: 4 permits never fit the limit of 3 (until it is raised)"
        );
        let writer = Semaphore {
            holders: vec![holder("w", 3, true)],
            ..sem.clone()
        };
        assert_eq!(
            why_full(&writer, &request(1, true)),
            "lock reindex: held exclusively by w; wanted every permit"
        );
        let closed = Semaphore {
            limit: 0,
            holders: vec![],
            ..sem
        };
        assert_eq!(
            why_full(&closed, &request(1, false)),
            "lock reindex: the semaphore is closed (limit 0)"
        );
    }
}
