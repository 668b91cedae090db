//! The operator's HTTP endpoints: `/metrics`, `/healthz` (the process
//! serves) and `/readyz` (watchers synced and lock index reachable).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What `/readyz` reports.
#[derive(Default)]
pub struct Readiness {
    /// The watchers have listed every object once (a standby counts as synced).
    pub synced: AtomicBool,
    /// The lock index answered the controller's last request (errors that
    /// are about the request itself, like "held", do not count).
    pub engine_reachable: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed) && self.engine_reachable.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// Serves the endpoints on an already bound listener (bound once, at start-up,
/// so a taken port is a start-up error) until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(HttpState { metrics, readiness });
    axum::serve(listener, app).await
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

async fn ready_handler(State(state): State<HttpState>) -> impl IntoResponse {
    let r = &state.readiness;
    if r.is_ready() {
        (StatusCode::OK, "ok".to_string())
    } else {
        let synced = r.synced.load(Ordering::Relaxed);
        let engine = r.engine_reachable.load(Ordering::Relaxed);
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: watchers synced={synced}, lock index reachable={engine}"),
        )
    }
}
