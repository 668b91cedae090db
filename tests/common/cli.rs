//! Running `lockctl` against a search node with an index prefix of the test's own.

use std::process::{Command, Output};

/// `lockctl` talking to `url`, its lock index named by `prefix`.
pub fn lockctl_at(url: &str, prefix: &str) -> Command {
    let mut cmd = super::lockctl();
    cmd.env("ELASTICSEARCH_URL", url).env("LOCK_INDEX_PREFIX", prefix);
    cmd
}

/// Runs `lockctl ARGS` to its end.
pub fn run_at(url: &str, prefix: &str, args: &[&str]) -> Output {
    lockctl_at(url, prefix).args(args).output().expect("run lockctl")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}
