//! Sending requests to the search engine: transient failures are retried,
//! answers are read once, and engine errors become [`LockError`]s that name
//! the engine's own reason.

use std::future::Future;
use std::time::Duration;

use elasticsearch::http::StatusCode;
use elasticsearch::http::response::Response;
use serde_json::Value;

use super::error::LockError;

/// Retries of a transient failure (503, timeout, connection reset) before giving up.
pub const TRANSIENT_RETRIES: u32 = 3;

/// The outcome of one engine request after retries: its status and JSON body
/// (a JSON string when the body was not JSON).
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Value,
}

impl Answer {
    /// The engine's error type (`index_not_found_exception`, …), if any.
    pub fn error_type(&self) -> Option<&str> {
        self.body["error"]["type"].as_str()
    }

    /// True when the index or alias addressed does not exist (as opposed to a
    /// missing document, which is also a 404).
    pub fn index_missing(&self) -> bool {
        self.status == StatusCode::NOT_FOUND && self.error_type() == Some("index_not_found_exception")
    }
}

/// Sends one request, retrying transient failures (transport errors and
/// HTTP 429/502/503/504) up to [`TRANSIENT_RETRIES`] times.
pub(crate) async fn send_with_retry<F, Fut>(
    operation: &'static str,
    backoff: Duration,
    request: F,
) -> Result<Answer, LockError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Response, elasticsearch::Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let message = match request().await {
            Ok(response) => {
                let status = response.status_code();
                match response.text().await {
                    // a 429 that is a block (the disk flood stage) does not pass by
                    // retrying; a 503 block (no cluster manager elected yet) does
                    Ok(text) if is_transient_status(status) && !(status.as_u16() == 429 && text.contains(BLOCKED)) => {
                        format!("HTTP {status}: {}", short(&text))
                    }
                    Ok(text) => {
                        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                        return Ok(Answer { status, body });
                    }
                    Err(e) => error_chain(&e),
                }
            }
            Err(e) => error_chain(&e),
        };
        if attempt > TRANSIENT_RETRIES {
            return Err(LockError::Unavailable {
                operation,
                attempts: attempt,
                message,
            });
        }
        tracing::debug!(operation, attempt, %message, "transient search engine failure, retrying");
        tokio::time::sleep(backoff * 2u32.pow(attempt - 1)).await;
    }
}

fn is_transient_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 502 | 503 | 504)
}

fn short(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() > 300 {
        format!("{}…", text.chars().take(300).collect::<String>())
    } else {
        text.to_string()
    }
}

/// The error and its causes on one line ("error sending request: connection refused").
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The engine's error type for an index (or cluster) that refuses writes.
const BLOCKED: &str = "cluster_block_exception";

/// Turns a non-2xx answer into an error that names the engine's reason.
pub(crate) fn expect_success(operation: &'static str, answer: &Answer) -> Result<(), LockError> {
    if answer.status.is_success() {
        return Ok(());
    }
    if answer.error_type() == Some(BLOCKED) && matches!(answer.status.as_u16(), 403 | 429) {
        let reason = engine_reason(&answer.body).trim_end_matches(';').to_string();
        let hint = if reason.contains("read-only-allow-delete") || reason.contains("flood") {
            "free disk space on the search nodes: the engine lifts the block when usage drops below the high watermark"
        } else {
            "an admin must make it writable again (remove index.blocks.write / index.blocks.read_only from the index settings)"
        };
        return Err(LockError::ReadOnly {
            operation,
            reason,
            hint,
        });
    }
    Err(LockError::Engine {
        operation,
        status: answer.status.as_u16(),
        reason: engine_reason(&answer.body),
    })
}

/// What a lock script failed on, when the engine says a script failed (the
/// document's shape is not the one the script expects): the innermost cause
/// and the script line it failed at.
pub(crate) fn script_failure(answer: &Answer) -> Option<String> {
    let script = &answer.body["error"]["caused_by"];
    if answer.status != StatusCode::BAD_REQUEST || script["type"] != "script_exception" {
        return None;
    }
    let mut cause = script;
    while cause["caused_by"].is_object() {
        cause = &cause["caused_by"];
    }
    let what = format!(
        "{}: {}",
        cause["type"].as_str().unwrap_or("error"),
        cause["reason"].as_str().unwrap_or("runtime error")
    );
    // the stack's line with the script's own code comes before the "^---- HERE" marker
    let stack: Vec<&str> = script["script_stack"]
        .as_array()
        .map_or(Vec::new(), |lines| lines.iter().filter_map(Value::as_str).collect());
    let at = stack
        .iter()
        .position(|line| line.contains("^---- HERE"))
        .and_then(|i| i.checked_sub(1))
        .map(|i| stack[i].split_whitespace().collect::<Vec<_>>().join(" "));
    Some(match at {
        Some(at) => format!("{what}, at `{at}`"),
        None => what,
    })
}

