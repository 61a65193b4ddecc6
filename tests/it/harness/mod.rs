//! Shared test harness: the control plane, namespaces, Git repositories and agent processes.

pub mod agent;
pub mod charts;
pub mod cluster;
pub mod git;
pub mod http;
pub mod http_git;
pub mod mqtt;
#[path = "../../../hub/tests/support/postgres.rs"]
pub mod postgres;
pub mod proxy;
pub mod signing;
pub mod ssh_git;

use std::future::Future;
use std::time::{Duration, Instant};

pub use agent::{Agent, AgentConfig};
pub use cluster::TestNamespace;
pub use git::GitRepo;
pub use http_git::{GitHttpServer, Remote};
pub use signing::Keys;
pub use ssh_git::SshGitServer;

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
/// Waiting is bounded only to fail a broken test; no test asserts on how long things take.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub const WAIT: Duration = Duration::from_secs(90);

/// "CPU model, N cores", for the first line of a benchmark's figures (benches only).
#[allow(dead_code)]
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}
