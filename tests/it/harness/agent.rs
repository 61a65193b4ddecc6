//! The real `edgesync` binary, as a daemon (`run`) or one-shot command, with a config written
//! the way a user would write it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use super::cluster::cluster;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgesync");

/// The binary `Agent::start` runs: `EDGESYNC_BIN` if set (a benchmark comparing two builds side
/// by side, such as another opt-level), else the one cargo built with these tests.
fn daemon_bin() -> PathBuf {
    std::env::var_os("EDGESYNC_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

/// A config file in a temporary directory, with the state directory beside it.
pub struct AgentConfig {
    dir: tempfile::TempDir,
    sections: Vec<String>,
    /// Extra keys of the `[node]` section (labels, ...).
    node: String,
    /// The agent's HTTP listener (`/metrics`, status API), on a port of its own.
    pub http_port: u16,
    /// `[kubernetes] kubeconfig`; the test control plane's admin kubeconfig unless set.
    kubeconfig: Option<String>,
    /// `[node] name`, unique per config: agents of different tests share one control plane,
    /// where each node keeps its apps' inventories.
    pub node_name: String,
    /// `state_dir`; `state/` beside the config unless set.
    state_dir: Option<PathBuf>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl AgentConfig {
    pub fn new() -> AgentConfig {
        AgentConfig {
            dir: tempfile::tempdir().expect("tempdir"),
            sections: Vec::new(),
            node: String::new(),
            http_port: free_port(),
            kubeconfig: None,
            node_name: {
                static NEXT: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                format!("test-node-{}-{n}", std::process::id() % 10000)
            },
            state_dir: None,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Puts the state directory at `path` (a small filesystem, say).
    pub fn state_dir(mut self, path: &Path) -> Self {
        self.state_dir = Some(path.to_path_buf());
        self
    }

    fn state_path(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("state"))
    }

    /// Sets extra keys of `[node]`, such as `labels = { site = "plant-7" }`.
    pub fn node(mut self, keys: &str) -> Self {
        self.node = keys.to_string();
        self
    }

    /// Sets `[kubernetes] kubeconfig` as written in the file.
    pub fn kubeconfig(mut self, path: &str) -> Self {
        self.kubeconfig = Some(path.to_string());
        self
    }

    /// Adds a `[[repositories]]` entry; `body` is its TOML keys.
    pub fn repository(mut self, body: &str) -> Self {
        self.sections.push(format!("[[repositories]]\n{body}\n"));
        self
    }

    /// Adds a section such as `[mqtt]` or `[webhook]`, written before the repositories.
    pub fn section(mut self, name: &str, body: &str) -> Self {
        self.sections.insert(0, format!("[{name}]\n{body}\n"));
        self
    }

    /// Replaces `from` by `to` in every section, as a user editing the file would.
    pub fn edit(&mut self, from: &str, to: &str) {
        for section in &mut self.sections {
            *section = section.replace(from, to);
        }
        self.node = self.node.replace(from, to);
    }

    /// Adds an `[[apps]]` entry to a config that is already in use; call `write` after.
    pub fn push_app(&mut self, body: &str) {
        self.sections.push(format!("[[apps]]\n{body}\n"));
    }

    /// Adds an `[[apps]]` entry; `body` is its TOML keys.
    pub fn app(mut self, body: &str) -> Self {
        self.sections.push(format!("[[apps]]\n{body}\n"));
        self
    }

    /// Writes a file next to the config (credentials, ...) and returns its path.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    pub fn write(&self) -> PathBuf {
        let path = self.dir.path().join("config.toml");
        let text = format!(
            "state_dir = \"{}\"\n\n[node]\nname = \"{}\"\n{}\n\n[kubernetes]\nkubeconfig = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{}\"\n\n{}",
            self.state_path().display(),
            self.node_name,
            self.node,
            self.kubeconfig
                .clone()
                .unwrap_or_else(|| cluster().kubeconfig.display().to_string()),
            self.http_port,
            self.sections.join("\n")
        );
        // Rewriting the same text would still make a running agent reload.
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text).unwrap();
        }
        path
    }

    /// The app's persisted state, or `Null` before its first sync.
    pub fn state(&self, app: &str) -> serde_json::Value {
        let path = self.state_path().join(format!("apps/{app}.json"));
        match std::fs::read_to_string(path) {
            // A damaged file (a test made it so) reads as no state yet.
            Ok(text) => serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// The running agent's `GET /api/v1/status`, or `Null` while it does not answer.
    pub async fn status(&self) -> serde_json::Value {
        let reply = super::http::request(self.http_port, "GET", "/api/v1/status", &[], b"").await;
        serde_json::from_str(&reply.body).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until `app`'s state says `sha` was applied, and returns that state.
    pub async fn wait_applied(&self, app: &str, sha: &str) -> serde_json::Value {
        super::eventually(&format!("{app} applied at {sha}"), super::WAIT, || async {
            let state = self.state(app);
            (state["last_applied_revision"] == sha).then_some(state)
        })
        .await
    }

    /// Runs a one-shot command (`sync`, `check-config`, ...) against this config, without
    /// blocking the test's runtime (which may be serving Git over HTTP).
    pub async fn command(&self, args: &[&str]) -> Output {
        let config = self.write();
        tokio::process::Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .await
            .expect("run edgesync")
    }
}

/// `edgesync run` in the background, logging to a file.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    pub fn start(config: &AgentConfig) -> Agent {
        Self::start_with_env(config, &[])
    }

    /// Starts the agent with extra environment variables (`NOTIFY_SOCKET`, ...).
    pub fn start_with_env(config: &AgentConfig, env: &[(&str, &str)]) -> Agent {
        let path = config.write();
        let log = unique(config.dir().join("agent.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(daemon_bin())
            .arg("--config")
            .arg(&path)
            .args(["--log-level", "edgesync=debug", "run"])
            .env_remove("KUBECONFIG")
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .expect("start edgesync run");
        Agent {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Resident memory of the agent process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends SIGTERM and waits for the process to exit, without blocking the test's runtime
    /// (which may be serving the agent's Git repository).
    pub async fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "edgesync did not exit within 40s of SIGTERM:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn unique(path: PathBuf) -> PathBuf {
    let mut candidate = path.clone();
    let mut n = 0;
    while candidate.exists() {
        n += 1;
        candidate = path.with_extension(format!("{n}.log"));
    }
    candidate
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
