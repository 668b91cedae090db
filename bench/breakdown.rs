//! Where a handoff's time goes: the operator's span timings (its log, with
//! `KLM_LOG_SPANS=1` and debug level for the controller) lined up with the
//! benchmark's own clock for each handoff of the "holder deleted" scenario.
//! `BENCH_BREAKDOWN=1 bench/run` turns it on (logging costs a little time, so
//! the table's headline figures come from a run without it).

use std::time::SystemTime;

use chrono::{DateTime, Utc};

/// One handoff as the benchmark saw it.
pub struct Handoff {
    pub namespace: String,
    pub holder: String,
    pub successor: String,
    /// The holder's delete was sent.
    pub sent: SystemTime,
    /// The successor's Granted was seen through a watch.
    pub seen: SystemTime,
}

/// One closed span of the operator's log.
struct Span {
    name: String,
    namespace: String,
    path: String,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
}

/// "439µs", "11.8ms", "621ns", "1.2s" (tracing-subscriber's format).
fn duration(text: &str) -> Option<chrono::Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let nanos = match unit {
        "ns" => number,
        "µs" => number * 1e3,
        "ms" => number * 1e6,
        "s" => number * 1e9,
        _ => return None,
    };
    Some(chrono::Duration::nanoseconds(nanos as i64))
}

/// A span-close line of a reconcile: `TS LEVEL reconcile{name=N namespace="NS"}PATH: target: close time.busy=B time.idle=I`.
fn span(line: &str) -> Option<Span> {
    let (at, rest) = line.split_once(' ')?;
    let end: DateTime<Utc> = at.parse().ok()?;
    let rest = &rest[rest.find("reconcile{name=")? + "reconcile{name=".len()..];
    let (name, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix("namespace=\"")?;
    let (namespace, rest) = rest.split_once("\"}")?;
    let (path, rest) = rest.split_once(": ")?;
    let busy = duration(rest.split("time.busy=").nth(1)?.split_whitespace().next()?)?;
    let idle = duration(rest.split("time.idle=").nth(1)?.split_whitespace().next()?)?;
    rest.contains(" close ").then_some(())?;
    Some(Span {
        name: name.into(),
        namespace: namespace.into(),
        path: path.into(),
        start: end - busy - idle,
        end,
    })
}

/// The steps of each handoff, in milliseconds, by step name (in order);
/// handoffs whose spans are not all in the log are left out.
pub fn steps(log: &str, handoffs: &[Handoff]) -> Vec<(&'static str, Vec<f64>)> {
    let found = steps_of(log, handoffs);
    let matched = found.first().map_or(0, |(_, s)| s.len());
    // the log format is tracing-subscriber's: say so loudly if it changed
    assert!(
        matched * 2 >= handoffs.len(),
        "breakdown: only {matched} of {} handoffs found in the operator's span log",
        handoffs.len()
    );
    found
}

fn steps_of(log: &str, handoffs: &[Handoff]) -> Vec<(&'static str, Vec<f64>)> {
    let spans: Vec<Span> = log.lines().filter_map(span).collect();
    let find = |ns: &str, name: &str, path: &str, after: DateTime<Utc>| {
        spans
            .iter()
            .find(|s| s.namespace == ns && s.name == name && s.path == path && s.end >= after)
    };
    let names = [
        "handoff step: delete sent → holder's cleanup starts (API write, watch, queue)",
        "handoff step: cleanup starts → release sent",
        "handoff step: release (one engine round trip)",
        "handoff step: release answered → next waiter's acquire sent (wake, its reconcile)",
        "handoff step: acquire (one engine round trip)",
        "handoff step: acquire answered → Granted status write sent",
        "handoff step: Granted status write (API)",
        "handoff step: status written → seen through a watch",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for h in handoffs {
        let sent: DateTime<Utc> = h.sent.into();
        let seen: DateTime<Utc> = h.seen.into();
        let (ns, a, b) = (h.namespace.as_str(), h.holder.as_str(), h.successor.as_str());
        let Some(cleanup) = find(ns, a, ":cleanup", sent) else {
            continue;
        };
        let Some(release) = find(ns, a, ":cleanup:engine{operation=\"release\"}", sent) else {
            continue;
        };
        let Some(acquire) = find(ns, b, ":acquire:engine{operation=\"acquire\"}", release.end) else {
            continue;
        };
        let Some(write) = find(ns, b, ":acquire:write{phase=Some(Granted)}", acquire.end) else {
            continue;
        };
        let marks = [
            sent,
            cleanup.start,
            release.start,
            release.end,
            acquire.start,
            acquire.end,
            write.start,
            write.end,
            seen,
        ];
        for (i, pair) in marks.windows(2).enumerate() {
            samples[i].push((pair[1] - pair[0]).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    names.into_iter().zip(samples).filter(|(_, s)| !s.is_empty()).collect()
}
