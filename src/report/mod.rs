//! Report stage: what edgesync tells the outside world. The local HTTP listener serves
//! Prometheus metrics, liveness and readiness, and the status documents of [`status`].

pub(crate) mod outbox;
pub(crate) mod page;
pub(crate) mod publisher;
pub(crate) mod status;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use status::StatusBoard;

/// What the HTTP listener reads.
#[derive(Clone)]
pub(crate) struct Http {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) board: Arc<StatusBoard>,
    /// For readiness: is the Kubernetes API reachable?
    pub(crate) client: kube::Client,
}

/// Serves until shutdown:
/// - `GET /`: the status page;
/// - `GET /metrics`: OpenMetrics text;
/// - `GET /healthz`: the process is alive;
/// - `GET /readyz`: the config is loaded and the Kubernetes API answers;
/// - `GET /api/v1/status`: the node and app status documents as JSON.
pub(crate) async fn serve_http(
    listener: TcpListener,
    http: Http,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/", get(page_html))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/api/v1/status", get(status_json))
        .with_state(http);
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!("HTTP listener failed: {e}");
    }
}

async fn metrics_text(State(http): State<Http>) -> impl IntoResponse {
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        http.metrics.encode(),
    )
}

async fn ready(State(http): State<Http>) -> Response {
    match tokio::time::timeout(Duration::from_secs(3), http.client.apiserver_version()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Kubernetes API: {e}\n"),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "Kubernetes API: no answer within 3s\n",
        )
            .into_response(),
    }
}

async fn page_html(State(http): State<Http>) -> axum::response::Html<String> {
    axum::response::Html(page::render(
        &http.board.document(),
        crate::state::unix_now(),
    ))
}

async fn status_json(State(http): State<Http>) -> Json<status::StatusDocument> {
    Json(http.board.document())
}
