//! Logging and tracing set-up.

use std::io::IsTerminal;

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber; `RUST_LOG` overrides `default_level`.
/// `KLM_LOG_SPANS=1` also logs every span as it closes, with its busy and idle
/// time (where a reconcile spends its time: engine calls, status writes).
pub fn init(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let spans = if std::env::var("KLM_LOG_SPANS").is_ok_and(|v| v == "1") {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    // colours only for a person at a terminal, never in log files or collectors
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(spans)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
