//! The `lockctl` command line: one binary for the operator, the init-container
//! helper and direct use of the lock index.

pub mod locks;
pub mod semaphores;

use clap::{Parser, Subcommand};

use crate::engine::ConfigError;
use crate::lock::LockError;

/// Exit code for errors (bad input, unreachable engine, refused credentials).
pub const EXIT_ERROR: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "lockctl",
    version,
    about = "Distributed locks for Kubernetes workloads, backed by Elasticsearch/OpenSearch"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", global = true, env = "LOG_FORMAT")]
    pub log_format: crate::telemetry::LogFormat,
}

/// One of the CRDs `lockctl crd` prints.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum CrdName {
    Distributedlocks,
    Semaphores,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the controller.
    Operator(Box<crate::operator::OperatorArgs>),
    /// Print the CustomResourceDefinitions as YAML (both, or the one named).
    Crd {
        #[arg(value_enum)]
        which: Option<CrdName>,
    },
    /// Wait until a DistributedLock is Granted (init-container helper).
    Wait(crate::wait::WaitArgs),
    /// Acquire a lock (or with --permits N / --exclusive, permits of its semaphore); prints the
    /// token. Exit 0 acquired, 1 held by someone else (the permits do not fit now), 2 error.
    Acquire(locks::AcquireArgs),
    /// Release a lock held with TOKEN. Exit 0 released, 1 not held by that token, 2 error.
    Release(locks::ReleaseArgs),
    /// Extend a lock held with TOKEN. Exit 0 extended, 1 not held by that token or its lease expired, 2 error.
    Extend(locks::ExtendArgs),
    /// Print the live lock as JSON. Exit 1 if there is none or it expired.
    Get(locks::GetArgs),
    /// Run a command while holding the lock (or permits of its semaphore); exit with its code (75
    /// if the lock could not be had).
    Exec(locks::ExecArgs),
    /// Inspect or recover the lock index (fencing-token safety).
    Index(locks::IndexArgs),
    /// Make a key a semaphore of N permits, show or delete it.
    Semaphore(semaphores::SemaphoreArgs),
}

/// Errors that end a `lockctl` command with exit code 2 and one line on stderr.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start {0:?}: {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("waiting for the command failed: {0}")]
    Wait(#[source] std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot encode the CRD as YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error(transparent)]
    Operator(#[from] crate::operator::OperatorError),
    #[error(transparent)]
    WaitFor(#[from] crate::wait::WaitError),
}

impl Cli {
    /// Parses the command line, runs the command and returns the process exit code.
    pub fn parse_and_run() -> i32 {
        let cli = match Cli::try_parse() {
            Ok(cli) => cli,
            Err(e) if !e.use_stderr() => e.exit(), // --help, --version
            Err(e) => {
                // One line: clap's message up to its usage hint, joined.
                let text = e.to_string();
                let message: Vec<&str> = text
                    .lines()
                    .map(str::trim)
                    .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
                    .collect();
                eprintln!("lockctl: error: {}", message.join(" ").trim_start_matches("error: "));
                return EXIT_ERROR;
            }
        };
        let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("lockctl: error: cannot start the async runtime: {e}");
                return EXIT_ERROR;
            }
        };
        runtime.block_on(cli.run())
    }

    async fn run(self) -> i32 {
        let operator = matches!(self.command, Command::Operator(_));
        if !operator {
            // `lockctl get KEY | head -1`: a closed pipe ends the command
            // quietly, as with any Unix tool, instead of a panic in println!
            // SAFETY: restores the default disposition before any other thread writes.
            let _ = unsafe {
                nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
            };
        }
        crate::telemetry::init(self.log_format, if operator { "info" } else { "warn" });
        let result = match self.command {
            Command::Operator(args) => crate::operator::run(*args).await.map(|_| 0).map_err(CliError::from),
            Command::Crd { which } => match which.map_or_else(
                || {
                    Ok(format!(
                        "{}{}",
                        crate::crd::crd_yaml()?,
                        crate::crd::semaphore_crd_yaml()?
                    ))
                },
                |which| match which {
                    CrdName::Distributedlocks => crate::crd::crd_yaml(),
                    CrdName::Semaphores => crate::crd::semaphore_crd_yaml(),
                },
            ) {
                Ok(yaml) => {
                    print!("{yaml}");
                    Ok(0)
                }
                Err(e) => Err(CliError::Yaml(e)),
            },
            Command::Wait(args) => crate::wait::run(args).await.map_err(CliError::from),
            Command::Acquire(args) => locks::acquire(args).await,
            Command::Release(args) => locks::release(args).await,
            Command::Extend(args) => locks::extend(args).await,
            Command::Get(args) => locks::get(args).await,
            Command::Exec(args) => locks::exec(args).await,
            Command::Index(args) => locks::index(args).await,
            Command::Semaphore(args) => semaphores::semaphore(args).await,
        };
        match result {
            Ok(code) => code,
            Err(e) => {
                eprintln!("lockctl: error: {}", crate::lock::error_line(&e));
                EXIT_ERROR
            }
        }
    }
}
