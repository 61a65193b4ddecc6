//! A Git smart-HTTP server on a free loopback port: axum in front of the real
//! `git http-backend` CGI program, with optional token authentication (HTTP basic, the token
//! as password) like GitHub, GitLab and Gitea accept.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine;
use tokio::io::AsyncWriteExt;

struct Shared {
    root: PathBuf,
    token: Option<String>,
    requests: AtomicUsize,
    rejected: AtomicUsize,
    /// When each request reached the server, and its path and query (for benchmarks).
    log: std::sync::Mutex<Vec<(std::time::Instant, String)>>,
}

pub struct GitHttpServer {
    pub port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl GitHttpServer {
    /// Serves every bare repository under `root` as `http://127.0.0.1:PORT/<name>.git`.
    pub async fn start(root: &Path, token: Option<&str>) -> GitHttpServer {
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            token: token.map(str::to_string),
            requests: AtomicUsize::new(0),
            rejected: AtomicUsize::new(0),
            log: std::sync::Mutex::default(),
        });
        let app = axum::Router::new().fallback(cgi).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        GitHttpServer { port, shared, task }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}.git", self.port)
    }

    /// Requests that reached `git http-backend`.
    pub fn served(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Every request so far: when it arrived, and its path with the query.
    pub fn log(&self) -> Vec<(std::time::Instant, String)> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Requests refused for missing or wrong credentials.
    pub fn rejected(&self) -> usize {
        self.shared.rejected.load(Ordering::SeqCst)
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(encoded) = value.strip_prefix("Basic ") else {
        return false;
    };
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
        return false;
    };
    let text = String::from_utf8_lossy(&decoded);
    text.split_once(':').is_some_and(|(_, pass)| pass == token)
}

async fn cgi(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    shared
        .log
        .lock()
        .unwrap()
        .push((std::time::Instant::now(), request.uri().to_string()));
    if let Some(token) = &shared.token {
        if !authorized(request.headers(), token) {
            shared.rejected.fetch_add(1, Ordering::SeqCst);
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Basic realm=\"git\"")
                .body(Body::from("credentials required"))
                .unwrap();
        }
    }
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, 256 * 1024 * 1024).await.unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REMOTE_USER", "edgesync-test")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let output = child.wait_with_output().await.expect("git http-backend");
    let _ = writer.await;
    cgi_response(&output.stdout)
}

/// Turns CGI output (headers, blank line, body) into an HTTP response.
fn cgi_response(out: &[u8]) -> Response {
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            out.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        });
    let Some((head_end, body_start)) = split else {
        return Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from("bad CGI output"))
            .unwrap();
    };
    let mut builder = Response::builder().status(StatusCode::OK);
    for line in String::from_utf8_lossy(&out[..head_end]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or("500");
            builder = builder.status(code.parse::<u16>().unwrap_or(500));
        } else if let Ok(v) = HeaderValue::from_str(value) {
            builder = builder.header(name, v);
        }
    }
    builder
        .body(Body::from(out[body_start..].to_vec()))
        .unwrap()
}

/// A repository that lives elsewhere: a working copy here, pushed to a bare repository served
/// over HTTP. No file watch can see it, so only polls and triggers make the agent sync it.
pub struct Remote {
    pub repo: super::GitRepo,
    pub server: GitHttpServer,
    bare: PathBuf,
    _root: tempfile::TempDir,
}

impl Remote {
    /// Serves `repo`, which must have a commit, as `http://127.0.0.1:PORT/fleet.git`.
    pub async fn serve(repo: super::GitRepo) -> Remote {
        let root = tempfile::tempdir().unwrap();
        let bare = repo.bare_clone_into(root.path(), "fleet");
        let server = GitHttpServer::start(root.path(), None).await;
        Remote {
            repo,
            server,
            bare,
            _root: root,
        }
    }

    pub fn url(&self) -> String {
        self.server.url("fleet")
    }

    /// Pushes the working copy's `main`.
    pub fn push(&self) {
        self.repo.push_to(&self.bare);
    }
}
