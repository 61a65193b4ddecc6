//! Chart repositories for the Helm tests: a directory served over HTTP (what `helm repo index`
//! writes, behind optional basic authentication), and the real CNCF distribution registry that
//! `tests/registry/build` compiles, which helm pushes charts to as OCI artifacts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;

use super::agent::free_port;
use super::cluster::repo_root;

struct Shared {
    root: PathBuf,
    basic: Option<String>,
    downloads: AtomicUsize,
}

/// Serves the files under `root` as `http://127.0.0.1:PORT/<path>`.
pub struct ChartServer {
    pub port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl ChartServer {
    /// `credentials`: the `user:password` every request must present with basic auth.
    pub async fn start(root: &Path, credentials: Option<&str>) -> ChartServer {
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            basic: credentials.map(|c| {
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(c)
                )
            }),
            downloads: AtomicUsize::new(0),
        });
        let app = axum::Router::new()
            .fallback(serve_file)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        ChartServer { port, shared, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// Chart archives (`.tgz`) served so far.
    pub fn downloads(&self) -> usize {
        self.shared.downloads.load(Ordering::SeqCst)
    }
}

impl Drop for ChartServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_file(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    if let Some(expected) = &shared.basic {
        let given = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Basic realm=\"charts\"")
                .body(Body::empty())
                .unwrap();
        }
    }
    let rel = request.uri().path().trim_start_matches('/');
    if rel.split('/').any(|part| part == "..") {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .body(Body::empty())
            .unwrap();
    }
    match tokio::fs::read(shared.root.join(rel)).await {
        Ok(bytes) => {
            if rel.ends_with(".tgz") {
                shared.downloads.fetch_add(1, Ordering::SeqCst);
            }
            Response::new(Body::from(bytes))
        }
        Err(_) => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::empty())
            .unwrap(),
    }
}

/// The pinned registry binary, built (or taken from the cache) once per test run.
fn registry_binary() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(repo_root().join("tests/registry/build"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/registry/build");
        assert!(out.status.success(), "tests/registry/build failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A CNCF distribution registry on a free loopback port, plain HTTP, storing in a temporary
/// directory.
pub struct Registry {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub async fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(&config)
            .env("OTEL_TRACES_EXPORTER", "none")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log")).unwrap())
            .spawn()
            .expect("start the registry");
        let registry = Registry {
            port,
            child,
            _dir: dir,
        };
        let url = format!("127.0.0.1:{port}");
        super::eventually("the registry to listen", Duration::from_secs(30), || {
            let url = url.clone();
            async move { tokio::net::TcpStream::connect(url).await.ok().map(|_| ()) }
        })
        .await;
        registry
    }

    /// `oci://127.0.0.1:PORT/<path>`
    pub fn url(&self, path: &str) -> String {
        format!("oci://127.0.0.1:{}/{path}", self.port)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
