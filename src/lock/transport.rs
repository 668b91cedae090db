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
                    Ok(text) if is_transient_status(status) => format!("HTTP {status}: {}", short(&text)),
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

/// Turns a non-2xx answer into an error that names the engine's reason.
pub(crate) fn expect_success(operation: &'static str, answer: &Answer) -> Result<(), LockError> {
    if answer.status.is_success() {
        return Ok(());
    }
    Err(LockError::Engine {
        operation,
        status: answer.status.as_u16(),
        reason: engine_reason(&answer.body),
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
}