/// The error's type and reason, and its innermost cause's when it has one
/// ("illegal_argument_exception: failed to execute script" says little; the
/// script's own failure is in `caused_by`).
fn engine_reason(body: &Value) -> String {
    let error = &body["error"];
    let root = &error["root_cause"][0];
    let pick = |v: &Value| {
        let kind = v["type"].as_str().unwrap_or_default();
        let reason = v["reason"].as_str().unwrap_or_default();
        (!kind.is_empty() || !reason.is_empty()).then(|| format!("{kind}: {reason}"))
    };
    let mut innermost = &error["caused_by"];
    while innermost["caused_by"].is_object() {
        innermost = &innermost["caused_by"];
    }
    let reason = pick(error)
        .or_else(|| pick(root))
        .or_else(|| error.as_str().map(str::to_string))
        .unwrap_or_else(|| short(&body.to_string()));
    match pick(innermost) {
        Some(cause) => format!("{reason} (caused by {cause})"),
        None => reason,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn engine_reason_names_the_exception() {
        let body = json!({"error": {"type": "version_conflict_engine_exception", "reason": "boom"}, "status": 409});
        assert_eq!(engine_reason(&body), "version_conflict_engine_exception: boom");
        assert_eq!(engine_reason(&json!("plain")), "\"plain\"");
    }

    #[test]
    fn engine_reason_names_the_innermost_cause() {
        let body = json!({"error": {
            "type": "illegal_argument_exception", "reason": "failed to execute script",
            "caused_by": {"type": "script_exception", "reason": "runtime error",
                "caused_by": {"type": "date_time_parse_exception", "reason": "Text 'soon' could not be parsed"}}
        }, "status": 400});
        assert_eq!(
            engine_reason(&body),
            "illegal_argument_exception: failed to execute script \
             (caused by date_time_parse_exception: Text 'soon' could not be parsed)"
        );
    }

    #[test]
    fn a_missing_index_is_told_apart_from_a_missing_document() {
        let index = Answer {
            status: StatusCode::NOT_FOUND,
            body: json!({"error": {"type": "index_not_found_exception"}}),
        };
        let document = Answer {
            status: StatusCode::NOT_FOUND,
            body: json!({"error": {"type": "document_missing_exception"}}),
        };
        assert!(index.index_missing());
        assert!(!document.index_missing());
    }

    #[test]
    fn a_failed_lock_script_names_the_cause_and_the_line_on_one_line() {
        let answer = Answer {
            status: StatusCode::BAD_REQUEST,
            body: json!({"error": {"type": "illegal_argument_exception", "reason": "failed to execute script",
                "caused_by": {"type": "script_exception", "reason": "runtime error",
                    "script_stack": ["java.time.Instant.parse(Instant.java:397)", "x = Instant.parse(\n  src.expiresAt);", "    ^---- HERE"],
                    "caused_by": {"type": "date_time_parse_exception", "reason": "Text '1' could not be parsed"}}}}),
        };
        assert_eq!(
            script_failure(&answer).unwrap(),
            "date_time_parse_exception: Text '1' could not be parsed, at `x = Instant.parse( src.expiresAt);`"
        );
        let conflict = Answer {
            status: StatusCode::CONFLICT,
            body: json!({"error": {"type": "version_conflict_engine_exception"}}),
        };
        assert_eq!(script_failure(&conflict), None);
    }

    #[test]
    fn a_blocked_index_is_read_only_with_a_hint_for_its_cause() {
        let blocked = |status: StatusCode, block: &str| Answer {
            status,
            body: json!({"error": {"type": "cluster_block_exception",
                "reason": format!("index [kube-locks-000001] blocked by: [{block}];")}}),
        };
        let admin = expect_success(
            "acquire",
            &blocked(StatusCode::FORBIDDEN, "FORBIDDEN/8/index write (api)"),
        );
        let disk = expect_success(
            "extend",
            &blocked(
                StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_REQUESTS/12/disk usage exceeded flood-stage watermark, index has read-only-allow-delete block",
            ),
        );
        match (admin.unwrap_err(), disk.unwrap_err()) {
            (LockError::ReadOnly { hint: a, reason, .. }, LockError::ReadOnly { hint: d, .. }) => {
                assert!(a.contains("index.blocks.write") && d.contains("free disk space"));
                assert!(!reason.ends_with(';'), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
