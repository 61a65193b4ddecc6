//! Git webhook receiver (axum): `POST /hooks/{github,gitlab,gitea,bitbucket,generic}`.
//!
//! Checks run cheapest first, and nothing is synced for a rejected request: rate limit
//! (429), body size (413), signature (401), replay of a delivery ID (409), payload (400).
//! A verified push is answered 202 once the sync is scheduled. Pings and events that need no
//! sync, or name no configured repository, get 200 with the reason.

mod guard;
mod providers;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::EventSink;
use crate::config::WebhookConfig;
use crate::metrics::Metrics;
use guard::{ReplayGuard, TokenBucket};
pub use providers::{sign, BadRequest, Parsed, Provider};

/// Delivery IDs remembered at most, whatever the window.
const MAX_REMEMBERED_DELIVERIES: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot read webhook secret {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("webhook secret {path} is empty")]
    EmptySecret { path: PathBuf },
}

/// The secret of each provider; `None` where none is configured.
#[derive(Default)]
struct Secrets {
    github: Option<Vec<u8>>,
    gitlab: Option<Vec<u8>>,
    gitea: Option<Vec<u8>>,
    bitbucket: Option<Vec<u8>>,
    generic: Option<Vec<u8>>,
}

impl Secrets {
    fn load(cfg: &WebhookConfig) -> Result<Secrets, WebhookError> {
        let read = |file: &Option<PathBuf>| -> Result<Option<Vec<u8>>, WebhookError> {
            let Some(path) = file else { return Ok(None) };
            let text = std::fs::read_to_string(path).map_err(|source| WebhookError::Secret {
                path: path.clone(),
                source,
            })?;
            let secret = text.trim();
            if secret.is_empty() {
                return Err(WebhookError::EmptySecret { path: path.clone() });
            }
            Ok(Some(secret.as_bytes().to_vec()))
        };
        Ok(Secrets {
            github: read(&cfg.github_secret_file)?,
            gitlab: read(&cfg.gitlab_token_file)?,
            gitea: read(&cfg.gitea_secret_file)?,
            bitbucket: read(&cfg.bitbucket_secret_file)?,
            generic: read(&cfg.generic_secret_file)?,
        })
    }

    fn of(&self, p: Provider) -> Option<&[u8]> {
        match p {
            Provider::GitHub => self.github.as_deref(),
            Provider::GitLab => self.gitlab.as_deref(),
            Provider::Gitea => self.gitea.as_deref(),
            Provider::Bitbucket => self.bitbucket.as_deref(),
            Provider::Generic => self.generic.as_deref(),
        }
    }
}

pub struct Server {
    cfg: WebhookConfig,
    secrets: Secrets,
    sink: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
    bucket: Mutex<TokenBucket>,
    replays: Mutex<ReplayGuard>,
}

impl Server {
    pub fn new(
        cfg: WebhookConfig,
        sink: Arc<dyn EventSink>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Server>, WebhookError> {
        let secrets = Secrets::load(&cfg)?;
        Ok(Arc::new(Server {
            bucket: Mutex::new(TokenBucket::new(
                cfg.rate_limit,
                cfg.rate_burst,
                Instant::now(),
            )),
            replays: Mutex::new(ReplayGuard::new(
                cfg.replay_window,
                MAX_REMEMBERED_DELIVERIES,
            )),
            cfg,
            secrets,
            sink,
            metrics,
        }))
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/hooks/{provider}", post(receive))
            .layer(DefaultBodyLimit::max(self.cfg.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                rate_limit,
            ))
            .with_state(self.clone())
    }

    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "webhook listener ready");
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(e) = axum::serve(listener, self.router())
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!("webhook listener failed: {e}");
        }
    }

    fn reject(&self, provider: &str, outcome: &str, status: StatusCode, message: &str) -> Response {
        self.metrics.trigger(provider, outcome);
        tracing::warn!(
            provider,
            status = status.as_u16(),
            "webhook rejected: {message}"
        );
        (status, format!("{message}\n")).into_response()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs before the body is read, so a flood costs no body buffering or HMAC work.
async fn rate_limit(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    if !lock(&server.bucket).try_take(Instant::now()) {
        return server.reject(
            "webhook",
            "rate_limited",
            StatusCode::TOO_MANY_REQUESTS,
            "rate limited",
        );
    }
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        server.metrics.trigger("webhook", "too_large");
        tracing::warn!(
            "webhook rejected: body larger than {} bytes",
            server.cfg.max_body_bytes
        );
    }
    response
}

async fn receive(
    State(server): State<Arc<Server>>,
    Path(provider): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(provider) = Provider::from_path(&provider) else {
        return (StatusCode::NOT_FOUND, "unknown provider\n").into_response();
    };
    let label = provider.label();
    match server.secrets.of(provider) {
        Some(secret) => {
            if let Err(why) = provider.verify(&headers, &body, secret) {
                return server.reject(label, "bad_signature", StatusCode::UNAUTHORIZED, why);
            }
        }
        None if server.cfg.insecure_no_secret => {}
        None => {
            return server.reject(
                label,
                "disabled",
                StatusCode::NOT_FOUND,
                "no secret configured for this provider",
            );
        }
    }
    // Only verified requests may enter the replay memory, or forged IDs could block real ones.
    match provider.delivery_id(&headers) {
        Some(id) => {
            if !lock(&server.replays).first_time(id, Instant::now()) {
                return server.reject(
                    label,
                    "replay",
                    StatusCode::CONFLICT,
                    &format!("delivery {id} was already received"),
                );
            }
        }
        None => {
            return server.reject(
                label,
                "malformed",
                StatusCode::BAD_REQUEST,
                "missing delivery ID header",
            );
        }
    }
    let event = match provider.parse(&headers, &body) {
        Ok(Parsed::Push(event)) => event,
        Ok(Parsed::Ignored(why)) => {
            server.metrics.trigger(label, "ignored");
            return (StatusCode::OK, format!("{why}\n")).into_response();
        }
        Err(BadRequest(why)) => {
            return server.reject(label, "malformed", StatusCode::BAD_REQUEST, &why);
        }
    };
    match server.sink.deliver(event) {
        Ok(()) => (StatusCode::ACCEPTED, "sync scheduled\n").into_response(),
        Err(refused) => (StatusCode::OK, format!("ignored: {}\n", refused.reason)).into_response(),
    }
}
