//! `edgesync-hub run --config FILE`: ingest from the broker, the fleet database, the pages and
//! the API. `edgesync-hub status [--url URL]`: the fleet summary in the terminal.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;

use edgesync_hub::gates::Driver;
use edgesync_hub::ingest::Topics;
use edgesync_hub::mqtt::{self, Counts, IngestConfig};
use edgesync_hub::store::{Postgres, Sqlite, Store};
use edgesync_hub::web::{self, Web};

#[derive(Parser)]
#[command(
    name = "edgesync-hub",
    version,
    about = "The fleet upstream of edgesync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the hub.
    Run {
        #[arg(long, default_value = "/etc/edgesync-hub/config.toml")]
        config: PathBuf,
    },
    /// Prints the fleet summary from a running hub.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:8480")]
        url: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    mqtt: MqttSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    http: HttpSection,
    gates: Option<GatesSection>,
}

/// Health-gated rollouts: the hub's signing key and its policies.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatesSection {
    /// OpenSSH Ed25519 private key (`ssh-keygen -t ed25519`); agents trust its public half.
    key_file: PathBuf,
    #[serde(default = "default_gate_prefix")]
    prefix: String,
    /// `RolloutPolicy` files (read from the fleet repository in a later version).
    policies: Vec<PathBuf>,
}

impl GatesSection {
    fn driver(&self) -> anyhow::Result<Driver> {
        let key = ssh_key::PrivateKey::read_openssh_file(&self.key_file)
            .with_context(|| format!("gates.key_file {}", self.key_file.display()))?;
        let mut policies = Vec::new();
        for path in &self.policies {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("gates.policies {}", path.display()))?;
            policies.push(edgesync_hub::policy::parse(
                &path.display().to_string(),
                &text,
            )?);
        }
        Ok(Driver::new(policies, key, &self.prefix))
    }
}

fn default_gate_prefix() -> String {
    "edgesync/gates".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttSection {
    host: String,
    #[serde(default = "default_port")]
    port: u16,
    #[serde(default = "default_client_id")]
    client_id: String,
    #[serde(default = "default_prefix")]
    status_prefix: String,
    /// Shared subscription group; replicas of one hub use the same.
    #[serde(default = "default_group")]
    group: String,
}

/// SQLite at `path` by default; PostgreSQL when `url` is set (several replicas share it).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    #[serde(default = "default_db")]
    path: PathBuf,
    url: Option<String>,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            path: default_db(),
            url: None,
        }
    }
}

fn default_db() -> PathBuf {
    "/var/lib/edgesync-hub/hub.db".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    listen: String,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            listen: "127.0.0.1:8480".into(),
        }
    }
}

fn default_port() -> u16 {
    1883
}
fn default_client_id() -> String {
    "edgesync-hub".into()
}
fn default_prefix() -> String {
    "edgesync/nodes/{node}".into()
}
fn default_group() -> String {
    "edgesync-hub".into()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "edgesync_hub=info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Run { config } => run(config).await,
        Command::Status { url } => status(&url).await,
    }
}

async fn run(path: PathBuf) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let config: Config = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let store = match &config.store.url {
        // Blocking client: opened off the async workers.
        Some(url) => {
            let url = url.clone();
            let pg = tokio::task::spawn_blocking(move || Postgres::connect(&url))
                .await?
                .context("store.url")?;
            tokio::task::spawn_blocking(move || Store::new(Box::new(pg))).await??
        }
        None => {
            let path = config.store.path.clone();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
            }
            let db = Sqlite::open(&path).with_context(|| format!("{}", path.display()))?;
            Store::new(Box::new(db))?
        }
    };
    let store = Arc::new(Mutex::new(store));
    let counts = Arc::new(Mutex::new(Counts::default()));
    let driver = match &config.gates {
        Some(gates) => Some(Arc::new(Mutex::new(gates.driver()?))),
        None => None,
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let ingest_config = IngestConfig {
        host: config.mqtt.host,
        port: config.mqtt.port,
        client_id: config.mqtt.client_id,
        topics: Topics::new(&config.mqtt.status_prefix),
        group: Some(config.mqtt.group),
    };
    let (client, events) = mqtt::client(&ingest_config);
    let ingest = tokio::spawn(mqtt::run(
        ingest_config,
        client.clone(),
        events,
        store.clone(),
        counts.clone(),
        driver.clone(),
        stopped,
    ));
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("http.listen {}", config.http.listen))?;
    tracing::info!(listen = %config.http.listen, "edgesync-hub running");
    let web = Web {
        store,
        counts,
        driver,
        client: Some(client),
    };
    axum::serve(listener, web::router(web))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    let _ = stop.send(true);
    let _ = ingest.await;
    Ok(())
}

async fn status(url: &str) -> anyhow::Result<()> {
    let api = format!("{}/api/v1/fleet", url.trim_end_matches('/'));
    let body = tokio::task::spawn_blocking(move || -> anyhow::Result<String> {
        let mut reply = ureq::get(&api)
            .call()
            .with_context(|| format!("cannot reach the hub at {api}"))?;
        Ok(reply.body_mut().read_to_string()?)
    })
    .await??;
    let fleet: serde_json::Value = serde_json::from_str(&body).context("the hub's answer")?;
    let nodes = fleet["nodes"].as_array().cloned().unwrap_or_default();
    let count = |s: &str| nodes.iter().filter(|n| n["state"] == s).count();
    println!(
        "{} nodes: {} online, {} offline, {} stale",
        nodes.len(),
        count("online"),
        count("offline"),
        count("stale")
    );
    println!(
        "{:<24} {:<14} {:<10} {:<12} {:>5}",
        "APP", "REVISION", "SYNC", "HEALTH", "NODES"
    );
    for app in fleet["apps"].as_array().cloned().unwrap_or_default() {
        let text = |k: &str| app[k].as_str().unwrap_or("-").to_string();
        println!(
            "{:<24} {:<14} {:<10} {:<12} {:>5}",
            text("app"),
            text("revision").chars().take(12).collect::<String>(),
            text("sync"),
            text("health"),
            app["nodes"].as_u64().unwrap_or_default()
        );
    }
    Ok(())
}
