//! Git webhook receiver (axum): `POST /hooks/{github,gitlab,gitea,bitbucket,generic}`.
//!
//! Checks run cheapest first, and nothing is synced for a rejected request: connections per
//! client and in all (closed at once), the client's request rate (429), body size (413), the
//! time to send headers and body (closed / 408), signature (401), the rate of verified
//! deliveries across all clients (429), replay of a delivery ID (409), payload (400). Unsigned
//! junk from one client therefore never uses up what real deliveries need: it is limited per
//! client, and only verified requests count against the global rate.
//! A verified push is answered 202 once the sync is scheduled. Pings and events that need no
//! sync, or name no configured repository, get 200 with the reason.

mod guard;
mod providers;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
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
#[cfg(feature = "fuzzing")]
pub(crate) use providers::sign;
pub(crate) use providers::{BadRequest, Parsed, Provider};

/// Delivery IDs remembered at most, whatever the window.
const MAX_REMEMBERED_DELIVERIES: usize = 100_000;
/// Client addresses whose request rate is tracked at most; beyond, idle ones are forgotten.
const MAX_TRACKED_CLIENTS: usize = 4096;
/// A client must have sent a request's headers within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// ... and its body, and had its answer, within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// A connection is closed after this, however busy (keep-alive included).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub(crate) enum WebhookError {
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

pub(crate) struct Server {
    cfg: WebhookConfig,
    secrets: Secrets,
    sink: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
    /// Verified deliveries, across all clients.
    bucket: Mutex<TokenBucket>,
    /// Requests of each client address, verified or not.
    clients: Mutex<HashMap<IpAddr, TokenBucket>>,
    /// Open connections of each client address.
    connections: Mutex<HashMap<IpAddr, usize>>,
    replays: Mutex<ReplayGuard>,
}

impl Server {
    pub(crate) fn new(
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
            clients: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
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

    pub(crate) fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/hooks/{provider}", post(receive))
            .layer(DefaultBodyLimit::max(self.cfg.max_body_bytes))
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                rate_limit,
            ))
            .with_state(self.clone())
    }

    /// Serves until shutdown. Each connection is served on its own task with a header read
    /// timeout and a lifetime; connections over the caps are closed as soon as accepted.
    pub(crate) async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "webhook listener ready");
        let router = self.router();
        let open = Arc::new(tokio::sync::Semaphore::new(self.cfg.max_connections));
        let mut connections = tokio::task::JoinSet::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of file descriptors, say: wait a little, not a busy loop.
                            tracing::warn!("webhook accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = open.clone().try_acquire_owned() else {
                        self.metrics.trigger("webhook", "connection_limit");
                        continue;
                    };
                    let Some(client) = ClientSlot::take(&self, peer.ip()) else {
                        self.metrics.trigger("webhook", "connection_limit");
                        continue;
                    };
                    let router = router.clone();
                    connections.spawn(async move {
                        serve_connection(stream, peer, router).await;
                        drop(client);
                        drop(permit);
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        connections.shutdown().await;
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

/// One open connection of a client, counted while it lives.
struct ClientSlot {
    server: Arc<Server>,
    ip: IpAddr,
}

impl ClientSlot {
    fn take(server: &Arc<Server>, ip: IpAddr) -> Option<ClientSlot> {
        let mut open = lock(&server.connections);
        let n = open.entry(ip).or_default();
        if *n >= server.cfg.max_connections_per_client {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            server: server.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.server.connections);
        if let Some(n) = open.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// HTTP/1.1 on one connection, with the peer's address for the per-client rate limit, headers
/// within [`HEADER_TIMEOUT`] and the whole connection within [`CONNECTION_LIFETIME`]. No
/// HTTP/2: webhook senders speak HTTP/1.1, cleartext HTTP/2 would have no header timeout, and
/// its code cost the binary about 0.3 MiB.
async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, router: axum::Router) {
    use tower::ServiceExt;
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs before the body is read, so a flood costs no body buffering or HMAC work: the
/// client's own request rate, then the time the request (body included) may take.
async fn rate_limit(State(server): State<Arc<Server>>, request: Request, next: Next) -> Response {
    let client = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) = client {
        let now = Instant::now();
        let allowed = {
            let mut clients = lock(&server.clients);
            if clients.len() >= MAX_TRACKED_CLIENTS && !clients.contains_key(&ip) {
                // Forget clients whose bucket has refilled: they are idle.
                let full = f64::from(server.cfg.rate_burst);
                clients.retain(|_, bucket| bucket.tokens_at(now) < full);
                if clients.len() >= MAX_TRACKED_CLIENTS {
                    clients.clear();
                }
            }
            clients
                .entry(ip)
                .or_insert_with(|| {
                    TokenBucket::new(server.cfg.rate_limit, server.cfg.rate_burst, now)
                })
                .try_take(now)
        };
        if !allowed {
            return server.reject(
                "webhook",
                "rate_limited",
                StatusCode::TOO_MANY_REQUESTS,
                "rate limited (this client)",
            );
        }
    }
    let response = match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            return server.reject(
                "webhook",
                "timeout",
                StatusCode::REQUEST_TIMEOUT,
                "request not received in time",
            )
        }
    };
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
            if let Err(why) = provider.verify(&headers, &body, secret, crate::model::unix_now()) {
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
    // Only verified requests count against the global rate, so junk cannot starve them.
    if !lock(&server.bucket).try_take(Instant::now()) {
        return server.reject(
            label,
            "rate_limited",
            StatusCode::TOO_MANY_REQUESTS,
            "rate limited (all clients)",
        );
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
